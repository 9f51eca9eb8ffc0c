"""One attempt at one answer, as the stream core hands it to the bot's backend (services/streams/backend.py): the
job, the answer being made, when its time is up, and the core's own steps before a backend call (who may ask, a
slot under the bot's cap, the call counted) and its patience with a dependency away: WeCom waits minutes for a
bubble, so an outage shorter than that costs the user a wait, not the answer."""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from services import metrics
from services.auth.authorizer import AuthUnavailable, DirectoryUnavailable
from services.outage import best_effort_value, delays_for, through_outage
from services.streams.answer import Answer, StreamAborted
from services.streams.finisher import Finisher
from services.streams.job import StreamJob
from services.streams.slots import AnswerSlots
from services.streams.store import TAKEN, StreamStore
from services.texts import Texts

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Before an answer starts, Redis away is waited out while the bubble has this long left to show an answer in, trying
# again every START_RETRY_DELAY seconds at most (Turn.before_start).
ANSWER_ROOM_SECONDS = 60.0
START_RETRY_DELAY = 2.0
# A call the backend never took is asked again, the pause between tries growing to PATIENCE_PAUSES[-1].
PATIENCE_PAUSES = (1.0, 2.0, 4.0, 5.0)


class NoSlot(Exception):
    """The question waited QUEUE_WAIT_SECONDS in line and no answer slot came free."""


@dataclass(frozen=True)
class TurnRules:
    """A bot's answers' limits: how long one may run, how long a backend call it never took is asked again
    (BACKEND_RETRY_SECONDS, DIFY_RETRY_SECONDS) and how long the user table or the auth API away is waited out
    (AUTH_RETRY_SECONDS)."""

    max_seconds: float
    retry_seconds: float
    auth_retry_seconds: float


