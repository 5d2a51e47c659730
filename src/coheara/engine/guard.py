"""Degeneration guard: stop a generation that has started repeating itself.

MedGemma is known to fall into repetition loops, above all when writing JSON.
The guard watches the tail of the text as it streams and trips once the same
unit (1 to `max_period` characters) has repeated enough times to be a loop,
so a loop costs a bounded number of tokens instead of the output limit.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoopReport:
    period: int
    """Length in characters of the repeated unit."""
    start: int
    """Offset in the text where the loop begins."""


class RepetitionGuard:
    """Trips when the tail is one unit repeated, covering at least `min_span` characters.

    Short units need more repeats than long ones: `-----` is fine in a note,
    sixty dashes are not; a sentence said four times in a row is a loop.
    """

    def __init__(
        self,
        *,
        max_period: int = 200,
        min_span: int = 160,
        min_repeats: int = 4,
        whitespace_span: int = 256,
    ):
        self.max_period = max_period
        self.min_span = min_span
        self.min_repeats = min_repeats
        self.whitespace_span = whitespace_span
        self._text = ""
        self._checked = 0

    def feed(self, delta: str) -> LoopReport | None:
        self._text += delta
        # Check at most every 16 new characters: cheap and still a bounded delay.
        if len(self._text) - self._checked < 16:
            return None
        self._checked = len(self._text)
        return self.check(self._text)

    def check(self, text: str) -> LoopReport | None:
        n = len(text)
        for period in range(1, self.max_period + 1):
            need = max(self.min_span, period * self.min_repeats)
            if need > n:
                break
            unit = text[n - period :]
            if unit.isspace():
                # Blank lines and indentation repeat legitimately; only a long run is a loop
                # (the classic runaway of JSON modes that allow free whitespace).
                need = max(need, self.whitespace_span)
                if need > n:
                    continue
            if text[n - need :] != (unit * (need // period + 1))[-need:]:
                continue
            start = n - need
            while start > 0 and text[start - 1] == text[start - 1 + period]:
                start -= 1
            return LoopReport(period, start)
        return None
