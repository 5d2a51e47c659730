"""`coheara selftest`: prove an install works end to end, with no weights to download.

Builds the tiny random-weight model, then runs all three modes (image included)
in process and through `coheara serve` over loopback with the Ollama and
OpenAI-compatible backends. The weights are random, so the checks compare
paths with each other (same greedy text everywhere, schema-valid objects,
token arithmetic) rather than expecting particular words.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from coheara import model_facts
from coheara.backends.base import Backend
from coheara.cli.common import err_console
from coheara.engine import Engine
from coheara.errors import CohearaError, ConfigurationError
from coheara.settings import load_settings

PROMPT = "Summarize: 58-year-old with chest pain for two hours, troponin pending."
SYSTEM = "You are a clinical documentation assistant. Draft for clinician review."
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "complaint": {"type": "string", "maxLength": 40},
        "hours": {"type": "integer", "minimum": 0, "maximum": 72},
        "pending": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 3},
    },
    "required": ["complaint", "hours", "pending"],
    "additionalProperties": False,
}


@dataclass
class Check:
    name: str
    path: str
    ok: bool = False
    detail: str = ""
    seconds: float = 0.0


def _test_image() -> np.ndarray:
    """A synthetic gradient with a bright disc: no patient, no file."""
    y, x = np.mgrid[0:512, 0:384]
    image = ((x + y) % 256).astype(np.uint8)
    image[(x - 192) ** 2 + (y - 256) ** 2 < 60**2] = 255
    return image


async def _check(
    checks: list[Check], name: str, path: str, body: Callable[[], Awaitable[str]]
) -> None:
    check = Check(name, path)
    started = time.perf_counter()
    try:
        check.detail = await body()
        check.ok = True
    except (CohearaError, AssertionError) as exc:
        check.detail = str(exc) or type(exc).__name__
    except Exception as exc:  # a broken install must show as a failed row, not a traceback
        check.detail = f"unexpected {type(exc).__name__}: {exc}"
    check.seconds = time.perf_counter() - started
    checks.append(check)


async def _mode_checks(
    checks: list[Check], engine: Engine, path: str, reference: str | None
) -> str:
    """Run the three modes on one engine; return its greedy text for cross-path comparison."""
    texts: dict[str, str] = {}

    async def text() -> str:
        result = await engine.generate(PROMPT, system=SYSTEM, max_tokens=24)
        assert result.output_tokens > 0, "no output tokens"
        assert result.finish_reason in ("stop", "length"), result.finish_reason
        if reference is not None:
            assert result.text == reference, "text differs from the in-process engine"
        texts["text"] = result.text
        return f"{result.output_tokens} tokens, {result.finish_reason}"

    async def streamed() -> str:
        parts = [
            chunk.text
            async for chunk in engine.stream(PROMPT, system=SYSTEM, max_tokens=24)
            if chunk.result is None
        ]
        assert "".join(parts) == texts.get("text"), "stream differs from the whole reply"
        return f"{len(parts)} chunks, same text"

    async def image() -> str:
        plain = await engine.generate("Describe the image.", max_tokens=8)
        seen = await engine.generate("Describe the image.", images=[_test_image()], max_tokens=8)
        extra = seen.prompt_tokens - plain.prompt_tokens
        assert extra >= model_facts.IMAGE_SOFT_TOKENS, f"image added only {extra} prompt tokens"
        return f"image cost {extra} prompt tokens"

    async def extract() -> str:
        result = await engine.extract(PROMPT, schema=SCHEMA, max_tokens=120)
        assert set(result.value) == {"complaint", "hours", "pending"}, "fields missing"
        return f"valid object in {result.attempts} attempt(s)"

    await _check(checks, "text", path, text)
    await _check(checks, "stream", path, streamed)
    await _check(checks, "image + text", path, image)
    await _check(checks, "structured extraction", path, extract)
    return texts.get("text", "")


async def _run_selftest(directory: Path) -> list[Check]:
    import torch

    from coheara.backends.ollama import OllamaBackend
    from coheara.backends.openai_compat import OpenAIBackend
    from coheara.backends.transformers_backend import TransformersBackend
    from coheara.dev.tiny_model import build_tiny_model
    from coheara.server.app import create_app
    from coheara.server.background import serve_in_thread

    torch.set_num_threads(1)  # the tiny model's matrices only lose time in a thread pool
    checks: list[Check] = []
    settings = load_settings(extract_retries=2)
    build_tiny_model(directory)
    local = Engine(TransformersBackend(str(directory), device="cpu"), settings)
    reference = await _mode_checks(checks, local, "in process", None)
    app = create_app(local, settings)
    with serve_in_thread(app) as url:
        remotes: list[tuple[str, Backend]] = [
            (
                "server, ollama client",
                OllamaBackend(
                    url=url,
                    model="medgemma",
                    num_ctx=settings.num_ctx,
                    timeout_s=120,
                    connect_timeout_s=5,
                    keep_alive=None,
                ),
            ),
            (
                "server, openai client",
                OpenAIBackend(
                    base_url=url + "/v1",
                    model="medgemma",
                    api_key="selftest",
                    context_length=settings.num_ctx,
                    timeout_s=120,
                    connect_timeout_s=5,
                ),
            ),
        ]
        for path, backend in remotes:
            async with Engine(backend, settings) as engine:
                await _mode_checks(checks, engine, path, reference)
    await local.aclose()
    return checks


def selftest() -> None:
    """Build the tiny model and run every mode in process and through the server."""
    try:
        import coheara.backends.transformers_backend  # noqa: F401
    except ImportError:
        raise ConfigurationError(
            "selftest needs the optional dependencies",
            hint="pip install 'coheara[transformers]' (with torch pinned for your platform)",
        ) from None
    with tempfile.TemporaryDirectory(prefix="coheara-selftest-") as tmp:
        checks = asyncio.run(_run_selftest(Path(tmp)))
    table = Table(title="coheara selftest (tiny random-weight model)")
    for column in ("check", "path", "result", "seconds", "detail"):
        table.add_column(column)
    for check in checks:
        table.add_row(
            check.name,
            check.path,
            "[green]pass[/]" if check.ok else "[red]FAIL[/]",
            f"{check.seconds:.2f}",
            escape(check.detail),
        )
    Console().print(table)
    failed = sum(not c.ok for c in checks)
    if failed:
        err_console.print(f"[bold red]{failed} of {len(checks)} checks failed[/]")
        raise typer.Exit(1)
    err_console.print(f"all {len(checks)} checks passed")
