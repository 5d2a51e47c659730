"""Context budget: does a request fit the window, and did the backend read all of it?

With a tokenizer at hand the count is exact. Without one (Ollama, remote
servers) the count is a conservative estimate from characters, corrected by
the prompt counts the backend reports on earlier calls.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from coheara import model_facts
from coheara.backends.base import ChatRequest
from coheara.errors import ContextOverflowError, SilentTruncationError

TURN_OVERHEAD = 6
"""`<start_of_turn>user\\n ... <end_of_turn>\\n`, per turn."""
PROMPT_OVERHEAD = 4
"""`<bos>` and the opening of the model turn."""


@dataclass(frozen=True)
class PromptSize:
    tokens: int
    exact: bool
    text_chars: int
    images: int
    lower_bound: int
    """Fewest tokens this prompt can be; a backend reporting less dropped part of it."""
    overhead: int = 0
    """Chat-template tokens around the text."""
    upper_bound: int = 0
    """Most tokens this prompt can be (a token per UTF-8 byte): only a prompt that could
    exceed the window can have been truncated."""

    @property
    def image_tokens(self) -> int:
        return self.images * model_facts.IMAGE_PROMPT_TOKENS


class TokenEstimator:
    """Characters-per-token, conservative until the backend's own counts correct it."""

    DEFAULT_CHARS_PER_TOKEN = 3.0
    """Gemma's tokenizer averages about 4 characters a token on English clinical text."""
    MOST_CHARS_PER_TOKEN = 6.0
    """Until the backend has reported counts, no text is assumed denser than this."""

    def __init__(self) -> None:
        self._observed: deque[float] = deque(maxlen=32)

    @property
    def chars_per_token(self) -> float:
        if not self._observed:
            return self.DEFAULT_CHARS_PER_TOKEN
        # Fewest characters per token seen: the estimate stays on the high side.
        return max(1.0, min(self._observed) * 0.95)

    @property
    def most_chars_per_token(self) -> float:
        """For the lower bound: the densest text seen, with a margin, once calibrated."""
        if not self._observed:
            return self.MOST_CHARS_PER_TOKEN
        return min(self.MOST_CHARS_PER_TOKEN, max(self._observed) * 1.15)

    def observe(self, size: PromptSize, reported_tokens: int) -> None:
        text_tokens = reported_tokens - size.image_tokens - size.overhead
        if size.exact or size.text_chars < 200 or text_tokens <= 0:
            return
        self._observed.append(size.text_chars / text_tokens)

    def measure(self, request: ChatRequest, exact: int | None) -> PromptSize:
        texts = [m.folded_text for m in request.messages]
        chars = sum(map(len, texts))
        images = len(request.images)
        overhead = PROMPT_OVERHEAD + TURN_OVERHEAD * len(request.messages)
        if exact is not None:
            return PromptSize(exact, True, chars, images, exact, overhead, exact)
        image_tokens = images * model_facts.IMAGE_PROMPT_TOKENS
        return PromptSize(
            tokens=math.ceil(chars / self.chars_per_token) + image_tokens + overhead,
            exact=False,
            text_chars=chars,
            images=images,
            lower_bound=math.floor(chars / self.most_chars_per_token)
            + images * model_facts.IMAGE_SOFT_TOKENS,
            overhead=overhead,
            upper_bound=sum(len(t.encode("utf-8")) for t in texts) + image_tokens + overhead,
        )


def check_fits(size: PromptSize, max_tokens: int, window: int) -> None:
    """Refuse, before sending, a request the window cannot hold with its output reserve."""
    if size.tokens + max_tokens <= window:
        return
    kind = "" if size.exact else "about "
    image_part = (
        f" including {size.images} image(s) x {model_facts.IMAGE_PROMPT_TOKENS} tokens"
        if size.images
        else ""
    )
    raise ContextOverflowError(
        f"request does not fit the context window: prompt {kind}{size.tokens} tokens"
        f"{image_part} + {max_tokens} reserved for output > window {window}",
        hint=(
            "shorten the input, lower max_tokens, or raise the window "
            f"(COHEARA_NUM_CTX, up to {model_facts.CONTEXT_LENGTH})"
        ),
        prompt_tokens=size.tokens,
        prompt_tokens_exact=size.exact,
        images=size.images,
        image_tokens=size.image_tokens,
        output_reserve=max_tokens,
        window=window,
    )


def check_not_truncated(size: PromptSize, reported: int | None, window: int | None) -> None:
    """Turn a silent truncation (the backend read less than was sent) into an error."""
    if reported is None:
        return
    filled = window is not None and reported >= window
    # A low count alone could be a prompt cache on some Ollama releases: it counts only
    # where the prompt could have exceeded the window at all.
    could_overflow = window is None or size.upper_bound > window
    short = reported < size.lower_bound and could_overflow
    if not (filled or short):
        return
    read = "the whole window" if filled else f"fewer than the at least {size.lower_bound} sent"
    raise SilentTruncationError(
        f"the backend read {reported} prompt tokens, {read}: it dropped the front of the "
        "prompt (the system text with it)",
        hint="raise the window (COHEARA_NUM_CTX) or shorten the input; do not use the reply",
        reported_prompt_tokens=reported,
        expected_at_least=size.lower_bound,
        window=window,
    )
