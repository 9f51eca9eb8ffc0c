"""Every serving process's loop over its bots' audit trails: a sweep every SWEEP_SECONDS (trail.py), and, on one
replica at a time, the deletion of the rows past AUDIT_RETENTION_DAYS once an hour."""

from __future__ import annotations

import logging
import threading

import redis
from sqlalchemy.exc import SQLAlchemyError

from services import metrics
from services.audit.records import AuditRecords
from services.audit.trail import AuditTrail, sweep_quietly
from services.loops import run_until
from services.redis_conn import REDIS_FAILURES

logger = logging.getLogger(__name__)

SWEEP_SECONDS = 1.0
PURGE_EVERY_SECONDS = 3600


class AuditSweeper:
    """Sweeps the audit trails of this process's bots, and purges the table when its turn comes."""

    def __init__(
        self,
        client: redis.Redis,
        trails: list[AuditTrail],
        records: AuditRecords,
        retention_days: int,
        purge_lock_key: str,
        owner: str,
    ):
        self.client = client
        self.trails = trails
        self.records = records
        self.retention_days = retention_days  # 0: rows are kept
        self.purge_lock_key = purge_lock_key
        self.owner = owner
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="audit-sweeper", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop sweeping, and wait for a sweep under way (its database calls end within DATABASE_TIMEOUT)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._last_held()

    def _last_held(self) -> None:
        """The rows this process held while Redis was away get a last try at the database; what it does not take
        is lost with the process, and said so."""
        for trail in self.trails:
            if trail.held and self.records.ready():
                trail.write_held()
            if trail.held:
                logger.error("%d audit rows lost: Redis and the database were away at the end", len(trail.held))
                metrics.AUDIT_ROWS.labels(trail.bot, "lost").inc(len(trail.held))
                trail.held.clear()

    def sweep_all(self) -> None:
        """One sweep of every bot's trail, and the purge if it is this process's turn."""
        if not self.records.ready():
            return
        for trail in self.trails:
            sweep_quietly(trail)
        if self.retention_days:
            self.purge_if_due()

    def purge_if_due(self) -> int:
        """Delete the rows past their term, if no process of the deployment did in the last hour; how many."""
        try:
            if not self.client.set(self.purge_lock_key, self.owner, nx=True, ex=PURGE_EVERY_SECONDS):
                return 0
        except REDIS_FAILURES:
            return 0
        try:
            deleted = self.records.purge(self.retention_days)
        except SQLAlchemyError as exc:
            logger.warning("could not delete the audit rows past their term (%s); tried again in an hour", exc)
            return 0
        if deleted:
            logger.info("deleted %d audit rows older than %d days", deleted, self.retention_days)
        return deleted

    def _run(self) -> None:
        def step() -> None:
            self.sweep_all()
            self._stop.wait(SWEEP_SECONDS)

        run_until(self._stop, step, "audit_sweeper")
