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

import contextlib
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
from coheara.errors import (
    AuthenticationError,
    BackendUnavailableError,
    CohearaError,
    ConfigurationError,
    InvalidRequestError,
    ModelNotFoundError,
    PermissionDeniedError,
    ServerBusyError,
    TaskRefusedError,
)
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
    task: str | None = None
    """An adapter learned one task: its variant runs only that task's cases."""

    @classmethod
    def for_adapter(cls, adapter: str, task: str) -> Variant:
        return cls(f"adapter:{adapter}", adapter, task)


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


RECORD_KEYS = ("case", "task", "variant", "status", "quality", "compliance")


def read_records(folder: Path, *, repair: bool = False) -> list[dict[str, Any]]:
    """The complete records of a run, each (variant, case) once. A last line cut short by a
    kill is skipped, and cut off the file only by the writer (`repair`); a damaged line
    anywhere else is an error, never silently dropped."""
    path = folder / RESULTS
    if not path.exists():
        return []
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidRequestError(f"cannot read {path}: {exc.strerror}") from None
    lines = data.splitlines(keepends=True)
    records: dict[tuple[str, str], dict[str, Any]] = {}
    good = 0
    for number, line in enumerate(lines, start=1):
        record = _record(line)
        if record is None:
            if number == len(lines):  # torn by a kill: the case runs again
                break
            raise InvalidRequestError(
                f"{path} line {number} is damaged", hint="restore the file or start a new run"
            )
        records.setdefault((record["variant"], record["case"]), record)
        good += len(line)
    if repair and good < len(data):
        with path.open("r+b") as handle:
            handle.truncate(good)
    return list(records.values())


def _record(line: bytes) -> dict[str, Any] | None:
    if not line.endswith(b"\n"):
        return None
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):
        return None
    if not isinstance(record, dict):
        return None
    for key in RECORD_KEYS:
        kind = dict if key in ("quality", "compliance") else str
        if not isinstance(record.get(key), kind):
            return None
    return record


def read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        raise InvalidRequestError(f"{path} is not a run manifest") from None
    keys = ("format", "gold_sets", "variants", "backend", "model")
    if not isinstance(manifest, dict) or not all(key in manifest for key in keys):
        raise InvalidRequestError(f"{path} is not a run manifest")
    return manifest


def open_folder(folder: Path, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """Create the run folder (0700), or check that it holds this same run; its records."""
    path = folder / MANIFEST
    if path.exists():
        earlier = read_manifest(path)
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
    return read_records(folder, repair=True)


def jobs(golds: list[GoldSet], variants: list[Variant]) -> Iterator[Job]:
    """Every case under every variant; an adapter's variant only on its own task's cases."""
    for variant in variants:
        for gold in golds:
            for case in gold.cases:
                if variant.task is None or case.task == variant.task:
                    yield Job(gold, case, variant)


def check_ids(golds: list[GoldSet]) -> None:
    """Records are keyed by case id: an id in two gold sets would run once."""
    where: dict[str, str] = {}
    for gold in golds:
        name = Path(gold.path).name
        for case in gold.cases:
            if case.id in where:
                raise InvalidRequestError(
                    f"case id {case.id} is in both {where[case.id]} and {name}",
                    hint="case ids must be unique across the gold sets of one run",
                )
            where[case.id] = name


async def run(
    engine: Engine,
    golds: list[GoldSet],
    variants: list[Variant],
    folder: Path,
    *,
    progress: Callable[[Job, dict[str, Any] | None], None] | None = None,
) -> list[dict[str, Any]]:
    """Every case of every gold set under every variant, skipping what the folder holds;
    all the run's records, earlier ones included. One run writes a folder at a time. A
    backend that is down, missing its model or misconfigured stops the run (nothing is
    recorded for it: the rerun resumes there); what a case itself causes is recorded."""
    check_ids(golds)
    capabilities = await engine.capabilities()
    manifest = manifest_for(golds, variants, capabilities.backend, capabilities.model)
    with _sole_writer(folder):
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


LOCK = ".lock"


@contextlib.contextmanager
def _sole_writer(folder: Path) -> Iterator[None]:
    """A run folder to write: a new one (0700), or one that holds a run, never any other
    folder; and one run at a time (two would count cases twice: the second is refused)."""
    if folder.exists():
        if not folder.is_dir():
            raise InvalidRequestError(f"{folder} is not a folder")
        if not (folder / MANIFEST).exists() and any(folder.iterdir()):
            raise InvalidRequestError(
                f"{folder} is not empty and holds no run", hint="give a new --out folder"
            )
    else:
        folder.mkdir(parents=True, mode=0o700)
        os.chmod(folder, 0o700)
    fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InvalidRequestError(
                f"another coheara eval is writing to {folder}",
                hint="wait for it, or give another --out folder",
            ) from None
        yield
    finally:
        os.close(fd)


STOPS_THE_RUN = (
    BackendUnavailableError,
    ModelNotFoundError,
    ConfigurationError,
    AuthenticationError,
    PermissionDeniedError,
    ServerBusyError,
)
"""Failures of the deployment, not of a case: recording them would make a resume skip the
cases they hit."""


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
    except STOPS_THE_RUN:
        raise
    except CohearaError as exc:
        status = "refused" if isinstance(exc, TaskRefusedError) else "error"
        error = {"code": exc.code, "message": str(exc)[:300]}
    degenerate = any(
        call.result is not None and call.result.finish_reason == "degenerate" for call in calls
    ) or bool(error and "repeat" in error["message"])
    record: dict[str, Any] = {
        "case": case.id,
        "task": case.task,
        "variant": job.variant.name,
        "tags": case.tags,
        "status": status,
        "error": error,
        "response": response,
        "degenerate": degenerate,
    }
    try:
        record["quality"] = quality.score(case, response)
        record["compliance"] = compliance.score(case, status, response, degenerate=degenerate)
    except CohearaError:
        raise  # e.g. rouge-score missing: a setup problem, for the whole run
    except Exception as exc:  # a gold case the metrics cannot read: this case, not the run
        record.update(
            status="error",
            error={"code": "scoring_error", "message": f"scoring failed: {type(exc).__name__}"},
            quality={"values": {}, "counts": {}, "fields": {}},
            compliance={},
        )
    return record
