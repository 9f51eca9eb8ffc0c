"""The frame pump of one connection: each message answered on the WebSocket is a reply on its req_id, whose
bubble grows as its stream does. One frame in flight per req_id, waiting for its ack (5 s); intermediate states are
skipped while one is pending, the final frame is always sent. Acks keep the outbox in step (what the bubble
shows, a final frame delivered, a req_id that died)."""

from __future__ import annotations

import logging
import math
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from services import metrics
from services.longconn import frames
from services.longconn.ledger import AckLedger
from services.longconn.outbox import Outbox, sending_record, shown_of, shows_of
from services.longconn.session import Session
from services.longconn.uploads import FileSender
from services.redis_conn import REDIS_FAILURES
from services.streams.poll_path import FrameRecord
from services.streams.record import F
from services.streams.service import Frame, StreamService
from utils.text import utf8_len

logger = logging.getLogger(__name__)

ACK_TIMEOUT = 5.0


@dataclass
class _Reply:
    """One message's stream, answered on its req_id. What its frames show is counted in bytes of the stream's text
    (as the stream's record counts it, outbox.py)."""

    stream_id: str
    content: str = ""  # its last frame's content
    sent: int = 0  # what its last frame handed to the socket shows
    acked: int = 0  # what its last acknowledged frame showed
    pending_since: float = 0.0  # a frame is waiting for its ack
    final_sent: bool = False
    recorded: bool = False  # a frame of this req_id was recorded as what the stream's bubble shows
    floor: int = 0  # what another req_id of the stream showed when this one began (open)
    files: str | None = None  # the finished answer's files (JSON, "" for none), as its final frame's poll said

    @property
    def least_shown(self) -> int:
        """What the bubbles of this stream surely show: this req_id's last acknowledged frame, or what another req_id
        of the stream showed when it began, whichever is more."""
        return max(self.acked, self.floor)


@dataclass
class _Pass:
    """What one pass of the pump did with its frames: the streams whose frame went out, and what the bubbles of those
    whose frame did not go out show."""

    session: Session
    token: str
    held_until: float  # time.monotonic() at which the lease this pass sends under may have run out
    went_out: set[str] = field(default_factory=set)
    unsent: dict[str, int] = field(default_factory=dict)

    def not_sent(self, stream_id: str, shows: int) -> None:
        """A frame of the stream did not go out: its bubbles show `shows` bytes (the most any of them does)."""
        self.unsent[stream_id] = max(self.unsent.get(stream_id, 0), shows)

    def recorded(self) -> set[str]:
        """The streams whose frame this pass recorded and meant to send, whether it went out or not."""
        return self.went_out | set(self.unsent)


