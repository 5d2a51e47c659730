"""`coheara ask`: modes 1, 2 and 3 from the terminal, streaming by default."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from coheara.audit import AuditLog
from coheara.cli.audit import audited
from coheara.cli.common import (
    BackendOption,
    ModelOption,
    UrlOption,
    err_console,
    parse_window,
    settings_for,
    write,
)
from coheara.engine import Engine, ExtractionResult, GenerationResult
from coheara.errors import InvalidRequestError
from coheara.imaging.limits import ImageLimits
from coheara.imaging.prepare import Prepared, prepare, prepare_pair
from coheara.settings import Settings


def _load_schema(path: Path) -> dict[str, Any]:
    try:
        schema = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InvalidRequestError(f"schema file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(f"cannot read schema file {path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise InvalidRequestError(
            f"schema file {path} is not JSON: {exc.msg} at line {exc.lineno}"
        ) from None
    if not isinstance(schema, dict):
        raise InvalidRequestError(f"schema file {path} must hold a JSON object")
    return schema


def _prepared(
    images: list[Path],
    prior: Path | None,
    preset: str | None,
    window: str | None,
    modality: str | None,
    tiles: bool,
    image_limits: ImageLimits,
) -> Prepared | None:
    if prior is not None:
        if len(images) != 1:
            raise InvalidRequestError("--prior goes with exactly one --image (the current study)")
        return prepare_pair(
            images[0], prior, preset=preset, window=parse_window(window), image_limits=image_limits
        )
    if not images:
        if preset or window or modality or tiles:
            raise InvalidRequestError("--preset, --window, --modality and --tiles need an --image")
        return None
    if tiles and len(images) != 1:
        raise InvalidRequestError("--tiles goes with one --image (a slide picture)")
    return prepare(
        images[0] if tiles else images,
        tiles=tiles,
        modality=modality,
        preset=preset,
        window=parse_window(window),
        image_limits=image_limits,
    )


def evidence_line(result: GenerationResult) -> str:
    ttft = f"{result.time_to_first_token_s:.2f}s" if result.time_to_first_token_s else "-"
    rate = f"{result.tokens_per_s:.1f} tok/s" if result.tokens_per_s else "-"
    exact = "" if result.prompt_tokens_exact else "~"
    line = (
        f"{result.backend}:{result.model} | {result.finish_reason} | prompt {exact}"
        f"{result.prompt_tokens} tok, output {result.output_tokens} tok | first token {ttft}"
        f" | total {result.total_s:.2f}s | {rate}"
    )
    if result.attempts > 1:
        line += f" | {result.attempts} attempts"
    return line


def ask(
    prompt: Annotated[str, typer.Argument(help="The question or instruction.")],
    system: Annotated[str | None, typer.Option("--system", "-s", help="System text.")] = None,
    image: Annotated[
        list[Path] | None,
        typer.Option(
            "--image",
            "-i",
            help="Image file (repeatable): PNG, JPEG, DICOM, ...; a folder or several DICOM "
            "files of one CT or MR series make a volume (ordered, sampled, SLICE n labels).",
        ),
    ] = None,
    schema: Annotated[
        Path | None, typer.Option("--schema", help="JSON Schema file: structured extraction.")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the whole result with its evidence as JSON.")
    ] = False,
    max_tokens: Annotated[
        int | None, typer.Option("--max-tokens", help="Output limit (at most 8192).")
    ] = None,
    prior: Annotated[
        Path | None,
        typer.Option(
            "--prior",
            help="The prior study of the one --image (a radiograph): sent as a labelled "
            "PRIOR / CURRENT pair for a longitudinal comparison.",
        ),
    ] = None,
    preset: Annotated[
        str | None,
        typer.Option(
            "--preset", help="CT window preset for DICOM: lung, mediastinum, bone, brain, liver."
        ),
    ] = None,
    window: Annotated[
        str | None,
        typer.Option("--window", help="Custom DICOM window as CENTER,WIDTH (HU for CT)."),
    ] = None,
    modality: Annotated[
        str | None, typer.Option("--modality", help="Force the CT or MR recipe on DICOM.")
    ] = None,
    header_field: Annotated[
        list[str] | None,
        typer.Option(
            "--header-field",
            help="A DICOM code to show the model (repeatable): modality, body_part, "
            "view_position. None by default: only pixels reach the model.",
        ),
    ] = None,
    tiles: Annotated[
        bool,
        typer.Option(
            "--tiles",
            help="Cut the one --image (a pathology slide picture) into 896x896 tissue patches.",
        ),
    ] = False,
    backend: BackendOption = None,
    model: ModelOption = None,
    url: UrlOption = None,
) -> None:
    """Ask the model: text, text with images, or (with --schema) a validated JSON object."""

    async def main() -> None:
        settings = settings_for(backend)
        with audited(settings, backend=settings.backend, model=model) as audit:
            await answer(settings, audit)

    async def answer(settings: Settings, audit: AuditLog | None) -> None:
        loaded_schema = _load_schema(schema) if schema else None
        # Decoding a series or a large scan takes a while: off the event loop.
        prepared = await asyncio.to_thread(
            _prepared,
            image or [],
            prior,
            preset,
            window,
            modality,
            tiles,
            settings.image_limits(),
        )
        async with Engine.from_config(model=model, url=url, settings=settings) as engine:
            if audit is not None:
                audit.attach(engine)
            result: GenerationResult | None = None
            streamed = False
            async for chunk in engine.stream(
                None if prepared else prompt,
                system=system,
                messages=prepared.messages(prompt, header_fields=header_field or ())
                if prepared
                else None,
                schema=loaded_schema,
                max_tokens=max_tokens,
            ):
                if chunk.result is not None:
                    result = chunk.result
                elif not as_json and loaded_schema is None:
                    write(chunk.text)
                    streamed = True
            assert result is not None
            if as_json:
                write(result.model_dump_json(indent=2) + "\n")
            elif isinstance(result, ExtractionResult):
                value = result.value
                data = value.model_dump() if hasattr(value, "model_dump") else value
                write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
            elif streamed:
                write("\n")
            if not as_json:
                for warning in result.warnings:
                    err_console.print(f"[yellow]warning:[/] {escape(warning)}", soft_wrap=True)
                err_console.print(f"[dim]{escape(evidence_line(result))}[/]", soft_wrap=True)

    asyncio.run(main())
