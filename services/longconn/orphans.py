"""The outbox's sender: the rest of every tracked stream that no live reply of this connection covers (its req_id
died with another connection, or its window passed) goes out once, as a markdown message (`aibot_send_msg`),
when the answer is final; a stream whose bubble had shown every word, but never its end, gets a note that nothing
more follows (its bubble can no longer be finished). A push (services/push) goes out the same way. Every send takes
a place in its chat's window of WeCom's limits first (pacing.py), and waits for one. The bookkeeping that makes it
once lives in outbox.py."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from functools import partial

from services import metrics
from services.longconn import frames
from services.longconn.outbox import HANDED, Outbox, claimant_token, rest_of, shown_of
from services.longconn.pacing import ChatWindow
from services.longconn.session import Session
from services.longconn.uploads import FileSender
from services.outage import best_effort
from services.redis_conn import REDIS_FAILURES
from services.streams.record import F
from services.streams.service import StreamService

logger = logging.getLogger(__name__)

PUSH_ATTEMPTS = 3  # WeCom refusals (other than a command conflict) after which a push is given up as failed


@dataclass
class _Handed:
    """A send handed to a connection's socket whose ack has not come yet."""

    marker: str  # the stream's outbox marker that says so
    session: Session
    push: bool
    number: int = 0  # the frame's number on its connection (0: being sent)


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
        record_wait: float = 0,
    ):
        self.bot = bot
        self.record_wait = record_wait  # how long a frame record no ack confirmed may still be undone
        self.sends = sends  # WeCom's per-chat limits, across replicas
        self.files = files  # sends an answer's files once its rest is out
        self.streams = streams
        self.outbox = outbox
        self.owner = owner
        self._handed: dict[str, _Handed] = {}  # stream id -> its send waiting for an ack
        # stream id -> the marker of a send not made (refused, or never out) that Redis could not clear then: left
        # saying `handed`, a later holder would take it for made, and nobody would send it (cleared at a later pass)
        self._unmade: dict[str, str] = {}
        self._lock = threading.Lock()

    def deliver(self, session: Session, generation: int, live: set[str]) -> None:
        """One pass: settle the sends whose acks did not come, then send, once, the rest of each final orphaned
        stream (`live`: the streams this connection answers on their own req_ids)."""
        self._settle_handed()
        try:
            orphans = self.outbox.orphans(generation, live)
        except REDIS_FAILURES:
            return
        for stream_id in orphans:
            claimant = claimant_token(self.owner)
            try:
                polled = self.streams.poll(stream_id)  # also finishes a stream whose replica is gone
                if not (polled.get("stream") or {}).get("finish"):
                    continue
                if self._record_in_doubt(self.outbox.store.reads.meta(stream_id)):
                    continue
                if not self.outbox.claim(stream_id, claimant):
                    self._take_over_handed(stream_id)
                    continue
            except REDIS_FAILURES:
                continue
            try:
                meta = self.outbox.store.reads.meta(stream_id)  # its text as that poll folded it, and its last record
            except REDIS_FAILURES:
                best_effort(partial(self.outbox.failed, stream_id), "releasing the send", delays=())
                continue
            shown, finished_there = shown_of(meta)
            if finished_there:  # its final frame went out before its connection died: nothing is left to send
                best_effort(partial(self.outbox.sent, stream_id), "recording the delivery", delays=())
                continue
            seen = self.streams.bubble.live(shown) if shown else ""  # the bubble as its last frame showed it
            rest = rest_of(polled["stream"].get("content", ""), seen)
            if meta.get(F.ws_as_is):  # a message made whole already (an answer's rest the finisher handed over)
                message = rest
            elif meta.get(F.form_task):  # the rest of a run after a form's answer: it has no bubble
                message = self.streams.bubble.separate(rest, "")
            else:
                message = self.streams.bubble.remainder(rest)  # "nothing more" when the rest is empty
            chat = meta.get(F.ws_chat, "")
            if not self._paced(stream_id, chat):
                continue
            req_id, text = frames.send_markdown(chat, bool(meta.get(F.ws_single)), message)
            self._send(session, stream_id, claimant, req_id, text, bool(meta.get(F.push)), chat)

    def _record_in_doubt(self, meta: dict[str, str]) -> bool:
        """Whether the stream's last frame record may yet be undone: no ack confirmed it, and it is younger than
        `record_wait`. A holder records a frame before it writes it to its socket; one frozen in between (seed 21's
        one-server run: 14 s, past its lease) wakes to find its connection taken and undoes the record, and a next
        holder that sent the rest from it before then left out what that frame would have shown."""
        recorded_at = meta.get(F.ws_sent_at)
        if not recorded_at or meta.get(F.ws_acked_by) == meta.get(F.ws_sent_by):
            return False
        # (a record's time is rounded to the millisecond: one made just now may read a little ahead of this clock)
        return max(0.0, time.time() - float(recorded_at)) < self.record_wait

    def _send(self, session: Session, stream_id: str, claimant: str, req_id: str, text: str, push: bool, chat: str):
        """Mark the send handed, then hand it to the socket; one that does not go out is released at once."""
        try:
            marker = self.outbox.hand(stream_id, claimant)
        except REDIS_FAILURES:  # not sent; marked, maybe (a reply lost): cleared at a later pass, then sent
            marker = ""
            with self._lock:
                self._unmade[stream_id] = HANDED + claimant
        handed = _Handed(marker, session, push)
        if marker:
            with self._lock:
                self._handed[stream_id] = handed
            handed.number = session.send(text, req_id, self._on_sent(stream_id, push))
        if not handed.number:
            with self._lock:
                self._handed.pop(stream_id, None)
            if marker:
                self._release(stream_id, marker)
            best_effort(partial(self.sends.give_back, chat, stream_id), "releasing the chat's place", delays=())

    def _release(self, stream_id: str, marker: str) -> None:
        """A handed send was not made: its marker cleared, so that it is sent again (at a later pass if Redis is
        away now)."""
        if not best_effort(partial(self.outbox.settle, stream_id, marker, False), "releasing the send", delays=()):
            with self._lock:
                self._unmade[stream_id] = marker

    def _settle_handed(self) -> None:
        """Each send whose ack has not come, and whose connection says what became of it: WeCom read it (it acked
        a frame sent after it: the ack alone was lost) and it is made; or the connection ended without that, and
        it is sent again. First, the sends not made whose markers Redis could not clear before."""
        with self._lock:
            unmade, self._unmade = self._unmade, {}
        for stream_id, marker in unmade.items():
            self._release(stream_id, marker)
        with self._lock:
            due = {
                stream_id: (handed, handed.session.received(handed.number))
                for stream_id, handed in self._handed.items()
                if handed.number and (handed.session.ended or handed.session.received(handed.number))
            }
            for stream_id in due:  # taken out first: an ack that comes now finds it settled
                del self._handed[stream_id]
        for stream_id, (handed, made) in due.items():
            try:
                settled = self.outbox.settle(stream_id, handed.marker, made)
            except REDIS_FAILURES:
                with self._lock:
                    self._handed.setdefault(stream_id, handed)  # the next pass tries again
                continue
            if settled and made:
                self._made(stream_id, handed.push, "its ack lost, a later frame's taken")
            elif settled:
                logger.info("stream %s: its connection ended before WeCom read its send; sent again", stream_id)

    def _take_over_handed(self, stream_id: str) -> None:
        """A send another process handed to its socket, and never settled since (it is gone), was made: a killed
        process's socket still sends what it was handed."""
        try:
            marker = self.outbox.handed_elsewhere(stream_id, self.owner)
            if not marker or not self.outbox.settle(stream_id, marker, True):
                return
        except REDIS_FAILURES:
            return
        self._made(stream_id, False, "handed by a process now gone")

    def _made(self, stream_id: str, push: bool, how: str) -> None:
        """A send is made (its ack said so, or what followed it): count it, and send the answer's files."""
        metrics.WS_OUTBOX.labels(self.bot, "sent").inc()
        if push:
            metrics.PUSHES.labels(self.bot, "sent").inc()
        if self.files is not None:
            self.files.after_answer(stream_id)
        logger.info("%s %s sent through aibot_send_msg (%s)", "push" if push else "rest of stream", stream_id, how)

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
            with self._lock:
                handed = self._handed.pop(stream_id, None)
            if handed is None:
                return  # settled already, by what a later frame's ack proved
            errcode = int(ack.get("errcode") or 0)
            if not errcode:
                # If Redis does not answer, the handed marker stays, and is taken for sent (`_take_over_handed`).
                best_effort(partial(self.outbox.sent, stream_id), "recording the delivery", delays=())
                self._made(stream_id, push, "acked")
                return
            metrics.WS_OUTBOX.labels(self.bot, "failed").inc()
            metrics.WS_ERRCODES.labels(self.bot, str(errcode)).inc()
            # A push is given up after PUSH_ATTEMPTS refusals; the rest of an answer is tried until it is sent.
            refused = partial(self.outbox.refused, stream_id, errcode, PUSH_ATTEMPTS if push else 0)
            if not best_effort(refused, "recording the refusal", delays=()):
                with self._lock:  # (seed 19's Sentinel run: a rest taken for made after WeCom refused it)
                    self._unmade[stream_id] = handed.marker
            if push:
                metrics.PUSHES.labels(self.bot, "failed").inc()
            what = "push" if push else "rest of stream"
            logger.info("%s %s NOT sent through aibot_send_msg (errcode %s)", what, stream_id, errcode)

        return on_sent
