"""WeCom's limits on the messages one chat gets (30 a minute and 1,000 an hour, replies included: WeCom refuses
what goes over), kept across every replica in Redis: a sliding window per chat, checked and counted in one script.
The outbox takes a place in the chat's window before each proactive send (`aibot_send_msg`), and waits when there
is none: nothing is dropped. The push API counts what it accepts the same way, in a window of its own, and answers
429 over it."""

from __future__ import annotations

import time
from collections.abc import Callable

import redis

from services.lua import LuaScript

MINUTE, HOUR = 60, 3600
PER_MINUTE, PER_HOUR = 30, 1000  # WeCom's, per chat

# KEYS: the chat's window. ARGV: now (seconds), per minute, per hour, member, minute, hour. Returns 0 when one more
# message fits (it is counted, as `member`), else how many seconds until it would.
_TAKE = """
local now, minute, hour = tonumber(ARGV[1]), tonumber(ARGV[5]), tonumber(ARGV[6])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - hour)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return math.max(1, math.ceil(tonumber(oldest[2]) + hour - now))
end
local recent = redis.call('ZRANGEBYSCORE', KEYS[1], now - minute, '+inf', 'WITHSCORES')
if #recent / 2 >= tonumber(ARGV[2]) then
  return math.max(1, math.ceil(tonumber(recent[2]) + minute - now))
end
redis.call('ZADD', KEYS[1], now, ARGV[4])
redis.call('EXPIRE', KEYS[1], hour)
return 0
"""


class ChatWindow:
    """The messages of each chat in the last hour, in Redis (`key_of(chat)`), against per-minute and per-hour
    limits."""

    def __init__(
        self,
        client: redis.Redis,
        key_of: Callable[[str], str],
        per_minute: int = PER_MINUTE,
        per_hour: int = PER_HOUR,
        minute: float = MINUTE,
        hour: float = HOUR,
    ):
        self.client = client
        self.key_of = key_of
        self.limits = (per_minute, per_hour, minute, hour)
        self._take = LuaScript(client, _TAKE)

    def take(self, chat: str, member: str) -> int:
        """Count one message (`member`, unique) for `chat` if it fits: 0; else the seconds to wait, nothing counted.

        Raises:
            redis.RedisError: Redis did not answer.
        """
        per_minute, per_hour, minute, hour = self.limits
        args = [f"{time.time():.3f}", per_minute, per_hour, member, minute, hour]
        return int(self._take(keys=[self.key_of(chat)], args=args))

    def give_back(self, chat: str, member: str) -> None:
        """The counted message did not go out after all."""
        self.client.zrem(self.key_of(chat), member)
