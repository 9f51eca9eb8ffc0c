"""An answer's end that went out through response_url while Redis was away, kept in the database's `wecom_kept_ends`
until Redis has it. Its process marks the stream so once Redis is back; one that exits first (it drained, or was
killed) leaves the row to the takeover of that stream on another process, which ends the stream with it instead of
following the answer's run again and showing in the bubble what the user was sent (docs/architecture.md, "Many
replicas").
"""

from __future__ import annotations

import logging
from datetime import timedelta

import orjson
from sqlalchemy import Column, DateTime, Engine, String, Table, UniqueConstraint, delete, insert, select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from services.audit.table import LongText, RowId, ensure_table
from services.auth.db import metadata
from services.chat.spool_rows import utc_now

logger = logging.getLogger(__name__)

# A takeover comes within the bubble's six minutes: a row older than this is of no use (swept when a row is kept).
KEEP_SECONDS = 600.0

wecom_kept_ends = Table(
    "wecom_kept_ends",
    metadata,
    Column("id", RowId, primary_key=True, autoincrement=True),
    Column("bot", String(64), nullable=False),
    Column("stream_id", String(64), nullable=False),
    Column("status", String(16), nullable=False),
    Column("fields", LongText, nullable=False),  # the stream's final fields, as JSON
    Column("kept_at", DateTime, nullable=False),
    UniqueConstraint("bot", "stream_id", name="uq_wecom_kept_ends_stream"),
    mysql_charset="utf8mb4",
    mysql_engine="InnoDB",
)


class KeptEnds:
    """One bot's rows of `wecom_kept_ends`."""

    def __init__(self, engine: Engine, bot: str):
        self.engine = engine
        self.bot = bot
        self._table_ready = False

    def keep(self, stream_id: str, status: str, fields: dict[str, str]) -> None:
        """Keep the stream's end (its `status` and final `fields`); logged, not raised, when the database is away."""
        c = wecom_kept_ends.c
        now = utc_now()
        try:
            self._ensure_table()
            with self.engine.begin() as connection:
                connection.execute(delete(wecom_kept_ends).where(c.kept_at < now - timedelta(seconds=KEEP_SECONDS)))
                row = {"bot": self.bot, "stream_id": stream_id, "status": status, "kept_at": now}
                connection.execute(insert(wecom_kept_ends).values(**row, fields=orjson.dumps(fields).decode()))
        except IntegrityError:
            pass  # kept already (a post made once, whatever tried it)
        except SQLAlchemyError as exc:
            logger.warning("could not keep the answer's end in the database either (%s)", type(exc).__name__)

    def find(self, stream_id: str) -> tuple[str, dict[str, str]] | None:
        """The end kept for the stream, (status, fields); None when there is none, or the database does not say."""
        c = wecom_kept_ends.c
        try:
            self._ensure_table()
            with self.engine.connect() as connection:
                row = connection.execute(
                    select(c.status, c.fields).where(c.bot == self.bot, c.stream_id == stream_id)
                ).first()
        except SQLAlchemyError as exc:
            logger.warning("could not read whether the answer's end was kept (%s)", type(exc).__name__)
            return None
        return (row.status, orjson.loads(row.fields)) if row is not None else None

    def _ensure_table(self) -> None:
        if not self._table_ready:
            ensure_table(self.engine, wecom_kept_ends)
            self._table_ready = True
