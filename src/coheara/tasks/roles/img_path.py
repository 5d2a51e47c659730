"""IMG-PATH pathology read: a histology description as a preliminary draft.

A picture larger than one model patch (896 px a side: a field or an exported region of
a slide) is cut into non-overlapping tissue tiles in spatial order by
`coheara.imaging.tiles.tile_image` (background skipped, at most 126 patches); smaller
pictures are already cut patches and go whole. Each patch reaches the model followed by
its `PATCH n (row r, column c)` label. Findings are image-derived (`basis: "image"`,
located by PATCH), the history is cited.
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
    prepare_patches,
)

TASK_ID = "IMG-PATH"
TITLE = "Pathology slide read"


class PathologyInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    clinical_history: str | None = Field(None, max_length=2000)
    specimen: str | None = Field(
        None, max_length=200, description="e.g. 'colon, sigmoid, endoscopic biopsy'."
    )
    stain: str | None = Field(None, max_length=60, description="e.g. 'H&E'.")
    question: str | None = Field(None, max_length=300)


ROLE = (
    "You are a pathology assistant drafting a preliminary histology description of slide "
    "patches for a pathologist."
)


def _instruction(data: Any, context: ArtifactContext | None) -> str:
    given = context_lines(
        data, {"specimen": "Specimen", "stain": "Stain", "question": "Clinical question"}
    )
    return lines(
        "Describe the pathology patches above (labelled PATCH n, in spatial order).",
        given,
        "- image_quality: adequate, limited or non-diagnostic (focus, tissue amount, artefact).",
        "- findings: tissue type, architecture, cellular and nuclear features, "
        "inflammation, necrosis, mitoses described in words; location names the "
        "PATCH label(s).",
        "- impression: the key features; you may name what they are consistent with, "
        "as considerations for the pathologist, never as a final diagnosis or grade.",
        "- limitations: patches only (no whole slide), magnification unknown, stain.",
        history_note(),
    )


TASK = imaging_task(
    task_id=TASK_ID,
    slug="pathology",
    title=TITLE,
    role=ROLE,
    input_model=PathologyInput,
    instruction=_instruction,
    prepare_images=prepare_patches,
    description="Histology picture(s) -> tissue tiles (background skipped, spatial order, "
    "<= 126) -> findings located by PATCH (image-derived), impression, limitations, cited "
    "history. Best effort.",
    category=("SP", "Surgical Pathology"),
    latency_target_ms=None,
)
