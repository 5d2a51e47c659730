"""What every CLI command shares: backend options, error reporting, the event loop."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from coheara.errors import CohearaError
from coheara.settings import Settings, load_settings

T = TypeVar("T")

err_console = Console(stderr=True, highlight=False)

BackendOption = Annotated[
    str | None,
    typer.Option(
        "--backend",
        "-b",
        help="ollama, openai, transformers or auto (default: COHEARA_BACKEND, else auto).",
        show_default=False,
    ),
]
ModelOption = Annotated[
    str | None,
    typer.Option(
        "--model", "-m", help="Model id (Ollama/OpenAI) or weights folder (Transformers)."
    ),
]
UrlOption = Annotated[
    str | None,
    typer.Option(
        "--url", help="Server URL for the ollama or openai backend (OLLAMA_HOST honoured)."
    ),
]


def settings_for(backend: str | None, **overrides: Any) -> Settings:
    if backend is not None and backend not in ("auto", "ollama", "openai", "transformers"):
        fail(
            CohearaError(f"unknown backend {backend!r}: use ollama, openai, transformers or auto"),
            code=2,
        )
    return load_settings(backend=backend, **overrides)


def fail(error: CohearaError, *, code: int | None = None) -> None:
    """One line on stderr and the documented exit code; never a traceback."""
    err_console.print(f"[bold red]error:[/] {error}", markup=True, soft_wrap=True)
    raise typer.Exit(code if code is not None else error.exit_code)


def run(main: Callable[[], Awaitable[T]]) -> T:
    try:
        return asyncio.run(main())  # type: ignore[arg-type]
    except CohearaError as error:
        fail(error)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        raise typer.Exit(130) from None
    raise AssertionError("unreachable")


def guarded(function: Callable[[], T]) -> T:
    """Run synchronous CLI work with the same error contract as `run`."""
    try:
        return function()
    except CohearaError as error:
        fail(error)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        raise typer.Exit(130) from None
    raise AssertionError("unreachable")


def write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
