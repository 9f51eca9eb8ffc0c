"""The outbox's sender: the rest of every tracked stream that no live reply of this connection covers (its req_id
died with another connection, or its window passed) goes out once, as a markdown message (`aibot_send_msg`),
when the answer is final; a stream whose bubble had shown every word, but never its end, gets a note that nothing
more follows (its bubble can no longer be finished). A push (services/push) goes out the same way. Every send takes
a place in its chat's window of WeCom's limits first (pacing.py), and waits for one. The bookkeeping that makes it
once lives in outbox.py."""

from __future__ import annotations

import logging
from functools import partial

from services import metrics
from services.longconn import frames
from services.longconn.outbox import Outbox, claimant_token, rest_of, shown_of
from services.longconn.pacing import ChatWindow
from services.longconn.session import Session
from services.longconn.uploads import FileSender
from services.outage import best_effort
from services.redis_conn import REDIS_FAILURES
from services.streams.service import StreamService

logger = logging.getLogger(__name__)

PUSH_ATTEMPTS = 3  # WeCom refusals (other than a command conflict) after which a push is given up as failed


class OrphanDelivery:
    """Sends the rests of a bot's orphaned streams over the connection this process holds."""

    def __init__(
        self,
        bot: str,
        streams: StreamService,
        outbox: Outbox,
        owner: str,
        sends: ChatWindow,
        files: FileSender | None = None,
    ):
        self.bot = bot
        self.sends = sends  # WeCom's per-chat limits, across replicas
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
        for stream_id in orphans:
            try:
                polled = self.streams.poll(stream_id)  # also finishes a stream whose replica is gone
                finished = (polled.get("stream") or {}).get("finish")
                if not finished or not self.outbox.claim(stream_id, claimant_token(self.owner)):
                    continue
            except REDIS_FAILURES:
                continue
            try:
                meta = self.outbox.store.meta(stream_id)  # its text as that poll folded it, and its last record
            except REDIS_FAILURES:
                best_effort(partial(self.outbox.failed, stream_id), "releasing the send", delays=())
                continue
            shown, finished_there = shown_of(meta)
            if finished_there:  # its final frame went out before its connection died: nothing is left to send
                best_effort(partial(self.outbox.sent, stream_id), "recording the delivery", delays=())
                continue
            seen = self.streams.bubble.live(shown) if shown else ""  # the bubble as its last frame showed it
            rest = rest_of(polled["stream"].get("content", ""), seen)
            if meta.get("ws_as_is"):  # a message made whole already (an answer's rest the finisher handed over)
                message = rest
            elif meta.get("form_task"):  # the rest of a run after a form's answer: it has no bubble
                message = self.streams.bubble.separate(rest, "")
            else:
                message = self.streams.bubble.remainder(rest)  # "nothing more" when the rest is empty
            chat = meta.get("ws_chat", "")
            if not self._paced(stream_id, chat):
                continue
            req_id, text = frames.send_markdown(chat, bool(meta.get("ws_single")), message)
            if not session.send(text, req_id, self._on_sent(stream_id, bool(meta.get("push")))):
                best_effort(partial(self.outbox.failed, stream_id), "releasing the send", delays=())
                best_effort(partial(self.sends.give_back, chat, stream_id), "releasing the chat's place", delays=())

    def _paced(self, stream_id: str, chat: str) -> bool:
        """Take a place in the chat's window of WeCom's limits (across replicas); without one, the send waits for
        a later pass (its claim let go), nothing dropped."""
        try:
            wait = self.sends.take(chat, stream_id)
            if wait:
                self.outbox.failed(stream_id)
        except REDIS_FAILURES:
            return False  # the claim runs out by itself
        if wait:
            metrics.WS_PACED.labels(self.bot).inc()
            logger.info("the chat is at WeCom's limit of messages: stream %s waits about %ds", stream_id, wait)
        return not wait

    def _on_sent(self, stream_id: str, push: bool):
        def on_sent(ack: dict) -> None:
            errcode = int(ack.get("errcode") or 0)
            metrics.WS_OUTBOX.labels(self.bot, "failed" if errcode else "sent").inc()
            if errcode:
                metrics.WS_ERRCODES.labels(self.bot, str(errcode)).inc()
                # A push is given up after PUSH_ATTEMPTS refusals; the rest of an answer is tried until it is sent.
                record = partial(self.outbox.refused, stream_id, errcode, PUSH_ATTEMPTS if push else 0)
            else:
                record = partial(self.outbox.sent, stream_id)
            # If Redis does not answer, `sending` runs out and the next pass sends again.
            best_effort(record, "recording the delivery", delays=())
            if push:
                metrics.PUSHES.labels(self.bot, "failed" if errcode else "sent").inc()
            if not errcode and self.files is not None:
                self.files.after_answer(stream_id)
            what = "push" if push else "rest of stream"
            outcome = f"NOT sent (errcode {errcode})" if errcode else "sent"
            logger.info("%s %s %s through aibot_send_msg", what, stream_id, outcome)

        return on_sent
