"""`coheara doctor`: the configuration in force, which backends answer, and what to fix."""

from __future__ import annotations

import asyncio
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from coheara import model_facts
from coheara.backends.base import Backend
from coheara.cli.common import BackendOption, ModelOption, UrlOption, settings_for
from coheara.errors import CohearaError
from coheara.settings import Settings, config_file


@dataclass
class Finding:
    what: str
    ok: bool
    detail: str
    fix: str = ""


async def _probe_http(name: str, backend: Backend, needs_vision_hint: bool) -> list[Finding]:
    health = await backend.health()
    findings = [
        Finding(
            f"{name} server",
            health.ok,
            health.detail + (f" (version {health.version})" if health.version else ""),
            "" if health.ok else f"start {name} or point --url / the settings at it",
        )
    ]
    if health.ok:
        try:
            caps = await backend.capabilities()
            findings.append(
                Finding(
                    f"{name} model {backend.model}",
                    True,
                    f"present; vision {'yes' if caps.vision else 'no'}; "
                    f"trained context {caps.context_length}",
                    "" if caps.vision else str(caps.details.get("vision_hint", "")),
                )
            )
        except CohearaError as exc:
            findings.append(
                Finding(f"{name} model {backend.model}", False, exc.message, exc.hint or "")
            )
    await backend.aclose()
    return findings


def _transformers_findings(settings: Settings) -> list[Finding]:
    missing = [m for m in ("torch", "transformers", "xgrammar") if not importlib.util.find_spec(m)]
    if missing:
        return [
            Finding(
                "transformers backend",
                False,
                f"not installed ({', '.join(missing)} missing)",
                "pip install 'coheara[transformers]' (pin torch for your platform)",
            )
        ]
    import torch

    device = "CUDA " + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only"
    findings = [Finding("transformers backend", True, f"torch {torch.__version__}, {device}")]
    path = settings.transformers_model
    if not path:
        findings.append(
            Finding(
                "local weights",
                False,
                "none configured",
                "set COHEARA_TRANSFORMERS_MODEL to a MedGemma folder",
            )
        )
    elif Path(path).is_dir():
        findings.append(Finding("local weights", True, f"folder {path}"))
    else:
        findings.append(
            Finding(
                "local weights",
                False,
                f"{path} is not a folder",
                "download the weights once on a connected machine and copy the folder",
            )
        )
    return findings


def doctor(backend: BackendOption = None, model: ModelOption = None, url: UrlOption = None) -> None:
    """Check the configuration and every backend; exit 0 only when the configured one can serve."""
    from coheara.backends.ollama import OllamaBackend
    from coheara.backends.openai_compat import OpenAIBackend

    settings = settings_for(backend)
    console = Console()
    config = Table(title="configuration in force", show_header=False)
    config.add_row("config file", escape(str(config_file() or "(none)")))
    for key, value in settings.model_dump().items():
        if "key" in key:
            value = "(set)" if value else "(none)"
        config.add_row(key, escape(str(value)))
    console.print(config)

    ollama_model = model if settings.backend == "ollama" and model else settings.ollama_model
    openai_model = model if settings.backend == "openai" and model else settings.openai_model

    async def probe() -> list[Finding]:
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
        return [
            *await _probe_http("Ollama", ollama, True),
            *await _probe_http("OpenAI-compatible", openai, False),
        ]

    findings = asyncio.run(probe())
    findings.extend(_transformers_findings(settings))
    if settings.num_ctx > model_facts.CONTEXT_LENGTH:
        findings.append(Finding("num_ctx", False, "above the model's trained context", ""))
    table = Table(title="backends")
    for column in ("check", "status", "detail", "what to do"):
        table.add_column(column)
    for finding in findings:
        table.add_row(
            escape(finding.what),
            "[green]ok[/]" if finding.ok else "[red]problem[/]",
            escape(finding.detail),
            escape(finding.fix),
        )
    console.print(table)

    prefix = {"ollama": "Ollama", "openai": "OpenAI-compatible", "transformers": ""}
    if settings.backend == "auto":
        usable = any(f.ok and " model " in f.what for f in findings) or any(
            f.ok and f.what == "local weights" for f in findings
        )
    elif settings.backend == "transformers":
        usable = all(f.ok for f in findings if f.what in ("transformers backend", "local weights"))
    else:
        usable = all(f.ok for f in findings if f.what.startswith(prefix[settings.backend]))
    console.print(
        f"configured backend {settings.backend}: "
        + ("[green]can serve[/]" if usable else "[red]cannot serve[/]")
    )
    if not usable:
        raise typer.Exit(7)
