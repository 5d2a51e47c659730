"""The capacity planner against values computed by hand from the architecture."""

from __future__ import annotations

import json
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from cli_support import run_coheara
from coheara.deploy.plan import (
    GIB,
    PlanInput,
    activation_bytes,
    kv_cache_bytes,
    largest_context,
    largest_parallel,
    plan,
    vision_bytes,
)
from coheara.errors import InvalidRequestError

KIB = 1024


@pytest.mark.parametrize(
    ("context", "swa", "kv_type", "parallel", "expected"),
    [
        # 4 KiB per token per layer in bf16: 2 (K, V) x 4 heads x 256 x 2 bytes.
        (131072, True, "f16", 1, (5 * 131072 + 29 * 1024) * 4 * KIB),  # ~2.6 GiB
        (131072, False, "f16", 1, 34 * 131072 * 4 * KIB),  # 17 GiB exactly
        (512, True, "f16", 1, 34 * 512 * 4 * KIB),  # under the window every layer is full
        (8192, True, "f16", 4, 4 * (5 * 8192 + 29 * 1024) * 4 * KIB),
        (8192, False, "q8_0", 1, 34 * 8192 * 2 * 4 * 256 * 34 // 32),
        (32768, False, "q4_0", 2, 2 * 34 * 32768 * 2 * 4 * 256 * 18 // 32),
        (1024, True, "f32", 1, 34 * 1024 * 8 * KIB),
    ],
)
def test_kv_cache(context: int, swa: bool, kv_type: str, parallel: int, expected: int) -> None:
    request = PlanInput(
        context=context,
        sliding_window_cache=swa,
        kv_type=kv_type,  # type: ignore[arg-type]
        parallel=parallel,
    )
    assert kv_cache_bytes(request) == expected


def test_the_design_figures_at_128k() -> None:
    with_swa = kv_cache_bytes(PlanInput(context=131072))
    without = kv_cache_bytes(PlanInput(context=131072, sliding_window_cache=False))
    assert round(with_swa / GIB, 2) == 2.61 and without / GIB == 17.0


def test_weights_image_encoder_and_activations() -> None:
    bf16 = plan(PlanInput(variant="bf16", context=4096))
    assert bf16.weights == 8_600_000_000
    assert plan(PlanInput(variant="custom", weights_gb=4.1)).weights == 4_100_000_000
    assert plan(PlanInput(variant="q8_0", weights_gb=5.5)).weights == 5_500_000_000
    # One image: 4 float32 copies of 4096 x 1152 hidden states, and 16 heads of 4096^2 scores.
    assert vision_bytes(PlanInput()) == 4 * 4096 * 1152 * 4 + 16 * 4096 * 4096 * 4
    assert vision_bytes(PlanInput(flash_attention=True)) == 4 * 4096 * 1152 * 4
    assert vision_bytes(PlanInput(vision=False)) == 0
    # A 512-token chunk: (4 x 2560 + 3 x 10240) float32 values a token, 8 heads of scores
    # over the 4096-token window, and one row of logits for each of 2 sequences.
    request = PlanInput(context=4096, parallel=2)
    expected = 512 * (4 * 2560 + 3 * 10240) * 4 + 512 * 8 * 4096 * 4 + 2 * 262208 * 4
    assert activation_bytes(request) == expected
    total = plan(request)
    assert total.total == total.weights + total.kv_cache + total.vision + total.activations


def test_what_fits_where() -> None:
    small = plan(PlanInput(variant="q4_K_M", context=4096, flash_attention=True))
    assert "GPU 8 GB (RTX 3070, RTX 4060)" in small.fits
    assert small.spec_rows["GPU 8 GB"] and small.spec_rows["CPU only, 16 GB RAM"]
    full = plan(PlanInput(variant="bf16", context=131072, sliding_window_cache=False))
    assert not full.spec_rows["GPU 16 GB+"] and "GPU 40 GB (A100 40 GB)" in full.fits
    assert "GPU 24 GB (L4, A10, RTX 4090)" not in full.fits  # 28 GiB needed


def test_solving_for_a_memory_size_is_the_boundary() -> None:
    request = PlanInput(variant="bf16", sliding_window_cache=False)
    memory = 16 * 10**9
    window = largest_context(request, memory)
    assert window is not None
    assert plan(PlanInput(variant="bf16", sliding_window_cache=False, context=window)).total <= (
        memory
    )
    assert plan(PlanInput(variant="bf16", sliding_window_cache=False, context=window + 1)).total > (
        memory
    )
    most = largest_parallel(PlanInput(context=8192), memory)
    assert plan(PlanInput(context=8192, parallel=most)).total <= memory
    assert plan(PlanInput(context=8192, parallel=most + 1)).total > memory
    assert largest_context(PlanInput(variant="bf16"), 4 * 10**9) is None
    assert largest_parallel(PlanInput(variant="bf16"), 4 * 10**9) == 0


@pytest.mark.parametrize(
    "bad",
    [
        {"variant": "fp8"},
        {"variant": "custom"},
        {"context": 0},
        {"context": 200_000},
        {"parallel": 0},
        {"kv_type": "int3"},
        {"weights_gb": -1.0},
    ],
)
def test_bad_input_is_a_clear_error(bad: dict[str, object]) -> None:
    with pytest.raises(InvalidRequestError):
        PlanInput(**bad)  # type: ignore[arg-type]


def coheara(*args: str) -> subprocess.CompletedProcess[str]:
    return run_coheara(*args, timeout=60)


def test_the_command_prints_json_and_one_line_errors() -> None:
    result = coheara(
        "plan", "--variant", "bf16", "--context", "131072", "--memory-gb", "16", "--json"
    )
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["bytes"]["kv_cache"] == (5 * 131072 + 29 * 1024) * 4 * KIB
    assert document["bytes"]["total"] == sum(
        document["bytes"][k] for k in ("weights", "kv_cache", "vision", "activations")
    )
    assert document["solve"]["largest_context"] == 131072
    assert document["spec_rows"]["GPU 16 GB+"] is True
    table = coheara("plan", "--variant", "q8_0", "--no-sliding-window-cache")
    assert table.returncode == 0 and "KV cache" in table.stdout and "GPU 16 GB" in table.stdout
    bad = coheara("plan", "--variant", "fp8")
    assert bad.returncode == 4
    assert bad.stderr.strip().splitlines() == [
        "error: unknown variant fp8 (bf16, q8_0, q4_K_M or custom)"
    ]


def test_the_transformers_runtime_adds_its_dense_mask() -> None:
    from coheara.deploy.plan import DENSE_MASK_BYTES, for_runtime

    request = for_runtime("transformers", context=8192)
    assert (request.variant, request.kv_type, request.prefill_chunk) == ("bf16", "bf16", None)
    assert request.flash_attention and request.dense_mask
    # Whole-prompt prefill: float32 working set of 8192 tokens, no scores, the dense mask
    # (3 bytes a query-key pair) and one row of logits.
    working = 8192 * (4 * 2560 + 3 * 10240) * 4
    assert DENSE_MASK_BYTES == 3
    assert activation_bytes(request) == working + 3 * 8192 * 8192 + 262_208 * 4
    # Values given win over the runtime's; ollama keeps the llama.cpp defaults.
    assert for_runtime("transformers", context=8192, prefill_chunk=1024).prefill_chunk == 1024
    assert for_runtime("ollama") == PlanInput()
    with pytest.raises(InvalidRequestError):
        for_runtime("llamafile")  # type: ignore[arg-type]


def test_the_command_plans_for_transformers() -> None:
    result = coheara("plan", "--runtime", "transformers", "--context", "120000", "--json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["input"]["variant"] == "bf16" and document["input"]["dense_mask"]
    # At 120K tokens the mask (40 GiB) outweighs the weights: a site must hear that.
    assert document["bytes"]["activations"] > 3 * 120000**2
    assert "GPU 48 GB (L40S, RTX A6000)" not in document["fits"]
    assert "GPU 80 GB (A100 80 GB, H100)" in document["fits"]
    bad = coheara("plan", "--runtime", "llamafile")
    assert bad.returncode != 0 and bad.stderr.strip().startswith("error: unknown runtime")


@pytest.mark.parametrize("context", [8, 15, 100, 2000])
def test_the_kv_cache_matches_the_tensors_transformers_keeps(
    context: int, tiny_model_dir: Path
) -> None:
    """The tiny model (window 16, one sliding and one global layer) prefilled for real: the
    planner's cache for its architecture is within 10% of the tensors the cache holds
    (Transformers' sliding layers keep window - 1 tokens, the planner counts the window)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from coheara.deploy.measure import prefill
    from coheara.deploy.plan import Architecture

    model = transformers.AutoModelForImageTextToText.from_pretrained(
        tiny_model_dir, dtype=torch.float32
    )
    shape = Architecture.of(model.config)
    assert (shape.text_layers, shape.global_layers, shape.sliding_window) == (2, 1, 16)
    measured = prefill(model, context)
    planned = kv_cache_bytes(PlanInput(context=context, kv_type="f32", architecture=shape))
    assert measured.kv_cache == pytest.approx(planned, rel=0.10)
    assert measured.peak is None  # CPU: the allocator peak is read on CUDA only


def test_solving_for_transformers_grows_the_mask_with_the_window() -> None:
    """The whole prompt is prefilled at once, so the dense mask grows with the window the
    solver tries: the answer is the boundary of the full plan, checked on both sides."""
    from coheara.deploy.plan import for_runtime

    request = for_runtime("transformers")
    memory = 40 * 10**9
    window = largest_context(request, memory)
    assert window is not None and 40_000 < window < 131072
    assert plan(replace(request, context=window)).total <= memory
    assert plan(replace(request, context=window + 1)).total > memory
    result = coheara("plan", "--runtime", "transformers", "--memory-gb", "40", "--json")
    assert json.loads(result.stdout)["solve"]["largest_context"] == window
