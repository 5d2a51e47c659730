"""What every dialect shares: the engine call, model names, images, cancellation, streaming.

A dialect's router only translates its wire format into an `EngineCall` and the
engine's chunks back into its wire format. Running the call (so that the
budget, guards and validation apply), cancelling it when the client goes
away, and surfacing errors before or after the first byte all happen here, once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from coheara.backends.base import Capabilities, GenerationOptions
from coheara.engine import Engine, GenerationResult, InputMessage, StreamChunk
from coheara.engine.chat_format import InputRole
from coheara.errors import RequestTooLargeError
from coheara.imaging import PreparedImage, decode_base64_image, limits
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
    _accepted: set[str] | None = None

    async def capabilities(self) -> Capabilities:
        return await self.engine.capabilities()

    async def model_names(self) -> list[str]:
        """The ids this server advertises, the backend's own first.

        Advertised: the backend's model id (`capabilities().model`), the configured model
        names (`COHEARA_MODEL`, `COHEARA_OLLAMA_MODEL`, `COHEARA_OPENAI_MODEL`, so an
        application configured for Ollama or vLLM works unchanged) and "medgemma". A
        weights folder is advertised by its folder name only: a client never learns the
        server's file layout (the full path is still accepted, see `check_model`).
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
            accepted: set[str] = set()
            for name in candidates:
                if not name:
                    continue
                public = public_model_name(name)
                accepted |= {_normal(name), _normal(public)}
                if _normal(public) not in {_normal(n) for n in names}:
                    names.append(public)
            self._names, self._accepted = names, accepted
        return self._names

    async def check_model(self, name: str | None, dialect: Dialect) -> None:
        """Refuse any id that is not ours, in the dialect's own words (404).

        Matching ignores case and Ollama's implicit ":latest" tag; a weights folder is
        accepted by its full path as well as by its advertised folder name.
        """
        if name is None:
            return
        names = await self.model_names()
        assert self._accepted is not None
        if _normal(name) not in self._accepted:
            raise unknown_model(dialect, name, names)


_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:[\\/]")


def is_filesystem_path(name: str) -> bool:
    """Whether a model id names a folder (Transformers weights) rather than a registry id."""
    if name in (".", "..") or name.startswith(("/", "./", "../", "~")):
        return True
    if "\\" in name or _WINDOWS_DRIVE.match(name):  # a Windows path
        return True
    try:
        return Path(name).is_dir()  # a relative folder, such as "models/medgemma"
    except (OSError, ValueError):
        return False


def public_model_name(name: str) -> str:
    """A weights folder's final name (never its path); any other id unchanged."""
    if not is_filesystem_path(name):
        return name
    path = Path(name.replace("\\", "/")).expanduser()
    return path.name or path.resolve().name or ALIAS


def published(result: GenerationResult) -> GenerationResult:
    """The result as a client sees it: the model named by its advertised id, never a path."""
    public = public_model_name(result.model)
    if public == result.model:
        return result
    return result.model_copy(update={"model": public})


def _normal(name: str) -> str:
    name = name.strip().lower()
    return name.removesuffix(":latest")


async def get_state(request: Request) -> ServerState:
    """FastAPI dependency: the engine and settings this app was built with (async: a plain
    function would cost every request a hop to the thread pool)."""
    state: ServerState = request.app.state.coheara
    return state


# ----- the call -----------------------------------------------------------------------


@dataclass(frozen=True)
class Turn:
    """One message as a dialect received it, its images still base64 or data URIs.

    `parts`, when given, keeps texts and images in the order the client sent them
    (an OpenAI content array: a CT volume's slices each followed by its `SLICE n`),
    as ("text", text) and ("image", data) pairs; `text` and `images` are then unused.
    """

    role: InputRole
    text: str = ""
    images: Sequence[str] = ()
    parts: Sequence[tuple[Literal["text", "image"], str]] = ()

    @property
    def image_count(self) -> int:
        if self.parts:
            return sum(1 for kind, _ in self.parts if kind == "image")
        return len(self.images)

    @property
    def text_chars(self) -> int:
        if self.parts:
            return sum(len(value) for kind, value in self.parts if kind == "text")
        return len(self.text)


