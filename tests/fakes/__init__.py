"""Fake runtime servers for failure tests: real HTTP on loopback, scriptable per test.

`FakeOllama` and `FakeOpenAI` are ASGI apps (run them with `servers.serve`); they
record every request body so tests can assert what went over the wire.
`DroppingServer` is a raw asyncio server that cuts a streamed reply mid-way,
which an ASGI app cannot do on purpose.
"""

from .dropping import DroppingServer, ndjson_pieces, sse_pieces
from .fake_ollama import FakeOllama, OllamaModel
from .fake_openai import FakeOpenAI, OpenAIModel

__all__ = [
    "DroppingServer",
    "FakeOllama",
    "FakeOpenAI",
    "OllamaModel",
    "OpenAIModel",
    "ndjson_pieces",
    "sse_pieces",
]
