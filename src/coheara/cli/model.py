"""`coheara model setup`: a runtime ready for MedGemma, without surprises."""

from __future__ import annotations

import asyncio
import shlex
import subprocess
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from coheara.cli.common import err_console, settings_for, write
from coheara.deploy import setup
from coheara.errors import BackendError, ModelNotFoundError, UnsupportedCapabilityError
from coheara.settings import Settings

model_app = typer.Typer(help="Get a runtime ready for the model.", no_args_is_help=True)


@model_app.command("setup")
def setup_command(
    runtime: Annotated[
        str, typer.Option(help="ollama (a Modelfile and `ollama create`) or transformers.")
    ] = "ollama",
    source: Annotated[
        str | None,
        typer.Option(
            "--from",
            help="Ollama: a tag, a .gguf file or a safetensors folder (default: the configured "
            "Ollama model). Transformers: a weights folder or a hub id (default: the configured "
            "folder, else google/medgemma-1.5-4b-it).",
        ),
    ] = None,
    name: Annotated[str, typer.Option(help="The Ollama model to create.")] = "coheara-medgemma",
    quantize: Annotated[
        str | None, typer.Option(help="q8_0 or q4_K_M, for a safetensors folder.")
    ] = None,
    out: Annotated[Path, typer.Option(help="Where to write the Modelfile.")] = Path("Modelfile"),
    images: Annotated[
        bool, typer.Option("--images/--text-only", help="Whether the model must read images.")
    ] = True,
    dry_run: Annotated[
        bool, typer.Option(help="Write the Modelfile and print the commands only.")
    ] = False,
    download: Annotated[
        bool, typer.Option(help="Transformers: download a hub id missing from the cache.")
    ] = False,
) -> None:
    """Write what the runtime needs, run it where possible, and check the result."""
    settings = settings_for(None)
    if runtime == "transformers":
        _transformers(source or settings.transformers_model or setup.DEFAULT_HUB_ID, download)
        return
    if runtime != "ollama":
        raise typer.BadParameter("ollama or transformers", param_hint="--runtime")
    plan = setup.ollama_plan(name, source or settings.ollama_model, settings.num_ctx, out, quantize)
    out.write_text(plan.modelfile)
    err_console.print(f"wrote {escape(str(out))} (num_ctx {settings.num_ctx})", markup=False)
    lines = [shlex.join(command) for command in plan.commands]
    executable = setup.ollama_command()
    if dry_run or executable is None:
        if executable is None and not dry_run:
            err_console.print("the ollama command is not on PATH: run these where it is:")
        write("\n".join(lines) + "\n")
        return
    for command in plan.commands:
        err_console.print(f"$ {shlex.join(command)}", markup=False)
        done = subprocess.run([executable, *command[1:]], check=False)
        if done.returncode != 0:
            raise BackendError(
                f"`{shlex.join(command)}` failed with exit code {done.returncode}",
                hint="see Ollama's message above",
            )
    _check_ollama(settings, name, images)


def _check_ollama(settings: Settings, name: str, images: bool) -> None:
    from coheara.backends.selection import create_backend

    async def capabilities() -> tuple[bool, int]:
        backend = create_backend(settings.model_copy(update={"backend": "ollama"}), model=name)
        try:
            caps = await backend.capabilities()
        finally:
            await backend.aclose()
        return caps.vision, caps.context_length

    vision, trained = asyncio.run(capabilities())
    if images and not vision:
        raise UnsupportedCapabilityError(
            f"{name} was created but Ollama lists it without vision: images would fail",
            hint="build it from a vision-capable source (a safetensors folder, or the tag "
            "ktiyab/coheara-medgemma-4b-q8), or pass --text-only",
        )
    err_console.print(
        f"{name} is ready (vision {'yes' if vision else 'no'}, trained context {trained}): "
        f"set COHEARA_OLLAMA_MODEL={name}",
        markup=False,
    )


def _transformers(source: str, download: bool) -> None:
    folder = Path(source).expanduser()
    if not folder.is_dir():
        cached = setup.cached_hub_folder(source)
        if cached is None and not download:
            raise ModelNotFoundError(
                f"{source} is neither a folder nor in the Hugging Face cache",
                hint="pass --download to fetch it (about 8.6 GB), or copy the folder here",
            )
        folder = cached or setup.download(source)
    problems = setup.weights_problems(folder)
    if problems:
        raise ModelNotFoundError(f"{folder} is not ready: " + "; ".join(problems))
    err_console.print(
        f"{folder} is a complete MedGemma checkpoint: set COHEARA_TRANSFORMERS_MODEL={folder}",
        markup=False,
    )
