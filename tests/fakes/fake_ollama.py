"""A fake Ollama server: the endpoints, wire shapes and failure modes the backend meets.

Like the real one it streams NDJSON from `/api/chat` (the last chunk has
`done: true`, `done_reason`, nanosecond durations and the counts, and can still
carry text), answers `{"error": ...}` with 404/400/503, and, by default,
truncates silently: when the prompt (estimated at `chars_per_token`
characters a token) is longer than its window it answers 200 with a plausible
reply and a `prompt_eval_count` of the window. Its window is the request's
`options.num_ctx`, else Ollama's small-GPU default of 4096, unless
`server_num_ctx` pins it (a server that ignores what it is sent).
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

DEFAULT_NUM_CTX = 4096
"""What Ollama uses on GPUs under 24 GiB when a request sends no num_ctx."""
OVERFLOW_MESSAGE = "the input length exceeds the context length"
"""Ollama's own wording when it refuses (instead of truncating) an over-long prompt."""
IMAGE_TOKENS = 256


@dataclass
class OllamaModel:
    """What `/api/show` reports for one model."""

    capabilities: list[str] = field(default_factory=lambda: ["completion"])
    context_length: int = 131072
    family: str = "gemma3"
    quantization: str = "Q4_K_M"


@dataclass
class ChatStream:
    """What happened to one streamed reply, seen from the server."""

    total_chunks: int
    sent: int = 0
    completed: bool = False
    ended: threading.Event = field(default_factory=threading.Event)


@dataclass
class Recorded:
    method: str
    path: str
    body: Any


Reply = str | Callable[[dict[str, Any]], str]


