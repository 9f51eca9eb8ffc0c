"""The `wecom_audit` table (docs/audit.md): one row per (bot, msgid, kind), which the database keeps unique, so a
row written twice (a retry, a takeover, two replicas sweeping at once) is kept once."""

from __future__ import annotations

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
from sqlalchemy.schema import CreateColumn

from services.auth.db import create_unless_made, metadata

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
    mysql_charset="utf8mb4",
    mysql_engine="InnoDB",
)


def ensure_table(engine: Engine, table: Table = wecom_audit) -> bool:
    """Create `table` if it is missing, or add the columns a newer release gave it to one made before (each nullable
    or with a default: its rows are left as they are); True if the table was created."""
    with engine.connect() as connection:
        if inspect(connection).has_table(table.name):
            have = {column["name"] for column in inspect(connection).get_columns(table.name)}
            missing = [column for column in table.columns if column.name not in have]
        else:
            missing = None
    if missing is None:
        return create_unless_made(engine, table)
    with engine.begin() as connection:
        for column in missing:
            definition = CreateColumn(column).compile(dialect=engine.dialect)
            connection.execute(text(f"ALTER TABLE {table.name} ADD COLUMN {definition}"))
    return False
