"""A stream's life as blinker signals, one set per bot (`StreamLife()`), so that the features that follow streams
(the audit trail, callback mode's watch, the answer slots, the metrics) subscribe and the stream core names none of
them. Each signal's meaning and arguments are beside it below; a receiver must not raise (it runs on the stream's
own path). How a message ended and what a record is of are named here once.
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
    `opened` `at` (epoch seconds), `closed_early` `reason` (closed_window, closed_overflow; "" when a later poll
    found it closed under an answer still running, in case the poll that closed it lost its reply) and
    `has_response_url`, `rest_owed` none, `expired` none, `handed_over` `how`, `left` none, `ended` none."""

    def __init__(self) -> None:
        signals = Namespace()
        self.opened = signals.signal("opened")  # for a message (the audit trail follows it, and ended, replied)
        self.closed_early = signals.signal("closed_early")  # a poll closed its bubble first: window or size ran out
        self.rest_owed = signals.signal("rest_owed")  # about to end longer than its live bubble shows
        self.expired = signals.signal("expired")  # a poll gave it up: its replica gone with text shown
        self.handed_over = signals.signal("handed_over")  # taken_over, resumed, handed_over, taken_over_elsewhere
        self.left = signals.signal("left")  # its worker here stopped, however (its answer slot goes back)
        self.ended = signals.signal("ended")  # it became final, however it ended
        self.replied = signals.signal("replied")  # a message answered without a stream (a command, a refusal)


def follow_outcomes(life: StreamLife, count: Callable[[str], object]) -> None:
    """Count each closing, expiry and hand-over of `life`'s streams by what it was (`count(event)`:
    stream_outcomes_total)."""
    life.closed_early.connect(lambda _, reason, **__: count(reason) if reason else None, weak=False)
    life.expired.connect(lambda _: count("expired"), weak=False)
    life.handed_over.connect(lambda _, how: count(how), weak=False)
