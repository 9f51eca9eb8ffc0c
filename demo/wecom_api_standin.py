"""WeCom's HTTP APIs for proactive messages, as a stand-in over real HTTP (the tests' and the demo's
`WECOM_API_BASE`): the group robot's webhook, `POST /cgi-bin/webhook/send?key=<key>`, which takes a text (with
`mentioned_list`) or markdown message and answers `{"errcode": 0, "errmsg": "ok"}`; 93000 for a key it does not
know, 45009 past 20 messages a minute per robot (as WeCom counts them), and on demand a given errcode, or a reply
lost after the message was taken (its connection cut: the sender cannot know it arrived)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from demo.http_server import Conn, Request, StandInServer

INVALID_WEBHOOK, OVER_LIMIT = 93000, 45009
PER_MINUTE = 20  # messages a group robot takes a minute


@dataclass(frozen=True)
class Sent:
    key: str
    body: dict
    at: float


class WeComApiStandIn:
    """`keys`: the webhook keys it knows. `sent` keeps every message it took, in order."""

    def __init__(self, keys: tuple[str, ...] = (), host: str = "127.0.0.1", port: int = 0):
        self.keys = set(keys)
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

    async def handle(self, request: Request, conn: Conn) -> None:
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

    def _errcode(self, key: str) -> int:
        if key not in self.keys:
            return INVALID_WEBHOOK
        if key in self.errcodes:
            return self.errcodes[key]
        now = time.time()
        if sum(1 for sent in self.sent if sent.key == key and now - sent.at < 60) >= PER_MINUTE:
            return OVER_LIMIT
        return 0
