"""IMG-VOLUME CT or MR volume read: a preliminary draft from one series.

The series (two or more DICOM files of one CT or MR series, or its folder) goes through
`coheara.imaging.prepare`: ordered along the slice normal, sampled evenly to at most 85
slices, CT in three windows, MR min-max over the volume; the model gets the volume
instruction, each slice followed by `SLICE n`, and this task's instruction last (as
Google's notebooks feed it). The modality comes from the DICOM files. Findings are
image-derived (`basis: "image"`, located by `SLICE n`), the history is cited.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from coheara.tasks.envelope import ArtifactContext
from coheara.tasks.roles._imaging import (
    context_lines,
    history_note,
    imaging_task,
    lines,
    prepare_volume,
)

TASK_ID = "IMG-VOLUME"
TITLE = "CT or MR volume read"


class VolumeInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    clinical_history: str | None = Field(None, max_length=2000)
    body_region: str | None = Field(
        None, max_length=80, description="e.g. 'head', 'chest', 'abdomen and pelvis'."
    )
    contrast: str | None = Field(
        None, max_length=80, description="e.g. 'without contrast', 'portal venous phase'."
    )
    question: str | None = Field(None, max_length=300)


ROLE = (
    "You are a radiology assistant drafting a preliminary read of a CT or MRI volume for a "
    "radiologist or the treating clinician."
)


def _instruction(data: Any, context: ArtifactContext | None) -> str:
    given = context_lines(
        data,
        {"body_region": "Region", "contrast": "Contrast", "question": "Clinical question"},
    )
    return lines(
        "Write a preliminary read of the volume above: its slices are in anatomical "
        "order, each labelled SLICE n (only a sample of the series may be shown).",
        given,
        "- image_quality: adequate, limited or non-diagnostic (coverage, artefact).",
        "- findings: one entry per observation, abnormal and pertinent normal, organ by "
        "organ; location gives the anatomy and the SLICE label(s) where it is seen.",
        "- impression: the most important findings, most important first; answer the "
        "clinical question if one is given.",
        "- limitations: sampled slices, no contrast, coverage, artefacts.",
        history_note(),
    )


TASK = imaging_task(
    task_id=TASK_ID,
    slug="ct-mr-volume",
    title=TITLE,
    role=ROLE,
    input_model=VolumeInput,
    instruction=_instruction,
    prepare_images=prepare_volume,
    description="One CT or MR series (ordered, sampled to 85 slices, windowed) -> findings "
    "located by SLICE (image-derived), impression, limitations, cited history. Best effort.",
    latency_target_ms=None,
)
