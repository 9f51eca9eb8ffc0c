"""Exactly one holder per bot: a lease in Redis with a generation as fencing token, never below the clock in
milliseconds, so that after a failover rolled it back the newer holder still has the larger one and the older yields
instead of kicking back (`cool_down`). docs/architecture.md, "Long-connection mode".
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis

from services.keys import WS_GENERATION_TTL_SECONDS, Keys
from services.lua import LuaScript

# After WeCom refuses the bot's credentials, the whole deployment waits this long before the next try, doubling
# with each refusal in a row up to the longest (a wrong secret costs WeCom one subscription per interval).
FIRST_BACKOFF_SECONDS = 15
LONGEST_BACKOFF_SECONDS = 300

# KEYS: lease, generation, cooldown, backoff. ARGV: holder, lease_ms, generation ttl, now (ms). Returns the new
# generation `holder` now holds the lease with, or 0 when another process holds it, the bot is cooling down after a
# foreign kick, or its credentials were refused and the bot-wide back-off has not passed yet. Every acquisition is
# for a new connection, so it always gets a new generation, even when `holder` still held the lease (its last
# connection ended and the release did not reach Redis): a connection's req_ids are told apart by it. The holder is
# read first: the stand-bys try every half second, and while another holds the lease that is all a try costs.
ACQUIRE = """
local current = redis.call('GET', KEYS[1])
if current and string.match(current, '^(.*) %d+$') ~= ARGV[1] then return 0 end
if redis.call('EXISTS', KEYS[3]) == 1 or redis.call('EXISTS', KEYS[4]) == 1 then return 0 end
local generation = redis.call('INCR', KEYS[2])
if generation < tonumber(ARGV[4]) then
  generation = tonumber(ARGV[4])
  redis.call('SET', KEYS[2], generation)
end
redis.call('EXPIRE', KEYS[2], ARGV[3])
redis.call('SET', KEYS[1], ARGV[1] .. ' ' .. generation, 'PX', ARGV[2])
return generation
"""

# KEYS: lease. ARGV: holder, generation, lease_ms. Returns 1 if the lease is still this holder's, else 0.
RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] .. ' ' .. ARGV[2] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""

# KEYS: backoff, refusals, lease. ARGV: first interval (s), longest interval (s), holder, generation. WeCom refused
# the bot's credentials: no process of the deployment tries again for an interval that doubles with each refusal
# in a row, and the lease is dropped. Returns the interval.
BACK_OFF = """
local refusals = redis.call('INCR', KEYS[2])
redis.call('EXPIRE', KEYS[2], 2 * tonumber(ARGV[2]))
local interval = math.min(tonumber(ARGV[2]), tonumber(ARGV[1]) * 2 ^ math.min(refusals - 1, 16))
redis.call('SET', KEYS[1], refusals, 'EX', interval)
if redis.call('GET', KEYS[3]) == ARGV[3] .. ' ' .. ARGV[4] then redis.call('DEL', KEYS[3]) end
return interval
"""

# KEYS: cooldown, generation, lease. ARGV: holder, generation, seconds. A kicked holder that is still the newest
# generation (no process of ours subscribed since) yields to a foreign subscriber: no process of ours connects for
# `seconds`, and its lease is dropped. Returns 1, or 0 (a newer holder of ours exists: it took the connection, and
# nothing cools down). In one script, so a successor's acquisition can never slip between the check and the cool-down.
COOL_DOWN = """
local newest = tonumber(redis.call('GET', KEYS[2]) or '0')
if newest > tonumber(ARGV[2]) then return 0 end
if tonumber(ARGV[3]) > 0 then redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[3]) end
if redis.call('GET', KEYS[3]) == ARGV[1] .. ' ' .. ARGV[2] then redis.call('DEL', KEYS[3]) end
return 1
"""

# KEYS: lease. ARGV: holder, generation. Drops the lease if it is this holder's (a drain hands over at once).
RELEASE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] .. ' ' .. ARGV[2] then return 0 end
redis.call('DEL', KEYS[1])
return 1
"""


@dataclass
class Holding:
    """What the current holder knows of itself."""

    holder: str
    generation: int


class BotLease:
    """One bot's connection lease, from one process's point of view (`holder`)."""

    def __init__(self, client: redis.Redis, keys: Keys, bot_id: str, holder: str, lease_seconds: int):
        self.client = client
        self.lease_key = keys.ws_lease(bot_id)
        self.generation_key = keys.ws_generation(bot_id)
        self.cooldown_key = keys.ws_cooldown(bot_id)
        self.backoff_key = keys.ws_backoff(bot_id)
        self.refusals_key = keys.ws_refusals(bot_id)
        self.status_key = keys.ws_status(bot_id)
        self.holder = holder
        self.lease_ms = lease_seconds * 1000
        self._acquire = LuaScript(client, ACQUIRE)
        self._renew = LuaScript(client, RENEW)
        self._release = LuaScript(client, RELEASE)
        self._back_off = LuaScript(client, BACK_OFF)
        self._cool_down = LuaScript(client, COOL_DOWN)

    def acquire(self) -> Holding | None:
        """Take the lease for a new connection, with a new generation (also when this process held it already);
        None while another process holds it.

        Raises:
            redis.RedisError: Redis did not answer.
        """
        generation = int(
            self._acquire(
                keys=[self.lease_key, self.generation_key, self.cooldown_key, self.backoff_key],
                args=[self.holder, self.lease_ms, WS_GENERATION_TTL_SECONDS, int(time.time() * 1000)],
            )
        )
        return Holding(self.holder, generation) if generation else None

    def renew(self, holding: Holding) -> bool:
        """Keep the lease; False when it is not ours any more (stop sending at once).

        Raises:
            redis.RedisError: Redis did not answer.
        """
        return bool(int(self._renew(keys=[self.lease_key], args=[holding.holder, holding.generation, self.lease_ms])))

    def release(self, holding: Holding) -> bool:
        """Hand the lease over at once (a drain); True if it was ours."""
        return bool(int(self._release(keys=[self.lease_key], args=[holding.holder, holding.generation])))

    def cool_down(self, holding: Holding, seconds: int) -> bool:
        """No process of ours connects the bot for `seconds` (a foreign subscriber has it) and the lease is dropped,
        if `holding` is still the newest generation; False (and nothing done) when a newer holder of ours exists.

        Raises:
            redis.RedisError: Redis did not answer.
        """
        keys = [self.cooldown_key, self.generation_key, self.lease_key]
        return bool(int(self._cool_down(keys=keys, args=[holding.holder, holding.generation, seconds])))

    def back_off(self, holding: Holding) -> int:
        """WeCom refused the bot's credentials: no process of ours subscribes again for the returned number of
        seconds (growing with each refusal in a row), and the lease is dropped.

        Raises:
            redis.RedisError: Redis did not answer.
        """
        return int(
            self._back_off(
                keys=[self.backoff_key, self.refusals_key, self.lease_key],
                args=[FIRST_BACKOFF_SECONDS, LONGEST_BACKOFF_SECONDS, holding.holder, holding.generation],
            )
        )

    def accepted(self) -> None:
        """WeCom accepted the credentials: the next refusal starts the back-off from its first interval."""
        self.client.delete(self.refusals_key)

    def set_status(self, status: str, seconds: int) -> None:
        """What every replica's /readyz says of the bot's connection, for `seconds`."""
        self.client.set(self.status_key, status, ex=max(1, seconds))

    def status(self) -> str:
        return self.client.get(self.status_key) or "no_holder"
