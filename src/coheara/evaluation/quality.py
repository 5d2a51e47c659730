"""Task quality: how close one case's draft comes to its gold `expected`.

`score(case, response)` returns, for the runner's record:

    {"values": {metric: float | None}, "counts": {"fields" | "codes": [tp, fp, fn]},
     "fields": {field name: {"exact": 0|1, "normalized": 0|1, "tp": n, "fp": n, "fn": n}}}

`values` holds one case's metrics, each only where its gold key is present; `counts` and
`fields` are kept raw so that `coheara.evaluation.aggregate` can sum them across cases
(micro F1 from summed counts, macro F1 per field name), which means of per-case F1s cannot
do. A case that failed (`response is None`) is a total miss wherever gold expects
something: every gold item a false negative, F1 and rates 0. SLM-05's reading grade is
scored on every SLM-05 case but those gold says must be refused (no draft is expected).

Matching rules (why they are what they are):

- Field values are compared twice: `exact` (the strings as written, outer spaces trimmed)
  and `normalized` (case, spaces and punctuation folded, numbers read as numbers so that
  '7.20 mmol/L' equals '7.2 mmol/l', a '<' or '>' kept, 'µ' read as 'u', yes/true and
  no/false alike). Counts use the normalized match: a lab value written with a trailing
  zero is not an extraction error.
- A gold field whose value is None says the input does not state it: no prediction is
  right (exact and normalized 1, no count), a prediction is a false positive.
- Codes compare upper case with dots optional ('E1165' == 'E11.65'); validity and
  billability come from the official table (`coheara.tasks.icd10`).
- A section counts as filled only with a statement that is not a gap marker: the layer
  fills every omitted section with `INSUFFICIENT DATA`, which must not count as drafted,
  unless gold lists the section under `missing` (then the gap marker is the right answer).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator, Mapping
from decimal import Decimal, InvalidOperation
from functools import cache
from typing import Any

from coheara.errors import ConfigurationError
from coheara.evaluation.gold import GoldCase
from coheara.tasks import icd10
from coheara.tasks.readability import flesch_kincaid
from coheara.tasks.spec import is_gap_marker

DEFAULT_GRADE = 6.0
"""SLM-05's own default target grade (`PlainLanguageInput.target_grade`)."""

NOT_WORDS = frozenset(
    {
        "quote",
        "sources",
        "found_in",
        "id",
        "name",
        "code",
        "codes",
        "system",
        "description",
        "confidence",
        "basis",
        "status",
        "severity",
        "recommendation",
        "image_quality",
        "flag",
        "method",
        "record",
        "record_valid",
        "verified",
        "readability",
    }
)
"""Draft keys whose strings are not the draft's own words: citations, ids, names (section
and field labels), codes, enum labels, and what the layer copied in (official code
descriptions, the EXT-EHR record)."""

