"""Signing operators in to /admin: ADMIN_TOKEN and the operator's name give an 8-hour session, kept in a cookie that
every replica accepts (signed with a key made from the token, so a new token ends every session made with the old
one) and carrying the CSRF token each change must send back; failed sign-ins are counted per address over a sliding
minute in Redis, across replicas. Nothing of the token is logged or put in a page."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

import orjson
import redis

from services.keys import ADMIN_FAILS_TTL_SECONDS, Keys
from services.redis_conn import REDIS_FAILURES

SESSION_SECONDS = 8 * 3600
FAILS_PER_MINUTE = 5  # failed sign-ins from one address in a minute; the next is refused (429) until it is over
NAME_MAX = 64  # the operator's name, as the audit row keeps it (its userid column)
COOKIE = "wecom_admin"


@dataclass(frozen=True)
class Operator:
    """A signed-in operator: their name, and the CSRF token their changes carry."""

    name: str
    csrf: str


class AdminSessions:
    def __init__(self, token: str, client: redis.Redis, keys: Keys):
        self._token = token.encode()
        self._key = hmac.new(self._token, b"wecom-admin session v1", hashlib.sha256).digest()
        self.client = client
        self.keys = keys

    def token_matches(self, given: str) -> bool:
        return hmac.compare_digest(given.encode(), self._token)

    def issue(self, name: str, now: float | None = None) -> str:
        """A session cookie's value for `name`, valid SESSION_SECONDS from `now`."""
        body = {"n": name, "t": int(now if now is not None else time.time()), "c": secrets.token_urlsafe(18)}
        payload = base64.urlsafe_b64encode(orjson.dumps(body)).decode().rstrip("=")
        return f"{payload}.{self._sign(payload)}"

    def read(self, cookie: str | None, now: float | None = None) -> Operator | None:
        """The operator a cookie signs in, or None (absent, forged, made with another token, or expired)."""
        payload, _, signature = (cookie or "").partition(".")
        if not payload or not hmac.compare_digest(signature, self._sign(payload)):
            return None
        try:
            body = orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
            name, issued, csrf = str(body["n"]), int(body["t"]), str(body["c"])
        except (ValueError, KeyError, TypeError):
            return None
        if not 0 <= (now if now is not None else time.time()) - issued < SESSION_SECONDS:
            return None
        return Operator(name, csrf)

    @staticmethod
    def csrf_ok(operator: Operator, given: str | None) -> bool:
        return hmac.compare_digest((given or "").encode(), operator.csrf.encode())

    def refused(self, address: str, now: float | None = None) -> bool:
        """Whether `address` failed FAILS_PER_MINUTE sign-ins in the last minute, a sliding one: no burst of twice
        the limit across a minute's edge (Redis away: not refused)."""
        now = time.time() if now is None else now
        try:
            count = self.client.zcount(self.keys.admin_fails(address), f"({now - 60}", "+inf")
        except REDIS_FAILURES:
            return False
        return count >= FAILS_PER_MINUTE

    def failed(self, address: str, now: float | None = None) -> None:
        """Count a failed sign-in from `address`, forgetting those more than a minute old."""
        now, key = time.time() if now is None else now, self.keys.admin_fails(address)
        try:
            pipe = self.client.pipeline(transaction=False)
            pipe.zadd(key, {f"{now:.6f} {secrets.token_hex(4)}": now})
            pipe.zremrangebyscore(key, "-inf", now - 60)
            pipe.expire(key, ADMIN_FAILS_TTL_SECONDS)
            pipe.execute()
        except REDIS_FAILURES:
            pass  # uncounted: the next attempt is not refused for it

    def _sign(self, payload: str) -> str:
        mac = hmac.new(self._key, payload.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).decode().rstrip("=")
