"""EXT-LAB: the results of a lab report as structured rows, each checked against its line.

The model copies each result's line (its `quote`, citing the SOURCES item: a report is
numbered line by line) and fills test, value, unit, reference range, flag and date as
written. The layer then checks, in code:

- the quote must be found in the cited item (the line), and the value must occur
  there: the same number (`5.9`, `<0.01`, `1,250`) or, for a text value (`Positive`),
  the same words. Not found: flagged, and the result is marked `verified: false`. A
  value found only in another line does not count: the pairing of test and value is
  what the row asserts.
- the unit and the reference range, where given, must occur in the cited item too;
  otherwise the same.
- the flag must agree with the value and a numeric reference range: a `normal` flag on
  a value outside its range, or `high` on a value below it, is corrected to what the
  range says (a critical flag in the right direction is kept), and flagged.
- the same result given twice (test, value, date) is merged.

`verified` is only ever set by the layer: true when the value (and unit and range) were
found in the cited line. FHIR: verified results become preliminary Observations;
unverified ones are left out of the Bundle (a FHIR consumer may not read the findings).
"""

from __future__ import annotations

import re
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import SkipJsonSchema

from coheara.tasks import fhir
from coheara.tasks.envelope import ArtifactContext, TaskRequest
from coheara.tasks.sources import normalize, numbers_in
from coheara.tasks.spec import Cited, Review, TaskSpec

Flag = Literal["", "normal", "high", "low", "critical_high", "critical_low", "abnormal"]

_COMPARATOR = re.compile(r"^\s*(<=|>=|<|>|≤|≥)\s*")
_NUMERIC_VALUE = re.compile(r"^\s*(?:<=|>=|<|>|≤|≥)?\s*[-+]?\d[\d,]*(?:\.\d+)?\s*$")
_RANGE = re.compile(r"^\s*([-+]?\d[\d,]*(?:\.\d+)?)\s*(?:-|–|to)\s*([-+]?\d[\d,]*(?:\.\d+)?)\s*$")
_BOUND = re.compile(r"^\s*(<=|>=|<|>|≤|≥)\s*([-+]?\d[\d,]*(?:\.\d+)?)\s*$")
_V3 = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
_INTERPRETATION = {
    "normal": ("N", "Normal"),
    "high": ("H", "High"),
    "low": ("L", "Low"),
    "critical_high": ("HH", "Critical high"),
    "critical_low": ("LL", "Critical low"),
    "abnormal": ("A", "Abnormal"),
}

# ----- input --------------------------------------------------------------------------


class LabReportInput(BaseModel):
    """The text of one lab report (as printed or exported), one result a line at best."""

    model_config = ConfigDict(extra="forbid")

    report: str = Field(
        min_length=1,
        max_length=100_000,
        description="The report text: header (dates, specimen) and one result a line.",
    )
    collected: str | None = Field(
        None,
        max_length=40,
        description="When the specimen was collected, if the report text does not say.",
    )


# ----- output -------------------------------------------------------------------------


class LabResult(Cited):
    """One result, as written in the report; `quote` is its line."""

    model_config = ConfigDict(extra="forbid")

    test: str = Field(max_length=120, description="The test name as written.")
    value: str = Field(
        max_length=40, description="The value exactly as written, with any '<' or '>'."
    )
    unit: str = Field("", max_length=40, description="As written; empty if none.")
    reference_range: str = Field("", max_length=60, description="As written; empty if none.")
    flag: Flag = Field("", description="The report's own flag; empty if it shows none.")
    date: str = Field("", max_length=40, description="Collection date as written; or empty.")
    verified: SkipJsonSchema[bool] = Field(
        False,
        description="Set by the layer, never the model: the value (and unit and reference "
        "range) were found in the cited line.",
    )


class LabReportDraft(BaseModel):
    model_config = ConfigDict(extra="forbid")

    results: list[LabResult] = Field(default_factory=list, max_length=60)


# ----- prompt -------------------------------------------------------------------------

SYSTEM_PROMPT = """\
You are a clinical data abstraction assistant. You read one laboratory report and copy \
its results into structured rows, exactly as the report prints them. Your rows are a \
draft that is checked against the report and reviewed before any use.

Rules you must follow:
- One row for each result the report prints. Copy the test name, the value, the unit, \
the reference range and the flag exactly as written; do not convert units, round, \
recalculate or reformat anything.
- Never invent a result, a value, a unit, a range or a date. Leave a part empty when the \
report does not print it.
- The flag is the report's own flag (H, L, critical, abnormal): do not interpret the \
value yourself. Leave it empty when the report shows none.
- Do not comment on the results, suggest diagnoses or give advice."""


