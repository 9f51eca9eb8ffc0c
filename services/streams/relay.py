"""The common case of a backend's read, handled in the read pump's thread without waking the stream's worker: a
batch of plain answer text while all is well (services/transport/read_pump.py). A backend's relay decodes its read
into that text, or says it is something else (`None`), which the worker's own thread then records."""

from __future__ import annotations

import threading
import time

from services.streams.answer import Answer
from services.streams.store import WRITTEN


class PlainTextRelay:
    """Takes a read's plain text straight to the stream's writer, or declines it (False): before the first answer
    text (it starts the answer), with reasoning open, with the answer detached, with a status line to take away, a
    writer with news, the answer stopped, or its time up (a backend's relay may decline more: `ready`)."""

    __slots__ = ("answer", "cancelled", "deadline")

    def __init__(self, answer: Answer, cancelled: threading.Event, deadline: float):
        self.answer = answer
        self.cancelled = cancelled
        self.deadline = deadline

    def ready(self) -> bool:
        """Whether plain text may go straight to the writer now."""
        answer = self.answer
        writer = answer.writer
        if not answer.answered or answer.thinking or answer.detached:
            return False
        if answer.progress is not None and answer.progress.pending:
            return False
        if writer.state != WRITTEN or writer.error is not None:
            return False
        return not self.cancelled.is_set() and time.monotonic() <= self.deadline

    def take(self, texts: list[str]) -> None:
        """Write `texts` (masked by the content rules, a tail that could become a match held or let go)."""
        answer = self.answer
        deltas = [text for text in texts if text]
        if answer.mask.active:
            released = answer.mask.admit("".join(deltas)) if deltas else answer.mask.due()
            deltas = [released] if released else []
        if deltas:
            answer.text += "".join(deltas)
            answer.writer.add(deltas)
