"""What every dialect shares: the engine call, model names, images, cancellation, streaming.

A dialect's router only translates its wire format into an `EngineCall` and the
engine's chunks back into its wire format. Running the call (so that the
budget, guards and validation apply), cancelling it when the client goes
away, and surfacing errors before or after the first byte all happen here, once.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from coheara import model_facts
from coheara.backends.base import Capabilities, GenerationOptions
from coheara.engine import Engine, GenerationResult, InputMessage, StreamChunk
from coheara.errors import ImageError
from coheara.imaging import PreparedImage, load_image
from coheara.server.errors import ClientGone, Dialect, unknown_model
from coheara.settings import Settings

T = TypeVar("T")

ALIAS = "medgemma"
"""The short name every dialect accepts for the one model this server runs."""

PERMISSIVE_OBJECT_SCHEMA: dict[str, Any] = {"type": "object"}
"""What `"json"` and `json_object` ask for: any object (the engine still bounds and checks it)."""


# ----- state and model names ----------------------------------------------------------


@dataclass
class ServerState:
    """Held on `app.state.coheara`; one engine behind every route."""

    engine: Engine
    settings: Settings
    _names: list[str] | None = None

    async def capabilities(self) -> Capabilities:
        return await self.engine.capabilities()

    async def window(self) -> int:
        """The context window in force: the deployment's, never more than the model's."""
        capabilities = await self.capabilities()
        declared = self.engine.backend.context_window
        trained = capabilities.context_length
        return min(declared, trained) if declared else trained

    async def model_names(self) -> list[str]:
        """The ids this server answers to, the backend's own first.

        Accepted: the backend's model id (`capabilities().model`), the configured model
        names (`COHEARA_MODEL`, `COHEARA_OLLAMA_MODEL`, `COHEARA_OPENAI_MODEL`, so an
        application configured for Ollama or vLLM works unchanged) and "medgemma".
        Matching ignores case and Ollama's implicit ":latest" tag.
        """
        if self._names is None:
            capabilities = await self.capabilities()
            candidates = [
                capabilities.model,
                self.settings.model,
                self.settings.ollama_model,
                self.settings.openai_model,
                ALIAS,
            ]
            names: list[str] = []
            for name in candidates:
                if name and _normal(name) not in {_normal(n) for n in names}:
                    names.append(name)
            self._names = names
        return self._names

    async def check_model(self, name: str | None, dialect: Dialect) -> None:
        """Refuse any id that is not ours, in the dialect's own words (404)."""
        if name is None:
            return
        names = await self.model_names()
        if _normal(name) not in {_normal(n) for n in names}:
            raise unknown_model(dialect, name, names)


def _normal(name: str) -> str:
    name = name.strip().lower()
    return name.removesuffix(":latest")


def get_state(request: Request) -> ServerState:
    """FastAPI dependency: the engine and settings this app was built with."""
    state: ServerState = request.app.state.coheara
    return state


# ----- the call -----------------------------------------------------------------------


@dataclass
class EngineCall:
    """A dialect's request, in the engine's terms."""

    messages: list[InputMessage] = field(default_factory=list)
    prompt: str | None = None
    system: str | None = None
    images: list[PreparedImage] = field(default_factory=list)
    schema: dict[str, Any] | None = None
    options: GenerationOptions = field(default_factory=GenerationOptions)

    def stream(self, engine: Engine) -> AsyncGenerator[StreamChunk, None]:
        """Every dialect's way in: `Engine.stream`, so budget, guards and validation apply."""
        return engine.stream(
            self.prompt,
            system=self.system,
            images=self.images,
            messages=self.messages or None,
            schema=self.schema,
            options=self.options,
        )


def build_options(
    settings: Settings,
    *,
    max_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    seed: int | None = None,
    stop: str | Sequence[str] | None = None,
) -> GenerationOptions:
    """Greedy unless the caller asks otherwise (the clinical default), output capped by the card."""
    if isinstance(stop, str):
        stop = [stop]
    return GenerationOptions(
        max_tokens=min(
            max_tokens if max_tokens is not None else settings.max_output_tokens,
            model_facts.MAX_OUTPUT_TOKENS,
        ),
        temperature=temperature if temperature is not None else 0.0,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        stop=tuple(s for s in (stop or ()) if s),
    )


def _decode(data: str, label: str) -> PreparedImage:
    """Base64 or a data URI only: a server never opens a path or a URL a client names."""
    text = data.strip()
    if text.startswith("data:"):
        head, _, text = text.partition(",")
        if ";base64" not in head:
            raise ImageError(f"{label}: a data URI must be base64-encoded")
    elif text.startswith(("http://", "https://", "file:")):
        raise ImageError(
            f"{label}: remote or file URLs are not fetched", hint="send the image as base64"
        )
    try:
        raw = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ImageError(f"{label} is not valid base64") from None
    return load_image(raw, label=label)


async def decode_images(items: Sequence[str], *, first: int = 1) -> list[PreparedImage]:
    """Decode and resize off the event loop: an 896x896 resize of a large scan takes a while."""
    if not items:
        return []
    return await asyncio.to_thread(
        lambda: [_decode(item, f"image {first + i}") for i, item in enumerate(items)]
    )


