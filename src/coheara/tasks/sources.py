"""The input split into addressable source items, so every output element can cite one.

A task's input (a validated Pydantic model) is walked field by field: each scalar
becomes one item, each list entry one item, and each longer text one item per
sentence. Items get short ids (`S1`, `S2`, ...) in input order; the prompt shows
them as `[S3] exam: Crackles at both bases.` and the model cites ids and quotes.
Verification (`find`, `contains`) compares after normalizing case and whitespace.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

_SENTENCE = re.compile(r"(?<=[.!?;])\s+(?=[A-Z(\"'])")
_LINE = re.compile(r"\s*\n\s*")
_SPACE = re.compile(r"\s+")
_NUMBER = re.compile(r"(?<![\w.])[-+]?\d+(?:[.,]\d+)*(?:\.\d+)?")
_QUOTE_MARKS = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"'})
_SPLIT_ABOVE = 160
"""Texts longer than this are split into sentences, so a citation points somewhere exact."""


def normalize(text: str) -> str:
    """Case, whitespace and typographic quotes folded: what quote checks compare."""
    return _SPACE.sub(" ", text.translate(_QUOTE_MARKS)).strip().casefold()


def numbers_in(text: str) -> set[str]:
    """The numbers written in a text, each in a canonical form (`7.50` -> `7.5`, `1,000` ->
    `1000`), so an output's numbers can be looked up in the input's."""
    found = set()
    for match in _NUMBER.finditer(text):
        token = match.group().lstrip("+")
        if "," in token and "." not in token and re.fullmatch(r"-?\d{1,3}(,\d{3})+", token):
            token = token.replace(",", "")
        token = token.replace(",", ".")
        found.add(canonical_number(token))
    return found


def canonical_number(token: str) -> str:
    try:
        value = float(token)
    except ValueError:
        return token
    return f"{value:.6f}".rstrip("0").rstrip(".") if "." in token else str(int(value))


@dataclass(frozen=True)
class SourceItem:
    id: str
    path: str
    """Where it sits in the input: `vitals.heart_rate`, `medications[2]`, `exam#3` (sentence 3)."""
    text: str


class Sources:
    """The numbered items of one task input."""

    def __init__(self, items: list[SourceItem]) -> None:
        self.items = items
        self.by_id = {item.id: item for item in items}
        self._normalized = {item.id: normalize(item.text) for item in items}
        self._numbers: set[str] | None = None

    @classmethod
    def from_input(cls, data: BaseModel | dict[str, Any], *, skip: tuple[str, ...] = ()) -> Sources:
        """Number every non-empty value of the input; `skip` names fields (top-level names
        or dotted paths) that carry no clinical content (an output template, a grade)."""
        if isinstance(data, BaseModel):
            data = data.model_dump(mode="json", exclude_none=True)
        items: list[SourceItem] = []
        for path, text in _walk(data, "", skip):
            pieces = _pieces(text)
            for index, piece in enumerate(pieces, start=1):
                where = f"{path}#{index}" if len(pieces) > 1 else path
                items.append(SourceItem(f"S{len(items) + 1}", where, piece))
        return cls(items)

    def render(self) -> str:
        """The block the prompt shows: one `[id] path: text` line per item."""
        return "\n".join(f"[{item.id}] {item.path}: {item.text}" for item in self.items)

    def contains(self, source_id: str, quote: str) -> bool:
        """Whether `quote` occurs (normalized) in the item `source_id`."""
        text = self._normalized.get(source_id)
        needle = normalize(quote)
        return bool(text is not None and needle and needle in text)

    def find(self, quote: str) -> list[str]:
        """The ids of every item that holds `quote` (normalized)."""
        needle = normalize(quote)
        if not needle:
            return []
        return [item_id for item_id, text in self._normalized.items() if needle in text]

    def numbers(self) -> set[str]:
        """Every number written anywhere in the input, canonical."""
        if self._numbers is None:
            found: set[str] = set()
            for item in self.items:
                found |= numbers_in(item.text)
            self._numbers = found
        return self._numbers

    def __len__(self) -> int:
        return len(self.items)


def _walk(value: Any, path: str, skip: tuple[str, ...]) -> Iterator[tuple[str, str]]:
    if isinstance(value, dict):
        for key, inner in value.items():
            where = f"{path}.{key}" if path else str(key)
            if where in skip:
                continue
            yield from _walk(inner, where, skip)
    elif isinstance(value, list):
        for index, inner in enumerate(value):
            yield from _walk(inner, f"{path}[{index}]", skip)
    elif isinstance(value, bool):
        yield path, "yes" if value else "no"
    elif value is None:
        return
    else:
        text = str(value).strip()
        if text:
            yield path, text


def _pieces(text: str) -> list[str]:
    """Each line of a text (a lab report's rows), and in a long text each sentence; never
    at a full stop before a digit (`ref. 3.5`)."""
    lines = [line.strip() for line in _LINE.split(text) if line.strip()]
    if len(text) <= _SPLIT_ABOVE:
        return lines
    return [piece.strip() for line in lines for piece in _SENTENCE.split(line) if piece.strip()]
