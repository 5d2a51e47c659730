"""SLM-06: a prior-authorization request drafted from the documentation and the payer's
criteria.

The model maps each payer criterion to evidence quoted from the documentation and a
status (met, partial, gap), lists what to document for each gap, and writes a short
supporting summary (and an appeal draft when the input carries a prior denial). The
layer then enforces, in code:

- every payer criterion of the input appears once, in input order (a missing one is
  added as a gap; an assessment of a criterion the input does not have is removed);
- `met` or `partial` stands only on a quote verified in the documentation or the
  diagnoses: the payer's own criterion text is not evidence. Anything else becomes
  `gap`, with a finding;
- every gap and partial criterion has an evidence gap saying what to document;
- the requested service's code is the input's, never one the model made up;
- `human_approval_required` is always true: a person approves before submission.

Its FHIR form is an R5 `Claim` with `use = preauthorization` and `status = draft`.
"""

from __future__ import annotations

import html
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field, field_validator

from coheara.tasks import fhir
from coheara.tasks.envelope import ArtifactContext, TraceLink
from coheara.tasks.spec import Cited, Review, Statement, TaskSpec

if TYPE_CHECKING:
    from coheara.tasks.envelope import TaskRequest

Status = Literal["met", "partial", "gap"]
EVIDENCE_PREFIXES = ("documentation", "diagnoses")
"""Input fields that hold the patient's record: the only places evidence may come from."""

# ----- input --------------------------------------------------------------------------


class ServiceRequested(BaseModel):
    description: str = Field(max_length=500, description="e.g. 'MRI of the right knee'.")
    code: str | None = Field(
        None, max_length=16, pattern=r"^[A-Za-z0-9.\-]+$", description="CPT or HCPCS code."
    )
    code_system: Literal["CPT", "HCPCS"] | None = None
    quantity: int | None = Field(None, ge=1, le=10_000)
    urgency: Literal["routine", "urgent"] = "routine"
    claim_type: Literal["professional", "institutional", "pharmacy", "oral", "vision"] = (
        "professional"
    )


class Diagnosis(BaseModel):
    code: str | None = Field(
        None, max_length=16, pattern=r"^[A-Za-z0-9.]+$", description="ICD-10-CM code."
    )
    description: str = Field(max_length=300)


class DocumentExcerpt(BaseModel):
    kind: str = Field(max_length=80, description="e.g. 'progress note', 'imaging report'.")
    date: str | None = Field(None, max_length=32)
    text: str = Field(max_length=20_000)


class PayerCriterion(BaseModel):
    id: str = Field(max_length=32, pattern=r"^[A-Za-z0-9._\-]+$", description="e.g. 'C1'.")
    text: str = Field(max_length=1000)


class PriorAuthInput(BaseModel):
    payer: str | None = Field(None, max_length=200, description="Payer or plan name.")
    requested_service: ServiceRequested
    diagnoses: list[Diagnosis] = Field(default_factory=list, max_length=20)
    documentation: list[DocumentExcerpt] = Field(min_length=1, max_length=30)
    criteria: list[PayerCriterion] = Field(min_length=1, max_length=30)
    prior_denial: str | None = Field(
        None,
        max_length=2000,
        description="The payer's reason for an earlier denial: asks for an appeal draft.",
    )

    @field_validator("criteria")
    @classmethod
    def _unique_ids(cls, criteria: list[PayerCriterion]) -> list[PayerCriterion]:
        ids = [c.id for c in criteria]
        if len(set(ids)) != len(ids):
            raise ValueError("criterion ids must be unique")
        return criteria


# ----- output -------------------------------------------------------------------------


class ServiceLine(Cited):
    text: str = Field(max_length=300, description="The service requested.")
    code: str = Field("", max_length=16, description="Its CPT/HCPCS code as given, or ''.")


class CriterionAssessment(Cited):
    criterion_id: str = Field(max_length=32)
    status: Status
    text: str = Field(max_length=400, description="How the documentation meets it, or not.")


