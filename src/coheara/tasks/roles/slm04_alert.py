"""SLM-04: a clinical decision support alert put in the context of one patient.

The model reads the alert and the patient's context and drafts a contextualized
severity, a recommendation (present, log, escalate), the clinical context that
matters and a rationale, each cited. What the model may not decide is enforced
here, in code, whatever it wrote:

- an alert the input marks critical, or that the input marks as a hard constraint,
  is never downgraded below the input's severity (a hard constraint with no stated
  severity: never below urgent) and never only logged;
- any downgrade must rest on a verified rationale, else the input's severity stays;
- an urgent or critical draft, or one that itself finds a hard constraint, is never
  only logged;
- when the layer is unsure (unverified rationale or context, an invented number, a
  gap marker, no patient context), the recommendation is `present`, not `log`.

Escalation is never forced: a critical alert is at least presented, to the clinician
it was raised for; `escalate` stays the model's (upward-only) choice, so that it keeps
meaning something. Every correction is a finding naming what the model said and what
was enforced.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from coheara.tasks.envelope import ArtifactContext
from coheara.tasks.spec import POINT_OF_CARE_MS, Cited, Review, TaskSpec

Severity = Literal["informational", "advisory", "urgent", "critical"]
Recommendation = Literal["present", "log", "escalate"]

SEVERITY_ORDER: tuple[Severity, ...] = ("informational", "advisory", "urgent", "critical")
RECOMMENDATION_ORDER: tuple[Recommendation, ...] = ("log", "present", "escalate")

# ----- input --------------------------------------------------------------------------


class CdsAlert(BaseModel):
    """The alert as the CDS system raised it: its own severity and rule flags."""

    id: str = Field(max_length=128, description="The CDS system's alert id.")
    type: str = Field(
        max_length=120,
        description="e.g. 'drug-drug interaction', 'drug-allergy', 'dose range', "
        "'critical lab value', 'duplicate therapy'.",
    )
    severity: Severity | None = Field(
        None, description="The alert's own severity, as the CDS system rated it."
    )
    message: str = Field(max_length=2000, description="The alert text as shown to users.")
    rule: str | None = Field(None, max_length=300, description="The rule that fired.")
    hard_constraint: bool = Field(
        False,
        description="The site marks this rule as a hard constraint: it may never be "
        "downgraded or only logged.",
    )
    hard_constraint_reason: str | None = Field(None, max_length=500)
    triggered_by: str | None = Field(
        None, max_length=300, description="The order or result that fired the alert."
    )


class PatientContext(BaseModel):
    """What is known about the patient at the time of the alert (all optional)."""

    demographics: str | None = Field(None, max_length=300, description="e.g. '78-year-old'.")
    problems: list[str] = Field(default_factory=list, max_length=40)
    medications: list[str] = Field(default_factory=list, max_length=60)
    allergies: list[str] = Field(default_factory=list, max_length=30)
    recent_labs: list[str] = Field(
        default_factory=list, max_length=40, description="One result a line, with its date."
    )
    vitals: list[str] = Field(default_factory=list, max_length=20)
    notes: str | None = Field(None, max_length=4000, description="Relevant recent notes.")
    setting: str | None = Field(
        None, max_length=200, description="Where care happens, e.g. 'inpatient ward'."
    )

    def is_empty(self) -> bool:
        return not any(
            (
                self.demographics,
                self.problems,
                self.medications,
                self.allergies,
                self.recent_labs,
                self.vitals,
                self.notes,
            )
        )


class AlertInput(BaseModel):
    alert: CdsAlert
    patient: PatientContext = Field(default_factory=lambda: PatientContext.model_validate({}))


# ----- output -------------------------------------------------------------------------


class ContextPoint(Cited):
    """One fact from the patient's context that bears on the alert."""

    text: str = Field(max_length=300)


class Rationale(Cited):
    text: str = Field(max_length=500, description="Why this severity and recommendation.")


