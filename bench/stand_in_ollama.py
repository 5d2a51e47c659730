"""A stand-in Ollama that answers instantly: the backend for measuring the server's overhead.

A bare ASGI app (no framework, so its own cost stays small) speaking just what Coheara's
Ollama backend asks: `/api/version`, `/api/tags`, `/api/show` and a streamed `/api/chat`
whose reply is one text chunk and the closing line with counts.

    python bench/stand_in_ollama.py PORT
"""

from __future__ import annotations

import json
import sys
from typing import Any

import uvicorn

MODEL = "MedAIBase/MedGemma1.5:4b"
_JSON = [(b"content-type", b"application/json")]
_NDJSON = [(b"content-type", b"application/x-ndjson")]
_VERSION = json.dumps({"version": "0.12.6"}).encode()
_DETAILS = {"format": "gguf", "family": "gemma3", "families": ["gemma3"]}
_TAGS = json.dumps({"models": [{"name": MODEL, "model": MODEL, "details": _DETAILS}]}).encode()
_SHOW = json.dumps(
    {
        "details": _DETAILS,
        "model_info": {"general.architecture": "gemma3", "gemma3.context_length": 131072},
        "capabilities": ["completion", "vision"],
    }
).encode()
_CHUNK = {"model": MODEL, "created_at": "2025-01-01T00:00:00Z"}
_REPLY = (
    json.dumps({**_CHUNK, "message": {"role": "assistant", "content": "pong"}, "done": False})
    + "\n"
    + json.dumps(
        {
            **_CHUNK,
            "message": {"role": "assistant", "content": ""},
            "done": True,
            "done_reason": "stop",
            "total_duration": 1000,
            "prompt_eval_count": 12,
            "prompt_eval_duration": 500,
            "eval_count": 2,
            "eval_duration": 500,
        }
    )
    + "\n"
).encode()


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    more = True
    while more:  # drain the body
        message = await receive()
        more = message.get("more_body", False)
    path = scope["path"]
    body, headers = {
        "/api/version": (_VERSION, _JSON),
        "/api/tags": (_TAGS, _JSON),
        "/api/show": (_SHOW, _JSON),
        "/api/chat": (_REPLY, _NDJSON),
    }.get(path, (b'{"error":"not found"}', _JSON))
    status = 200 if path in ("/api/version", "/api/tags", "/api/show", "/api/chat") else 404
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
