"""The request side of streaming: open a stream for a new message, and answer WeCom's polls from Redis.

Both run on whichever replica WeCom happens to call. A new message creates its stream atomically with the msgid
dedup key, so a WeCom retry on any replica gets the same stream id and the current text instead of a second Dify
call. A poll folds the unread deltas in one Redis round trip and replies with the full text so far.
"""

from __future__ import annotations

import logging
import secrets

from services.messages import MAX_CONTENT_BYTES, Inbound, stream_reply
from services.runner import StreamRunner
from services.stream_store import Snapshot, StreamStore
from services.stream_worker import StreamJob, StreamWorker
from services.texts import Texts
from utils.text import cut_utf8, utf8_len

logger = logging.getLogger(__name__)

_NOTE_SEPARATOR = "\n\n"


def new_stream_id() -> str:
    """A fresh, unguessable stream id (also the id WeCom polls with)."""
    return secrets.token_urlsafe(16)


def compose_content(text: str, note: str, placeholder: str, limit: int = MAX_CONTENT_BYTES) -> str:
    """The bubble's content: the answer so far, then the note; cut to `limit` UTF-8 bytes keeping the note."""
    if not text:
        return cut_utf8(note or placeholder, limit)
    if not note:
        return cut_utf8(text, limit)
    tail = _NOTE_SEPARATOR + note
    return cut_utf8(text.rstrip(), limit - utf8_len(tail)) + tail


class StreamService:
    """Opens streams and answers polls; the background work is the StreamWorker's."""

    def __init__(
        self,
        store: StreamStore,
        runner: StreamRunner,
        worker: StreamWorker,
        texts: Texts,
        owner: str,
        window_seconds: int,
        placeholder: str = "",
    ):
        self.store = store
        self.runner = runner
        self.worker = worker
        self.texts = texts
        self.owner = owner
        self.window_seconds = window_seconds
        self.placeholder = placeholder or texts.say("placeholder")

    def open(self, message: Inbound, query: str, files: list | None = None) -> dict:
        """Start answering `message` (or, for a retried msgid, show the stream already started for it)."""
        if not self.runner.has_capacity():
            existing = self.store.stream_for_msgid(message.msgid)
            if existing:
                return self.poll(existing)
            key = "busy" if self.runner.accepting else "shutting_down"
            logger.warning("not taking a new stream: %s", key)
            return stream_reply(new_stream_id(), self.texts.say(key), finish=True)

        fields = {
            "msgid": message.msgid,
            "userid": message.userid,
            "chatid": message.chatid,
            "chattype": message.chattype,
            "aibotid": message.aibotid,
        }
        proposed = new_stream_id()
        created, stream_id = self.store.create(proposed, message.msgid, self.owner, fields)
        # A retried create whose first reply was lost returns our own id: it is still ours to start.
        if not created and stream_id != proposed:
            logger.info("repeated msgid; answering with its stream %s", stream_id)
            return self.poll(stream_id)

        job = StreamJob(
            stream_id=stream_id,
            msgid=message.msgid,
            userid=message.userid,
            aibotid=message.aibotid,
            chatid=message.chatid,
            query=query,
            files=files or [],
        )
        self.runner.start(stream_id, lambda cancelled: self.worker.run(job, cancelled))
        logger.info("stream %s opened", stream_id)
        return stream_reply(stream_id, self.placeholder, finish=False)

    def finish_at_once(self, note: str) -> dict:
        """A finished reply to a new message that needs no stream (e.g. an empty question)."""
        return stream_reply(new_stream_id(), note, finish=True)

    def poll(self, stream_id: str) -> dict:
        """The reply to a stream-refresh callback: the full text so far, finish once the stream is over."""
        snapshot = self.store.poll(stream_id, self.window_seconds, self.texts.say("orphaned"))
        if snapshot is None:
            return stream_reply(stream_id, self.texts.say("unknown_stream"), finish=True)
        return stream_reply(stream_id, self.render(snapshot), finish=self.finished(snapshot))

    def render(self, snapshot: Snapshot) -> str:
        note = snapshot.note
        if snapshot.active and snapshot.closed:
            note = self.texts.say("window_closed")
        return compose_content(snapshot.text, note, self.placeholder)

    @staticmethod
    def finished(snapshot: Snapshot) -> bool:
        return not snapshot.active or snapshot.closed
