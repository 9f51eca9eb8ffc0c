"""The user directory: who may use the bot, read from and managed in the `wecom_users` table."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Engine, insert, select, update
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


def _user(row) -> User:
    return User(userid=row.wecom_userid, account=row.account, display_name=row.display_name, enabled=bool(row.enabled))


class UserDirectory:
    """Reads and writes `wecom_users`; every database failure surfaces as DatabaseUnavailable."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def find(self, userid: str) -> User | None:
        """The user with this WeCom userid, or None."""
        query = select(wecom_users).where(wecom_users.c.wecom_userid == userid)
        try:
            with self.engine.connect() as connection:
                row = connection.execute(query).first()
        except SQLAlchemyError as exc:
            raise DatabaseUnavailable(type(exc).__name__) from exc
        return _user(row) if row is not None else None

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
        with self.engine.connect() as connection:
            return [_user(row) for row in connection.execute(query)]
