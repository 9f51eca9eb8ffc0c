"""The reads of a stream's state that need no script (what it holds, who owns it, which streams a user or a msgid
has), and the leases of the attempts that answer streams: kept apart from the store's scripted writes
(services/streams/store.py), which hands both out as `store.reads` and `store.leases`."""

from __future__ import annotations

import time

import redis

from services.keys import Keys
from services.lua import LuaScript
from services.replication import raise_first_error
from services.streams import scripts
from services.streams.record import EXPIRED, F


def script_now() -> str:
    """Epoch seconds as the scripts take them."""
    return f"{time.time():.3f}"


def lease_keys(keys: Keys, stream_id: str) -> list[str]:
    """The keys a lease's scripts run on: the stream's hash and its lease."""
    return [keys.stream(stream_id), keys.stream_lease(stream_id)]


class StreamReads:
    """What a stream holds now, read straight from Redis (an empty answer for a stream that is gone)."""

    def __init__(self, client: redis.Redis, keys: Keys):
        self.client = client
        self.keys = keys

    def superseded(self, stream_id: str, attempt: str) -> bool:
        """Whether another attempt has taken the stream over from `attempt` (a read, for a write outside the
        stream's slot, such as the user's conversation, which no script can fence together with the stream)."""
        owner = self.client.hget(self.keys.stream(stream_id), F.owner)
        return owner is not None and owner != attempt

    def polls(self, stream_id: str) -> int:
        """How many polls the stream's bubble had (0: WeCom may never have got the reply that opened it)."""
        return int(self.client.hget(self.keys.stream(stream_id), F.polls) or 0)

    def shown_when_given_up(self, stream_id: str) -> str | None:
        """The text a stream's bubble ended with when a poll gave it up as orphaned (its lease was gone); None if
        the stream is gone, or ended some other way."""
        status, error, text = self.client.hmget(self.keys.stream(stream_id), F.status, F.error, F.text)
        return text if status == EXPIRED and error == "owner_lost" else None

    def open_streams(self, aibotid: str, userid: str) -> list[str]:
        """The user's streams whose bubble is still open, oldest first."""
        key = self.keys.inflight(aibotid, userid)
        return self.client.zrangebyscore(key, script_now(), "+inf")

    def stream_for_msgid(self, msgid: str) -> str | None:
        """The stream id recorded for a WeCom msgid, if any."""
        return self.client.get(self.keys.wecom_msg(msgid))

    def metas(self, stream_ids: list[str]) -> list[dict[str, str]]:
        """The hashes of several streams, in one pipeline (an empty dict for a stream that is gone)."""
        if not stream_ids:
            return []
        pipe = self.client.pipeline(transaction=False)
        for stream_id in stream_ids:
            pipe.hgetall(self.keys.stream(stream_id))
        return pipe.execute()

    def meta(self, stream_id: str) -> dict[str, str]:
        """The whole stream hash (empty if unknown)."""
        return self.client.hgetall(self.keys.stream(stream_id))

    def chunks(self, stream_id: str) -> list[str]:
        """Every delta of the stream, in order."""
        return self.client.lrange(self.keys.stream_chunks(stream_id), 0, -1)


class StreamLeases:
    """The leases of the attempts this process runs: renewed together, given up on a graceful shutdown."""

    def __init__(self, client: redis.Redis, keys: Keys, lease_ms: int):
        self.keys = keys
        self.lease_ms = lease_ms
        self._renew = LuaScript(client, scripts.RENEW)
        self._release = LuaScript(client, scripts.RELEASE)

    def renew(self, attempts: dict[str, str]) -> list[str]:
        """Extend the leases of these attempts ({stream id: attempt}, one round trip); returns the ids another
        attempt has taken over.

        Raises:
            redis.RedisError: Redis did not answer (for any of them).
        """
        calls = [
            (lease_keys(self.keys, stream_id), [attempt, self.lease_ms]) for stream_id, attempt in attempts.items()
        ]
        results = self._renew.run_each(calls)
        raise_first_error(results)
        return [stream_id for stream_id, lost in zip(attempts, results, strict=True) if int(lost)]

    def release(self, attempts: dict[str, str]) -> int:
        """Give up these attempts' leases ({stream id: attempt}; graceful shutdown): the next poll elsewhere takes
        each stream over."""
        calls = [(lease_keys(self.keys, stream_id), [attempt, script_now()]) for stream_id, attempt in attempts.items()]
        results = self._release.run_each(calls)
        raise_first_error(results)
        return sum(int(released) for released in results)
