"""What remote runtimes say when they fail, recognised and made safe to show.

Shared by the Ollama and OpenAI-compatible backends: both meet servers whose
error text may say the prompt did not fit, and may echo the prompt back.
"""

from __future__ import annotations

import re

from coheara.backends.base import ChatRequest

HEALTH_TIMEOUT_S = 10.0
"""A liveness probe must answer quickly even when generation timeouts are long."""

_CONTEXT_OVERFLOW = re.compile(
    r"exceeds? (the )?(maximum )?context|context (length|window|size)|maximum context"
    r"|max_model_len|too long|too many tokens",
    re.IGNORECASE,
)
"""Server wording for a prompt over the window (Ollama: "the input length exceeds the
context length"; vLLM: "This model's maximum context length is N tokens")."""

_DETAIL_LIMIT = 300
_QUOTE_WINDOW = 24


def is_context_overflow(message: str) -> bool:
    """Whether a server's error text says the prompt did not fit its window."""
    return bool(_CONTEXT_OVERFLOW.search(message))


def redact_server_detail(detail: str, request: ChatRequest | None = None) -> str:
    """A server's error text, safe for an error message: short, and never quoting the prompt.

    Validation errors of some servers echo the request body back; any detail that
    shares a run of characters with a message text is withheld entirely.
    """
    detail = " ".join(str(detail).split())
    if len(detail) > _DETAIL_LIMIT:
        detail = detail[:_DETAIL_LIMIT] + "..."
    if request is not None and len(detail) >= _QUOTE_WINDOW:
        texts = [" ".join(m.folded_text.split()) for m in request.messages]
        texts = [text for text in texts if len(text) >= _QUOTE_WINDOW]
        for start in range(len(detail) - _QUOTE_WINDOW + 1):
            piece = detail[start : start + _QUOTE_WINDOW]
            if any(piece in text for text in texts):
                return "(server detail withheld: it quoted the prompt)"
    return detail
