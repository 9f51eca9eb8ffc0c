"""Who may ask, and with which token: Redis token cache -> MySQL user table -> external auth API, one exchange per
user at a time across replicas, its outcome shared with the burst behind it (docs/protocol.md, "The auth API").
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable

import orjson
import redis

from services import metrics
from services.auth.api import AuthApiClient, AuthApiRefused, AuthApiUnavailable
from services.auth.users import DatabaseUnavailable, UserDirectory
from services.keys import AUTH_DENIAL_TTL_SECONDS, AUTH_OUTAGE_TTL_SECONDS, Keys
from services.lua import LuaScript

logger = logging.getLogger(__name__)

_RUNNING = "running"
_WAIT_STEP = 0.05

# KEYS: flight. ARGV: the leader's mark, the outcome to leave ("" to delete the flight), its TTL (s). Settles the
# flight only if it is still this leader's. Returns 1 if it was.
SETTLE_FLIGHT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '' then redis.call('DEL', KEYS[1]) else redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3]) end
return 1
"""


class AuthError(Exception):
    """The user cannot be served now; `code` names why (logs, metrics, the stream hash)."""

    code = "auth_error"


class UnknownUser(AuthError):
    code = "unknown_user"


class UserDisabled(AuthError):
    code = "user_disabled"


class UserRefused(AuthError):
    code = "auth_refused"


class AuthUnavailable(AuthError):
    code = "auth_unavailable"


class DirectoryUnavailable(AuthError):
    code = "database_unavailable"


_BY_CODE = {cls.code: cls for cls in (UnknownUser, UserDisabled, UserRefused, AuthUnavailable, DirectoryUnavailable)}
_DENIALS = frozenset({UnknownUser.code, UserDisabled.code, UserRefused.code})


