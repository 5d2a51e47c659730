"""SLM-02: ranked code suggestions (ICD-10-CM; CPT and HCPCS where asked) from a note.

The model reads the note and proposes codes, each with the words of the note that
document it, a one-sentence rationale and a confidence. What it may not decide is
enforced here, in code:

- ICD-10-CM codes are looked up in the official table (`coheara.tasks.icd10`): a code
  that does not exist is removed; a category or subcategory that is not billable is
  removed and becomes a documentation gap naming the specificity the note lacks (how
  many billable codes sit under it, with examples). The description always comes from
  the table; the model never writes one.
- CPT and HCPCS Level II codes are checked for format only (CPT content is licensed):
  CPT is five digits, or four digits and F, T or U; HCPCS is a letter A-V and four
  digits. Their description stays empty.
- No code without evidence: a code whose quote is not found in the note (or that
  cites nothing) is removed, not passed on with a warning. Evidence found in another
  item than the one cited keeps the code at medium confidence at most.
- A code of a system the caller did not ask for is removed.
- Duplicates (same system and code) are merged into the first, their sources joined.
- Ranked: the list order is the rank. The model lists the code chiefly responsible
  for the encounter first; the layer then orders by confidence (high, medium, low),
  keeping the model's order within each level, and keeps at most `max_codes`.

Every removal is a finding naming the model's item, the code and why.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import SkipJsonSchema

from coheara.tasks import fhir, icd10
from coheara.tasks.envelope import ArtifactContext, TaskRequest
from coheara.tasks.sources import normalize
from coheara.tasks.spec import POINT_OF_CARE_MS, Cited, Review, TaskSpec

CodeSystem = Literal["ICD-10-CM", "CPT", "HCPCS"]
Confidence = Literal["high", "medium", "low"]
CONFIDENCE_ORDER: tuple[Confidence, ...] = ("high", "medium", "low")

CPT_FORMAT = re.compile(r"^(?:[0-9]{5}|[0-9]{4}[FTU])$")
HCPCS_FORMAT = re.compile(r"^[A-V][0-9]{4}$")
MIN_QUOTE_CHARS = 4
"""A shorter quote ('of', 'BP') verifies against almost any note: it is no evidence."""

ICD10CM_SYSTEM = "http://hl7.org/fhir/sid/icd-10-cm"

# ----- input --------------------------------------------------------------------------


def _icd_only() -> list[CodeSystem]:
    return ["ICD-10-CM"]


class CodesInput(BaseModel):
    """A note to code, and which code systems the caller wants."""

    model_config = ConfigDict(extra="forbid")

    note: str = Field(
        min_length=1,
        max_length=60_000,
        description="The clinical note as documented (any sections, free text).",
    )
    setting: Literal["outpatient", "inpatient", "emergency"] | None = Field(
        None,
        description="Where the encounter took place: the rules for uncertain diagnoses "
        "differ (outpatient and emergency: code the symptoms; inpatient: a diagnosis "
        "documented as probable at discharge may be coded).",
    )
    code_systems: list[CodeSystem] = Field(
        default_factory=_icd_only,
        min_length=1,
        max_length=3,
        description="Which systems to suggest codes from; CPT and HCPCS only where asked.",
    )
    max_codes: int = Field(8, ge=1, le=20, description="At most this many suggestions.")


# ----- output -------------------------------------------------------------------------


class CodeSuggestion(Cited):
    """One suggested code and the words of the note that document it."""

    model_config = ConfigDict(extra="forbid")

    system: CodeSystem
    code: str = Field(
        max_length=8,
        pattern=r"^[A-Za-z0-9.]{3,8}$",
        description="The most specific code the documentation supports, e.g. 'I50.23'.",
    )
    rationale: str = Field(
        max_length=300, description="One sentence: why this code fits the documentation."
    )
    confidence: Confidence
    description: SkipJsonSchema[str] = Field(
        "",
        max_length=250,
        description="The official ICD-10-CM description, from the table (never the model's); "
        "empty for CPT and HCPCS.",
    )


class CodesDraft(BaseModel):
    """The suggestions, best first: the list order is the rank."""

    model_config = ConfigDict(extra="forbid")

    codes: list[CodeSuggestion] = Field(default_factory=list, max_length=12)


# ----- prompt -------------------------------------------------------------------------

SYSTEM_PROMPT = """\
You are a clinical coding assistant in a hospital. You read one clinical note and \
suggest the diagnosis codes (and procedure codes where asked) that the documentation \
supports. Your suggestions are a draft for a certified coder or the treating clinician, \
who decides what is billed.

