"""What every call returns: the output and its evidence."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class GenerationResult(BaseModel):
    """A draft and how it was made. Token counts are the backend's where it reports them."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    text: str
    finish_reason: str = Field(description="stop, length, cancelled or degenerate")
    prompt_tokens: int
    prompt_tokens_exact: bool = Field(description="counted by a tokenizer or the backend")
    output_tokens: int
    time_to_first_token_s: float | None
    total_s: float
    tokens_per_s: float | None
    backend: str
    model: str
    reasoning_chars: int = Field(0, description="hidden reasoning stripped from the text")
    attempts: int = 1
    endpoint: str | None = Field(
        None,
        description="The endpoint that answered: a runtime's URL (without credentials) or "
        "the backend's name; with replicas, the one the last call was routed to.",
    )
    failovers: int = Field(
        0,
        description="Endpoints given up on (failed before their first token) before one "
        "answered, over every call this result took.",
    )
    warnings: list[str] = Field(default_factory=list)
    images: list[dict[str, Any]] = Field(
        default_factory=list,
        description="What was done to each image sent, in order (recipe, window, frame, "
        "slice or tile position): non-identifying provenance, never metadata.",
    )


class ExtractionResult(GenerationResult):
    """Structured extraction: `value` is schema-valid (a model instance for a Pydantic schema).

    Its token counts add up every call it took: repair retries and field-by-field calls.
    """

    strategy: Literal["whole", "repaired", "field_by_field"] = Field(
        "whole",
        description="How the value was obtained: the whole object in one constrained call, "
        "after repair retries, or assembled in code from one call per top-level field.",
    )

    value: Any


class StreamChunk(BaseModel):
    """A visible text delta; the last chunk carries the whole result instead."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    text: str = ""
    attempt: int = 1
    """Structured extraction restarts on a repair retry: a new attempt number says so."""
    result: GenerationResult | None = None