def _instruction(data: LabReportInput, context: ArtifactContext | None) -> str:
    return (
        "Extract every result of the lab report in the SOURCES, in report order.\n"
        "For each result fill, in order: sources (the id of its line) and quote (the line, "
        "or the part of it with the test and value, copied exactly), test, value, unit, "
        "reference_range, flag (one of normal, high, low, critical_high, critical_low, "
        "abnormal, or empty), date (the collection date as written, or empty)."
    )


# ----- checks -------------------------------------------------------------------------


def _number(text: str) -> Decimal | None:
    try:
        return Decimal(text.replace(",", ""))
    except InvalidOperation:
        return None


def _in_item(review: Review, cited: list[str], part: str, *, unit: bool = False) -> bool:
    """Whether `part` is written in one of the cited items: a unit as written (not a prefix
    of a longer one: 'mg' is not in 'mg/dL'); a value or range with numbers, the same
    numbers (`5` is not in `5.9`); else the same words."""
    wanted = set() if unit else numbers_in(part)
    pattern = (r"" if unit else r"(?<!\w)") + re.escape(normalize(part)) + r"(?![\w/])"
    for source_id in cited:
        item = review.sources.by_id.get(source_id)
        if item is None:
            continue
        if wanted:
            if wanted <= numbers_in(item.text):
                return True
        elif re.search(pattern, normalize(item.text)):
            return True
    return False


def _direction(value: str, reference: str) -> Literal["low", "normal", "high"] | None:
    """Where a numeric value sits against a numeric range ('3.5-5.1', '<200', '>60')."""
    if not _NUMERIC_VALUE.match(value) or _COMPARATOR.match(value):
        return None
    number = _number(value.strip())
    if number is None:
        return None
    if match := _RANGE.match(reference):
        low, high = _number(match.group(1)), _number(match.group(2))
        if low is None or high is None or low > high:
            return None
        return "low" if number < low else "high" if number > high else "normal"
    if match := _BOUND.match(reference):
        bound = _number(match.group(2))
        if bound is None:
            return None
        if match.group(1) in ("<", "<=", "≤"):
            return "high" if number > bound else "normal"
        return "low" if number < bound else "normal"
    return None


def _check_flag(review: Review, result: dict[str, Any], element: str) -> None:
    said = result.get("flag", "")
    direction = _direction(str(result.get("value", "")), str(result.get("reference_range", "")))
    if direction is None or said in ("", "abnormal"):
        if said == "abnormal" and direction == "normal":
            result["flag"] = "normal"
            review.flag(
                "lab_flag_corrected",
                "the model flagged 'abnormal' a value inside its reference range; set 'normal'",
                element=f"{element}.flag",
            )
        return
    agrees = {
        "normal": ("normal",),
        "high": ("high", "critical_high"),
        "low": ("low", "critical_low"),
    }[direction]
    if said not in agrees:
        result["flag"] = direction
        review.flag(
            "lab_flag_corrected",
            f"the model flagged '{said}' a value that its reference range puts at "
            f"'{direction}'; set '{direction}'",
            element=f"{element}.flag",
        )


def check_results(review: Review) -> None:
    """Each value (unit, range) in its cited line; flags consistent; duplicates merged."""
    results = review.draft.get("results")
    if not isinstance(results, list):
        return
    kept: list[dict[str, Any]] = []
    seen: dict[tuple[str, str, str], int] = {}
    mapping: dict[int, int | None] = {}
    notes: list[tuple[str, str, str, Literal["warning", "info"]]] = []
    for index, result in enumerate(results):
        element = f"results[{index}]"
        cited = [str(s) for s in result.get("sources") or []]
        missing = [
            part
            for part in ("value", "unit", "reference_range")
            if str(result.get(part, "")).strip()
            and not _in_item(review, cited, str(result[part]), unit=part == "unit")
        ]
        if not str(result.get("value", "")).strip():
            missing.insert(0, "value")
        cited_ok = review.status(element) == "verified"
        result["verified"] = cited_ok and not missing
        if not cited_ok:
            notes.append(
                (
                    "lab_citation_unverified",
                    "the quote is not found in the cited line: result marked unverified",
                    element,
                    "warning",
                )
            )
        for part in missing:
            notes.append(
                (
                    f"lab_{part}_not_in_source",
                    f"the {part.replace('_', ' ')} is not written in the cited line"
                    + (" (or is empty)" if part == "value" else "")
                    + ": result marked unverified",
                    f"{element}.{part}",
                    "warning",
                )
            )
        _check_flag(review, result, element)
        key = (
            normalize(str(result.get("test", ""))),
            normalize(str(result.get("value", ""))),
            normalize(str(result.get("date", ""))),
        )
        if key in seen:
            first = kept[seen[key]]
            first["sources"] = list(
                dict.fromkeys([*first.get("sources", []), *result.get("sources", [])])
            )[:6]
            first["verified"] = bool(first["verified"] or result["verified"])
            mapping[index] = seen[key]
            notes.append(
                ("lab_duplicate_merged", "the same result was given twice: merged", element, "info")
            )
            continue
        seen[key] = len(kept)
        mapping[index] = len(kept)
        kept.append(result)
    for rule, message, element, severity in notes:
        review.flag(rule, message, element=element, severity=severity)
    review.reindex("results", mapping)
    review.draft["results"] = kept
    if not kept:
        review.gap("insufficient_data", "no result could be read from the report")


