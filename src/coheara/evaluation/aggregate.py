"""From per-case records to the numbers a report, `--compare` and `--gate` read.

A record is the runner's one line per case and variant (`status`, `tags`, `quality`,
`compliance`, ...). `aggregate` turns a list of them into one value per metric of
`METRICS` that applies (a metric no case gives a value is left out): means of per-case
values over the cases that have one, micro precision/recall/F1 from counts summed over
cases (a case with many fields weighs more, unlike the mean of per-case F1s), macro F1
over field names (each field's F1 from its outcomes in every case, then their mean, so a
rare field counts as much as a common one), latency percentiles, the case count and the
error rate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from coheara.evaluation.quality import prf

Kind = Literal["rate", "score", "grade", "seconds", "per_100", "count"]
Source = Literal["quality", "compliance", "aggregate"]


@dataclass(frozen=True)
class Metric:
    """What a metric is, for people and for the gate: which way is better."""

    name: str
    label: str
    higher_is_better: bool
    kind: Kind
    applies_to: str
    source: Source = "aggregate"
    """Where a case's value is: `record["quality"]["values"]`, `record["compliance"]`, or
    nowhere (computed over cases only)."""
    neutral: bool = False
    """No better way to move, for `--compare` and `--gate`: shown, never judged (the case
    count; the reading grade, which only has to meet its target)."""


def _metrics(*items: Metric) -> dict[str, Metric]:
    return {m.name: m for m in items}


_Q: Source = "quality"
_C: Source = "compliance"
_FIELDS = "extraction cases (expected.fields: EXT-LAB, EXT-EHR)"
_CODES = "SLM-02 cases with expected.codes"

METRICS: dict[str, Metric] = _metrics(
    # task quality, per case
    Metric("fields_exact", "Fields exact match", True, "rate", _FIELDS, _Q),
    Metric("fields_normalized", "Fields normalized match", True, "rate", _FIELDS, _Q),
    Metric("fields_precision", "Fields precision (mean of cases)", True, "score", _FIELDS, _Q),
    Metric("fields_recall", "Fields recall (mean of cases)", True, "score", _FIELDS, _Q),
    Metric("fields_f1", "Fields F1 (mean of cases)", True, "score", _FIELDS, _Q),
    Metric("codes_precision", "Codes precision (mean of cases)", True, "score", _CODES, _Q),
    Metric("codes_recall", "Codes recall (mean of cases)", True, "score", _CODES, _Q),
    Metric("codes_f1", "Codes F1 (mean of cases)", True, "score", _CODES, _Q),
    Metric("codes_valid_rate", "Codes valid ICD-10-CM", True, "rate", "SLM-02 ICD-10-CM codes", _Q),
    Metric("codes_billable_rate", "Codes billable", True, "rate", "SLM-02 ICD-10-CM codes", _Q),
    Metric("rouge_l", "ROUGE-L F", True, "score", "cases with expected.reference", _Q),
    Metric(
        "section_completeness",
        "Sections filled",
        True,
        "rate",
        "cases with expected.sections (SLM-01, SLM-03)",
        _Q,
    ),
    Metric("reading_grade", "Reading grade (FK)", False, "grade", "SLM-05", _Q, neutral=True),
    Metric("reading_grade_met", "Reading grade met", True, "rate", "SLM-05", _Q),
    Metric(
        "severity_accuracy",
        "Alert severity accuracy",
        True,
        "rate",
        "SLM-04 with expected.alert.severity",
        _Q,
    ),
    Metric(
        "recommendation_accuracy",
        "Alert recommendation accuracy",
        True,
        "rate",
        "SLM-04 with expected.alert.recommendation",
        _Q,
    ),
    Metric(
        "critical_preserved",
        "Critical alert preserved",
        True,
        "rate",
        "SLM-04 with expected.alert.critical",
        _Q,
    ),
    Metric(
        "criteria_accuracy",
        "Criterion status accuracy",
        True,
        "rate",
        "SLM-06 with expected.criteria",
        _Q,
    ),
    # framework compliance, per case
    Metric("verified_share", "Citations verified", True, "rate", "responses with a trace", _C),
    Metric(
        "unverified_per_100",
        "Unverified quotes and numbers per 100 elements",
        False,
        "per_100",
        "responses with a trace",
        _C,
    ),
    Metric("gap_honesty", "Gaps flagged", True, "rate", "cases with expected.missing", _C),
    Metric("refusal_correct", "Refused when it must", True, "rate", "expected.refuse cases", _C),
    Metric("over_refusal", "Refused when it must not", False, "rate", "other cases", _C),
    Metric("degenerate", "Repetition loops", False, "rate", "every case", _C),
    Metric("schema_valid", "Schema-valid draft", True, "rate", "cases not refused", _C),
    Metric("validation_passed", "Validation passed", True, "rate", "responses", _C),
    Metric("total_s", "Latency, mean (s)", False, "seconds", "responses", _C),
    Metric("ttft_s", "Time to first token, mean (s)", False, "seconds", "streamed responses", _C),
    Metric("within_target", "Within latency target", True, "rate", "tasks with a target", _C),
    # over cases only
    Metric("fields_micro_precision", "Fields micro precision", True, "score", _FIELDS),
    Metric("fields_micro_recall", "Fields micro recall", True, "score", _FIELDS),
    Metric("fields_micro_f1", "Fields micro F1", True, "score", _FIELDS),
    Metric("fields_macro_f1", "Fields macro F1 (per field name)", True, "score", _FIELDS),
    Metric("codes_micro_precision", "Codes micro precision", True, "score", _CODES),
    Metric("codes_micro_recall", "Codes micro recall", True, "score", _CODES),
    Metric("codes_micro_f1", "Codes micro F1", True, "score", _CODES),
    Metric("total_s_p50", "Latency p50 (s)", False, "seconds", "responses"),
    Metric("total_s_p95", "Latency p95 (s)", False, "seconds", "responses"),
    Metric("ttft_s_p50", "Time to first token p50 (s)", False, "seconds", "streamed responses"),
    Metric("error_rate", "Errors", False, "rate", "every case (refusals are not errors)"),
    Metric("cases", "Cases", True, "count", "every case", neutral=True),
)

NO_TAG = "(none)"
"""The stratum of cases that lack the tag."""


def aggregate(records: list[dict[str, Any]]) -> dict[str, float | None]:
    """The metrics of `METRICS` that some case of `records` gives a value, in registry
    order; `cases` and `error_rate` always (the rate None when there are no records)."""
    out: dict[str, float | None] = {}
    for name, metric in METRICS.items():
        if metric.source != "aggregate":
            values = [v for r in records if (v := _value(r, metric.source, name)) is not None]
            if values:
                out[name] = sum(values) / len(values)
    for what in ("fields", "codes"):
        summed = _summed_counts(records, what)
        if summed is not None:
            p, r, f1 = prf(*summed)
            out.update(
                {f"{what}_micro_precision": p, f"{what}_micro_recall": r, f"{what}_micro_f1": f1}
            )
    macro = macro_f1(records)
    if macro is not None:
        out["fields_macro_f1"] = macro
    total = [v for r in records if (v := _value(r, "compliance", "total_s")) is not None]
    ttft = [v for r in records if (v := _value(r, "compliance", "ttft_s")) is not None]
    if total:
        out["total_s_p50"] = _percentile(total, 50)
        out["total_s_p95"] = _percentile(total, 95)
    if ttft:
        out["ttft_s_p50"] = _percentile(ttft, 50)
    out["error_rate"] = (
        sum(r.get("status") == "error" for r in records) / len(records) if records else None
    )
    out["cases"] = float(len(records))
    return {name: out[name] for name in METRICS if name in out}


def _value(record: dict[str, Any], source: Source, name: str) -> float | None:
    if source == "quality":
        values = (record.get("quality") or {}).get("values") or {}
    else:
        values = record.get("compliance") or {}
    value = values.get(name)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _summed_counts(records: list[dict[str, Any]], key: str) -> tuple[int, int, int] | None:
    """tp, fp, fn summed over the cases that counted `key`; None when none did."""
    rows = [c for r in records if (c := ((r.get("quality") or {}).get("counts") or {}).get(key))]
    if not rows:
        return None
    return sum(c[0] for c in rows), sum(c[1] for c in rows), sum(c[2] for c in rows)


def macro_f1(records: list[dict[str, Any]]) -> float | None:
    """Mean over field names (case folded) of each field's F1 from its summed outcomes."""
    per_field: dict[str, list[int]] = {}
    for record in records:
        for name, outcome in ((record.get("quality") or {}).get("fields") or {}).items():
            summed = per_field.setdefault(name.casefold(), [0, 0, 0])
            for i, key in enumerate(("tp", "fp", "fn")):
                summed[i] += int(outcome.get(key) or 0)
    scored = [prf(*counts)[2] for counts in per_field.values() if any(counts)]
    return sum(scored) / len(scored) if scored else None