class HardConstraintCheck(Cited):
    applies: bool = Field(
        description="True when the alert is marked a hard constraint, or the context shows "
        "an absolute contraindication."
    )
    text: str = Field(max_length=300, description="Which constraint, or why none applies.")


class AlertDraft(BaseModel):
    clinical_context: list[ContextPoint] = Field(default_factory=list, max_length=4)
    rationale: Rationale
    hard_constraint: HardConstraintCheck
    severity: Severity
    recommendation: Recommendation


# ----- prompt -------------------------------------------------------------------------

SYSTEM_PROMPT = """\
You are a clinical decision support assistant inside a hospital's electronic health \
record. A CDS rule has fired an alert for one patient. Your job is to put that alert in \
the context of this patient, so that the clinician sees alerts that matter and fewer that \
do not. You write a draft that a clinician or pharmacist reviews; you make no decision \
yourself.

Severity levels: informational (no action needed), advisory (worth knowing), urgent (act \
during this encounter), critical (act now: risk of serious harm).
Recommendations: present (show the alert to the clinician), log (record it without \
interrupting anyone), escalate (notify beyond the ordering clinician, e.g. the attending \
or the pharmacist on call).

Rules you must follow:
- Base everything on the alert and the patient context given. Never invent a value, dose, \
lab result, date, diagnosis or allergy.
- Never lower the severity of an alert marked critical, and never lower or only log an \
alert marked as a hard constraint.
- Recommend log only when the context clearly shows the alert does not apply to this \
patient, and cite that context. When in doubt, recommend present.
- Do not order tests, change doses or prescribe; describe the context and the reason.
- Keep each sentence short and factual."""


def _instruction(data: AlertInput, context: ArtifactContext | None) -> str:
    alert = data.alert
    stated = alert.severity or "not stated"
    lines = [
        "Put the CDS alert below in the context of this patient.",
        f"The alert's own severity: {stated}. Hard constraint: "
        f"{'yes' if alert.hard_constraint else 'no'}.",
        "Fill, in order: clinical_context (up to 4 facts from the patient context that "
        "bear on this alert, each cited), rationale (one or two sentences: why this "
        "severity and recommendation, cited), hard_constraint (whether a hard constraint "
        "applies and which, cited), severity, recommendation.",
    ]
    if alert.severity == "critical" or alert.hard_constraint:
        lines.append(
            "This alert is marked critical or as a hard constraint: its severity may not be "
            "lowered and it may not be only logged."
        )
    return "\n".join(lines)


# ----- checks -------------------------------------------------------------------------


def _rank(value: object, order: tuple[str, ...]) -> int:
    return order.index(value) if value in order else -1


def _floor(data: AlertInput) -> tuple[Severity | None, str]:
    """The lowest severity the draft may have, and why (None: the model may lower it
    on verified evidence)."""
    alert = data.alert
    if alert.severity == "critical":
        return "critical", "the input marks the alert critical"
    if alert.hard_constraint:
        if alert.severity is not None:
            return alert.severity, "the input marks the alert a hard constraint"
        return "urgent", "the input marks the alert a hard constraint (no severity stated)"
    return None, ""


def _protected(data: AlertInput) -> bool:
    return data.alert.severity == "critical" or data.alert.hard_constraint


def check_hard_constraint(review: Review) -> None:
    """The input's hard-constraint flag wins over the model's reading of it."""
    data: AlertInput = review.data
    check = review.draft.get("hard_constraint")
    if not isinstance(check, dict) or not data.alert.hard_constraint:
        return
    if check.get("applies") is not True:
        check["applies"] = True
        review.flag(
            "hard_constraint_restored",
            "the model said no hard constraint applies; enforced applies=true because the "
            "input marks the alert a hard constraint",
            element="hard_constraint.applies",
        )


