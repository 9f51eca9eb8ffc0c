"""A stream's life as events, for the features that follow streams without the stream core naming them: a stream
opened for a message, a stream that became final (however it ended: its worker, a takeover's, a /stop, a poll that
gave it up), and a message answered without one (a command, a refusal, Redis away). The audit trail subscribes
(services/audit/queue.py); a bot without it has no subscriber, and sending costs a lookup.

The signals are blinker's, one set per bot (`StreamLife()`); a receiver takes the sender (the stream id, or the
`Reply`) and the keyword arguments named below, and must not raise (it runs on the stream's own path).

How a message ended and what a record is of are named here once: the stream core says them, the audit trail
records them.
"""

from __future__ import annotations

from dataclasses import dataclass

from blinker import Namespace

from services.wecom.messages import Inbound

# What a record is of (`kind`): a user's message; a form's tap, a rating, a /stop, a push (each an event of its own).
MESSAGE, FORM_ACTION, FEEDBACK, STOP, PUSH = "message", "form_action", "feedback", "stop", "push"
# How the message ended (`outcome`).
ANSWERED, NOTE, STOPPED, BLOCKED, OVER_QUOTA, BUSY, ERROR = (
    "answered",
    "note",
    "stopped",
    "blocked",
    "over_quota",
    "busy",
    "error",
)


@dataclass(frozen=True)
class Reply:
    """A finished reply to a new message that needed no stream: what it said, how it ended, what it was
    (`redis_away`: made while Redis did not answer)."""

    bot: str
    message: Inbound
    note: str
    outcome: str
    kind: str
    owner: str
    redis_away: bool = False


class StreamLife:
    """One bot's streams' events: `opened` (sender: the stream id; `at`, its epoch seconds), `ended` (sender: the
    stream id, final now), `replied` (sender: a Reply)."""

    def __init__(self) -> None:
        signals = Namespace()
        self.opened = signals.signal("opened")
        self.ended = signals.signal("ended")
        self.replied = signals.signal("replied")