class EvidenceGap(BaseModel):
    criterion_id: str = Field(max_length=32)
    text: str = Field(max_length=300, description="What to document to close the gap.")


class PriorAuthDraft(BaseModel):
    requested_service: ServiceLine
    criteria: list[CriterionAssessment] = Field(max_length=30)
    evidence_gaps: list[EvidenceGap] = Field(default_factory=list, max_length=30)
    summary: list[Statement] = Field(default_factory=list, max_length=5)
    appeal: list[Statement] = Field(default_factory=list, max_length=6)
    human_approval_required: Literal[True] = True


# ----- prompt -------------------------------------------------------------------------

SYSTEM_PROMPT = """\
You are a prior-authorization assistant for a hospital's utilization review team. From \
the patient's documentation and the payer's criteria you draft a prior-authorization \
request. A person reviews, corrects and approves every draft before anything is sent to \
a payer; you never submit anything and never decide coverage.

How to work:
- Take the payer criteria one by one, by id. For each, look for documentation that meets \
it and copy the exact words as the quote. Status: met (the documentation clearly meets \
it), partial (it meets part of it), gap (the documentation does not show it).
- The payer's criterion text is not evidence. Only the documentation and diagnoses are.
- Never invent symptoms, durations, dates, test results, treatments tried or doses. If \
the documentation does not say it, the criterion is a gap: say in evidence_gaps exactly \
what the clinician would need to document.
- Never add a procedure or diagnosis code that the input does not give.
- Write in a factual, professional tone suitable for a payer reviewer. No persuasion \
beyond the evidence."""


def _instruction(data: PriorAuthInput, context: ArtifactContext | None) -> str:
    ids = ", ".join(c.id for c in data.criteria)
    lines = [
        "Draft a prior-authorization request"
        + (f" for the payer {data.payer}." if data.payer else "."),
        "Fill: requested_service (the service and its code exactly as given, cited); "
        f"criteria (one entry for each payer criterion, ids {ids}, in that order, each with "
        "status, a short explanation and a quote from the documentation); evidence_gaps "
        "(for each gap or partial criterion: what to document); summary (two to four cited "
        "sentences supporting the request).",
    ]
    if data.prior_denial:
        lines.append(
            "The payer denied an earlier request (see prior_denial): also write appeal, two "
            "to five cited sentences answering the denial reason with documented evidence."
        )
    else:
        lines.append("Leave appeal empty.")
    return "\n".join(lines)


# ----- checks -------------------------------------------------------------------------


def check_criteria_coverage(review: Review) -> None:
    """One assessment per payer criterion, in input order; unknown and repeated ones out,
    missing ones in as gaps."""
    data: PriorAuthInput = review.data
    given = review.draft.get("criteria")
    items: list[Any] = given if isinstance(given, list) else []
    first: dict[str, int] = {}
    moves: dict[int, int | None] = {}
    known = {c.id.casefold(): c.id for c in data.criteria}
    for index, item in enumerate(items):
        raw = str(item.get("criterion_id", "")) if isinstance(item, dict) else ""
        cid = known.get(raw.strip().casefold())
        if cid is None:
            moves[index] = None
            review.flag(
                "criterion_unknown",
                f"an assessment names criterion '{raw[:32]}', which the input does not "
                "have: removed",
                element="criteria",
            )
        elif cid in first:
            moves[index] = None
            review.flag(
                "criterion_repeated",
                f"criterion {cid} was assessed more than once: the first assessment is kept",
                element=f"criteria[{first[cid]}]",
            )
        else:
            first[cid] = index
            item["criterion_id"] = cid
    ordered: list[dict[str, Any]] = []
    missing: list[tuple[int, str]] = []
    for position, criterion in enumerate(data.criteria):
        if criterion.id in first:
            moves[first[criterion.id]] = position
            ordered.append(items[first[criterion.id]])
        else:
            missing.append((position, criterion.id))
            ordered.append(
                {
                    "criterion_id": criterion.id,
                    "status": "gap",
                    "text": "EVIDENCE GAP: the draft did not assess this criterion",
                    "sources": [],
                    "quote": "",
                }
            )
    # What was flagged so far names the model's positions: map it with the trace.
    review.reindex("criteria", moves)
    review.draft["criteria"] = ordered
    for position, cid in missing:
        review.flag(
            "criterion_missing",
            f"criterion {cid} was not assessed: added as a gap",
            element=f"criteria[{position}]",
        )
        review.gap(
            "evidence_gap", f"criterion {cid} was not assessed", element=f"criteria[{position}]"
        )