def token_ttl(expires_in: int, margin: int) -> int:
    """Seconds to cache a token: its lifetime minus the margin, or half its lifetime when that is shorter."""
    if expires_in > 2 * margin:
        return expires_in - margin
    return max(1, expires_in // 2)


class Authorizer:
    """Turns a WeCom userid into the Dify `inputs` for that user, or raises an AuthError."""

    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        users: UserDirectory,
        api: AuthApiClient,
        token_margin: int = 60,
        exchange_timeout: float = 5.0,
        declared_inputs: Callable[[], dict[str, object]] | None = None,
        bot: str = "default",
    ):
        self.bot = bot
        self.redis = client
        self.keys = keys
        self.users = users
        self.api = api
        self.token_margin = token_margin
        # The lock outlives a slow exchange (database + auth API timeouts); waiters give up a little later.
        self.lock_ms = int((2 * exchange_timeout + 5) * 1000)
        self.wait_seconds = 2 * exchange_timeout + 6
        self.declared_inputs = declared_inputs or (dict)
        self._settle = LuaScript(client, SETTLE_FLIGHT)

    def inputs_for(self, userid: str, declared_inputs: Callable[[], dict[str, object]] | None = None) -> dict:
        """The Dify inputs carrying this user's token and account, and the user's details the app declares inputs
        for (`declared_inputs`: the app's, for a route's; by default the bot's own app's).

        Raises:
            AuthError: UnknownUser, UserDisabled, UserRefused, AuthUnavailable or DirectoryUnavailable.
        """
        cached = self._cached(userid)
        metrics.TOKEN_CACHE.labels(self.bot, "hit" if cached is not None else "miss").inc()
        if cached is None:
            try:
                cached = self._exchange_once(userid)
            except AuthError as exc:
                metrics.AUTH_OUTCOMES.labels(self.bot, exc.code).inc()
                raise
        metrics.AUTH_OUTCOMES.labels(self.bot, "ok").inc()
        return self._inputs(*cached, declared_inputs or self.declared_inputs)

    def _exchange_once(self, userid: str) -> tuple[str, dict]:
        """The single flight: one request per user does the exchange, the others wait for its result."""
        deadline = time.monotonic() + self.wait_seconds
        flight = self.keys.auth_flight(userid)
        while time.monotonic() < deadline:
            mark = f"{_RUNNING} {secrets.token_hex(8)}"
            if self.redis.set(flight, mark, nx=True, px=self.lock_ms):
                return self._exchange_as_leader(userid, flight, mark)
            outcome = self._await_leader(userid, flight, deadline)
            if isinstance(outcome, tuple):
                return outcome
            if outcome is not None:
                raise _BY_CODE.get(outcome, AuthUnavailable)(f"{outcome} (shared outcome)")
        raise AuthUnavailable("timed out waiting for another request's token exchange")

    def _exchange_as_leader(self, userid: str, flight: str, mark: str) -> tuple[str, dict]:
        # A leader that cached its token and let go of the flight between our cache miss and taking the flight
        # has done the work already: a second exchange would issue the user a second token.
        cached = self._cached(userid)
        if cached is not None:
            self._settle_flight(flight, mark)
            return cached
        try:
            token, info = self._exchange(userid)
        except AuthError as exc:
            ttl = AUTH_DENIAL_TTL_SECONDS if exc.code in _DENIALS else AUTH_OUTAGE_TTL_SECONDS
            self._settle_flight(flight, mark, exc.code, ttl)
            raise
        except BaseException:
            self._settle_flight(flight, mark)
            raise
        self._settle_flight(flight, mark)
        return token, info

    def _settle_flight(self, flight: str, mark: str, outcome: str = "", ttl: int = 0) -> None:
        """Let go of the flight (leaving `outcome` for `ttl` seconds), if it is still ours."""
        if not int(self._settle(keys=[flight], args=[mark, outcome, ttl])):
            logger.warning("the token exchange outlasted its lock; another request leads the user's flight now")

    def _await_leader(self, userid: str, flight: str, deadline: float):
        """Wait for the request holding the flight: (token, info) on success, its error code, or None to retry."""
        while time.monotonic() < deadline:
            time.sleep(_WAIT_STEP)
            cached = self._cached(userid)
            if cached is not None:
                return cached
            state = self.redis.get(flight)
            if state is None:
                return None
            if not state.startswith(_RUNNING):
                return state
        return None

    def _exchange(self, userid: str) -> tuple[str, dict]:
        try:
            user = self.users.find(userid)
        except DatabaseUnavailable as exc:
            logger.warning("user table unavailable: %s", exc)
            raise DirectoryUnavailable(str(exc)) from exc
        if user is None:
            raise UnknownUser(userid)
        if not user.enabled:
            raise UserDisabled(userid)
        try:
            grant = self.api.exchange(user.account, userid)
        except AuthApiRefused as exc:
            logger.info("auth API refused the user (HTTP %d)", exc.status)
            raise UserRefused(str(exc)) from exc
        except AuthApiUnavailable as exc:
            logger.warning("auth API unavailable: %s", exc)
            raise AuthUnavailable(str(exc)) from exc
        info = {"userid": userid, "account": user.account, "display_name": user.display_name, "user": grant.user}
        ttl = token_ttl(grant.expires_in, self.token_margin)
        # Two slots on a cluster, so not one transaction: the info goes first, so a reader that finds the token
        # always finds its info (a reader in between finds no token and waits for the flight).
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(self.keys.token_info(grant.token), orjson.dumps(info), ex=ttl)
        pipe.set(self.keys.user_token(userid), grant.token, ex=ttl)
        pipe.execute()
        logger.info("token obtained and cached for %ds", ttl)
        return grant.token, info

    def _cached(self, userid: str) -> tuple[str, dict] | None:
        token = self.redis.get(self.keys.user_token(userid))
        if not token:
            return None
        raw = self.redis.get(self.keys.token_info(token))
        if not raw:
            return None
        return token, orjson.loads(raw)

    @staticmethod
    def _inputs(token: str, info: dict, declared_inputs: Callable[[], dict[str, object]]) -> dict:
        inputs: dict[str, object] = {"user_token": token, "user_account": info.get("account", "")}
        fields = {"display_name": info.get("display_name"), **(info.get("user") or {})}
        for name, default in declared_inputs().items():
            if name in inputs:
                continue
            value = fields.get(name)
            if isinstance(value, (str, int, float)) and not isinstance(value, bool):
                inputs[name] = str(value)
            elif default not in (None, ""):
                inputs[name] = default
        return inputs

    def revoke(self, userid: str) -> None:
        """Forget the user's cached token and any remembered outcome, so the next message asks afresh."""
        token = self.redis.get(self.keys.user_token(userid))
        keys = [self.keys.user_token(userid), self.keys.auth_flight(userid)]
        if token:
            keys.append(self.keys.token_info(token))
        self.redis.delete(*keys)
        logger.info("cached authorization revoked")

    def token_status(self, userid: str) -> dict:
        """For operators: whether a token is cached, its remaining TTL and the flight state (never the token)."""
        token_key = self.keys.user_token(userid)
        return {
            "cached": bool(self.redis.exists(token_key)),
            "ttl": self.redis.ttl(token_key),
            "flight": (self.redis.get(self.keys.auth_flight(userid)) or "").partition(" ")[0] or None,
        }
