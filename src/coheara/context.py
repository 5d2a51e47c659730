"""Who is calling and through which door: set by the outer layers, read by observers.

The engine never reads it; it hands a snapshot to its observers (the audit trail, the
metrics) with each call's record, so that a record can say which surface, client and
task made the call without the engine knowing about HTTP, keys or tasks. A context
variable: concurrent requests in one server each see their own.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace
from typing import Any


@dataclass(frozen=True)
class CallContext:
    request_id: str | None = None
    surface: str | None = None
    """native, tasks, openai, ollama, cli or python."""
    client: str | None = None
    """The API key's name (never the key)."""
    task_id: str | None = None
    task_version: str | None = None
    prompt_hash: str | None = None


_EMPTY = CallContext()
_current: ContextVar[CallContext] = ContextVar("coheara_call", default=_EMPTY)


def call_context() -> CallContext:
    return _current.get()


@contextmanager
def calling(**fields: Any) -> Iterator[CallContext]:
    """Add `fields` to the context inside the block (None values leave a field as it is)."""
    merged = replace(_current.get(), **{k: v for k, v in fields.items() if v is not None})
    token = _current.set(merged)
    try:
        yield merged
    finally:
        _current.reset(token)
