"""What every push over WeCom's HTTP APIs shares (a group robot's webhook: webhooks.py; the self-built app: app.py):
sent at most once, and said so. A push's id is taken with its Idempotency-Key before anything goes out (a repeat
gets the first id and status and sends nothing); its record in Redis says what became of it, read by any replica
(`GET /api/push/<id>`); a send whose reply was lost is `unknown`, never tried again (WeCom may show it). Each push
is one audit row of kind `push`, whose `chatid` names its targets (never a URL or a secret) and whose `outcome` is
its status."""

from __future__ import annotations

import logging
import time

import httpx
import redis

from services import metrics
from services.audit.queue import AuditQueue
from services.audit.rows import AuditRow
from services.keys import SENT_TTL_SECONDS, Keys
from services.replication import PUSH_CLAIM, PUSH_OPEN, Replication, raise_first_error
from services.streams.life import PUSH
from services.streams.service import new_stream_id

logger = logging.getLogger(__name__)

SEND_TIMEOUT = 10.0
SENDING, SENT, PARTIAL, FAILED, UNKNOWN = "sending", "sent", "partial", "failed", "unknown"
LOST_REPLY = "the reply was lost: WeCom may have shown it, and it is not sent again"


class DirectPushes:
    """One bot's pushes over one of WeCom's HTTP APIs. A push's claim of its Idempotency-Key and its opening wait
    for a replica (`durable`, services/replication.py): a failover that lost either would let a retry send it again."""

    def __init__(self, bot: str, durable: Replication, keys: Keys, audit: AuditQueue | None, owner: str):
        self.bot = bot
        self.durable = durable
        self.client: redis.Redis = durable.client
        self.keys = keys
        self.audit = audit
        self.owner = owner

    def status(self, push_id: str) -> dict | None:
        """{"status", "error"?}; None for a push this bot did not make this way (or more than a day ago)."""
        found = self.client.hgetall(self.keys.direct_push(push_id))
        if not found:
            return None
        return {"status": found["status"], **({"error": found["error"]} if found.get("error") else {})}

    def claim(self, idempotency_key: str) -> tuple[str, dict | None]:
        """A push's id, and None; or (a repeated Idempotency-Key whose push went out, or is going out) the first
        push's id and its status. A repeat whose first request never opened its push (it failed before: Redis away)
        gets the first id and None: this request sends it (`opened` decides, should both try at once).

        Raises:
            redis.RedisError: Redis did not answer (nothing sent).
        """
        push_id = new_stream_id()
        if not idempotency_key:
            return push_id, None
        key = self.keys.push_idempotency(idempotency_key)
        taken, earlier = self.durable.execute(
            key, [("SET", key, push_id, "NX", "EX", SENT_TTL_SECONDS), ("GET", key)], PUSH_CLAIM
        )
        raise_first_error([taken, earlier])
        if not taken and earlier:
            return _text(earlier), self.status(_text(earlier))
        return push_id, None

    def release(self, idempotency_key: str) -> None:
        """A claimed push that was refused before it went out: its Idempotency-Key is free again."""
        if idempotency_key:
            self.client.delete(self.keys.push_idempotency(idempotency_key))

    def opened(self, push_id: str, target: str) -> bool:
        """The push is about to go out: True if this request opened it (from now on, it is never sent again); False
        if another request with its key opened it first.

        Raises:
            redis.RedisError: Redis did not answer (nothing sent).
        """
        record = self.keys.direct_push(push_id)
        replies = self.durable.execute(
            record,
            [
                ("HSETNX", record, "status", SENDING),
                ("HSETNX", record, "target", target),
                ("HSETNX", record, "created_at", f"{time.time():.3f}"),
                ("EXPIRE", record, SENT_TTL_SECONDS),
            ],
            PUSH_OPEN,
        )
        raise_first_error(replies)
        return bool(replies[0])

    def closed(self, push_id: str, target: str, status: str, error: str, content: str, msgtype: str) -> dict:
        """What became of the push: recorded, counted, logged and audited; returns its status for the API."""
        self.client.hset(self.keys.direct_push(push_id), mapping={"status": status, "error": error})
        metrics.PUSHES.labels(self.bot, status).inc()
        logger.info("push %s to %s: %s%s", push_id, target, status, f" ({error})" if error else "")
        if self.audit is not None:
            now = time.time()
            row = AuditRow(
                self.bot, f"push:{push_id}", PUSH, status, now, now, chatid=target, msgtype=msgtype, answer=content
            )
            self.audit.replied(row)
        return {"status": status, **({"error": error} if error else {})}


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def outcome(reply: dict | None, lost: str, errors: dict[int, str]) -> tuple[str, str]:
    """A push's status and error from `post_once`'s answer: sent, or failed with WeCom's refusal said in `errors`'
    words (or its errcode), or, with no reply, `lost` (failed: never reached WeCom; unknown: its reply was lost)."""
    if reply is None:
        return lost, LOST_REPLY if lost == UNKNOWN else "WeCom could not be reached"
    errcode = int(reply.get("errcode", -1))
    if errcode == 0:
        return SENT, ""
    if errcode == -1:
        return FAILED, f"WeCom answered HTTP {reply.get('http', '?')}"
    return FAILED, errors.get(errcode, f"WeCom refused it (errcode {errcode})")


def post_once(http: httpx.Client, url: str, body: dict, params: dict | None = None) -> tuple[dict | None, str]:
    """POST `body` once: (WeCom's reply, "") or (None, the push's status: failed when it never reached WeCom,
    unknown when its reply was lost). Nothing is tried again."""
    try:
        reply = http.post(url, json=body, params=params, timeout=SEND_TIMEOUT)
    except httpx.ConnectError:
        return None, FAILED
    except httpx.HTTPError:
        return None, UNKNOWN
    try:
        found = reply.json() if reply.status_code == 200 else None
    except ValueError:
        found = None
    return (found, "") if isinstance(found, dict) else ({"errcode": -1, "http": reply.status_code}, "")
