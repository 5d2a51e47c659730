"""A tiny random-weight checkpoint of MedGemma's real architecture, built in seconds.

No weights can be downloaded where the tests run, so the in-process backend is
exercised on this: a real `Gemma3ForConditionalGeneration` (Gemma 3 decoder with
sliding and full attention, SigLIP vision tower at 896x896 with 14 px patches,
the 64x64 -> 16x16 pooling projector giving 256 soft tokens an image), a real
`Gemma3Processor`, the Gemma chat format and the Gemma special tokens by name.
Only the sizes are small and the weights random, so every code path of the real
pipeline runs (template, image expansion, vision tower, generation, grammar
constraint) while the output text is gibberish.

The weights are saved in bfloat16 like the real checkpoint, so a loader that
trusts the file's dtype instead of choosing one (float32 on CPU, never float16)
behaves here as it would on the real weights; bfloat16 values widen to float32
exactly. The folder is about 1 MB.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

MARKER_FILE = "coheara_tiny.json"
"""Written into the folder: says it is the random test model, never a real MedGemma."""

SPECIAL_TOKENS = (
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
)
"""Special tokens, in id order: pad 0, eos 1, bos 2, unk 3 as in the real Gemma vocabulary."""

VISIBLE_ADDED_TOKENS = ("<unused94>", "<unused95>")
"""Whole tokens that decode as visible text, as MedGemma's hidden-reasoning markers do."""

BPE_VOCAB_SIZE = 768
IMAGE_SIZE = 896
PATCH_SIZE = 14
IMAGE_SEQ_LENGTH = 256

# The real Gemma 3 chat template, unchanged in substance: no system role (its text and a
# blank line go in front of the first user turn), roles must alternate, `assistant` is
# rendered as `model`, an image item is the `<start_of_image>` placeholder that the
# processor expands to the full image sequence.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}"
    "{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- set role = 'model' -%}"
    "{%- else -%}"
    "{%- set role = message['role'] -%}"
    "{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{%- if message['content'] is string -%}"
    "{{ message['content'] | trim }}"
    "{%- elif message['content'] is iterable -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}"
    "{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}"
    "{{ item['text'] | trim }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- else -%}"
    "{{ raise_exception('Invalid content type') }}"
    "{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<start_of_turn>model\n' }}"
    "{%- endif -%}"
)

_FINDINGS = (
    "chest pain radiating to the left arm",
    "shortness of breath on exertion",
    "fever and productive cough",
    "bilateral lower limb oedema",
    "right lower lobe consolidation",
    "no acute cardiopulmonary abnormality",
    "mild cardiomegaly with small pleural effusions",
    "elevated troponin and ST depression",
    "hypoglycaemia after insulin",
    "confusion and urinary retention",
)
_MEDICATIONS = (
    "metformin 500 mg twice daily",
    "lisinopril 10 mg once daily",
    "atorvastatin 40 mg at night",
    "amoxicillin 875 mg every 12 hours",
    "furosemide 40 mg IV",
    "apixaban 5 mg BID",
    "insulin glargine 20 units",
    "paracetamol 1 g q6h PRN",
)
_CODES = ("I21.4", "J18.9", "E11.9", "I50.9", "N39.0", "R07.9", "Z95.1", "K35.80")
_WORDS = (
    "patient",
    "history",
    "assessment",
    "plan",
    "diagnosis",
    "medication",
    "allergy",
    "findings",
    "impression",
    "follow-up",
    "discharge",
    "handoff",
    "radiograph",
    "CT",
    "MRI",
    "ECG",
    "creatinine",
    "haemoglobin",
    "sodium",
    "potassium",
    "true",
    "false",
    "null",
)
_UNICODE = (
    "µmol/L",
    "37.8 °C",
    "±",
    "≥",
    "≤",
    "café",
    "naïve",
    "Müller",
    "→",
    "×10⁹/L",
    "β-blocker",
)


def _corpus(seed: int) -> Iterator[str]:
    """A small synthetic clinical corpus: notes, labs, JSON, Unicode; deterministic."""
    rng = random.Random(seed)
    for i in range(400):
        age = rng.randint(18, 95)
        sex = rng.choice(("male", "female"))
        finding = rng.choice(_FINDINGS)
        med = rng.choice(_MEDICATIONS)
        code = rng.choice(_CODES)
        value = round(rng.uniform(0.1, 250.0), 1)
        yield (
            f"Patient {i}: {age}-year-old {sex} with {finding}.\n\n"
            f"Medications: {med}. Creatinine {value} µmol/L, temperature 37.{i % 10} °C.\n"
            f"Assessment: {finding}; ICD-10 {code}.\n"
        )
        yield json.dumps(
            {
                "diagnosis": finding,
                "code": code,
                "age": age,
                "confidence": round(rng.random(), 2),
                "medications": [med],
                "urgent": rng.random() < 0.5,
                "notes": None,
            },
            ensure_ascii=False,
        )
        yield " ".join(rng.choice(_WORDS + _UNICODE) for _ in range(12)) + "\n"


