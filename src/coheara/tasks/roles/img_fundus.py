"""IMG-FUNDUS retinal fundus photo read: a structured description as a preliminary draft.

One or two colour fundus photographs (one per eye). Findings are image-derived
(`basis: "image"`, uncited); the history is cited.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from coheara.tasks.envelope import ArtifactContext
from coheara.tasks.roles._imaging import (
    NUMBER_EXEMPT,
    SINGLE_STUDY_CHECKS,
    ImagingRead,
    context_lines,
    fhir_builder,
    history_note,
    lines,
    single_images,
    system_prompt,
)
from coheara.tasks.spec import POINT_OF_CARE_MS, TaskSpec

TASK_ID = "IMG-FUNDUS"
TITLE = "Fundus photo read"


class FundusInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    clinical_history: str | None = Field(None, max_length=2000)
    eye: Literal["right", "left", "both"] | None = Field(
        None, description="Which eye; with two images, image 1 is the right eye."
    )
    question: str | None = Field(None, max_length=300)


SYSTEM_PROMPT = system_prompt(
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


TASK = TaskSpec(
    id=TASK_ID,
    slug="fundus",
    title=TITLE,
    version="1.0.0",
    mode="image",
    system_prompt=SYSTEM_PROMPT,
    input_model=FundusInput,
    output_model=ImagingRead,
    instruction=_instruction,
    checks=SINGLE_STUDY_CHECKS,
    max_tokens=1024,
    latency_target_ms=POINT_OF_CARE_MS,
    number_exempt=NUMBER_EXEMPT,
    to_fhir=fhir_builder(TASK_ID, TITLE, None),
    prepare_images=single_images(TASK_ID, 2, "one per eye"),
    description="Fundus photographs (one per eye) -> disc, macula, vessel and lesion "
    "findings (image-derived), impression, limitations, cited history.",
)
