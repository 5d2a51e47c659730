"""`coheara finetune` (LoRA/QLoRA on one task) and `coheara adapters` (the registry).

    coheara finetune SLM-05 --data plain.jsonl --base ./medgemma --name plain-v1
    coheara adapters list | show NAME | export NAME --format vllm --out DIR
                     | remove NAME | attach-metrics NAME RUN/report.json

Training data is a gold set (`coheara.evaluation.gold`): each case's request and its
accepted draft (`expected.draft`). The adapter is saved in the adapters folder
(COHEARA_ADAPTERS_DIR) unless --out says otherwise, and registered by name; a request
then names it (`"adapter": NAME` in a task request) to run with it on the Transformers
backend.
"""

from __future__ import annotations

import json
import shlex
import shutil
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from coheara.adapters import (
    AdapterRecord,
    AdapterRegistry,
    LoraSettings,
    base_fingerprint,
    check_name,
    model_folder,
    now,
    private_folder,
)
from coheara.cli.common import err_console, write
from coheara.errors import InvalidRequestError, ModelNotFoundError
from coheara.settings import load_settings

adapters_app = typer.Typer(
    help="LoRA adapters made by `coheara finetune`: list, show, export (vLLM, merged), "
    "remove, attach eval metrics.",
    no_args_is_help=True,
)


def _registry() -> AdapterRegistry:
    return AdapterRegistry(load_settings().adapters_dir)


