"""A fake OpenAI-compatible server shaped like vLLM.

`/v1/models` lists each model with `max_model_len`; `/v1/chat/completions`
streams SSE chunks, a closing chunk with `finish_reason`, a usage chunk when
`stream_options.include_usage` is set, and `[DONE]`. A prompt plus `max_tokens`
over the enforced window is refused with vLLM's 400 and its exact wording. The
prompt is estimated at `chars_per_token` characters a token plus
`IMAGE_TOKENS` an image.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .fake_ollama import ChatStream

IMAGE_TOKENS = 260


@dataclass
class OpenAIModel:
    max_model_len: int = 131072
    """The window the server enforces."""
    report_max_model_len: bool = True
    """vLLM reports it in /v1/models; llama.cpp and others do not."""


@dataclass
class Recorded:
    method: str
    path: str
    body: Any


Reply = str | Callable[[dict[str, Any]], str]


def vllm_error(message: str, kind: str, status: int) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": status}}


class FakeOpenAI:
    """Scriptable per test; set the attributes, then call the backend."""

    def __init__(self, models: dict[str, OpenAIModel] | None = None) -> None:
        self.models: dict[str, OpenAIModel] = models or {}
        self.requests: list[Recorded] = []
        self.streams: list[ChatStream] = []
        self.reset()
        self.app = Starlette(
            routes=[
                Route("/health", self._health, methods=["GET"]),
                Route("/version", self._version, methods=["GET"]),
                Route("/v1/models", self._models, methods=["GET"]),
                Route("/v1/chat/completions", self._chat, methods=["POST"]),
            ]
        )

    def reset(self) -> None:
        self.reply: Reply = "No acute cardiopulmonary process."
        self.chunk_words = 2
        self.fail_with: tuple[int, dict[str, Any]] | None = None
        """Answer chat completions with this status and JSON body."""
        self.error_after_chunks: tuple[int, str] | None = None
        """Stream this many chunks, then a `data: {"error": ...}` event."""
        self.chars_per_token = 4.0
        self.send_usage = True
        self.has_health = True
        self.first_token_delay_s = 0.0
        self.chunk_delay_s = 0.0
        self.requests.clear()
        self.streams.clear()

    @property
    def chat_bodies(self) -> list[dict[str, Any]]:
        return [r.body for r in self.requests if r.path == "/v1/chat/completions"]

    # ----- endpoints --------------------------------------------------------------------

    def _record(self, request: Request, body: Any) -> None:
        self.requests.append(Recorded(request.method, request.url.path, body))

    async def _health(self, request: Request) -> Response:
        self._record(request, None)
        if not self.has_health:
            return JSONResponse({"detail": "Not Found"}, status_code=404)
        return Response(status_code=200)

    async def _version(self, request: Request) -> Response:
        self._record(request, None)
        if not self.has_health:
            return JSONResponse({"detail": "Not Found"}, status_code=404)
        return JSONResponse({"version": "0.11.0"})

    async def _models(self, request: Request) -> Response:
        self._record(request, None)
        data = []
        for name, spec in self.models.items():
            entry: dict[str, Any] = {
                "id": name,
                "object": "model",
                "created": 1700000000,
                "owned_by": "vllm",
                "root": name,
                "parent": None,
            }
            if spec.report_max_model_len:
                entry["max_model_len"] = spec.max_model_len
            data.append(entry)
        return JSONResponse({"object": "list", "data": data})

    def _prompt_tokens(self, body: dict[str, Any]) -> int:
        chars = 0
        images = 0
        for message in body.get("messages", []):
            content = message.get("content")
            if isinstance(content, str):
                chars += len(content)
                continue
            for part in content or []:
                if part.get("type") == "text":
                    chars += len(part.get("text", ""))
                elif part.get("type") == "image_url":
                    images += 1
        return math.ceil(chars / self.chars_per_token) + images * IMAGE_TOKENS

    async def _chat(self, request: Request) -> Response:
        body = await request.json()
        self._record(request, body)
        if self.fail_with is not None:
            status, payload = self.fail_with
            return JSONResponse(payload, status_code=status)
        name = body.get("model")
        spec = self.models.get(name)
        if spec is None:
            return JSONResponse(
                vllm_error(f"The model `{name}` does not exist.", "NotFoundError", 404),
                status_code=404,
            )
        prompt = self._prompt_tokens(body)
        max_tokens = body.get("max_tokens") or 16
        if prompt + max_tokens > spec.max_model_len:
            message = (
                f"This model's maximum context length is {spec.max_model_len} tokens. "
                f"However, you requested {prompt + max_tokens} tokens ({prompt} in the "
                f"messages, {max_tokens} in the completion). Please reduce the length of the "
                "messages or completion."
            )
            return JSONResponse(vllm_error(message, "BadRequestError", 400), status_code=400)
        reply = self.reply(body) if callable(self.reply) else self.reply
        finish = "stop"
        if len(reply) > max_tokens * 4:
            reply, finish = reply[: max_tokens * 4], "length"
        words = reply.split(" ")
        pieces = [
            " ".join(words[i : i + self.chunk_words]) + " "
            for i in range(0, len(words), self.chunk_words)
        ]
        pieces[-1] = pieces[-1][:-1]
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": max(1, math.ceil(len(reply) / 4)),
        }
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        record = ChatStream(total_chunks=len(pieces))
        self.streams.append(record)
        return StreamingResponse(
            self._generate(name, pieces, finish, usage if include_usage else None, record),
            media_type="text/event-stream",
        )

    @staticmethod
    def _event(data: Any) -> bytes:
        return f"data: {json.dumps(data)}\n\n".encode()

    @staticmethod
    def _chunk(model: str, delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
        return {
            "id": "chatcmpl-fake",
            "object": "chat.completion.chunk",
            "created": 1700000000,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }

    async def _generate(
        self,
        model: str,
        pieces: list[str],
        finish: str,
        usage: dict[str, int] | None,
        record: ChatStream,
    ) -> AsyncIterator[bytes]:
        try:
            if self.first_token_delay_s:
                await asyncio.sleep(self.first_token_delay_s)
            yield self._event(self._chunk(model, {"role": "assistant", "content": ""}, None))
            for index, piece in enumerate(pieces):
                if self.error_after_chunks and index == self.error_after_chunks[0]:
                    yield self._event(
                        vllm_error(self.error_after_chunks[1], "InternalServerError", 500)
                    )
                    yield b"data: [DONE]\n\n"
                    return
                yield self._event(self._chunk(model, {"content": piece}, None))
                record.sent += 1
                if self.chunk_delay_s:
                    await asyncio.sleep(self.chunk_delay_s)
            yield self._event(self._chunk(model, {"content": ""}, finish))
            if usage is not None and self.send_usage:
                yield self._event(
                    {
                        "id": "chatcmpl-fake",
                        "object": "chat.completion.chunk",
                        "created": 1700000000,
                        "model": model,
                        "choices": [],
                        "usage": usage,
                    }
                )
            yield b"data: [DONE]\n\n"
            record.completed = True
        finally:
            record.ended.set()