class ReplyPump:
    """The open replies of this process's connection (at most one connection at a time)."""

    def __init__(
        self,
        bot: str,
        streams: StreamService,
        outbox: Outbox,
        session: Callable[[], Session | None],
        files: FileSender | None = None,
        valid_seconds: float = 0,
    ):
        self.bot = bot
        self.files = files  # sends an answer's files once its bubble is finished
        self.streams = streams
        self.outbox = outbox
        self.ledger = AckLedger(outbox.client, outbox.keys, outbox.durable, outbox.open_key, valid_seconds)
        self._session = session  # the connection frames go out on now (None: none)
        self._replies: dict[str, _Reply] = {}
        self._lock = threading.Lock()

    def open(self, req_id: str, stream_id: str, reply: dict) -> None:
        """Answer a message's `req_id` with its first stream `reply`, and follow the stream from there.

        A first reply that shows answer text is WeCom's repeat of a message whose stream has begun (on a new req_id;
        the first may still be answered, or dead): it is recorded as what the bubble shows before it goes out, as
        the pump's frames are, else a holder that dies before its ack leaves the next holder to send that text
        again. What the stream's record said before (the other req_id's bubble) stays the least this reply may
        take back: a frame of it that is not shown lowers the record no further (both seen in the campaign)."""
        stream = reply.get("stream") or {}
        entry = _Reply(stream_id, content=stream.get("content", ""))
        with self._lock:
            self._replies[req_id] = entry
        token = ""  # its record's, when it shows answer text
        if entry.content and entry.content != self.streams.bubble.placeholder and self._session() is not None:
            token = secrets.token_hex(6)
            try:
                meta = self.outbox.store.reads.meta(stream_id)
                entry.floor = utf8_len(shown_of(meta)[0])
                entry.sent = shows_of(entry.content, meta.get(F.text, ""))
                self.ledger.record({stream_id: sending_record(entry.sent, bool(stream.get("finish")), token)})
            except REDIS_FAILURES as exc:
                logger.warning("could not record what a bubble shows (its frame waits for the next pass): %s", exc)
                entry.content, entry.sent = "", 0  # not sent: the pump sends it, recorded, once Redis answers
                return
            entry.recorded = True
        self.send(req_id, reply, entry.sent, token=token)

    def clear(self) -> None:
        """The connection ended: its req_ids died with it."""
        with self._lock:
            self._replies.clear()

    def live_streams(self) -> set[str]:
        with self._lock:
            return {reply.stream_id for reply in self._replies.values()}

    def pump(self, session: Session | None = None, held_until: float = math.inf) -> None:
        """One pass over the open replies: each with no frame in flight is polled, the poll recording what the frame
        it returns will show (scripts.POLL), and a frame goes out for each bubble that changed, on `session` (the
        keeper's connection; by default the current one). Where there is a replica to wait for, the pass's records
        are confirmed together once one holds them (with what the acks since the last pass said), and only then do
        the frames go out; on one server each poll confirms its own record and its frame goes out at once, the acks
        written after the pass, so no other call of the pass (a reply Redis lost blocks it for the socket timeout)
        stands between a record and its frame (seed 46's one-server run: a holder killed in such a wait left a
        record its frame never followed).
        A pass outlived by its connection (a holder frozen mid-pass, slow polls in a Redis stall), or by the lease
        it sends under (`held_until`, by time.monotonic(): frozen past it, the holder may wake before it hears that
        its socket was closed, and write the frame to it: seed 59's Cluster run), sends nothing, and a frame of it
        that does not go out has its record undone: its text was taken for shown, and the next holder's rest began
        after it (seen in the campaign)."""
        session = session or self._session()
        if session is None or session is not self._session():
            self.flush_acks()
            return  # the connection ended: its replies died with it
        now = time.monotonic()
        with self._lock:
            due = [
                (req_id, reply)
                for req_id, reply in self._replies.items()
                if not reply.pending_since or now - reply.pending_since > ACK_TIMEOUT
            ]
        one_server = not self.outbox.durable.wait_ms
        record = FrameRecord(secrets.token_hex(6), self.ledger.deadline(), confirmed=one_server)
        pass_ = _Pass(session, record.token, held_until)
        changed = []
        for req_id, reply in due:
            asked = time.time()
            try:
                frame = self.streams.frame(reply.stream_id, record)
            except REDIS_FAILURES:
                self.ledger.unsent(reply.stream_id, record.token, reply.sent)  # its record may still land
                continue  # the next pass tries again
            if frame.recorded == "late":
                self.ledger.late(time.time() - asked)
                continue  # nothing was recorded: no frame goes out
            stream = frame.reply.get("stream") or {}
            # An unchanged bubble needs no frame, and its record stands: the text it counts shows as it did.
            if stream.get("content") != reply.content or stream.get("finish") or "template_card" in frame.reply:
                if one_server:
                    self._send_frame(pass_, req_id, reply, frame)
                else:
                    changed.append((req_id, reply, frame))
        if one_server:  # what the acks said; those of frames this pass replaced are dropped (AckLedger.flush)
            self.flush_acks(pass_.recorded(), pass_.token)
        else:
            self._confirm_and_send(pass_, changed)
        # A stream's record is undone only if none of its frames went out: one that did (another bubble of the
        # stream, a repeated delivery's) shows what the record says (seen in the campaign).
        for stream_id, shows in pass_.unsent.items():
            if stream_id not in pass_.went_out:
                self.ledger.unsent(stream_id, record.token, shows)
        if pass_.unsent and session is not self._session():
            self.flush_acks()  # no keeper of that connection passes again to write it

    def _confirm_and_send(self, pass_: _Pass, changed: list[tuple[str, _Reply, Frame]]) -> None:
        """Write what the acks said with the pass's confirmations, and wait once for a replica to hold them and the
        records before them (per Redis node); then send the pass's frames. None goes out when that write fails."""
        try:  # a replica holds the records before their frames go out (services/replication.py)
            self.ledger.flush({reply.stream_id for _, reply, _ in changed}, pass_.token)
        except REDIS_FAILURES as exc:
            logger.warning("could not record what the bubbles show (their frames wait for the next pass): %s", exc)
            for _, reply, _ in changed:
                pass_.not_sent(reply.stream_id, reply.sent)
            return
        for req_id, reply, frame in changed:
            self._send_frame(pass_, req_id, reply, frame)

    def _send_frame(self, pass_: _Pass, req_id: str, reply: _Reply, frame: Frame) -> None:
        """Send a frame of the pass, recorded under its token; note what became of it."""
        if pass_.session is not self._session() or time.monotonic() >= pass_.held_until:  # ended, or may have
            pass_.not_sent(reply.stream_id, reply.sent)
            return
        reply.content, reply.recorded, reply.files = frame.reply["stream"].get("content", ""), True, frame.files
        if self.send(req_id, frame.reply, frame.shows, pass_.session, pass_.token):
            pass_.went_out.add(reply.stream_id)
        else:
            pass_.not_sent(reply.stream_id, reply.least_shown)

    def send(self, req_id: str, reply: dict, shows: int, session: Session | None = None, token: str = "") -> bool:
        """Send one stream frame on `req_id` (on `session`, by default the current connection), showing `shows` bytes
        of the stream's text, as recorded under `token` ("": not recorded); its ack clears the way for the next (and
        tells the outbox). False if it did not go out."""
        stream = reply.get("stream") or {}
        finish = bool(stream.get("finish"))
        entry = self._replies.get(req_id)
        if entry is not None:
            entry.pending_since = time.monotonic()
            entry.final_sent = finish
            entry.sent = shows
        sent_at = time.monotonic()

        def on_ack(ack: dict) -> None:
            metrics.WS_ACK_SECONDS.labels(self.bot).observe(time.monotonic() - sent_at)
            errcode = int(ack.get("errcode") or 0)
            if errcode:
                metrics.WS_ERRCODES.labels(self.bot, str(errcode)).inc()
                logger.warning("WeCom refused a stream frame: errcode %s (%s)", errcode, ack.get("errmsg", ""))
            with self._lock:
                current = self._replies.get(req_id)
                if current is None:
                    return
                current.pending_since = 0.0
                if not errcode:
                    current.acked = shows
                else:  # the bubble shows the last frame taken, and the next pass sends it what it lacks
                    current.content, current.sent = "", current.least_shown
                dead = errcode in (frames.DEAD_REQ_ID, frames.STREAM_EXPIRED)
                if dead or (current.final_sent and not errcode):
                    del self._replies[req_id]
            self._after_ack(current, finish, errcode, dead, token)

        metrics.WS_FRAMES.labels(self.bot).inc()
        session = session or self._session()
        if session is None or not session.send(frames.frame(frames.RESPOND, req_id, reply), req_id, on_ack):
            self._not_sent(req_id, connected=session is not None)
            return False
        return True

    def _not_sent(self, req_id: str, connected: bool) -> None:
        """The frame never went out (the connection had ended): the bubble shows what its last acknowledged frame
        did, not what `pump` recorded before sending, and the req_id died with the connection, so the next holder
        sends the rest from there (before, a final frame recorded this way said nothing was left to send). With no
        connection at all (a message read just before the end, answered after it), that is written at once: no
        keeper of this process may pass again to write it."""
        with self._lock:
            reply = self._replies.pop(req_id, None)
        if reply is not None:
            logger.info("a frame of stream %s did not go out: the connection had ended", reply.stream_id)
            self._refused(reply, dead=True)
            if not connected:
                self.flush_acks()

    def _refused(self, reply: _Reply, dead: bool, token: str = "") -> None:
        """A frame of `reply` was not shown: its bubble shows what its last acknowledged frame did, and the stream's
        record says so, but never less than another req_id of the stream showed (`floor`), or shows now: a frame
        of the stream's other bubble, recorded, stands until its own ack says otherwise. A req_id that never had a
        frame recorded (its first, placeholder, frame) leaves the record alone and is only marked dead."""
        if reply.recorded:
            with self._lock:
                others = [o for o in self._replies.values() if o.stream_id == reply.stream_id and o is not reply]
            shown = max([reply.least_shown, *(other.sent for other in others if other.recorded)])
            self.ledger.refused(reply.stream_id, shown, dead, token)
        elif dead:
            self.ledger.dead(reply.stream_id)

    def _after_ack(self, reply: _Reply, finish: bool, errcode: int, dead: bool, token: str) -> None:
        """Note what the ack says for the ledger's next write (the keeper's pass), and send a finished answer's
        files. A frame shown was recorded before it went out: its ack only says that record is sure (`token`), so
        that a next holder need not wait for this one to undo it (orphans.py)."""
        stream_id = reply.stream_id
        if errcode:  # WeCom did not show it
            self._refused(reply, dead, token)
            return
        if token:
            self.ledger.shown(stream_id, token)
        if finish:
            self.ledger.delivered(stream_id)
            if self.files is not None:
                self.files.after_answer(stream_id, reply.files)

    def flush_acks(self, recorded: set[str] = frozenset(), token: str = "") -> None:
        """Write what the acks since the last call said (one wait for a replica per Redis node), but what they said
        of the frames `recorded` replaced under `token` (AckLedger.flush)."""
        try:
            self.ledger.flush(recorded, token, frames_out=bool(recorded))
        except REDIS_FAILURES as exc:
            logger.warning("could not record what the bubbles show (kept for the next pass): %s", exc)
