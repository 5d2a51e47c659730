"""Coheara: run MedGemma 1.5 4B on the site's own hardware, as validated, traceable drafts."""

from coheara.backends.base import GenerationOptions
from coheara.engine import (
    Engine,
    ExtractionResult,
    GenerationResult,
    InputMessage,
    StreamChunk,
    SyncEngine,
)
from coheara.settings import Settings, load_settings

__version__ = "0.1.0"

__all__ = [
    "Engine",
    "ExtractionResult",
    "GenerationOptions",
    "GenerationResult",
    "InputMessage",
    "Settings",
    "StreamChunk",
    "SyncEngine",
    "load_settings",
]
