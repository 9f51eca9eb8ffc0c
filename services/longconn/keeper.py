"""The keeper of one held connection, a thread for as long as it lasts: renews the bot's lease (and closes the
connection at once when the lease is lost), pings WeCom (and drops a connection whose pings go unanswered), runs the
frame pump and, every few seconds, the outbox."""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from services import metrics
from services.longconn import frames
from services.longconn.lease import BotLease, Holding
from services.longconn.orphans import OrphanDelivery
from services.longconn.replies import ReplyPump
from services.longconn.session import Session
from services.loops import guarded
from services.redis_conn import REDIS_FAILURES

if TYPE_CHECKING:
    from config.settings import ConnectionSettings

logger = logging.getLogger(__name__)

FRAME_INTERVAL = 0.5
OUTBOX_INTERVAL = 2.0
# A new connection sends the rests of the previous connection's streams only this long after it began: WeCom
# accepted that connection's last frames until our subscription replaced it, and their acks are recorded (what the
# bubble shows, outbox.py) by the old holder a moment later. Sent at once, a rest could repeat what they showed
# (the fault campaign saw it, FAULTS.md).
OUTBOX_SETTLE_SECONDS = 3.0
MISSED_PONGS = 2  # pings in a row left unanswered after which the connection counts as dead (as WeCom's own SDK)


class ConnectionKeeper:
    """Keeps `session` (held as `holding`) alive and its frames moving until it ends or `stop` is set."""

    def __init__(
        self,
        session: Session,
        holding: Holding,
        lease: BotLease,
        replies: ReplyPump,
        orphans: OrphanDelivery,
        settings: ConnectionSettings,
        stop: threading.Event,
    ):
        self.session = session
        self.holding = holding
        self.lease = lease
        self.replies = replies
        self.orphans = orphans
        self.settings = settings
        self._stop = stop
        self._ended = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"wecom-ws-keeper-{replies.bot}", daemon=True)
        self._next_lease = self._next_ping = time.monotonic()
        self._next_outbox = self._next_lease + OUTBOX_SETTLE_SECONDS
        self._awaiting_pong = False  # a ping went out whose answer has not come
        self.held_until = 0.0  # time.monotonic() at which the lease last renewed may run out: no frame goes after
        self.missed_pongs = 0

    def start(self) -> None:
        self._thread.start()

    def end(self) -> None:
        """The connection ended: stop keeping it."""
        self._ended.set()

    def wait_for_pass(self, timeout: float) -> bool:
        """Wait (up to `timeout` s) until the pass under way has ended, once `stop` is set: its frames are then on
        the socket, or their records undone (replies.py). False if it had not ended by then."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        while not (self._ended.is_set() or self._stop.is_set()):
            guarded(self.step, "wecom_ws_keeper", self._ended)
            self._stop.wait(FRAME_INTERVAL)

    def step(self) -> None:
        """One pass: what is due of the lease, the ping, the frames and the outbox."""
        now = time.monotonic()
        if now >= self._next_lease:
            self._next_lease = now + self.settings.lease_seconds / 3
            if not self._renew():
                return
        if now >= self._next_ping:
            self._next_ping = now + self.settings.heartbeat_seconds
            if not self._ping():
                return
        self.replies.pump(self.session, self.held_until)
        if now >= self._next_outbox:
            self._next_outbox = now + OUTBOX_INTERVAL
            self.orphans.deliver(self.session, self.holding.generation, self.replies.live_streams())

    def _ping(self) -> bool:
        """Ping WeCom, and check the last ping was answered: after MISSED_PONGS pings in a row without one, the
        link is dead although no socket error says so (a NAT or proxy that dropped it), and the connection is
        dropped (False): the holder connects again through the lease."""
        if self._awaiting_pong:
            self.missed_pongs += 1
            metrics.WS_MISSED_PONGS.labels(self.replies.bot).inc()
            if self.missed_pongs >= MISSED_PONGS:
                logger.warning(
                    "WeCom answered none of the last %d pings: the connection is dead; reconnecting", MISSED_PONGS
                )
                self._ended.set()
                self.session.drop()
                return False
        self._awaiting_pong = True
        req_id, ping = frames.ping()
        self.session.send(ping, req_id, self._pong)
        return True

    def _pong(self, ack: dict) -> None:
        self._awaiting_pong = False
        self.missed_pongs = 0

    def _renew(self) -> bool:
        """Renew the lease; False (and the connection closed) when another process has it now."""
        asked = time.monotonic()
        try:
            if not self.lease.renew(self.holding):
                logger.warning("the connection lease is another process's now; closing this connection")
                self._ended.set()
                self.session.close()
                return False
            self.held_until = asked + self.settings.lease_seconds
            self.lease.set_status("holding", self.settings.lease_seconds * 3)
        except REDIS_FAILURES as exc:
            logger.warning("could not renew the connection lease: %s", exc)
        return True
