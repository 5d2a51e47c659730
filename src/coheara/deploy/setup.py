"""Getting a runtime ready without surprises (`coheara model setup`).

Ollama: a Modelfile that pins the window Coheara sends anyway (`num_ctx`, never changed
behind the user's back), the `<end_of_turn>` stop and greedy decoding, from an Ollama
tag, a GGUF file or a safetensors folder (quantized by `ollama create --quantize`); the
chat template is left to Ollama, which recognises Gemma 3's from the weights. The commands
are run when the `ollama` command is present and printed otherwise.

Transformers: a local weights folder is checked file by file; a hub id is looked up in
the Hugging Face cache; nothing is downloaded unless asked.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from coheara import model_facts
from coheara.errors import InvalidRequestError, ModelNotFoundError

SourceKind = Literal["tag", "gguf", "safetensors"]
QUANTIZE = ("q8_0", "q4_K_M")
ARCHITECTURE = "Gemma3ForConditionalGeneration"


@dataclass(frozen=True)
class OllamaPlan:
    name: str
    source: str
    kind: SourceKind
    modelfile: str
    commands: list[list[str]]


def source_kind(source: str) -> SourceKind:
    path = Path(source).expanduser()
    if path.is_dir():
        return "safetensors"
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise InvalidRequestError(
                f"{path.name} is neither a GGUF file nor a weights folder",
                hint="give an Ollama tag, a .gguf file or a safetensors folder",
            )
        return "gguf"
    if source.startswith((".", "/", "~")) or source.lower().endswith(".gguf"):
        raise InvalidRequestError(f"{source} does not exist")
    return "tag"


def modelfile(source: str, kind: SourceKind, num_ctx: int) -> str:
    """The Modelfile: MedGemma's stop, greedy decoding, and the deployment's window."""
    origin = str(Path(source).expanduser().resolve()) if kind != "tag" else source
    return "\n".join(
        [
            "# Written by `coheara model setup`: MedGemma 1.5 4B for clinical drafting.",
            f"FROM {origin}",
            "# The window Coheara sends on every call (COHEARA_NUM_CTX); keep them equal.",
            f"PARAMETER num_ctx {num_ctx}",
            'PARAMETER stop "<end_of_turn>"',
            "# Greedy: the same input gives the same draft.",
            "PARAMETER temperature 0",
            "",
        ]
    )


def ollama_plan(
    name: str, source: str, num_ctx: int, modelfile_path: Path, quantize: str | None
) -> OllamaPlan:
    kind = source_kind(source)
    if quantize is not None and quantize not in QUANTIZE:
        raise InvalidRequestError(f"unknown quantization {quantize}", hint=" or ".join(QUANTIZE))
    if quantize is not None and kind != "safetensors":
        raise InvalidRequestError(
            "--quantize applies to a safetensors folder only",
            hint="a tag or a GGUF file is already quantized",
        )
    if kind == "safetensors":
        missing = weights_problems(Path(source).expanduser())
        if missing:
            raise ModelNotFoundError(f"{source} is not a complete MedGemma folder: {missing[0]}")
    commands: list[list[str]] = []
    if kind == "tag":
        commands.append(["ollama", "pull", source])
    create = ["ollama", "create", name, "-f", str(modelfile_path)]
    if quantize:
        create += ["--quantize", quantize]
    commands.append(create)
    return OllamaPlan(name, source, kind, modelfile(source, kind, num_ctx), commands)


def ollama_command() -> str | None:
    return shutil.which("ollama")


def weights_problems(folder: Path) -> list[str]:
    """What a Transformers weights folder lacks to load as MedGemma (empty when complete)."""
    problems: list[str] = []
    config_file = folder / "config.json"
    if not config_file.is_file():
        return [f"no config.json in {folder}"]
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return ["config.json does not parse"]
    if ARCHITECTURE not in (config.get("architectures") or []):
        problems.append(f"config.json names {config.get('architectures')}, not {ARCHITECTURE}")
    text_config = config.get("text_config") or {}
    dtype = config.get("torch_dtype") or config.get("dtype") or text_config.get("torch_dtype")
    if dtype == "float16":
        problems.append("weights saved as float16: Gemma 3 gives empty or NaN output in float16")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError):
            shards = set()
            problems.append("model.safetensors.index.json does not parse")
        absent = sorted(s for s in shards if not (folder / s).is_file())
        if absent:
            problems.append(f"{len(absent)} weight shard(s) missing, e.g. {absent[0]}")
    elif not any(folder.glob("*.safetensors")):
        problems.append("no .safetensors weights")
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        problems.append("no tokenizer (tokenizer.json or tokenizer.model)")
    if not any(
        (folder / f).is_file() for f in ("preprocessor_config.json", "processor_config.json")
    ):
        problems.append("no image processor config (preprocessor_config.json)")
    return problems


def cached_hub_folder(model_id: str, cache_dir: Path | None = None) -> Path | None:
    """The hub id's folder in the Hugging Face cache, without touching the network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(model_id, local_files_only=True, cache_dir=cache_dir))
    except (LocalEntryNotFoundError, ValueError, OSError):
        return None


def download(model_id: str, cache_dir: Path | None = None) -> Path:
    """Explicitly asked for: fetch the weights into the Hugging Face cache."""
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model_id, cache_dir=cache_dir))


DEFAULT_HUB_ID = model_facts.DEFAULT_HF_MODEL
