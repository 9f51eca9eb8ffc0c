"""The outbox's sender: the rest of every tracked stream that no live reply of this connection covers (its req_id
died with another connection, or its window passed) goes out once, as a markdown message (`aibot_send_msg`),
when the answer is final; a stream whose bubble had shown every word, but never its end, gets a note that nothing
more follows (its bubble can no longer be finished). The bookkeeping that makes it once lives in outbox.py."""

from __future__ import annotations

import logging

from services import metrics
from services.longconn import frames
from services.longconn.outbox import Outbox, rest_of
from services.longconn.session import Session
from services.longconn.uploads import FileSender
from services.redis_conn import REDIS_FAILURES
from services.streams.bubble import remainder_message, separate_message
from services.streams.outage import best_effort
from services.streams.service import StreamService

logger = logging.getLogger(__name__)


class OrphanDelivery:
    """Sends the rests of a bot's orphaned streams over the connection this process holds."""

    def __init__(self, bot: str, streams: StreamService, outbox: Outbox, owner: str, files: FileSender | None = None):
        self.bot = bot
        self.files = files  # sends an answer's files once its rest is out
        self.streams = streams
        self.outbox = outbox
        self.owner = owner

    def deliver(self, session: Session, generation: int, live: set[str]) -> None:
        """One pass: send, once, the rest of each final orphaned stream (`live`: the streams this connection
        answers on their own req_ids)."""
        try:
            orphans = self.outbox.orphans(generation, live)
        except REDIS_FAILURES:
            return
        for stream_id, meta in orphans:
            try:
                polled = self.streams.poll(stream_id)  # also finishes a stream whose replica is gone
                if not (polled.get("stream") or {}).get("finish") or not self.outbox.claim(stream_id, self.owner):
                    continue
            except REDIS_FAILURES:
                continue
            rest = rest_of(polled["stream"].get("content", ""), meta.get("ws_shown", ""))
            if meta.get("ws_as_is"):  # a message made whole already (an answer's rest the finisher handed over)
                message = rest
            elif meta.get("form_task"):  # the rest of a run after a form's answer: it has no bubble
                message = separate_message(self.streams.texts, rest, "")
            else:
                message = remainder_message(self.streams.texts, rest)  # "nothing more" when the rest is empty
            req_id, text = frames.send_markdown(meta.get("ws_chat", ""), bool(meta.get("ws_single")), message)
            if not session.send(text, req_id, self._on_sent(stream_id)):
                self.outbox.failed(stream_id)

    def _on_sent(self, stream_id: str):
        def on_sent(ack: dict) -> None:
            ok = not int(ack.get("errcode") or 0)
            metrics.WS_OUTBOX.labels(self.bot, "sent" if ok else "failed").inc()
            record = self.outbox.sent if ok else self.outbox.failed
            # If Redis does not answer, `sending` runs out and the next pass sends again.
            best_effort(lambda: record(stream_id), "recording the delivery", delays=())
            if ok and self.files is not None:
                self.files.after_answer(stream_id)
            logger.info("rest of stream %s %s through aibot_send_msg", stream_id, "sent" if ok else "NOT sent")

        return on_sent