class FakeOllama:
    """Scriptable per test; set the attributes, then call the backend."""

    def __init__(self, models: dict[str, OllamaModel] | None = None) -> None:
        self.models: dict[str, OllamaModel] = models or {}
        self.version = "0.12.6"
        self.requests: list[Recorded] = []
        self.streams: list[ChatStream] = []
        self.reset()
        self.app = Starlette(
            routes=[
                Route("/api/version", self._version, methods=["GET"]),
                Route("/api/tags", self._tags, methods=["GET"]),
                Route("/api/show", self._show, methods=["POST"]),
                Route("/api/chat", self._chat, methods=["POST"]),
            ]
        )

    def reset(self) -> None:
        """Back to a well-behaved server, forgetting what it recorded."""
        self.reply: Reply = "No acute cardiopulmonary process. Heart size is normal."
        self.chunk_words = 2
        self.fail_with: tuple[int, str] | None = None
        """Answer /api/chat with this status and `{"error": message}` instead of a reply."""
        self.error_after_chunks: tuple[int, str] | None = None
        """Stream this many chunks, then an `{"error": ...}` line, inside the 200."""
        self.server_num_ctx: int | None = None
        self.chars_per_token = 4.0
        self.honours_truncate = False
        """Newer Ollama: with `truncate: false`, refuse an over-long prompt with a 400."""
        self.first_token_delay_s = 0.0
        self.chunk_delay_s = 0.0
        self.requests.clear()
        self.streams.clear()

    # ----- what the tests read ----------------------------------------------------------

    def bodies(self, path: str) -> list[Any]:
        return [r.body for r in self.requests if r.path == path]

    @property
    def chat_bodies(self) -> list[dict[str, Any]]:
        return self.bodies("/api/chat")

    # ----- endpoints --------------------------------------------------------------------

    def _record(self, request: Request, body: Any) -> None:
        self.requests.append(Recorded(request.method, request.url.path, body))

    async def _version(self, request: Request) -> Response:
        self._record(request, None)
        return JSONResponse({"version": self.version})

    async def _tags(self, request: Request) -> Response:
        self._record(request, None)
        return JSONResponse(
            {
                "models": [
                    {
                        "name": name,
                        "model": name,
                        "modified_at": "2025-01-01T00:00:00Z",
                        "size": 3_300_000_000,
                        "digest": "0" * 64,
                        "details": self._details(spec),
                    }
                    for name, spec in self.models.items()
                ]
            }
        )

    @staticmethod
    def _details(spec: OllamaModel) -> dict[str, Any]:
        return {
            "parent_model": "",
            "format": "gguf",
            "family": spec.family,
            "families": [spec.family],
            "parameter_size": "3.9B",
            "quantization_level": spec.quantization,
        }

    @staticmethod
    def _not_found(name: Any) -> Response:
        return JSONResponse({"error": f"model '{name}' not found"}, status_code=404)

    async def _show(self, request: Request) -> Response:
        body = await request.json()
        self._record(request, body)
        name = body.get("model") or body.get("name")
        spec = self.models.get(name)
        if spec is None:
            return self._not_found(name)
        arch = spec.family
        return JSONResponse(
            {
                "license": "Health AI Developer Foundations terms",
                "modelfile": f"FROM {name}",
                "parameters": 'stop "<end_of_turn>"',
                "template": "{{ .Prompt }}",
                "details": self._details(spec),
                "model_info": {
                    "general.architecture": arch,
                    "general.parameter_count": 3_880_000_000,
                    f"{arch}.embedding_length": 2560,
                    f"{arch}.block_count": 34,
                    # A context length of 0 leaves the key out, as some GGUF builds do.
                    **(
                        {f"{arch}.context_length": spec.context_length}
                        if spec.context_length
                        else {}
                    ),
                },
                "capabilities": spec.capabilities,
                "modified_at": "2025-01-01T00:00:00Z",
            }
        )

    def _prompt_tokens(self, body: dict[str, Any]) -> int:
        chars = sum(len(m.get("content") or "") for m in body.get("messages", []))
        images = sum(len(m.get("images") or []) for m in body.get("messages", []))
        return math.ceil(chars / self.chars_per_token) + images * IMAGE_TOKENS

    async def _chat(self, request: Request) -> Response:
        body = await request.json()
        self._record(request, body)
        if self.fail_with is not None:
            status, message = self.fail_with
            return JSONResponse({"error": message}, status_code=status)
        name = body.get("model")
        if name not in self.models:
            return self._not_found(name)
        options = body.get("options") or {}
        window = self.server_num_ctx or options.get("num_ctx") or DEFAULT_NUM_CTX
        prompt_tokens = self._prompt_tokens(body)
        if prompt_tokens > window:
            if self.honours_truncate and body.get("truncate") is False:
                return JSONResponse({"error": OVERFLOW_MESSAGE}, status_code=400)
            # Silent truncation: the front of the prompt is dropped, the reply looks fine.
            prompt_tokens = window
        reply = self.reply(body) if callable(self.reply) else self.reply
        done_reason = "stop"
        limit = options.get("num_predict")
        if isinstance(limit, int) and limit > 0 and len(reply) > limit * 4:
            reply, done_reason = reply[: limit * 4], "length"
        words = reply.split(" ")
        pieces = [
            " ".join(words[i : i + self.chunk_words]) + " "
            for i in range(0, len(words), self.chunk_words)
        ]
        pieces[-1] = pieces[-1][:-1]
        eval_count = max(1, math.ceil(len(reply) / 4))
        final = {
            "done": True,
            "done_reason": done_reason,
            "total_duration": 1_500_000_000,
            "load_duration": 20_000_000,
            "prompt_eval_count": prompt_tokens,
            "prompt_eval_duration": 300_000_000,
            "eval_count": eval_count,
            "eval_duration": 1_100_000_000,
        }
        if body.get("stream") is False:
            return JSONResponse({**self._chunk(name, reply), **final})
        record = ChatStream(total_chunks=len(pieces))
        self.streams.append(record)
        return StreamingResponse(
            self._generate(name, pieces, final, record), media_type="application/x-ndjson"
        )

    @staticmethod
    def _chunk(model: str, text: str) -> dict[str, Any]:
        return {
            "model": model,
            "created_at": "2025-01-01T00:00:00.000000Z",
            "message": {"role": "assistant", "content": text},
            "done": False,
        }

    async def _generate(
        self, model: str, pieces: list[str], final: dict[str, Any], record: ChatStream
    ) -> AsyncIterator[bytes]:
        try:
            if self.first_token_delay_s:
                await asyncio.sleep(self.first_token_delay_s)
            for index, piece in enumerate(pieces[:-1]):
                if self.error_after_chunks and index == self.error_after_chunks[0]:
                    yield (json.dumps({"error": self.error_after_chunks[1]}) + "\n").encode()
                    return
                yield (json.dumps(self._chunk(model, piece)) + "\n").encode()
                record.sent += 1
                if self.chunk_delay_s:
                    await asyncio.sleep(self.chunk_delay_s)
            # The closing chunk still carries the last piece of text, as Ollama's can.
            yield (json.dumps({**self._chunk(model, pieces[-1]), **final}) + "\n").encode()
            record.sent += 1
            record.completed = True
        finally:
            record.ended.set()