class Evidence(BaseModel):
    """Coheara's evidence, added to the compatible dialects' final objects as `coheara`.

    Their clients ignore an unknown field; a caller who knows it finds the real finish
    reason (the wire's own vocabulary has no "degenerate"), the warnings and the attempts.
    """

    model_config = ConfigDict(extra="ignore")

    finish_reason: str
    warnings: list[str] = Field(default_factory=list)
    attempts: int = 1
    backend: str
    model: str
    prompt_tokens_exact: bool
    time_to_first_token_s: float | None
    total_s: float
    tokens_per_s: float | None
    reasoning_chars: int = 0

    @classmethod
    def of(cls, result: GenerationResult) -> Evidence:
        return cls.model_validate(result.model_dump(exclude={"text", "value"}))


def wire_finish_reason(result: GenerationResult) -> str:
    """The OpenAI/Ollama vocabulary: a loop stopped by the guard is an incomplete reply."""
    return "length" if result.finish_reason in ("length", "degenerate") else "stop"


def structured_content(result: GenerationResult) -> str:
    """The JSON text of a validated reply, re-serialised if the model wrapped it in a fence."""
    try:
        json.loads(result.text)
        return result.text
    except ValueError:
        value = getattr(result, "value", None)
        if isinstance(value, BaseModel):
            return value.model_dump_json()
        return json.dumps(value, ensure_ascii=False)


def ndjson(payload: Any) -> bytes:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def sse(payload: Any) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


# ----- cancellation -------------------------------------------------------------------


async def _wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it if the client hangs up first (raises `ClientGone`).

    Plain asyncio cancellation is used on purpose: it is delivered once, so the
    backend's own clean-up (stopping a generation thread, closing a connection) runs.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request.receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in (task, watcher):
            if not pending.done():
                pending.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pending
    if task.cancelled():
        raise ClientGone()
    return task.result()


async def collect(chunks: AsyncGenerator[StreamChunk, None]) -> GenerationResult:
    """Drain an engine stream to its result, closing it whatever happens."""
    try:
        async for chunk in chunks:
            if chunk.result is not None:
                return chunk.result
    finally:
        await chunks.aclose()
    raise RuntimeError("the engine stream ended without a result")


async def run_once(request: Request, engine: Engine, call: EngineCall) -> GenerationResult:
    """The non-streaming path: the whole result, or the engine's error before any byte."""
    return await until_disconnect(request, collect(call.stream(engine)))


class OpenedStream:
    """An engine stream whose first chunk has arrived, so early errors had their HTTP status.

    Iterate it for every chunk (the first one included); a dialect's body generator
    must call `aclose()` in its `finally`, which stops the engine and the backend.
    """

    def __init__(self, first: StreamChunk, rest: AsyncGenerator[StreamChunk, None]) -> None:
        self._first: StreamChunk | None = first
        self._rest = rest

    def __aiter__(self) -> OpenedStream:
        return self

    async def __anext__(self) -> StreamChunk:
        if self._first is not None:
            first, self._first = self._first, None
            return first
        return await self._rest.__anext__()

    async def aclose(self) -> None:
        await self._rest.aclose()


async def open_stream(request: Request, engine: Engine, call: EngineCall) -> OpenedStream:
    """Start streaming, but wait for the first chunk before the status line goes out.

    Bad input, an unknown capability or a context overflow is then a proper 4xx in the
    dialect's shape; only what fails after the first token travels inside the stream.
    """
    chunks = call.stream(engine)

    async def first() -> StreamChunk:
        try:
            return await chunks.__anext__()
        except BaseException:
            await chunks.aclose()
            raise

    try:
        head = await until_disconnect(request, first())
    except StopAsyncIteration:
        raise RuntimeError("the engine stream ended without a result") from None
    return OpenedStream(head, chunks)


class CancellingStreamingResponse(StreamingResponse):
    """A streaming response that stops the generation as soon as the client goes away.

    Starlette notices a disconnect only on some ASGI versions, and never while
    nothing is being sent (for example while a structured reply is held back until
    it validates). This one always listens, cancels the producer once, and closes
    the body iterator so the engine's generator (and with it the backend) stops.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        streaming = asyncio.ensure_future(self._stream_and_close(send))
        watcher = asyncio.ensure_future(_wait_for_disconnect(receive))
        try:
            await asyncio.wait({streaming, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (streaming, watcher):
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
        failure = None if streaming.cancelled() else streaming.exception()
        if failure is not None and not isinstance(failure, OSError):  # OSError: client gone
            raise failure
        if self.background is not None:
            await self.background()

    async def _stream_and_close(self, send: Send) -> None:
        try:
            await self.stream_response(send)
        finally:
            close: Callable[[], Awaitable[None]] | None = getattr(
                self.body_iterator, "aclose", None
            )
            if close is not None:
                await close()


NDJSON = "application/x-ndjson"


def ndjson_response(body: AsyncIterator[bytes]) -> CancellingStreamingResponse:
    return CancellingStreamingResponse(body, media_type=NDJSON)


def sse_response(body: AsyncIterator[bytes]) -> CancellingStreamingResponse:
    return CancellingStreamingResponse(
        body,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