class Turn:
    """One attempt at `job`'s answer, made into `answer`."""

    def __init__(
        self,
        job: StreamJob,
        answer: Answer,
        cancelled: threading.Event,
        rules: TurnRules,
        deps: TurnDeps,
    ):
        self.job = job
        self.answer = answer
        self.cancelled = cancelled
        self.rules = rules
        self.deps = deps
        self.deadline = time.monotonic() + max(0.0, job.created_at + rules.max_seconds - time.time())

    @property
    def store(self) -> StreamStore:
        return self.deps.store

    @property
    def finisher(self) -> Finisher:
        return self.deps.finisher

    @property
    def texts(self) -> Texts:
        return self.deps.texts

    @property
    def bot(self) -> str:
        return self.deps.bot

    def authorize(self) -> dict:
        """The user's inputs from the authorizer (AUTH_MODE=external; {} without one). The user table or the auth API
        away (a database restart, the API down) is waited out for AUTH_RETRY_SECONDS while there is room
        (room_ends), trying again every few seconds, as a Redis outage is (before_start). A refusal (an unknown or
        disabled user) is final at once.

        Raises:
            AuthError: the user may not ask, or the outage lasted.
            StreamAborted: the answer was stopped, or its process drains, while it waited.
        """
        prepare = self.deps.prepare
        return self.tried_again(
            lambda: self.before_start(lambda: prepare(self.job), "authorizing the user"),
            lambda exc: isinstance(exc, (DirectoryUnavailable, AuthUnavailable)),
            min(self.room_ends(), time.monotonic() + self.rules.auth_retry_seconds),
            "could not authorize the user",
        )

    def before_start(self, call: Callable[[], T], what: str) -> T:
        """A Redis call the answer cannot start without. Redis away (a failover, a restart) is waited out for as
        long as an answer could still be made and shown in the bubble, not only for a blip: until ANSWER_ROOM_SECONDS
        before WeCom stops polling, or the answer's time is up, or the attempt is no longer this process's. The
        bubble spins meanwhile, and it is answered soon after Redis is back (tries every START_RETRY_DELAY s at
        most)."""
        delays = delays_for(self.room_ends() - time.monotonic(), longest=START_RETRY_DELAY)
        return through_outage(call, what, delays, give_up=self.cancelled.is_set)

    def room_ends(self) -> float:
        """Until when (monotonic) a dependency away may be waited out before the answer starts: while an answer could
        still be made and shown in the bubble (ANSWER_ROOM_SECONDS before WeCom stops polling it), and the answer's
        time is not up."""
        latest = min(self.rules.max_seconds, self.deps.finisher.window_seconds - ANSWER_ROOM_SECONDS)
        return time.monotonic() + self.job.created_at + latest - time.time()

    def patience_ends(self, deadline: float) -> float:
        """Until when (monotonic) a backend call it never took is asked again (its patience), within `deadline` (the
        call's) and the room the bubble has left."""
        return min(deadline, self.room_ends(), time.monotonic() + self.rules.retry_seconds)

    def take_slot(self) -> None:
        """One of the bot's answer slots (MAX_ACTIVE_ANSWERS_PER_BOT) before the backend call: over the cap, the
        question waits in line, its bubble saying how many are ahead. Without a cap, nothing.

        Raises:
            NoSlot: none came free within QUEUE_WAIT_SECONDS.
            StreamAborted: the answer was stopped (or taken elsewhere) while it waited in line.
        """
        slots, answer = self.deps.slots, self.answer
        if slots is None:
            return
        line = self.texts.say("queued")
        waited = []

        def waiting(ahead: int) -> None:
            waited.append(ahead)
            answer.writer.add([], {"prompt": line.format(ahead=ahead)})

        taken = self.before_start(lambda: slots.take(self.job.stream_id, self.cancelled, waiting), "waiting for a slot")
        if waited:
            answer.writer.add([], {"prompt": ""})
        if not taken and self.cancelled.is_set():
            raise StreamAborted
        if not taken:
            raise NoSlot

    def count_call(self, backend: str) -> None:
        """Count the message's backend call by kind (dify_calls_total), just before it is made; a second new call
        for one message is counted as a duplicate, which the monitoring bundle alerts on. A queued stream's take
        counted its first.

        Raises:
            StreamAborted: the stream is another attempt's now, or its user stopped it: no call is made.
        """
        job, store = self.job, self.store
        counted, job.counted_call = job.counted_call, ""
        kind = counted or best_effort_value(
            lambda: store.count_dify_call(job.stream_id, job.attempt), "counting the call", ()
        )
        kind = kind or "new"
        if kind == TAKEN:
            raise StreamAborted
        if kind == "duplicate":
            logger.error("a second %s call for this message (not a documented restart)", backend)
        metrics.DIFY_CALLS.labels(self.bot, backend, kind, job.route).inc()

    def count_follow_up(self, backend: str, kind: str) -> None:
        """Count a call that follows the message's first on (dify_calls_total: resume, form, reattach, ...)."""
        metrics.DIFY_CALLS.labels(self.bot, backend, kind, self.job.route).inc()

    def tried_again(
        self,
        call: Callable[[], T],
        may_try_again: Callable[[Exception], bool],
        until: float,
        what: str,
        on_again: Callable[[], object] = lambda: None,
    ) -> T:
        """`call()`, made again while it fails in a way `may_try_again` says may be waited out (a dependency away),
        the waits between tries PATIENCE_PAUSES then its last, until `until` (monotonic); `on_again` before each new
        try.

        Raises:
            Exception: the call's last failure, once `may_try_again` says no or the time is up.
            StreamAborted: the answer was stopped, or its process drains, while it waited.
        """
        pauses = itertools.chain(PATIENCE_PAUSES, itertools.repeat(PATIENCE_PAUSES[-1]))
        while True:
            try:
                return call()
            except Exception as exc:
                pause = next(pauses)
                if not may_try_again(exc) or time.monotonic() + pause > until:
                    raise
                logger.warning("%s (%s); trying again in %.0fs", what, getattr(exc, "code", type(exc).__name__), pause)
                on_again()
            if self.cancelled.wait(pause):
                raise StreamAborted


@dataclass
class TurnDeps:
    """What every turn of a bot is made with: its stream store, finisher and texts, its cap on answers at once
    (None: none), and the authorization of its users."""

    store: StreamStore
    finisher: Finisher
    texts: Texts
    bot: str
    slots: AnswerSlots | None = None
    prepare: Callable[[StreamJob], dict] = lambda job: {}  # the user's authorization (by default: anyone, no inputs)
