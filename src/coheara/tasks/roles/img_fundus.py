"""IMG-FUNDUS retinal fundus photo read: a structured description as a preliminary draft.

One or two colour fundus photographs (one per eye). Findings are image-derived
(`basis: "image"`, uncited); the history is cited.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from coheara.tasks.envelope import ArtifactContext
from coheara.tasks.roles._imaging import (
    context_lines,
    history_note,
    imaging_task,
    lines,
    single_images,
)

TASK_ID = "IMG-FUNDUS"
TITLE = "Fundus photo read"


class FundusInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    clinical_history: str | None = Field(None, max_length=2000)
    eye: Literal["right", "left", "both"] | None = Field(
        None, description="Which eye; with two images, image 1 is the right eye."
    )
    question: str | None = Field(None, max_length=300)


ROLE = (
    "You are an ophthalmology assistant drafting a preliminary description of colour "
    "retinal fundus photographs for an ophthalmologist or the treating clinician."
)


def _instruction(data: Any, context: ArtifactContext | None) -> str:
    given = context_lines(data, {"eye": "Eye", "question": "Clinical question"})
    return lines(
        "Describe the fundus photographs (with two images, image 1 is the right eye "
        "and image 2 the left).",
        given,
        "- image_quality: adequate, limited or non-diagnostic (focus, media opacity, field).",
        "- findings: optic disc (colour, margins, cupping in words), macula and fovea, "
        "vessels (calibre, crossing changes), and any haemorrhages, microaneurysms, "
        "exudates, cotton wool spots, new vessels, detachment or pigment change; each "
        "with its location and eye.",
        "- impression: the key findings; you may name conditions they are consistent "
        "with, as considerations for the clinician, never as a diagnosis or a grade.",
        "- limitations: field of view, periphery not seen, quality.",
        history_note(),
    )


TASK = imaging_task(
    task_id=TASK_ID,
    slug="fundus",
    title=TITLE,
    role=ROLE,
    input_model=FundusInput,
    instruction=_instruction,
    prepare_images=single_images(TASK_ID, 2, "one per eye"),
    description="Fundus photographs (one per eye) -> disc, macula, vessel and lesion "
    "findings (image-derived), impression, limitations, cited history.",
    category=None,
)
