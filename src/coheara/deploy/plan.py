"""The capacity planner: memory for weights, KV cache, image encoder and activations.

Everything is arithmetic over the architecture in `model_facts` (34 layers, 4 KV heads of
256, 29 sliding-window layers of 1024 and 5 global ones), so a site can answer "does a
128K window fit on our 16 GB card, and with how many parallel requests?" before it buys
or deploys anything. The estimates are upper bounds where runtimes differ:

- weights: the Ollama library's download sizes (vision included), or a size given;
- KV cache: 2 (K and V) x 4 heads x 256 x the cache element size, per token per layer;
  a sliding-window-aware cache (llama.cpp/Ollama's SWA cache, vLLM's hybrid allocator)
  keeps 1024 tokens on 29 layers, one that is not keeps every token on all 34;
- image encoder: encoding one 896x896 image at a time, its attention scores (16 heads
  over 4096 patches, float32) when the runtime materializes them, plus hidden states;
- activations: one prefill chunk at a time (`prefill_chunk` tokens: 512 is llama.cpp's
  micro-batch; Transformers prefills the whole prompt at once), float32 working tensors
  of the decoder and, without flash attention, the chunk's attention scores over the
  whole window, plus one row of logits per sequence.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from coheara import model_facts as mf
from coheara.errors import InvalidRequestError

GIB = 1024**3
KV_BYTES_PER_ELEMENT: dict[str, float] = {
    "f32": 4.0,
    "f16": 2.0,
    "bf16": 2.0,
    "q8_0": 34 / 32,  # 32 int8 values and one f16 scale a block
    "q4_0": 18 / 32,  # 32 4-bit values and one f16 scale a block
}
KvType = Literal["f32", "f16", "bf16", "q8_0", "q4_0"]
Variant = Literal["bf16", "q8_0", "q4_K_M", "custom"]
GPU_RESERVED_GIB = 0.5
"""The runtime's CUDA/Metal context and allocator slack, kept free on every device."""


@dataclass(frozen=True)
class Device:
    name: str
    memory_gib: float
    usable_fraction: float = 1.0
    """Share the model may use: all of a GPU's (less the reserve); macOS lends the GPU
    about 2/3 of unified memory (3/4 at 64 GB and above); an OS keeps some RAM."""
    reserve_gib: float = GPU_RESERVED_GIB

    @property
    def usable_bytes(self) -> int:
        return int((self.memory_gib * self.usable_fraction - self.reserve_gib) * GIB)


GB = 10**9 / GIB
"""One vendor gigabyte in GiB: cards are sold in GB, a 16 GB card holds 14.9 GiB."""
KNOWN_DEVICES = (
    Device("GPU 8 GB (RTX 3070, RTX 4060)", 8 * GB),
    Device("GPU 12 GB (RTX 3060, RTX 4070)", 12 * GB),
    Device("GPU 16 GB (T4, RTX 4060 Ti 16 GB, A4000)", 16 * GB),
    Device("GPU 24 GB (L4, A10, RTX 4090)", 24 * GB),
    Device("GPU 40 GB (A100 40 GB)", 40 * GB),
    Device("GPU 48 GB (L40S, RTX A6000)", 48 * GB),
    Device("GPU 80 GB (A100 80 GB, H100)", 80 * GB),
    Device("GPU 141 GB (H200)", 141 * GB),
    Device("Apple Silicon 16 GB", 16, usable_fraction=2 / 3, reserve_gib=0.0),
    Device("Apple Silicon 32 GB", 32, usable_fraction=2 / 3, reserve_gib=0.0),
    Device("Apple Silicon 64 GB", 64, usable_fraction=3 / 4, reserve_gib=0.0),
    Device("CPU only, 16 GB RAM", 16, reserve_gib=4.0),
    Device("CPU only, 32 GB RAM", 32, reserve_gib=4.0),
)
SPEC_ROWS = {
    "GPU 8 GB": KNOWN_DEVICES[0],
    "GPU 16 GB+": KNOWN_DEVICES[2],
    "CPU only, 16 GB RAM": KNOWN_DEVICES[11],
    "Apple Silicon (16 GB unified)": KNOWN_DEVICES[8],
}
"""The founding spec's hardware rows, each at its smallest size."""


