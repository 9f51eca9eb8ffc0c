"""A stream's life as events, for the features that follow streams without the stream core naming them:

- `opened`: a stream opened for a message; `replied`: a message answered without one (a command, a refusal, Redis
  away); `ended`: a stream became final, however it ended (its worker, a takeover's, a /stop, a poll that gave it
  up). The audit trail follows these (services/audit/queue.py).
- `closed_early`: a poll closed a bubble before its answer ended (its window or size ran out): callback mode's
  watch follows the answer to its end (services/callback/delivery.py).
- `rest_owed`: an answer is about to end longer than its bubble shows, its bubble still live: the final reply says
  the rest follows, as a message of its own after the end, and the same watch sees that it does.
- `expired`: a poll gave a stream up, its replica gone with text shown that cannot be taken again.
- `handed_over`: the stream's work moved between processes: `taken_over` or `resumed` here by a poll, or stopped
  here (`handed_over` by a draining process, `taken_over_elsewhere`).
- `left`: the stream's worker in this process stopped, however (its answer slot goes back: services/streams/
  slots.py).

The metrics count closings, expiries and hand-overs (`follow_outcomes` below). A bot without a feature has no
subscriber for its event, and sending costs a lookup.

The signals are blinker's, one set per bot (`StreamLife()`); a receiver takes the sender (the stream id, or the
`Reply`) and the keyword arguments named below, and must not raise (it runs on the stream's own path).

How a message ended and what a record is of are named here once: the stream core says them, the audit trail
records them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from blinker import Namespace

from services.wecom.messages import Inbound

# What a record is of (`kind`): a user's message; a form's tap, a rating, a /stop, a push (each an event of its own);
# a schedule's tick (its question, answer and pushes).
MESSAGE, FORM_ACTION, FEEDBACK, STOP, PUSH, SCHEDULE = "message", "form_action", "feedback", "stop", "push", "schedule"
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
    """One bot's streams' events. The sender is the stream id, but for `replied` (a Reply); keyword arguments:
    `opened` `at` (epoch seconds), `closed_early` `reason` (closed_window, closed_overflow) and
    `has_response_url`, `rest_owed` none, `expired` none, `handed_over` `how`, `left` none, `ended` none."""

    def __init__(self) -> None:
        signals = Namespace()
        self.opened = signals.signal("opened")
        self.closed_early = signals.signal("closed_early")
        self.rest_owed = signals.signal("rest_owed")
        self.expired = signals.signal("expired")
        self.handed_over = signals.signal("handed_over")
        self.left = signals.signal("left")
        self.ended = signals.signal("ended")
        self.replied = signals.signal("replied")


def follow_outcomes(life: StreamLife, count: Callable[[str], object]) -> None:
    """Count each closing, expiry and hand-over of `life`'s streams by what it was (`count(event)`:
    stream_outcomes_total)."""
    life.closed_early.connect(lambda _, reason, **__: count(reason), weak=False)
    life.expired.connect(lambda _: count("expired"), weak=False)
    life.handed_over.connect(lambda _, how: count(how), weak=False)
