"""The audit rows in the database: written once each (the table's unique (bot, msgid, kind) keeps the first of
two writes, unless the second supersedes it: a stream's row over one made without it in a Redis outage, the whole
answer over its bubble's text), deleted past their term, and read back in pages, oldest first (docs/audit.md)."""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine, and_, bindparam, delete, func, or_, select, update
from sqlalchemy.exc import SQLAlchemyError

from services.audit.rows import ADMIN, ANY, FULL, AuditRow
from services.audit.table import ensure_table, wecom_audit

logger = logging.getLogger(__name__)

# A route filter that means the bot's own (its rows have route "").
OWN_ROUTE = "-"
PURGE_BATCH = 5000  # rows deleted per statement: a year's purge never holds one long lock
_INSERT_IGNORE = wecom_audit.insert().prefix_with("IGNORE", dialect="mysql").prefix_with("OR IGNORE", dialect="sqlite")
# The columns a superseding row writes over the row it replaces (all but the id and the unique key).
_REPLACED = [c.name for c in wecom_audit.c if c.name not in ("id", "bot", "msgid", "kind")]


def _replace(only_outage_rows: bool):
    """The UPDATE a superseding row makes of its message's row: of any row, or (`only_outage_rows`) of one made
    without a stream while Redis was away (outcome error, received and finished at once: rows.row_of_reply)."""
    c = wecom_audit.c
    key = [c.bot == bindparam("key_bot"), c.msgid == bindparam("key_msgid"), c.kind == bindparam("key_kind")]
    if only_outage_rows:
        key += [c.outcome == "error", c.received_at == c.finished_at]
    return update(wecom_audit).where(*key).values({name: bindparam(f"new_{name}") for name in _REPLACED})


_REPLACE_OUTAGE_ROW, _REPLACE_ANY_ROW = _replace(True), _replace(False)


@dataclass(frozen=True)
class AuditFilter:
    """Which rows an export or a search reads: received in [since, until) (naive UTC), of one bot, one user, one
    route ("-": the bot's own), one chat, one outcome, with `text` in the question or the answer (where kept), of
    one kind (message, push, admin, ...)."""

    since: datetime | None = None
    until: datetime | None = None
    bot: str = ""
    user: str = ""
    route: str = ""
    chat: str = ""
    outcome: str = ""
    text: str = ""
    kind: str = ""

    def clauses(self) -> list:
        c = wecom_audit.c
        found = []
        if self.since is not None:
            found.append(c.received_at >= self.since)
        if self.until is not None:
            found.append(c.received_at < self.until)
        for column, value in ((c.bot, self.bot), (c.userid, self.user), (c.chatid, self.chat)):
            if value:
                found.append(column == value)
        if self.route:
            found.append(c.route == ("" if self.route == OWN_ROUTE else self.route))
        if self.outcome:
            found.append(c.outcome == self.outcome)
        if self.kind:
            found.append(c.kind == self.kind)
        if self.text:
            found.append(
                or_(c.question.contains(self.text, autoescape=True), c.answer.contains(self.text, autoescape=True))
            )
        return found


class BadCursor(ValueError):
    """A page cursor that is not one this gateway made."""


