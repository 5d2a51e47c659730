"""Hugging Face Transformers, in process: full-precision MedGemma with vision and grammars.

The model (`AutoModelForImageTextToText`) and its processor load lazily on
first use, off the event loop. Every generation runs on one worker thread, so
concurrent callers queue instead of corrupting each other's state (the worker
is the only user of the processor's tokenizer; prompt counting has its own
copy); the worker streams text back through a queue, and a stopping criterion
watching a `threading.Event` ends a generation promptly when its caller goes
away.
Structured output is constrained token by token with xgrammar, so even random
weights produce schema-valid JSON.

LoRA adapters: a request naming an adapter registered in the backend's adapters folder
(`GenerationOptions.adapter`, see `coheara.adapters`; the folder is given, never read from
the settings here) runs with it. Adapters load onto the one base model with
PEFT, several side by side, on first use; each generation activates its own (or disables
them all for the base). The one worker thread makes the switch safe: no generation runs
while another changes the active adapter.

dtype: bfloat16 on CUDA, float32 (or bfloat16 when asked) on CPU, never
float16: Gemma 3 gives empty or NaN output in float16.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import re
import threading
import warnings
from collections import OrderedDict
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.generation.streamers import BaseStreamer
from transformers.utils import logging as hf_logging

from coheara import model_facts
from coheara.adapters import AdapterRecord, AdapterRegistry, base_fingerprint, model_folder
from coheara.backends.base import (
    Backend,
    Capabilities,
    ChatRequest,
    FinishReason,
    Health,
    StreamEvent,
)
from coheara.dev.tiny_model import is_tiny_model
from coheara.errors import (
    BackendError,
    CohearaError,
    ConfigurationError,
    ContextOverflowError,
    InvalidRequestError,
    ModelNotFoundError,
)

DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float32": torch.float32}
_REFUSED_DTYPES = {"float16", "fp16", "half", "torch.float16"}
_GRAMMAR_CACHE_SIZE = 64
_XGRAMMAR_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")
"""xgrammar prefixes its messages with a time and a C++ source location."""
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_FOLDER_HINT = (
    "check the path; to fetch the weights run `hf download {model} --local-dir {path}` "
    "(accept the model's terms on Hugging Face first)"
)
_HUB_HINT = (
    "download it with `hf download {model} --local-dir DIR` and pass --model DIR, "
    "or let coheara fetch it with COHEARA_ALLOW_DOWNLOAD=true"
)


def _resolve_dtype_name(dtype: str) -> str:
    name = str(dtype).strip().lower().removeprefix("torch.")
    if name in _REFUSED_DTYPES:
        raise ConfigurationError(
            "float16 is refused: Gemma 3 gives empty or NaN output in float16",
            hint="use bfloat16 (GPU) or float32 (CPU), or leave the dtype on auto",
        )
    if name in ("bf16",):
        name = "bfloat16"
    if name in ("fp32", "float"):
        name = "float32"
    if name != "auto" and name not in DTYPES:
        raise ConfigurationError(
            f"unknown dtype {dtype!r} for the Transformers backend",
            hint="use auto, bfloat16 or float32",
        )
    return name


def _resolve_device(device: str) -> str:
    name = str(device).strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        return "mps" if mps is not None and mps.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigurationError(
                f"device {device!r} requested but this torch build sees no CUDA device",
                hint="set COHEARA_TRANSFORMERS_DEVICE=cpu (or auto), or install a CUDA torch build",
            )
        return name
    if name == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ConfigurationError(
                "device 'mps' requested but Metal is not available",
                hint="set COHEARA_TRANSFORMERS_DEVICE=cpu (or auto)",
            )
        return name
    if name == "cpu":
        return name
    raise ConfigurationError(
        f"unknown device {device!r} for the Transformers backend", hint="use auto, cpu, cuda or mps"
    )


def _choose_dtype(name: str, device: str) -> torch.dtype:
    """auto: bfloat16 where the hardware has it (CUDA), float32 elsewhere."""
    if name != "auto":
        return DTYPES[name]
    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def resolve(device: str, dtype: str) -> tuple[str, torch.dtype]:
    """The device and dtype a backend configured so would use (float16 refused)."""
    resolved = _resolve_device(device)
    return resolved, _choose_dtype(_resolve_dtype_name(dtype), resolved)


@dataclass(eq=False)
class _Job:
    """One generation: its queue back to the event loop and its cancellation flag."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[tuple[str, Any]] = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)
    stop_hit: bool = False

    def send(self, kind: str, payload: Any = None) -> None:
        """Hand an item to the event loop; a closed loop means the caller is gone."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (kind, payload))
        except RuntimeError:
            self.cancel.set()


class _StopOnEvent(StoppingCriteria):
    """Ends `generate` at the next token once the caller went away or a stop string matched."""

    def __init__(self, job: _Job) -> None:
        self.job = job

    def __call__(
        self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any
    ) -> Any:
        done = self.job.cancel.is_set() or self.job.stop_hit
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


class _ControlCharBan(LogitsProcessor):
    """Bans tokens holding a raw control character while a JSON grammar is active.

    xgrammar 0.2.8 compiles a string with `maxLength` to a character class that excludes
    only the quote, the backslash, CR and LF, so raw U+0000-U+001F get through (invalid
    JSON), and the engine bounds every string. Compact JSON (`any_whitespace=False`) never
    needs a raw control character, so none is allowed.
    """

    def __init__(self, decoded_vocab: list[bytes], vocab_size: int) -> None:
        banned = [i for i, token in enumerate(decoded_vocab) if any(b < 0x20 for b in token)]
        self.mask = torch.zeros(vocab_size, dtype=torch.bool)
        self.mask[banned] = True

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> Any:
        mask = self.mask.to(scores.device)
        if mask.shape[0] != scores.shape[-1]:
            return scores
        return scores.masked_fill(mask, float("-inf"))


class _DeltaStreamer(BaseStreamer):
    """Turns generated ids into text deltas, honouring stop strings, on the worker thread.

    Incremental detokenization (prefix/read offsets) emits text only once it no longer
    ends in a partial UTF-8 sequence, and holds back a tail that could be the start of a
    stop string, so neither a broken character nor a stop string ever reaches the caller.
    """

    def __init__(self, decode: Callable[[list[int]], str], job: _Job, stops: tuple[str, ...]):
        self._decode = decode
        self.job = job
        self.stops = tuple(s for s in stops if s)
        self.ids: list[int] = []
        self._prompt_seen = False
        self._prefix = 0
        self._read = 0
        self._held = ""

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        if self.job.stop_hit:
            return
        self.ids.extend(int(i) for i in value.reshape(-1).tolist())
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        new_text = self._decode(self.ids[self._prefix :])
        # A character is at most 4 byte tokens: past that the bytes are invalid for good.
        complete = not new_text.endswith("\ufffd") or len(self.ids) - self._read > 4
        if len(new_text) > len(prefix_text) and complete:
            self._emit(new_text[len(prefix_text) :])
            self._prefix, self._read = self._read, len(self.ids)

    def end(self) -> None:
        if self.job.stop_hit:
            return
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        rest = self._decode(self.ids[self._prefix :])[len(prefix_text) :]
        self._emit(rest, final=True)

    def _emit(self, delta: str, final: bool = False) -> None:
        text = self._held + delta
        self._held = ""
        if self.stops:
            hits = [at for at in (text.find(s) for s in self.stops) if at >= 0]
            if hits:
                self.job.stop_hit = True
                text = text[: min(hits)]
            elif not final:
                keep = max(
                    (
                        k
                        for s in self.stops
                        for k in range(1, min(len(s), len(text) + 1))
                        if text.endswith(s[:k])
                    ),
                    default=0,
                )
                if keep:
                    text, self._held = text[:-keep], text[-keep:]
        if text:
            self.job.send("text", text)


class TransformersBackend(Backend):
    """MedGemma (or the tiny test model) loaded in this process with Transformers."""

    name = "transformers"

    def __init__(
        self,
        model_path: str,
        *,
        device: str = "auto",
        dtype: str = "auto",
        allow_download: bool = False,
        adapters_dir: str | Path | None = None,
    ) -> None:
        self.model = str(model_path)
        self._dtype_name = _resolve_dtype_name(dtype)
        self._allow_download = allow_download
        self._load_lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._jobs: set[_Job] = set()
        self._config: Any = None
        self._processor: Any = None
        self._counter: Any = None
        self._hf_model: Any = None
        # Checked now, so a wrong device fails at configuration time, not mid-request.
        self._device = _resolve_device(device)
        self._torch_dtype = _choose_dtype(self._dtype_name, self._device)
        self._grammar_compiler: Any = None
        self._control_ban: _ControlCharBan | None = None
        self._grammars: OrderedDict[str, Any] = OrderedDict()
        self._capabilities: Capabilities | None = None
        self._adapters_dir = Path(adapters_dir) if adapters_dir is not None else None
        """The adapter registry's folder (`create_backend` passes COHEARA_ADAPTERS_DIR);
        None: no adapters, and a request naming one is refused."""
        self._loaded_adapters: dict[str, str] = {}
        """Adapter name -> the registry stamp of what was loaded under it."""
        self._fingerprint: str | None = None
        self._peft: Any = None
        """The PEFT wrapper once an adapter is loaded; its LoRA layers live in the base model."""

    @classmethod
    def from_loaded(cls, name: str, model: Any, processor: Any) -> TransformersBackend:
        """A backend over a model already in memory (the synthetic full-size model of
        `coheara bench --synthetic-full-size`): nothing is read from disk."""
        device = str(model.device)
        dtype = str(model.dtype).removeprefix("torch.")
        backend = cls(name, device="cuda" if device.startswith("cuda") else device, dtype=dtype)
        backend._device = device
        backend._config = model.config
        backend._counter = copy.deepcopy(processor.tokenizer)
        backend._processor = processor
        backend._hf_model = model.eval()
        backend._in_memory = True
        return backend

    _in_memory = False
    """Built over a model in memory: no folder, hence no fingerprint to check adapters by."""

    # ----- loading ----------------------------------------------------------------------

    def _source(self) -> tuple[str, bool]:
        """The folder (or hub id) to load and whether to stay offline."""
        path = Path(self.model).expanduser()
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise ModelNotFoundError(
                    f"model folder {path} has no config.json: it is not a Transformers checkpoint",
                    hint=_FOLDER_HINT.format(model=model_facts.DEFAULT_HF_MODEL, path=path),
                )
            return str(path), True
        if path.exists():
            raise ModelNotFoundError(
                f"model path {path} is a file: give the folder that holds config.json",
            )
        if _HUB_ID.match(self.model) and not self.model.startswith((".", "~")):
            # A hub id: from the local Hugging Face cache, or downloaded when allowed.
            return self.model, not self._allow_download
        raise ModelNotFoundError(
            f"model folder not found: {self.model}",
            hint=_FOLDER_HINT.format(model=model_facts.DEFAULT_HF_MODEL, path=path),
        )

    def _not_found(self, exc: BaseException, local_only: bool) -> CohearaError:
        if local_only and not Path(self.model).expanduser().exists():
            return ModelNotFoundError(
                f"model {self.model} is not a local folder and is not in the Hugging Face cache "
                "(downloads are off)",
                hint=_HUB_HINT.format(model=self.model),
            )
        return ModelNotFoundError(
            f"cannot load model {self.model}: {type(exc).__name__}: {str(exc)[:200]}",
            hint="check the path or hub id, and that the folder holds a complete checkpoint",
        )

    def _ensure_config(self) -> Any:
        if self._config is not None:
            return self._config
        with self._load_lock:
            if self._config is None:
                source, local_only = self._source()
                try:
                    config = AutoConfig.from_pretrained(source, local_files_only=local_only)
                except ValueError as exc:
                    raise ConfigurationError(
                        f"transformers {transformers.__version__} cannot read the model's "
                        f"config: {str(exc)[:200]}",
                        hint="upgrade transformers (pip install -U 'coheara[transformers]')",
                    ) from None
                except OSError as exc:
                    raise self._not_found(exc, local_only) from None
                self._config = config
        return self._config

    def _ensure_processor(self) -> Any:
        if self._processor is not None:
            return self._processor
        self._ensure_config()
        with self._load_lock:
            if self._processor is None:
                source, local_only = self._source()
                try:
                    processor = AutoProcessor.from_pretrained(source, local_files_only=local_only)
                except OSError as exc:
                    raise self._not_found(exc, local_only) from None
                except (ValueError, ImportError) as exc:
                    raise ConfigurationError(
                        f"cannot build the processor for {self.model}: {str(exc)[:200]}",
                        hint="check the checkpoint's processor and tokenizer files",
                    ) from None
                if getattr(processor, "chat_template", None) is None:
                    raise ConfigurationError(
                        f"model {self.model} has no chat template",
                        hint="use an instruction-tuned checkpoint (the -it model)",
                    )
                self._counter = copy.deepcopy(processor.tokenizer)
                self._processor = processor
        return self._processor

    def _ensure_model(self) -> Any:
        if self._hf_model is not None:
            return self._hf_model
        self._ensure_processor()
        with self._load_lock:
            if self._hf_model is None:
                source, local_only = self._source()
                device = self._device
                kwargs: dict[str, Any] = {
                    "dtype": self._torch_dtype,
                    "local_files_only": local_only,
                }
                if device.startswith("cuda"):
                    kwargs["device_map"] = device
                bar = hf_logging.is_progress_bar_enabled()
                hf_logging.disable_progress_bar()
                model: Any
                try:
                    model = AutoModelForImageTextToText.from_pretrained(source, **kwargs)
                    if not device.startswith("cuda"):
                        model = model.to(device)
                except torch.cuda.OutOfMemoryError:
                    raise BackendError(
                        f"out of GPU memory while loading {self.model} on {device}",
                        hint="free the GPU, or run on CPU (COHEARA_TRANSFORMERS_DEVICE=cpu)",
                    ) from None
                except OSError as exc:
                    raise self._not_found(exc, local_only) from None
                except (ValueError, ImportError, RuntimeError) as exc:
                    raise BackendError(
                        f"cannot load model {self.model}: {type(exc).__name__}: {str(exc)[:200]}",
                        hint="check that the folder holds a complete image-text-to-text checkpoint",
                    ) from None
                finally:
                    if bar:
                        hf_logging.enable_progress_bar()
                self._hf_model = model.eval()
        return self._hf_model

    def _worker(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="coheara-gen")
        return self._executor

    # ----- prompt -----------------------------------------------------------------------

    def _render(self, request: ChatRequest) -> str:
        """The Gemma prompt text, images as `<start_of_image>` placeholders before the text."""
        processor = self._ensure_processor()
        placeholder = self._image_token()
        conversation: list[dict[str, Any]] = []
        for message in request.messages:
            if message.system:
                # The chat template folds it in front of the first turn, before its images.
                conversation.append(
                    {"role": "system", "content": [{"type": "text", "text": message.system}]}
                )
            if placeholder in message.folded_text:
                raise InvalidRequestError(
                    f"a message text contains the reserved image token {placeholder}",
                    hint="pass images as images, not as their placeholder token",
                )
            # In the message's own order: images first by default, a CT volume interleaved.
            content: list[dict[str, Any]] = [
                {"type": "text", "text": part} if isinstance(part, str) else {"type": "image"}
                for part in message.ordered_parts
                if not isinstance(part, str) or part
            ]
            conversation.append({"role": message.role, "content": content})
        if not conversation:
            raise InvalidRequestError("the request has no messages")
        try:
            text = processor.apply_chat_template(
                conversation, tokenize=False, add_generation_prompt=True
            )
        except Exception as exc:  # jinja2 errors, raise_exception() in the template
            raise InvalidRequestError(
                f"the chat template rejected the conversation: {str(exc)[:200]}",
                hint="roles must alternate user/assistant and end with a user turn",
            ) from None
        return str(text)

    def render_prompt(self, request: ChatRequest) -> str:
        """The prompt text exactly as generation feeds it to the processor (fine-tuning
        renders its training prompts with this, so training and inference match)."""
        return self._render(request)

    def prompt_token_ids(self, request: ChatRequest) -> list[int]:
        """The prompt's token ids as generation feeds them to the model (images expanded)."""
        self._ensure_processor()
        return [int(i) for i in self._encode(request)["input_ids"][0].tolist()]

    @property
    def tokenizer(self) -> Any:
        """The processor's tokenizer (loading the processor, never the weights)."""
        return self._ensure_processor().tokenizer

    def _image_token(self) -> str:
        processor = self._ensure_processor()
        return str(getattr(processor, "image_token", None) or processor.tokenizer.boi_token)

    def count_prompt_tokens(self, request: ChatRequest) -> int | None:
        """Exact: the rendered prompt with each image placeholder expanded as the processor does.

        Counting runs on the caller's thread while the worker tokenizes and decodes, so it
        uses its own copy of the tokenizer: no lock that would make the event loop wait for
        the worker's image preprocessing.
        """
        text = self._render(request)
        processor = self._processor
        sequence = getattr(processor, "full_image_sequence", None)
        if request.images and sequence is None:
            return None
        expanded = text.replace(self._image_token(), sequence or "")
        return len(self._counter(expanded, add_special_tokens=False)["input_ids"])

    def _inputs(self, request: ChatRequest) -> Any:
        inputs = self._encode(request)
        model = self._hf_model
        inputs = inputs.to(model.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        return inputs

    def _encode(self, request: ChatRequest) -> Any:
        """The processor's tensors for the request, on the CPU."""
        text = self._render(request)
        processor = self._processor
        images = [image.to_pil() for image in request.images]
        kwargs: dict[str, Any] = {
            "text": [text],
            "add_special_tokens": False,
            "return_tensors": "pt",
        }
        if images:
            kwargs["images"] = [images]
            kwargs["do_pan_and_scan"] = False
        return processor(**kwargs)

    # ----- adapters ---------------------------------------------------------------------

    def _adapter_registry(self, name: str) -> AdapterRegistry:
        if self._adapters_dir is None:
            raise InvalidRequestError(
                f"adapter {name[:64]!r} asked for, but this backend has no adapters configured",
                hint="build the engine from the settings (COHEARA_ADAPTERS_DIR), or pass "
                "adapters_dir to TransformersBackend",
            )
        return AdapterRegistry(self._adapters_dir)

    def _base_fingerprint(self) -> str:
        if self._fingerprint is None:
            folder = None if self._in_memory else model_folder(self.model)
            if folder is None:
                raise ConfigurationError(
                    f"adapters need a base model loaded from a folder; {self.model} is not one",
                    hint="point the Transformers backend at the base model's weights folder",
                )
            self._fingerprint = base_fingerprint(folder)
        return self._fingerprint

    def _adapter_record(self, name: str) -> AdapterRecord:
        """The registered adapter `name`, checked against this backend's base model."""
        record = self._adapter_registry(name).get(name)
        if record.base_fingerprint != self._base_fingerprint():
            raise ConfigurationError(
                f"adapter {record.name!r} was trained on another base model ({record.base_model})"
                f" than this backend's ({self.model})",
                hint="serve it on the base it was trained on, or train it again on this model",
            )
        if not (Path(record.path) / "adapter_config.json").is_file():
            raise ConfigurationError(
                f"adapter {record.name!r}: its folder {record.path} has no adapter_config.json",
                hint="restore the folder, or remove the adapter (coheara adapters remove)",
            )
        return record

    def _adapter_scope(
        self, model: Any, name: str | None
    ) -> contextlib.AbstractContextManager[Any]:
        """On the worker thread: make `name` the active adapter for one generation, or run
        the base with every adapter disabled (None)."""
        if name is None:
            return (
                self._peft.disable_adapter() if self._peft is not None else contextlib.nullcontext()
            )
        record = self._adapter_record(name)
        stamp = f"{record.created}|{record.path}"
        if self._loaded_adapters.get(record.name) != stamp:
            self._load_adapter(model, record)
            self._loaded_adapters[record.name] = stamp
        self._peft.set_adapter(record.name)
        return contextlib.nullcontext()

    def _load_adapter(self, model: Any, record: AdapterRecord) -> None:
        """Inject the adapter's LoRA layers into the base model, beside any others."""
        try:
            from peft import PeftModel
        except ImportError:
            raise ConfigurationError(
                "adapters need peft", hint="pip install 'coheara[finetune]'"
            ) from None
        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            if record.name in self._loaded_adapters:  # re-registered under the same name
                self._peft.delete_adapter(record.name)
                del self._loaded_adapters[record.name]
            if self._peft is None:
                with warnings.catch_warnings():  # PEFT asks transformers 5 a deprecated name
                    warnings.simplefilter("ignore", FutureWarning)
                    self._peft = PeftModel.from_pretrained(
                        model, record.path, adapter_name=record.name, is_trainable=False
                    )
            else:
                self._peft.load_adapter(record.path, adapter_name=record.name, is_trainable=False)
        except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
            raise ConfigurationError(
                f"cannot load adapter {record.name!r}: {type(exc).__name__}: {str(exc)[:200]}",
                hint="check its folder, or train it again",
            ) from None
        finally:
            if bar:
                hf_logging.enable_progress_bar()

    # ----- structured output ------------------------------------------------------------

    def _grammar(self, schema: dict[str, Any]) -> Any:
        """The xgrammar grammar for `schema`, compiled once per schema text."""
        import xgrammar as xgr

        # Property order is kept: it is the order the grammar writes the fields in.
        key = json.dumps(schema, separators=(",", ":"))
        with self._load_lock:
            if key in self._grammars:
                self._grammars.move_to_end(key)
                return self._grammars[key]
        processor = self._ensure_processor()
        config = self._ensure_config()
        with self._load_lock:
            if self._grammar_compiler is None:
                info = xgr.TokenizerInfo.from_huggingface(
                    processor.tokenizer,
                    vocab_size=config.get_text_config().vocab_size,
                    stop_token_ids=self._eos_ids(),
                )
                self._grammar_compiler = xgr.GrammarCompiler(info)
                self._control_ban = _ControlCharBan(info.decoded_vocab, info.vocab_size)
            compiler = self._grammar_compiler
        try:
            compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)
        except Exception as exc:  # xgrammar raises RuntimeError / its own errors
            message = _XGRAMMAR_PREFIX.sub("", " ".join(str(exc).split()))[:300]
            raise InvalidRequestError(
                f"the JSON Schema cannot be compiled for constrained decoding: {message}",
                hint="simplify the schema (plain types, properties, enum, bounded strings/arrays)",
            ) from None
        with self._load_lock:
            self._grammars[key] = compiled
            while len(self._grammars) > _GRAMMAR_CACHE_SIZE:
                self._grammars.popitem(last=False)
        return compiled

    def _eos_ids(self) -> list[int]:
        """`<eos>` and `<end_of_turn>` (and whatever else the checkpoint declares)."""
        ids: list[int] = []
        sources: list[Any] = [self._config.get_text_config().eos_token_id]
        if self._hf_model is not None:
            sources.append(self._hf_model.generation_config.eos_token_id)
        tokenizer = self._processor.tokenizer if self._processor is not None else None
        if tokenizer is not None:
            sources.append(tokenizer.eos_token_id)
            sources.append(tokenizer.convert_tokens_to_ids(model_facts.END_OF_TURN))
        for source in sources:
            for value in source if isinstance(source, list | tuple) else [source]:
                if isinstance(value, int) and value >= 0 and value not in ids:
                    if tokenizer is not None and value == tokenizer.unk_token_id:
                        continue
                    ids.append(value)
        return ids

    # ----- generation (worker thread) ---------------------------------------------------

    def _generate(self, request: ChatRequest, job: _Job, grammar: Any) -> None:
        if job.cancel.is_set():
            job.send("done", ("cancelled", None, 0))
            return
        try:
            self._generate_unsafe(request, job, grammar)
        except CohearaError as exc:
            job.send("error", exc)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            job.send(
                "error",
                BackendError(
                    "out of GPU memory while generating",
                    hint="lower max_tokens, send fewer images or a shorter input, "
                    "or use a GPU with more memory",
                ),
            )
        except Exception as exc:
            job.send(
                "error",
                BackendError(
                    # The type only: a failure's text may quote the tokens it was working on.
                    f"generation failed in Transformers: {type(exc).__name__}"
                ),
            )

    def _generate_unsafe(self, request: ChatRequest, job: _Job, grammar: Any) -> None:
        model = self._ensure_model()
        adapter = self._adapter_scope(model, request.options.adapter)
        inputs = self._inputs(request)
        prompt_tokens = int(inputs["input_ids"].shape[1])
        options = request.options
        window = self._context_length()
        if prompt_tokens + options.max_tokens > window:
            raise ContextOverflowError(
                f"request does not fit the context window: prompt {prompt_tokens} tokens + "
                f"{options.max_tokens} reserved for output > window {window}",
                hint="shorten the input or lower max_tokens",
                prompt_tokens=prompt_tokens,
                window=window,
            )
        eos = self._eos_ids()
        tokenizer = self._processor.tokenizer
        sampling = options.temperature > 0
        processors = LogitsProcessorList()
        if grammar is not None:
            import xgrammar as xgr

            processors.append(xgr.contrib.hf.LogitsProcessor(grammar))
            if self._control_ban is not None:
                processors.append(self._control_ban)
        if sampling:
            # Our own warpers, after the grammar mask: generate() would otherwise apply its
            # top-k before the mask and could leave no allowed token to sample.
            processors.append(TemperatureLogitsWarper(options.temperature))
            if options.top_k:
                processors.append(TopKLogitsWarper(options.top_k))
            if options.top_p is not None and options.top_p < 1.0:
                processors.append(TopPLogitsWarper(options.top_p))
        generation_config = GenerationConfig(
            max_new_tokens=options.max_tokens,
            do_sample=sampling,
            num_beams=1,
            temperature=1.0,
            top_k=0 if sampling else 50,  # neutral: the real sampling is done above
            top_p=1.0,
            repetition_penalty=1.0,
            eos_token_id=eos,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0],
            bos_token_id=tokenizer.bos_token_id,
        )

        def decode(ids: list[int]) -> str:
            return str(tokenizer.decode(ids, skip_special_tokens=True))

        streamer = _DeltaStreamer(decode, job, options.stop)
        with contextlib.ExitStack() as stack:
            stack.enter_context(adapter)
            stack.enter_context(torch.inference_mode())
            if sampling and options.seed is not None:
                devices = [model.device] if model.device.type == "cuda" else []
                stack.enter_context(torch.random.fork_rng(devices=devices))
                torch.manual_seed(options.seed)
            model.generate(
                **inputs,
                generation_config=generation_config,
                logits_processor=processors,
                stopping_criteria=StoppingCriteriaList([_StopOnEvent(job)]),
                streamer=streamer,
            )
        generated = streamer.ids
        reason: FinishReason
        if job.stop_hit or (generated and generated[-1] in eos):
            reason = "stop"
        elif job.cancel.is_set():
            reason = "cancelled"
        elif len(generated) >= options.max_tokens:
            reason = "length"
        else:
            reason = "stop"
        job.send("done", (reason, prompt_tokens, len(generated)))

    def _context_length(self) -> int:
        text_config = self._ensure_config().get_text_config()
        return int(getattr(text_config, "max_position_embeddings", model_facts.CONTEXT_LENGTH))

    # ----- the Backend interface --------------------------------------------------------

    async def stream(self, request: ChatRequest) -> AsyncGenerator[StreamEvent, None]:
        """Text deltas, then one `done` event; closing the generator stops the generation."""
        loop = asyncio.get_running_loop()
        await asyncio.to_thread(self._ensure_processor)
        if request.options.adapter is not None:  # an unknown or foreign adapter fails now
            await asyncio.to_thread(self._adapter_record, request.options.adapter)
        grammar = None
        if request.json_schema is not None:
            grammar = await asyncio.to_thread(self._grammar, request.json_schema)
        job = _Job(loop)
        self._jobs.add(job)
        future = loop.run_in_executor(self._worker(), self._generate, request, job, grammar)
        future.add_done_callback(lambda f: _settle(f, job))
        finished = False
        try:
            while True:
                kind, payload = await job.queue.get()
                if kind == "text":
                    yield StreamEvent(text=payload)
                elif kind == "error":
                    finished = True
                    raise payload
                else:
                    finished = True
                    reason, prompt_tokens, output_tokens = payload
                    yield StreamEvent(
                        done=True,
                        finish_reason=reason,
                        prompt_tokens=prompt_tokens,
                        output_tokens=output_tokens,
                    )
                    return
        finally:
            if not finished:
                job.cancel.set()
            self._jobs.discard(job)

    async def capabilities(self) -> Capabilities:
        if self._capabilities is None:
            config = await asyncio.to_thread(self._ensure_config)
            await asyncio.to_thread(self._ensure_processor)
            vision = getattr(config, "vision_config", None) is not None
            details: dict[str, Any] = {
                "dtype": str(self._torch_dtype).removeprefix("torch."),
                "device": self._device,
                "transformers": transformers.__version__,
                "tiny_test_model": is_tiny_model(self.model),
            }
            if not vision:
                details["vision_hint"] = (
                    f"load an image-text-to-text checkpoint such as {model_facts.DEFAULT_HF_MODEL}"
                )
            self._capabilities = Capabilities(
                backend=self.name,
                model=self.model,
                vision=vision,
                context_length=self._context_length(),
                constrained_decoding=True,
                exact_token_count=True,
                details=details,
            )
        return self._capabilities

    async def health(self) -> Health:
        version = transformers.__version__
        if self._hf_model is not None:
            detail = (
                f"model loaded on {self._device} ({str(self._torch_dtype).removeprefix('torch.')})"
            )
            return Health(True, self.name, detail, version)
        try:
            source, local_only = self._source()
        except CohearaError as exc:
            return Health(False, self.name, str(exc), version)
        except Exception as exc:  # never raise from a probe
            return Health(False, self.name, f"{type(exc).__name__}: {exc}", version)
        if Path(source).is_dir():
            return Health(
                True, self.name, f"model folder {source} present, not loaded yet", version
            )
        if not local_only:
            return Health(True, self.name, f"hub id {source}, fetched on first use", version)
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = isinstance(try_to_load_from_cache(source, "config.json"), str)
        except Exception:
            cached = False
        if not cached:
            detail = f"model {source} is not a local folder nor cached, and downloads are off"
            return Health(False, self.name, detail, version)
        return Health(True, self.name, f"hub id {source} in the local cache, not loaded", version)

    async def aclose(self) -> None:
        """Stop running generations, wait for the worker, and drop the model."""
        for job in list(self._jobs):
            job.cancel.set()
        executor, self._executor = self._executor, None
        if executor is not None:
            await asyncio.to_thread(executor.shutdown, wait=True, cancel_futures=True)
        with self._load_lock:
            had_cuda = (
                self._hf_model is not None and self._device and self._device.startswith("cuda")
            )
            self._hf_model = None
            self._loaded_adapters.clear()
            self._peft = None
            self._grammars.clear()
        if had_cuda:
            torch.cuda.empty_cache()


def _settle(future: asyncio.Future[Any], job: _Job) -> None:
    """A job dropped before it ran (backend closed) still ends its stream."""
    if future.cancelled():
        job.queue.put_nowait(("done", ("cancelled", None, 0)))
    elif future.exception() is not None:  # errors travel through the queue; this is a bug
        job.queue.put_nowait(("error", BackendError(f"worker failed: {future.exception()!r}")))
