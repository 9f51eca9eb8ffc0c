"""What every push over WeCom's HTTP APIs shares (a group robot's webhook: webhooks.py; the self-built app: app.py):
sent at most once, and said so. A push's id is taken with its Idempotency-Key before anything goes out (a repeat
gets the first id and status and sends nothing); its record in Redis says what became of it, read by any replica
(`GET /api/push/<id>`); a send whose reply was lost is `unknown`, never tried again (WeCom may show it). A push that
failed before anything went out (WeCom could not be reached, or gave no access token) says so (`sent_nothing`), and
a repeat with its Idempotency-Key sends it, under its first id, once. Each push is one audit row of kind `push`,
whose `chatid` names its targets (never a URL or a secret) and whose `outcome` is its status."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial

import httpx
import redis

from services import metrics
from services.audit.queue import AuditQueue
from services.audit.rows import ANY, AuditRow
from services.keys import SENT_TTL_SECONDS, Keys
from services.lua import LuaScript
from services.outage import best_effort
from services.push.pushes import OverQuota
from services.redis_conn import REDIS_FAILURES
from services.replication import PUSH_CLAIM, PUSH_OPEN, Replication, raise_first_error
from services.streams.life import PUSH
from services.streams.service import new_stream_id

logger = logging.getLogger(__name__)

SEND_TIMEOUT = 10.0
SENDING, SENT, PARTIAL, FAILED, UNKNOWN = "sending", "sent", "partial", "failed", "unknown"
# What a send says of a push that failed before anything went out: recorded as `failed` with `sent_nothing`, and sent
# by a repeat with its Idempotency-Key.
UNSENT = "unsent"
UNREACHED = "WeCom could not be reached"
LOST_REPLY = "the reply was lost: WeCom may have shown it, and it is not sent again"
# A push still `sending` this long after it opened outlived every send its process could make (the app's: a token
# fetched, a send, the send again with a new token): that process stopped mid-send, and the push reads `unknown`.
SENDING_STALE_SECONDS = 4 * SEND_TIMEOUT
# KEYS: the push's record. ARGV: the opener (this request), the target, now, the record's TTL. 1 if this request
# opened the push (also when it runs again, its first reply lost with a dropped connection, and when its last send
# sent nothing), 0 if another did.
_OPEN = """
if redis.call('HSETNX', KEYS[1], 'status', 'sending') == 0 then
  local found = redis.call('HMGET', KEYS[1], 'opener', 'sent_nothing')
  if found[1] == ARGV[1] then return 1 end
  if found[2] ~= '1' then return 0 end
  redis.call('HDEL', KEYS[1], 'sent_nothing', 'error')
  redis.call('HSET', KEYS[1], 'status', 'sending')
