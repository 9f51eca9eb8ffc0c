"""The user directory: who may use the bot, read from and managed in the `wecom_users` table.

With a read replica (DATABASE_READ_URL), reads go there and writes to the primary; a replica that fails is left
alone for a while (REPLICA_RETRY_SECONDS) and its reads go to the primary meanwhile, so a dead replica costs one
timeout, not one per message.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from sqlalchemy import Connection, Engine, insert, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from services.auth.db import wecom_users


class DatabaseUnavailable(Exception):
    """The user table could not be read (connection refused, timeout, lost connection)."""


class UserExists(Exception):
    """`add` for a userid that is already in the table."""


@dataclass(frozen=True, slots=True)
class User:
    userid: str
    account: str
    display_name: str | None
    enabled: bool


logger = logging.getLogger(__name__)

T = TypeVar("T")
REPLICA_RETRY_SECONDS = 30.0


def _user(row) -> User:
    return User(userid=row.wecom_userid, account=row.account, display_name=row.display_name, enabled=bool(row.enabled))


class UserDirectory:
    """Reads and writes `wecom_users`; every database failure of a lookup surfaces as DatabaseUnavailable."""

    def __init__(self, engine: Engine, read_engine: Engine | None = None):
        self.engine = engine  # the primary: writes, and reads while the replica is away
        self.read_engine = read_engine
        self._replica_away_until = 0.0

    def find(self, userid: str) -> User | None:
        """The user with this WeCom userid, or None.

        Raises:
            DatabaseUnavailable: neither the replica nor the primary answered.
        """
        query = select(wecom_users).where(wecom_users.c.wecom_userid == userid)
        try:
            row = self._read(lambda connection: connection.execute(query).first())
        except SQLAlchemyError as exc:
            raise DatabaseUnavailable(type(exc).__name__) from exc
        return _user(row) if row is not None else None

    def _read(self, query: Callable[[Connection], T]) -> T:
        """`query` on the read replica, or on the primary when there is none or it failed lately."""
        if self.read_engine is not None and time.monotonic() >= self._replica_away_until:
            try:
                with self.read_engine.connect() as connection:
                    return query(connection)
            except SQLAlchemyError as exc:
                self._replica_away_until = time.monotonic() + REPLICA_RETRY_SECONDS
                logger.warning(
                    "read replica unavailable (%s); reading from the primary for %.0fs",
                    type(exc).__name__,
                    REPLICA_RETRY_SECONDS,
                )
        with self.engine.connect() as connection:
            return query(connection)

    def close(self) -> None:
        """Release the pooled connections."""
        self.engine.dispose()
        if self.read_engine is not None:
            self.read_engine.dispose()

    def add(self, userid: str, account: str, display_name: str | None = None, enabled: bool = True) -> User:
        """Insert a user.

        Raises:
            UserExists: the userid is already present.
        """
        values = {"wecom_userid": userid, "account": account, "display_name": display_name, "enabled": enabled}
        try:
            with self.engine.begin() as connection:
                connection.execute(insert(wecom_users).values(**values))
        except IntegrityError:
            raise UserExists(userid) from None
        return User(userid, account, display_name, enabled)

    def set_enabled(self, userid: str, enabled: bool) -> bool:
        """Enable or disable a user; False if there is no such user."""
        statement = update(wecom_users).where(wecom_users.c.wecom_userid == userid).values(enabled=enabled)
        with self.engine.begin() as connection:
            return connection.execute(statement).rowcount > 0

    def list(self, limit: int = 100, offset: int = 0) -> list[User]:
        """Users ordered by userid."""
        query = select(wecom_users).order_by(wecom_users.c.wecom_userid).limit(limit).offset(offset)
        return self._read(lambda connection: [_user(row) for row in connection.execute(query)])
