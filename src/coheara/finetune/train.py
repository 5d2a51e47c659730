"""Supervised LoRA (or QLoRA) fine-tuning of one task with PEFT and TRL's SFTTrainer.

Defaults are those of Google's MedGemma fine-tuning notebook: rank 16, alpha 16,
dropout 0.05, every linear layer, learning rate 2e-4 (linear schedule, 3 % warm-up,
gradient norm clipped at 0.3), batch 4 with 4 accumulation steps, bfloat16 and
gradient checkpointing. Two deliberate differences:

- "every linear layer" is every linear layer of the language model, not of the vision
  tower: vLLM applies LoRA to the language model of a multimodal model only (it drops
  vision-tower weights with a warning), so an adapter trained on the tower would behave
  differently there. The vision tower and projector stay frozen and untouched.
- the notebook also trains `lm_head` and `embed_tokens` in full (`modules_to_save`); here
  they stay frozen: the adapter stays megabytes, not gigabytes, and vLLM can serve it.

On CUDA: bfloat16 weights, gradient checkpointing, fused AdamW, eager attention (the
notebook's choice for Gemma 3 training). On a CPU (the tests, on the tiny model):
float32 and no gradient checkpointing. QLoRA loads the base in 4-bit NF4 with
bitsandbytes, which needs CUDA; elsewhere it is refused with one line.
"""

from __future__ import annotations

import importlib.util
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from coheara.adapters import LoraSettings, make_private, private_folder, vision_markers
from coheara.errors import BackendError, ConfigurationError, InvalidRequestError
from coheara.finetune.data import Example

LANGUAGE_MODEL_MARKER = "language_model"


@dataclass(frozen=True)
class TrainConfig:
    """How to train; the defaults are the notebook's."""

    lora: LoraSettings = field(default_factory=LoraSettings)
    steps: int | None = None
    """Optimizer steps; None: `epochs` passes over the data."""
    epochs: float = 1.0
    learning_rate: float = 2e-4
    batch_size: int = 4
    accumulation: int = 4
    warmup_ratio: float = 0.03
    max_grad_norm: float = 0.3
    scheduler: str = "linear"
    qlora: bool = False
    seed: int = 0
    device: str = "auto"
    """auto (CUDA when there is one), cuda or cpu."""


@dataclass(frozen=True)
class TrainResult:
    losses: list[float]
    """The training loss at every optimizer step, in order."""
    steps: int
    epochs: float
    trainable_parameters: int
    total_parameters: int
    target_modules: str
    device: str
    dtype: str
    seconds: float
    step_seconds: list[float] = field(default_factory=list)
    """Wall time of each optimizer step (forward, backward, update)."""
    model: Any = field(default=None, repr=False, compare=False)
    """The trained PEFT model, still in memory."""

    @property
    def first_loss(self) -> float | None:
        return self.losses[0] if self.losses else None

    @property
    def final_loss(self) -> float | None:
        return self.losses[-1] if self.losses else None


def check_qlora() -> None:
    """QLoRA needs bitsandbytes and a CUDA GPU: a one-line ConfigurationError otherwise."""
    import torch

    if not torch.cuda.is_available():
        raise ConfigurationError(
            "QLoRA needs a CUDA GPU (bitsandbytes 4-bit), and this torch sees none",
            hint="train without --qlora (LoRA in bfloat16 or float32), or on a CUDA machine",
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigurationError(
            "QLoRA needs bitsandbytes, which is not installed",
            hint="pip install bitsandbytes, or train without --qlora",
        )


def require_extra() -> None:
    missing = [m for m in ("peft", "trl", "datasets", "accelerate") if not _has(m)]
    if missing:
        raise ConfigurationError(
            f"fine-tuning needs {', '.join(missing)}",
            hint="pip install 'coheara[finetune]'",
        )


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigurationError(
            "training on cuda was asked for, but this torch sees no CUDA device",
            hint="use --device cpu (slow: the tiny test model only) or a CUDA machine",
        )
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise ConfigurationError(f"unknown device {device!r} for training", hint="auto, cuda, cpu")
    return device


def language_model_targets(model: Any) -> str:
    """The regular expression of every linear layer of the language model (PEFT full-matches
    module names against it): q/k/v/o and the gate/up/down projections of Gemma 3."""
    import torch

    leaves: set[str] = set()
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if f".{LANGUAGE_MODEL_MARKER}." in f".{name}." and not name.endswith("lm_head"):
            leaves.add(name.rsplit(".", 1)[-1])
    if not leaves:
        raise ConfigurationError(
            "the base model has no linear layer under a language model: not a Gemma 3 "
            "image-text-to-text checkpoint"
        )
    return rf".*\.{LANGUAGE_MODEL_MARKER}\..*\.({'|'.join(sorted(leaves))})"


def lora_config(settings: LoraSettings, target_modules: str) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        bias="none",
        target_modules=target_modules,
        task_type="CAUSAL_LM",
    )


def load_base(model_dir: Path, device: str, qlora: bool) -> Any:
    """The base model to train: bfloat16 on CUDA (4-bit NF4 with QLoRA), float32 on CPU."""
    import torch
    from transformers import AutoModelForImageTextToText
    from transformers.utils import logging as hf_logging

    kwargs: dict[str, Any] = {"local_files_only": True}
    if device.startswith("cuda"):
        kwargs.update(dtype=torch.bfloat16, device_map=device, attn_implementation="eager")
        if qlora:
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_use_double_quant=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_compute_dtype=torch.bfloat16,
                bnb_4bit_quant_storage=torch.bfloat16,
            )
    else:
        kwargs["dtype"] = torch.float32
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    model: Any
    try:
        model = AutoModelForImageTextToText.from_pretrained(str(model_dir), **kwargs)
    except OSError as exc:
        raise ConfigurationError(
            f"cannot load base model {model_dir}: {str(exc)[:200]}",
            hint="give the folder of a complete checkpoint (config.json and safetensors)",
        ) from None
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    if not device.startswith("cuda"):
        model = model.to(device)
    model.config.use_cache = False
    return model


