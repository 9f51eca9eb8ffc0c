"""When WeCom sent the callback being answered (its signed `timestamp`, whole seconds), for a reply that must not
come later than WeCom waits for it: a card WeCom takes once (services/streams/card_returns.py). Request context,
like the log context: set for every callback, in the thread that answers it."""

from __future__ import annotations

import time
from contextvars import ContextVar

_sent_at: ContextVar[int | None] = ContextVar("callback_sent_at", default=None)


def callback_sent(timestamp: int | None) -> None:
    """The callback being answered in this context was sent at `timestamp` (None: not a WeCom callback)."""
    _sent_at.set(timestamp)


def seconds_since_callback_sent() -> float:
    """How long ago WeCom sent the callback being answered, at most a second more than it was (its timestamp is
    in whole seconds); 0 outside a callback."""
    sent = _sent_at.get()
    return 0.0 if sent is None else max(0.0, time.time() - sent)
