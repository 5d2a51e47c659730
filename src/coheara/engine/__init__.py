"""Backend-neutral inference: the three modes, the context budget and the guards."""

from coheara.engine.chat_format import InputMessage
from coheara.engine.engine import Engine
from coheara.engine.result import ExtractionResult, GenerationResult, StreamChunk
from coheara.engine.sync import SyncEngine

__all__ = [
    "Engine",
    "ExtractionResult",
    "GenerationResult",
    "InputMessage",
    "StreamChunk",
    "SyncEngine",
]
