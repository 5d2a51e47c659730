"""A raw asyncio HTTP server that starts a streamed reply and then kills the connection.

An ASGI app cannot cut its own connection on purpose, so this speaks just
enough HTTP/1.1 by hand: it reads one request, records its JSON body, sends
a 200 with a chunked body made of the given pieces, and then aborts the TCP
connection (RST, `ending="abort"`) or closes it (FIN, `"close"`) without the
terminating zero-length chunk. `"finish"` ends the body properly instead: a
well-formed reply that simply stops before the runtime's closing message.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any, Literal

from .raw_server import RawServer

Ending = Literal["abort", "close", "finish"]


def ndjson_pieces(texts: Sequence[str], model: str = "m") -> list[bytes]:
    """Ollama `/api/chat` chunks (not done) carrying `texts`, one line each."""
    return [
        (
            json.dumps(
                {
                    "model": model,
                    "created_at": "2025-01-01T00:00:00Z",
                    "message": {"role": "assistant", "content": text},
                    "done": False,
                }
            )
            + "\n"
        ).encode()
        for text in texts
    ]


def sse_pieces(texts: Sequence[str], model: str = "m") -> list[bytes]:
    """OpenAI chat-completion chunks carrying `texts`, one SSE event each."""
    return [
        (
            "data: "
            + json.dumps(
                {
                    "id": "chatcmpl-drop",
                    "object": "chat.completion.chunk",
                    "created": 1700000000,
                    "model": model,
                    "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}],
                }
            )
            + "\n\n"
        ).encode()
        for text in texts
    ]


class DroppingServer(RawServer):
    """Serve on 127.0.0.1 until the `with` block ends; every request gets the cut reply.

    `pieces=None` closes the connection right after reading the request, before any
    status line: the "server went away before answering" case.
    """

    def __init__(
        self,
        pieces: Sequence[bytes] | None,
        *,
        content_type: str = "application/x-ndjson",
        ending: Ending = "abort",
    ) -> None:
        self.pieces = list(pieces) if pieces is not None else None
        self.content_type = content_type
        self.ending = ending
        self.bodies: list[Any] = []
        self.paths: list[str] = []
        super().__init__()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            _, path, raw = await self.read_request(reader)
            self.paths.append(path)
            try:
                self.bodies.append(json.loads(raw) if raw else None)
            except ValueError:
                self.bodies.append(raw)
            if self.pieces is not None:
                writer.write(
                    b"HTTP/1.1 200 OK\r\n"
                    + f"Content-Type: {self.content_type}\r\n".encode()
                    + b"Transfer-Encoding: chunked\r\n\r\n"
                )
                for piece in self.pieces:
                    writer.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                    await writer.drain()
                    await asyncio.sleep(0.01)
                if self.ending == "finish":
                    writer.write(b"0\r\n\r\n")
                    await writer.drain()
        finally:
            if self.ending == "abort":
                writer.transport.abort()
            else:
                writer.close()
