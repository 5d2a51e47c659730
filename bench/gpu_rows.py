"""The spec's GPU rows and the planner's memory check, on a full-size random MedGemma 1.5 4B.

A lent GPU, a few minutes, no weights: builds the full architecture with random weights in
bfloat16 on CUDA (`coheara.dev.full_size.synthetic_model`), then

1. memory: one prefill at several context lengths (and one with an image), the allocator's
   peak, the weights and the KV cache counted from the tensors, beside the capacity
   planner's estimate for the same request (`coheara plan`), with the ratio;
2. latency: the `coheara bench` scenarios through the Transformers backend (time to first
   token, total, tokens/s, p50/p95), beside the spec's expected range and the 3 s target.

    python bench/gpu_rows.py [--runs 5] [--max-tokens 64] [--full] [--out DIR]

Prints two tables and writes gpu_rows.json (and gpu_rows.png when matplotlib is there).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

GIB = 1024**3


def memory_rows(model: Any, processor: Any, contexts: list[int]) -> list[dict[str, Any]]:
    import torch

    from coheara.deploy.measure import prefill
    from coheara.deploy.plan import PlanInput, plan, transformers_plan

    rows = []
    cases: list[tuple[int, bool]] = [(n, False) for n in contexts] + [(1024, True)]
    image_token = model.config.image_token_index
    for tokens, with_image in cases:
        pixels = None
        if with_image:
            from coheara.deploy.latency import synthetic_image

            pixels = processor.image_processor([synthetic_image()], return_tensors="pt")[
                "pixel_values"
            ]
        try:
            measured = prefill(model, tokens, pixel_values=pixels, image_token=image_token)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            rows.append({"tokens": tokens, "images": int(with_image), "error": "out of memory"})
            continue
        upper = plan(PlanInput(variant="bf16", context=tokens, kv_type="bf16", vision=with_image))
        expected = transformers_plan(tokens, vision=with_image)
        rows.append(
            {
                **asdict(measured),
                "activations": measured.activations,
                "plan_transformers": expected.to_dict()["bytes"],
                "plan_default": upper.to_dict()["bytes"],
                "ratio_total": measured.peak / expected.total if measured.peak else None,
                "ratio_kv": measured.kv_cache / expected.kv_cache if expected.kv_cache else None,
            }
        )
    return rows


def latency_rows(model: Any, processor: Any, runs: int, max_tokens: int, full: bool) -> list[Any]:
    from coheara import Engine, Settings
    from coheara.backends.transformers_backend import TransformersBackend
    from coheara.deploy import latency

    backend = TransformersBackend.from_loaded("synthetic-full-size", model, processor)
    scenarios = [*latency.SCENARIOS, *([latency.FULL_CONTEXT] if full else [])]

    async def measure() -> list[Any]:
        async with Engine(backend, Settings(max_output_tokens=max_tokens)) as engine:
            return await latency.run(
                engine, scenarios, runs=runs, warmup=1, max_tokens=max_tokens, scale=1.0
            )

    return asyncio.run(measure())


def _gib(value: int | None) -> str:
    return "-" if value is None else f"{value / GIB:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--full", action="store_true", help="add the 120K-token row")
    parser.add_argument(
        "--contexts",
        default="1024,8192,32768,65536,120000",
        help="prefill lengths for the memory table",
    )
    parser.add_argument("--out", type=Path, default=Path("."))
    arguments = parser.parse_args()

    import torch

    from coheara.dev.full_size import synthetic_model

    if not torch.cuda.is_available():
        raise SystemExit("this script measures the GPU rows: no CUDA device is visible")
    device_name = torch.cuda.get_device_name(0)
    started = time.perf_counter()
    model, processor = synthetic_model("cuda", torch.bfloat16)
    build_s = time.perf_counter() - started
    print(f"{device_name}: full-size random model built in {build_s:.1f} s", flush=True)

    contexts = [int(n) for n in arguments.contexts.split(",")]
    memory = memory_rows(model, processor, contexts)
    print("\nmemory (GiB): measured peak of one prefill vs the planner (Transformers profile)")
    print("| tokens | images | weights | KV measured | KV planned | peak | planned | ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in memory:
        if "error" in row:
            print(f"| {row['tokens']} | {row['images']} | {row['error']} |")
            continue
        planned = row["plan_transformers"]
        print(
            f"| {row['tokens']} | {row['images']} | {_gib(row['weights'])} | "
            f"{_gib(row['kv_cache'])} | {_gib(planned['kv_cache'])} | {_gib(row['peak'])} | "
            f"{_gib(planned['total'])} | {row['ratio_total']:.3f} |",
            flush=True,
        )

    rows = latency_rows(model, processor, arguments.runs, arguments.max_tokens, arguments.full)
    print(
        f"\nlatency (s), {arguments.runs} runs after 1 warm-up, {arguments.max_tokens} tokens out"
    )
    print(
        "| scenario | prompt tokens | TTFT p50 | TTFT p95 | total p50 | total p95 | tok/s p50 "
        "| spec | spec met | 3 s |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        low, high = row["expected_s"]
        if "skipped" in row:
            print(f"| {row['scenario']['id']} | skipped: {row['skipped']} |")
            continue
        print(
            f"| {row['scenario']['id']} | {row['prompt_tokens']} | {row['ttft_s']['p50']:.3f} | "
            f"{row['ttft_s']['p95']:.3f} | {row['total_s']['p50']:.3f} | "
            f"{row['total_s']['p95']:.3f} | {row['tokens_per_s']['p50']:.1f} | "
            f"{low:g}-{high:g} | {'yes' if row['within_expected'] else 'no'} | "
            f"{'yes' if row['within_point_of_care'] else 'no'} |",
            flush=True,
        )
    document = {
        "device": device_name,
        "torch": torch.__version__,
        "build_s": build_s,
        "memory": memory,
        "latency": rows,
    }
    arguments.out.mkdir(parents=True, exist_ok=True)
    (arguments.out / "gpu_rows.json").write_text(json.dumps(document, indent=2) + "\n")
    try:
        from coheara.deploy.latency import chart

        title = f"synthetic MedGemma 1.5 4B, {device_name}"
        chart(rows, str(arguments.out / "gpu_rows.png"), title)
    except Exception as exc:  # the chart is a nicety; the tables above are the result
        print(f"no chart: {type(exc).__name__}")


if __name__ == "__main__":
    main()