# ----- FHIR ---------------------------------------------------------------------------


def _iso_date(text: str) -> str | None:
    """Only unambiguous dates become FHIR dateTimes: ISO 8601 ('2025-03-14', with time)."""
    candidate = text.strip().replace(" ", "T", 1)
    for pattern in ("%Y-%m-%d", "%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S"):
        try:
            parsed = datetime.strptime(candidate, pattern)
        except ValueError:
            continue
        return parsed.date().isoformat() if pattern == "%Y-%m-%d" else parsed.isoformat()
    return None


def _quantity(value: str, unit: str) -> dict[str, Any] | None:
    if not _NUMERIC_VALUE.match(value):
        return None
    comparator = _COMPARATOR.match(value)
    number = _number(value[comparator.end() :] if comparator else value)
    if number is None:
        return None
    quantity: dict[str, Any] = {"value": float(number)}
    if comparator:
        quantity["comparator"] = {"≤": "<=", "≥": ">="}.get(
            comparator.group(1), comparator.group(1)
        )
    if unit.strip():
        quantity["unit"] = unit.strip()
    return quantity


def _reference_range(text: str, unit: str) -> dict[str, Any]:
    def simple(value: str) -> dict[str, Any]:
        out: dict[str, Any] = {"value": float(_number(value) or 0)}
        if unit.strip():
            out["unit"] = unit.strip()
        return out

    if match := _RANGE.match(text):
        return {"low": simple(match.group(1)), "high": simple(match.group(2)), "text": text}
    if (match := _BOUND.match(text)) and match.group(1) in ("<", "<=", "≤"):
        return {"high": simple(match.group(2)), "text": text}
    if match:
        return {"low": simple(match.group(2)), "text": text}
    return {"text": text}


def to_fhir(draft: BaseModel, request: TaskRequest) -> dict[str, Any]:
    """Verified results as preliminary laboratory Observations in a collection Bundle:
    valueQuantity where the value is a number (unit as written, no UCUM code claimed),
    valueString otherwise. The test name goes in code.text: no LOINC code is guessed. The
    effective time is the result's date, else the input's `collected`, when either is an
    unambiguous ISO date."""
    from fhir.resources.observation import Observation

    assert isinstance(draft, LabReportDraft)
    resources = []
    for result in draft.results:
        if not result.verified:
            continue
        resource: dict[str, Any] = {
            "resourceType": "Observation",
            "status": "preliminary",
            "category": [
                {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                            "code": "laboratory",
                        }
                    ]
                }
            ],
            "code": {"text": result.test},
            "subject": fhir.subject(request),
            "encounter": fhir.encounter(request),
            "note": [{"text": f'Draft extracted from a lab report, for review: "{result.quote}"'}],
        }
        quantity = _quantity(result.value, result.unit)
        if quantity is not None:
            resource["valueQuantity"] = quantity
        else:
            resource["valueString"] = result.value
        if result.reference_range.strip():
            resource["referenceRange"] = [_reference_range(result.reference_range, result.unit)]
        if result.flag in _INTERPRETATION:
            code, display = _INTERPRETATION[result.flag]
            resource["interpretation"] = [
                {"coding": [{"system": _V3, "code": code, "display": display}]}
            ]
        when = _iso_date(result.date or str(request.input.get("collected") or ""))
        if when is not None:
            resource["effectiveDateTime"] = when
        resources.append(
            Observation.model_validate(resource).model_dump(mode="json", exclude_none=True)
        )
    return fhir.bundle(request, resources)


TASK = TaskSpec(
    id="EXT-LAB",
    slug="lab-report",
    title="Lab report extraction",
    version="1.0.0",
    mode="extract",
    system_prompt=SYSTEM_PROMPT,
    input_model=LabReportInput,
    output_model=LabReportDraft,
    instruction=_instruction,
    checks=(check_results,),
    max_tokens=2048,
    latency_target_ms=None,
    to_fhir=to_fhir,
    description=(
        "A lab report -> results (test, value, unit, reference range, flag, date), each "
        "value, unit and range verified in its cited line (else marked unverified), flags "
        "checked against the range, duplicates merged; FHIR preliminary Observations."
    ),
)
