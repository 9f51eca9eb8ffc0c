"""A long connection's messages kept in the database's `wecom_ws_spool` while Redis is away (WeCom delivers such a
message once and takes no acknowledgement), or once its intake has run KEEP_AFTER_SECONDS under a slow Redis; a row
whose reader died is answered by any serving process once Redis is back, through the outbox (`SpoolDrain`). No
database, no spool. docs/architecture.md, "Many replicas" ("Redis stalls or restarts").
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy import Engine, delete, insert, select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from services import metrics
from services.chat.spool_rows import SpoolRows, spool_table, utc_now
from services.loops import run_until
from services.redis_conn import REDIS_FAILURES

logger = logging.getLogger(__name__)

# A row is taken by a drain this long after it was written: its reader takes the message again for 30 s
# (INTAKE_PATIENCE_SECONDS), then answers it or says Redis is away, and drops the row either way.
STALE_SECONDS = 45.0
# A drain's claim on a row: a drain that died holding it is taken over this much later.
CLAIM_SECONDS = 60.0
# A row nobody could take in this long (Redis away all that time) is given up: its user has long asked again.
KEEP_SECONDS = 600.0
SWEEP_SECONDS = 5.0
PAGE = 20
# A message whose intake has not ended this long after it was read is kept, as one that met Redis away is (an
# intake takes a few milliseconds when Redis answers at once: nearly every message is never written).
KEEP_AFTER_SECONDS = 0.25

wecom_ws_spool = spool_table("wecom_ws_spool")


class Spool(SpoolRows):
    """One bot's rows of `wecom_ws_spool`, for the process `owner`."""

    def __init__(self, engine: Engine, bot: str, owner: str):
        super().__init__(engine, wecom_ws_spool, bot, owner, CLAIM_SECONDS)

    def keep(self, msgid: str, body: str) -> bool:
        """Write a message read while Redis is away; True if the database has it (a row for its msgid is kept as
        it is). False, logged, when the database does not answer either."""
        try:
            self._ensure_table()
            with self.engine.begin() as connection:
                connection.execute(
                    insert(wecom_ws_spool).values(bot=self.bot, msgid=msgid, body=body, received_at=utc_now())
                )
        except IntegrityError:
            return True
        except SQLAlchemyError as exc:
            logger.warning("could not keep the message in the database either (%s)", type(exc).__name__)
            metrics.WS_SPOOL.labels(self.bot, "not_kept").inc()
            return False
        metrics.WS_SPOOL.labels(self.bot, "kept").inc()
        return True

    def drop(self, msgid: str) -> None:
        """The message was answered (or told that Redis is away): its row goes. A row the database keeps meanwhile
        is taken by a drain later, which finds its msgid taken and leaves it to that answer."""
        try:
            with self.engine.begin() as connection:
                connection.execute(
                    delete(wecom_ws_spool).where(wecom_ws_spool.c.bot == self.bot, wecom_ws_spool.c.msgid == msgid)
                )
        except SQLAlchemyError as exc:
            logger.warning("could not drop a kept message's row (%s); a drain will", type(exc).__name__)

    def stale(self) -> list[tuple[str, str, datetime]]:
        """A page of rows whose reader is done with them or gone, and that no living drain holds: (msgid, body,
        received_at), oldest first."""
        now = utc_now()
        c = wecom_ws_spool.c
        query = (
            select(c.msgid, c.body, c.received_at)
            .where(c.bot == self.bot, c.received_at <= now - timedelta(seconds=STALE_SECONDS), self._unclaimed(now))
            .order_by(c.received_at)
            .limit(PAGE)
        )
        self._ensure_table()
        with self.engine.connect() as connection:
            return [tuple(row) for row in connection.execute(query)]

    def claim(self, msgid: str, received_at: datetime) -> bool:
        """Take a stale row for this process; False if another drain took it first."""
        c = wecom_ws_spool.c
        return self._claim(c.msgid == msgid, c.received_at == received_at)

    def release(self, msgid: str) -> None:
        """Redis is still away: the row waits for the next sweep, of any process."""
        self._release("msgid", msgid)


class KeptWhileTaken:
    """One message's row in the spool for as long as its intake runs: written once the intake has run for
    KEEP_AFTER_SECONDS or met Redis away (`keep`, whichever comes first; tried again on the other if the database
    did not take it), dropped when the intake ends (`done`)."""

    def __init__(self, spool: Spool, msgid: str, body: str, after: float = KEEP_AFTER_SECONDS):
        self.spool = spool
        self.msgid = msgid
        self.body = body
        self._lock = threading.Lock()
        self._kept = self._done = False
        self._timer = threading.Timer(after, self.keep)
        self._timer.daemon = True
        self._timer.start()

    def keep(self) -> None:
        with self._lock:
            if not self._kept and not self._done:
                self._kept = self.spool.keep(self.msgid, self.body)

    def done(self) -> None:
        self._timer.cancel()
        with self._lock:
            self._done = True
            if self._kept:
                self.spool.drop(self.msgid)


class SpoolDrain:
    """Every SWEEP_SECONDS, in every serving process: the stale rows of one bot's spool, each taken by one process,
    answered through `take` (a callable that takes the message as new and sees it answered on its own, raising a
    Redis failure while Redis is away)."""

    def __init__(self, spool: Spool, take: Callable[[str], str]):
        self.spool = spool
        self._take = take
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"ws-spool-{self.spool.bot}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        def step() -> None:
            self.sweep()
            self._stop.wait(SWEEP_SECONDS)

        run_until(self._stop, step, "ws_spool_drain")

    def sweep(self) -> int:
        """One pass; returns how many rows it answered or gave up. The database failing midway ends the pass (a
        row claimed stays so until its claim lapses; one answered and not dropped finds its msgid taken)."""
        try:
            return self._sweep()
        except SQLAlchemyError as exc:
            logger.info("the spool's database did not answer (%s); the next pass tries again", type(exc).__name__)
            return 0

    def _sweep(self) -> int:
        done = 0
        for msgid, body, received_at in self.spool.stale():
            if self._stop.is_set() or not self.spool.claim(msgid, received_at):
                continue
            if utc_now() - received_at > timedelta(seconds=KEEP_SECONDS):
                logger.warning("gave up a kept message: Redis stayed away for %d s", KEEP_SECONDS)
                metrics.WS_SPOOL.labels(self.spool.bot, "given_up").inc()
            else:
                try:
                    outcome = self._take(body)
                except REDIS_FAILURES as exc:
                    logger.info("Redis is still away (%s); the kept message waits", type(exc).__name__)
                    self.spool.release(msgid)
                    return done
                metrics.WS_SPOOL.labels(self.spool.bot, outcome).inc()
                logger.warning("a kept message whose reader is gone was taken here (%s)", outcome)
            self.spool.drop(msgid)
            done += 1
        return done
