"""What a Transformers model really holds in memory, to check the planner against.

Weights and KV cache are counted from the tensors themselves (exact on any device); the
peak of a prefill is read from the CUDA allocator where there is one. Used by the planner
tests on the tiny model and by `bench/gpu_rows.py` on the full-size random model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Measured:
    tokens: int
    images: int
    weights: int
    kv_cache: int
    peak: int | None
    """Allocator peak during the prefill (CUDA only), weights and cache included."""

    @property
    def activations(self) -> int | None:
        return None if self.peak is None else self.peak - self.weights - self.kv_cache


def weights_bytes_of(model: Any) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def cache_bytes_of(cache: Any) -> int:
    """K and V tensors of every layer of a Transformers cache."""
    total = 0
    for layer in cache.layers:
        for tensor in (layer.keys, layer.values):
            if tensor is not None and tensor.numel():
                total += tensor.numel() * tensor.element_size()
    return total


def prefill(
    model: Any, tokens: int, *, pixel_values: Any = None, image_token: int | None = None
) -> Measured:
    """One forward pass over `tokens` prompt tokens (the first 256 an image's soft tokens
    when `pixel_values` is given), keeping the cache, as `generate` prefills."""
    import torch

    device = model.device
    vocab = model.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(tokens)
    ids = torch.randint(10, min(vocab, 700), (1, tokens), generator=generator)
    images = 0
    kwargs: dict[str, Any] = {}
    if pixel_values is not None:
        if image_token is None:
            raise ValueError("pixel_values need the model's image_token id")
        images = int(pixel_values.shape[0])
        per_image = model.config.mm_tokens_per_image
        ids[0, : images * per_image] = image_token
        kwargs["pixel_values"] = pixel_values.to(device, model.dtype)
        kwargs["token_type_ids"] = torch.eq(ids, image_token).long().to(device)
    ids = ids.to(device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        output = model(input_ids=ids, use_cache=True, logits_to_keep=1, **kwargs)
        cache = output.past_key_values
        if cuda:
            torch.cuda.synchronize()
    peak = int(torch.cuda.max_memory_allocated()) if cuda else None
    measured = Measured(tokens, images, weights_bytes_of(model), cache_bytes_of(cache), peak)
    del output, cache
    return measured
