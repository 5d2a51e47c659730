"""`coheara ask`: modes 1, 2 and 3 from the terminal, streaming by default."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from coheara.cli.common import (
    BackendOption,
    ModelOption,
    UrlOption,
    err_console,
    settings_for,
    write,
)
from coheara.engine import Engine, ExtractionResult, GenerationResult
from coheara.errors import InvalidRequestError
from coheara.imaging.prepare import Prepared, is_series, prepare


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
    backend: BackendOption = None,
    model: ModelOption = None,
    url: UrlOption = None,
) -> None:
    """Ask the model: text, text with images, or (with --schema) a validated JSON object."""

    async def main() -> None:
        settings = settings_for(backend)
        loaded_schema = _load_schema(schema) if schema else None
        volume: Prepared | None = None
        if image and is_series(image):
            # Decoding a series takes a while: off the event loop.
            volume = await asyncio.to_thread(prepare, list(image))
        async with Engine.from_config(model=model, url=url, settings=settings) as engine:
            result: GenerationResult | None = None
            streamed = False
            async for chunk in engine.stream(
                None if volume else prompt,
                system=system,
                images=() if volume else (image or ()),
                messages=volume.messages(prompt) if volume else None,
                schema=loaded_schema,
                max_tokens=max_tokens,
            ):
                if chunk.result is not None:
                    result = chunk.result
                elif not as_json and loaded_schema is None:
                    write(chunk.text)
                    streamed = True
            assert result is not None
            if volume is not None and volume.warnings:
                result = result.model_copy(
                    update={"warnings": [*volume.warnings, *result.warnings]}
                )
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
