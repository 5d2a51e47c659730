"""`coheara tasks` lists the clinical tasks; `coheara run TASK` runs one as a checked draft."""

from __future__ import annotations

import asyncio
import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from coheara.cli.audit import audited
from coheara.cli.common import (
    BackendOption,
    ModelOption,
    UrlOption,
    err_console,
    settings_for,
    write,
)
from coheara.engine import Engine
from coheara.errors import InvalidRequestError
from coheara.tasks import TaskRequest, TaskResponse, all_tasks, get_task, run_task


class Format(StrEnum):
    json = "json"
    text = "text"
    fhir = "fhir"


def tasks(
    task: Annotated[
        str | None, typer.Argument(help="A task id: print its input and output JSON Schemas.")
    ] = None,
) -> None:
    """List the clinical tasks (id, version, mode, latency target), or show one's schemas."""
    if task is not None:
        write(json.dumps(get_task(task).describe(), indent=2) + "\n")
        return
    table = Table(title="clinical tasks (every output is a draft for a clinician)")
    for column in ("id", "title", "version", "mode", "target"):
        table.add_column(column)
    for spec in all_tasks().values():
        target = f"{spec.latency_target_ms} ms" if spec.latency_target_ms else "best effort"
        table.add_row(*(escape(v) for v in (spec.id, spec.title, spec.version, spec.mode, target)))
    Console().print(table)


def read_request(path: Path) -> dict[str, Any]:
    """A task request file: the body of `POST /v1/tasks/{id}`, or just its `input` object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InvalidRequestError("input file not found", hint="check the path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(f"cannot read the input file: {exc}") from None
    except json.JSONDecodeError as exc:
        raise InvalidRequestError(
            f"the input file is not JSON: {exc.msg} at line {exc.lineno}"
        ) from None
    if not isinstance(data, dict):
        raise InvalidRequestError("the input file must hold a JSON object")
    return data if "input" in data else {"input": data}


def render_text(response: TaskResponse) -> str:
    """The draft for a person: each element with its cited sources and what was flagged."""
    status: dict[str, str] = {link.element: link.status for link in response.trace}
    lines = [f"{response.task_id} draft (for clinician review)", ""]
    for section, value in response.draft.items():
        lines.append(section.replace("_", " ").upper())
        lines.extend(_render(value, section, status, "  "))
        lines.append("")
    if response.gaps:
        lines.append("GAPS")
        lines += [f"  - {gap.kind}: {gap.detail}" for gap in response.gaps]
        lines.append("")
    if response.validation.findings:
        lines.append("CHECKS")
        lines += [
            f"  - {f.severity} {f.rule}{f' at {f.element}' if f.element else ''}: {f.message}"
            for f in response.validation.findings
        ]
        lines.append("")
    return "\n".join(lines)


def _render(value: Any, path: str, status: dict[str, str], indent: str) -> list[str]:
    if isinstance(value, dict):
        text = value.get("text")
        if isinstance(text, str) and ("sources" in value or "quote" in value):
            cited = ",".join(value.get("sources") or []) or "no source"
            mark = status.get(path, "")
            flag = f" ({mark})" if mark and mark != "verified" else ""
            return [f"{indent}- {text} [{cited}]{flag}"]
        out: list[str] = []
        for key, inner in value.items():
            if key in ("sources", "quote"):
                continue
            inner_lines = _render(inner, f"{path}.{key}", status, indent + "  ")
            if inner_lines:
                out.append(f"{indent}{key.replace('_', ' ')}:")
                out += inner_lines
        return out
    if isinstance(value, list):
        out = []
        for index, inner in enumerate(value):
            out += _render(inner, f"{path}[{index}]", status, indent)
        return out
    if value is None or value == "":
        return []
    return [f"{indent}{value}"]


def run(
    task: Annotated[str, typer.Argument(help="Task id (SLM-01 ... SLM-06, IMG-..., EXT-...).")],
    input_file: Annotated[
        Path,
        typer.Option(
            "--input", "-i", help="JSON: a task request (as in examples/) or just its input."
        ),
    ],
    image: Annotated[
        list[Path] | None,
        typer.Option("--image", help="Image file or series folder for an imaging task."),
    ] = None,
    output: Annotated[
        Format, typer.Option("--format", "-f", help="json (the whole response), text, fhir.")
    ] = Format.json,
    max_tokens: Annotated[int | None, typer.Option("--max-tokens")] = None,
    backend: BackendOption = None,
    model: ModelOption = None,
    url: UrlOption = None,
) -> None:
    """Run a clinical task on an input file: a checked, traceable draft for a clinician."""
    spec = get_task(task)
    body = read_request(input_file)
    if output is Format.fhir:
        if spec.to_fhir is None:
            raise InvalidRequestError(f"{spec.id} has no FHIR form", hint="use --format json")
        body["fhir"] = True
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    request = TaskRequest.model_validate(body) if "input" in body else None

    async def main() -> TaskResponse:
        settings = settings_for(backend)
        with audited(settings, backend=settings.backend, model=model) as audit:
            async with Engine.from_config(model=model, url=url, settings=settings) as engine:
                if audit is not None:
                    audit.attach(engine)
                return await run_task(engine, request or body, task=spec, images=list(image or ()))

    response = asyncio.run(main())
    if output is Format.fhir:
        write(json.dumps(response.fhir, indent=2, ensure_ascii=False) + "\n")
    elif output is Format.text:
        write(render_text(response) + "\n")
    else:
        write(response.model_dump_json(indent=2) + "\n")
    meta = response.metadata
    err_console.print(
        escape(
            f"{response.task_id} v{meta.task_version} prompt {meta.prompt_hash} | "
            f"{meta.backend}:{meta.model} | {meta.strategy} | {meta.processing_ms:.0f} ms"
            + (f" (target {meta.latency_target_ms} ms)" if meta.latency_target_ms else "")
            + f" | {len(response.gaps)} gap(s), {len(response.validation.findings)} finding(s)"
        ),
        soft_wrap=True,
    )
