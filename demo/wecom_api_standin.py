"""WeCom's HTTP APIs for proactive messages, as a stand-in over real HTTP (the tests' and the demo's
`WECOM_API_BASE`):

- the group robot's webhook, `POST /cgi-bin/webhook/send?key=<key>`, which takes a text (with `mentioned_list`) or
  markdown message and answers `{"errcode": 0, "errmsg": "ok"}`; 93000 for a key it does not know, 45009 past 20
  messages a minute per robot (as WeCom counts them), and on demand a given errcode;
- the self-built app: `GET /cgi-bin/gettoken?corpid=&corpsecret=` (an access token, 7200 s; 40001 for a wrong
  secret) and `POST /cgi-bin/message/send?access_token=` (42001 for a token it expired, 40014 for one it never gave;
  `invaliduser`, `invalidparty`, `invalidtag` for the targets it was told not to know);
- the app's 30 messages a minute to one member, past which WeCom drops a member's copy without an error (kept in
  `app_dropped` as (userid, message));
- on demand, a reply lost after a message was taken (its connection cut: the sender cannot know it arrived)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from demo.http_server import Conn, Request, StandInServer

INVALID_WEBHOOK, OVER_LIMIT = 93000, 45009
BAD_SECRET, INVALID_TOKEN, EXPIRED_TOKEN = 40001, 40014, 42001
PER_MINUTE = 20  # messages a group robot takes a minute
APP_PER_MEMBER_MINUTE = 30  # an app's messages one member gets a minute (the rest dropped, without an error)


@dataclass(frozen=True)
class Sent:
    key: str
    body: dict
    at: float


class WeComApiStandIn:
    """`keys`: the webhook keys it knows. `sent` keeps every message it took, in order."""

    def __init__(
        self, keys: tuple[str, ...] = (), app: tuple[str, str] = ("", ""), host: str = "127.0.0.1", port: int = 0
    ):
        self.keys = set(keys)
        self.app = app  # the self-built app's (corp id, secret)
        self.tokens: list[str] = []  # the access tokens given, the last one valid
        self.token_fetches = 0
        self.app_sent: list[dict] = []  # the app's messages taken, in order
        self.app_dropped: list[tuple[str, dict]] = []  # (userid, message): a member's copies over WeCom's limit
        self._app_got: list[tuple[str, float]] = []  # (userid, when) of every copy a member got
        self.unknown_targets: set[str] = set()  # users, departments and tags the app's sends report as invalid
        self.sent: list[Sent] = []
        self.errcodes: dict[str, int] = {}  # key -> the errcode every message to it gets
        self.lose_replies = 0  # the next messages taken whose replies are lost (their connection cut)
        self.server = StandInServer(self.handle, host, port)
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return self.server.url

    def start(self) -> WeComApiStandIn:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop()

    def webhook_url(self, key: str) -> str:
        """The URL a group's "add robot" gives, on this stand-in."""
        return f"{self.url}/cgi-bin/webhook/send?key={key}"

    def to(self, key: str) -> list[dict]:
        """The messages a webhook took, in order."""
        with self._lock:
            return [sent.body for sent in self.sent if sent.key == key]

    def expire_token(self) -> None:
        """The access token given last expires (its next use gets 42001); the next gettoken gives a new one."""
        with self._lock:
            self.tokens.append("")

    async def handle(self, request: Request, conn: Conn) -> None:
        if request.path == "/cgi-bin/gettoken":
            await conn.send(200, self._token(request.query))
            return
        if request.method == "POST" and request.path == "/cgi-bin/message/send":
            await self._app_send(request, conn)
            return
        if request.method != "POST" or request.path != "/cgi-bin/webhook/send":
            await conn.send(404, {"errcode": 404, "errmsg": "not found"})
            return
        key = request.query.get("key", "")
        body = request.json() or {}
        with self._lock:
            errcode = self._errcode(key)
            if not errcode:
                self.sent.append(Sent(key, body, time.time()))
                if self.lose_replies > 0:
                    self.lose_replies -= 1
                    conn.abort()  # taken, and its reply lost with its connection
                    return
        await conn.send(200, {"errcode": errcode, "errmsg": "ok" if not errcode else "refused"})

    def _token(self, query: dict) -> dict:
        with self._lock:
            if (query.get("corpid", ""), query.get("corpsecret", "")) != self.app:
                return {"errcode": BAD_SECRET, "errmsg": "invalid credential"}
            self.token_fetches += 1
            self.tokens.append(f"token-{len(self.tokens)}-{time.monotonic_ns()}")
            return {"errcode": 0, "errmsg": "ok", "access_token": self.tokens[-1], "expires_in": 7200}

    async def _app_send(self, request: Request, conn: Conn) -> None:
        token, body = request.query.get("access_token", ""), request.json() or {}
        with self._lock:
            if not token or token not in self.tokens:
                reply = {"errcode": INVALID_TOKEN, "errmsg": "invalid access_token"}
            elif token != self.tokens[-1]:
                reply = {"errcode": EXPIRED_TOKEN, "errmsg": "access_token expired"}
            else:
                self.app_sent.append(body)
                self._deliver_to_members(body)
                reply = {"errcode": 0, "errmsg": "ok", "msgid": f"m{len(self.app_sent)}"}
                for field, prefix in (("touser", "invaliduser"), ("toparty", "invalidparty"), ("totag", "invalidtag")):
                    unknown = [t for t in str(body.get(field, "")).split("|") if t and t in self.unknown_targets]
                    if unknown:
                        reply[prefix] = "|".join(unknown)
                if self.lose_replies > 0:
                    self.lose_replies -= 1
                    conn.abort()
                    return
        await conn.send(200, reply)

    def _deliver_to_members(self, body: dict) -> None:
        now = time.time()
        for user in str(body.get("touser", "")).split("|"):
            if not user or user == "@all":
                continue
            if sum(1 for got, at in self._app_got if got == user and now - at < 60) >= APP_PER_MEMBER_MINUTE:
                self.app_dropped.append((user, body))
            else:
                self._app_got.append((user, now))

    def _errcode(self, key: str) -> int:
        if key not in self.keys:
            return INVALID_WEBHOOK
        if key in self.errcodes:
            return self.errcodes[key]
        now = time.time()
        if sum(1 for sent in self.sent if sent.key == key and now - sent.at < 60) >= PER_MINUTE:
            return OVER_LIMIT
        return 0
