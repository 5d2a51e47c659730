"""Facts about MedGemma 1.5 4B that the code must respect (DESIGN.md section 1)."""

from __future__ import annotations

CONTEXT_LENGTH = 131_072
"""Trained context window, in tokens."""

MAX_OUTPUT_TOKENS = 8_192
"""Longest reply the model card allows."""

# ----- architecture (Gemma 3 4B text decoder, SigLIP image encoder) -----
TEXT_LAYERS = 34
QUERY_HEADS = 8
KV_HEADS = 4
HEAD_DIM = 256
HIDDEN_SIZE = 2560
INTERMEDIATE_SIZE = 10240
VOCAB_SIZE = 262_208
SLIDING_WINDOW = 1024
GLOBAL_LAYERS = 5
"""Full attention on every 6th layer (5, 11, 17, 23, 29); the other 29 see 1024 tokens."""
VISION_LAYERS = 27
VISION_HIDDEN = 1152
VISION_HEADS = 16
VISION_PATCHES = 4096
"""896 / 14 = 64 patches a side, before pooling to 256 soft tokens."""
PARAMETERS = 4.3e9
"""Text decoder and image encoder together."""
WEIGHTS_GB = {"bf16": 8.6, "q8_0": 5.0, "q4_K_M": 3.3}
"""Download sizes in GB (10^9 bytes), as the Ollama library lists them; vision included."""

IMAGE_SIZE = 896
"""Every image is resized to a square of this side before the encoder."""

IMAGE_SOFT_TOKENS = 256
IMAGE_PROMPT_TOKENS = 260
"""256 soft tokens plus begin/end-of-image markers and their newlines."""

DEFAULT_OLLAMA_MODEL = "MedAIBase/MedGemma1.5:4b"
"""The community build the founding spec names; Ollama lists it as text only."""

VISION_OLLAMA_ALTERNATIVE = "ktiyab/coheara-medgemma-4b-q8"
"""Named in errors as a vision-capable build to pull instead: MedGemma 1.5 4B IT, Q8_0,
built from the original safetensors, listed in the Ollama library with vision."""

DEFAULT_HF_MODEL = "google/medgemma-1.5-4b-it"

REASONING_OPEN = "<unused94>"
REASONING_CLOSE = "<unused95>"
END_OF_TURN = "<end_of_turn>"

CONTROL_TOKENS = (
    "<bos>",
    "<eos>",
    "<pad>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
)
"""Markers that structure the prompt: text that carries one could forge a turn or an image."""
