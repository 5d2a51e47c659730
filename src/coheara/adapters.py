"""The adapter registry: what each LoRA adapter is for, what it was trained on and from.

`registry.json` in the adapters folder (`COHEARA_ADAPTERS_DIR`, default `adapters/` in
the user data directory) holds one record an adapter: its name, the task it learned,
the base model (as given, and a fingerprint), the training data's sha256 and size, the
LoRA settings, the steps and losses, where its files are, and the metrics of a
`coheara eval` run attached afterwards. The Transformers backend reads it to load an
adapter by name, and refuses one whose base fingerprint is not its model's.

The base fingerprint is the sha256 of the model's `config.json`, and of the first weights
file's safetensors header (tensor names, dtypes, shapes) and first MiB of tensor data:
two checkpoints of one architecture differ there, and reading it costs milliseconds.

The file is written as `coheara keys` writes keys.json: a 0600 temporary file in the same
folder, then `os.replace`, under an exclusive lock. It holds no patient data, but the
adapters beside it were learned from accepted drafts and may have memorized them: their
folders are 0700 and their files 0600 (`private_folder`, `make_private`).

This module sits low, beside the settings: the backend, the task layer and the CLI read
it, and it imports nothing of theirs and nothing heavy (no peft, no torch).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import struct
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from coheara.errors import ConfigurationError, InvalidRequestError
from coheara.private_files import exclusive, write_atomic

FORMAT = 1
REGISTRY_FILE = "registry.json"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
"""Also the model name vLLM serves an exported adapter under."""
FINGERPRINT_DATA_BYTES = 1 << 20
VISION_MARKERS = ("vision_tower", "multi_modal_projector", "vision_model", "visual.")
"""Module-name parts of a vision tower or projector: LoRA there is never trained (vLLM
applies LoRA to the language model of a multimodal model only) and never exported."""
MAX_NESTING = 32
"""How deep `metrics` and `extra` may nest in the registry (a report's metrics nest 3)."""
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def check_name(name: str) -> str:
    if not NAME.fullmatch(name):
        raise InvalidRequestError(
            f"invalid adapter name {name[:64]!r}",
            hint="at most 64 letters, digits, '.', '_' or '-', starting with a letter or digit",
        )
    return name


def vision_markers(text: str) -> list[str]:
    """The vision markers in `text` (target modules, or tensor names), sorted."""
    return sorted(marker for marker in VISION_MARKERS if marker in text)


@dataclass(frozen=True)
class LoraSettings:
    """The LoRA hyperparameters; defaults from Google's MedGemma fine-tuning notebook."""

    rank: int = 16
    alpha: int = 16
    dropout: float = 0.05
    target_modules: str = ""
    """The regular expression PEFT matched module names against (the language model's
    linear layers; never the vision tower, which vLLM cannot serve LoRA on)."""


@dataclass(frozen=True)
class AdapterRecord:
    name: str
    task: str
    base_model: str
    """The base as given to `coheara finetune` (a folder, resolved, or a hub id)."""
    base_fingerprint: str
    data_file: str
    data_sha256: str
    cases: int
    lora: LoraSettings
    qlora: bool
    steps: int
    epochs: float
    """Passes over the data actually made (fractional when stopped by steps)."""
    learning_rate: float
    first_loss: float | None
    final_loss: float | None
    created: str
    path: str
    """The adapter folder (adapter_config.json, adapter_model.safetensors)."""
    metrics: dict[str, Any] | None = None
    """From `coheara adapters attach-metrics`: the eval run's metrics for this task."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Training details worth keeping (device, dtype, batch, trainable parameters)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, row: Any) -> AdapterRecord:
        """A record from its JSON form, every field's type checked; ConfigurationError
        (what is wrong and where, never a value) for anything else."""
        try:
            return _record(row)
        except _Invalid as exc:
            raise ConfigurationError(f"invalid adapter record: {exc}") from None


# ----- reading a registry that may be damaged or hostile -------------------------------------


class _Invalid(Exception):
    """What makes a registry invalid, without any of its values."""


_TEXT = "a string"
_INTEGER = "an integer"
_NUMBER = "a number"
_FLAG = "a boolean"
_OBJECT = "an object"
_RECORD_KINDS: dict[str, tuple[str, bool]] = {
    "name": (_TEXT, False),
    "task": (_TEXT, False),
    "base_model": (_TEXT, False),
    "base_fingerprint": (_TEXT, False),
    "data_file": (_TEXT, False),
    "data_sha256": (_TEXT, False),
    "cases": (_INTEGER, False),
    "lora": (_OBJECT, False),
    "qlora": (_FLAG, False),
    "steps": (_INTEGER, False),
    "epochs": (_NUMBER, False),
    "learning_rate": (_NUMBER, False),
    "first_loss": (_NUMBER, True),
    "final_loss": (_NUMBER, True),
    "created": (_TEXT, False),
    "path": (_TEXT, False),
    "metrics": (_OBJECT, True),
    "extra": (_OBJECT, False),
}
"""Each field: its JSON kind and whether null is allowed."""
_LORA_KINDS: dict[str, tuple[str, bool]] = {
    "rank": (_INTEGER, False),
    "alpha": (_INTEGER, False),
    "dropout": (_NUMBER, False),
    "target_modules": (_TEXT, False),
}


def _record(row: Any) -> AdapterRecord:
    values = _checked(row, AdapterRecord, _RECORD_KINDS, "")
    if not NAME.fullmatch(values["name"]):
        raise _Invalid("name is not a valid adapter name")
    values["lora"] = LoraSettings(**_checked(values["lora"], LoraSettings, _LORA_KINDS, "lora."))
    return AdapterRecord(**values)


def _required(cls: type) -> set[str]:
    return {f.name for f in fields(cls) if f.default is f.default_factory is MISSING}


def _is(value: Any, kind: str) -> bool:
    if kind == _TEXT:
        return isinstance(value, str)
    if kind == _INTEGER:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == _NUMBER:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind == _FLAG:
        return isinstance(value, bool)
    return isinstance(value, dict)


def _checked(
    row: Any, cls: type, kinds: dict[str, tuple[str, bool]], prefix: str
) -> dict[str, Any]:
    """`row`'s fields for `cls`, each of its kind; `_Invalid` names the first that is not."""
    if not isinstance(row, dict):
        raise _Invalid(f"{prefix.rstrip('.') or 'the record'} is not an object")
    unknown = sorted(prefix + str(k)[:40] for k in row if k not in kinds)
    if unknown:
        raise _Invalid(f"unknown field {unknown[0]!r}")
    missing = sorted(_required(cls) - set(row))
    if missing:
        raise _Invalid(f"{prefix}{missing[0]} is missing")
    for name, value in row.items():
        kind, nullable = kinds[name]
        if value is None and nullable:
            continue
        if not _is(value, kind):
            raise _Invalid(f"{prefix}{name} is not {kind}")
        if kind == _NUMBER and not math.isfinite(value):
            raise _Invalid(f"{prefix}{name} is not a finite number")
        if kind == _OBJECT and _too_deep(value):
            raise _Invalid(f"{prefix}{name} nests deeper than {MAX_NESTING} levels")
    return dict(row)


def _too_deep(value: Any) -> bool:
    """Whether `value` nests deeper than MAX_NESTING (checked without recursion)."""
    pending: list[tuple[Any, int]] = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, dict | list):
            if depth > MAX_NESTING:
                return True
            children = item.values() if isinstance(item, dict) else item
            pending.extend((child, depth + 1) for child in children)
    return False


