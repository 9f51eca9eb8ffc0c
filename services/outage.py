"""How the gateway's background work (stream workers, the long connection's holder and queue) lives through a Redis
outage, in one place.

Every Redis call a worker makes goes through `through_outage` (the call must succeed: a short outage is waited
out, a longer one raises) or `best_effort` (the answer goes on without it). So a blip never fails an answer that
Dify completed: the deltas wait in the stream's writer, the final state is retried, and what cannot be written at
all (the bubble is gone) is sent whole through response_url.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from services.redis_conn import REDIS_FAILURES

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Waits between attempts: about 7.5 s in all, longer than a Redis restart or a Sentinel failover usually takes.
RETRY_DELAYS = (0.5, 1.0, 2.0, 4.0)
LONGEST_DELAY = 10.0


def delays_for(seconds: float, longest: float = LONGEST_DELAY) -> tuple[float, ...]:
    """Waits between attempts that add up to at least `seconds` (and to RETRY_DELAYS at the least), growing from
    half a second to `longest`: for a write that is worth waiting for as long as it is of use."""
    delays, total = list(RETRY_DELAYS), sum(RETRY_DELAYS)
    while total < seconds:
        delays.append(min(longest, delays[-1] * 2))
        total += delays[-1]
    return tuple(delays)


def steady_delays(seconds: float, every: float = 1.0) -> tuple[float, ...]:
    """Waits of `every` second that add up to at least `seconds`: for a write that must land soon after Redis is
    back (before a poll gives the stream up: STREAM_TAKEOVER_GRACE_SECONDS), not whenever a growing wait ends."""
    return (every,) * max(1, int(seconds / every) + 1)


def through_outage(
    call: Callable[[], T],
    what: str,
    delays: tuple[float, ...] = RETRY_DELAYS,
    give_up: Callable[[], bool] | None = None,
) -> T:
    """`call()`, tried again after each delay while Redis fails (no more once `give_up()` says so).

    Raises:
        redis.RedisError (or a cluster error): the last failure, once every delay has passed (or `give_up()`).
    """
    for delay in delays:
        try:
            return call()
        except REDIS_FAILURES as exc:
            if give_up is not None and give_up():
                raise
            logger.warning("Redis unavailable while %s (%s); trying again in %.1fs", what, exc, delay)
            time.sleep(delay)
    return call()


def best_effort(call: Callable[[], object], what: str, delays: tuple[float, ...] = RETRY_DELAYS) -> bool:
    """`through_outage`, but a lasting failure is logged instead of raised; True if the call succeeded."""
    try:
        through_outage(call, what, delays)
    except REDIS_FAILURES as exc:
        logger.warning("gave up %s: Redis stayed unavailable (%s)", what, exc)
        return False
    return True


def best_effort_value(call: Callable[[], T], what: str, delays: tuple[float, ...] = RETRY_DELAYS) -> T | None:
    """`best_effort` for a call whose reply is wanted: the reply, or None when Redis stayed away."""
    try:
        return through_outage(call, what, delays)
    except REDIS_FAILURES as exc:
        logger.warning("gave up %s: Redis stayed unavailable (%s)", what, exc)
        return None
