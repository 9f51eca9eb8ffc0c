"""A callback's new message kept in the database's `wecom_callback_spool` while Redis is away, under the id of the
live bubble it is answered with; the first poll of that bubble Redis answers takes it as new (docs/architecture.md,
"Many replicas"). What both spools share is services/chat/spool_rows.py.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import Column, Engine, Index, String, delete, insert, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from services import metrics
from services.chat.spool_rows import SpoolRows, spool_table, utc_now

logger = logging.getLogger(__name__)

# A process that claimed a row and died before taking its message: another takes it over this much later.
CLAIM_SECONDS = 60.0
# WeCom polls a bubble for six minutes: a row older than this will not be polled again (swept when a row is kept).
KEEP_SECONDS = 600.0

wecom_callback_spool = spool_table(
    "wecom_callback_spool",
    Column("stream_id", String(64), nullable=False),  # the id of the bubble the reply opened
    Column("answered_as", String(64), nullable=False, server_default=""),  # the msgid's stream, taken elsewhere
    Index("ix_wecom_callback_spool_stream", "stream_id"),
)


@dataclass(frozen=True, slots=True)
class KeptMessage:
    """A kept row, as a poll of its bubble finds it: the callback's JSON, and the stream a process that took the
    msgid meanwhile answers it with ("" while nobody has)."""

    body: str
    answered_as: str


class CallbackSpool(SpoolRows):
    """One bot's rows of `wecom_callback_spool`, for the process `owner`."""

    def __init__(self, engine: Engine, bot: str, owner: str):
        super().__init__(engine, wecom_callback_spool, bot, owner, CLAIM_SECONDS)

    def keep(self, msgid: str, body: str, stream_id: str) -> str:
        """Write a message Redis could not take; returns the stream id its bubble polls: `stream_id`, or the one a
        WeCom repeat's row has. "" (logged, counted) when the database does not answer either."""
        c = wecom_callback_spool.c
        now = utc_now()
        try:
            self._ensure_table()
            with self.engine.begin() as connection:
                connection.execute(
                    delete(wecom_callback_spool).where(c.received_at < now - timedelta(seconds=KEEP_SECONDS))
                )
                connection.execute(
                    insert(wecom_callback_spool).values(
                        bot=self.bot, msgid=msgid, stream_id=stream_id, body=body, received_at=now
                    )
                )
        except IntegrityError:  # a WeCom repeat: the bubble its first delivery opened
            kept_as = self._kept_as(msgid)
        except SQLAlchemyError as exc:
            logger.warning("could not keep the message in the database either (%s)", type(exc).__name__)
            kept_as = ""
        else:
            kept_as = stream_id
        metrics.CALLBACK_SPOOL.labels(self.bot, "kept" if kept_as else "not_kept").inc()
        return kept_as

    def find(self, stream_id: str) -> KeptMessage | None:
        """The row a bubble's poll stands for, if a message was kept under its id.

        Raises:
            SQLAlchemyError: the database does not answer.
        """
        c = wecom_callback_spool.c
        query = select(c.body, c.answered_as).where(c.bot == self.bot, c.stream_id == stream_id)
        self._ensure_table()
        with self.engine.connect() as connection:
            row = connection.execute(query).first()
        return KeptMessage(row.body, row.answered_as) if row is not None else None

    def claim(self, stream_id: str) -> bool:
        """Take the row for this process; False if another process holds it (it is taking the message now)."""
        c = wecom_callback_spool.c
        return self._claim(c.stream_id == stream_id, c.answered_as == "")

    def taken(self, stream_id: str, answered_as: str) -> None:
        """The message was taken: under its bubble's id (Redis has that stream now: the row goes), or found taken
        as `answered_as` (the row stays, so each poll of the bubble shows that stream)."""
        c = wecom_callback_spool.c
        where = (c.bot == self.bot, c.stream_id == stream_id)
        try:
            with self.engine.begin() as connection:
                if answered_as == stream_id:
                    connection.execute(delete(wecom_callback_spool).where(*where))
                else:
                    connection.execute(update(wecom_callback_spool).where(*where).values(answered_as=answered_as))
        except SQLAlchemyError as exc:  # its claim lapses; a later poll takes it again, finding the msgid taken
            logger.warning("could not mark a kept message taken (%s)", type(exc).__name__)
        metrics.CALLBACK_SPOOL.labels(self.bot, "taken" if answered_as == stream_id else "taken_elsewhere").inc()

    def release(self, stream_id: str) -> None:
        """Redis went away again: the row waits for the next poll, on any process."""
        self._release("stream_id", stream_id)

    def _kept_as(self, msgid: str) -> str:
        c = wecom_callback_spool.c
        try:
            with self.engine.connect() as connection:
                row = connection.execute(select(c.stream_id).where(c.bot == self.bot, c.msgid == msgid)).first()
        except SQLAlchemyError as exc:
            logger.warning("could not read a kept message's row (%s)", type(exc).__name__)
            return ""
        return row.stream_id if row is not None else ""
