"""A cap on the answers one bot has running at once across every replica (MAX_ACTIVE_ANSWERS_PER_BOT), with a line
to wait in, first come first served (QUEUE_WAIT_SECONDS). A slot comes back when its answer ends (`release`), or
lapses when its process stops renewing it (docs/architecture.md, "The enterprise's controls on a message's way").
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import redis

from services import metrics
from services.keys import Keys
from services.loops import LazyThread, guarded
from services.lua import LuaScript, ScriptSpec
from services.redis_conn import REDIS_FAILURES

logger = logging.getLogger(__name__)

ASK_EVERY_SECONDS = 0.25  # how often a waiter asks for its slot again
SLOTS_TTL_SECONDS = 24 * 3600  # the slots and the line, renewed by each take

# KEYS: slots (stream id -> lease end), line (stream id -> arrival), seen (stream id -> last ask). ARGV: stream,
# lease_seconds, cap, stale_seconds (a waiter not seen this long has gone), ttl. Returns {1, 0} when the stream
# holds a slot (now, or already), else {0, how many answers must end before its turn}. Times are Redis's own
# (TIME): one clock for every replica.
TAKE = ScriptSpec(
    "SLOT_TAKE",
    keys=("slots", "line", "seen"),
    args=("stream", "lease_seconds", "cap", "stale_seconds", "ttl"),
    body="""
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', K.slots, '-inf', now)
local gone = redis.call('ZRANGEBYSCORE', K.seen, '-inf', now - tonumber(A.stale_seconds))
for _, id in ipairs(gone) do
  redis.call('ZREM', K.line, id)
  redis.call('ZREM', K.seen, id)
end
redis.call('EXPIRE', K.slots, A.ttl)
redis.call('EXPIRE', K.line, A.ttl)
redis.call('EXPIRE', K.seen, A.ttl)
local lease_end = now + tonumber(A.lease_seconds)
if redis.call('ZSCORE', K.slots, A.stream) then
  redis.call('ZADD', K.slots, lease_end, A.stream)
  return {1, 0}
end
redis.call('ZADD', K.line, 'NX', now, A.stream)
redis.call('ZADD', K.seen, now, A.stream)
local ahead = redis.call('ZRANK', K.line, A.stream)
local free = tonumber(A.cap) - redis.call('ZCARD', K.slots)
if ahead < free then
  redis.call('ZREM', K.line, A.stream)
  redis.call('ZREM', K.seen, A.stream)
  redis.call('ZADD', K.slots, lease_end, A.stream)
  return {1, 0}
end
return {0, ahead - math.max(free, 0) + 1}
""",
)


class AnswerSlots:
    """One bot's cap on answers running in Dify, across replicas."""

    def __init__(self, client: redis.Redis, keys: Keys, cap: int, wait_seconds: float, lease_seconds: int, bot: str):
        self.client = client
        self.keys = {"slots": keys.answer_slots(), "line": keys.answer_line(), "seen": keys.answer_line_seen()}
        self.cap = cap
        self.wait_seconds = wait_seconds
        self.lease_seconds = lease_seconds
        self.bot = bot
        self._take = LuaScript(client, TAKE)
        self._held: set[str] = set()  # the slots this process holds, renewed by its keeper
        self._lock = threading.Lock()
        self._keeper = LazyThread(self._keep, f"answer-slots-{bot}")
        self._stop = threading.Event()

    def take(self, stream_id: str, cancelled: threading.Event, waiting: Callable[[int], None]) -> bool:
        """Take a slot for the stream, waiting in line for up to QUEUE_WAIT_SECONDS (`waiting(ahead)` is told how
        many answers must end before its turn, each time that changes): True once taken; False when the wait ran
        out or the answer was cancelled meanwhile (its place in line is given up).

        Raises:
            redis.RedisError (or a cluster error): Redis did not answer.
        """
        started = time.monotonic()
        deadline, told = started + self.wait_seconds, None
        while True:
            granted, ahead = self._ask(stream_id)
            if granted:
                self._hold(stream_id)
                if told is not None:
                    metrics.QUEUE_WAIT_SECONDS.labels(self.bot).observe(time.monotonic() - started)
                return True
            if ahead != told:
                waiting(ahead)
                told = ahead
            if time.monotonic() >= deadline or cancelled.wait(ASK_EVERY_SECONDS):
                self._leave(stream_id)
                metrics.QUEUE_WAIT_SECONDS.labels(self.bot).observe(time.monotonic() - started)
                return False

    def release(self, stream_id: str) -> None:
        """The answer ended (or stopped, or failed): its slot is free for the next in line. Never raises."""
        with self._lock:
            if stream_id not in self._held:
                return
            self._held.discard(stream_id)
        try:
            self.client.zrem(self.keys["slots"], stream_id)
        except REDIS_FAILURES as exc:
            logger.warning("could not give the answer's slot back (%s); it lapses within the lease", exc)

    def stop(self) -> None:
        self._stop.set()

    def _ask(self, stream_id: str) -> tuple[bool, int]:
        args = {
            "stream": stream_id,
            "lease_seconds": self.lease_seconds,
            "cap": self.cap,
            "stale_seconds": max(3.0, 8 * ASK_EVERY_SECONDS),
            "ttl": SLOTS_TTL_SECONDS,
        }
        granted, ahead = self._take.run(self.keys, args)
        return bool(int(granted)), int(ahead)

    def _hold(self, stream_id: str) -> None:
        with self._lock:
            self._held.add(stream_id)
        self._keeper.ensure()

    def _leave(self, stream_id: str) -> None:
        try:
            pipe = self.client.pipeline(transaction=False)
            pipe.zrem(self.keys["line"], stream_id)
            pipe.zrem(self.keys["seen"], stream_id)
            pipe.execute()
        except REDIS_FAILURES:
            pass  # its place lapses once it is no longer seen

    def _keep(self) -> None:
        """Renew this process's slots a few times per lease, for as long as it holds any."""
        while not self._stop.wait(max(0.5, self.lease_seconds / 3)):
            guarded(self._renew, "answer_slots", self._stop)

    def _renew(self) -> None:
        with self._lock:
            held = list(self._held)
        if not held:
            return
        try:
            end = self.client.time()
            lease_end = end[0] + end[1] / 1_000_000 + self.lease_seconds
            self.client.zadd(self.keys["slots"], dict.fromkeys(held, lease_end), xx=True)
        except REDIS_FAILURES as exc:
            logger.warning("could not renew %d answer slots: %s", len(held), exc)
