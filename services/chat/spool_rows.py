"""What both WeCom modes' spools do alike (a callback's, services/callback/spool.py; a long connection's,
services/longconn/spool.py): a message Redis could not take, kept as a row of the database until one process claims
and takes it."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

from sqlalchemy import Column, DateTime, Engine, String, Table, UniqueConstraint, update
from sqlalchemy.exc import SQLAlchemyError

from services.audit.table import LongText, RowId, ensure_table
from services.auth.db import metadata

logger = logging.getLogger(__name__)

# What a spool's database raises when it does not answer.
SPOOL_FAILURES = (SQLAlchemyError,)


def utc_now() -> datetime:
    """Now, as the spools keep times: naive UTC, whole seconds."""
    return datetime.now(UTC).replace(tzinfo=None, microsecond=0)


def spool_table(name: str, *extra) -> Table:
    """A spool's table: a bot's message (`body`: its JSON, decrypted where WeCom encrypted it), once per msgid, when
    it came, and the process that claimed it (`taken_by`, `taken_at`: SpoolRows' claims); `extra`, the columns and
    indexes of its own."""
    return Table(
        name,
        metadata,
        Column("id", RowId, primary_key=True, autoincrement=True),
        Column("bot", String(64), nullable=False),
        Column("msgid", String(128), nullable=False),
        Column("body", LongText, nullable=False),
        Column("received_at", DateTime, nullable=False),
        Column("taken_by", String(128), nullable=False, server_default=""),
        Column("taken_at", DateTime),
        *extra,
        UniqueConstraint("bot", "msgid", name=f"uq_{name}_message"),
        mysql_charset="utf8mb4",
        mysql_engine="InnoDB",
    )


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
