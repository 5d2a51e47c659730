"""What every CLI command shares: backend options and error reporting.

Commands let `CohearaError` propagate: `coheara.cli.main.main` reports it as one
line with its exit code, whichever command raised it.
"""

from __future__ import annotations

import sys
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

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


def report(error: CohearaError) -> None:
    """The one line a user sees; the text is printed as is, never read as markup."""
    err_console.print(f"[bold red]error:[/] {escape(str(error))}", soft_wrap=True)


def fail(error: CohearaError, *, code: int | None = None) -> NoReturn:
    """Inside a command: report, then exit with the documented code."""
    report(error)
    raise typer.Exit(code if code is not None else error.exit_code)


def write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
