"""`coheara bench`: the spec's latency table against the configured backend."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from coheara.backends.base import Backend
from coheara.cli.common import (
    BackendOption,
    ModelOption,
    UrlOption,
    err_console,
    fail,
    settings_for,
)
from coheara.deploy import latency
from coheara.errors import ConfigurationError
from coheara.settings import Settings


def bench(
    backend: BackendOption = None,
    model: ModelOption = None,
    url: UrlOption = None,
    runs: Annotated[int, typer.Option(min=1, max=1000, help="Measured runs a scenario.")] = 5,
    warmup: Annotated[int, typer.Option(min=0, max=100, help="Unmeasured runs first.")] = 1,
    max_tokens: Annotated[int, typer.Option(min=1, max=8192, help="Output tokens a run.")] = 64,
    full: Annotated[bool, typer.Option(help="Add the full 128K-context row (slow).")] = False,
    scale: Annotated[
        float, typer.Option(min=0.0001, max=1.0, help="Shrink every prompt (for a smoke run).")
    ] = 1.0,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write results here.")] = None,
    chart: Annotated[Path | None, typer.Option(help="Write a PNG chart here.")] = None,
    synthetic_full_size: Annotated[
        bool,
        typer.Option(
            help="Measure a random-weight model of MedGemma 1.5 4B's full architecture, "
            "built in process on the Transformers device (no download; needs the "
            "transformers extra and about 9 GB of memory in bfloat16, 17 GB in float32).",
        ),
    ] = False,
) -> None:
    """Time to first token, total time and tokens/s (p50, p95) per scenario, beside the
    spec's expected latency and the 3 s point-of-care target."""
    from coheara.engine import Engine

    settings = settings_for(backend)
    if synthetic_full_size:
        if backend is not None or model is not None or url is not None:
            fail(
                ConfigurationError(
                    "--synthetic-full-size builds its own model: drop --backend, --model and --url"
                ),
                code=2,
            )
        engine = Engine(_synthetic_backend(settings), settings)
    else:
        engine = Engine.from_config(model=model, url=url, settings=settings)
    scenarios = [*latency.SCENARIOS, *([latency.FULL_CONTEXT] if full else [])]

    async def measure() -> list[dict[str, Any]]:
        async with engine:
            capabilities = await engine.capabilities()
            chosen = [s for s in scenarios if capabilities.vision or s.images == 0]
            with Progress(console=err_console, transient=True) as progress:
                task = progress.add_task("benchmark", total=len(chosen) * (runs + warmup))

                def advance(scenario: latency.Scenario) -> None:
                    progress.update(task, advance=1, description=scenario.id)

                return await latency.run(
                    engine,
                    chosen,
                    runs=runs,
                    warmup=warmup,
                    max_tokens=max_tokens,
                    scale=scale,
                    progress=advance,
                )

    summaries = asyncio.run(measure())
    title = f"{engine.backend.name} {engine.backend.model}"[:80]
    document = {"backend": engine.backend.name, "model": engine.backend.model, "rows": summaries}
    if json_out is not None:
        json_out.write_text(json.dumps(document, indent=2) + "\n")
    if chart is not None:
        latency.chart(summaries, str(chart), title)
    _print(summaries, title, scale)
    for row in summaries:
        if "skipped" in row:
            err_console.print(f"{row['scenario']['id']} skipped: {row['skipped']}", markup=False)


def _synthetic_backend(settings: Settings) -> Backend:
    """The full architecture with random weights, on the configured device and dtype."""
    try:
        from coheara.backends.transformers_backend import TransformersBackend, resolve
        from coheara.dev.full_size import synthetic_model
    except ImportError:
        raise ConfigurationError(
            "--synthetic-full-size needs torch and transformers",
            hint="pip install 'coheara[transformers]'",
        ) from None
    device, dtype = resolve(settings.transformers_device, settings.transformers_dtype)
    with err_console.status(f"building the full-size random model on {device} ({dtype})"):
        built, processor = synthetic_model(device, dtype)
    return TransformersBackend.from_loaded("synthetic-full-size", built, processor)


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _print(summaries: list[dict[str, Any]], title: str, scale: float) -> None:
    table = Table(title=f"latency: {title}" + (f" (prompts x{scale:g})" if scale != 1 else ""))
    for column in (
        "scenario",
        "prompt tokens",
        "TTFT p50 s",
        "TTFT p95 s",
        "total p50 s",
        "total p95 s",
        "tokens/s p50",
        "spec (GPU) s",
        "spec",
        "3 s target",
    ):
        table.add_column(column, justify="left" if column in ("scenario", "spec") else "right")
    for row in summaries:
        low, high = row["expected_s"]
        if "skipped" in row:
            table.add_row(row["scenario"]["label"], "-", *["-"] * 5, f"{low:g}-{high:g}", "skipped")
            continue
        table.add_row(
            row["scenario"]["label"],
            str(row["prompt_tokens"]),
            _seconds(row["ttft_s"]["p50"]),
            _seconds(row["ttft_s"]["p95"]),
            _seconds(row["total_s"]["p50"]),
            _seconds(row["total_s"]["p95"]),
            _seconds(row["tokens_per_s"]["p50"]),
            f"{low:g}-{high:g}",
            "[green]pass[/]" if row["within_expected"] else "[red]miss[/]",
            "[green]pass[/]" if row["within_point_of_care"] else "[red]miss[/]",
        )
    Console().print(table)