@dataclass(frozen=True)
class Architecture:
    """The shapes the arithmetic uses; MedGemma 1.5 4B's by default, any Gemma 3's by `of`."""

    text_layers: int = mf.TEXT_LAYERS
    global_layers: int = mf.GLOBAL_LAYERS
    sliding_window: int = mf.SLIDING_WINDOW
    kv_heads: int = mf.KV_HEADS
    head_dim: int = mf.HEAD_DIM
    query_heads: int = mf.QUERY_HEADS
    hidden_size: int = mf.HIDDEN_SIZE
    intermediate_size: int = mf.INTERMEDIATE_SIZE
    vocab_size: int = mf.VOCAB_SIZE
    vision_hidden: int = mf.VISION_HIDDEN
    vision_heads: int = mf.VISION_HEADS
    vision_patches: int = mf.VISION_PATCHES

    @classmethod
    def of(cls, config: Any) -> Architecture:
        """From a Transformers `Gemma3Config` (the tiny test model's, a fine-tuned one's)."""
        text, vision = config.get_text_config(), config.vision_config
        kinds = list(text.layer_types)
        return cls(
            text_layers=len(kinds),
            global_layers=kinds.count("full_attention"),
            sliding_window=int(text.sliding_window),
            kv_heads=int(text.num_key_value_heads),
            head_dim=int(text.head_dim),
            query_heads=int(text.num_attention_heads),
            hidden_size=int(text.hidden_size),
            intermediate_size=int(text.intermediate_size),
            vocab_size=int(text.vocab_size),
            vision_hidden=int(vision.hidden_size),
            vision_heads=int(vision.num_attention_heads),
            vision_patches=(int(vision.image_size) // int(vision.patch_size)) ** 2,
        )


MEDGEMMA_4B = Architecture()


@dataclass(frozen=True)
class PlanInput:
    variant: Variant = "q4_K_M"
    weights_gb: float | None = None
    """Weights in GB (10^9 bytes): required for `custom`, overrides a known variant."""
    context: int = 8192
    """Tokens per sequence (Ollama's num_ctx divided by its parallel sequences)."""
    parallel: int = 1
    kv_type: KvType = "f16"
    sliding_window_cache: bool = True
    vision: bool = True
    flash_attention: bool = False
    prefill_chunk: int | None = 512
    """Prompt tokens processed at once; None: the whole prompt (Transformers)."""
    dense_mask: bool = False
    """The runtime builds the sliding-window mask as a dense chunk x context tensor."""
    architecture: Architecture = MEDGEMMA_4B

    def __post_init__(self) -> None:
        if self.variant == "custom" and self.weights_gb is None:
            raise InvalidRequestError("a custom variant needs its size", hint="--weights-gb 4.1")
        if self.variant not in (*mf.WEIGHTS_GB, "custom"):
            raise InvalidRequestError(
                f"unknown variant {self.variant}", hint="bf16, q8_0, q4_K_M or custom"
            )
        if self.weights_gb is not None and not 0 < self.weights_gb < 1000:
            raise InvalidRequestError("--weights-gb must be between 0 and 1000")
        if not 1 <= self.context <= mf.CONTEXT_LENGTH:
            raise InvalidRequestError(f"the context must be 1 to {mf.CONTEXT_LENGTH} tokens")
        if not 1 <= self.parallel <= 1024:
            raise InvalidRequestError("parallel sequences must be 1 to 1024")
        if self.kv_type not in KV_BYTES_PER_ELEMENT:
            raise InvalidRequestError(f"unknown KV cache type {self.kv_type}")
        if self.prefill_chunk is not None and self.prefill_chunk < 1:
            raise InvalidRequestError("the prefill chunk must be at least 1 token")


@dataclass(frozen=True)
class Plan:
    request: PlanInput
    weights: int
    kv_cache: int
    vision: int
    activations: int
    fits: list[str] = field(default_factory=list)
    spec_rows: dict[str, bool] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.vision + self.activations

    def to_dict(self) -> dict[str, Any]:
        request = asdict(self.request)
        if self.request.architecture == MEDGEMMA_4B:
            del request["architecture"]
        return {
            "input": request,
            "bytes": {
                "weights": self.weights,
                "kv_cache": self.kv_cache,
                "vision": self.vision,
                "activations": self.activations,
                "total": self.total,
            },
            "fits": self.fits,
            "spec_rows": self.spec_rows,
        }


def kv_token_layers(
    context: int, *, sliding_window_cache: bool, architecture: Architecture = MEDGEMMA_4B
) -> int:
    """Token-layer slots one sequence keeps in its cache."""
    shape = architecture
    if not sliding_window_cache:
        return shape.text_layers * context
    local = shape.text_layers - shape.global_layers
    return shape.global_layers * context + local * min(context, shape.sliding_window)


def kv_cache_bytes(plan: PlanInput) -> int:
    shape = plan.architecture
    per_token_layer = 2 * shape.kv_heads * shape.head_dim * KV_BYTES_PER_ELEMENT[plan.kv_type]
    slots = kv_token_layers(
        plan.context, sliding_window_cache=plan.sliding_window_cache, architecture=shape
    )
    return round(slots * per_token_layer * plan.parallel)


def weights_bytes(plan: PlanInput) -> int:
    size = plan.weights_gb if plan.weights_gb is not None else mf.WEIGHTS_GB[plan.variant]
    return round(size * 10**9)


def vision_bytes(plan: PlanInput) -> int:
    """Encoding one image: hidden states (4 float32 copies) and, unless flash attention,
    the float32 attention scores of one layer."""
    if not plan.vision:
        return 0
    shape = plan.architecture
    hidden = 4 * shape.vision_patches * shape.vision_hidden * 4
    scores = 0 if plan.flash_attention else shape.vision_heads * shape.vision_patches**2 * 4
    return hidden + scores


DENSE_MASK_BYTES = 3
"""A boolean mask and its bfloat16 additive copy (SDPA's kernels take no window), per
query-key pair: fitted to the measured peaks of `bench/gpu_rows.py` (1K-120K tokens)."""


def activation_bytes(plan: PlanInput) -> int:
    """One prefill chunk's float32 working set, its attention scores over the window
    (without flash attention), a dense sliding-window mask where the runtime builds one,
    and a row of logits per sequence."""
    shape = plan.architecture
    chunk = plan.context if plan.prefill_chunk is None else min(plan.prefill_chunk, plan.context)
    working = chunk * (4 * shape.hidden_size + 3 * shape.intermediate_size) * 4
    scores = 0 if plan.flash_attention else chunk * shape.query_heads * plan.context * 4
    mask = DENSE_MASK_BYTES * chunk * plan.context if plan.dense_mask else 0
    logits = plan.parallel * shape.vocab_size * 4
    return working + scores + mask + logits


Runtime = Literal["ollama", "transformers"]
RUNTIME_DEFAULTS: dict[str, dict[str, Any]] = {
    # llama.cpp: f16 cache, 512-token micro-batches, scores materialized per chunk.
    "ollama": {"variant": "q4_K_M", "kv_type": "f16", "flash_attention": False},
    # Transformers on CUDA, as measured on an H200 (bench/gpu_rows.py): bfloat16 weights and
    # cache, a sliding-window-aware cache (its sliding layers keep the last window), the
    # whole prompt prefilled at once, SDPA kernels that never materialize scores, and a
    # dense sliding-window mask, which dominates beyond about 50K tokens.
    "transformers": {
        "variant": "bf16",
        "kv_type": "bf16",
        "flash_attention": True,
        "dense_mask": True,
        "prefill_chunk": None,
    },
}


def for_runtime(runtime: Runtime, **given: Any) -> PlanInput:
    """A request with the runtime's behaviour; values given (not None) win."""
    if runtime not in RUNTIME_DEFAULTS:
        raise InvalidRequestError(f"unknown runtime {runtime}", hint="ollama or transformers")
    values = {**RUNTIME_DEFAULTS[runtime], **{k: v for k, v in given.items() if v is not None}}
    return PlanInput(**values)


def transformers_plan(
    context: int, *, vision: bool = False, architecture: Architecture = MEDGEMMA_4B
) -> Plan:
    """What the Transformers backend holds on CUDA for one request."""
    return plan(
        for_runtime("transformers", context=context, vision=vision, architecture=architecture)
    )


def plan(request: PlanInput) -> Plan:
    result = Plan(
        request,
        weights=weights_bytes(request),
        kv_cache=kv_cache_bytes(request),
        vision=vision_bytes(request),
        activations=activation_bytes(request),
    )
    fits = [device.name for device in KNOWN_DEVICES if result.total <= device.usable_bytes]
    rows = {row: result.total <= device.usable_bytes for row, device in SPEC_ROWS.items()}
    return replace(result, fits=fits, spec_rows=rows)


def largest_context(request: PlanInput, memory_bytes: int) -> int | None:
    """The longest window (per sequence, at the request's parallelism) that fits, or None."""
    longest = _largest(
        lambda n: plan(replace(request, context=n)).total <= memory_bytes, 0, mf.CONTEXT_LENGTH
    )
    return longest or None


def largest_parallel(request: PlanInput, memory_bytes: int, ceiling: int = 1024) -> int:
    """The most sequences of the request's window that fit (0 if not even one)."""
    return _largest(lambda n: plan(replace(request, parallel=n)).total <= memory_bytes, 0, ceiling)


def _largest(fits: Callable[[int], bool], low: int, high: int) -> int:
    """The largest n in (low, high] that fits, else `low`; memory grows with n, so a
    binary search (n = low itself is never tried)."""
    while low < high:
        middle = (low + high + 1) // 2
        if fits(middle):
            low = middle
        else:
            high = middle - 1
    return low
