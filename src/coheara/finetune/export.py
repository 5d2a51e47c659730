"""An adapter out of the registry: a LoRA folder for vLLM, or a merged checkpoint.

vLLM serves LoRA adapters per request by model name (`--enable-lora --lora-modules
NAME=DIR`). It reads a PEFT folder (adapter_config.json, adapter_model.safetensors),
applies LoRA to the language model of a multimodal model only, and supports neither
DoRA, nor biases, nor fully trained modules (`modules_to_save`). The export checks all of
that, so an adapter vLLM would serve differently from the Transformers backend is
refused here rather than half-applied there.

Ollama cannot apply a Gemma 3 LoRA adapter, but imports a safetensors checkpoint: the
merged export folds the adapter into the base weights (in float32, saved in the base's
own dtype unless asked otherwise) beside the base's processor files, ready for
`coheara model setup --from DIR`.
"""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coheara.adapters import (
    AdapterRecord,
    base_fingerprint,
    make_private,
    model_folder,
    private_folder,
    vision_markers,
)
from coheara.errors import ConfigurationError, InvalidRequestError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
RECORD_FILE = "coheara_adapter.json"
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The values vLLM's --max-lora-rank accepts."""


@dataclass(frozen=True)
class Exported:
    folder: Path
    files: list[str]
    next_step: str
    """The command that serves or imports it."""


def _empty_target(out: Path) -> Path:
    """A new or empty folder, this user's only (an adapter may have memorized drafts)."""
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InvalidRequestError(
            f"{out} exists and is not an empty folder", hint="give a new or empty folder"
        )
    private_folder(out)
    out.chmod(0o700)
    return out


def _adapter_files(record: AdapterRecord) -> tuple[dict[str, Any], Path]:
    folder = Path(record.path)
    try:
        config = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise ConfigurationError(
            f"adapter {record.name!r}: cannot read {folder / ADAPTER_CONFIG}",
            hint="restore its folder, or train it again",
        ) from None
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise ConfigurationError(
            f"adapter {record.name!r}: {weights} is missing",
            hint="restore its folder, or train it again",
        )
    return config, weights


def vllm_problems(config: dict[str, Any], tensor_names: list[str]) -> list[str]:
    """Why vLLM would not serve this PEFT adapter as the Transformers backend does."""
    problems = []
    if str(config.get("peft_type", "")).upper() != "LORA":
        problems.append(f"peft_type {config.get('peft_type')!r} is not LORA")
    if config.get("use_dora"):
        problems.append("DoRA is not supported by vLLM")
    if config.get("bias", "none") != "none":
        problems.append("LoRA biases are not supported by vLLM")
    if config.get("modules_to_save"):
        problems.append(f"fully trained modules {config['modules_to_save']} (modules_to_save)")
    targets = config.get("target_modules") or []
    text = targets if isinstance(targets, str) else " ".join(map(str, targets))
    vision = sorted(set(vision_markers(text)) | _vision_tensors(tensor_names))
    if vision:
        problems.append(
            "LoRA on the vision tower or projector ("
            + ", ".join(m.rstrip(".") for m in vision)
            + "): vLLM applies LoRA to the language model only"
        )
    return problems


def _vision_tensors(names: list[str]) -> set[str]:
    return {m for name in names for m in vision_markers(name)}


def _tensor_names(weights: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(weights), framework="np") as handle:
        return list(handle.keys())


def vllm_rank(rank: int) -> int:
    return next((r for r in VLLM_RANKS if r >= rank), VLLM_RANKS[-1])


def export_vllm(record: AdapterRecord, out: Path) -> Exported:
    """The PEFT folder vLLM loads, naming the base it was trained on."""
    config, weights = _adapter_files(record)
    problems = vllm_problems(config, _tensor_names(weights))
    if problems:
        raise InvalidRequestError(
            f"adapter {record.name!r} cannot be served by vLLM: " + "; ".join(problems),
            hint="train it with coheara finetune's defaults (the language model's layers)",
        )
    out = _empty_target(out)
    config["base_model_name_or_path"] = record.base_model
    config["inference_mode"] = True
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    shutil.copyfile(weights, out / ADAPTER_WEIGHTS)
    _write_record(out, record, "vllm")
    make_private(out)
    rank = int(config.get("r", record.lora.rank))
    return Exported(
        out,
        [ADAPTER_CONFIG, ADAPTER_WEIGHTS, RECORD_FILE],
        f"vllm serve {record.base_model} --enable-lora --lora-modules {record.name}={out} "
        f"--max-lora-rank {vllm_rank(rank)}",
    )


def _write_record(out: Path, record: AdapterRecord, kind: str) -> None:
    body = {**record.to_dict(), "export": kind}
    (out / RECORD_FILE).write_text(json.dumps(body, indent=2) + "\n", encoding="utf-8")


def _base_folder(record: AdapterRecord) -> Path:
    folder = model_folder(record.base_model)
    if folder is None:
        raise ConfigurationError(
            f"adapter {record.name!r}: its base model {record.base_model} is not here",
            hint="restore the base model's folder (or cache) it was trained on",
        )
    if base_fingerprint(folder) != record.base_fingerprint:
        raise ConfigurationError(
            f"adapter {record.name!r}: the model at {record.base_model} is no longer the one it "
            "was trained on (its fingerprint differs)",
            hint="restore that base model, or train the adapter again",
        )
    return folder


def _stored_dtype(folder: Path) -> str:
    """The dtype the base checkpoint is stored in (bfloat16 for MedGemma), by its config."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "bfloat16"
    name = str(config.get("dtype") or config.get("torch_dtype") or "bfloat16")
    return "float32" if name == "float32" else "bfloat16"


def export_merged(record: AdapterRecord, out: Path, dtype: str = "auto") -> Exported:
    """The base with the adapter folded in, as a full checkpoint (for Ollama's import)."""
    from coheara.finetune.train import require_extra

    require_extra()
    import torch
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from transformers.utils import logging as hf_logging

    from coheara.dev.tiny_model import MARKER_FILE

    base_folder = _base_folder(record)
    _adapter_files(record)
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    if dtype != "auto" and dtype not in dtypes:
        raise InvalidRequestError(f"unknown dtype {dtype!r}", hint="auto, bfloat16 or float32")
    out = _empty_target(out)
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        base = AutoModelForImageTextToText.from_pretrained(
            str(base_folder), dtype=torch.float32, local_files_only=True
        )
        stored = dtypes[_stored_dtype(base_folder) if dtype == "auto" else dtype]
        with warnings.catch_warnings():  # PEFT asks transformers 5 a deprecated name
            warnings.simplefilter("ignore", FutureWarning)
            merged = PeftModel.from_pretrained(base, record.path).merge_and_unload()
        merged.to(stored)
        merged.save_pretrained(str(out))
        AutoProcessor.from_pretrained(str(base_folder), local_files_only=True).save_pretrained(
            str(out)
        )
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    if (base_folder / MARKER_FILE).is_file():  # still the random test model: say so
        shutil.copyfile(base_folder / MARKER_FILE, out / MARKER_FILE)
    _write_record(out, record, "merged")
    make_private(out)
    return Exported(
        out,
        sorted(p.name for p in out.iterdir()),
        f"coheara model setup --from {out} --name coheara-{record.name.lower()}",
    )
