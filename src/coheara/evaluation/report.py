"""A run's report: `report.json` for machines, `report.html` (tables and PNG charts inline)
for people. Only aggregates, case ids and error codes go in: never the drafts."""

from __future__ import annotations

import base64
import html
import io
import json
import time
from pathlib import Path
from typing import Any

from coheara.evaluation import aggregate
from coheara.evaluation.runner import MANIFEST, read_manifest, read_records
from coheara.private_files import write_atomic

REPORT_JSON = "report.json"
REPORT_HTML = "report.html"
HEADLINE = (
    "fields_micro_f1",
    "fields_macro_f1",
    "codes_micro_f1",
    "rouge_l",
    "section_completeness",
    "reading_grade_met",
    "critical_preserved",
    "criteria_accuracy",
    "verified_share",
    "gap_honesty",
    "schema_valid",
    "within_target",
)
"""Charted when present (one bar group a task, one bar a variant), and what the command
line prints; the HTML page has every metric."""
SUMMARY = ("cases", "error_rate", *HEADLINE, "unverified_per_100", "total_s_p50", "ttft_s_p50")


def ordered(names: set[str] | list[str]) -> list[str]:
    """In the registry's order (quality, then compliance, then latency), unknown ones last."""
    order = {name: index for index, name in enumerate(aggregate.METRICS)}
    return sorted(names, key=lambda name: (order.get(name, len(order)), name))


def build(folder: Path) -> dict[str, Any]:
    manifest = read_manifest(folder / MANIFEST)
    records = read_records(folder)
    summary = aggregate.summarize(records)
    failures = [
        {"case": r["case"], "task": r["task"], "variant": r["variant"], "code": r["error"]["code"]}
        for r in records
        if r["status"] != "ok" and r.get("error")
    ]
    return {
        "run": folder.name,
        "generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "manifest": manifest,
        "records": len(records),
        "summary": summary,
        "failures": failures,
    }


def write(folder: Path) -> dict[str, Any]:
    report = build(folder)
    write_atomic(folder / REPORT_JSON, (json.dumps(report, indent=2) + "\n").encode("utf-8"))
    write_atomic(folder / REPORT_HTML, to_html(report).encode("utf-8"))
    return report


def load(path: Path) -> dict[str, Any]:
    """A report from a run folder (built afresh) or a report.json file."""
    from coheara.errors import InvalidRequestError

    if path.is_dir():
        if not (path / MANIFEST).exists():
            raise InvalidRequestError(f"{path} is not a run folder (no {MANIFEST})")
        return build(path)
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        raise InvalidRequestError(f"{path} is not a report (a run folder or report.json)") from None
    if not isinstance(report, dict) or not _is_summary(report.get("summary")):
        raise InvalidRequestError(f"{path} is not a report of coheara eval (bad summary)")
    return report


def _is_summary(summary: Any) -> bool:
    """variant -> task -> metric -> number or null (and "strata", not read here)."""
    if not isinstance(summary, dict):
        return False
    for variant, tasks in summary.items():
        if variant == "strata":
            continue
        if not isinstance(tasks, dict):
            return False
        for values in tasks.values():
            if not isinstance(values, dict) or not all(
                value is None or (isinstance(value, int | float) and not isinstance(value, bool))
                for value in values.values()
            ):
                return False
    return True


def by_task(report: dict[str, Any]) -> dict[str, dict[str, dict[str, float | None]]]:
    """variant -> task (and "all") -> metric -> value."""
    summary = report["summary"]
    return {variant: tasks for variant, tasks in summary.items() if variant != "strata"}


def _format(name: str, value: float | None) -> str:
    if value is None:
        return "-"
    metric = aggregate.METRICS.get(name)
    if name == "cases":
        return str(int(value))
    if metric is not None and metric.kind == "seconds":
        return f"{value:.2f} s"
    return f"{value:.3f}"


def _label(name: str) -> str:
    metric = aggregate.METRICS.get(name)
    return metric.label if metric is not None else name