def check_severity(review: Review) -> None:
    """Never below the protected floor; any downgrade must rest on a verified rationale."""
    data: AlertInput = review.data
    said = review.draft.get("severity")
    floor, why = _floor(data)
    if floor is not None and _rank(said, SEVERITY_ORDER) < _rank(floor, SEVERITY_ORDER):
        review.draft["severity"] = floor
        review.flag(
            "alert_downgrade_blocked",
            f"the model said severity '{said}'; enforced '{floor}' because {why}",
            element="severity",
        )
        return
    stated = data.alert.severity
    if stated is not None and _rank(said, SEVERITY_ORDER) < _rank(stated, SEVERITY_ORDER):
        if not review.verified("rationale"):
            review.draft["severity"] = stated
            review.flag(
                "alert_downgrade_unsupported",
                f"the model said severity '{said}'; kept the alert's own '{stated}' because "
                "the rationale for lowering it is not verified in the input",
                element="severity",
            )
        else:
            review.flag(
                "alert_severity_contextualized",
                f"the alert's own severity '{stated}' was lowered to '{said}' on the cited "
                "rationale: confirm it",
                element="severity",
                severity="info",
            )


def _unsure(review: Review) -> list[str]:
    """Why the layer cannot trust a decision to only log this alert (empty: it can)."""
    data: AlertInput = review.data
    reasons = []
    if data.patient.is_empty():
        reasons.append("the input has no patient context")
    if not review.verified("rationale"):
        reasons.append("the rationale is not verified in the input")
    context_links = [link for link in review.links if link.element.startswith("clinical_context")]
    if not any(link.status in ("verified", "verified_elsewhere") for link in context_links):
        reasons.append("no clinical context point is verified")
    if any(f.severity == "error" for f in review.findings):
        reasons.append("the draft has an error finding (e.g. a number not in the input)")
    if review.gaps and any(
        g.kind in ("insufficient_data", "documentation_gap", "evidence_gap") for g in review.gaps
    ):
        reasons.append("the draft reports missing information")
    return reasons


def check_recommendation(review: Review) -> None:
    """Never only log a protected, urgent or critical alert; when unsure, present it.
    Runs after the severity check, so it sees the enforced severity."""
    data: AlertInput = review.data
    said = review.draft.get("recommendation")
    if said not in RECOMMENDATION_ORDER:
        review.draft["recommendation"] = "present"
        review.flag(
            "alert_recommendation_missing",
            f"the model gave no valid recommendation ('{str(said)[:20]}'); enforced 'present'",
            element="recommendation",
        )
        return
    if said != "log":
        return
    severity = review.draft.get("severity")
    if _protected(data):
        why = "the input marks the alert critical or a hard constraint"
    elif severity in ("urgent", "critical"):
        why = f"the draft's severity is '{severity}'"
    elif (review.draft.get("hard_constraint") or {}).get("applies") is True:
        why = "the draft itself finds that a hard constraint applies"
    else:
        reasons = _unsure(review)
        if not reasons:
            return
        why = "; ".join(reasons)
    review.draft["recommendation"] = "present"
    review.flag(
        "alert_log_blocked",
        f"the model said recommendation 'log'; enforced 'present' because {why}",
        element="recommendation",
    )


TASK = TaskSpec(
    id="SLM-04",
    slug="alert",
    title="Alert in context",
    version="1.0.0",
    mode="text",
    system_prompt=SYSTEM_PROMPT,
    input_model=AlertInput,
    output_model=AlertDraft,
    instruction=_instruction,
    checks=(check_hard_constraint, check_severity, check_recommendation),
    max_tokens=768,
    latency_target_ms=POINT_OF_CARE_MS,
    description=(
        "A CDS alert plus patient context -> contextualized severity, recommendation "
        "(present, log, escalate), clinical context, rationale and hard-constraint check. "
        "A critical or hard-constraint alert is never downgraded or only logged; when "
        "unsure, the alert is presented."
    ),
)