def train(
    model_dir: Path,
    examples: Sequence[Example],
    out_dir: Path,
    config: TrainConfig,
    *,
    progress: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train a LoRA adapter on `examples` and save it (adapter_config.json,
    adapter_model.safetensors) in `out_dir`; return the loss at every step."""
    require_extra()
    from transformers import set_seed

    if not examples:
        raise InvalidRequestError("no training examples")
    device = resolve_device(config.device)
    if config.qlora:
        check_qlora()
    set_seed(config.seed)
    model = load_base(Path(model_dir), device, config.qlora)
    if config.qlora:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    from coheara.backends.transformers_backend import TransformersBackend

    tokenizer = TransformersBackend(str(model_dir), device="cpu").tokenizer
    return train_model(model, tokenizer, examples, out_dir, config, progress=progress)


def build_trainer(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    config: TrainConfig,
    scratch: Path,
    *,
    callbacks: Sequence[Any] = (),
) -> Any:
    """TRL's SFTTrainer over `examples`, LoRA on the language model, writing its scratch
    files in `scratch`. The dataset carries our own labels (-100 on the prompt): TRL's
    collator keeps given labels as they are and pads them with -100 (checked by a test on
    the batch it builds)."""
    require_extra()
    from datasets import Dataset
    from transformers import PrinterCallback, set_seed
    from trl import SFTConfig, SFTTrainer

    if not examples:
        raise InvalidRequestError("no training examples")
    cuda = str(model.device).startswith("cuda")
    set_seed(config.seed)
    targets = config.lora.target_modules or language_model_targets(model)
    if vision_markers(targets):
        raise InvalidRequestError(
            "LoRA on the vision tower is not trained: vLLM cannot serve it",
            hint="target the language model's linear layers (the default)",
        )
    dataset = Dataset.from_dict(
        {
            "input_ids": [e.input_ids for e in examples],
            "labels": [e.labels for e in examples],
        }
    )
    with warnings.catch_warnings():
        # transformers 5 renames gradient checkpointing; TRL still sets the old name.
        warnings.simplefilter("ignore", FutureWarning)
        args = SFTConfig(
            output_dir=str(scratch),
            max_steps=config.steps if config.steps is not None else -1,
            num_train_epochs=config.epochs,
            per_device_train_batch_size=config.batch_size,
            gradient_accumulation_steps=config.accumulation,
            learning_rate=config.learning_rate,
            lr_scheduler_type=config.scheduler,
            warmup_steps=config.warmup_ratio,
            max_grad_norm=config.max_grad_norm,
            bf16=cuda,
            gradient_checkpointing=cuda,
            gradient_checkpointing_kwargs={"use_reentrant": False} if cuda else None,
            optim="adamw_torch_fused" if cuda else "adamw_torch",
            use_cpu=not cuda,
            max_length=None,
            packing=False,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            seed=config.seed,
            data_seed=config.seed,
            dataloader_pin_memory=cuda,
            dataset_num_proc=None,
        )
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=lora_config(config.lora, targets),
            callbacks=list(callbacks),
        )
    trainer.remove_callback(PrinterCallback)  # progress is the caller's to show
    return trainer


def train_model(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    out_dir: Path,
    config: TrainConfig,
    *,
    progress: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """`train` on a model already loaded (bench/finetune_gpu.py's full-size random one)."""
    require_extra()
    import tempfile

    import torch
    from transformers import TrainerCallback

    if not examples:
        raise InvalidRequestError("no training examples")
    device = str(model.device)
    cuda = device.startswith("cuda")
    # Found before the trainer wraps the model (its LoRA layers are linear layers too).
    targets = config.lora.target_modules or language_model_targets(model)
    config = replace(config, lora=replace(config.lora, target_modules=targets))
    losses: list[float] = []
    step_seconds: list[float] = []
    clock = [0.0]

    class _Losses(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))
                if progress is not None:
                    progress(int(state.global_step), float(logs["loss"]))

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if cuda:
                torch.cuda.synchronize()
            clock[0] = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if cuda:
                torch.cuda.synchronize()
            step_seconds.append(time.perf_counter() - clock[0])

    with tempfile.TemporaryDirectory(prefix="coheara-train-") as scratch, warnings.catch_warnings():
        # transformers 5 renames gradient checkpointing; TRL still sets the old name.
        warnings.simplefilter("ignore", FutureWarning)
        trainer = build_trainer(
            model, tokenizer, examples, config, Path(scratch), callbacks=[_Losses()]
        )
        started = time.perf_counter()
        try:
            trainer.train()
        except torch.cuda.OutOfMemoryError:
            raise BackendError(
                "out of GPU memory while training",
                hint="lower --batch-size (raise --accumulate to keep the effective batch), "
                "or use --qlora",
            ) from None
        seconds = time.perf_counter() - started
        peft_model: Any = trainer.model
        # Learned from accepted drafts, it may have memorized them: this user's only.
        private_folder(out_dir)
        peft_model.save_pretrained(str(out_dir))
        make_private(out_dir)
        state = trainer.state
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    epochs = float(state.epoch or 0.0)
    return TrainResult(
        losses=losses,
        steps=int(state.global_step),
        epochs=epochs,
        trainable_parameters=int(trainable),
        total_parameters=int(total),
        target_modules=targets,
        device=device,
        dtype=str(next(peft_model.parameters()).dtype).removeprefix("torch."),
        seconds=seconds,
        step_seconds=step_seconds,
        model=peft_model,
    )
