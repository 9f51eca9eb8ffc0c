"""Answers whose stream can no longer be updated over the WebSocket: its req_id died with the connection that
received it (846605: the holder changed) or its window passed (846608). Such a stream's rest reaches the user once,
as a proactive markdown message (`aibot_send_msg`) when the answer is final.

Every stream answered over the WebSocket is tracked in the bot's open set, with the generation of the connection
that answers it and the content its last acknowledged frame showed (in the stream hash). A holder delivers, once
the answer is final, the rest of every tracked stream that is not one of its own live replies. A marker per stream
(`sending` for 30 s, then `sent` for a day) makes the delivery happen once across processes; a send that fails
clears it, so the next pass tries again (a holder that dies between sending and marking may, 30 s later, leave
the message to be sent a second time: the one window where at-least-once wins over at-most-once).

Every record here must outlive a Redis failover (a lost one sends a rest again, or never), so each waits for a
replica to hold it (services/replication.py).
"""

from __future__ import annotations

import time

import redis

from services.keys import Keys
from services.replication import OUTBOX, raise_first_error
from services.streams.store import StreamStore
from services.wecom.limits import NOTE_SEPARATOR

SENDING_SECONDS = 30
SENT_SECONDS = 24 * 3600
MAX_TRACKED_SECONDS = 2 * 3600  # a stream is given up after this (its keys expire too)
PAGE = 100  # tracked streams read per round trip


class Outbox:
    def __init__(self, client: redis.Redis, keys: Keys, store: StreamStore, bot_id: str):
        self.client = client
        self.keys = keys
        self.store = store
        self.durable = store.durable
        self.open_key = keys.ws_open(bot_id)

    def track(self, stream_id: str, req_id: str, generation: int, chatid: str, single: bool) -> None:
        """A stream is answered on `req_id` of the connection of `generation`."""
        fields = {"ws_req_id": req_id, "ws_generation": str(generation), "ws_chat": chatid}
        fields["ws_single"] = "1" if single else ""
        self.store.record(stream_id, fields, durable=True)
        self._add(stream_id)

    def track_separate(self, stream_id: str, chatid: str, single: bool, as_is: bool = False) -> None:
        """A stream with no bubble (the rest of a run after a form's answer; with `as_is`, a message made whole
        already, such as an answer's rest): sent whole, once, when final."""
        fields = {"ws_dead": "1", "ws_generation": "0", "ws_chat": chatid, "ws_single": "1" if single else ""}
        if as_is:
            fields["ws_as_is"] = "1"
        self.store.record(stream_id, fields, durable=True)
        self._add(stream_id)

    def _add(self, stream_id: str) -> None:
        commands = [("ZADD", self.open_key, time.time(), stream_id), ("EXPIRE", self.open_key, MAX_TRACKED_SECONDS)]
        self._write(self.open_key, commands)

    def shown(self, stream_id: str, content: str) -> None:
        """The user's bubble shows `content` (its frame was acknowledged)."""
        self.store.record(stream_id, {"ws_shown": content}, durable=True)

    def delivered(self, stream_id: str) -> None:
        """The bubble got its final frame: nothing left to send."""
        self._write(self.open_key, [("ZREM", self.open_key, stream_id)])

    def orphan(self, stream_id: str) -> None:
        """The stream's req_id can no longer be used (846605, 846608)."""
        self.store.record(stream_id, {"ws_dead": "1"}, durable=True)

    def orphans(self, generation: int, live: set[str], page: int = PAGE) -> list[tuple[str, dict]]:
        """Every tracked stream that no live reply of this connection covers: (stream id, its hash). Read a page
        at a time (one round trip for a page's hashes), however many streams are open."""
        self.client.zremrangebyscore(self.open_key, "-inf", time.time() - MAX_TRACKED_SECONDS)
        found, gone = [], []
        start = 0
        while True:
            ids = self.client.zrange(self.open_key, start, start + page - 1)
            waiting = [i for i in ids if i not in live]
            for stream_id, meta in zip(waiting, self.store.metas(waiting), strict=True):
                if not meta:
                    gone.append(stream_id)
                elif meta.get("ws_generation") != str(generation) or meta.get("ws_dead"):
                    found.append((stream_id, meta))
                # else: being answered on this connection (its reply is registered a moment later)
            if len(ids) < page:
                break
            start += page
        if gone:
            self.client.zrem(self.open_key, *gone)
        return found

    def claim(self, stream_id: str, holder: str) -> bool:
        """Take the sending of a stream's rest (False: sent, or being sent, elsewhere)."""
        key = self.keys.ws_outbox(stream_id)
        [claimed] = self._write(key, [("SET", key, f"sending {holder}", "NX", "EX", SENDING_SECONDS)])
        return bool(claimed)

    def sent(self, stream_id: str) -> None:
        key = self.keys.ws_outbox(stream_id)
        self._write(key, [("SET", key, "sent", "EX", SENT_SECONDS)])
        self.delivered(stream_id)

    def failed(self, stream_id: str) -> None:
        self.client.delete(self.keys.ws_outbox(stream_id))

    def _write(self, key: str, commands: list[tuple]) -> list:
        replies = self.durable.execute(key, commands, OUTBOX)
        raise_first_error(replies)
        return replies


def rest_of(final: str, shown: str) -> str:
    """What the user has not seen of the final bubble `final`, given the bubble showed `shown`. A live bubble shows
    its text and, joined on with NOTE_SEPARATOR, a note (a form's prompt, say) that the final bubble no longer has:
    compared by text, `shown` loses its last part until `final` begins with what is left (an answer that ends in
    paragraphs may then repeat one, never lose one); `final` whole when nothing of it was shown."""
    seen = shown
    while seen:
        if final.startswith(seen):
            return final[len(seen) :]
        seen = seen[: max(0, seen.rfind(NOTE_SEPARATOR))]
    return final