end
redis.call('HSET', KEYS[1], 'opener', ARGV[1], 'target', ARGV[2], 'created_at', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 1
"""
# KEYS: the push's record. ARGV: the opener. Forgets an opening this request made and then did not send.
_UNDO_OPENING = """
if redis.call('HGET', KEYS[1], 'opener') == ARGV[1] and redis.call('HGET', KEYS[1], 'status') == 'sending' then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
STOPPED_MID_SEND = "the process sending it stopped: WeCom may have shown it, and it is not sent again"
UNSENT_OPENINGS_KEPT = 1000  # the openings not undone that a process keeps for its retries (a Redis outage's)
# KEYS: the recent sends of each target (sorted sets, score: when). ARGV: the push id, now, then pairs of (a window
# in seconds, the sends WeCom takes in it). Takes a place for the push in every set (0), or says how many seconds
# until every set has one free (a set's oldest send within a full window leaves it then).
_TAKE_PLACES = """
local now, longest, wait = tonumber(ARGV[2]), 0, 0
for i = 3, #ARGV, 2 do longest = math.max(longest, tonumber(ARGV[i])) end
for _, key in ipairs(KEYS) do
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - longest)
  for i = 3, #ARGV, 2 do
    local window = tonumber(ARGV[i])
    if redis.call('ZCOUNT', key, now - window, '+inf') >= tonumber(ARGV[i + 1]) then
      local oldest = redis.call('ZRANGEBYSCORE', key, now - window, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
      wait = math.max(wait, 1, math.ceil(tonumber(oldest[2]) + window - now))
    end
  end
end
if wait > 0 then return wait end
for _, key in ipairs(KEYS) do
  redis.call('ZADD', key, ARGV[2], ARGV[1])
  redis.call('EXPIRE', key, longest + 1)
end
return 0
"""


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
        self._undo_opening = LuaScript(self.client, _UNDO_OPENING)
        self._take_places = LuaScript(self.client, _TAKE_PLACES)
        # push id -> the opener of an opening this process made, did not send, and could not undo (Redis away): its
        # record reads `sending`, so only a retry here, which knows that nothing went out, opens it again as its own
        self._unsent_openings: dict[str, str] = {}

    def status(self, push_id: str) -> dict | None:
        """{"status", "error"?}; None for a push this bot did not make this way (or more than a day ago)."""
        found = self.client.hgetall(self.keys.direct_push(push_id))
        if not found:
            return None
        if found["status"] == SENDING and time.time() - float(found.get("created_at") or 0) > SENDING_STALE_SECONDS:
            return {"status": UNKNOWN, "error": STOPPED_MID_SEND}
        return _said(found["status"], found.get("error", ""), found.get("sent_nothing") == "1")

    def claim(self, idempotency_key: str) -> tuple[str, dict | None]:
        """A push's id, and None; or (a repeated Idempotency-Key whose push went out, or is going out) the first
        push's id and its status. A repeat whose first request never opened its push (it failed before: Redis away)
        gets the first id and None, and one whose push sent nothing its status: this request sends it (`opened`
        decides, should both try at once).

        Raises:
            redis.RedisError: Redis did not answer (nothing sent).
        """
        push_id = new_stream_id()
        if not idempotency_key:
            return push_id, None
        key = self.keys.push_idempotency(idempotency_key)
        replies = self.durable.execute(key, [("SET", key, push_id, "NX", "GET", "EX", SENT_TTL_SECONDS)], PUSH_CLAIM)
        raise_first_error(replies)
        earlier = replies[0]  # (the key's push before this call; this one's own when a dropped connection re-ran it)
        if earlier and earlier != push_id:
            return earlier, self.status(earlier)
        return push_id, None

    def release(self, idempotency_key: str) -> None:
        """A claimed push that was refused before it went out: its Idempotency-Key is free again."""
        if idempotency_key:
            self.client.delete(self.keys.push_idempotency(idempotency_key))

    def once(
        self, key: str, target: str, sends: list[str], limits: tuple, send: Callable[[], tuple[str, str]], shown: tuple
    ) -> tuple[str, dict, bool]:
        """A push made at most once: its Idempotency-Key `key` claimed, a place taken among its targets' recent
        `sends` under WeCom's `limits`, the push opened, then `send()` (its status and error), its places counted
        from the reply, and the push closed; `shown` is (its content, its msgtype) for the record and the audit.
        Returns (the push's id, its status, whether it is new).

        Raises:
            OverQuota: a target had its sends of a window (nothing sent; the key stays free).
            redis.RedisError: Redis did not answer (nothing sent; a retry with the key is safe).
        """
        push_id, earlier = self.claim(key)
        again = earlier is not None and bool(earlier.get("sent_nothing"))
        if earlier is not None and not again and push_id not in self._unsent_openings:
            return push_id, earlier, False
        self._take_places_or_refuse(sends, push_id, key, limits)
        if not self.opened(push_id, target):
            return push_id, self.status(push_id) or {"status": SENDING}, False
        status, error = send()
        # (it went out, or may have: Redis away now must not keep it from its status and its audit row; its places,
        # not counted from the reply, count from its claim)
        counting = partial(self._counted_from_now, sends, push_id)
        best_effort(counting, f"counting push {push_id}'s sends from its reply", delays=(0.5,))
        return push_id, self.closed(push_id, target, (status, error), shown, again=again), True

    def _take_places_or_refuse(self, sends: list[str], push_id: str, idempotency_key: str, limits: tuple) -> None:
        """A place for the push among each target's recent sends (`sends`, sorted sets of one Cluster slot), under
        WeCom's `limits` ((window seconds, sends), ...), counted across replicas before it goes out.

        Raises:
            OverQuota: a target had its sends of a window (nothing sent; the Idempotency-Key is free again).
            redis.RedisError: Redis did not answer (nothing sent).
        """
        limits_argv = [number for limit in limits for number in limit]
        wait = int(self._take_places(sends, [push_id, f"{time.time():.3f}", *limits_argv]))
        if wait:
            self.release(idempotency_key)
            metrics.PUSHES.labels(self.bot, "refused_quota").inc()
            raise OverQuota(wait)

    def _counted_from_now(self, sends: list[str], push_id: str) -> None:
        """The push's places count from its reply on: WeCom took it at some moment before, so a window from the reply
        is a window from WeCom's count too (counted from the claim, a slow send let another in within WeCom's)."""
        with self.client.pipeline(transaction=False) as pipe:
            for key in sends:
                pipe.zadd(key, {push_id: f"{time.time():.3f}"}, xx=True)
            pipe.execute()

    def opened(self, push_id: str, target: str) -> bool:
        """The push is about to go out: True if this request opened it (from now on, it is never sent again); False
        if another request with its key opened it first.

        Raises:
            redis.RedisError: Redis did not answer (nothing sent). The opening may have been written all the same
                (its reply lost): it is undone where Redis answers again at once, so that a retry with the key sends
                the push rather than find it `sending` until it reads `unknown`; where Redis is away for the undo
                too, a retry in this process opens it again with the same opener (a scheduled tick's, which this
                process goes on pushing), and one elsewhere finds it `sending`, then `unknown`.
        """
        record = self.keys.direct_push(push_id)
        opener = self._unsent_openings.pop(push_id, "") or new_stream_id()  # (popped: one retry takes it)
        opening = ("EVAL", _OPEN, 1, record, opener, target, f"{time.time():.3f}", SENT_TTL_SECONDS)
        try:
            replies = self.durable.execute(record, [opening], PUSH_OPEN)
            raise_first_error(replies)
        except REDIS_FAILURES:
            try:
                self._undo_opening([record], [opener])
            except REDIS_FAILURES:
                logger.warning("push %s: its opening could not be undone (Redis away): a retry here sends it", push_id)
                if len(self._unsent_openings) < UNSENT_OPENINGS_KEPT:
                    self._unsent_openings[push_id] = opener
            raise
        return bool(replies[0])

    def closed(self, push_id: str, target: str, said: tuple[str, str], shown: tuple, again: bool = False) -> dict:
        """What became of the push (`said`: its status and error; `shown`: its content and msgtype): recorded,
        counted, logged and audited (`again`: sent again after a try that sent nothing, whose row this one replaces);
        returns its status for the API."""
        (status, error), (content, msgtype) = said, shown
        sent_nothing, status = status == UNSENT, FAILED if status == UNSENT else status
        record = {"status": status, "error": error, **({"sent_nothing": "1"} if sent_nothing else {})}
        # (not recorded, it reads `unknown` once its sending is old: never sent again)
        recording = partial(self.client.hset, self.keys.direct_push(push_id), mapping=record)
        best_effort(recording, f"recording push {push_id}'s status")
        metrics.PUSHES.labels(self.bot, status).inc()
        logger.info("push %s to %s: %s%s", push_id, target, status, f" ({error})" if error else "")
        if self.audit is not None:
            now = time.time()
            row = AuditRow(
                self.bot, f"push:{push_id}", PUSH, status, now, now, chatid=target, msgtype=msgtype, answer=content
            )
            row = replace(row, supersedes=ANY) if again else row
            self.audit.replied(row)
        return _said(status, error, sent_nothing)


def _said(status: str, error: str, sent_nothing: bool) -> dict:
    """A push's status as the API says it."""
    return {"status": status, **({"error": error} if error else {}), **({"sent_nothing": True} if sent_nothing else {})}


def outcome(reply: dict | None, lost: str, errors: dict[int, str]) -> tuple[str, str]:
    """A push's status and error from `post_once`'s answer: sent, or failed with WeCom's refusal said in `errors`'
    words (or its errcode), or, with no reply, `lost` (unsent: never reached WeCom; unknown: its reply was lost)."""
    if reply is None:
        return lost, LOST_REPLY if lost == UNKNOWN else UNREACHED
    errcode = int(reply.get("errcode", -1))
    if errcode == 0:
        return SENT, ""
    if errcode == -1:
        return FAILED, f"WeCom answered HTTP {reply.get('http', '?')}"
    return FAILED, errors.get(errcode, f"WeCom refused it (errcode {errcode})")


def post_once(http: httpx.Client, url: str, body: dict, params: dict | None = None) -> tuple[dict | None, str]:
    """POST `body` once: (WeCom's reply, "") or (None, the push's status: unsent when it never reached WeCom,
    unknown when its reply was lost). Nothing is tried again."""
    try:
        reply = http.post(url, json=body, params=params, timeout=SEND_TIMEOUT)
    except (httpx.ConnectError, httpx.ConnectTimeout):  # (no connection: nothing of it went out)
        return None, UNSENT
    except httpx.HTTPError:
        return None, UNKNOWN
    try:
        found = reply.json() if reply.status_code == 200 else None
    except ValueError:
        found = None
    return (found, "") if isinstance(found, dict) else ({"errcode": -1, "http": reply.status_code}, "")
