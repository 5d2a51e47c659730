"""Gold sets: one JSON object a line, a task request with what a good draft must hold.

    {"id": "slm02-003", "task": "SLM-02", "tags": {"age_band": "60-79", "sex": "female"},
     "request": {"input": {...}, "context": {...}},
     "expected": {"codes": ["I50.23", "E11.65"], "missing": []}}

`request` is the task envelope (`coheara run --input`), less what a run fills in. Images
for an imaging task are files named relative to the gold set's own folder (`images`).
`expected` says only what applies to the case; each key feeds its metrics
(`coheara.evaluation.quality`). The same format is the training data of `coheara finetune`
(with `expected.draft`, the accepted draft).
"""

from __future__ import annotations

import hashlib
import json
import re
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from coheara.errors import InvalidRequestError

MAX_CASES = 100_000
MAX_LINE_BYTES = 8 * 1024 * 1024


class AlertExpectation(BaseModel):
    """SLM-04: what the draft must keep of the alert."""

    model_config = ConfigDict(extra="forbid")

    severity: Literal["informational", "advisory", "urgent", "critical"] | None = None
    recommendation: Literal["present", "log", "escalate"] | None = None
    critical: bool = Field(
        default=False,
        description="A critical alert (or a hard constraint): the draft must neither "
        "downgrade it below urgent nor recommend only logging it.",
    )


class Expected(BaseModel):
    """What a good draft holds. Every key is optional; metrics use the ones present."""

    model_config = ConfigDict(extra="forbid")

    fields: dict[str, str | int | float | bool | None] | None = Field(
        default=None,
        description="Extraction (EXT-EHR: field name or dotted path; EXT-LAB: test name) -> "
        "value. Numbers and units are compared as numbers ('7.20 mmol/L' = '7.2 mmol/l').",
    )
    codes: list[str] | None = Field(
        default=None, description="SLM-02: the codes a coder would keep."
    )
    reference: str | None = Field(
        default=None, description="A reference draft in words: ROUGE-L against the draft's text."
    )
    sections: list[str] | None = Field(
        default=None, description="Sections (SLM-01) or draft keys (SLM-03) that must be filled."
    )
    grade_target: float | None = Field(
        default=None, description="SLM-05: the reading grade to meet (default: the input's)."
    )
    alert: AlertExpectation | None = None
    criteria: dict[str, Literal["met", "partial", "gap"]] | None = Field(
        default=None, description="SLM-06: criterion id -> status."
    )
    missing: list[str] | None = Field(
        default=None,
        description="What the input lacks; non-empty: the draft must flag a gap (gap honesty).",
    )
    refuse: bool = Field(
        default=False, description="The task must refuse this request (a typed refusal, no draft)."
    )
    draft: dict[str, Any] | None = Field(
        default=None, description="An accepted draft: the training target of `coheara finetune`."
    )


class GoldCase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:\-]+$")
    task: str = Field(min_length=1, max_length=32)
    request: dict[str, Any]
    expected: Expected = Field(default_factory=lambda: Expected())
    tags: dict[str, str] = Field(default_factory=dict)
    images: list[str] = Field(default_factory=list, max_length=256)


class GoldSet(BaseModel):
    path: str
    sha256: str
    cases: list[GoldCase]
    folder: Path

    def image_paths(self, case: GoldCase) -> list[Path]:
        """A case's images, kept inside the gold set's folder."""
        root = self.folder.resolve()
        paths = []
        for name in case.images:
            path = (root / name).resolve()
            if not path.is_relative_to(root):
                raise InvalidRequestError(f"{case.id}: image path leaves the gold set's folder")
            paths.append(path)
        return paths


