"""The record of each tick in Redis, which makes a tick happen once across every replica and worker
(docs/architecture.md, "Schedules").

A tick is claimed once (CLAIM: the first process to find it due creates its hash; any other finds it there), run
or skipped, and listed among the schedule's open ticks until it is settled. A running tick names the stream its
current try answers in; a try whose process died (its stream's lease lapsed before the stream ended, or it never
opened one) is taken over by whichever process looks next (TAKE_OVER: once per try), which ends the old stream and
asks the backend again. Once the answer has ended, one process at a time pushes it (a claim renewed before each
target, taken over when it lapses), and each target's push is recorded as it settles: a target pushed, or whose
send went out and lost its reply, is never sent again by anyone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis

from services.keys import (
    SCHEDULE_LAST_TTL_SECONDS,
    SCHEDULE_PUSH_CLAIM_TTL_SECONDS,
    SCHEDULE_TICK_TTL_SECONDS,
    Keys,
)
from services.lua import LuaScript
from services.replication import SCHEDULE_CLAIM, Replication

RUNNING, PUSHING, PUSHED, PARTIAL, FAILED, SKIPPED = "running", "pushing", "pushed", "partial", "failed", "skipped"
SETTLED = (PUSHED, PARTIAL, FAILED, SKIPPED)
MOST_TRIES = 3  # a tick whose process died this many times is given up (failed)

# KEYS: tick, last, open. ARGV: tick, owner, now, status (running or skipped), why, tick TTL, last TTL, the open
# member, '1' for a tick of the timetable ('' for one run by hand). Creates the tick unless it exists (0), moves the
# schedule's latest tick on (a timetable's tick), lists a running tick as open; 1 when created.
_CLAIM = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local running = ARGV[4] == 'running'
redis.call('HSET', KEYS[1], 'status', ARGV[4], 'owner', ARGV[2], 'tries', running and 1 or 0, 'claimed_at', ARGV[3],
           'why', ARGV[5])
redis.call('EXPIRE', KEYS[1], ARGV[6])
if ARGV[9] == '1' then
  if tonumber(ARGV[1]) > (tonumber(redis.call('GET', KEYS[2])) or 0) then
    redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[7])
  else
    redis.call('EXPIRE', KEYS[2], ARGV[7])
  end
end
if running then
  redis.call('ZADD', KEYS[3], ARGV[1], ARGV[8])
  redis.call('EXPIRE', KEYS[3], ARGV[6])
end
return 1
"""

# KEYS: last. ARGV: tick, TTL. A schedule seen for the first time (or again after a month unseen): its ticks are
# counted from `tick` on, the ones before it neither run nor skipped.
_SEEN = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then return 1 end
return 0
"""

# KEYS: tick. ARGV: the try's stream as the taker saw it ('' for none), owner, now, most tries, the try's number as
# the taker saw it. The try is the taker's (its new number), or the tick is given up past the most tries ('failed');
# false when another took it first. (The number fences a try that never named a stream: its stream reads '' before
# a take-over and after it, until the new try names its own.)
_TAKE_OVER = """
local h = redis.call('HMGET', KEYS[1], 'status', 'stream', 'tries')
if h[1] ~= 'running' or (h[2] or '') ~= ARGV[1] or (h[3] or '0') ~= ARGV[5] then return false end
local tries = (tonumber(h[3]) or 0) + 1
if tries > tonumber(ARGV[4]) then
  redis.call('HSET', KEYS[1], 'status', 'failed', 'why', 'the processes running it died ' .. h[3] .. ' times')
  return 'failed'
end
redis.call('HSET', KEYS[1], 'tries', tries, 'owner', ARGV[2], 'stream', '', 'claimed_at', ARGV[3])
return tostring(tries)
"""

# KEYS: tick. ARGV: owner, stream. The try's stream, written if the try is still the owner's (1), else 0.
_NAME_STREAM = """
local h = redis.call('HMGET', KEYS[1], 'status', 'owner', 'stream')
if h[1] ~= 'running' or h[2] ~= ARGV[1] or (h[3] or '') ~= '' then return 0 end
redis.call('HSET', KEYS[1], 'stream', ARGV[2])
return 1
"""

# KEYS: tick, push claim. ARGV: owner, claim TTL, the try's stream as the pusher read it. Claims (or renews) the
# pushing of an answer that ended: 1 if this owner pushes now, 0 if another does, the tick is settled, or its try is
# no longer that stream's (taken over since it was read: the take-over ended the old stream, whose end is no answer).
_CLAIM_PUSH = """
local h = redis.call('HMGET', KEYS[1], 'status', 'stream')
local status = h[1]
if (status ~= 'running' and status ~= 'pushing') or (h[2] or '') ~= ARGV[3] then return 0 end
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[2])
redis.call('HSET', KEYS[1], 'status', 'pushing')
return 1
"""


@dataclass(frozen=True)
class TickState:
    """A tick's record as read: its status, tries, owner, current stream, why it failed or was skipped, and each
    target's push (target -> "status" or "status: error")."""

    status: str
    tries: int
    owner: str
    stream: str
    claimed_at: float
    why: str
    pushed: dict[str, str]

    @classmethod
    def of(cls, found: dict[str, str]) -> TickState | None:
        if not found.get("status"):
            return None
        pushed = {key.removeprefix("to:"): value for key, value in found.items() if key.startswith("to:")}
        return cls(
            found["status"],
            int(found.get("tries") or 0),
            found.get("owner", ""),
            found.get("stream", ""),
            float(found.get("claimed_at") or 0),
            found.get("why", ""),
            pushed,
        )


