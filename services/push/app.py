"""Pushes to users, departments and tags through a bot's self-built app (自建应用): `POST /cgi-bin/message/send` with
the app's access token, from any replica, whatever the bot's WeCom mode (docs/operations.md, "Push API"); sent at
most once (direct.py). The messages appear from the app, not from the AI bot.

The access token is fetched once for every replica (`GET /cgi-bin/gettoken`, itself rate-limited by WeCom): kept in
Redis a little less long than WeCom gives it, and fetched by one process at a time while the others wait for it. A
send WeCom refuses for its token (40014 invalid, 42001 expired) was not shown: the token is fetched again, once, and
the message sent again, once. Targets WeCom does not know (`invaliduser`, `invalidparty`, `invalidtag`) make the push
`partial`, naming them; the others have it."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import httpx

from services.audit.queue import AuditQueue
from services.keys import Keys
from services.push.direct import PARTIAL, SENT, UNSENT, DirectPushes, outcome, post_once
from services.replication import Replication

logger = logging.getLogger(__name__)

TOKEN_EARLY_SECONDS = 300  # a token is fetched again this long before WeCom says it expires
TOKEN_WAIT_SECONDS = 10.0  # how long a process waits for another's fetch of the token
APP_MARKDOWN_BYTES = 2048  # what the app's message/send takes
STALE_TOKEN = (40014, 42001)  # invalid, expired: fetch a new token and send again, once
# WeCom's limits on an app's messages to one member: 30 a minute, 1,000 an hour; what goes past them is dropped
# without an error, so they are counted here (a department's or a tag's pushes as those of one member).
PER_MEMBER = ((60, 30), (3600, 1000))
_ERRORS = {
    45009: "WeCom refused it: the app's limit of messages",
    60020: "this host is not among the app's trusted IPs",
}


class TokenUnavailable(Exception):
    """The app's access token could not be had (nothing was sent)."""


@dataclass(frozen=True)
class AppTargets:
    """Who a push through the app reaches: userids (or "@all"), department ids, tag ids, each `|`-separated."""

    users: str = ""
    parties: str = ""
    tags: str = ""

    def each(self) -> list[str]:
        """Every target on its own: `user:<id>` (or `user:@all`), `party:<id>`, `tag:<id>`."""
        named = (("user", self.users), ("party", self.parties), ("tag", self.tags))
        return sorted({f"{kind}:{one}" for kind, ids in named for one in ids.split("|") if one})

    def label(self) -> str:
        """How the push's record and audit row name its targets (`user:a|b party:2 tag:3`)."""
        named = (("user", self.users), ("party", self.parties), ("tag", self.tags))
        return " ".join(f"{kind}:{ids}" for kind, ids in named if ids)


class AppPushes(DirectPushes):
    def __init__(
        self,
        bot: str,
        durable: Replication,
        keys: Keys,
        app: tuple[str, int, str],
        api_base: str,
        audit: AuditQueue | None,
        owner: str,
        http: httpx.Client,
    ):
        super().__init__(bot, durable, keys, audit, owner)
        self.corp_id, self.agent_id, self._secret = app
        self.api_base = api_base.rstrip("/")
        self.http = http

    def push(self, to: AppTargets, markdown: str, idempotency_key: str = "") -> tuple[str, dict, bool]:
        """Send `markdown` to `to` once; returns (the push's id, its status, whether it is new).

        Raises:
            OverQuota: a target had WeCom's limit of the app's messages (nothing sent; the key stays free).
            redis.RedisError: Redis did not answer (nothing sent; a retry with the key is safe).
        """
        body = {"touser": to.users, "toparty": to.parties, "totag": to.tags, "msgtype": "markdown"}
        body |= {"agentid": self.agent_id, "markdown": {"content": markdown}}

        def send() -> tuple[str, str]:
            try:
                return self._send(body)
            except TokenUnavailable as exc:  # (nothing went out: a repeat with the key sends it)
                return UNSENT, str(exc)

        sends = [self.keys.app_sends(self.corp_id, self.agent_id, one) for one in to.each()]
        return self.once(idempotency_key, to.label(), sends, PER_MEMBER, send, (markdown, "markdown"))

    def _send(self, body: dict) -> tuple[str, str]:
        url = f"{self.api_base}/cgi-bin/message/send"
        token = self._token()
        reply, lost = post_once(self.http, url, body, {"access_token": token})
        if reply is not None and int(reply.get("errcode", -1)) in STALE_TOKEN:
            logger.info("WeCom refused the app's access token (errcode %s); fetching a new one", reply["errcode"])
            reply, lost = post_once(self.http, url, body, {"access_token": self._token(stale=token)})
        status, error = outcome(reply, lost, _ERRORS)
        if status != SENT:
            return status, error
        unknown = [f"{kind} {reply[field]}" for kind, field in _INVALID if reply.get(field)]
        return (PARTIAL, "WeCom does not know " + ", ".join(unknown)) if unknown else (SENT, "")

    def _token(self, stale: str = "") -> str:
        """The app's access token: the one every replica shares, or (none, or it is `stale`) a new one, fetched by
        one process at a time while the others wait for it.

        Raises:
            TokenUnavailable: WeCom did not give one (it refused the app's secret, or could not be reached).
            redis.RedisError: Redis did not answer.
        """
        key = self.keys.app_token(self.corp_id, self.agent_id)
        lock = self.keys.app_token_fetch(self.corp_id, self.agent_id)
        deadline = time.monotonic() + TOKEN_WAIT_SECONDS
        while True:
            current = self.client.get(key)
            if current and current != stale:
                return current
            if self.client.set(lock, self.owner, nx=True, ex=int(TOKEN_WAIT_SECONDS)):
                try:
                    current = self.client.get(key)
                    if current and current != stale:
                        return current
                    token, lifetime = self._fetch()
                    self.client.set(key, token, ex=max(60, lifetime - TOKEN_EARLY_SECONDS))
                    return token
                finally:
                    self.client.delete(lock)
            if time.monotonic() > deadline:
                raise TokenUnavailable("another replica's fetch of the app's access token did not finish")
            time.sleep(0.05)

    def _fetch(self) -> tuple[str, int]:
        params = {"corpid": self.corp_id, "corpsecret": self._secret}
        try:
            reply = self.http.get(f"{self.api_base}/cgi-bin/gettoken", params=params, timeout=10)
            found = reply.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise TokenUnavailable(
                f"WeCom could not be reached for the app's access token ({type(exc).__name__})"
            ) from None
        if not isinstance(found, dict) or found.get("errcode") or not found.get("access_token"):
            errcode = found.get("errcode") if isinstance(found, dict) else "?"
            raise TokenUnavailable(f"WeCom gave the app no access token (errcode {errcode})")
        logger.info("fetched the app's access token (%s s)", found.get("expires_in"))
        return str(found["access_token"]), int(found.get("expires_in") or 7200)


_INVALID = (("users", "invaliduser"), ("departments", "invalidparty"), ("tags", "invalidtag"))
