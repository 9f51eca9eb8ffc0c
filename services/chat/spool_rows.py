"""What both WeCom modes' spools do alike (a callback's, services/callback/spool.py; a long connection's,
services/longconn/spool.py): a message Redis could not take, kept as a row of the database until one process claims
and takes it."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine, Table, update
from sqlalchemy.exc import SQLAlchemyError

from services.audit.table import ensure_table

logger = logging.getLogger(__name__)

# What a spool's database raises when it does not answer.
SPOOL_FAILURES = (SQLAlchemyError,)


def utc_now() -> datetime:
    """Now, as the spools keep times: naive UTC, whole seconds."""
    return datetime.now(UTC).replace(tzinfo=None, microsecond=0)


class SpoolRows:
    """One bot's rows of a spool's `table`, for the process `owner`: what both spools do alike. A process claims a
    row before it takes its message; a claim older than `claim_seconds` is that of a process that died."""

    def __init__(self, engine: Engine, table: Table, bot: str, owner: str, claim_seconds: float):
        self.engine = engine
        self.table = table
        self.bot = bot
        self.owner = owner
        self.claim_seconds = claim_seconds
        self._table_ready = False

    def _unclaimed(self, now: datetime):
        """The rows no living process holds: never claimed, or claimed by one that died."""
        c = self.table.c
        return (c.taken_by == "") | (c.taken_at <= now - timedelta(seconds=self.claim_seconds))

    def _claim(self, *where) -> bool:
        """Take the row `where` names for this process (a conditional UPDATE); False if a living process holds it."""
        now = utc_now()
        statement = (
            update(self.table)
            .where(self.table.c.bot == self.bot, *where, self._unclaimed(now))
            .values(taken_by=self.owner, taken_at=now)
        )
        with self.engine.begin() as connection:
            return connection.execute(statement).rowcount == 1

    def _release(self, column: str, value: str) -> None:
        """Give back this process's claim on the row whose `column` is `value`: it waits for any process again."""
        c = self.table.c
        with self.engine.begin() as connection:
            connection.execute(
                update(self.table)
                .where(c.bot == self.bot, c[column] == value, c.taken_by == self.owner)
                .values(taken_by="", taken_at=None)
            )

    def _ensure_table(self) -> None:
        if not self._table_ready:
            if ensure_table(self.engine, self.table):
                logger.info("created the %s table", self.table.name)
            self._table_ready = True
