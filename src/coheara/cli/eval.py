"""`coheara eval`: run gold sets through the tasks, report, compare and gate."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress
from rich.table import Table

from coheara.cli.common import BackendOption, ModelOption, UrlOption, err_console, settings_for
from coheara.errors import EvaluationRegressionError, InvalidRequestError


def eval_command(
    gold: Annotated[
        list[Path] | None,
        typer.Argument(help="Gold sets (JSONL); default: the shipped synthetic sets."),
    ] = None,
    task: Annotated[
        list[str] | None, typer.Option("--task", "-t", help="Only these tasks (repeatable).")
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Run folder; rerunning with the same folder resumes. Default: "
            "coheara-eval/<id of the gold sets, variants, backend and model>."
        ),
    ] = None,
    backend: BackendOption = None,
    model: ModelOption = None,
    url: UrlOption = None,
    adapter: Annotated[
        list[str] | None,
        typer.Option(help="Also run with this registered LoRA adapter (repeatable)."),
    ] = None,
    base: Annotated[bool, typer.Option(help="Run the base model too.")] = True,
    limit: Annotated[
        int | None, typer.Option(min=1, help="At most this many cases a gold set.")
    ] = None,
    compare: Annotated[
        tuple[Path, Path] | None,
        typer.Option(help="Compare two runs (folders or report.json): A then B; runs nothing."),
    ] = None,
    gate: Annotated[
        Path | None,
        typer.Option(help="Fail (exit 13) if a metric drops below this baseline run's."),
    ] = None,
    tolerance: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            max=1.0,
            help="Gate: the largest drop allowed in a rate or score, absolute "
            "(default: the eval_tolerance setting, 0.02).",
        ),
    ] = None,
    latency_tolerance: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            help="Gate: the largest slow-down allowed in a time, relative "
            "(default: the eval_latency_tolerance setting, 0.25 = 25%).",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Score tasks on gold sets (task quality and framework compliance), write report.json
    and report.html into the run folder, and compare or gate against another run."""
    from coheara.evaluation import compare as comparing
    from coheara.evaluation import report as reporting

    if compare is not None:
        if gold or gate is not None:
            raise InvalidRequestError("--compare runs nothing: give no gold sets and no --gate")
        before, after = (reporting.load(p) for p in compare)
        _print_changes(comparing.compare(before, after), f"{compare[0]} -> {compare[1]}")
        return
    baseline = reporting.load(gate) if gate is not None else None
    folder, report = _run(gold, task, out, backend, model, url, adapter, base, limit)
    if as_json:
        typer.echo(json.dumps(report))
    else:
        _print_summary(report)
        changes = comparing.within_run(report)
        if changes:
            _print_changes(changes, "adapters against the base")
        err_console.print(f"report: {folder / reporting.REPORT_HTML}", markup=False)
    if baseline is not None:
        settings = settings_for(backend)
        regressions = comparing.gate(
            baseline,
            report,
            tolerance=settings.eval_tolerance if tolerance is None else tolerance,
            latency_tolerance=(
                settings.eval_latency_tolerance if latency_tolerance is None else latency_tolerance
            ),
        )
        if regressions:
            _print_changes(regressions, f"regressions against {gate}")
            worst = regressions[0]
            raise EvaluationRegressionError(
                f"{len(regressions)} metric(s) dropped beyond the tolerance, e.g. "
                f"{worst.task} {worst.metric} {_value(worst.before)} -> {_value(worst.after)}",
                hint="see the table above; --tolerance sets the allowed drop",
            )
        err_console.print(f"gate passed against {gate}", markup=False)


def _run(
    gold: list[Path] | None,
    tasks: list[str] | None,
    out: Path | None,
    backend: str | None,
    model: str | None,
    url: str | None,
    adapters: list[str] | None,
    base: bool,
    limit: int | None,
) -> tuple[Path, dict[str, Any]]:
    from coheara.engine import Engine
    from coheara.evaluation import gold as goldsets
    from coheara.evaluation import report as reporting
    from coheara.evaluation.quality import require_rouge
    from coheara.evaluation.runner import BASE, Variant, default_folder, manifest_for, run
    from coheara.tasks.registry import get_task

    wanted = {get_task(t).id for t in tasks or []}
    files = list(gold or [])
    if not files:
        files = [f for t in sorted(wanted) for f in goldsets.shipped(t)] if wanted else []
        files = files or goldsets.shipped()
    golds = []
    for file in files:
        loaded = goldsets.load(file)
        cases = [c for c in loaded.cases if not wanted or c.task in wanted][:limit]
        if cases:
            golds.append(loaded.model_copy(update={"cases": cases}))
    if not golds:
        raise InvalidRequestError("no gold cases for the tasks asked for")
    settings = settings_for(backend)
    variants = [BASE] if base else []
    if adapters:
        from coheara.adapters import AdapterRegistry

        registry = AdapterRegistry(settings.adapters_dir)
        for name in adapters:  # an unknown name stops here, before any case runs
            record = registry.get(name)
            variants.append(Variant.for_adapter(record.name, record.task))
    if not variants:
        raise InvalidRequestError("nothing to run: --no-base needs at least one --adapter")
    if any(case.expected.reference for gold in golds for case in gold.cases):
        require_rouge()
    engine = Engine.from_config(model=model, url=url, settings=settings)
    total = sum(len(g.cases) for g in golds) * len(variants)

    async def evaluate() -> Path:
        async with engine:
            capabilities = await engine.capabilities()
            manifest = manifest_for(golds, variants, capabilities.backend, capabilities.model)
            folder = out if out is not None else default_folder(manifest)
            with Progress(console=err_console, transient=True) as progress:
                bar = progress.add_task("evaluating", total=total)
                await run(
                    engine,
                    golds,
                    variants,
                    folder,
                    progress=lambda job, _record: progress.update(
                        bar, advance=1, description=f"{job.variant.name} {job.case.task}"
                    ),
                )
            return folder

    folder = asyncio.run(evaluate())
    return folder, reporting.write(folder)


def _value(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _print_summary(report: dict[str, Any]) -> None:
    from coheara.evaluation.aggregate import METRICS
    from coheara.evaluation.report import SUMMARY, by_task, ordered

    variants = by_task(report)
    tasks = sorted({t for per_task in variants.values() for t in per_task})
    table = Table(title=f"evaluation {report['run']} (every metric: report.html)")
    table.add_column("task")
    table.add_column("metric")
    for variant in variants:
        table.add_column(escape(variant), justify="right")
    for task in tasks:
        present = {m for v in variants.values() for m in v.get(task, {})}
        names = [name for name in ordered(present) if name in SUMMARY]
        for index, name in enumerate(names):
            label = METRICS[name].label if name in METRICS else name
            cells = [_value(variants[v].get(task, {}).get(name)) for v in variants]
            table.add_row(escape(task) if index == 0 else "", escape(label), *cells)
    Console(highlight=False).print(table)


def _print_changes(changes: list[Any], title: str) -> None:
    table = Table(title=title)
    for column in ("variant", "task", "metric", "before", "after", ""):
        table.add_column(column, justify="right" if column in ("before", "after") else "left")
    shown = [c for c in changes if c.direction != 0 or (c.before is None) != (c.after is None)]
    for change in shown:
        verdict = {1: "[green]better[/]", -1: "[red]worse[/]"}.get(change.direction, "changed")
        table.add_row(
            escape(change.variant),
            escape(change.task),
            escape(change.metric),
            _value(change.before),
            _value(change.after),
            verdict,
        )
    if not shown:
        table.add_row("-", "-", "no metric changed", "", "", "")
    Console(highlight=False).print(table)
