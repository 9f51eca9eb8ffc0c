"""Client of the external auth API (docs/protocol.md): exchange a user's account for a token, with our service
credential. 401/403/404 mean this user is refused; anything else that is not a usable 200 means unavailable."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import httpx
import orjson

from utils.http import outgoing_client

logger = logging.getLogger(__name__)

_REFUSED = frozenset({401, 403, 404})


class AuthApiRefused(Exception):
    """The auth API refused this user."""

    def __init__(self, status: int):
        super().__init__(f"auth API refused the user (HTTP {status})")
        self.status = status


class AuthApiUnavailable(Exception):
    """The auth API could not give an answer (down, slow, 5xx, malformed reply)."""


@dataclass(frozen=True, slots=True)
class TokenGrant:
    token: str
    expires_in: int
    user: dict


class AuthApiClient:
    """One per process; thread-safe."""

    def __init__(self, url: str, api_key: str, timeout: float = 5.0):
        self.url = url
        self._http = outgoing_client(
            httpx.Timeout(timeout, connect=min(timeout, 3.0)),
            follow_redirects=False,
            headers={"Authorization": f"Bearer {api_key}"},
        )

    def close(self) -> None:
        self._http.close()

    def exchange(self, account: str, userid: str) -> TokenGrant:
        """POST {account, wecom_userid}; returns the token grant.

        Raises:
            AuthApiRefused: 401, 403 or 404.
            AuthApiUnavailable: connection error, timeout, 5xx, any other status, or a malformed 200 body.
        """
        try:
            response = self._http.post(self.url, json={"account": account, "wecom_userid": userid})
        except httpx.TimeoutException as exc:
            raise AuthApiUnavailable("auth API timed out") from exc
        except httpx.HTTPError as exc:
            raise AuthApiUnavailable(f"auth API unreachable: {type(exc).__name__}") from exc
        if response.status_code in _REFUSED:
            raise AuthApiRefused(response.status_code)
        if response.status_code != 200:
            raise AuthApiUnavailable(f"auth API answered HTTP {response.status_code}")
        return _grant(response.content)


def _grant(body: bytes) -> TokenGrant:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise AuthApiUnavailable("auth API answered malformed JSON") from None
    if not isinstance(data, dict):
        raise AuthApiUnavailable("auth API answered a non-object")
    token, expires_in, user = data.get("token"), data.get("expires_in"), data.get("user")
    if not isinstance(token, str) or not token:
        raise AuthApiUnavailable("auth API answered without a token")
    if isinstance(expires_in, bool) or not isinstance(expires_in, (int, float)) or expires_in <= 0:
        raise AuthApiUnavailable("auth API answered without a positive expires_in")
    return TokenGrant(token=token, expires_in=int(expires_in), user=user if isinstance(user, dict) else {})
