"""Operators' views of streams in Redis (the CLI and the demo console use them): list, describe, follow, purge.

Read-only except `purge`. Listing walks the keyspace with SCAN, which is fine for an operator's command but not
something to run in a request path.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import redis

from services.keys import Keys
from services.streams.record import F

_SUMMARY_FIELDS = (F.status, F.userid, F.chatid, F.msgid, F.owner, F.created_at, F.finished_at, F.error, F.polls)


@dataclass(frozen=True)
class StreamSummary:
    stream_id: str
    status: str
    userid: str
    chatid: str
    msgid: str
    owner: str
    created_at: float
    finished_at: float | None
    error: str
    polls: int


class StreamInspector:
    def __init__(self, client: redis.Redis, keys: Keys):
        self.redis = client
        self.keys = keys

    def list(self, status: str = "", userid: str = "", limit: int = 20) -> list[StreamSummary]:
        """The most recent streams (by creation time), optionally only one status or one user's."""
        ids = [
            sid
            for key in self.redis.scan_iter(match=self.keys.stream_pattern(), count=500)
            if (sid := self.keys.stream_id_from_key(key))
        ]
        pipe = self.redis.pipeline(transaction=False)
        for stream_id in ids:
            pipe.hmget(self.keys.stream(stream_id), _SUMMARY_FIELDS)
        summaries = []
        for stream_id, row in zip(ids, pipe.execute(), strict=True):
            values = dict(zip(_SUMMARY_FIELDS, row, strict=True))
            if not values["status"] or (status and values["status"] != status):
                continue
            if userid and values["userid"] != userid:
                continue
            summaries.append(
                StreamSummary(
                    stream_id=stream_id,
                    status=values["status"],
                    userid=values["userid"] or "",
                    chatid=values["chatid"] or "",
                    msgid=values["msgid"] or "",
                    owner=values["owner"] or "",
                    created_at=float(values["created_at"] or 0),
                    error=values["error"] or "",
                    finished_at=float(values["finished_at"]) if values["finished_at"] else None,
                    polls=int(values["polls"] or 0),
                )
            )
        summaries.sort(key=lambda s: s.created_at, reverse=True)
        return summaries[:limit]

    def exists(self, stream_id: str) -> bool:
        """Whether the stream's hash is there."""
        return bool(self.redis.exists(self.keys.stream(stream_id)))

    def describe(self, stream_id: str) -> dict | None:
        """Everything about one stream: its hash, deltas, the text so far, TTLs and timings; None if unknown."""
        k = self.keys
        keys = [k.stream(stream_id), k.stream_chunks(stream_id), k.stream_lease(stream_id), k.stream_images(stream_id)]
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(keys[0])
        pipe.lrange(keys[1], 0, -1)
        pipe.get(keys[2])
        pipe.llen(keys[3])
        for key in keys:
            pipe.ttl(key)
        meta, chunks, lease, images, *ttls = pipe.execute()
        if not meta:
            return None
        created = float(meta.get(F.created_at) or 0)

        def since_created(name: str) -> float | None:
            return round(float(meta[name]) - created, 3) if meta.get(name) else None

        return {
            "stream_id": stream_id,
            "meta": {name: value for name, value in meta.items() if name not in ("text", "response_url")},
            "has_response_url": bool(meta.get(F.response_url)),
            "lease_holder": lease,
            "chunks": chunks,
            "text": "".join(chunks),
            "images": images,
            "ttl": {"hash": ttls[0], "chunks": ttls[1], "lease": ttls[2], "images": ttls[3]},
            "timings": {
                "first_token_s": since_created("first_token_at"),
                "finished_s": since_created("finished_at"),
                "closed_s": since_created("closed_at"),
            },
            "keys": keys,
        }

    def follow(self, stream_id: str, interval: float = 0.5, timeout: float = 1800.0) -> Iterator[tuple[str, str]]:
        """("delta", text) for each new delta as it arrives, ("replaced", whole text) after a message_replace,
        then ("status", final status) once the stream is over (or ("gone", "") if it disappears)."""
        shown: list[str] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.redis.hget(self.keys.stream(stream_id), F.status)
            if status is None:
                yield "gone", ""
                return
            chunks = self.redis.lrange(self.keys.stream_chunks(stream_id), 0, -1)
            if chunks[: len(shown)] != shown:
                yield "replaced", "".join(chunks)
            else:
                for delta in chunks[len(shown) :]:
                    yield "delta", delta
            shown = chunks
            if status not in ("pending", "streaming"):
                yield "status", status
                return
            time.sleep(interval)

    def purge(self, stream_id: str) -> list[str]:
        """Delete a stream's keys (and its msgid mapping, if it points to this stream); returns the keys deleted."""
        k = self.keys
        msgid = self.redis.hget(k.stream(stream_id), F.msgid)
        candidates = [
            k.stream(stream_id),
            k.stream_chunks(stream_id),
            k.stream_lease(stream_id),
            k.stream_images(stream_id),
            k.feedback(stream_id),
        ]
        if msgid and self.redis.get(k.wecom_msg(msgid)) == stream_id:
            candidates.append(k.wecom_msg(msgid))
        existing = [key for key in candidates if self.redis.exists(key)]
        if existing:
            self.redis.delete(*existing)
        return existing

    def conversations_of(self, userid: str) -> list[tuple[str, str, int]]:
        """(key, conversation id, TTL) of every conversation the user has (one per bot and chat)."""
        found = []
        for key in self.redis.scan_iter(match=self.keys.conversation_pattern(userid), count=500):
            found.append((key, self.redis.get(key) or "", self.redis.ttl(key)))
        return sorted(found)