def _evidence_in_record(review: Review, element: str) -> bool:
    """Whether the element's quote is verified and found in the patient's record (the
    documentation or diagnoses), not only in the payer's criteria."""
    links = [link for link in review.links if link.element == element]
    if not links or links[0].status not in ("verified", "verified_elsewhere"):
        return False
    holders = set(links[0].found_in) | {
        s for s in links[0].sources if review.sources.contains(s, links[0].quote)
    }
    return any(
        review.sources.by_id[s].path.startswith(EVIDENCE_PREFIXES)
        for s in holders
        if s in review.sources.by_id
    )


def check_criterion_evidence(review: Review) -> None:
    """`met` and `partial` need a quote verified in the record; else `gap`, flagged."""
    for index, item in enumerate(review.draft.get("criteria") or []):
        said = item.get("status")
        if said not in ("met", "partial"):
            continue
        element = f"criteria[{index}]"
        if _evidence_in_record(review, element):
            continue
        why = (
            "its quote is found only outside the documentation (e.g. in the payer's criteria)"
            if review.status(element) in ("verified", "verified_elsewhere")
            else "its evidence is not verified in the input"
        )
        item["status"] = "gap"
        review.flag(
            "criterion_met_unverified" if said == "met" else "criterion_partial_unverified",
            f"the model said '{said}' for criterion {item.get('criterion_id')}; enforced "
            f"'gap' because {why}",
            element=f"{element}.status",
        )


def check_evidence_gaps(review: Review) -> None:
    """Each gap or partial criterion says what to document; gaps for unknown criteria go."""
    data: PriorAuthInput = review.data
    texts = {c.id: c.text for c in data.criteria}
    known = {cid.casefold(): cid for cid in texts}
    given = review.draft.get("evidence_gaps")
    entries: list[Any] = given if isinstance(given, list) else []
    kept: list[dict[str, Any]] = []
    moves: dict[int, int | None] = {}
    for index, entry in enumerate(entries):
        raw = str(entry.get("criterion_id", "")).strip() if isinstance(entry, dict) else ""
        if raw and raw.casefold() not in known:
            moves[index] = None
            review.flag(
                "evidence_gap_unknown_criterion",
                f"an evidence gap names criterion '{raw[:32]}', which the input does not "
                "have: removed",
                element="evidence_gaps",
            )
            continue
        entry["criterion_id"] = known.get(raw.casefold(), "")
        moves[index] = len(kept)
        kept.append(entry)
    review.reindex("evidence_gaps", moves)
    covered = {entry["criterion_id"] for entry in kept}
    for item in review.draft.get("criteria") or []:
        cid = item.get("criterion_id")
        if item.get("status") in ("gap", "partial") and cid in texts and cid not in covered:
            kept.append({"criterion_id": cid, "text": f"Document evidence for: {texts[cid]}"[:300]})
            covered.add(cid)
    already = {gap.element for gap in review.gaps}
    for index, entry in enumerate(kept):
        element = f"evidence_gaps[{index}]"
        if element not in already:
            label = entry["criterion_id"] or "general"
            review.gap("evidence_gap", f"{label}: {entry.get('text', '')}", element=element)
    review.draft["evidence_gaps"] = kept


