"""MedGemma 1.5 4B's full architecture as a Transformers config, from `model_facts`.

For measuring what the real model costs without its weights: built on the `meta` device
it checks the facts the planner uses against Transformers' own Gemma 3 (parameters,
attention layout); materialized with random weights on a GPU or CPU it gives the compute
cost of the real shapes (the latency bench's `--synthetic-full-size`, a later step).
"""

from __future__ import annotations

from typing import Any

from coheara import model_facts as mf

SLIDING_WINDOW_PATTERN = 6
"""Every 6th layer attends globally (layers 5, 11, 17, 23, 29)."""
VISION_INTERMEDIATE = 4304
VISION_PATCH = 14


def layer_types(layers: int = mf.TEXT_LAYERS) -> list[str]:
    return [
        "full_attention" if (i + 1) % SLIDING_WINDOW_PATTERN == 0 else "sliding_attention"
        for i in range(layers)
    ]


def full_size_config() -> Any:
    """A `Gemma3Config` with MedGemma 1.5 4B's shapes (token ids as the real checkpoint's)."""
    from transformers import Gemma3Config, Gemma3TextConfig, SiglipVisionConfig

    text = Gemma3TextConfig(
        vocab_size=mf.VOCAB_SIZE,
        hidden_size=mf.HIDDEN_SIZE,
        intermediate_size=mf.INTERMEDIATE_SIZE,
        num_hidden_layers=mf.TEXT_LAYERS,
        num_attention_heads=mf.QUERY_HEADS,
        num_key_value_heads=mf.KV_HEADS,
        head_dim=mf.HEAD_DIM,
        query_pre_attn_scalar=mf.HEAD_DIM,
        sliding_window=mf.SLIDING_WINDOW,
        layer_types=layer_types(),
        max_position_embeddings=mf.CONTEXT_LENGTH,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=[1, 106],
    )
    vision = SiglipVisionConfig(
        image_size=mf.IMAGE_SIZE,
        patch_size=VISION_PATCH,
        hidden_size=mf.VISION_HIDDEN,
        intermediate_size=VISION_INTERMEDIATE,
        num_hidden_layers=mf.VISION_LAYERS,
        num_attention_heads=mf.VISION_HEADS,
        vision_use_head=False,
    )
    return Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=mf.IMAGE_SOFT_TOKENS,
        boi_token_index=255_999,
        eoi_token_index=256_000,
        image_token_index=262_144,
    )