def finetune_command(
    task: Annotated[str, typer.Argument(help="The task (role) to train, e.g. SLM-05.")],
    data: Annotated[
        Path, typer.Option("--data", help="Training cases: gold-set JSONL with expected.draft.")
    ],
    base: Annotated[
        str, typer.Option("--base", help="The base model: a weights folder (or a cached hub id).")
    ],
    name: Annotated[str, typer.Option("--name", help="The adapter's name in the registry.")],
    steps: Annotated[
        int | None, typer.Option("--steps", min=1, help="Optimizer steps (instead of --epochs).")
    ] = None,
    epochs: Annotated[
        float | None, typer.Option("--epochs", min=0.01, help="Passes over the data (default 1).")
    ] = None,
    lr: Annotated[float, typer.Option("--lr", min=0.0, help="Learning rate.")] = 2e-4,
    rank: Annotated[int, typer.Option("--rank", min=1, help="LoRA rank r.")] = 16,
    alpha: Annotated[int, typer.Option("--alpha", min=1, help="LoRA alpha.")] = 16,
    dropout: Annotated[float, typer.Option("--dropout", min=0.0, max=0.9)] = 0.05,
    qlora: Annotated[
        bool, typer.Option("--qlora", help="4-bit NF4 base (bitsandbytes, CUDA only).")
    ] = False,
    out: Annotated[
        Path | None, typer.Option("--out", help="Adapter folder (default: the adapters folder).")
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 4,
    accumulate: Annotated[
        int, typer.Option("--accumulate", min=1, help="Gradient accumulation steps.")
    ] = 4,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    device: Annotated[str, typer.Option("--device", help="auto, cuda or cpu.")] = "auto",
    replace: Annotated[
        bool, typer.Option("--replace", help="Replace a registered adapter of that name.")
    ] = False,
) -> None:
    """Train a LoRA adapter for one task on accepted drafts, and register it."""
    from coheara.evaluation.gold import load
    from coheara.finetune import train as training
    from coheara.tasks.registry import get_task

    settings = load_settings()
    registry = AdapterRegistry(settings.adapters_dir)
    check_name(name)
    existing = registry.find(name)
    if existing is not None and not replace:
        raise InvalidRequestError(
            f"an adapter named {name!r} is registered already",
            hint="choose another --name, or pass --replace",
        )
    if steps is not None and epochs is not None:
        raise InvalidRequestError("give --steps or --epochs, not both")
    spec = get_task(task)
    training.require_extra()
    if qlora:
        training.check_qlora()
    base_folder = model_folder(base)
    if base_folder is None:
        raise ModelNotFoundError(
            f"base model {base} is not a local folder nor a cached hub id",
            hint="download it first (hf download ... --local-dir DIR) and pass --base DIR",
        )
    target = (out or registry.default_folder(name)).expanduser().resolve()
    _check_target(registry, name, existing, target, replace)

    from coheara.backends.transformers_backend import TransformersBackend
    from coheara.finetune.data import build_training_set

    gold = load(data)
    backend = TransformersBackend(str(base_folder), device="cpu")
    training_set = build_training_set(gold.cases, spec.id, backend, settings)
    tokens = sum(len(e.input_ids) for e in training_set.examples)
    err_console.print(
        f"{len(training_set.examples)} case(s) of {spec.id} ({tokens} tokens)"
        + (f", {len(training_set.skipped)} left out" if training_set.skipped else ""),
        soft_wrap=True,
    )
    config = training.TrainConfig(
        lora=LoraSettings(rank=rank, alpha=alpha, dropout=dropout),
        steps=steps,
        epochs=epochs if epochs is not None else 1.0,
        learning_rate=lr,
        batch_size=batch_size,
        accumulation=accumulate,
        qlora=qlora,
        seed=seed,
        device=device,
    )
    # Trained into a fresh hidden 0700 folder beside the target (a name no adapter can
    # have, so no other adapter's folder), which then replaces it.
    private_folder(target.parent)
    partial = Path(
        tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial")
    )

    def progress(step: int, loss: float) -> None:
        err_console.print(f"step {step}{f'/{steps}' if steps else ''}: loss {loss:.4f}")

    try:
        result = training.train(
            base_folder, training_set.examples, partial, config, progress=progress
        )
        if target.exists():  # checked again: another run may have registered since
            _check_target(registry, name, registry.find(name), target, replace)
            shutil.rmtree(target)
        partial.rename(target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    record = AdapterRecord(
        name=name,
        task=spec.id,
        base_model=str(base_folder) if Path(base).expanduser().is_dir() else base,
        base_fingerprint=base_fingerprint(base_folder),
        data_file=str(Path(data).resolve()),
        data_sha256=gold.sha256,
        cases=len(training_set.examples),
        lora=LoraSettings(
            rank=rank, alpha=alpha, dropout=dropout, target_modules=result.target_modules
        ),
        qlora=qlora,
        steps=result.steps,
        epochs=round(result.epochs, 4),
        learning_rate=lr,
        first_loss=result.first_loss,
        final_loss=result.final_loss,
        created=now(),
        path=str(target),
        extra={
            "device": result.device,
            "dtype": result.dtype,
            "batch_size": batch_size,
            "accumulation": accumulate,
            "seed": seed,
            "trainable_parameters": result.trainable_parameters,
            "train_seconds": round(result.seconds, 1),
        },
    )
    registry.add(record, overwrite=replace)
    write(
        f"adapter {record.name} for {record.task}: {record.steps} steps, loss "
        f"{_loss(record.first_loss)} -> {_loss(record.final_loss)}, "
        f"{result.trainable_parameters:,} trainable parameters, saved in {record.path}\n"
    )
    err_console.print(escape(next_step(record.task, base, record.name)), soft_wrap=True)


def next_step(task: str, base: str, name: str) -> str:
    """What to run after training: `coheara eval` on a held-out gold set of the task, base
    and adapter in one run, then keep its metrics in the registry."""
    return (
        f"next: coheara eval GOLD.jsonl --task {task} --backend transformers "
        f"--model {shlex.quote(base)} --adapter {name}, then "
        f"coheara adapters attach-metrics {name} RUN/report.json"
    )


def _check_target(
    registry: AdapterRegistry,
    name: str,
    existing: AdapterRecord | None,
    target: Path,
    replace: bool,
) -> None:
    """Refuse a target folder that holds anything but this adapter's own files: a folder
    that is not empty may be replaced (--replace) only when it is the one registered for
    this name, or this name's default folder, and no other adapter's files are in it."""
    if not target.exists():
        return
    if not target.is_dir():
        raise InvalidRequestError(f"{target} exists and is not a folder", hint="give a new --out")
    if not any(target.iterdir()):
        return
    if not replace:
        raise InvalidRequestError(
            f"{target} exists and is not empty", hint="give a new --out folder"
        )
    own = {registry.default_folder(name).resolve()}
    if existing is not None:
        own.add(Path(existing.path).expanduser().resolve())
    others = [
        record.name
        for record in registry.records()
        if record.name.lower() != name.lower() and _overlaps(Path(record.path), target)
    ]
    home = registry.folder.expanduser().resolve()
    if target == home or target in home.parents:
        whose = "it holds the adapter registry"
    elif others:
        whose = f"it holds adapter {others[0]!r}"
    elif target not in own:
        whose = f"it is not {name!r}'s folder"
    else:
        return
    raise InvalidRequestError(
        f"--replace will not delete {target}: {whose}",
        hint="give a new or empty --out folder, or leave --out out",
    )


def _overlaps(path: Path, target: Path) -> bool:
    """Whether deleting `target` would delete anything of `path` (or the reverse)."""
    path = path.expanduser().resolve()
    return path == target or target in path.parents or path in target.parents


def _loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


@adapters_app.command("list")
def list_adapters(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON array on stdout.")] = False,
) -> None:
    """Every registered adapter: name, task, cases, steps, final loss, base, created."""
    records = _registry().records()
    if as_json:
        write(json.dumps([r.to_dict() for r in records], indent=2) + "\n")
        return
    if not records:
        err_console.print("no adapters: train one with `coheara finetune`")
        return
    table = Table(box=None, header_style="bold")
    for column in ("name", "task", "cases", "steps", "final loss", "metrics", "base", "created"):
        table.add_column(column)
    for r in records:
        table.add_row(
            escape(r.name),
            r.task,
            str(r.cases),
            str(r.steps),
            _loss(r.final_loss),
            "attached" if r.metrics else "-",
            escape(r.base_model),
            r.created,
        )
    Console(highlight=False, width=200).print(table)


@adapters_app.command()
def show(name: Annotated[str, typer.Argument(help="The adapter's name.")]) -> None:
    """One adapter's record as JSON: data hash, base fingerprint, LoRA settings, metrics."""
    write(json.dumps(_registry().get(name).to_dict(), indent=2) + "\n")


@adapters_app.command()
def export(
    name: Annotated[str, typer.Argument(help="The adapter's name.")],
    fmt: Annotated[
        str,
        typer.Option("--format", help="vllm (a LoRA folder) or merged (a full checkpoint)."),
    ],
    out: Annotated[Path, typer.Option("--out", help="A new or empty folder.")],
    dtype: Annotated[
        str, typer.Option(help="merged: auto (the base's), bfloat16 or float32.")
    ] = "auto",
) -> None:
    """Export for vLLM's LoRA serving, or merged into the base for Ollama's import."""
    from coheara.finetune.export import export_merged, export_vllm

    record = _registry().get(name)
    if fmt == "vllm":
        done = export_vllm(record, out)
    elif fmt == "merged":
        done = export_merged(record, out, dtype)
    else:
        raise InvalidRequestError(f"unknown export format {fmt!r}", hint="vllm or merged")
    write(f"exported {record.name} ({fmt}) to {done.folder}: {', '.join(done.files)}\n")
    err_console.print(f"next: {escape(done.next_step)}", soft_wrap=True)


@adapters_app.command()
def remove(
    name: Annotated[str, typer.Argument(help="The adapter's name.")],
    keep_files: Annotated[
        bool, typer.Option("--keep-files", help="Keep its folder; only unregister it.")
    ] = False,
) -> None:
    """Unregister an adapter, and delete its folder when the registry made it."""
    registry = _registry()
    record = registry.remove(name)
    folder = Path(record.path)
    if not keep_files and registry.manages(record) and folder.is_dir():
        shutil.rmtree(folder)
        err_console.print(f"removed adapter {escape(record.name)} and {escape(str(folder))}")
    else:
        err_console.print(
            f"removed adapter {escape(record.name)} from the registry; its files stay in "
            f"{escape(str(folder))}",
            soft_wrap=True,
        )


@adapters_app.command("attach-metrics")
def attach_metrics(
    name: Annotated[str, typer.Argument(help="The adapter's name.")],
    report: Annotated[Path, typer.Argument(help="A `coheara eval` run folder or its report.json.")],
) -> None:
    """Keep the adapter's metrics (and the base's, same run) from a `coheara eval` report."""
    registry = _registry()
    record = registry.get(name)
    metrics = metrics_from_report(record, report)
    registry.update(record.name, metrics=metrics)
    shown = ", ".join(
        f"{k} {v:.3f}" for k, v in list(metrics["adapter"].items())[:6] if isinstance(v, float)
    )
    write(f"attached metrics of run {metrics['run']} to {record.name}: {shown or '(none)'}\n")


def metrics_from_report(record: AdapterRecord, path: Path) -> dict[str, Any]:
    """The adapter's variant of the report, for its task, beside the base's."""
    from coheara.evaluation.report import load as load_report

    report = load_report(Path(path))
    summary = report.get("summary") or {}
    variant = f"adapter:{record.name}"
    tasks = summary.get(variant)
    if not isinstance(tasks, dict):
        raise InvalidRequestError(
            f"the report has no run of adapter {record.name!r}",
            hint=f"run `coheara eval ... --adapter {record.name}` and attach that report",
        )
    if record.task not in tasks:
        raise InvalidRequestError(
            f"the report has no {record.task} cases for adapter {record.name!r}",
            hint=f"evaluate it on a gold set of {record.task}",
        )
    base = summary.get("base")
    return {
        "report": str(Path(path).resolve()),
        "run": report.get("run"),
        "generated": report.get("generated"),
        "task": record.task,
        "adapter": tasks[record.task],
        "base": base.get(record.task) if isinstance(base, dict) else None,
        "attached": now(),
    }