def _parse_registry(raw: bytes) -> list[AdapterRecord]:
    """The records of a registry file's bytes; `_Invalid` (what and where, no values) for a
    file that is not one: not UTF-8, not JSON, nested too deep, a wrong field or type."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _Invalid("it is not UTF-8") from None
    try:
        document = json.loads(text)
    except RecursionError:
        raise _Invalid("it nests too deeply") from None
    except ValueError as exc:
        line = getattr(exc, "lineno", None)
        raise _Invalid("it is not JSON" + (f" (line {line})" if line else "")) from None
    if not isinstance(document, dict) or not isinstance(document.get("adapters"), list):
        raise _Invalid("it has no list of adapters")
    if document.get("format", FORMAT) != FORMAT:
        raise _Invalid(f"its format is not {FORMAT}")
    records = []
    for index, row in enumerate(document["adapters"]):
        try:
            records.append(_record(row))
        except _Invalid as exc:
            raise _Invalid(f"adapters[{index}]: {exc}") from None
    return records


class AdapterRegistry:
    """The registry in `folder` (it need not exist: no file, no adapters)."""

    def __init__(self, folder: Path | str) -> None:
        self.folder = Path(folder).expanduser()
        self.path = self.folder / REGISTRY_FILE

    # ----- reading --------------------------------------------------------------------

    def records(self) -> list[AdapterRecord]:
        """Every record; a ConfigurationError naming the file when it is damaged."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise ConfigurationError(
                f"cannot read the adapter registry {self.path}: {exc.strerror}"
            ) from None
        try:
            return _parse_registry(raw)
        except _Invalid as exc:
            raise ConfigurationError(
                f"the adapter registry {self.path} is not valid: {exc}",
                hint="restore it, or move it away and register the adapters again",
            ) from None

    def names(self) -> list[str]:
        return [record.name for record in self.records()]

    def find(self, name: str) -> AdapterRecord | None:
        wanted = name.lower()
        return next((r for r in self.records() if r.name.lower() == wanted), None)

    def get(self, name: str) -> AdapterRecord:
        """The record, or InvalidRequestError naming the adapters there are."""
        record = self.find(name)
        if record is None:
            known = self.names()
            raise InvalidRequestError(
                f"unknown adapter {name[:64]!r}",
                hint=("registered: " + ", ".join(known))
                if known
                else "no adapter is registered: train one with `coheara finetune`",
            )
        return record

    def default_folder(self, name: str) -> Path:
        return self.folder / check_name(name)

    def manages(self, record: AdapterRecord) -> bool:
        """Whether the adapter's files are the registry's own (made in its folder)."""
        path = Path(record.path).resolve()
        return path.parent == self.folder.resolve() and path.name == record.name

    # ----- writing --------------------------------------------------------------------

    def add(self, record: AdapterRecord, *, overwrite: bool = False) -> None:
        check_name(record.name)
        with self._locked():
            records = self.records()
            taken = [r for r in records if r.name.lower() == record.name.lower()]
            if taken and not overwrite:
                raise InvalidRequestError(
                    f"an adapter named {record.name!r} is registered already",
                    hint="choose another name, or remove it first (coheara adapters remove)",
                )
            self._write([r for r in records if r not in taken] + [record])

    def update(self, name: str, **changes: Any) -> AdapterRecord:
        with self._locked():
            records = self.records()
            found = self.get(name)
            updated = replace(found, **changes)
            self._write([updated if r.name == found.name else r for r in records])
        return updated

    def remove(self, name: str) -> AdapterRecord:
        with self._locked():
            records = self.records()
            found = self.get(name)
            self._write([r for r in records if r.name != found.name])
        return found

    def _write(self, records: list[AdapterRecord]) -> None:
        document = {"format": FORMAT, "adapters": [r.to_dict() for r in records]}
        write_atomic(self.path, json.dumps(document, indent=2).encode("utf-8") + b"\n")

    def _locked(self) -> contextlib.AbstractContextManager[None]:
        """One writer at a time (two trainings finishing together must not lose one)."""
        private_folder(self.folder)
        return exclusive(
            self.folder / (REGISTRY_FILE + ".lock"),
            what=f"the adapter registry in {self.folder}",
            hint="set COHEARA_ADAPTERS_DIR to a writable place",
        )