def check_service(review: Review) -> None:
    """The requested service's code is the input's: the model may not add or change one."""
    data: PriorAuthInput = review.data
    service = review.draft.get("requested_service")
    if not isinstance(service, dict):
        return
    if not str(service.get("text") or "").strip():
        _fill_service_text(review, service)
    said = str(service.get("code") or "").strip()
    given = data.requested_service.code or ""
    if said.upper() == given.upper():
        service["code"] = given
        return
    service["code"] = given
    review.flag(
        "service_code_corrected" if given else "service_code_not_in_input",
        f"the model gave code '{said[:16]}'; enforced "
        + (f"the input's code '{given}'" if given else "no code (the input gives none)"),
        element="requested_service.code",
    )


def _fill_service_text(review: Review, service: dict[str, Any]) -> None:
    """A blank service line takes the input's own description, cited to it."""
    data: PriorAuthInput = review.data
    description = data.requested_service.description[:300]
    cited = [
        item.id for item in review.sources.items if item.path == "requested_service.description"
    ][:1]
    service.update(text=description, sources=cited, quote=description)
    # The old citation's trace, findings and gaps described words that are now replaced.
    review.links[:] = [link for link in review.links if link.element != "requested_service"]
    review.findings[:] = [f for f in review.findings if f.element != "requested_service"]
    review.gaps[:] = [g for g in review.gaps if g.element != "requested_service"]
    review.links.append(
        TraceLink(
            element="requested_service",
            sources=cited,
            quote=description,
            status="verified",
            found_in=cited,
        )
    )
    review.flag(
        "service_text_filled",
        "the draft left the requested service blank: the input's description was used",
        element="requested_service.text",
        severity="info",
    )


def check_appeal(review: Review) -> None:
    """An appeal only answers a prior denial; one asked for and not written is a gap."""
    data: PriorAuthInput = review.data
    appeal = review.draft.get("appeal") or []
    if data.prior_denial is None and appeal:
        review.reindex("appeal", dict.fromkeys(range(len(appeal))))
        review.draft["appeal"] = []
        review.flag(
            "appeal_not_requested",
            "the model wrote an appeal, but the input has no prior denial: removed",
            element="appeal",
            severity="info",
        )
    elif data.prior_denial is not None and not appeal:
        review.gap(
            "missing_section",
            "the input has a prior denial but no appeal was drafted",
            element="appeal",
        )


def check_human_approval(review: Review) -> None:
    """Always true, whatever the model wrote: a person approves before submission."""
    if review.draft.get("human_approval_required") is not True:
        review.flag(
            "human_approval_enforced",
            "the draft did not require human approval; enforced true",
            element="human_approval_required",
        )
    review.draft["human_approval_required"] = True


# ----- FHIR ---------------------------------------------------------------------------

_CPT = "http://www.ama-assn.org/go/cpt"
_HCPCS = "urn:oid:2.16.840.1.113883.6.285"
_ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
_PRIORITY = "http://terminology.hl7.org/CodeSystem/processpriority"
_CLAIM_TYPE = "http://terminology.hl7.org/CodeSystem/claim-type"
_INFO_CATEGORY = "http://terminology.hl7.org/CodeSystem/claiminformationcategory"


