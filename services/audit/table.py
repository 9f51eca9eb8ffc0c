"""The `wecom_audit` table (docs/audit.md): one row per (bot, msgid, kind), which the database keeps unique, so a
row written twice (a retry, a takeover, two replicas sweeping at once) is kept once."""

from __future__ import annotations

import logging

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Engine,
    Index,
    Integer,
    String,
    Table,
    Text,
    UniqueConstraint,
    inspect,
    text,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.exc import OperationalError
from sqlalchemy.schema import CreateColumn

from services.auth.db import create_unless_made, metadata

logger = logging.getLogger(__name__)

# Long text: MySQL's TEXT holds 64 KiB, less than one long answer with its notes.
LongText = Text().with_variant(mysql.MEDIUMTEXT(), "mysql")
# An id that is an INTEGER PRIMARY KEY on SQLite (its row id: autoincrement there), BIGINT elsewhere.
RowId = BigInteger().with_variant(Integer(), "sqlite")

wecom_audit = Table(
    "wecom_audit",
    metadata,
    Column("id", RowId, primary_key=True, autoincrement=True),
    Column("bot", String(64), nullable=False),
    Column("msgid", String(128), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("userid", String(64), nullable=False, server_default=""),
    Column("chatid", String(128), nullable=False, server_default=""),
    Column("chattype", String(16), nullable=False, server_default=""),
    Column("msgtype", String(32), nullable=False, server_default=""),
    Column("question", LongText),
    Column("answer", LongText),
    Column("question_len", Integer),
    Column("question_sha256", String(64)),
    Column("answer_len", Integer),
    Column("answer_sha256", String(64)),
    Column("outcome", String(16), nullable=False),
    Column("masked", Integer, nullable=False, server_default="0"),
    Column("dify_conversation_id", String(64), nullable=False, server_default=""),
    Column("dify_message_id", String(64), nullable=False, server_default=""),
    Column("dify_run_id", String(64), nullable=False, server_default=""),
    Column("backend", String(16), nullable=False, server_default=""),
    Column("route", String(32), nullable=False, server_default=""),
    Column("model", String(128), nullable=False, server_default=""),
    Column("prompt_tokens", Integer),
    Column("completion_tokens", Integer),
    Column("trace_id", String(32), nullable=False, server_default=""),
    Column("received_at", DateTime, nullable=False),
    Column("finished_at", DateTime, nullable=False),
    Column("replica", String(128), nullable=False, server_default=""),
    UniqueConstraint("bot", "msgid", "kind", name="uq_wecom_audit_message"),
    Index("ix_wecom_audit_received", "received_at", "id"),
    Index("ix_wecom_audit_user", "userid", "received_at"),
    # the operator's page searches newest first by chat, route, outcome, or a bot's outcome (BENCHMARKS.md §23)
    Index("ix_wecom_audit_chat", "chatid", "received_at"),
    Index("ix_wecom_audit_route", "route", "received_at"),
    Index("ix_wecom_audit_outcome", "outcome", "received_at"),
    Index("ix_wecom_audit_bot_outcome", "bot", "outcome", "received_at"),
    mysql_charset="utf8mb4",
    mysql_engine="InnoDB",
)


def ensure_table(engine: Engine, table: Table = wecom_audit) -> bool:
    """Create `table` if it is missing, or add the columns and indexes a newer release gave it to one made before
    (each column nullable or with a default: its rows are left as they are; an index is built online); True if the
    table was created. A table made by hand without a unique key the release's has is said (once a process), not
    mended: rows written twice may already be in it."""
    with engine.connect() as connection:
        if inspect(connection).has_table(table.name):
            have = {column["name"] for column in inspect(connection).get_columns(table.name)}
            missing = [column for column in table.columns if column.name not in have]
            indexes = inspect(connection).get_indexes(table.name)
            unindexed = [index for index in table.indexes if index.name not in {found["name"] for found in indexes}]
            unique = {tuple(found["column_names"]) for found in indexes if found["unique"]}
            unique |= {tuple(found["column_names"]) for found in inspect(connection).get_unique_constraints(table.name)}
        else:
            missing = unindexed = None
    if missing is None:
        return create_unless_made(engine, table)
    for key in table.constraints:
        if isinstance(key, UniqueConstraint) and tuple(key.columns.keys()) not in unique:
            logger.warning(
                "the %s table has no unique key on (%s): a row written twice is kept twice; add it (%s)",
                table.name,
                ", ".join(key.columns.keys()),
                key.name,
            )
    with engine.begin() as connection:
        for column in missing:
            definition = CreateColumn(column).compile(dialect=engine.dialect)
            connection.execute(text(f"ALTER TABLE {table.name} ADD COLUMN {definition}"))
    for index in unindexed:
        try:
            index.create(engine)
        except OperationalError as exc:  # another replica made it meanwhile
            if "Duplicate key name" not in str(exc) and "already exists" not in str(exc):
                raise
    return False
