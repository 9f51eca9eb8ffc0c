"""A template card must reach the user once: the poll script hands a card out with one poll's reply only (WeCom
takes one card per message), so a card whose reply never reached WeCom goes back, to ride on a later poll's:

- the poll's Redis call failed (Redis may still run the script when it resumes): the card is given back once Redis
  answers, in a thread of its own;
- the reply comes later than WeCom waits (judged by the callback's signed timestamp): the card is left out and given
  back at once, at most `MOST_RETURNS` times (a clock far off WeCom's would otherwise hold it back for ever).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import partial

from services.loops import Retries
from services.redis_conn import REDIS_FAILURES
from services.streams.poll_path import PollPath

logger = logging.getLogger(__name__)

# WeCom waits about 5 s for a callback's reply. The callback's timestamp is in whole seconds, so its age is never
# underestimated; a card that WeCom did take may go out again with a later poll (WeCom refuses that refresh, and the
# next shows the bubble): late is judged early, as a late reply's card is a form that waits for a tap (FAULTS.md).
REPLY_DEADLINE_SECONDS = 4.5
MOST_RETURNS = 3
# How long a card is tried to be given back while Redis does not answer (the bubble's patience is shorter).
GIVE_UP_SECONDS = 120.0
# Once Redis answers that no poll handed the card out, how long the poll's script may still run after it (a paused
# Redis runs what it buffered when it resumes, in any order across connections).
LATE_SCRIPT_SECONDS = 10.0
RETRY_SECONDS = 0.5
RETRIES = (0.0,) + (RETRY_SECONDS,) * int(GIVE_UP_SECONDS / RETRY_SECONDS)
MOST_WAITING = 10_000


@dataclass
class _Return:
    polls: PollPath
    stream_id: str
    token: str
    since: float
    answered_at: float | None = None  # when Redis first answered "not handed out"


class CardReturns:
    """One per process: gives back the cards of polls whose replies did not reach WeCom."""

    def __init__(self):
        self._retries = Retries("card_returns", "card-returns", MOST_WAITING)

    def later(self, polls: PollPath, stream_id: str, token: str) -> None:
        """The poll `token` failed against Redis: give back a card it may have taken out, once Redis answers."""
        if not self._retries.add(
            partial(self._try, _Return(polls, stream_id, token, time.monotonic())), RETRIES, _gave_up
        ):
            logger.warning("%d cards wait to be given back; this one is not", MOST_WAITING)

    def close(self) -> None:
        """The bot closes: the cards still waiting to be given back are not (their Redis is closing too)."""
        self._retries.clear()

    def now(self, polls: PollPath, stream_id: str, token: str) -> bool:
        """The poll `token` took out a card whose reply comes too late: give it back now (or, failing, later).
        False when it stays with this reply (given back `MOST_RETURNS` times already)."""
        try:
            outcome = polls.give_card_back(stream_id, token, MOST_RETURNS)
        except REDIS_FAILURES:
            self.later(polls, stream_id, token)
            return True
        if outcome == 3:
            return False
        logger.warning("a card's reply would come too late for WeCom; the next poll carries it")
        return True

    @staticmethod
    def _try(item: _Return) -> bool:
        """One try; True when nothing more is to be done for `item`."""
        now = time.monotonic()
        if now - item.since > GIVE_UP_SECONDS:
            _gave_up()
            return True
        try:
            outcome = item.polls.give_card_back(item.stream_id, item.token, MOST_RETURNS)
        except REDIS_FAILURES:
            return False
        if outcome == 1:
            logger.warning("a poll that failed against Redis had taken out the form's card; the next poll carries it")
            return True
        if outcome in (2, 3):
            return True
        item.answered_at = item.answered_at or now
        return now - item.answered_at > LATE_SCRIPT_SECONDS


def _gave_up() -> None:
    logger.warning("could not give a card back: Redis did not answer")
