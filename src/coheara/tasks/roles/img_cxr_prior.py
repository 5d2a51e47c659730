"""IMG-CXR-PRIOR current vs prior chest X-ray: what changed, as a preliminary draft.

Two images, the current study first and the prior second (`prepare_pair` sends the
prior first, each labelled PRIOR / CURRENT, and says the order in words). The draft
lists the current findings, each change with its status, and an impression. Findings
and changes are image-derived (`basis: "image"`, uncited); the history and the prior's
report, when given, are cited.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from coheara.tasks.envelope import ArtifactContext
from coheara.tasks.roles._imaging import (
    Quality,
    check_findings_present,
    check_image_numbers,
    context_lines,
    history_note,
    imaging_task,
    lines,
    prepare_current_prior,
)
from coheara.tasks.spec import Review, Statement

TASK_ID = "IMG-CXR-PRIOR"
TITLE = "Chest X-ray comparison with prior"


class ComparisonInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    clinical_history: str | None = Field(None, max_length=2000)
    question: str | None = Field(None, max_length=300)
    interval: str | None = Field(
        None, max_length=60, description="Time between the studies, e.g. '3 days'."
    )
    prior_report: str | None = Field(
        None, max_length=4000, description="The prior study's report, when available."
    )


class ImageFindingNow(BaseModel):
    """An observation on the current study. Its basis is the image: it cites no source."""

    basis: Literal["image"] = "image"
    observation: str = Field(max_length=300)
    location: str = Field("", max_length=80)


class Change(BaseModel):
    """How one finding differs between the prior and the current study (image-derived)."""

    basis: Literal["image"] = "image"
    observation: str = Field(max_length=300, description="The finding that changed or not.")
    status: Literal["new", "worse", "improved", "unchanged", "resolved", "uncertain"]
    location: str = Field("", max_length=80)


class ChestXrayComparison(BaseModel):
    image_quality: Quality = Field(description="Whether the two studies allow a comparison.")
    findings: list[ImageFindingNow] = Field(
        default_factory=list, max_length=10, description="Findings on the CURRENT study."
    )
    changes: list[Change] = Field(
        default_factory=list,
        max_length=8,
        description="Each finding compared between PRIOR and CURRENT, with its status.",
    )
    impression: str = Field(
        max_length=600, description="What changed, most important first; no treatment advice."
    )
    limitations: str = Field("", max_length=300)
    relevant_history: list[Statement] = Field(default_factory=list, max_length=4)


ROLE = (
    "You are a radiology assistant drafting a preliminary comparison of a current chest "
    "X-ray with the same patient's prior chest X-ray, for a radiologist or the treating "
    "clinician."
)


def _instruction(data: Any, context: ArtifactContext | None) -> str:
    given = context_lines(data, {"interval": "Interval", "question": "Clinical question"})
    return lines(
        "Compare the CURRENT chest X-ray with the PRIOR one (both labelled above).",
        given,
        "- image_quality: whether both studies allow a comparison.",
        "- findings: the findings on the CURRENT study, each with its location.",
        "- changes: for each finding on either study, its status from PRIOR to "
        "CURRENT: new, worse, improved, unchanged, resolved or uncertain (when "
        "positioning or technique differ too much to say).",
        "- impression: what changed, most important first; answer the clinical "
        "question if one is given.",
        "- limitations: differences in projection, rotation or inspiration between the studies.",
        history_note() + " A prior report in SOURCES is history too: cite it there.",
    )


def check_changes_present(review: Review) -> None:
    """A comparison states at least one change (or explicitly 'unchanged')."""
    if not review.draft.get("changes"):
        review.flag("no_comparison", "the comparison lists no change", element="changes")
        review.gap("missing_section", "no comparison with the prior was stated", element="changes")


TASK = imaging_task(
    task_id=TASK_ID,
    slug="chest-xray-prior",
    title=TITLE,
    role=ROLE,
    input_model=ComparisonInput,
    instruction=_instruction,
    prepare_images=prepare_current_prior,
    description="Current + prior chest X-ray (current first) -> current findings, changes "
    "(new/worse/improved/unchanged/resolved/uncertain; image-derived), impression, cited "
    "history and prior report.",
    output_model=ChestXrayComparison,
    checks=(check_image_numbers, check_findings_present, check_changes_present),
)
