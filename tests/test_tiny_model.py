"""The tiny test checkpoint: real architecture, real processor, Gemma tokens and chat format.

These pin what the Transformers backend tests rely on: if the tiny model drifted
from MedGemma's layout (token ids, image cost, chat format), the backend tests
would pass on something that is not the real pipeline.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from coheara import model_facts  # noqa: E402
from coheara.dev.tiny_model import (  # noqa: E402
    MARKER_FILE,
    build_tiny_model,
    is_tiny_model,
)


@pytest.fixture(scope="module")
def processor(tiny_model_dir: Path) -> Any:
    return transformers.AutoProcessor.from_pretrained(tiny_model_dir, local_files_only=True)


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir: Path) -> Any:
    return transformers.AutoModelForImageTextToText.from_pretrained(
        tiny_model_dir, local_files_only=True, dtype=torch.float32
    ).eval()


def test_folder_loads_offline_as_the_real_classes(
    tiny_model_dir: Path, processor: Any, hf_model: Any
) -> None:
    assert type(hf_model).__name__ == "Gemma3ForConditionalGeneration"
    assert type(processor).__name__ == "Gemma3Processor"
    config = hf_model.config
    vision = config.vision_config
    assert (vision.image_size, vision.patch_size) == (896, 14)
    assert vision.image_size // vision.patch_size == 64  # 64x64 patches pooled to 16x16
    assert config.mm_tokens_per_image == model_facts.IMAGE_SOFT_TOKENS
    assert processor.image_seq_length == model_facts.IMAGE_SOFT_TOKENS
    text = config.text_config
    assert {"sliding_attention", "full_attention"} <= set(text.layer_types)
    assert text.num_key_value_heads < text.num_attention_heads  # grouped-query attention
    assert text.max_position_embeddings == model_facts.CONTEXT_LENGTH
    image_processor = processor.image_processor
    assert image_processor.size == {"height": 896, "width": 896}
    assert list(image_processor.image_mean) == [0.5, 0.5, 0.5]
    assert list(image_processor.image_std) == [0.5, 0.5, 0.5]
    # Saved in bfloat16 like the real checkpoint; a few MB at most.
    assert json.loads((tiny_model_dir / "config.json").read_text())["dtype"] == "bfloat16"
    size = sum(p.stat().st_size for p in tiny_model_dir.iterdir())
    assert size < 3 * 1024 * 1024
    assert is_tiny_model(tiny_model_dir)
    assert json.loads((tiny_model_dir / MARKER_FILE).read_text())["coheara_tiny_model"] is True


def test_config_token_ids_match_the_tokenizer(processor: Any, hf_model: Any) -> None:
    tokenizer = processor.tokenizer
    ids = tokenizer.convert_tokens_to_ids
    config = hf_model.config
    assert [ids("<pad>"), ids("<eos>"), ids("<bos>")] == [0, 1, 2]  # as in the real vocabulary
    assert config.text_config.bos_token_id == tokenizer.bos_token_id == ids("<bos>")
    assert config.text_config.pad_token_id == tokenizer.pad_token_id == ids("<pad>")
    assert config.boi_token_index == ids("<start_of_image>") == tokenizer.boi_token_id
    assert config.eoi_token_index == ids("<end_of_image>") == tokenizer.eoi_token_id
    assert config.image_token_index == ids("<image_soft_token>") == tokenizer.image_token_id
    assert set(hf_model.generation_config.eos_token_id) == {ids("<eos>"), ids("<end_of_turn>")}
    # The lm_head is padded wider than the tokenizer, as the real one is.
    assert config.text_config.vocab_size > len(tokenizer)
    for token in ("<start_of_turn>", "<end_of_turn>", "<unused94>", "<unused95>"):
        assert tokenizer(token, add_special_tokens=False)["input_ids"] == [ids(token)]


def test_chat_template_renders_the_gemma_format(processor: Any) -> None:
    messages = [
        {"role": "system", "content": "You are a careful clinician."},
        {"role": "user", "content": "Summarise the note."},
    ]
    rendered = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<bos><start_of_turn>user\nYou are a careful clinician.\n\nSummarise the note."
        "<end_of_turn>\n<start_of_turn>model\n"
    )
    turns = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Read it."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Normal."}]},
        {"role": "user", "content": "Sure?"},
    ]
    rendered = processor.apply_chat_template(turns, tokenize=False, add_generation_prompt=False)
    assert rendered == (
        "<bos><start_of_turn>user\n<start_of_image>Read it.<end_of_turn>\n"
        "<start_of_turn>model\nNormal.<end_of_turn>\n<start_of_turn>user\nSure?<end_of_turn>\n"
    )
    with pytest.raises(Exception, match="alternate"):
        processor.apply_chat_template(
            [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], tokenize=False
        )


@pytest.mark.parametrize(
    "text",
    [
        "Temp 37.8 °C, K⁺ 4.1 mmol/L, Hb ≥ 12 g/dL, β-blocker → stop",
        "患者は胸痛を訴えた。 المريض يعاني من ألم في الصدر",
        "🩺🫀 e\u0301 Z\u0308 \u200d👩\u200d⚕️ \U0001f9ec",
        "tabs\tand\r\nCRLF\n\n\nnul\x00 bell\x07 end",
        '{"a": [1, 2.5e-3, null, true], "b": "\\u00e9"}',
    ],
)
def test_tokenizer_round_trips_any_unicode(processor: Any, text: str) -> None:
    tokenizer = processor.tokenizer
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text
    assert tokenizer(text)["input_ids"] == [tokenizer.bos_token_id, *ids]  # bos as real Gemma


def test_reasoning_markers_survive_decoding_but_turn_markers_do_not(processor: Any) -> None:
    tokenizer = processor.tokenizer
    text = "<unused94>thought: check K+<unused95>Potassium is normal.<end_of_turn><eos>"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == (
        "<unused94>thought: check K+<unused95>Potassium is normal."
    )


def test_an_image_costs_the_real_260_prompt_tokens(processor: Any) -> None:
    prompt = "<bos><start_of_turn>user\n{}Describe.<end_of_turn>\n<start_of_turn>model\n"
    text_only = processor(text=[prompt.format("")], add_special_tokens=False)
    white = np.full((896, 896, 3), 255, dtype=np.uint8)
    black = np.zeros((896, 896, 3), dtype=np.uint8)
    from PIL import Image

    with_images = processor(
        text=[prompt.format("<start_of_image><start_of_image>")],
        images=[[Image.fromarray(white), Image.fromarray(black)]],
        add_special_tokens=False,
        return_tensors="pt",
    )
    ids = with_images["input_ids"][0].tolist()
    tokenizer = processor.tokenizer
    assert ids.count(tokenizer.image_token_id) == 2 * model_facts.IMAGE_SOFT_TOKENS
    assert ids.count(tokenizer.boi_token_id) == ids.count(tokenizer.eoi_token_id) == 2
    extra = len(ids) - len(text_only["input_ids"][0])
    assert extra == 2 * model_facts.IMAGE_PROMPT_TOKENS
    pixels = with_images["pixel_values"]
    assert tuple(pixels.shape) == (2, 3, 896, 896)
    assert torch.all(pixels[0] == 1.0) and torch.all(pixels[1] == -1.0)  # scaled to [-1, 1]


def test_pixels_reach_the_language_model(processor: Any, hf_model: Any) -> None:
    """The projector is not left at its zero init: two images give two different next tokens."""
    from PIL import Image

    prompt = "<bos><start_of_turn>user\n<start_of_image>What is it?<end_of_turn>\n"
    rng = np.random.default_rng(0)
    logits = []
    for pixels in (rng.integers(0, 256, (896, 896, 3)), np.zeros((896, 896, 3))):
        image = Image.fromarray(pixels.astype(np.uint8))
        inputs = processor(
            text=[prompt], images=[[image]], add_special_tokens=False, return_tensors="pt"
        )
        with torch.inference_mode():
            logits.append(hf_model(**inputs).logits[0, -1])
    assert not torch.allclose(logits[0], logits[1], atol=1e-3)


def test_build_is_deterministic(tiny_model_dir: Path, tmp_path: Path) -> None:
    again = build_tiny_model(tmp_path / "again", seed=0)
    for name in ("tokenizer.json", "model.safetensors", "config.json", "chat_template.jinja"):
        assert (again / name).read_bytes() == (tiny_model_dir / name).read_bytes(), name
