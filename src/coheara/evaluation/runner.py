"""Running gold sets through the task layer, resumably: a run is a folder.

    RUN/manifest.json   what was run: gold sets (and their sha256), variants, backend, model,
                        each task's prompt version and hash
    RUN/results.jsonl   one record a case and variant, appended and flushed as each ends

A rerun with the same folder reads the records, drops a last line cut short by a kill,
and runs only what is missing, so nothing is lost and nothing is counted twice. The
records hold the drafts (for regrading and comparison): the folder is private (0700, files
0600), and a site's own gold sets make it as sensitive as the sets themselves.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from coheara.engine import Engine
from coheara.engine.engine import CallRecord
from coheara.errors import CohearaError, InvalidRequestError
from coheara.evaluation import compliance, quality
from coheara.evaluation.gold import GoldCase, GoldSet
from coheara.private_files import write_atomic

MANIFEST = "manifest.json"
RESULTS = "results.jsonl"
FORMAT = 1


@dataclass(frozen=True)
class Variant:
    """One arm of a run: the base model, or the base with a registered LoRA adapter."""

    name: str
    adapter: str | None = None

    @classmethod
    def for_adapter(cls, adapter: str) -> Variant:
        return cls(f"adapter:{adapter}", adapter)


BASE = Variant("base")


@dataclass(frozen=True)
class Job:
    gold: GoldSet
    case: GoldCase
    variant: Variant

    @property
    def key(self) -> tuple[str, str]:
        return (self.variant.name, self.case.id)


def manifest_for(
    golds: list[GoldSet], variants: list[Variant], backend: str, model: str
) -> dict[str, Any]:
    from coheara.tasks.registry import get_task

    tasks = sorted({case.task for gold in golds for case in gold.cases})
    return {
        "format": FORMAT,
        "gold_sets": [
            {"file": Path(g.path).name, "sha256": g.sha256, "cases": len(g.cases)} for g in golds
        ],
        "variants": [asdict(v) for v in variants],
        "backend": backend,
        "model": model,
        "prompts": {
            task: {"version": get_task(task).version, "prompt_hash": get_task(task).prompt_hash}
            for task in tasks
        },
    }


def _identity(manifest: dict[str, Any]) -> dict[str, Any]:
    """What must match for a folder to be resumed (not the times or counters)."""
    return {k: manifest[k] for k in ("format", "gold_sets", "variants", "backend", "model")}


def default_folder(manifest: dict[str, Any]) -> Path:
    """The same gold sets, variants, backend and model give the same folder: a rerun of
    the same command resumes."""
    digest = hashlib.sha256(json.dumps(_identity(manifest), sort_keys=True).encode()).hexdigest()
    return Path("coheara-eval") / digest[:12]


def read_records(folder: Path) -> list[dict[str, Any]]:
    """The complete records of a run; a torn last line (a killed run) is cut off the file."""
    path = folder / RESULTS
    if not path.exists():
        return []
    data = path.read_bytes()
    records: list[dict[str, Any]] = []
    good = 0
    for line in data.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
        good += len(line)
    if good < len(data):
        with path.open("r+b") as handle:
            handle.truncate(good)
    return records


def open_folder(folder: Path, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """Create the run folder, or check that it holds this same run; its records so far."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(folder, 0o700)
    path = folder / MANIFEST
    if path.exists():
        try:
            earlier = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            raise InvalidRequestError(f"{path} is not a run manifest") from None
        if _identity(earlier) != _identity(manifest):
            raise InvalidRequestError(
                f"{folder} holds another run (other gold sets, variants, backend or model)",
                hint="give a new --out folder, or remove that one",
            )
        if earlier.get("prompts") != manifest["prompts"]:
            raise InvalidRequestError(
                f"{folder} was run with other prompt versions: its results cannot be mixed",
                hint="give a new --out folder for the new prompts",
            )
        manifest = {**earlier, **manifest, "started": earlier.get("started")}
    else:
        manifest = {**manifest, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_atomic(path, (json.dumps(manifest, indent=2) + "\n").encode("utf-8"))
    return read_records(folder)


def jobs(golds: list[GoldSet], variants: list[Variant]) -> Iterator[Job]:
    for variant in variants:
        for gold in golds:
            for case in gold.cases:
                yield Job(gold, case, variant)


async def run(
    engine: Engine,
    golds: list[GoldSet],
    variants: list[Variant],
    folder: Path,
    *,
    progress: Callable[[Job, dict[str, Any] | None], None] | None = None,
) -> list[dict[str, Any]]:
    """Every case of every gold set under every variant, skipping what the folder holds;
    all the run's records, earlier ones included."""
    capabilities = await engine.capabilities()
    manifest = manifest_for(golds, variants, capabilities.backend, capabilities.model)
    records = open_folder(folder, manifest)
    done = {(r["variant"], r["case"]) for r in records}
    calls: list[CallRecord] = []
    engine.observers.append(calls.append)
    try:
        descriptor = os.open(folder / RESULTS, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(descriptor, "a", encoding="utf-8") as out:
            for job in jobs(golds, variants):
                if job.key in done:
                    if progress is not None:
                        progress(job, None)
                    continue
                calls.clear()
                record = await _run_one(engine, job, calls)
                out.write(json.dumps(record, separators=(",", ":")) + "\n")
                out.flush()
                os.fsync(out.fileno())
                records.append(record)
                done.add(job.key)
                if progress is not None:
                    progress(job, record)
    finally:
        engine.observers.remove(calls.append)
    return records


async def _run_one(engine: Engine, job: Job, calls: list[CallRecord]) -> dict[str, Any]:
    from coheara.tasks.runner import run_task

    case = job.case
    request = {**case.request, "request_id": f"eval-{case.id}"[:128]}
    if job.variant.adapter is not None:
        request["adapter"] = job.variant.adapter
    status, error, response = "ok", None, None
    try:
        result = await run_task(engine, request, task=case.task, images=job.gold.image_paths(case))
        response = result.model_dump(mode="json")
    except CohearaError as exc:
        # A plain InvalidRequestError is the task refusing its input (a typed refusal);
        # its subclasses (an image, the window, a missing capability) are failures.
        status = "refused" if type(exc) is InvalidRequestError else "error"
        error = {"code": exc.code, "message": str(exc)[:300]}
    degenerate = any(
        call.result is not None and call.result.finish_reason == "degenerate" for call in calls
    ) or bool(error and "repeat" in error["message"])
    return {
        "case": case.id,
        "task": case.task,
        "variant": job.variant.name,
        "tags": case.tags,
        "status": status,
        "error": error,
        "response": response,
        "degenerate": degenerate,
        "quality": quality.score(case, response),
        "compliance": compliance.score(case, status, response, degenerate=degenerate),
    }
