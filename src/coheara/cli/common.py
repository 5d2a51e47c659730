"""What every CLI command shares: backend options and error reporting.

Commands let `CohearaError` propagate: `coheara.cli.main.main` reports it as one
line with its exit code, whichever command raised it.
"""

from __future__ import annotations

import math
import sys
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from coheara.errors import CohearaError, ImageError
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


def parse_window(text: str | None) -> tuple[float, float] | None:
    """`C,W` in modality units (HU for CT) into (center, width); None stays None."""
    if text is None:
        return None
    parts = [part.strip() for part in text.split(",")]
    try:
        if len(parts) != 2:
            raise ValueError
        center, width = float(parts[0]), float(parts[1])
    except ValueError:
        raise ImageError("--window must be CENTER,WIDTH, e.g. 40,400") from None
    if not (math.isfinite(center) and math.isfinite(width)) or width <= 0:
        raise ImageError("--window needs a finite center and a positive width")
    return center, width
