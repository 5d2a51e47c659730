"""IMG-CXR chest X-ray read: findings and impression as a preliminary draft.

One frontal film (a picture or a single-frame DICOM: window, MONOCHROME1 handled by the
imaging package), optionally its lateral view as a second image. Findings are
image-derived (`basis: "image"`, uncited); the clinical history is cited. See
`_imaging` for what the shared checks do.
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
    single_images,
)

TASK_ID = "IMG-CXR"
TITLE = "Chest X-ray read"


class ChestXrayInput(BaseModel):
    """What the reader is told besides the image."""

    model_config = ConfigDict(extra="forbid")

    clinical_history: str | None = Field(
        None, max_length=2000, description="Indication and relevant history."
    )
    question: str | None = Field(None, max_length=300, description="The clinical question.")
    view: str | None = Field(
        None, max_length=60, description="Projection, e.g. 'PA', 'AP portable, supine'."
    )


ROLE = (
    "You are a radiology assistant drafting a preliminary read of a chest X-ray for a "
    "radiologist or the treating clinician."
)


def _instruction(data: Any, context: ArtifactContext | None) -> str:
    given = context_lines(data, {"view": "View", "question": "Clinical question"})
    return lines(
        "Read the chest X-ray (image 1; a second image, if given, is the lateral view).",
        given,
        "Review in turn: lines and tubes; trachea and airway; lungs and pleura; heart "
        "size and mediastinum; hila; diaphragm and costophrenic angles; bones and soft "
        "tissues.",
        "- image_quality: adequate, limited or non-diagnostic.",
        "- findings: one entry per observation, abnormal and pertinent normal, each "
        "with its location.",
        "- impression: the most important findings in one to three sentences, most "
        "important first. Answer the clinical question if one is given.",
        "- limitations: projection, rotation, inspiration, anything not assessable.",
        history_note(),
    )


TASK = imaging_task(
    task_id=TASK_ID,
    slug="chest-xray",
    title=TITLE,
    role=ROLE,
    input_model=ChestXrayInput,
    instruction=_instruction,
    prepare_images=single_images(TASK_ID, 2, "a frontal view and optionally a lateral"),
    description="Chest X-ray (frontal, optional lateral) -> image findings (image-derived, "
    "located), impression, limitations, cited history; image numbers and invented "
    "comparisons flagged.",
)
