"""Gemma chat rules: no system turn, alternating roles, hidden reasoning stripped."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

from coheara import model_facts
from coheara.backends.base import Message, Part, Role
from coheara.errors import InvalidRequestError
from coheara.imaging import PreparedImage

InputRole = Literal["system", "user", "assistant"]


@dataclass(frozen=True)
class InputMessage:
    """A caller's message, before the Gemma rules are applied."""

    role: InputRole
    text: str
    images: tuple[PreparedImage, ...] = ()
    parts: tuple[Part, ...] = ()
    """Texts and images in order (see `Message.parts`); build it with `from_parts`."""

    @classmethod
    def from_parts(cls, role: InputRole, parts: Sequence[Part]) -> InputMessage:
        message = Message.from_parts("user", tuple(parts))
        return cls(role, message.text, message.images, message.parts)

    def to_message(self) -> Message:
        if self.parts:
            return Message.from_parts(_turn_role(self.role), self.parts)
        return Message(_turn_role(self.role), self.text, self.images)


def _turn_role(role: InputRole) -> Role:
    if role == "system":
        raise InvalidRequestError("a system message is not a turn")
    return role


def to_gemma_turns(messages: Sequence[InputMessage]) -> tuple[Message, ...]:
    """Put the system text on the first user turn and merge same-role neighbours.

    Gemma has no system role: the system text and a blank line go in front of the
    first user turn, before its images (`Message.system`). Consecutive messages of
    one role are joined with a blank line (the chat template rejects them otherwise);
    the conversation must end on a user turn.
    """
    for message in messages:
        for text in (message.text, *(p for p in message.parts if isinstance(p, str))):
            _refuse_control_tokens(text)
    system_parts = [m.text for m in messages if m.role == "system" and m.text.strip()]
    if any(m.images for m in messages if m.role == "system"):
        raise InvalidRequestError("images are not allowed in a system message")
    turns: list[Message] = []
    for message in messages:
        if message.role == "system":
            continue
        turn = message.to_message()
        if turns and turns[-1].role == turn.role:
            last = turns[-1]
            if last.parts or turn.parts:
                merged = (*last.ordered_parts, *turn.ordered_parts)
                turns[-1] = Message.from_parts(last.role, merged)
            else:
                text = "\n\n".join(t for t in (last.text, turn.text) if t)
                turns[-1] = Message(last.role, text, last.images + turn.images)
        else:
            turns.append(turn)
    if not turns or turns[0].role != "user":
        if turns and turns[0].role == "assistant":
            raise InvalidRequestError("the conversation must start with a user message")
        raise InvalidRequestError("the request has no user message")
    if turns[-1].role != "user":
        raise InvalidRequestError("the conversation must end with a user message")
    if not any(t.text.strip() or t.images for t in turns if t.role == "user"):
        raise InvalidRequestError("the user message is empty")
    if system_parts:
        turns[0] = replace(turns[0], system="\n\n".join(system_parts))
    return tuple(turns)


def _refuse_control_tokens(text: str) -> None:
    """Every runtime's template parses these in plain text: refuse, never pass them on."""
    for token in model_facts.CONTROL_TOKENS:
        if token in text:
            raise InvalidRequestError(
                f"the input contains the model's control token {token}",
                hint="remove it: it would let text forge a chat turn or an image",
            )


class ReasoningFilter:
    """Streaming counterpart of `strip_reasoning`: holds back text inside a thought block."""

    def __init__(self) -> None:
        self._pending = ""
        self._inside = False
        self._strip_leading = False
        self.hidden_chars = 0

    def feed(self, delta: str) -> str:
        opener, closer = model_facts.REASONING_OPEN, model_facts.REASONING_CLOSE
        self._pending += delta
        out: list[str] = []
        while self._pending:
            marker = closer if self._inside else opener
            at = self._pending.find(marker)
            if at >= 0:
                if self._inside:
                    self.hidden_chars += at
                else:
                    out.append(self._pending[:at])
                self.hidden_chars += len(marker)
                self._pending = self._pending[at + len(marker) :]
                self._inside = not self._inside
                self._strip_leading = not self._inside
                continue
            # No whole marker: keep back a tail that could be the start of one.
            keep = next(
                (
                    k
                    for k in range(min(len(marker) - 1, len(self._pending)), 0, -1)
                    if marker.startswith(self._pending[-k:])
                ),
                0,
            )
            cut = len(self._pending) - keep
            ready, self._pending = self._pending[:cut], self._pending[cut:]
            if self._inside:
                self.hidden_chars += len(ready)
            else:
                out.append(ready)
            break
        return self._emit("".join(out))

    def _emit(self, text: str) -> str:
        if self._strip_leading and text:
            stripped = text.lstrip()
            self.hidden_chars += len(text) - len(stripped)
            text = stripped
            self._strip_leading = not text
        return text

    def flush(self) -> str:
        rest, self._pending = self._pending, ""
        if self._inside:
            self.hidden_chars += len(rest)
            return ""
        return self._emit(rest)


def strip_reasoning(text: str) -> tuple[str, int]:
    """Remove `<unused94>thought ... <unused95>` blocks; return the answer and chars removed."""
    stream = ReasoningFilter()
    answer = stream.feed(text) + stream.flush()
    return answer, stream.hidden_chars
