"""Facts about MedGemma 1.5 4B that the code must respect (DESIGN.md section 1)."""

from __future__ import annotations

CONTEXT_LENGTH = 131_072
"""Trained context window, in tokens."""

MAX_OUTPUT_TOKENS = 8_192
"""Longest reply the model card allows."""

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