Rules you must follow:
- Code only what the note documents. Every code rests on words of the note, which you \
copy exactly as its evidence. Never suggest a code the note does not support, and never \
add a diagnosis, laterality, stage, type or encounter the note does not state.
- Choose the most specific code the documentation supports. If the note lacks the \
detail a specific code needs, suggest the best supported code and say in the rationale \
which detail is missing; do not guess it.
- Do not code conditions written as ruled out. Code "possible", "probable", "suspected" \
or "rule out" diagnoses only where the setting's guidelines allow it; otherwise code the \
documented signs and symptoms.
- Do not code a past condition as current. Do not upcode.
- Give each code once. Put the condition chiefly responsible for the encounter first, \
then the others by importance.
- Never invent codes. If you are unsure a code exists, leave it out.
- Write short, factual rationales. Do not write code descriptions: the official ones are \
added from the code table."""

_SETTING_RULE = {
    "outpatient": "Outpatient encounter: do not code uncertain diagnoses (possible, "
    "probable, suspected, rule out); code the documented signs and symptoms instead.",
    "emergency": "Emergency encounter: do not code uncertain diagnoses (possible, "
    "probable, suspected, rule out); code the documented signs and symptoms instead.",
    "inpatient": "Inpatient stay: a diagnosis documented at discharge as probable, "
    "suspected or likely may be coded as if established.",
}


def _instruction(data: CodesInput, context: ArtifactContext | None) -> str:
    systems = ", ".join(data.code_systems)
    lines = [
        f"Suggest {systems} codes for the clinical note in the SOURCES, most important "
        f"first, at most {data.max_codes}.",
        "For each code fill, in order: sources and quote (the exact words of the note that "
        "document it), system, code, rationale (one sentence), confidence (high: stated "
        "explicitly; medium: stated, but part of the specificity is inferred; low: weakly "
        "supported).",
    ]
    if "CPT" in data.code_systems or "HCPCS" in data.code_systems:
        lines.append(
            "Procedure codes: only for services the note documents as performed in this encounter."
        )
    if data.setting is not None:
        lines.append(_SETTING_RULE[data.setting])
    return "\n".join(lines)


# ----- shared helpers (also used by EXT-LAB and EXT-EHR) ------------------------------


# ----- checks -------------------------------------------------------------------------


def _code_problem(system: str, code: str, requested: list[str]) -> tuple[str, str] | None:
    """(rule, why) when a code cannot stand at all, else None."""
    if system not in requested:
        return "code_system_not_requested", f"{system} codes were not asked for"
    if system == "ICD-10-CM":
        if icd10.lookup(code) is None:
            return "code_not_found", "it is not a code of the official ICD-10-CM table"
    elif system == "CPT" and not CPT_FORMAT.match(code):
        return "code_format_invalid", "a CPT code is five digits, or four digits and F, T or U"
    elif system == "HCPCS" and not HCPCS_FORMAT.match(code):
        return "code_format_invalid", "a HCPCS Level II code is a letter A-V and four digits"
    return None


def _specificity_gap(code: str) -> str:
    entry = icd10.lookup(code)
    children = icd10.billable_children(code)
    examples = "; ".join(f"{c.code} {c.description[:60]}" for c in children[:3])
    name = entry.description if entry else code
    return (
        f"{code} ({name[:80]}) is not billable: the note must document the detail that "
        f"selects one of its {len(children)} billable codes (e.g. {examples})"
    )


def check_codes(review: Review) -> None:
    """Existence, billability, format, evidence, duplicates and rank, enforced in code."""
    data: CodesInput = review.data
    items = review.draft.get("codes")
    if not isinstance(items, list):
        return
    kept: list[tuple[int, dict[str, Any]]] = []
    by_key: dict[tuple[str, str], int] = {}  # (system, code) -> position in `kept`
    mapping: dict[int, int | None] = {}
    removed: list[tuple[str, str]] = []  # (rule, message), flagged after the reindex
    gaps: list[str] = []
    notes: list[tuple[str, str, str]] = []  # (rule, message, model's element)
    for index, item in enumerate(items):
        element = f"codes[{index}]"
        system = str(item.get("system", ""))
        raw = str(item.get("code", ""))
        code = icd10.normalize(raw) if system == "ICD-10-CM" else raw.strip().upper()
        label = f"model's item {index + 1} ({system} {raw})"
        problem = _code_problem(system, code, list(data.code_systems))
        status = review.status(element)
        if problem is None and status not in ("verified", "verified_elsewhere"):
            problem = "code_without_evidence", "its supporting quote is not found in the note"
        if problem is None and len(normalize(str(item.get("quote", "")))) < MIN_QUOTE_CHARS:
            problem = "code_without_evidence", "its supporting quote is too short to be evidence"
        entry = icd10.lookup(code) if system == "ICD-10-CM" and problem is None else None
        if entry is not None and not entry.billable:
            problem = "code_not_billable", "it has more specific codes under it: not billable"
            gaps.append(_specificity_gap(entry.code))
        if problem is not None:
            mapping[index] = None
            removed.append((problem[0], f"{label} removed: {problem[1]}"))
            continue
        item["code"] = entry.code if entry is not None else code
        item["description"] = entry.description if entry is not None else ""
        if status == "verified_elsewhere" and item.get("confidence") == "high":
            item["confidence"] = "medium"
            notes.append(
                (
                    "code_confidence_capped",
                    "its evidence is in another item than the one cited: confidence "
                    "lowered from high to medium",
                    element,
                )
            )
        key = (system, item["code"])
        if key in by_key:
            position = by_key[key]
            first = kept[position][1]
            first["sources"] = list(
                dict.fromkeys([*first.get("sources", []), *item.get("sources", [])])
            )[:6]
            first["confidence"] = min(
                (first["confidence"], item["confidence"]), key=CONFIDENCE_ORDER.index
            )
            mapping[index] = kept[position][0]
            notes.append(
                (
                    "code_duplicate_merged",
                    f"{system} {item['code']} was suggested more than once: merged into "
                    f"model's item {kept[position][0] + 1}",
                    element,
                )
            )
            continue
        by_key[key] = len(kept)
        kept.append((index, item))
        mapping[index] = index
    # Rank: by confidence, the model's order within each level; then the cap.
    ranked = sorted(kept, key=lambda pair: CONFIDENCE_ORDER.index(pair[1]["confidence"]))
    new_place = {old: new for new, (old, _) in enumerate(ranked)}
    dropped = ranked[data.max_codes :]
    ranked = ranked[: data.max_codes]
    final_mapping: dict[int, int | None] = {}
    for index, target in mapping.items():
        place = None if target is None else new_place[target]
        final_mapping[index] = place if place is not None and place < data.max_codes else None
    for rule, message, element in notes:
        review.flag(rule, message, element=element, severity="info")
    review.reindex("codes", final_mapping)
    review.draft["codes"] = [item for _, item in ranked]
    for rule, message in removed:
        review.flag(rule, message)
    for old, item in dropped:
        review.flag(
            "codes_over_limit",
            f"model's item {old + 1} ({item['system']} {item['code']}) removed: more than "
            f"max_codes={data.max_codes} suggestions",
            severity="info",
        )
    for detail in gaps:
        review.gap("documentation_gap", detail)
    if not ranked:
        review.gap(
            "insufficient_data", "no code could be suggested with evidence verified in the note"
        )


# ----- FHIR ---------------------------------------------------------------------------


def to_fhir(draft: BaseModel, request: TaskRequest) -> dict[str, Any]:
    """ICD-10-CM suggestions as provisional Conditions in a collection Bundle, in rank
    order. CPT and HCPCS codes name procedures, not conditions: they are not included."""
    from fhir.resources.condition import Condition

    assert isinstance(draft, CodesDraft)
    resources = []
    for rank, item in enumerate(draft.codes, start=1):
        if item.system != "ICD-10-CM":
            continue
        resource: dict[str, Any] = {
            "resourceType": "Condition",
            "clinicalStatus": {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                        "code": "unknown",
                    }
                ]
            },
            "verificationStatus": {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/condition-ver-status",
                        "code": "provisional",
                    }
                ]
            },
            "category": [
                {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/condition-category",
                            "code": "encounter-diagnosis",
                        }
                    ]
                }
            ],
            "code": {
                "coding": [
                    {"system": ICD10CM_SYSTEM, "code": item.code, "display": item.description}
                ],
                "text": item.description or item.code,
            },
            "subject": fhir.subject(request),
            "encounter": fhir.encounter(request),
            "note": [
                {
                    "text": f"Draft code suggestion {rank} ({item.confidence} confidence), "
                    f'for review. Evidence: "{item.quote}". Rationale: {item.rationale}'
                }
            ],
        }
        resources.append(
            Condition.model_validate(resource).model_dump(mode="json", exclude_none=True)
        )
    return fhir.bundle(request, resources)


TASK = TaskSpec(
    id="SLM-02",
    slug="codes",
    title="Code suggestion",
    version="1.0.0",
    mode="text",
    system_prompt=SYSTEM_PROMPT,
    input_model=CodesInput,
    output_model=CodesDraft,
    instruction=_instruction,
    checks=(check_codes,),
    max_tokens=1024,
    latency_target_ms=POINT_OF_CARE_MS,
    sources_skip=("setting", "code_systems", "max_codes"),
    number_exempt=("sources", "quote", "system", "code", "confidence"),
    to_fhir=to_fhir,
    description=(
        "A clinical note -> ranked ICD-10-CM (and CPT/HCPCS where asked) suggestions, each "
        "with rationale, confidence and the supporting words of the note. ICD-10-CM codes "
        "checked against the official table (existence, billable leaf; a non-billable "
        "category becomes a documentation gap); descriptions from the table; CPT/HCPCS "
        "format-checked; no code without verified evidence; duplicates merged."
    ),
)
