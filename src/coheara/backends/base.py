"""The one small interface every runtime implements, and the neutral types it speaks.

A backend maps a `ChatRequest` to its wire format and its client library's
errors to `coheara.errors`; it knows nothing of tasks, budgets or HTTP callers.
Messages reaching a backend already follow the Gemma rules (user and model
alternating, the last one from the user, the system text carried by the first
user turn).
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from coheara.errors import UnsupportedCapabilityError
from coheara.imaging import PreparedImage

Role = Literal["user", "assistant"]


Part = str | PreparedImage
"""One piece of a turn's content: a text or an image."""


@dataclass(frozen=True)
class Message:
    role: Role
    text: str
    images: tuple[PreparedImage, ...] = ()
    system: str = ""
    """The system text, on the first user turn only. Gemma has no system role: a chat
    template folds it in front of the turn (before its images); a runtime that takes
    the turn as plain text gets `folded_text`."""
    parts: tuple[Part, ...] = ()
    """Texts and images in the order the model should see them (a CT volume: each slice
    followed by its `SLICE n` label). Empty means images first, then `text`. Runtimes
    that cannot interleave (Ollama) use `text` and `images`, which `from_parts` keeps
    consistent with the parts."""

    @classmethod
    def from_parts(cls, role: Role, parts: tuple[Part, ...], *, system: str = "") -> Message:
        texts = [p for p in parts if isinstance(p, str)]
        images = tuple(p for p in parts if not isinstance(p, str))
        return cls(role, "\n".join(texts), images, system, parts)

    @property
    def ordered_parts(self) -> tuple[Part, ...]:
        """The content in order, whichever way the message was built."""
        if self.parts:
            return self.parts
        return (*self.images, self.text) if self.text else self.images

    def with_text_appended(self, extra: str) -> Message:
        """The same turn with `extra` after a blank line, at the end of its content."""
        if self.parts:
            return Message.from_parts(self.role, (*self.parts, extra.strip()), system=self.system)
        return replace(self, text=f"{self.text}\n\n{extra}".strip())

    @property
    def folded_text(self) -> str:
        return f"{self.system}\n\n{self.text}" if self.system else self.text


@dataclass(frozen=True)
class GenerationOptions:
    """Greedy by default: the clinical recommendation for a drafting model."""

    max_tokens: int = 1024
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    adapter: str | None = None
    """A registered LoRA adapter (`coheara adapters list`) to generate with; None: the base
    model. Only the in-process Transformers backend applies one; the others refuse it."""


@dataclass(frozen=True)
class ChatRequest:
    messages: tuple[Message, ...]
    options: GenerationOptions = field(default_factory=GenerationOptions)
    json_schema: dict[str, Any] | None = None
    """When set, the backend constrains decoding to this (already bounded) schema if it can."""

    @property
    def images(self) -> tuple[PreparedImage, ...]:
        return tuple(image for message in self.messages for image in message.images)


REMOTE_ADAPTER_HINT = (
    "only the transformers backend applies a registered adapter per request; vLLM serves an "
    "exported LoRA adapter under its own model name: `coheara adapters export NAME --format "
    "vllm --out DIR`, start vLLM with --enable-lora --lora-modules NAME=DIR, and use NAME as "
    "the model (COHEARA_OPENAI_MODEL)"
)


def refuse_adapter(request: ChatRequest, backend: str) -> None:
    """A remote runtime cannot switch LoRA adapters per request: refuse, never ignore."""
    if request.options.adapter is not None:
        raise UnsupportedCapabilityError(
            f"the {backend} backend cannot apply adapter {request.options.adapter!r} per request",
            hint=REMOTE_ADAPTER_HINT,
        )


FinishReason = Literal["stop", "length", "cancelled", "degenerate"]


@dataclass(frozen=True)
class StreamEvent:
    """A text delta, or (with `done`) the closing event carrying the backend's counts."""

    text: str = ""
    done: bool = False
    finish_reason: FinishReason | None = None
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    endpoint: str | None = None
    """On the closing event of a pool of replicas: the URL (without credentials) that
    answered. None from a single backend (the engine names its one endpoint)."""
    failovers: int = 0
    """On the closing event of a pool: endpoints given up on, before the first event,
    before this one answered."""


@dataclass(frozen=True)
class Capabilities:
    backend: str
    model: str
    vision: bool
    context_length: int
    constrained_decoding: bool
    exact_token_count: bool
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Health:
    ok: bool
    backend: str
    detail: str
    version: str | None = None


@dataclass(frozen=True)
class EndpointStatus:
    """One endpoint (a runtime's URL, or a model in process) as routing and metrics see it."""

    name: str
    """The URL without credentials, or the backend's name for an in-process model."""
    healthy: bool | None
    """None until checked."""
    in_flight: int = 0
    consecutive_failures: int = 0


class Backend(ABC):
    """A runtime. Subclasses implement `stream`, `capabilities`, `health`."""

    name: str = "backend"
    model: str = ""

    @abstractmethod
    def stream(self, request: ChatRequest) -> AsyncGenerator[StreamEvent, None]:
        """Yield text deltas then exactly one `done` event. Closing the iterator cancels."""

    @abstractmethod
    async def capabilities(self) -> Capabilities:
        """Read once per model and cached by the implementation."""

    @abstractmethod
    async def health(self) -> Health:
        """Cheap liveness: never raises."""

    def count_prompt_tokens(self, request: ChatRequest) -> int | None:
        """Exact prompt size where a tokenizer is at hand, else None."""
        return None

    @property
    def context_window(self) -> int | None:
        """The window this deployment runs with, where the backend fixes one (Ollama's num_ctx)."""
        return None

    def endpoints(self) -> list[EndpointStatus]:
        """The endpoints behind this backend: one, unless it is a pool of replicas."""
        return [EndpointStatus(name=self.name, healthy=None)]

    async def readiness(self, timeout_s: float) -> list[EndpointStatus]:
        """`endpoints()` with `healthy` known, for /readyz: here the backend's own `health()`,
        bounded by `timeout_s`; a pool answers from its cached state instead."""
        try:
            health = await asyncio.wait_for(self.health(), timeout=timeout_s)
            ok = health.ok
        except TimeoutError:
            ok = False
        return [replace(status, healthy=ok) for status in self.endpoints()]

    async def chat(self, request: ChatRequest) -> tuple[str, StreamEvent]:
        """Non-streaming convenience: the whole text and the closing event."""
        parts: list[str] = []
        final = StreamEvent(done=True, finish_reason="stop")
        async for event in self.stream(request):
            parts.append(event.text)
            if event.done:
                final = event
        return "".join(parts), final

    async def aclose(self) -> None:  # noqa: B027 (optional hook, not abstract)
        """Release connections or models."""
