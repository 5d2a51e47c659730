"""Faulty runtimes for the replica and fault-injection tests.

`FaultyOllama` is a raw asyncio HTTP/1.1 server (one request per connection) that
answers Ollama's `/api/version`, `/api/show` and `/api/tags` properly and plays one
scripted fault per `/api/chat` request: a normal reply, a reply cut after some chunks
(the connection reset), a connection closed before any answer, a hang, an HTTP status,
or a slow stream. It watches each chat connection and records when the client closed it
before the reply ended: the proof that a cancelled call reached the backend's socket.

`ScriptedOllama` is `FakeOllama` with a switch that takes it down (503 on every route)
and a gate that holds replies until the test releases them.

`unresponsive_port` gives a port whose accept queue is full, so a connection attempt
hangs until the client's connect timeout: the connect phase, on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from coheara import Settings

from .fake_ollama import FakeOllama
from .raw_server import RawServer

FaultKind = Literal["ok", "cut", "close", "hang", "status", "slow"]
MODEL = "medgemma-fault:4b"
HANG_LIMIT_S = 30.0
"""The longest a fault holds a connection: nothing in a test waits forever."""


@dataclass(frozen=True)
class Fault:
    kind: FaultKind = "ok"
    chunks: int = 3
    """Text chunks sent ("ok", "cut", "slow")."""
    status: int = 500
    delay_s: float = 0.05
    """Between chunks ("slow")."""


@dataclass
class ChatSeen:
    """One chat request, as the server saw its connection."""

    fault: Fault
    body: Any
    finished: bool = False
    """The server played the whole script."""
    client_closed: threading.Event = field(default_factory=threading.Event)
    """The client closed the connection before the script ended."""


def _line(text: str, done: bool = False) -> bytes:
    chunk: dict[str, Any] = {
        "model": MODEL,
        "created_at": "2025-01-01T00:00:00Z",
        "message": {"role": "assistant", "content": text},
        "done": done,
    }
    if done:
        chunk.update(done_reason="stop", prompt_eval_count=12, eval_count=6)
    return (json.dumps(chunk) + "\n").encode()


def _show() -> dict[str, Any]:
    return {
        "details": {"family": "gemma3", "parameter_size": "3.9B", "quantization_level": "Q4"},
        "model_info": {"gemma3.context_length": 131072},
        "capabilities": ["completion"],
    }


class FaultyOllama(RawServer):
    """Serve on 127.0.0.1 inside `serve()`; set `script` (played in order, one fault per
    chat request) and `default` (after the script runs out)."""

    def __init__(self, script: list[Fault] | None = None, default: Fault | None = None) -> None:
        self.script = list(script or [])
        self.default = default or Fault()
        self.chats: list[ChatSeen] = []
        self.paths: list[str] = []
        super().__init__()

    # ----- the HTTP side ----------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            method, path, raw = await self.read_request(reader)
            self.paths.append(path)
            if path == "/api/chat" and method == "POST":
                await self._chat(json.loads(raw or b"null"), reader, writer)
            elif path == "/api/version":
                await self._json(writer, 200, {"version": "0.12.6"})
            elif path == "/api/show":
                await self._json(writer, 200, _show())
            elif path == "/api/tags":
                await self._json(writer, 200, {"models": [{"name": MODEL, "model": MODEL}]})
            else:
                await self._json(writer, 404, {"error": "404 page not found"})
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            if not writer.is_closing():
                writer.close()

    @staticmethod
    async def _json(writer: asyncio.StreamWriter, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        writer.write(
            f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
            + data
        )
        await writer.drain()

    async def _chat(
        self, body: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        fault = self.script.pop(0) if self.script else self.default
        seen = ChatSeen(fault, body)
        self.chats.append(seen)
        # The client sends nothing more: a read that ends means it closed the connection.
        gone = asyncio.ensure_future(reader.read(1))
        try:
            if fault.kind == "close":
                writer.transport.abort()
            elif fault.kind == "status":
                await self._json(writer, fault.status, {"error": f"server error {fault.status}"})
            elif fault.kind == "hang":
                await asyncio.wait({gone}, timeout=HANG_LIMIT_S)
            else:
                await self._stream(fault, writer, gone)
                if fault.kind == "cut":
                    writer.transport.abort()
            if fault.kind != "hang" or not gone.done():
                seen.finished = True
        except ConnectionError:
            pass
        finally:
            if gone.done():
                seen.client_closed.set()
            else:
                gone.cancel()

    @staticmethod
    async def _stream(
        fault: Fault, writer: asyncio.StreamWriter, gone: asyncio.Future[Any]
    ) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
            b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        )
        for index in range(fault.chunks):
            if gone.done():
                raise ConnectionError("client gone")
            piece = _line(f"part{index} ")
            writer.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            await writer.drain()
            if fault.kind == "slow":
                await asyncio.wait({gone}, timeout=fault.delay_s)
        if fault.kind == "cut":
            return
        piece = _line("end.", done=True)
        writer.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n0\r\n\r\n")
        await writer.drain()

    # ----- running it -------------------------------------------------------------------


class ScriptedOllama(FakeOllama):
    """`FakeOllama` that can be taken down (`down`: 503 everywhere) and held (`gate`)."""

    def reset(self) -> None:
        super().reset()
        self.down = False
        self.fail_next = 0
        """Answer this many chat requests with a 500, then reply normally."""
        self.gate: threading.Event | None = None
        """When set, a reply waits (at most HANG_LIMIT_S) until the event is set."""

    async def _version(self, request: Request) -> Response:
        if self.down:
            self._record(request, None)
            return JSONResponse({"error": "server is shutting down"}, status_code=503)
        return await super()._version(request)

    async def _chat(self, request: Request) -> Response:
        if self.down or self.fail_next > 0:
            body = await request.json()
            self._record(request, body)
            if self.down:
                return JSONResponse({"error": "server is shutting down"}, status_code=503)
            self.fail_next -= 1
            return JSONResponse({"error": "internal server error"}, status_code=500)
        if self.gate is not None:
            await asyncio.to_thread(self.gate.wait, HANG_LIMIT_S)
        return await super()._chat(request)


@contextmanager
def unresponsive_port() -> Iterator[int]:
    """A listening port that never accepts: its queue is filled, so a new connection hangs
    in the connect phase until the client gives up."""
    listener = socket.socket()
    fillers: list[socket.socket] = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
            fillers.append(filler)
        yield port
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


def replica_settings(urls: list[str], **overrides: Any) -> Settings:
    """Settings for Ollama at `urls` (the first, then replicas): health checks only when a
    test asks for them, short timeouts, small outputs."""
    values: dict[str, Any] = {
        "backend": "ollama",
        "ollama_url": urls[0],
        "backend_replicas": urls[1:],
        "ollama_model": MODEL,
        "health_interval_s": 3600.0,
        "timeout_s": 30.0,
        "connect_timeout_s": 2.0,
        "first_token_timeout_s": 20.0,
        "max_output_tokens": 32,
    }
    return Settings(**{**values, **overrides})
