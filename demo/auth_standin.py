"""An auth API stand-in, over real HTTP: POST {account, wecom_userid} with a Bearer service
key -> 200 {token, expires_in, user}; 401/403/404 refusals; and faults on demand (down, slow, malformed)."""

from __future__ import annotations

import asyncio
import secrets
import threading

import orjson

from demo.http_server import Conn, Request, StandInServer

OK, DOWN, SLOW, MALFORMED, NO_TOKEN = "ok", "down", "slow", "malformed", "no_token"


class AuthStandIn:
    """Serves the token exchange on `/auth/token`; `calls` records every request it answered."""

    def __init__(self, api_key: str = "demo-auth-key", expires_in: int = 3600, host: str = "127.0.0.1", port: int = 0):
        self.api_key = api_key
        self.expires_in = expires_in
        self.mode = OK
        self.delay = 0.0
        self.refused: dict[str, int] = {}
        self.calls: list[dict] = []
        self.server = StandInServer(self.handle, host, port)
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"{self.server.url}/auth/token"

    def start(self) -> AuthStandIn:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop()

    def reset(self) -> None:
        with self._lock:
            self.mode, self.delay, self.expires_in = OK, 0.0, 3600
            self.refused.clear()
            self.calls.clear()

    def refuse(self, account: str, status: int = 403) -> None:
        """Answer `status` (401, 403 or 404) for this account."""
        self.refused[account] = status

    async def handle(self, request: Request, conn: Conn) -> None:
        if request.method != "POST" or request.path != "/auth/token":
            await conn.send(404, {"error": "not_found"})
            return
        try:
            body = request.json() or {}
        except orjson.JSONDecodeError:
            body = {}
        with self._lock:
            self.calls.append({"body": body, "authorization": request.headers.get("authorization", "")})
        if self.delay or self.mode == SLOW:
            await asyncio.sleep(self.delay or 30)
        if self.mode == DOWN:
            await conn.send(503, {"error": "unavailable"})
            return
        if request.headers.get("authorization") != f"Bearer {self.api_key}":
            await conn.send(401, {"error": "bad service credential"})
            return
        account = body.get("account")
        if not isinstance(account, str) or not isinstance(body.get("wecom_userid"), str):
            await conn.send(400, {"error": "account and wecom_userid are required"})
            return
        if account in self.refused:
            await conn.send(self.refused[account], {"error": "refused"})
            return
        if self.mode == MALFORMED:
            await conn.send(200, b'{"token": "abc", "expires_in": ', content_type="application/json")
            return
        token = "" if self.mode == NO_TOKEN else f"tok_{secrets.token_urlsafe(24)}"
        user = {
            "account": account,
            "name": account.split("@")[0].title(),
            "department": "R&D",
            "employee_id": f"E{abs(hash(account)) % 100000:05d}",
        }
        await conn.send(200, {"token": token, "expires_in": self.expires_in, "user": user})
