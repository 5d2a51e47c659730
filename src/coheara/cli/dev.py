"""`coheara dev ...`: tools for developers and for checking an install without weights."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from coheara.cli.common import err_console
from coheara.errors import ConfigurationError

dev_app = typer.Typer(help="Developer tools.", no_args_is_help=True)


@dev_app.command("tiny-model")
def tiny_model(
    directory: Annotated[Path, typer.Argument(help="Folder to write the checkpoint to.")],
) -> None:
    """Write the tiny random-weight MedGemma-architecture checkpoint (for tests, no weights)."""

    def build() -> Path:
        try:
            from coheara.dev.tiny_model import build_tiny_model
        except ImportError:
            raise ConfigurationError(
                "the tiny model needs the optional dependencies",
                hint="pip install 'coheara[transformers]'",
            ) from None
        return build_tiny_model(directory)

    path = build()
    err_console.print(f"tiny model written to {path}", markup=False)