# ----- private folders: adapters may have memorized their training drafts ----------------


def private_folder(path: Path) -> Path:
    """`path` as a folder, it and any parent it lacked created 0700 (an existing folder
    keeps its mode); ConfigurationError when it cannot be made."""
    path = Path(path).expanduser()
    missing: list[Path] = []
    probe = path
    while not probe.exists() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    try:
        for folder in reversed(missing):
            with contextlib.suppress(FileExistsError):
                folder.mkdir(mode=0o700)
                folder.chmod(0o700)  # whatever the umask
        if not path.is_dir():
            raise NotADirectoryError(20, "not a folder")
    except OSError as exc:
        raise ConfigurationError(
            f"cannot make the folder {path}: {exc.strerror}",
            hint="give a writable place (COHEARA_ADAPTERS_DIR, --out)",
        ) from None
    return path


def make_private(folder: Path) -> None:
    """`folder` and every folder in it 0700, every file in it 0600 (links left alone)."""
    folder = Path(folder)
    os.chmod(folder, 0o700)
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, 0o700)
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, 0o600)


# ----- the base model's fingerprint ------------------------------------------------------


def model_folder(model: str) -> Path | None:
    """The local folder of a model given as a folder or a cached hub id; None otherwise."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path.resolve()
    if _HUB_ID.match(model) and not path.exists():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(model, "config.json")
        except Exception:  # no hub library, a broken cache: not found
            return None
        if isinstance(cached, str):
            return Path(cached).parent
    return None


def _weights_files(folder: Path) -> list[Path]:
    for pattern in ("*.safetensors", "*.bin"):
        files = sorted(p for p in folder.glob(pattern) if not p.name.startswith("adapter_"))
        if files:
            return files
    return []


def base_fingerprint(folder: Path) -> str:
    """sha256 of config.json and of the first weights file's header and first MiB of data."""
    folder = Path(folder)
    digest = hashlib.sha256()
    try:
        digest.update(b"config.json\0" + (folder / "config.json").read_bytes())
        files = _weights_files(folder)
        if not files:
            raise ConfigurationError(
                f"model folder {folder} has no weights file (*.safetensors)",
                hint="give the folder of a complete checkpoint",
            )
        with files[0].open("rb") as handle:
            head = handle.read(8)
            header = b""
            if files[0].suffix == ".safetensors" and len(head) == 8:
                (size,) = struct.unpack("<Q", head)
                header = handle.read(min(size, 64 * 1024 * 1024))
            digest.update(b"\0weights\0" + head + header)
            digest.update(handle.read(FINGERPRINT_DATA_BYTES))
    except FileNotFoundError as exc:
        raise ConfigurationError(
            f"cannot fingerprint model {folder}: {Path(str(exc.filename)).name} is missing",
            hint="give the folder of a complete checkpoint",
        ) from None
    except OSError as exc:
        raise ConfigurationError(f"cannot read model {folder}: {exc.strerror}") from None
    return digest.hexdigest()