def build_tokenizer(seed: int = 0) -> PreTrainedTokenizerFast:
    """Byte-level BPE (encodes any Unicode) carrying the Gemma special tokens by name."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    # A blank line is one token in Gemma's vocabulary; isolating it keeps the image sequence
    # ("\n\n" <start_of_image> 256 x soft token <end_of_image> "\n\n") at the real 260 tokens.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex("\n\n"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(seed), trainer)
    tokenizer.add_tokens(
        [AddedToken(t, normalized=False, special=False) for t in VISIBLE_ADDED_TOKENS]
    )
    bos = tokenizer.token_to_id("<bos>")
    # Like the real Gemma tokenizer, plain encoding prepends <bos>; the chat template writes
    # its own, so callers must tokenize a rendered prompt with add_special_tokens=False.
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
        model_max_length=131_072,
        extra_special_tokens={
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
            "sot_token": "<start_of_turn>",
            "eot_token": "<end_of_turn>",
        },
    )


def build_processor(seed: int = 0) -> tuple[Any, dict[str, int]]:
    """The tiny model's `Gemma3Processor` (tokenizer, chat template, 896 px image
    processor) and the ids of its special tokens, for any model sized to match."""
    from transformers import Gemma3ImageProcessorPil, Gemma3Processor

    tokenizer = build_tokenizer(seed)
    ids: dict[str, int] = {
        t: int(tokenizer.convert_tokens_to_ids(t))  # type: ignore[arg-type]
        for t in (*SPECIAL_TOKENS, *VISIBLE_ADDED_TOKENS)
    }
    image_processor = Gemma3ImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        resample=2,  # PIL bilinear, as the real Gemma 3 processor
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_convert_rgb=True,
        do_pan_and_scan=False,
    )
    processor = Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
        image_seq_length=IMAGE_SEQ_LENGTH,
    )
    return processor, ids


def build_tiny_model(path: Path, *, seed: int = 0) -> Path:
    """Write the tiny checkpoint, processor and tokenizer to `path`; return `path`."""
    import torch
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3TextConfig,
        GenerationConfig,
        SiglipVisionConfig,
    )
    from transformers.utils import logging as hf_logging

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    processor, ids = build_processor(seed)
    tokenizer = processor.tokenizer
    # The real lm_head is wider than the tokenizer (262208 vs 262145 entries): pad the same
    # way so that vocabulary-size mismatches (grammar masks, decoding) are exercised.
    vocab_size = -(-len(tokenizer) // 64) * 64

    text_config = Gemma3TextConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        query_pre_attn_scalar=32,
        sliding_window=16,
        layer_types=["sliding_attention", "full_attention"],
        max_position_embeddings=131_072,
        pad_token_id=ids["<pad>"],
        bos_token_id=ids["<bos>"],
        eos_token_id=[ids["<eos>"], ids["<end_of_turn>"]],
    )
    vision_config = SiglipVisionConfig(
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        vision_use_head=False,
    )
    config = Gemma3Config(
        text_config=text_config,
        vision_config=vision_config,
        mm_tokens_per_image=IMAGE_SEQ_LENGTH,
        boi_token_index=ids["<start_of_image>"],
        eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"],
    )
    # Keyword construction stores the ids on the top-level config too (as the real one has).
    config.pad_token_id = ids["<pad>"]
    config.bos_token_id = ids["<bos>"]
    config.eos_token_id = [ids["<eos>"], ids["<end_of_turn>"]]

    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        # The projector weight starts at zero, which would make every image invisible to the
        # text model; give it random values so that pixels change what the model says.
        projector = model.model.multi_modal_projector.mm_input_projection_weight
        generator = torch.Generator().manual_seed(seed + 1)
        projector.copy_(torch.randn(projector.shape, generator=generator) * 0.5)
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<bos>"],
        pad_token_id=ids["<pad>"],
        eos_token_id=[ids["<eos>"], ids["<end_of_turn>"]],
        do_sample=False,
    )

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        model.to(torch.bfloat16).save_pretrained(path)
        processor.save_pretrained(path)
    finally:
        hf_logging.enable_progress_bar()
        hf_logging.set_verbosity(verbosity)
    marker = {
        "coheara_tiny_model": True,
        "warning": "random weights: for tests only, its output is meaningless",
        "seed": seed,
        "dtype": "bfloat16",
        "vocab_size": vocab_size,
        "tokenizer_size": len(tokenizer),
        "image_seq_length": IMAGE_SEQ_LENGTH,
        "token_ids": ids,
    }
    (path / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    return path


def is_tiny_model(path: str | Path) -> bool:
    """True when `path` holds the random test model (so callers can say so)."""
    return (Path(path) / MARKER_FILE).is_file()