def _table(rows: dict[str, dict[str, float | None]], columns: list[str]) -> str:
    names = ordered({m for column in columns for m in rows.get(column, {})})
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for name in names:
        cells = "".join(
            f"<td>{html.escape(_format(name, rows.get(c, {}).get(name)))}</td>" for c in columns
        )
        body.append(f"<tr><th scope='row'>{html.escape(_label(name))}</th>{cells}</tr>")
    return f"<table><tr><th>metric</th>{head}</tr>{''.join(body)}</table>"


def _chart(variants: dict[str, dict[str, dict[str, float | None]]], task: str) -> str | None:
    """A PNG (base64) of the headline rates of one task per variant, or None without
    matplotlib or without anything to chart."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    names = [
        n for n in HEADLINE if any(variants[v].get(task, {}).get(n) is not None for v in variants)
    ]
    if not names:
        return None
    figure, axes = plt.subplots(figsize=(max(5.0, 1.1 * len(names) + 2), 3.2))
    width = 0.8 / max(1, len(variants))
    for index, variant in enumerate(variants):
        values = [variants[variant].get(task, {}).get(n) or 0.0 for n in names]
        positions = [i + index * width for i in range(len(names))]
        axes.bar(positions, values, width=width, label=variant)
    axes.set_xticks([i + width * (len(variants) - 1) / 2 for i in range(len(names))])
    axes.set_xticklabels([_label(n) for n in names], rotation=25, ha="right", fontsize=8)
    axes.set_ylim(0, 1.05)
    axes.set_title(task)
    axes.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def to_html(report: dict[str, Any]) -> str:
    manifest = report["manifest"]
    variants = by_task(report)
    columns = list(variants)
    tasks = sorted({t for v in variants.values() for t in v if t != "all"})
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>coheara eval {html.escape(report['run'])}</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:70em}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;"
        "padding:.3em .6em;text-align:right}th[scope=row],tr:first-child th{text-align:left}"
        ".note{color:#555}</style></head><body>",
        f"<h1>Evaluation {html.escape(report['run'])}</h1>",
        "<p class='note'>Synthetic or site gold sets scored offline: task quality against the"
        " gold drafts, framework compliance from the task layer's own checks. Not a clinical"
        " validation.</p>",
        "<p>"
        + html.escape(
            f"backend {manifest['backend']}, model {manifest['model']}; generated "
            f"{report['generated']}; {report['records']} records"
        )
        + "</p><ul>",
    ]
    for gold in manifest["gold_sets"]:
        parts.append(
            f"<li>{html.escape(gold['file'])}: {gold['cases']} cases, sha256 "
            f"{html.escape(gold['sha256'][:16])}</li>"
        )
    parts.append("</ul><h2>All tasks</h2>")
    parts.append(_table({v: variants[v].get("all", {}) for v in columns}, columns))
    for task in tasks:
        prompt = manifest["prompts"].get(task, {})
        parts.append(
            f"<h2>{html.escape(task)}</h2><p class='note'>prompt version "
            f"{html.escape(str(prompt.get('version')))}, hash "
            f"{html.escape(str(prompt.get('prompt_hash')))}</p>"
        )
        parts.append(_table({v: variants[v].get(task, {}) for v in columns}, columns))
        chart = _chart(variants, task)
        if chart is not None:
            parts.append(
                f"<img alt='{html.escape(task)} chart' src='data:image/png;base64,{chart}'>"
            )
    strata = report["summary"].get("strata", {})
    if strata:
        parts.append("<h2>By tag</h2>")
    for tag, by_variant in sorted(strata.items()):
        parts.append(f"<h3>{html.escape(tag)}</h3>")
        for variant, values in sorted(by_variant.items()):
            parts.append(f"<p>{html.escape(variant)}</p>")
            parts.append(_table(values, sorted(values)))
    if report["failures"]:
        parts.append(
            "<h2>Failures</h2><table><tr><th>case</th><th>task</th><th>variant</th>"
            "<th>code</th></tr>"
        )
        for failure in report["failures"]:
            cells = "".join(
                f"<td>{html.escape(str(failure[k]))}</td>"
                for k in ("case", "task", "variant", "code")
            )
            parts.append(f"<tr>{cells}</tr>")
        parts.append("</table>")
    parts.append("</body></html>\n")
    return "\n".join(parts)
