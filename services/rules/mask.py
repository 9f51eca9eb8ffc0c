"""An answer's text on its way to the bubble through the content rules: what could still become a match waits for
the text that decides (at most HOLD_SECONDS), and what goes on is masked. So a word split over two of Dify's deltas
is masked before any poll, frame or message shows its first half, and nothing shown is ever taken back."""

from __future__ import annotations

import time

from services.rules.rules import NO_RULES, ContentRules, masked

HOLD_SECONDS = 1.0  # the longest a tail waits for the text that decides, once more text (or a ping) comes


class ContentMask:
    """One answer's mask (not thread-safe: an answer's text is written by one thread at a time). `count` is how many
    matches it masked."""

    def __init__(self, rules: ContentRules = NO_RULES):
        self.rules = rules
        self.pending = ""  # text received and not yet let go
        self.held_since: float | None = None
        self.count = 0

    @property
    def active(self) -> bool:
        return not self.rules.empty

    def admit(self, text: str) -> str:
        """More of the answer: what can go on now, masked."""
        if not self.active:
            return text
        waited = len(self.pending)
        self.pending += text
        spans, cut = self.rules.scan(self.pending)
        cut = _before(spans, cut)  # a match across the cut waits whole
        if self._overdue():  # what waited goes on now, with any match it begins, whole and masked
            cut = _after(spans, max(cut, waited))
        return self._release(cut, spans)

    def due(self) -> str:
        """A read with no text: a tail that waited HOLD_SECONDS goes on as it is (masked where it matches)."""
        return self.flush() if self.pending and self._overdue() else ""

    def flush(self) -> str:
        """The answer ended (or paused for a form): everything held goes on."""
        if not self.pending:
            return ""
        return self._release(len(self.pending), self.rules.scan(self.pending)[0])

    def whole(self, text: str) -> str:
        """A whole answer replacing the text so far (Dify's message_replace), masked; nothing stays held."""
        self.pending, self.held_since = "", None
        if not self.active:
            return text
        result, count = self.rules.mask(text)
        self.count += count
        return result

    def apply(self, text: str) -> str:
        """`text` masked, for a comparison with what was let go (no count, nothing held)."""
        return self.rules.mask(text)[0] if self.active else text

    def _release(self, cut: int, spans: list[tuple[int, int]]) -> str:
        pending = self.pending
        inside = [span for span in spans if span[1] <= cut]
        out = masked(pending[:cut], inside)
        self.count += len(inside)
        self.pending = pending[cut:]
        if not self.pending:
            self.held_since = None
        elif self.held_since is None or cut:
            self.held_since = time.monotonic()
        return out

    def _overdue(self) -> bool:
        return self.held_since is not None and time.monotonic() - self.held_since >= HOLD_SECONDS


def _before(spans: list[tuple[int, int]], cut: int) -> int:
    """`cut` moved back to the start of a match it falls inside."""
    for start, end in spans:
        if start < cut < end:
            return start
    return cut


def _after(spans: list[tuple[int, int]], cut: int) -> int:
    """`cut` moved on to the end of a match it falls inside."""
    for start, end in spans:
        if start < cut < end:
            return end
    return cut
