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
    """Read and check a gold set; a bad line is one error naming its line, never its text."""
    from coheara.tasks.registry import get_task

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
        if len(line) > MAX_LINE_BYTES:
            raise InvalidRequestError(f"{file.name} line {number}: longer than 8 MiB")
        try:
            case = GoldCase.model_validate(json.loads(line))
        except json.JSONDecodeError as exc:
            raise InvalidRequestError(
                f"{file.name} line {number}: not JSON ({exc.msg} at column {exc.colno})"
            ) from None
        except ValidationError as exc:
            first = exc.errors(include_input=False, include_url=False)[0]
            where = ".".join(str(p) for p in first["loc"]) or "(line)"
            raise InvalidRequestError(
                f"{file.name} line {number}: {where}: {first['msg']}"
            ) from None
        if case.id in seen:
            raise InvalidRequestError(f"{file.name} line {number}: case id {case.id} repeated")
        seen.add(case.id)
        try:
            case.task = get_task(case.task).id
        except InvalidRequestError:
            raise InvalidRequestError(
                f"{file.name} line {number}: unknown task '{case.task[:32]}'",
                hint="coheara tasks lists them",
            ) from None
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


def shipped(task: str | None = None) -> list[Path]:
    """The project's synthetic gold sets (all, or one task's), one file a task."""
    folder = resources.files("coheara.evaluation") / "gold"
    files = sorted(Path(str(entry)) for entry in folder.iterdir() if entry.name.endswith(".jsonl"))
    if task is None:
        return files
    from coheara.tasks.registry import get_task

    wanted = get_task(task).id.lower()
    return [f for f in files if f.stem == wanted]
