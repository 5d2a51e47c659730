"""MedGemma 1.5 4B's full architecture as a Transformers config, from `model_facts`.

For measuring what the real model costs without its weights: built on the `meta` device
it checks the facts the planner uses against Transformers' own Gemma 3 (parameters,
attention layout); materialized with random weights on a GPU or CPU it gives the compute
cost of the real shapes (`coheara bench --synthetic-full-size`, `bench/gpu_rows.py`).
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


def full_size_config(token_ids: dict[str, int] | None = None) -> Any:
    """A `Gemma3Config` with MedGemma 1.5 4B's shapes; token ids as the real checkpoint's,
    or as `token_ids` (the tiny tokenizer's, by token) for a model that must run."""
    from transformers import Gemma3Config, Gemma3TextConfig, SiglipVisionConfig

    ids = {
        "<pad>": 0,
        "<eos>": 1,
        "<bos>": 2,
        "<end_of_turn>": 106,
        "<start_of_image>": 255_999,
        "<end_of_image>": 256_000,
        "<image_soft_token>": 262_144,
        **(token_ids or {}),
    }

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
        pad_token_id=ids["<pad>"],
        bos_token_id=ids["<bos>"],
        eos_token_id=[ids["<eos>"], ids["<end_of_turn>"]],
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
        boi_token_index=ids["<start_of_image>"],
        eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"],
    )


def synthetic_model(device: str, dtype: Any, config: Any = None) -> tuple[Any, Any]:
    """A random-weight model of the full architecture on `device`, and the tiny model's
    processor to drive it: the real compute cost, from any machine, with no download.

    The vocabulary stays full size (the LM head is a real share of the cost), but the rows
    of the tied embedding beyond the tiny tokenizer, and of its special tokens, are zeroed:
    their logits are then 0 while some real token's is almost surely positive, so greedy
    decoding writes decodable text and never stops early, and every run is `max_tokens`
    long. `config` (default: `full_size_config` with the tokenizer's ids) lets a test run
    the same path at a small size.
    """
    import torch
    from transformers import Gemma3ForConditionalGeneration, GenerationConfig

    from coheara.dev.tiny_model import SPECIAL_TOKENS, build_processor

    processor, ids = build_processor()
    config = config if config is not None else full_size_config(ids)
    torch.manual_seed(0)
    with torch.device(device):
        model = Gemma3ForConditionalGeneration._from_config(config, dtype=dtype).eval()
    with torch.no_grad():
        embedding = model.get_input_embeddings().weight
        embedding[len(processor.tokenizer) :] = 0
        embedding[[ids[token] for token in SPECIAL_TOKENS]] = 0
        # A zero projector would make every image invisible to the text model.
        projector = model.model.multi_modal_projector.mm_input_projection_weight
        projector.normal_(0.0, 0.02)
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<bos>"],
        pad_token_id=ids["<pad>"],
        eos_token_id=[ids["<eos>"], ids["<end_of_turn>"]],
        do_sample=False,
    )
    return model, processor