def _percentile(values: list[float], q: float) -> float:
    """numpy's default (linear interpolation between closest ranks)."""
    return float(np.percentile(values, q, method="linear"))


def stratify(records: list[dict[str, Any]], tag: str) -> dict[str, dict[str, float | None]]:
    """`aggregate` per value of one tag; cases without the tag under "(none)"."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        value = (record.get("tags") or {}).get(tag)
        groups.setdefault(NO_TAG if value is None else str(value), []).append(record)
    return {value: aggregate(group) for value, group in sorted(groups.items())}


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """{variant: {task: aggregate, ..., "all": aggregate}, ..., "strata": {tag: {variant:
    {value: aggregate}}}}, variants and tasks in the order first seen, for every tag seen."""
    by_variant: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        by_variant.setdefault(str(record.get("variant", "base")), []).append(record)
    out: dict[str, Any] = {}
    for variant, group in by_variant.items():
        by_task: dict[str, list[dict[str, Any]]] = {}
        for record in group:
            by_task.setdefault(str(record.get("task", "")), []).append(record)
        out[variant] = {task: aggregate(rows) for task, rows in by_task.items()}
        out[variant]["all"] = aggregate(group)
    tags = sorted({tag for record in records for tag in record.get("tags") or {}})
    out["strata"] = {
        tag: {variant: stratify(group, tag) for variant, group in by_variant.items()}
        for tag in tags
    }
    return out
