"""The connection holder of one long-connection bot, a thread in every serving process of every replica: the one
that holds the bot's lease (lease.py) opens the WebSocket (session.py) and moves frames; the others stand by and
take over when it dies (its lease runs out) or drains (it releases the lease at once).

The holder's own job is the connection's life: take the lease, connect and subscribe, and decide what follows the
connection's end (take it again, back off bot-wide when WeCom refuses the credentials, yield to a successor, cool
down after a foreign kick). What happens while it is held belongs to the pieces it wires together: inbound.py
(messages in), replies.py (stream frames out), orphans.py (the outbox's sends) and keeper.py (the lease renewals
and pings that keep it).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from services import metrics
from services.chat.dispatch import Dispatch
from services.longconn.inbound import InboundHandler
from services.longconn.keeper import ConnectionKeeper
from services.longconn.lease import BotLease, Holding
from services.longconn.orphans import OrphanDelivery
from services.longconn.outbox import Outbox
from services.longconn.pacing import ChatWindow
from services.longconn.replies import ReplyPump
from services.longconn.session import CLOSED, KICKED, Session, SessionFailed, SubscribeRefused
from services.longconn.spool import Spool, SpoolDrain
from services.longconn.uploads import FileSender
from services.loops import run_until
from services.outage import best_effort, best_effort_value
from services.redis_conn import REDIS_FAILURES
from utils.logging import log_context

if TYPE_CHECKING:
    from config.settings import ConnectionSettings

logger = logging.getLogger(__name__)

# Retries of the kicked holder's look at who took the connection, through a Redis blip (a failover).
KICK_CHECK = (0.2, 0.5, 1.0, 2.0)

STANDBY_INTERVAL = 0.5  # how often a process standing by tries the lease (one small script call)
RECONNECT_PAUSE = 1.0  # after a connection that could not be opened
ACK_SETTLE_SECONDS = 2.0  # a drained holder waits this long at most for the acks of its last frames (about 0.3 s)
PASS_SETTLE_SECONDS = 3.0  # and first this long at most for its keeper's pass under way (a Redis round trip or two)


class ConnectionHolder:
    """Holds (or stands by for) one bot's WebSocket in this process."""

    def __init__(
        self,
        settings: ConnectionSettings,
        redis_timeout: float,
        lease: BotLease,
        dispatch: Dispatch,
        outbox: Outbox,
        sends: ChatWindow,
        files: Callable[[Callable[[], Session | None]], FileSender] | None = None,
        spool: Spool | None = None,
    ):
        streams = dispatch.streams
        bot = self.bot = streams.bot  # the bot's name
        self.settings = settings
        self.lease = lease
        owner = self.owner = lease.holder
        self.state = "standby"  # standby, connecting, holding, bad_credentials, cooling_down, stopped
        self._stop = threading.Event()
        self._session: Session | None = None
        self._keeper: ConnectionKeeper | None = None
        self._holding: Holding | None = None
        uploads = files(lambda: self._session) if files is not None else None  # the answers' files, sent after them
        self.replies = ReplyPump(bot, streams, outbox, lambda: self._session, uploads, redis_timeout)
        # a frame record no ack confirmed is left this long to a holder that may be frozen, to undo (orphans.py)
        self.orphans = OrphanDelivery(bot, streams, outbox, owner, sends, uploads, 2 * settings.lease_seconds)
        self.inbound = InboundHandler(dispatch, self.replies, lambda: (self._session, self._holding), spool, outbox)
        # the messages a process gone kept while Redis was away: any process takes them (services/longconn/spool.py)
        self.spool_drain = SpoolDrain(spool, self.inbound.take_kept) if spool is not None else None
        self._thread = threading.Thread(target=self._run, name=f"wecom-ws-{bot}", daemon=True)

    def start(self) -> None:
        self._thread.start()
        if self.spool_drain is not None:
            self.spool_drain.start()

    def stop(self) -> None:
        """Drain: let the keeper's pass under way end and the frames sent have their acks (what each bubble shows
        is then known to the next holder), close the connection and hand the lease over. A pass left running would
        find the connection closed, and its undo of the records of the frames it could not send come after this
        process's last flush, or never, when the process exits first: those records would stand, and the next
        holder's rest start after text no frame showed (a campaign's drained holder, one message: FAULTS.md)."""
        self._stop.set()
        if self.spool_drain is not None:
            self.spool_drain.stop()
        session, holding, keeper = self._session, self._holding, self._keeper
        if keeper is not None and not keeper.wait_for_pass(PASS_SETTLE_SECONDS):
            logger.warning("handing the connection over during a frame pass that has not ended")
        if session is not None:
            if not session.settle(ACK_SETTLE_SECONDS):
                logger.warning("handing the connection over with frames whose acks did not come")
            self.replies.flush_acks()
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

    def _set_state(self, state: str, seconds: int | None = None) -> None:
        """This process's state, and (for holding, bad_credentials, cooling_down) every replica's /readyz's."""
        self.state = state
        if seconds is not None:
            best_effort(lambda: self.lease.set_status(state, seconds), "recording the connection's state", delays=())

    # --- the holder's life -------------------------------------------------------------------------------------

    def _run(self) -> None:
        with log_context(replica=self.owner, bot=self.bot):
            run_until(self._stop, self._step, "wecom_ws_holder")

    def _step(self) -> None:
        """Take the lease and hold the connection until it ends; stand by a moment if another process has it."""
        holding = self._try_acquire()
        if holding is None:
            if self.state != "bad_credentials":
                self.state = "standby"
            self.replies.flush_acks()  # what acks and unsent frames said after this process's connection ended
            self._stop.wait(STANDBY_INTERVAL)  # a drained holder's lease is taken within this
            return
        outcome = self._hold(holding)
        if outcome == KICKED:
            self._after_kick(holding)

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
        session = Session(self.settings.ws_url, self.settings.bot_id, self.settings.bot_secret, self.inbound)
        try:
            session.open()
        except SubscribeRefused as exc:
            self._back_off(holding, exc)
            return "bad_credentials"
        except SessionFailed as exc:
            logger.warning("could not connect to WeCom: %s", exc)
            self._release(holding)
            self._stop.wait(RECONNECT_PAUSE)
            return CLOSED
        self._session = session
        best_effort(self.lease.accepted, "resetting the credentials' back-off", delays=())
        self._set_state("holding", self.settings.lease_seconds * 3)
        metrics.WS_HOLDER_CHANGES.labels(self.bot).inc()
        metrics.WS_CONNECTED.labels(self.bot).set(1)
        metrics.WS_HOLDING_SINCE.labels(self.bot).set(time.time())
        logger.info("holding the bot's WeCom connection (generation %d)", holding.generation)
        keeper = ConnectionKeeper(session, holding, self.lease, self.replies, self.orphans, self.settings, self._stop)
        keeper.start()
        self._keeper = keeper  # (started first: a drain joins its thread)
        try:
            outcome = session.run()
        finally:
            keeper.end()
            self._session, self._keeper = None, None
            metrics.WS_CONNECTED.labels(self.bot).set(0)
            metrics.WS_HOLDING_SINCE.labels(self.bot).set(0)
            self.replies.flush_acks()  # what the last acks said
            self.replies.clear()  # req_ids die with their connection
        if outcome != KICKED:
            self._release(holding)
        logger.info("the bot's WeCom connection ended (%s)", outcome)
        return outcome

    def _back_off(self, holding: Holding, refused: SubscribeRefused) -> None:
        """WeCom refused the bot's credentials: no process of the deployment tries again for a while (the interval
        grows with each refusal in a row), so a wrong secret costs WeCom one subscription per interval, not one per
        process. One ERROR line per refusal, which is one per interval."""
        metrics.WS_SUBSCRIBE_REFUSALS.labels(self.bot).inc()
        self._holding = None
        try:
            seconds = self.lease.back_off(holding)
        except REDIS_FAILURES:
            seconds = 0
        logger.error(
            "WeCom refused the bot's subscription (errcode %s): check its bot_id and secret; "
            "no process of this deployment tries again for %ds",
            refused.errcode,
            seconds,
        )
        self._set_state("bad_credentials", seconds + self.settings.lease_seconds)
        if not seconds:  # Redis did not answer: at least this process waits
            self._release(holding)
            self._stop.wait(RECONNECT_PAUSE * 15)

    def _after_kick(self, holding: Holding) -> None:
        """Another subscriber took the bot. Our own successor (a newer generation) is fine; a foreign one (an old
        deployment, a laptop) gets the bot for a cool-down, never a kick loop. The cool-down is bot-wide only when
        Redis confirms, in one script, that no holder of ours came since; when Redis cannot tell (a failover
        usually changes holders too), this process stands by as after any lost connection, and a foreign
        subscriber that is really there kicks it again, and is then recognised."""
        self._holding = None
        cooldown = self.settings.kick_cooldown_seconds
        cooled = best_effort_value(
            lambda: self.lease.cool_down(holding, cooldown), "checking who took the connection", delays=KICK_CHECK
        )
        if cooled is None:
            logger.warning("could not tell who took the connection (Redis unavailable); no cool-down")
        elif not cooled:
            logger.info("our connection was replaced by a newer holder of ours")
        else:
            metrics.WS_FOREIGN_KICKS.labels(self.bot).inc()
            logger.warning(
                "another subscriber took bot %s's WeCom connection (not one of ours): not reconnecting for %ds",
                self.bot,
                cooldown,
            )
            self._set_state("cooling_down", cooldown)

    def _release(self, holding: Holding) -> None:
        self._holding = None
        # If Redis does not answer, the lease runs out by itself.
        best_effort(lambda: self.lease.release(holding), "releasing the connection lease", delays=())
