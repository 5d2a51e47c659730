"""The facts the planner computes with, checked against Transformers' own Gemma 3 built at
MedGemma 1.5 4B's full size on the `meta` device (no memory, no weights)."""

from __future__ import annotations

import pytest

from coheara import model_facts as mf
from coheara.deploy.plan import PlanInput, kv_cache_bytes, weights_bytes
from coheara.dev.full_size import full_size_config

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def model() -> object:
    with torch.device("meta"):
        return transformers.Gemma3ForConditionalGeneration(full_size_config())


def test_parameters_and_bf16_weights(model: object) -> None:
    parameters = sum(p.numel() for p in model.parameters())  # type: ignore[attr-defined]
    assert parameters == pytest.approx(mf.PARAMETERS, rel=0.03)  # "about 4.3 B"
    vision = sum(p.numel() for p in model.model.vision_tower.parameters())  # type: ignore[attr-defined]
    assert 380e6 < vision < 440e6  # "about 400M"
    # The planner's bf16 weights are the Ollama library's 8.6 GB: 2 bytes a parameter.
    assert weights_bytes(PlanInput(variant="bf16")) == pytest.approx(parameters * 2, rel=0.03)


def test_the_attention_layout_and_the_cache_arithmetic(model: object) -> None:
    text = full_size_config().text_config
    kinds = text.layer_types
    assert kinds.count("full_attention") == mf.GLOBAL_LAYERS
    assert [i for i, kind in enumerate(kinds) if kind == "full_attention"] == [5, 11, 17, 23, 29]
    assert kinds.count("sliding_attention") == mf.TEXT_LAYERS - mf.GLOBAL_LAYERS
    attention = model.model.language_model.layers[0].self_attn  # type: ignore[attr-defined]
    k_width = attention.k_proj.out_features
    assert k_width == mf.KV_HEADS * mf.HEAD_DIM == 1024
    assert attention.q_proj.out_features == mf.QUERY_HEADS * mf.HEAD_DIM
    # One token's K and V over every layer, in bf16, from the real projection widths.
    per_token_all_layers = 2 * k_width * 2 * len(kinds)
    request = PlanInput(context=1000, sliding_window_cache=False)
    assert kv_cache_bytes(request) == per_token_all_layers * 1000
