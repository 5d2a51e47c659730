"""IMG-DERM dermatology photo read: a morphological description as a preliminary draft.

Up to three pictures of one lesion or eruption (overview, close-up, dermoscopy).
Findings are image-derived (`basis: "image"`, uncited); the history is cited.
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

TASK_ID = "IMG-DERM"
TITLE = "Dermatology photo read"


class DermatologyInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    clinical_history: str | None = Field(None, max_length=2000)
    body_site: str | None = Field(None, max_length=80, description="e.g. 'left forearm'.")
    duration: str | None = Field(None, max_length=80, description="e.g. 'three weeks'.")
    question: str | None = Field(None, max_length=300)


ROLE = (
    "You are a dermatology assistant drafting a preliminary description of clinical skin "
    "photographs for a dermatologist or the treating clinician."
)


def _instruction(data: Any, context: ArtifactContext | None) -> str:
    given = context_lines(
        data, {"body_site": "Body site", "duration": "Duration", "question": "Clinical question"}
    )
    return lines(
        "Describe the skin photographs (image 1 first; further images may be close-ups "
        "or dermoscopy of the same lesion).",
        given,
        "- image_quality: adequate, limited or non-diagnostic (focus, lighting, framing).",
        "- findings: primary morphology (macule, papule, plaque, nodule, vesicle, "
        "bulla, pustule, ulcer, ...), colour, border, surface change, configuration and "
        "distribution, each with its location; sizes in words only.",
        "- impression: the key features; you may name conditions the features are "
        "consistent with, as considerations for the clinician, never as a diagnosis. "
        "Name features that need prompt in-person review if present.",
        "- limitations: what a photograph cannot show (palpation, other sites).",
        history_note(),
    )


TASK = imaging_task(
    task_id=TASK_ID,
    slug="dermatology",
    title=TITLE,
    role=ROLE,
    input_model=DermatologyInput,
    instruction=_instruction,
    prepare_images=single_images(TASK_ID, 3, "overview, close-up, dermoscopy"),
    description="Skin photographs (up to 3) -> morphological findings (image-derived), "
    "impression with considerations, limitations, cited history.",
    category=None,
)
