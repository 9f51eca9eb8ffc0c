"""Pushes to a bot's group robots (群机器人): `POST <webhook URL>` with a text (its `mentioned_list` too) or markdown
message, from any replica, whatever the bot's WeCom mode (docs/operations.md, "Push API").

Each push is sent at most once: its id is taken with its Idempotency-Key before anything goes out, a push that
reached WeCom is never sent again, and one whose reply was lost (its connection cut after the message went out) is
`unknown`, not tried again: WeCom may have shown it. WeCom takes 20 messages a minute per robot: the sends of the
last minute are counted in Redis, across replicas, and a push past them is refused with when to try again (429 at
the API), before it goes out. A webhook's URL holds its key, the whole credential: only its name is logged, kept
in the push's record and in its audit row (`webhook:<name>`)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import httpx
import redis

from services import metrics
from services.audit.queue import AuditQueue
from services.audit.rows import AuditRow
from services.keys import SENT_TTL_SECONDS, Keys
from services.lua import LuaScript
from services.streams.life import PUSH
from services.streams.service import new_stream_id

logger = logging.getLogger(__name__)

PER_MINUTE = 20  # WeCom's limit per group robot
SEND_TIMEOUT = 10.0
SENDING, SENT, FAILED, UNKNOWN = "sending", "sent", "failed", "unknown"
_ERRORS = {
    45009: "WeCom refused it: the robot's limit of messages a minute",
    93000: "the webhook is invalid or removed",
}

# KEYS: the webhook's sends of the last minute. ARGV: the push id, now, the limit. Takes a place for the push (0), or
# says how many seconds until one frees (the oldest send of the minute is a minute old).
_TAKE_PLACE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', tonumber(ARGV[2]) - 60)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return math.max(1, math.ceil(tonumber(oldest[2]) + 60 - tonumber(ARGV[2])))
end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('EXPIRE', KEYS[1], 61)
return 0
"""


class OverLimit(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"over the webhook's limit; retry after {retry_after} s")
        self.retry_after = retry_after


@dataclass(frozen=True)
class WebhookMessage:
    """What a push says: markdown, or text with the users it mentions (userids, or "@all")."""

    content: str
    markdown: bool
    mentions: tuple[str, ...] = ()

    def body(self) -> dict:
        if self.markdown:
            return {"msgtype": "markdown", "markdown": {"content": self.content}}
        text = {"content": self.content, **({"mentioned_list": list(self.mentions)} if self.mentions else {})}
        return {"msgtype": "text", "text": text}


class WebhookPushes:
    """One bot's webhooks (`urls`: name -> URL, moved to `api_base` when it is WeCom's own)."""

    def __init__(
        self,
        bot: str,
        client: redis.Redis,
        keys: Keys,
        urls: dict[str, str],
        audit: AuditQueue | None,
        owner: str,
        http: httpx.Client,
    ):
        self.bot = bot
        self.client = client
        self.keys = keys
        self.urls = urls
        self.audit = audit
        self.owner = owner
        self.http = http
        self._take_place = LuaScript(client, _TAKE_PLACE)

    def push(self, name: str, message: WebhookMessage, idempotency_key: str = "") -> tuple[str, dict, bool]:
        """Send `message` to the webhook `name` once; returns (the push's id, its status, whether it is new). A
        repeated Idempotency-Key gives the first push's id and status, and sends nothing.

        Raises:
            KeyError: the bot has no webhook of that name.
            OverLimit: the webhook had its messages of the minute (nothing sent; the key stays free).
            redis.RedisError: Redis did not answer (nothing sent; a retry with the key is safe).
        """
        url = self.urls[name]
        push_id = new_stream_id()
        key = self.keys.push_idempotency(idempotency_key) if idempotency_key else ""
        if key and not self.client.set(key, push_id, nx=True, ex=SENT_TTL_SECONDS):
            earlier = self.client.get(key)
            if earlier:
                return earlier, self.status(earlier) or {"status": UNKNOWN}, False
        wait = int(self._take_place([self.keys.webhook_sends(name)], [push_id, f"{time.time():.3f}", PER_MINUTE]))
        if wait:
            if key:
                self.client.delete(key)
            metrics.PUSHES.labels(self.bot, "refused_quota").inc()
            raise OverLimit(wait)
        record = self.keys.webhook_push(push_id)
        target = f"webhook:{name}"
        self.client.hset(record, mapping={"target": target, "status": SENDING, "created_at": f"{time.time():.3f}"})
        self.client.expire(record, SENT_TTL_SECONDS)
        status, error = self._send(url, message)
        self.client.hset(record, mapping={"status": status, "error": error})
        metrics.PUSHES.labels(self.bot, status).inc()
        logger.info("push %s to %s: %s%s", push_id, target, status, f" ({error})" if error else "")
        self._record(push_id, target, message, status)
        return push_id, {"status": status, **({"error": error} if error else {})}, True

    def status(self, push_id: str) -> dict | None:
        """{"status": sending | sent | failed | unknown, "error"?}; None for a push this bot's webhooks did not have."""
        found = self.client.hgetall(self.keys.webhook_push(push_id))
        if not found:
            return None
        return {"status": found["status"], **({"error": found["error"]} if found.get("error") else {})}

    def _send(self, url: str, message: WebhookMessage) -> tuple[str, str]:
        """POST the message once: (status, error). Nothing is tried again: a message whose reply was lost may be
        shown already."""
        try:
            reply = self.http.post(url, json=message.body(), timeout=SEND_TIMEOUT)
        except httpx.ConnectError:  # never reached WeCom
            return FAILED, "WeCom could not be reached"
        except httpx.HTTPError:  # sent, and its reply lost: WeCom may show it, so it is not sent again
            return UNKNOWN, "the reply was lost: WeCom may have shown it, and it is not sent again"
        try:
            errcode = int(reply.json().get("errcode", -1)) if reply.status_code == 200 else -1
        except ValueError:
            errcode = -1
        if errcode == 0:
            return SENT, ""
        if errcode == -1:
            return FAILED, f"WeCom answered HTTP {reply.status_code}"
        return FAILED, _ERRORS.get(errcode, f"WeCom refused it (errcode {errcode})")

    def _record(self, push_id: str, target: str, message: WebhookMessage, status: str) -> None:
        if self.audit is None:
            return
        now = time.time()
        row = AuditRow(
            self.bot,
            f"push:{push_id}",
            PUSH,
            status,
            now,
            now,
            chatid=target,
            msgtype="markdown" if message.markdown else "text",
            answer=message.content,
            replica=self.owner,
        )
        self.audit.replied(row)
