"""Each bot's answers in flight, for the operator's page: listed in Redis as they open and taken off as they end (the
stream's life, services/streams/life.py), so a view reads one sorted set and one hash per answer, never a SCAN of
the keyspace. An answer whose end no process saw (its replica died and no poll gave it up) is dropped by the first
view that finds it final or gone, or once LIVE_ANSWER_SECONDS passed."""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis

from services.keys import LIVE_ANSWER_SECONDS, Keys
from services.outage import best_effort
from services.streams.life import StreamLife
from services.streams.record import ACTIVE_STATUSES, F

_FIELDS = (F.status, F.userid, F.chatid, F.route, F.backend, F.owner, F.created_at, F.first_token_at)


@dataclass(frozen=True)
class LiveAnswer:
    bot: str
    stream_id: str
    userid: str
    chatid: str
    route: str
    backend: str
    owner: str  # the attempt that runs it: `<replica>:<pid>#<run>`
    age_seconds: float
    phase: str  # waiting (nothing shown yet) or streaming
    text_bytes: int  # of the answer so far


class LiveAnswers:
    """One bot's list of answers in flight (`live_answers`)."""

    def __init__(self, client: redis.Redis, keys: Keys, bot: str):
        self.client = client
        self.keys = keys
        self.key = keys.live_answers()
        self.bot = bot

    def follow(self, life: StreamLife) -> LiveAnswers:
        """List `life`'s streams as they open, and take them off as they end."""
        life.opened.connect(lambda stream_id, at: self.opened(stream_id, at), weak=False)
        life.ended.connect(lambda stream_id: self.ended(stream_id), weak=False)
        return self

    def opened(self, stream_id: str, at: float) -> None:
        def write() -> None:
            pipe = self.client.pipeline(transaction=False)
            pipe.zadd(self.key, {stream_id: at})
            pipe.expire(self.key, LIVE_ANSWER_SECONDS)
            pipe.execute()

        best_effort(write, "listing an answer in flight", ())

    def ended(self, stream_id: str) -> None:
        best_effort(lambda: self.client.zrem(self.key, stream_id), "taking an answer off the live list", ())

    def now(self) -> list[LiveAnswer]:
        """The bot's answers in flight, oldest first (two round trips, and one more when some ended unseen).

        Raises:
            redis.RedisError: Redis did not answer.
        """
        now = time.time()
        self.client.zremrangebyscore(self.key, "-inf", now - LIVE_ANSWER_SECONDS)
        listed = [
            member.decode() if isinstance(member, bytes) else member for member in self.client.zrange(self.key, 0, -1)
        ]
        if not listed:
            return []
        pipe = self.client.pipeline(transaction=False)
        for stream_id in listed:
            pipe.hmget(self.keys.stream(stream_id), _FIELDS)
            pipe.hstrlen(self.keys.stream(stream_id), F.text)
        replies = pipe.execute()
        found, gone = [], []
        for stream_id, values, text_bytes in zip(listed, replies[::2], replies[1::2], strict=True):
            meta = dict(zip(_FIELDS, values, strict=True))
            if meta[F.status] not in ACTIVE_STATUSES:
                gone.append(stream_id)
                continue
            created = float(meta[F.created_at] or now)
            found.append(
                LiveAnswer(
                    bot=self.bot,
                    stream_id=stream_id,
                    userid=meta[F.userid] or "",
                    chatid=meta[F.chatid] or "",
                    route=meta[F.route] or "",
                    backend=meta[F.backend] or "",
                    owner=meta[F.owner] or "",
                    age_seconds=max(0.0, now - created),
                    phase="streaming" if text_bytes or meta[F.first_token_at] else "waiting",
                    text_bytes=int(text_bytes or 0),
                )
            )
        if gone:
            self.client.zrem(self.key, *gone)
        return found