def load(path: str | Path) -> GoldSet:
    """Read and check a gold set: each line's shape, its request against its task's input
    model, its images inside the set's folder. A bad line is one error naming its line
    and the fields at fault, never their text."""
    file = Path(path)
    try:
        raw = file.read_bytes()
    except OSError as exc:
        raise InvalidRequestError(
            f"cannot read gold set {file.name}: {exc.strerror or type(exc).__name__}"
        ) from None
    cases: list[GoldCase] = []
    seen: set[str] = set()
    for number, line in enumerate(raw.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith(b"//"):
            continue
        where = f"{file.name} line {number}"
        if len(line) > MAX_LINE_BYTES:
            raise InvalidRequestError(f"{where}: longer than 8 MiB")
        try:
            case = GoldCase.model_validate(json.loads(line))
        except json.JSONDecodeError as exc:
            raise InvalidRequestError(
                f"{where}: not JSON ({exc.msg} at column {exc.colno})"
            ) from None
        except (ValueError, RecursionError) as exc:
            if isinstance(exc, ValidationError):
                first = exc.errors(include_input=False, include_url=False)[0]
                raise InvalidRequestError(
                    f"{where}: "
                    f"{_location(first['loc'], unknown_key=first['type'] == 'extra_forbidden')}: "
                    f"{first['msg']}"
                ) from None
            raise InvalidRequestError(f"{where}: not UTF-8 JSON, or nested too deep") from None
        if case.id in seen:
            raise InvalidRequestError(f"{where}: case id {case.id} repeated")
        seen.add(case.id)
        _check_case(case, where, file.parent)
        cases.append(case)
        if len(cases) > MAX_CASES:
            raise InvalidRequestError(f"{file.name}: more than {MAX_CASES} cases")
    if not cases:
        raise InvalidRequestError(f"gold set {file.name} has no cases")
    return GoldSet(
        path=str(file),
        sha256=hashlib.sha256(raw).hexdigest(),
        cases=cases,
        folder=file.parent,
    )


_FIELDS = {*GoldCase.model_fields, *Expected.model_fields, *AlertExpectation.model_fields}


_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,31}$")


def _location(loc: tuple[int | str, ...], *, unknown_key: bool = False) -> str:
    """A pydantic error's place, with the keys of free-form maps (tags, fields, criteria:
    possibly clinical words) replaced by `[key]`; a misspelt field name (`cods`) is shown."""
    parts = [str(p) if isinstance(p, int) or p in _FIELDS else "[key]" for p in loc]
    last = loc[-1] if loc else None
    if unknown_key and isinstance(last, str) and _IDENTIFIER.match(last):
        parts[-1] = last
    return ".".join(parts) or "(line)"


def _check_case(case: GoldCase, where: str, folder: Path) -> None:
    """The task exists, the request is a valid envelope for it (a refusal by the task's
    policy is allowed: it may be what the case tests), the images stay in the folder."""
    from coheara.errors import TaskRefusedError
    from coheara.tasks.envelope import TaskRequest
    from coheara.tasks.registry import get_task
    from coheara.tasks.runner import validate_input

    try:
        spec = get_task(case.task)
    except InvalidRequestError:
        raise InvalidRequestError(
            f"{where}: unknown task '{case.task[:32]}'", hint="coheara tasks lists them"
        ) from None
    case.task = spec.id
    try:
        request = TaskRequest.model_validate({**case.request, "request_id": "gold"})
    except ValidationError as exc:
        first = exc.errors(include_input=False, include_url=False)[0]
        place = ".".join(str(p) for p in first["loc"])
        raise InvalidRequestError(f"{where}: request.{place}: {first['msg']}") from None
    try:
        validate_input(spec, request.input)
    except TaskRefusedError:
        pass
    except InvalidRequestError as exc:
        raise InvalidRequestError(f"{where}: {exc.message}") from None
    root = folder.resolve()
    for name in case.images:
        image = (root / name).resolve()
        if not image.is_relative_to(root):
            raise InvalidRequestError(f"{where}: an image path leaves the gold set's folder")
        if not image.is_file():
            raise InvalidRequestError(f"{where}: image {Path(name).name} not found")


def shipped(task: str | None = None) -> list[Path]:
    """The project's synthetic gold sets (all, or one task's), one file a task."""
    folder = resources.files("coheara.evaluation") / "gold"
    files = sorted(Path(str(entry)) for entry in folder.iterdir() if entry.name.endswith(".jsonl"))
    if task is None:
        return files
    from coheara.tasks.registry import get_task

    wanted = get_task(task).id.lower()
    return [f for f in files if f.stem == wanted]