_TOKEN = re.compile(
    r"[<>\u2264\u2265]=?"  # a comparator, kept: '<0.01' is not '0.01'
    r"|(?<![\w.])-(?=\d)"  # a minus sign before a number
    r"|\d+(?:[.,]\d+)*|\.\d+"  # a number
    r"|[^\W\d_]+"  # a run of letters
)
_THOUSANDS = re.compile(r"^\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_TRUE = frozenset({"yes", "true", "y"})
_FALSE = frozenset({"no", "false", "n"})


def score(case: GoldCase, response: dict[str, Any] | None) -> dict[str, Any]:
    """One case's quality metrics (see the module docstring for the shape)."""
    expected = case.expected
    draft: dict[str, Any] | None = None
    if response is not None:
        found = response.get("draft")
        draft = found if isinstance(found, dict) else {}
    values: dict[str, float | None] = {}
    counts: dict[str, list[int]] = {}
    fields: dict[str, dict[str, int | None]] = {}
    if expected.fields is not None:
        predicted = {} if draft is None else predicted_fields(case.task, draft)
        fields = match_fields(expected.fields, predicted)
        tp, fp, fn = (sum(int(f[k] or 0) for f in fields.values()) for k in ("tp", "fp", "fn"))
        counts["fields"] = [tp, fp, fn]
        scored = [f for f in fields.values() if f["exact"] is not None]
        values["fields_exact"] = _mean([float(f["exact"] or 0) for f in scored])
        values["fields_normalized"] = _mean([float(f["normalized"] or 0) for f in scored])
        p, r, f1 = prf(tp, fp, fn)
        values.update(fields_precision=p, fields_recall=r, fields_f1=f1)
    if expected.codes is not None:
        values.update(_codes(expected.codes, draft, counts))
    if expected.reference is not None:
        values["rouge_l"] = 0.0 if draft is None else rouge_l(expected.reference, draft_text(draft))
    if expected.sections is not None:
        values["section_completeness"] = (
            0.0
            if draft is None
            else section_completeness(expected.sections, draft, expected.missing)
        )
    if (case.task == "SLM-05" and not expected.refuse) or expected.grade_target is not None:
        values.update(_reading(case, draft))
    if expected.alert is not None:
        values.update(_alert(case, draft))
    if expected.criteria is not None:
        values["criteria_accuracy"] = criteria_accuracy(expected.criteria, draft)
    return {"values": values, "counts": counts, "fields": fields}


# ----- counting ----------------------------------------------------------------------------


def prf(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    """Precision, recall and F1. Nothing expected and nothing predicted is a perfect
    score; otherwise an undefined ratio (0/0) is 0, as a miss."""
    if tp + fp + fn == 0:
        return 1.0, 1.0, 1.0
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return precision, recall, 2 * tp / (2 * tp + fp + fn)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


# ----- extraction --------------------------------------------------------------------------


def predicted_fields(task: str, draft: dict[str, Any]) -> dict[str, list[Any]]:
    """Field name -> the values the draft gives it (several when a name repeats).

    EXT-LAB: test name -> value plus unit, and the value alone (a gold value without a unit
    is compared with the value alone). EXT-EHR: the assembled `record` flattened to dotted
    paths when present, else the `fields` entries."""
    out: dict[str, list[Any]] = {}
    if task == "EXT-LAB":
        for result in draft.get("results") or []:
            if not isinstance(result, dict) or not str(result.get("test") or "").strip():
                continue
            value = str(result.get("value") or "").strip()
            unit = str(result.get("unit") or "").strip()
            forms = out.setdefault(str(result["test"]).strip(), [])
            forms += [f"{value} {unit}".strip(), value] if unit else [value]
        return out
    record = draft.get("record")
    if isinstance(record, dict) and record:
        for path, value in _flatten(record):
            out.setdefault(path, []).append(value)
        return out
    for entry in draft.get("fields") or []:
        if isinstance(entry, dict) and str(entry.get("name") or "").strip():
            out.setdefault(str(entry["name"]).strip(), []).append(entry.get("value"))
    return out


def _flatten(value: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, inner in value.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(inner, dict):
            yield from _flatten(inner, path)
        else:
            yield path, inner


def match_fields(
    gold: dict[str, Any], predicted: dict[str, list[Any]]
) -> dict[str, dict[str, int | None]]:
    """Per field: exact and normalized match, and its tp/fp/fn. Names compare case-folded;
    a wrong value is both a false positive and a false negative; a predicted name that gold
    lacks is a false positive (kept under its predicted name, exact/normalized None)."""
    by_key: dict[str, tuple[str, list[Any]]] = {}
    for name, given in predicted.items():
        by_key.setdefault(name.casefold(), (name, []))[1].extend(given)
    out: dict[str, dict[str, int | None]] = {}
    for name, value in gold.items():
        _, given = by_key.pop(name.casefold(), (name, []))
        given = [g for g in given if not _empty(g)]
        if value is None:
            ok = int(not given)
            out[name] = {"exact": ok, "normalized": ok, "tp": 0, "fp": 1 - ok, "fn": 0}
            continue
        exact = int(any(_text(g) == _text(value) for g in given))
        normalized = int(any(same_value(g, value) for g in given))
        wrong = int(bool(given) and not normalized)
        out[name] = {
            "exact": exact,
            "normalized": normalized,
            "tp": normalized,
            "fp": wrong,
            "fn": 1 - normalized,
        }
    for name, given in by_key.values():
        if any(not _empty(g) for g in given):
            out[name] = {"exact": None, "normalized": None, "tp": 0, "fp": 1, "fn": 0}
    return out


def _empty(value: Any) -> bool:
    return value is None or value == [] or (isinstance(value, str) and not value.strip())


def _text(value: Any) -> str:
    """A value as written: JSON spelling for booleans, items joined for a list."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ", ".join(_text(v) for v in value)
    return "" if value is None else str(value).strip()


def same_value(predicted: Any, gold: Any) -> bool:
    """Equal once normalized; a list matches as a whole or through any one item."""
    if isinstance(predicted, list):
        return any(same_value(item, gold) for item in [_text(predicted), *predicted])
    return normalize_value(predicted) == normalize_value(gold)


def normalize_value(value: Any) -> str:
    """Case, spaces and punctuation folded; numbers as numbers ('7.20' -> '7.2', '1,000'
    -> '1000'); comparators kept; 'µ'/'μ' read as 'u'; yes/true and no/false alike."""
    text = unicodedata.normalize("NFKC", _text(value)).casefold().replace("\u03bc", "u")
    tokens = [_canonical(token) for token in _TOKEN.findall(text)]
    joined = " ".join(tokens)
    if joined in _TRUE:
        return "true"
    if joined in _FALSE:
        return "false"
    return joined


def _canonical(token: str) -> str:
    if not token[0].isdigit() and not token.startswith("."):
        return token
    number = token.replace(",", "") if _THOUSANDS.match(token) else token.replace(",", ".")
    try:
        return format(Decimal(number).normalize(), "f")
    except InvalidOperation:  # '1.2.3': not one number, compared as written
        return token


# ----- codes -------------------------------------------------------------------------------


def code_key(code: str) -> str:
    """'e11.65 ' -> 'E1165': upper case, no dots or spaces."""
    return re.sub(r"[\s.]+", "", code).upper()


def _codes(
    gold: list[str], draft: dict[str, Any] | None, counts: dict[str, list[int]]
) -> dict[str, float | None]:
    wanted = {code_key(c) for c in gold if code_key(c)}
    items = [] if draft is None else [c for c in draft.get("codes") or [] if isinstance(c, dict)]
    given = {code_key(str(c.get("code") or "")) for c in items} - {""}
    tp, fp, fn = len(wanted & given), len(given - wanted), len(wanted - given)
    counts["codes"] = [tp, fp, fn]
    p, r, f1 = prf(tp, fp, fn)
    out: dict[str, float | None] = {"codes_precision": p, "codes_recall": r, "codes_f1": f1}
    icd = [
        str(c.get("code") or "")
        for c in items
        if c.get("system", "ICD-10-CM") == "ICD-10-CM" and str(c.get("code") or "").strip()
    ]
    if draft is None:
        out.update(codes_valid_rate=0.0, codes_billable_rate=0.0)
    elif not icd:
        out.update(codes_valid_rate=None, codes_billable_rate=None)
    else:
        entries = [icd10.lookup(code) for code in icd]
        out["codes_valid_rate"] = sum(e is not None for e in entries) / len(icd)
        out["codes_billable_rate"] = sum(e is not None and e.billable for e in entries) / len(icd)
    return out


# ----- free text ---------------------------------------------------------------------------


def draft_text(draft: dict[str, Any]) -> str:
    """The draft's own words, in draft order, one string a line: every string value but
    those under `NOT_WORDS` keys and ids (`*_id`)."""
    return "\n".join(_words(draft))


def _words(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        if value.strip():
            yield value.strip()
    elif isinstance(value, dict):
        for key, inner in value.items():
            if key not in NOT_WORDS and not str(key).endswith("_id"):
                yield from _words(inner)
    elif isinstance(value, list):
        for inner in value:
            yield from _words(inner)


def require_rouge() -> None:
    """Fail before any model call, not after the first case, when ROUGE-L cannot run."""
    _scorer()


@cache
def _scorer() -> Any:
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise ConfigurationError(
            "ROUGE-L needs the rouge-score package", hint="pip install 'coheara[eval]'"
        ) from None
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(reference: str, text: str) -> float:
    """ROUGE-L F-measure (Google's `rouge_score`, Porter stemming) of `text` against the
    reference."""
    return float(_scorer().score(reference, text)["rougeL"].fmeasure)


# ----- sections ----------------------------------------------------------------------------


def section_completeness(
    names: list[str], draft: dict[str, Any], missing: list[str] | None = None
) -> float | None:
    """Share of the named sections the draft fills: SLM-01's `sections[]` by name (case
    folded), else the draft's own keys (SLM-03). A section that gold lists as `missing`
    (same name, case folded) counts when present even if it holds only a gap marker: that
    is the honest draft. None when gold names none."""
    if not names:
        return None
    absent = {m.strip().casefold() for m in missing or []}
    sections = draft.get("sections")
    if isinstance(sections, list):
        given = {
            str(s.get("name") or "").strip().casefold(): s.get("statements")
            for s in sections
            if isinstance(s, dict)
        }
    else:
        given = {str(k).casefold(): v for k, v in draft.items()}
    hits = 0
    for name in names:
        key = name.strip().casefold()
        value = given.get(key)
        hits += _filled(value) or (key in absent and _present(value))
    return hits / len(names)


def _present(value: Any) -> bool:
    return value not in (None, "", [], {})


def _filled(value: Any) -> bool:
    """Says something: a non-empty string that is not a gap marker, an element whose `text`
    does, or a list holding one."""
    if isinstance(value, str):
        return bool(value.strip()) and not is_gap_marker(value)
    if isinstance(value, dict):
        if "text" in value:
            return _filled(value["text"])
        return any(_filled(v) for k, v in value.items() if k not in NOT_WORDS)
    if isinstance(value, list):
        return any(_filled(v) for v in value)
    return value is not None and value is not False


# ----- SLM-05, SLM-04, SLM-06 ----------------------------------------------------------------


def _reading(case: GoldCase, draft: dict[str, Any] | None) -> dict[str, float | None]:
    target = case.expected.grade_target
    if target is None:
        given = (case.request.get("input") or {}).get("target_grade")
        target = float(given) if isinstance(given, int | float) else DEFAULT_GRADE
    if draft is None:
        return {"reading_grade": None, "reading_grade_met": 0.0}
    grade = flesch_kincaid(str(draft.get("plain_text") or "")).grade
    met = grade is not None and grade <= target
    return {"reading_grade": grade, "reading_grade_met": float(met)}


def _alert(case: GoldCase, draft: dict[str, Any] | None) -> dict[str, float | None]:
    alert = case.expected.alert
    assert alert is not None
    severity = None if draft is None else draft.get("severity")
    recommendation = None if draft is None else draft.get("recommendation")
    out: dict[str, float | None] = {}
    if alert.severity is not None:
        out["severity_accuracy"] = float(severity == alert.severity)
    if alert.recommendation is not None:
        out["recommendation_accuracy"] = float(recommendation == alert.recommendation)
    if alert.critical:
        kept = severity in ("urgent", "critical") and recommendation not in (None, "log")
        out["critical_preserved"] = float(kept)
    return out


def criteria_accuracy(gold: Mapping[str, str], draft: dict[str, Any] | None) -> float | None:
    """Share of gold criteria the draft gives the gold status (absent counts as wrong)."""
    if not gold:
        return None
    said: dict[str, str] = {}
    for item in [] if draft is None else draft.get("criteria") or []:
        if isinstance(item, dict):
            key = str(item.get("criterion_id") or "").strip().casefold()
            said.setdefault(key, str(item.get("status") or ""))
    right = sum(said.get(cid.strip().casefold()) == status for cid, status in gold.items())
    return right / len(gold)
