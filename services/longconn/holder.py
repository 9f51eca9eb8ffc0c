"""The connection holder of one long-connection bot, a thread in every worker process of every replica: the one
that holds the bot's lease (lease.py) opens the WebSocket (session.py) and moves frames; the others stand by and
take over when it dies (its lease runs out) or drains (it releases the lease at once).

A message that arrives becomes a stream as in callback mode (the intake, the same Redis stream keys, a worker
thread calling Dify); the holder answers the message's req_id with the stream reply, then the frame pump sends the
bubble's cumulative content as it grows: one frame in flight per req_id, waiting for its ack (5 s), intermediate
states skipped while one is pending, the final frame always sent. A stream whose req_id died (the holder changed,
or its window passed) gets the rest of its answer once through `aibot_send_msg` (outbox.py).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import orjson

from services import metrics
from services.longconn import frames
from services.longconn.lease import BotLease, Holding
from services.longconn.outbox import Outbox, rest_of
from services.longconn.session import CLOSED, KICKED, Session, SessionFailed, SubscribeRefused
from services.redis_conn import REDIS_FAILURES
from services.streams.bubble import remainder_message
from services.streams.outage import best_effort
from services.wecom.callback import CallbackHandler
from services.wecom.errors import CallbackError
from services.wecom.messages import parse_inbound
from utils.logging import log_context

logger = logging.getLogger(__name__)

ACK_TIMEOUT = 5.0
FRAME_INTERVAL = 0.5
OUTBOX_INTERVAL = 2.0
STANDBY_INTERVAL = 0.5  # how often a process standing by tries the lease (one small script call)
MAX_BACKOFF = 30.0


@dataclass
class _Reply:
    """One message's stream, answered on its req_id."""

    stream_id: str
    content: str = ""
    pending_since: float = 0.0  # a frame is waiting for its ack
    final_sent: bool = False


