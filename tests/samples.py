"""Synthetic inputs shared by the tests: no patient, no file from outside."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image

from coheara.backends.base import Backend, ChatRequest, GenerationOptions, Message, StreamEvent

SYSTEM = "You are a careful clinical assistant."

TRIAGE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "urgent": {"type": "boolean"},
        "side": {"enum": ["left", "right", "both"]},
    },
    "required": ["urgent", "side"],
    "additionalProperties": False,
}


def noise_png(seed: int = 0, size: tuple[int, int] = (64, 48)) -> bytes:
    """A random-noise PNG of `size` (width, height): each seed gives other pixels."""
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def request(text: str = "Summarize: chest film, no findings.", **options: Any) -> ChatRequest:
    """One user turn, as a backend receives it from the engine."""
    return ChatRequest((Message("user", text),), GenerationOptions(**options))


async def collect(backend: Backend, chat: ChatRequest) -> list[StreamEvent]:
    return [event async for event in backend.stream(chat)]
