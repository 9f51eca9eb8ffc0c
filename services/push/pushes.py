"""One long-connection bot's pushes: accepted once per Idempotency-Key (a day), within WeCom's limits for the chat,
kept as a finished stream of their own tracked in the bot's open set, and sent once by the outbox of whichever
process holds the connection (services/longconn/orphans.py), whose marker says what became of them.
docs/architecture.md, "Long-connection mode" ("Pushes").
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import redis

from services import metrics
from services.keys import OUTBOX_TRACKED_TTL_SECONDS, SENT_TTL_SECONDS, Keys
from services.longconn.outbox import SENT as MARKED_SENT
from services.longconn.outbox import Outbox
from services.longconn.pacing import ChatWindow
from services.streams.record import F
from services.streams.service import new_stream_id
from services.streams.store import StreamStore

logger = logging.getLogger(__name__)

QUEUED, SENT, FAILED = "queued", "sent", "failed"


class OverQuota(Exception):
    """The chat has had WeCom's limit of messages: try again in `retry_after` seconds."""

    def __init__(self, retry_after: int):
        super().__init__(f"over the chat's limit; retry in {retry_after}s")
        self.retry_after = retry_after


@dataclass(frozen=True)
class Target:
    """Where a push goes: a group chat, or a user's 1:1 chat (its chatid is the userid)."""

    chat: str
    single: bool


@dataclass(eq=False)
class BotPushes:
    bot: str
    client: redis.Redis
    keys: Keys
    store: StreamStore
    outbox: Outbox
    quota: ChatWindow  # the pushes accepted per chat, against WeCom's limits
    owner: str

    def push(self, target: Target, markdown: str, idempotency_key: str = "") -> tuple[str, bool]:
        """Accept a push; returns (its id, whether it is new). A repeated Idempotency-Key gives the first id.

        Raises:
            OverQuota: the chat had its limit of pushes (nothing accepted; the key stays free).
            redis.RedisError: Redis did not answer (the caller answers 503; a retry with the key is safe).
        """
        push_id = new_stream_id()
        key = self.keys.push_idempotency(idempotency_key) if idempotency_key else ""
        if key and not self.client.set(key, push_id, nx=True, ex=SENT_TTL_SECONDS):
            earlier = self.client.get(key)
            if earlier:
                self._make_again_if_lost(earlier, target, markdown)
                return earlier, False
        wait = self.quota.take(target.chat, push_id)
        if wait:
            if key:
                self.client.delete(key)
            metrics.PUSHES.labels(self.bot, "refused_quota").inc()
            raise OverQuota(wait)
        self._make(push_id, target, markdown)
        metrics.PUSHES.labels(self.bot, "accepted").inc()
        logger.info("push %s accepted for a %s chat", push_id, "1:1" if target.single else "group")
        return push_id, True

    def status(self, push_id: str) -> dict | None:
        """{"status": queued | sent | failed, "error"?}; None for a push this bot does not know."""
        marker = self.outbox.marker(push_id)
        if marker and marker.partition(" ")[0] == MARKED_SENT:  # `sent`, or `sent <settling>`
            return {"status": SENT}
        if marker and marker.startswith("failed"):
            errcode = marker.partition(" ")[2]
            return {"status": FAILED, "error": f"WeCom refused the message (errcode {errcode})"}
        meta = self.store.reads.meta(push_id)
        if not meta.get(F.push):
            return None
        if time.time() - float(meta.get(F.created_at) or 0) > OUTBOX_TRACKED_TTL_SECONDS:
            return {"status": FAILED, "error": "no connection to WeCom could send it in time"}
        return {"status": QUEUED}

    def _make(self, push_id: str, target: Target, markdown: str) -> None:
        """The push as a finished stream of its own, kept a day, tracked for the outbox (each step may be done
        again)."""
        fields = {"msgid": f"push:{push_id}", "push": "1"}  # a push is one row of the audit trail (kind push)
        fields |= {"userid": target.chat, "chattype": "single"} if target.single else {"chatid": target.chat}
        self.outbox.post(
            push_id, self.owner, markdown, target.chat, target.single, fields, keep_seconds=SENT_TTL_SECONDS
        )

    def _make_again_if_lost(self, push_id: str, target: Target, markdown: str) -> None:
        """A request with this key died before its push was tracked (or its reply was lost): make what is missing,
        under the same id, unless it is known already."""
        if self.outbox.posted(push_id):
            return
        logger.warning("push %s was accepted but not made whole; making it now", push_id)
        self._make(push_id, target, markdown)