class ConnectionHolder:
    """Holds (or stands by for) one bot's WebSocket in this process."""

    def __init__(self, bot: str, settings, lease: BotLease, callback: CallbackHandler, outbox: Outbox, owner: str):
        self.bot = bot
        self.outbox = outbox
        self.settings = settings
        self.lease = lease
        self.callback = callback
        self.owner = owner
        self.state = "standby"  # standby, connecting, holding, bad_credentials, cooling_down, stopped
        self._stop = threading.Event()
        self._session: Session | None = None
        self._holding: Holding | None = None
        self._replies: dict[str, _Reply] = {}
        self._refusal_logged = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"wecom-ws-{bot}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Drain: close the connection and hand the lease over at once."""
        self._stop.set()
        session, holding = self._session, self._holding
        if session is not None:
            session.close()
        if holding is not None:
            self._release(holding)
        self.state = "stopped"

    def report(self) -> dict:
        """The bot's connection as its holder (any process) last reported it, and this process's part."""
        try:
            shared = self.lease.status()
        except REDIS_FAILURES:
            shared = "unknown"
        return {"connection": shared, "this_process": self.state}

    def _set_state(self, state: str) -> None:
        self.state = state
        if state in ("holding", "bad_credentials", "cooling_down"):
            seconds = self.settings.wecom_ws_lease_seconds * 3
            if state == "cooling_down":
                seconds = self.settings.wecom_ws_kick_cooldown_seconds
            best_effort(lambda: self.lease.set_status(state, seconds), "recording the connection's state", delays=())

    # --- the holder's life -------------------------------------------------------------------------------------

    def _run(self) -> None:
        with log_context(replica=self.owner, bot=self.bot):
            backoff = 1.0
            while not self._stop.is_set():
                holding = self._try_acquire()
                if holding is None:
                    self.state = "standby" if self.state != "bad_credentials" else self.state
                    self._stop.wait(STANDBY_INTERVAL)  # a drained holder's lease is taken within this
                    continue
                outcome = self._hold(holding)
                if outcome == "bad_credentials":
                    self._stop.wait(backoff)
                    backoff = min(MAX_BACKOFF, backoff * 2)
                elif outcome == KICKED:
                    self._after_kick(holding)
                else:
                    backoff = 1.0

    def _try_acquire(self) -> Holding | None:
        try:
            return self.lease.acquire()
        except REDIS_FAILURES as exc:
            logger.warning("Redis unavailable for the connection lease: %s", exc)
            return None

    def _hold(self, holding: Holding) -> str:
        """Connect, subscribe and serve until the connection ends or the lease is lost."""
        self._holding = holding
        self.state = "connecting"
        session = Session(
            self.settings.wecom_ws_url, self.settings.wecom_bot_id, self.settings.wecom_bot_secret, self._on_callback
        )
        try:
            session.open()
        except SubscribeRefused as exc:
            if not self._refusal_logged:  # one ERROR until a subscription succeeds again
                self._refusal_logged = True
                logger.error(
                    "WeCom refused the bot's subscription (errcode %s): check its bot_id and secret", exc.errcode
                )
            self._set_state("bad_credentials")
            self._release(holding)
            return "bad_credentials"
        except SessionFailed as exc:
            logger.warning("could not connect to WeCom: %s", exc)
            self._release(holding)
            self._stop.wait(1.0)
            return CLOSED
        self._session = session
        self._refusal_logged = False
        self._set_state("holding")
        metrics.WS_HOLDER_CHANGES.labels(self.bot).inc()
        metrics.WS_CONNECTED.labels(self.bot).set(1)
        logger.info("holding the bot's WeCom connection (generation %d)", holding.generation)
        keeper = threading.Thread(target=self._keep, args=(session, holding), daemon=True)
        keeper.start()
        outcome = session.run()
        self._session = None
        metrics.WS_CONNECTED.labels(self.bot).set(0)
        with self._lock:
            self._replies.clear()  # req_ids die with their connection
        if outcome != KICKED:
            self._release(holding)
        logger.info("the bot's WeCom connection ended (%s)", outcome)
        return outcome

    def _keep(self, session: Session, holding: Holding) -> None:
        """While holding: renew the lease (stop at once if it is lost), ping, and send the frames."""
        lease_every = self.settings.wecom_ws_lease_seconds / 3
        next_lease = next_ping = next_outbox = time.monotonic()
        while self._session is session and not self._stop.is_set():
            now = time.monotonic()
            if now >= next_lease:
                next_lease = now + lease_every
                try:
                    if not self.lease.renew(holding):
                        logger.warning("the connection lease is another process's now; closing this connection")
                        session.close()
                        return
                    self.lease.set_status("holding", self.settings.wecom_ws_lease_seconds * 3)
                except REDIS_FAILURES as exc:
                    logger.warning("could not renew the connection lease: %s", exc)
            if now >= next_ping:
                next_ping = now + self.settings.wecom_ws_heartbeat_seconds
                session.send(frames.ping()[1])
            self._send_frames(session)
            if now >= next_outbox:
                next_outbox = now + OUTBOX_INTERVAL
                self._deliver_orphans(session, holding)
            self._stop.wait(FRAME_INTERVAL)

    def _after_kick(self, holding: Holding) -> None:
        """Another subscriber took the bot. Our own successor (a newer generation) is fine; a foreign one (an old
        deployment, a laptop) gets the bot for a cool-down, never a kick loop."""
        try:
            ours = not self.lease.is_current(holding)
        except REDIS_FAILURES:
            ours = False
        if ours:
            logger.info("our connection was replaced by a newer holder of ours")
            return
        metrics.WS_FOREIGN_KICKS.labels(self.bot).inc()
        cooldown = self.settings.wecom_ws_kick_cooldown_seconds
        logger.warning(
            "another subscriber took bot %s's WeCom connection (not one of ours): not reconnecting for %ds",
            self.bot,
            cooldown,
        )
        self._set_state("cooling_down")
        self._holding = None
        try:
            self.lease.cool_down(holding, cooldown)  # every process of ours waits, not only this one
        except REDIS_FAILURES:
            self._stop.wait(cooldown)

    def _release(self, holding: Holding) -> None:
        self._holding = None
        # If Redis does not answer, the lease runs out by itself.
        best_effort(lambda: self.lease.release(holding), "releasing the connection lease", delays=())

    # --- messages in, frames out -------------------------------------------------------------------------------

    def _on_callback(self, data: dict) -> None:
        req_id = frames.req_id_of(data)
        body = data.get("body")
        if not isinstance(body, dict) or not req_id:
            return
        try:
            message = parse_inbound(orjson.dumps(body).decode())
        except CallbackError as exc:
            logger.warning("ignored a malformed %s frame: %s", data.get("cmd"), exc.error)
            return
        with log_context(msgid=message.msgid or None, user=message.userid or None, chat=message.chatid or None):
            reply = self.callback.dispatch(message)
        if reply is None:
            return
        if message.msgtype == "event":
            self._session_send(frames.frame(frames.RESPOND_WELCOME, req_id, reply), req_id)
            return
        stream = reply.get("stream") or {}
        stream_id = stream.get("id", "")
        with self._lock:
            self._replies[req_id] = _Reply(stream_id, content=stream.get("content", ""))
        holding = self._holding
        if holding is not None and not stream.get("finish"):
            try:
                self.outbox.track(
                    stream_id, req_id, holding.generation, message.chatid or message.userid, not message.chatid
                )
            except REDIS_FAILURES as exc:
                logger.warning("could not track the stream for its delivery: %s", exc)
        self._send_reply(req_id, reply)

    def _send_frames(self, session: Session) -> None:
        """One pass of the frame pump over the open replies."""
        now = time.monotonic()
        with self._lock:
            due = [
                (req_id, reply)
                for req_id, reply in self._replies.items()
                if not reply.pending_since or now - reply.pending_since > ACK_TIMEOUT
            ]
        for req_id, reply in due:
            try:
                polled = self.callback.streams.poll(reply.stream_id)
            except REDIS_FAILURES:
                continue  # the next pass tries again
            stream = polled.get("stream") or {}
            if stream.get("content") == reply.content and not stream.get("finish"):
                continue
            reply.content = stream.get("content", "")
            self._send_reply(req_id, polled)

    def _send_reply(self, req_id: str, reply: dict) -> None:
        """Send one stream frame on `req_id`; its ack clears the way for the next (and tells the outbox)."""
        stream = reply.get("stream") or {}
        finish, content = bool(stream.get("finish")), stream.get("content", "")
        entry = self._replies.get(req_id)
        if entry is not None:
            entry.pending_since = time.monotonic()
            entry.final_sent = finish
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
                dead = errcode in (frames.DEAD_REQ_ID, frames.STREAM_EXPIRED)
                if dead or (current.final_sent and not errcode):
                    del self._replies[req_id]
            self._after_ack(current.stream_id, content, finish, errcode, dead)

        metrics.WS_FRAMES.labels(self.bot).inc()
        self._session_send(frames.frame(frames.RESPOND, req_id, reply), req_id, on_ack)

    def _after_ack(self, stream_id: str, content: str, finish: bool, errcode: int, dead: bool) -> None:
        """Keep the outbox in step: what the bubble shows, a final frame delivered, a req_id that died."""
        try:
            if dead:
                self.outbox.orphan(stream_id)
            elif not errcode and finish:
                self.outbox.delivered(stream_id)
            elif not errcode:
                self.outbox.shown(stream_id, content)
        except REDIS_FAILURES as exc:
            logger.warning("could not update the stream's delivery state: %s", exc)

    def _deliver_orphans(self, session: Session, holding: Holding) -> None:
        """Send, once, the rest of every tracked stream that no live reply of this connection covers."""
        with self._lock:
            live = {reply.stream_id for reply in self._replies.values()}
        try:
            orphans = self.outbox.orphans(holding.generation, live)
        except REDIS_FAILURES:
            return
        for stream_id, meta in orphans:
            try:
                polled = self.callback.streams.poll(stream_id)  # also finishes a stream whose replica is gone
                if not (polled.get("stream") or {}).get("finish") or not self.outbox.claim(stream_id, self.owner):
                    continue
            except REDIS_FAILURES:
                continue
            rest = rest_of(polled["stream"].get("content", ""), meta.get("ws_shown", ""))
            if not rest.strip():
                self.outbox.sent(stream_id)
                continue
            message = remainder_message(self.callback.texts, rest)
            req_id, text = frames.send_markdown(meta.get("ws_chat", ""), bool(meta.get("ws_single")), message)

            def on_sent(ack: dict, stream_id: str = stream_id) -> None:
                ok = not int(ack.get("errcode") or 0)
                metrics.WS_OUTBOX.labels(self.bot, "sent" if ok else "failed").inc()
                record = self.outbox.sent if ok else self.outbox.failed
                # If Redis does not answer, `sending` runs out and the next pass sends again.
                best_effort(lambda: record(stream_id), "recording the delivery", delays=())
                logger.info("rest of stream %s %s through aibot_send_msg", stream_id, "sent" if ok else "NOT sent")

            if not session.send(text, req_id, on_sent):
                self.outbox.failed(stream_id)

    def _session_send(self, text: str, req_id: str, on_ack=None) -> None:
        session = self._session
        if session is not None:
            session.send(text, req_id, on_ack)
