"""LoRA fine-tuning cost on a full-size random MedGemma 1.5 4B: step time, memory, speed.

A lent GPU, a few minutes, no weights: builds the full architecture with random weights
in bfloat16 on CUDA (`coheara.dev.full_size.synthetic_model`), wraps it with LoRA at the
notebook's defaults (rank 16, alpha 16, dropout 0.05, every linear layer of the language
model) and trains it through `coheara.finetune.train.train_model` (TRL's SFTTrainer,
bfloat16, gradient checkpointing, fused AdamW) for a few steps on synthetic sequences,
loss on the last quarter only as for a draft. Then a short evaluation pass: greedy
generation of a fixed number of tokens for a batch of prompts, with the adapter and with
it disabled (the base).

    python bench/finetune_gpu.py [--steps 10] [--seq 1024] [--prompts 8] [--max-tokens 64]

Prints a table (step time p50, peak memory, trainable parameters, generation throughput)
and writes finetune_gpu.json in --out. Exits with a message where there is no CUDA.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

GIB = 1024**3


def examples(count: int, length: int, vocab: int, seed: int = 0) -> list[Any]:
    """Random token sequences; the loss on the last quarter (the "answer")."""
    import random

    from coheara.finetune.data import IGNORE, Example

    rng = random.Random(seed)
    made = []
    answer = max(1, length // 4)
    for i in range(count):
        ids = [rng.randrange(10, vocab) for _ in range(length)]
        labels = [IGNORE] * (length - answer) + ids[length - answer :]
        made.append(Example(f"synthetic-{i}", "", "", ids, labels))
    return made


def generation(model: Any, tokenizer: Any, prompts: int, max_tokens: int) -> dict[str, float]:
    """Greedy generation of exactly `max_tokens` for a left-padded batch of prompts."""
    import torch

    texts = [
        f"Patient {i}: summarize the findings and the plan." * (1 + i % 3) for i in range(prompts)
    ]
    batch = tokenizer(texts, return_tensors="pt", padding=True).to(model.device)
    model.config.use_cache = True

    def sync() -> None:
        if model.device.type == "cuda":
            torch.cuda.synchronize()

    with torch.inference_mode():
        model.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False)  # warm-up
        sync()
        started = time.perf_counter()
        model.generate(
            **batch, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False
        )
        sync()
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "tokens_per_s": prompts * max_tokens / seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps (default 10)")
    parser.add_argument("--seq", type=int, default=1024, help="tokens a sequence (default 1024)")
    parser.add_argument("--prompts", type=int, default=8, help="prompts generated (default 8)")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens each (default 64)")
    parser.add_argument("--out", type=Path, default=Path("."), help="where to write the JSON")
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("finetune_gpu.py needs a CUDA GPU (bfloat16, about 30 GiB); this torch sees none")
        return 2

    from coheara.adapters import LoraSettings
    from coheara.dev.full_size import synthetic_model
    from coheara.finetune.train import TrainConfig, train_model

    started = time.perf_counter()
    model, processor = synthetic_model("cuda", torch.bfloat16)
    built_s = time.perf_counter() - started
    model.config.use_cache = False
    tokenizer = processor.tokenizer
    data = examples(args.steps, args.seq, len(tokenizer))
    config = TrainConfig(
        lora=LoraSettings(),
        steps=args.steps,
        batch_size=1,
        accumulation=1,
        device="cuda",
    )
    torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as scratch:
        result = train_model(model, tokenizer, data, Path(scratch) / "adapter", config)
        adapter_mb = sum(f.stat().st_size for f in (Path(scratch) / "adapter").iterdir()) / 2**20
    peak = torch.cuda.max_memory_allocated()
    peft_model = result.model.eval()
    with_adapter = generation(peft_model, tokenizer, args.prompts, args.max_tokens)
    with peft_model.disable_adapter():
        base = generation(peft_model, tokenizer, args.prompts, args.max_tokens)

    steps = result.step_seconds[1:] or result.step_seconds  # the first step warms kernels up
    row = {
        "device": torch.cuda.get_device_name(0),
        "model_build_s": round(built_s, 1),
        "steps": result.steps,
        "sequence_tokens": args.seq,
        "step_s_p50": statistics.median(steps),
        "step_s_max": max(steps),
        "train_tokens_per_s": args.seq / statistics.median(steps),
        "peak_memory_gib": peak / GIB,
        "trainable_parameters": result.trainable_parameters,
        "total_parameters": result.total_parameters,
        "adapter_mib": adapter_mb,
        "loss_first": result.first_loss,
        "loss_last": result.final_loss,
        "generate_prompts": args.prompts,
        "generate_tokens_each": args.max_tokens,
        "adapter_tokens_per_s": with_adapter["tokens_per_s"],
        "base_tokens_per_s": base["tokens_per_s"],
    }
    print(f"LoRA fine-tuning, full-size random MedGemma 1.5 4B on {row['device']}")
    print(f"{'measure':34} value")
    lines = [
        ("model built", f"{row['model_build_s']:.1f} s"),
        ("training steps (batch 1)", f"{row['steps']} x {args.seq} tokens"),
        ("step time p50 / max", f"{row['step_s_p50']:.3f} s / {row['step_s_max']:.3f} s"),
        ("training tokens/s (p50)", f"{row['train_tokens_per_s']:.0f}"),
        ("peak memory (allocated)", f"{row['peak_memory_gib']:.2f} GiB"),
        (
            "trainable parameters",
            f"{row['trainable_parameters']:,} of {row['total_parameters']:,} "
            f"({100 * row['trainable_parameters'] / row['total_parameters']:.2f} %)",
        ),
        ("adapter on disk", f"{row['adapter_mib']:.1f} MiB"),
        ("loss first -> last", f"{row['loss_first']:.3f} -> {row['loss_last']:.3f}"),
        (
            f"generate {args.prompts} x {args.max_tokens} tokens, adapter",
            f"{row['adapter_tokens_per_s']:.0f} tokens/s",
        ),
        (
            f"generate {args.prompts} x {args.max_tokens} tokens, base",
            f"{row['base_tokens_per_s']:.0f} tokens/s",
        ),
    ]
    for name, value in lines:
        print(f"{name:34} {value}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "finetune_gpu.json").write_text(json.dumps(row, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