class TickBook:
    """One bot's ticks, in Redis."""

    def __init__(self, client: redis.Redis, keys: Keys, owner: str, durable: Replication):
        self.client = client
        self.keys = keys
        self.owner = owner
        self.durable = durable  # the claims wait for a replica (services/replication.py)
        self._claim = LuaScript(client, _CLAIM)
        self._take_over = LuaScript(client, _TAKE_OVER)
        self._name_stream = LuaScript(client, _NAME_STREAM)
        self._claim_push = LuaScript(client, _CLAIM_PUSH)
        self._seen = LuaScript(client, _SEEN)

    def last(self, names: list[str]) -> dict[str, int | None]:
        """The latest tick run or skipped of each schedule (None: none known), in one round trip."""
        pipe = self.client.pipeline(transaction=False)
        for name in names:
            pipe.get(self.keys.schedule_last(name))
        return {name: int(value) if value else None for name, value in zip(names, pipe.execute(), strict=True)}

    def seen(self, name: str, tick: int) -> None:
        """A schedule found with no latest tick: its ticks count from `tick` on (earlier ones are not missed)."""
        self._seen([self.keys.schedule_last(name)], [tick, SCHEDULE_LAST_TTL_SECONDS])

    def claim(self, name: str, tick: int, skipped_because: str = "", by_hand: bool = False) -> bool:
        """Create the tick, running (or skipped, saying why); False when another process did first. A tick run
        `by_hand` (`schedules run`) leaves the timetable's ticks as they were."""
        return self.claim_each([(name, tick, skipped_because)], by_hand)[0]

    def claim_each(self, ticks: list[tuple[str, int, str]], by_hand: bool = False) -> list[bool]:
        """Claim each (schedule, tick, why it is skipped or "") in one round trip: whether this process did, each.

        Raises:
            redis.RedisError: Redis did not answer (a claim may have been made: its tick runs, taken over).
        """
        calls = []
        for name, tick, skipped_because in ticks:
            keys = [self.keys.schedule_tick(name, tick), self.keys.schedule_last(name), self.keys.schedule_open()]
            status = SKIPPED if skipped_because else RUNNING
            args = [tick, self.owner, f"{time.time():.3f}", status, skipped_because]
            ttls = [SCHEDULE_TICK_TTL_SECONDS, SCHEDULE_LAST_TTL_SECONDS]
            calls.append((keys, [*args, *ttls, f"{name}:{tick}", "" if by_hand else "1"]))
        results = self._durable_claims(calls)
        for result in results:
            if isinstance(result, Exception):
                raise result
        return [bool(result) for result in results]

    def _durable_claims(self, calls: list[tuple[list[str], list]]) -> list:
        """The claims in one round trip that waits for a replica to hold them (Sentinel, Cluster: a claim a
        failover lost would let a second process run the tick); NOSCRIPT: the script loaded, the claims sent again."""
        if not calls:
            return []
        commands = [self._claim.command(keys, args) for keys, args in calls]
        results = self.durable.execute(self.keys.schedule_open(), commands, SCHEDULE_CLAIM)
        if any(isinstance(result, redis.exceptions.NoScriptError) for result in results):
            self._claim.load()
            results = self.durable.execute(self.keys.schedule_open(), commands, SCHEDULE_CLAIM)
        return results

    def open_ticks(self) -> list[tuple[str, int]]:
        """The bot's ticks not yet settled: (schedule, tick), oldest first."""
        found = self.client.zrange(self.keys.schedule_open(), 0, -1)
        return [(name, int(tick)) for name, _, tick in (member.rpartition(":") for member in found)]

    def state(self, name: str, tick: int) -> TickState | None:
        return TickState.of(self.client.hgetall(self.keys.schedule_tick(name, tick)))

    def take_over(self, name: str, tick: int, seen: TickState) -> str | None:
        """Take the tick's try over from a process that died (`seen`: the tick as the taker read it): the new try's
        number as text, FAILED when the tick has had its tries, None when another process took it."""
        args = [seen.stream, self.owner, time.time(), MOST_TRIES, seen.tries]
        found = self._take_over([self.keys.schedule_tick(name, tick)], args)
        return found or None

    def name_stream(self, name: str, tick: int, stream: str) -> bool:
        """Record the stream of this process's try; False if the try is no longer this process's."""
        return bool(self._name_stream([self.keys.schedule_tick(name, tick)], [self.owner, stream]))

    def claim_push(self, name: str, tick: int, stream: str) -> bool:
        """Claim (or renew) the pushing of the answer of the tick's try in `stream` for
        SCHEDULE_PUSH_CLAIM_TTL_SECONDS."""
        keys = [self.keys.schedule_tick(name, tick), self.keys.schedule_push_claim(name, tick)]
        return bool(self._claim_push(keys, [self.owner, SCHEDULE_PUSH_CLAIM_TTL_SECONDS, stream]))

    def pushed(self, name: str, tick: int, target: str, said: str) -> None:
        """A target's push settled: `said` is its status, or "status: error"."""
        self.client.hset(self.keys.schedule_tick(name, tick), f"to:{target}", said)

    def settle(self, name: str, tick: int, status: str, why: str = "") -> None:
        """The tick is over (pushed, partial, failed): no longer open, its push claim given back."""
        pipe = self.client.pipeline(transaction=False)
        pipe.hset(self.keys.schedule_tick(name, tick), mapping={"status": status, "why": why})
        pipe.zrem(self.keys.schedule_open(), f"{name}:{tick}")
        pipe.delete(self.keys.schedule_push_claim(name, tick))
        pipe.execute()

    def forget_open(self, name: str, tick: int) -> None:
        """A tick that is settled, or gone (its record expired), leaves the open list."""
        self.client.zrem(self.keys.schedule_open(), f"{name}:{tick}")
