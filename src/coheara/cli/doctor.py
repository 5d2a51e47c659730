"""`coheara doctor`: the configuration in force, the hardware, which backends answer, and
what to fix. Exit 0 only when the configured backend can serve (7 otherwise)."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from coheara.cli.common import BackendOption, ModelOption, UrlOption, settings_for, write
from coheara.deploy.doctor import (
    Report,
    can_serve,
    hardware_findings,
    runtime_findings,
    transformers_findings,
)
from coheara.deploy.hardware import detect
from coheara.settings import Settings, config_file


def diagnose(settings: Settings, model: str | None, url: str | None) -> Report:
    from coheara.backends.ollama import OllamaBackend
    from coheara.backends.openai_compat import OpenAIBackend

    hardware = detect()
    report = Report(settings.backend, hardware, hardware_findings(hardware))
    ollama_model = model if settings.backend == "ollama" and model else settings.ollama_model
    openai_model = model if settings.backend == "openai" and model else settings.openai_model

    async def probe() -> None:
        ollama = OllamaBackend(
            url=url if url and settings.backend in ("ollama", "auto") else settings.ollama_url,
            model=ollama_model,
            num_ctx=settings.num_ctx,
            timeout_s=10,
            connect_timeout_s=3,
            keep_alive=None,
        )
        openai = OpenAIBackend(
            base_url=url if url and settings.backend == "openai" else settings.openai_url,
            model=openai_model,
            api_key=settings.openai_api_key.get_secret_value(),
            context_length=settings.openai_context_length,
            timeout_s=10,
            connect_timeout_s=3,
        )
        report.findings += await runtime_findings("Ollama", ollama, settings, hardware, ollama=True)
        report.findings += await runtime_findings(
            "OpenAI-compatible", openai, settings, hardware, ollama=False
        )

    asyncio.run(probe())
    report.findings += transformers_findings(settings, hardware)
    report.can_serve = can_serve(settings.backend, report.findings)
    return report


def doctor(
    backend: BackendOption = None,
    model: ModelOption = None,
    url: UrlOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Check the hardware, the configuration and every backend; exit 0 only when the
    configured one can serve."""
    settings = settings_for(backend)
    report = diagnose(settings, model, url)
    if as_json:
        write(json.dumps(report.to_dict(), indent=2) + "\n")
    else:
        _print(settings, report)
    if not report.can_serve:
        raise typer.Exit(7)


def _print(settings: Settings, report: Report) -> None:
    console = Console()
    config = Table(title="configuration in force", show_header=False)
    config.add_row("config file", escape(str(config_file() or "(none)")))
    for key, value in settings.model_dump().items():
        if "key" in key:
            value = "(set)" if value else "(none)"
        config.add_row(key, escape(str(value)))
    console.print(config)
    table = Table(title="checks")
    for column in ("check", "status", "detail", "what to do"):
        table.add_column(column)
    for finding in report.findings:
        status = "[red]problem[/]" if not finding.ok else "[yellow]warning[/]"
        table.add_row(
            escape(finding.check),
            "[green]ok[/]" if finding.ok and not finding.warning else status,
            escape(finding.detail),
            escape(finding.fix),
        )
    console.print(table)
    console.print(
        f"configured backend {settings.backend}: "
        + ("[green]can serve[/]" if report.can_serve else "[red]cannot serve[/]")
    )