def to_fhir(draft: BaseModel, request: TaskRequest) -> dict[str, Any]:
    """An R5 Claim (use preauthorization, status draft). The patient is referenced only by
    the request's opaque patient scope id; provider and insurer are placeholders to be
    completed by the person who approves the request."""
    from fhir.resources.claim import Claim

    assert isinstance(draft, PriorAuthDraft)
    data = PriorAuthInput.model_validate(request.input)
    service = data.requested_service
    patient = fhir.patient(request) or {
        "display": "patient: not identified in the request; complete before submission"
    }
    product: dict[str, Any] = {"text": draft.requested_service.text or service.description}
    if draft.requested_service.code:
        system = _HCPCS if service.code_system == "HCPCS" else _CPT
        product["coding"] = [{"system": system, "code": draft.requested_service.code}]
    item: dict[str, Any] = {"sequence": 1, "productOrService": product}
    if service.quantity is not None:
        item["quantity"] = {"value": service.quantity}
    diagnoses = [
        {
            "sequence": index,
            "diagnosisCodeableConcept": _concept(dx.description, _ICD10CM, dx.code),
        }
        for index, dx in enumerate(data.diagnoses, start=1)
    ]
    info: list[dict[str, Any]] = []
    for criterion in draft.criteria:
        value = f"{criterion.status}: {criterion.text}"
        if criterion.quote:
            value += f' Evidence: "{criterion.quote}"'
        info.append(_info(len(info) + 1, f"payer criterion {criterion.criterion_id}", value))
    if draft.summary:
        info.append(
            _info(len(info) + 1, "supporting summary", " ".join(s.text for s in draft.summary))
        )
    if draft.appeal:
        info.append(_info(len(info) + 1, "appeal draft", " ".join(s.text for s in draft.appeal)))
    if diagnoses:
        item["diagnosisSequence"] = [d["sequence"] for d in diagnoses]
    if info:
        item["informationSequence"] = [i["sequence"] for i in info]
    open_gaps = len(draft.evidence_gaps)
    notice = (
        "DRAFT prior-authorization request written by Coheara from the documentation. "
        "A person must review and approve it before submission."
        + (f" {open_gaps} evidence gap(s) to resolve first." if open_gaps else "")
    )
    claim = Claim.model_validate(
        {
            "resourceType": "Claim",
            "identifier": [fhir.request_identifier(request)],
            "status": "draft",
            "use": "preauthorization",
            "type": {"coding": [{"system": _CLAIM_TYPE, "code": service.claim_type}]},
            "patient": patient,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "insurer": {"display": data.payer or "payer: complete before submission"},
            "provider": {"display": "requesting provider: complete before submission"},
            "priority": {
                "coding": [
                    {
                        "system": _PRIORITY,
                        "code": "stat" if service.urgency == "urgent" else "normal",
                    }
                ]
            },
            "text": {
                "status": "generated",
                "div": f'<div xmlns="http://www.w3.org/1999/xhtml"><p>{html.escape(notice)}</p></div>',
            },
            "diagnosis": diagnoses or None,
            "supportingInfo": info or None,
            "item": [item],
        }
    )
    return claim.model_dump(mode="json", exclude_none=True)


def _concept(text: str, system: str, code: str | None) -> dict[str, Any]:
    concept: dict[str, Any] = {"text": text}
    if code:
        concept["coding"] = [{"system": system, "code": code}]
    return concept


def _info(sequence: int, label: str, value: str) -> dict[str, Any]:
    return {
        "sequence": sequence,
        "category": {"coding": [{"system": _INFO_CATEGORY, "code": "info"}]},
        "code": {"text": label},
        "valueString": value,
    }


TASK = TaskSpec(
    id="SLM-06",
    slug="prior-auth",
    title="Prior authorization",
    version="1.0.0",
    mode="text",
    system_prompt=SYSTEM_PROMPT,
    input_model=PriorAuthInput,
    output_model=PriorAuthDraft,
    instruction=_instruction,
    checks=(
        check_criteria_coverage,
        check_criterion_evidence,
        check_evidence_gaps,
        check_service,
        check_appeal,
        check_human_approval,
    ),
    max_tokens=2048,
    latency_target_ms=None,
    sources_skip=("payer",),
    number_exempt=("sources", "quote", "code", "rank", "confidence", "criterion_id"),
    to_fhir=to_fhir,
    description=(
        "Documentation + payer criteria -> prior-authorization request draft: each criterion "
        "mapped to quoted evidence and a status (met, partial, gap), evidence gaps with what "
        "to document, a supporting summary, an optional appeal. 'met' without evidence "
        "verified in the documentation becomes 'gap'; a person must approve before "
        "submission."
    ),
)