def text_chars(value: Any) -> int:
    """Characters in every string of a JSON-like value (a task's input), keys included."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(len(str(key)) + text_chars(item) for key, item in value.items())
    if isinstance(value, list | tuple):
        return sum(text_chars(item) for item in value)
    return 0


def check_text_chars(count: int, settings: Settings) -> None:
    """Refuse a request with more text than the deployment allows (413), before any work."""
    most = settings.max_text_chars
    if count > most:
        raise RequestTooLargeError(
            f"the request holds {count} characters of text; at most {most} are allowed",
            hint="send less text, or raise COHEARA_MAX_TEXT_CHARS",
        )


async def decode_turns(turns: Sequence[Turn], settings: Settings) -> list[InputMessage]:
    """The conversation in the engine's terms, images numbered across all turns.

    The image count is checked before any image is decoded, and every image is held to
    the deployment's limits (`Settings.image_limits`). Decoding and resizing happen off
    the event loop, all images in one go; a server never opens a path or a URL a client
    names (`decode_base64_image`).
    """
    check_text_chars(sum(turn.text_chars for turn in turns), settings)
    image_limits = settings.image_limits()
    with limits.applied(image_limits):
        limits.check_image_count(sum(turn.image_count for turn in turns))

    def convert() -> list[InputMessage]:
        messages: list[InputMessage] = []
        count = 0

        def decode(data: str) -> PreparedImage:
            nonlocal count
            count += 1
            return decode_base64_image(data, label=f"image {count}")

        with limits.applied(image_limits):
            for turn in turns:
                if turn.parts:
                    parts = [
                        decode(value) if kind == "image" else value for kind, value in turn.parts
                    ]
                    messages.append(InputMessage.from_parts(turn.role, parts))
                else:
                    images = tuple(decode(data) for data in turn.images)
                    messages.append(InputMessage(turn.role, turn.text, images))
        return messages

    if not any(turn.image_count for turn in turns):
        return convert()
    return await asyncio.to_thread(convert)


@dataclass
class EngineCall:
    """A dialect's request, in the engine's terms."""

    messages: list[InputMessage] = field(default_factory=list)
    schema: dict[str, Any] | None = None
    options: GenerationOptions = field(default_factory=GenerationOptions)

    def stream(self, engine: Engine) -> AsyncGenerator[StreamChunk, None]:
        """Every dialect's way in: `Engine.stream`, so budget, guards and validation apply.

        Besides text deltas and the closing result, the engine yields an empty chunk as
        soon as the backend has answered (even while hidden reasoning is held back):
        `open_stream` needs it, and every dialect sends nothing for it.
        """
        return engine.stream(
            messages=self.messages or None, schema=self.schema, options=self.options
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
    """Greedy unless the caller asks otherwise (the clinical default); one stop list.

    The output cap of the model card is the engine's to apply, for every caller alike.
    """
    if isinstance(stop, str):
        stop = [stop]
    return GenerationOptions(
        max_tokens=max_tokens if max_tokens is not None else settings.max_output_tokens,
        temperature=temperature if temperature is not None else 0.0,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        stop=tuple(s for s in (stop or ()) if s),
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
    """Drain an engine stream to its (published) result, closing it whatever happens."""
    try:
        async for chunk in chunks:
            if chunk.result is not None:
                return published(chunk.result)
    finally:
        await chunks.aclose()
    raise RuntimeError("the engine stream ended without a result")


async def run_once(request: Request, engine: Engine, call: EngineCall) -> GenerationResult:
    """The non-streaming path: the whole result, or the engine's error before any byte."""
    return await until_disconnect(request, collect(call.stream(engine)))


class OpenedStream:
    """An engine stream whose first chunk has arrived, so early errors had their HTTP status.

    Iterate it for every chunk (the first one included; its result, if any, published);
    a chunk with neither text nor result only says that the backend has answered, and a
    dialect sends nothing for it. A dialect's body generator must call `aclose()` in its
    `finally`, which stops the engine and the backend.
    """

    def __init__(self, first: StreamChunk, rest: AsyncGenerator[StreamChunk, None]) -> None:
        self._first: StreamChunk | None = first
        self._rest = rest

    def __aiter__(self) -> OpenedStream:
        return self

    async def __anext__(self) -> StreamChunk:
        if self._first is not None:
            chunk, self._first = self._first, None
        else:
            chunk = await self._rest.__anext__()
        if chunk.result is not None:
            chunk = chunk.model_copy(update={"result": published(chunk.result)})
        return chunk

    async def aclose(self) -> None:
        await self._rest.aclose()


async def open_stream(request: Request, engine: Engine, call: EngineCall) -> OpenedStream:
    """Start streaming, but wait for the engine's first chunk before the status line goes out.

    Bad input, an unknown capability or a context overflow is then a proper 4xx in the
    dialect's shape; only what fails after the backend answered travels inside the
    stream. The engine yields an empty chunk as soon as the backend answers, so the
    headers go out then, not after a long hidden-reasoning block.
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
