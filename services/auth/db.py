"""The database: one SQLAlchemy Core engine per process (MySQL via PyMySQL, or the embedded SQLite default), the
`wecom_users` table (docs/protocol.md), and schema creation that is safe to run any number of times."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    Engine,
    MetaData,
    String,
    Table,
    create_engine,
    func,
    inspect,
    true,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

metadata = MetaData()

wecom_users = Table(
    "wecom_users",
    metadata,
    Column("wecom_userid", String(64), primary_key=True),
    Column("account", String(128), nullable=False),
    Column("display_name", String(128)),
    Column("enabled", Boolean, nullable=False, server_default=true()),
    Column("created_at", DateTime, nullable=False, server_default=func.now()),
    Column("updated_at", DateTime, nullable=False, server_default=func.now(), onupdate=func.now()),
    mysql_charset="utf8mb4",
    mysql_engine="InnoDB",
)


def default_sqlite_url(instance_path: Path) -> str:
    """The embedded default: a SQLite file in the instance folder."""
    instance_path.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{instance_path / 'gateway.db'}"


def make_engine(url: str, timeout: float = 5.0, pool_size: int = 5) -> Engine:
    """An engine with a small pool, pre-ping (dead connections are replaced, not handed out) and short timeouts,
    so a database outage fails a lookup in seconds instead of hanging a thread."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return create_engine(url, connect_args={"timeout": timeout, "check_same_thread": False}, pool_pre_ping=True)
    if parsed.get_backend_name() == "mysql" and "charset" not in parsed.query:
        parsed = parsed.update_query_dict({"charset": "utf8mb4"})
    seconds = max(1, int(timeout))
    return create_engine(
        parsed,
        pool_size=pool_size,
        max_overflow=pool_size * 2,
        pool_timeout=timeout,
        pool_recycle=1800,
        pool_pre_ping=True,
        connect_args={"connect_timeout": seconds, "read_timeout": seconds, "write_timeout": seconds},
    )


def init_schema(engine: Engine) -> None:
    """Create the tables that do not exist yet (existing tables and rows are left as they are). A table another
    process creates meanwhile (a serving gateway makes its audit table on first use) is taken as made."""
    for table in metadata.sorted_tables:
        create_unless_made(engine, table)


def create_unless_made(engine: Engine, table) -> bool:
    """Create `table` if it does not exist; False when it did, or another process made it between the look and
    the CREATE (which then fails, and is not an error).

    Raises:
        sqlalchemy.exc.SQLAlchemyError: the CREATE failed, and the table is not there.
    """
    if inspect(engine).has_table(table.name):
        return False
    try:
        table.create(engine)
    except SQLAlchemyError:
        if not inspect(engine).has_table(table.name):
            raise
        return False
    return True


class SchemaMissing(Exception):
    """The database answers but has no wecom_users table: `flask --app app db init` has not been run."""


def check_user_table(engine: Engine) -> None:
    """Raise unless the database answers and holds the wecom_users table.

    Raises:
        SchemaMissing: the table does not exist.
        SQLAlchemyError: the database does not answer.
    """
    with engine.connect() as connection:
        if not inspect(connection).has_table(wecom_users.name):
            raise SchemaMissing("no wecom_users table: run `flask --app app db init`")
