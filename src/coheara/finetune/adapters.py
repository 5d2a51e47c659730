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
folder, then `os.replace`, under an exclusive lock. It holds no patient data. This module
imports nothing heavy: the backend and the CLI read it without peft or torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import struct
from dataclasses import asdict, dataclass, field, replace
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
    def from_dict(cls, row: dict[str, Any]) -> AdapterRecord:
        lora = LoraSettings(**row["lora"])
        return cls(**{**row, "lora": lora})


class AdapterRegistry:
    """The registry in `folder` (it need not exist: no file, no adapters)."""

    def __init__(self, folder: Path | str) -> None:
        self.folder = Path(folder).expanduser()
        self.path = self.folder / REGISTRY_FILE

    # ----- reading --------------------------------------------------------------------

    def records(self) -> list[AdapterRecord]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise ConfigurationError(
                f"cannot read the adapter registry {self.path}: {exc.strerror}"
            ) from None
        try:
            document = json.loads(raw)
            return [AdapterRecord.from_dict(row) for row in document["adapters"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigurationError(
                f"the adapter registry {self.path} is not valid ({type(exc).__name__})",
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
        return exclusive(
            self.folder / (REGISTRY_FILE + ".lock"),
            what=f"the adapter registry in {self.folder}",
            hint="set COHEARA_ADAPTERS_DIR to a writable place",
        )


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
