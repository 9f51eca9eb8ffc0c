"""How a bot's answers reach the user besides a bubble's own replies: one Delivery per WeCom mode, chosen once where
the bot is built (services/bot_build.py). The streams code calls its Delivery for what goes out separately and never
asks which mode it runs in for that; it does tell a message answered in its own right (`StreamJob.separate`: the
rest after a form, a long connection's message no frame carries) from one that has a bubble.

Each mode's Delivery lives with that mode: callback mode's (response_url) in services/callback/delivery.py, the long
connection's (its queue and outbox) in services/longconn/delivery.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from services.streams.job import StreamJob
from services.streams.poll_path import Snapshot
from services.wecom.messages import Inbound


class Delivery(Protocol):
    """The ways of one WeCom mode to the user, besides a bubble's own replies."""

    mode: str  # WECOM_MODE: callback or long_connection
    runs_here: bool  # a new answer runs in the process that opened it (so one that drains or is full refuses it)
    waits_for_redis: bool  # an answer's end waits for Redis through its window: only Redis knows what its bubble shows
    append_pace: float  # seconds between two appends of an answer's text (a connection's bubble gets frames that often)
    append_deadlines: bool  # an append must land before WeCom's next poll could read a stale text (callback mode)

    def dispatch(self, job: StreamJob, run_here: Callable[[StreamJob], None]) -> None:
        """Have a new stream answered: `run_here`, or by whichever serving process takes it."""

    def tracking(self, message: Inbound) -> dict[str, str]:
        """The fields a new stream keeps about how `message` is answered (in the stream's first write)."""

    def track(self, stream_id: str, message: Inbound) -> None:
        """A retry of `message` found its stream open: the stream is answered on the retry's way from now on."""

    def separate_url(self, response_url: str) -> str:
        """The response_url a stream no bubble polls keeps (the rest of a run after a form)."""

    def opened_separately(self, job: StreamJob) -> None:
        """A stream no bubble polls was opened: its answer is owed as a message of its own."""

    def reaches(self, job: StreamJob) -> bool:
        """Whether anything besides the bubble can reach the user of `job`."""

    def send(self, job: StreamJob, message: str, kind: str, patience: float, given_up: bool = False) -> bool:
        """Send `message` (the answer's `kind`: rest, whole_answer or form_rest) as a message of its own, once, trying
        through a Redis outage for up to `patience` seconds where the way goes through Redis; True if it went out.
        `given_up`: the answer's bubble was ended by a poll that gave it up (what it did not show goes out all the
        same, whatever ended the bubble)."""

    def answer_separately(self, job: StreamJob, message: str) -> None:
        """The answer of a stream no bubble polls has ended: send it, unless this mode's own watch does."""

    def keep_end(self, job: StreamJob, status: str, fields: dict[str, str]) -> None:
        """The answer's end went out while Redis was away: keep it where a takeover of the stream finds it, should
        this process exit before Redis is back (a mode whose ends wait for Redis keeps nothing)."""

    def kept_end(self, stream_id: str) -> tuple[str, dict[str, str]] | None:
        """The end an earlier attempt kept for the stream (`keep_end`), (status, fields), or None."""

    def bubble_lost(self, job: StreamJob) -> bool:
        """Whether the bubble of an answer that ended never reached WeCom (its answer then goes out whole)."""

    def start(self, look: Callable[[str], Snapshot | None]) -> None:
        """Start this mode's watch in a serving process; `look` does a poll's work on a stream, without a reply."""

    def stop_watching(self) -> None:
        """Stop the watch (a changed copy of the bot watches in its place); what answers under way use stays open."""

    def close(self) -> None:
        """Stop the watch and release what it holds."""