class AuditRecords:
    """The `wecom_audit` table of one database, with the deployment's AUDIT_CONTENT."""

    def __init__(self, engine: Engine, content: str = FULL):
        self.engine = engine
        self.content = content
        self._table_ready = False

    def ready(self) -> bool:
        """Whether the table is there: created when missing (AUDIT on an existing deployment needs no migration
        step); False while the database does not answer."""
        if not self._table_ready:
            try:
                if ensure_table(self.engine):
                    logger.info("created the wecom_audit table")
                self._table_ready = True
            except SQLAlchemyError as exc:
                logger.warning("could not check the wecom_audit table (%s); audit rows wait", type(exc).__name__)
        return self._table_ready

    def insert(self, rows: list[AuditRow]) -> dict[str, int]:
        """Write the rows that are not in the table yet, in one transaction; returns how many were new, by outcome.
        A row whose message has one already is dropped, unless it supersedes that one (AuditRow.supersedes): then it
        is written over it (not counted again).

        Raises:
            SQLAlchemyError: the database did not take them (none was written).
        """
        by_outcome: dict[str, list[AuditRow]] = {}
        for row in rows:
            by_outcome.setdefault(row.outcome, []).append(row)
        new = {}
        with self.engine.begin() as connection:
            for outcome, group in by_outcome.items():
                values = [row.values(self.content) for row in group]
                new[outcome] = max(0, connection.execute(_INSERT_IGNORE, values).rowcount)
                if new[outcome] < len(group) or any(row.supersedes == ANY for row in group):
                    self._supersede(connection, group, values)  # (rare: a row was there first)
        return new

    @staticmethod
    def _supersede(connection, rows: list[AuditRow], values: list[dict]) -> None:
        for row, columns in zip(rows, values, strict=True):
            if not row.supersedes:
                continue
            params = {f"new_{name}": columns[name] for name in _REPLACED}
            params |= {"key_bot": row.bot, "key_msgid": row.msgid, "key_kind": row.kind}
            connection.execute(_REPLACE_ANY_ROW if row.supersedes == ANY else _REPLACE_OUTAGE_ROW, params)

    def purge(self, older_than_days: int, now: datetime | None = None) -> int:
        """Delete the rows received more than `older_than_days` days ago, a batch at a time; returns how many."""
        cutoff = (now or datetime.now(UTC).replace(tzinfo=None)) - timedelta(days=older_than_days)
        c, deleted = wecom_audit.c, 0
        while True:
            with self.engine.begin() as connection:
                ids = connection.execute(select(c.id).where(c.received_at < cutoff).limit(PURGE_BATCH)).scalars().all()
                if not ids:
                    return deleted
                deleted += connection.execute(delete(wecom_audit).where(c.id.in_(ids))).rowcount

    def row(self, bot: str, msgid: str, kind: str) -> dict | None:
        """One message's row, or None while it is not written (or when it never will be)."""
        c = wecom_audit.c
        query = select(wecom_audit).where(c.bot == bot, c.msgid == msgid, c.kind == kind)
        with self.engine.connect() as connection:
            found = connection.execute(query).first()
        return dict(found._mapping) if found is not None else None

    def page(self, which: AuditFilter, limit: int, cursor: str = "") -> tuple[list[dict], str]:
        """Up to `limit` rows after `cursor` ('' for the first page), oldest first; and the next page's cursor
        ('' after the last row).

        Raises:
            BadCursor: `cursor` is not one `page` made.
        """
        c = wecom_audit.c
        query = select(wecom_audit).where(*which.clauses()).order_by(c.received_at, c.id).limit(limit + 1)
        if cursor:
            received_at, row_id = _read_cursor(cursor)
            query = query.where(or_(c.received_at > received_at, and_(c.received_at == received_at, c.id > row_id)))
        with self.engine.connect() as connection:
            rows = [dict(row._mapping) for row in connection.execute(query)]
        if len(rows) <= limit:
            return rows, ""
        rows = rows[:limit]
        return rows, _cursor(rows[-1]["received_at"], rows[-1]["id"])

    def latest(self, which: AuditFilter, limit: int) -> list[dict]:
        """The newest `limit` rows that `which` selects, newest first (the operator's search)."""
        c = wecom_audit.c
        query = select(wecom_audit).where(*which.clauses()).order_by(c.received_at.desc(), c.id.desc()).limit(limit)
        with self.engine.connect() as connection:
            return [dict(row._mapping) for row in connection.execute(query)]

    def received_before(self, until: datetime, rows: int) -> datetime | None:
        """When the `rows`-th newest row received before `until` was received, or None when there are fewer (read
        from the index on received_at alone)."""
        c = wecom_audit.c
        query = select(c.received_at).where(c.received_at < until).order_by(c.received_at.desc())
        with self.engine.connect() as connection:
            return connection.execute(query.offset(rows - 1).limit(1)).scalar()

    def by_id(self, row_id: int) -> dict | None:
        """One row by its id, or None."""
        with self.engine.connect() as connection:
            found = connection.execute(select(wecom_audit).where(wecom_audit.c.id == row_id)).first()
        return dict(found._mapping) if found is not None else None

    def outcomes_since(self, since: datetime) -> dict[str, dict[str, int]]:
        """How many messages each bot had since `since` (naive UTC), by outcome (operators' rows left out)."""
        c = wecom_audit.c
        query = (
            select(c.bot, c.outcome, func.count())
            .where(c.received_at >= since, c.kind != ADMIN)
            .group_by(c.bot, c.outcome)
        )
        counts: dict[str, dict[str, int]] = {}
        with self.engine.connect() as connection:
            for bot, outcome, count in connection.execute(query):
                counts.setdefault(bot, {})[outcome] = count
        return counts

    def every(self, which: AuditFilter, page_size: int = 1000) -> Iterator[dict]:
        """Every row that `which` selects, oldest first, read a page at a time (an export of a year of rows holds one
        page in memory, never the year)."""
        cursor = ""
        while True:
            rows, cursor = self.page(which, page_size, cursor)
            yield from rows
            if not cursor:
                return


def _cursor(received_at: datetime, row_id: int) -> str:
    return base64.urlsafe_b64encode(f"{received_at.isoformat()}|{row_id}".encode()).decode().rstrip("=")


def _read_cursor(cursor: str) -> tuple[datetime, int]:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        received_at, _, row_id = text.partition("|")
        return datetime.fromisoformat(received_at), int(row_id)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise BadCursor("not a cursor of this export") from None
