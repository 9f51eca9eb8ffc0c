"""Pushes to a bot's group robots (群机器人): `POST <webhook URL>` with a text (its `mentioned_list` too) or markdown
message, from any replica, whatever the bot's WeCom mode (docs/operations.md, "Push API"); sent at most once
(direct.py). WeCom takes 20 messages a minute per robot: the sends of the last minute are counted in Redis, across
replicas, and a push past them is refused with when to try again (429 at the API), before it goes out. A webhook's
URL holds its key, the whole credential: only its name is logged, recorded and audited (`webhook:<name>`)."""

from __future__ import annotations

from dataclasses import dataclass

import httpx

from services.audit.queue import AuditQueue
from services.keys import Keys
from services.push.direct import DirectPushes, outcome, post_once
from services.replication import Replication

PER_MINUTE = 20  # WeCom's limit per group robot
WEBHOOK_TEXT_BYTES, WEBHOOK_MARKDOWN_BYTES = 2048, 4096  # what a group robot takes
_ERRORS = {
    45009: "WeCom refused it: the robot's limit of messages a minute",
    93000: "the webhook is invalid or removed",
}


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


class WebhookPushes(DirectPushes):
    """One bot's webhooks (`urls`: name -> URL)."""

    def __init__(
        self,
        bot: str,
        durable: Replication,
        keys: Keys,
        urls: dict[str, str],
        audit: AuditQueue | None,
        owner: str,
        http: httpx.Client,
    ):
        super().__init__(bot, durable, keys, audit, owner)
        self.urls = urls
        self.http = http

    def push(self, name: str, message: WebhookMessage, idempotency_key: str = "") -> tuple[str, dict, bool]:
        """Send `message` to the webhook `name` once; returns (the push's id, its status, whether it is new).

        Raises:
            KeyError: the bot has no webhook of that name.
            OverQuota: the webhook had its messages of the minute (nothing sent; the key stays free).
            redis.RedisError: Redis did not answer (nothing sent; a retry with the key is safe).
        """
        url = self.urls[name]

        def send() -> tuple[str, str]:
            reply, lost = post_once(self.http, url, message.body())
            return outcome(reply, lost, _ERRORS)

        sends, shown = [self.keys.webhook_sends(name)], (message.content, "markdown" if message.markdown else "text")
        return self.once(idempotency_key, f"webhook:{name}", sends, ((60, PER_MINUTE),), send, shown)
