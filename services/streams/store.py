"""Stream state in Redis, shared by every replica: the hash, the Redis message list of deltas, and the owner lease.

Each operation that touches more than one key, or that reads before it writes, is one Lua script, so replicas
never race: creating a stream is atomic with the msgid dedup, only the owner may append or finish, and a poll
folds the unread deltas into the cumulative text in one round trip.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import orjson
import redis

from services.keys import FEEDBACK_TTL_SECONDS, INFLIGHT_TTL_SECONDS, MSGID_TTL_SECONDS, RATE_WINDOW_SECONDS, Keys
from services.redis_conn import HotPathConnections
from services.wecom.limits import MAX_IN_FLIGHT_PER_USER, POLL_WINDOW_SECONDS

PENDING, STREAMING, DONE, ERROR, EXPIRED = "pending", "streaming", "done", "error", "expired"
ACTIVE_STATUSES = frozenset({PENDING, STREAMING})
FINAL_STATUSES = frozenset({DONE, ERROR, EXPIRED})

# KEYS: msgid, stream, lease, inflight, rate. ARGV: stream_id, msgid_ttl, stream_ttl, lease_ms, owner, now,
# max_inflight, inflight_until, inflight_ttl, rate_limit (0 = none), rate_window, field/value pairs...
# Returns {1, id} created, {0, existing id} for a msgid seen before (a retry is never limited), {2, ''} when the
# user already has max_inflight open bubbles, {3, ''} when the user sent rate_limit messages this window.
_CREATE = """
local existing = redis.call('GET', KEYS[1])
if existing then return {0, existing} end
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', ARGV[6])
if redis.call('ZCARD', KEYS[4]) >= tonumber(ARGV[7]) then return {2, ''} end
if tonumber(ARGV[10]) > 0 then
  local sent = redis.call('INCR', KEYS[5])
  if sent == 1 then redis.call('EXPIRE', KEYS[5], ARGV[11]) end
  if sent > tonumber(ARGV[10]) then return {3, ''} end
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
redis.call('HSET', KEYS[2], 'status', 'pending', 'owner', ARGV[5], 'created_at', ARGV[6], 'updated_at', ARGV[6],
           'folded', 0, 'text', '', 'inflight_key', KEYS[4], unpack(ARGV, 12))
redis.call('EXPIRE', KEYS[2], ARGV[3])
redis.call('SET', KEYS[3], ARGV[5], 'PX', ARGV[4])
redis.call('ZADD', KEYS[4], ARGV[8], ARGV[1])
redis.call('EXPIRE', KEYS[4], ARGV[9])
return {1, ARGV[1]}
"""

# Shared by the writing scripts: may `owner` write to the stream? 'ok'; 'closed' when it is gone or final (the
# bubble was finished by someone else); 'taken' when another replica owns it now and is answering.
_OWNERSHIP = """
local function ownership(key, owner)
  local h = redis.call('HMGET', key, 'status', 'owner')
  if h[1] ~= 'pending' and h[1] ~= 'streaming' then return 'closed' end
  if h[2] ~= owner then return 'taken' end
  return 'ok'
end
"""

# KEYS: stream1, chunks1, stream2, chunks2, ... ARGV: owner, ttl, now, then for each stream: expected list length,
# n_fields, n_deltas, field/value pairs..., deltas... Returns one result per stream: ok, closed, taken or conflict.
# The expected length makes a retry safe: a call whose reply was lost may still have run (even after a later,
# longer retry was sent), so deltas already in the list are skipped and only the rest is pushed.
_APPEND_MANY = (
    _OWNERSHIP
    + """
local results = {}
local p = 4
for i = 1, #KEYS, 2 do
  local expected, nf, nd = tonumber(ARGV[p]), tonumber(ARGV[p + 1]), tonumber(ARGV[p + 2])
  local first_field = p + 3
  local first_delta = first_field + 2 * nf
  p = first_delta + nd
  local state = ownership(KEYS[i], ARGV[1])
  local skip = 0
  if state == 'ok' and nd > 0 then
    skip = redis.call('LLEN', KEYS[i + 1]) - expected
    if skip < 0 or skip > nd then state = 'conflict' end
  end
  if state == 'ok' then
    if nf > 0 then redis.call('HSET', KEYS[i], unpack(ARGV, first_field, first_delta - 1)) end
    if nd > skip and redis.call('RPUSH', KEYS[i + 1], unpack(ARGV, first_delta + skip, p - 1)) == nd - skip then
      redis.call('EXPIRE', KEYS[i + 1], ARGV[2])
      redis.call('HSETNX', KEYS[i], 'first_token_at', ARGV[3])
    end
    redis.call('HSET', KEYS[i], 'status', 'streaming', 'updated_at', ARGV[3])
  end
  results[#results + 1] = state
end
return results
"""
)

# KEYS: stream, chunks. ARGV: owner, ttl, now, answer.
_REPLACE = (
    _OWNERSHIP
    + """
local state = ownership(KEYS[1], ARGV[1])
if state ~= 'ok' then return state end
redis.call('DEL', KEYS[2])
if ARGV[4] ~= '' then
  redis.call('RPUSH', KEYS[2], ARGV[4])
  redis.call('EXPIRE', KEYS[2], ARGV[2])
end
redis.call('HSET', KEYS[1], 'status', 'streaming', 'folded', 0, 'text', '', 'replaced_at', ARGV[3],
           'updated_at', ARGV[3])
return 'ok'
"""
)

# KEYS: stream, chunks, lease, images, feedback. ARGV: owner, status, now, ttl, stream_id, feedback value ('' for
# none), feedback ttl, image count, images..., field/value pairs... Returns 0 if not ours or not active, else
# {1, close_reason, closed_bytes} of a bubble closed early. The reply images and the feedback mapping are written with
# the final state, so a finished answer always has both or neither.
_FINISH = """
local h = redis.call('HMGET', KEYS[1], 'status', 'owner', 'inflight_key', 'close_reason', 'closed_bytes')
if (h[1] ~= 'pending' and h[1] ~= 'streaming') or h[2] ~= ARGV[1] then return 0 end
local images = tonumber(ARGV[8])
redis.call('HSET', KEYS[1], 'status', ARGV[2], 'finished_at', ARGV[3], 'updated_at', ARGV[3],
           unpack(ARGV, 9 + images))
if images > 0 then
  redis.call('DEL', KEYS[4])
  redis.call('RPUSH', KEYS[4], unpack(ARGV, 9, 8 + images))
end
for i = 1, 2 do redis.call('EXPIRE', KEYS[i], ARGV[4]) end
redis.call('EXPIRE', KEYS[4], ARGV[4])
if ARGV[6] ~= '' then redis.call('SET', KEYS[5], ARGV[6], 'EX', ARGV[7]) end
if redis.call('GET', KEYS[3]) == ARGV[1] then redis.call('DEL', KEYS[3]) end
if h[3] then redis.call('ZREM', h[3], ARGV[5]) end
return {1, h[4] or '', h[5] or ''}
"""

# KEYS: stream, chunks, lease, images. ARGV: now, window seconds, overflow bytes, orphan note, stream_id, taker,
# lease_ms. Returns false for an unknown stream, else {status, text, note, close_reason, closed_bytes,
# has_response_url, event, images...}: `event` names what this call just did (taken_over, expired,
# closed_window, closed_overflow, or ''), and the reply images come only once the stream is done. An active stream
# whose lease is gone (its replica died or handed it over) is restarted by the polling replica (`taker`, if not
# empty) when nothing was shown yet and it was never restarted; otherwise it
# becomes expired with the note. One past the window, or longer than a bubble can show, is closed early (the
# bubble finishes now, the worker goes on and sends the rest through response_url).
_POLL = """
local h = redis.call('HMGET', KEYS[1], 'status', 'folded', 'text', 'note', 'created_at', 'close_reason',
                     'closed_bytes', 'response_url', 'inflight_key', 'restarts')
local status = h[1]
if not status then return false end
local text = h[3] or ''
local folded = tonumber(h[2]) or 0
local fresh = redis.call('LRANGE', KEYS[2], folded, -1)
if #fresh > 0 then
  text = text .. table.concat(fresh)
  redis.call('HSET', KEYS[1], 'text', text, 'folded', folded + #fresh)
end
local note, reason, closed_bytes, event = h[4] or '', h[6] or '', h[7] or '', ''
if status == 'pending' or status == 'streaming' then
  if redis.call('EXISTS', KEYS[3]) == 0 then
    if text == '' and reason == '' and (tonumber(h[10]) or 0) == 0 and ARGV[6] ~= '' then
      redis.call('SET', KEYS[3], ARGV[6], 'PX', ARGV[7])
      redis.call('DEL', KEYS[2])
      redis.call('HSET', KEYS[1], 'owner', ARGV[6], 'status', 'pending', 'restarts', 1, 'folded', 0,
                 'taken_over_at', ARGV[1], 'updated_at', ARGV[1])
      status = 'pending'
      event = 'taken_over'
    else
      status = 'expired'
      event = 'expired'
      note = ARGV[4]
      redis.call('HSET', KEYS[1], 'status', status, 'note', note, 'error', 'owner_lost', 'finished_at', ARGV[1])
      if h[9] then redis.call('ZREM', h[9], ARGV[5]) end
    end
  elseif reason == '' then
    if tonumber(ARGV[1]) - tonumber(h[5]) >= tonumber(ARGV[2]) then
      reason = 'window'
    elseif #text > tonumber(ARGV[3]) then
      reason = 'overflow'
    end
    if reason ~= '' then
      event = 'closed_' .. reason
      closed_bytes = tostring(#text)
      redis.call('HSET', KEYS[1], 'closed_at', ARGV[1], 'close_reason', reason, 'closed_bytes', closed_bytes)
      if h[9] then redis.call('ZREM', h[9], ARGV[5]) end
    end
  end
end
redis.call('HINCRBY', KEYS[1], 'polls', 1)
local row = {status, text, note, reason, closed_bytes, (h[8] and h[8] ~= '') and '1' or '', event}
if status == 'done' then
  for _, image in ipairs(redis.call('LRANGE', KEYS[4], 0, -1)) do row[#row + 1] = image end
end
return row
"""

# KEYS: stream. ARGV: field/value pairs. Writes only to an existing hash, so no key is ever left without a TTL.
_RECORD = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
"""

# KEYS: lease1, stream1, lease2, stream2, ... ARGV: owner, lease_ms. Returns the 1-based pair indexes taken by
# another replica. A lease that ran out (e.g. through a Redis outage) is taken back while the stream is still ours;
# a stream that is gone or final needs no lease, and its worker learns that on its next write.
_RENEW = (
    _OWNERSHIP
    + """
local lost = {}
for i = 1, #KEYS, 2 do
  local holder = redis.call('GET', KEYS[i])
  if holder == ARGV[1] then
    redis.call('PEXPIRE', KEYS[i], ARGV[2])
  elseif holder then
    table.insert(lost, (i + 1) / 2)
  else
    local state = ownership(KEYS[i + 1], ARGV[1])
    if state == 'ok' then
      redis.call('SET', KEYS[i], ARGV[1], 'PX', ARGV[2])
    elseif state == 'taken' then
      table.insert(lost, (i + 1) / 2)
    end
  end
end
return lost
"""
)

# KEYS: lease1, stream1, ... ARGV: owner, now. Drops this replica's leases (graceful shutdown), so the next poll on
# another replica takes each stream over. Returns how many were released.
_RELEASE = """
local released = 0
for i = 1, #KEYS, 2 do
  if redis.call('GET', KEYS[i]) == ARGV[1] then
    redis.call('DEL', KEYS[i])
    redis.call('HSET', KEYS[i + 1], 'handed_over_at', ARGV[2])
    released = released + 1
  end
end
return released
"""


class LuaScript:
    """Runs one Lua script by its SHA (EVALSHA), loading it once when Redis does not know it yet.

    Leaner than redis-py's registered Script object: on the poll path its bookkeeping cost as much CPU as the
    call itself (bench/profile_poll.py). `execute` sends the command (default: the client's pooled connections).
    """

    def __init__(self, client: redis.Redis, source: str, execute: Callable[..., object] | None = None):
        self.client = client
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()
        self._execute = execute or client.execute_command

    def __call__(self, keys: list[str], args: list) -> object:
        try:
            return self._execute("EVALSHA", self.sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            self.client.script_load(self.source)
            return self._execute("EVALSHA", self.sha, len(keys), *keys, *args)


class StreamConflict(Exception):
    """The chunk list of a stream is not what its owner wrote: another writer interfered."""


@dataclass(slots=True)
class AppendRequest:
    """One stream's append: `deltas` go after the `written` ones already in its list; `fields` are set too."""

    stream_id: str
    deltas: list[str]
    written: int
    fields: dict[str, str]

    @property
    def size(self) -> int:
        """How many script arguments it takes."""
        return 3 + 2 * len(self.fields) + len(self.deltas)


@dataclass(slots=True)
class Snapshot:
    """What a poll sees: status, the cumulative answer, the final note, and whether the bubble closed early."""

    status: str
    text: str
    note: str
    close_reason: str = ""
    closed_bytes: int = 0
    has_response_url: bool = False
    event: str = ""  # what this poll just did: taken_over, expired, closed_window, closed_overflow, or ""
    images: list[dict] = field(default_factory=list)

    @property
    def taken_over(self) -> bool:
        return self.event == "taken_over"

    @property
    def active(self) -> bool:
        return self.status in ACTIVE_STATUSES


CREATED, EXISTING, LIMITED, RATE_LIMITED = "created", "existing", "limited", "rate_limited"
# Outcomes of a write by a stream's owner: written; the stream was closed or lost by someone else (keep the answer
# and deliver it another way); or another replica has taken it over (stop at once: never two answers).
WRITTEN, CLOSED, TAKEN = "ok", "closed", "taken"


@dataclass(slots=True)
class Finished:
    """The worker's view of a finished stream: whether its bubble had closed early, and with how much text."""

    close_reason: str
    closed_bytes: int


class StreamStore:
    """All Redis operations on streams. Stateless apart from the client and the registered scripts."""

    def __init__(self, client: redis.Redis, keys: Keys, key_ttl: int, lease_seconds: int, rate_limit: int = 0):
        self.rate_limit = rate_limit  # messages per user per RATE_WINDOW_SECONDS; 0 = no limit
        self.client = client
        self.keys = keys
        self.key_ttl = key_ttl
        self.lease_ms = lease_seconds * 1000
        self._create = LuaScript(client, _CREATE)
        self._append_many = LuaScript(client, _APPEND_MANY)
        self._replace = LuaScript(client, _REPLACE)
        self._finish = LuaScript(client, _FINISH)
        # Polls come from the request threads, thousands a second: a leaner path than the pool's.
        self._poll_connections = HotPathConnections(client)
        self._poll = LuaScript(client, _POLL, self._poll_connections.execute)
        self._renew = LuaScript(client, _RENEW)
        self._record = LuaScript(client, _RECORD)
        self._release = LuaScript(client, _RELEASE)

    def close(self) -> None:
        """Disconnect the poll path's connections (the client's pool is its owner's to close)."""
        self._poll_connections.close()

    def create(
        self, stream_id: str, msgid: str, owner: str, aibotid: str, userid: str, fields: dict[str, str]
    ) -> tuple[str, str]:
        """Create a pending stream for `msgid`, unless the msgid has one, the user has too many open bubbles, or
        the user sent too many messages this minute (across all replicas).

        Returns (CREATED, stream_id), (EXISTING, the msgid's stream id), (LIMITED, "") or (RATE_LIMITED, "").
        """
        k = self.keys
        now = time.time()
        args = [
            stream_id,
            MSGID_TTL_SECONDS,
            self.key_ttl,
            self.lease_ms,
            owner,
            f"{now:.3f}",
            MAX_IN_FLIGHT_PER_USER,
            f"{now + POLL_WINDOW_SECONDS:.3f}",
            INFLIGHT_TTL_SECONDS,
            self.rate_limit,
            RATE_WINDOW_SECONDS,
            *_pairs(fields),
        ]
        window = int(now // RATE_WINDOW_SECONDS)
        keys = [
            k.wecom_msg(msgid),
            k.stream(stream_id),
            k.stream_lease(stream_id),
            k.inflight(aibotid, userid),
            k.rate(aibotid, userid, window),
        ]
        code, existing = self._create(keys=keys, args=args)
        return {1: CREATED, 0: EXISTING, 2: LIMITED, 3: RATE_LIMITED}[int(code)], existing

    def append(
        self, stream_id: str, owner: str, deltas: list[str], written: int, fields: dict[str, str] | None = None
    ) -> str:
        """Append deltas after the `written` ones already in the list (and set fields).

        Returns WRITTEN, CLOSED or TAKEN.
        Raises:
            StreamConflict: the list does not hold `written` deltas (someone else wrote to it).
        """
        [result] = self.append_many([AppendRequest(stream_id, deltas, written, fields or {})], owner)
        if isinstance(result, StreamConflict):
            raise result
        return result

    def append_many(self, requests: list[AppendRequest], owner: str) -> list[str | StreamConflict]:
        """Several streams' appends in one script call: a result (or a StreamConflict) per request, in order."""
        keys: list[str] = []
        args: list = [owner, self.key_ttl, _now()]
        for request in requests:
            keys += [self.keys.stream(request.stream_id), self.keys.stream_chunks(request.stream_id)]
            args += [
                request.written,
                len(request.fields),
                len(request.deltas),
                *_pairs(request.fields),
                *request.deltas,
            ]
        results = self._append_many(keys=keys, args=args)
        return [
            StreamConflict(r.stream_id) if result == "conflict" else result
            for r, result in zip(requests, results, strict=True)
        ]

    def replace(self, stream_id: str, owner: str, answer: str) -> str:
        """Replace the whole answer (Dify's message_replace); returns WRITTEN, CLOSED or TAKEN."""
        args = [owner, self.key_ttl, _now(), answer]
        return self._replace(keys=[self.keys.stream(stream_id), self.keys.stream_chunks(stream_id)], args=args)

    def finish(
        self,
        stream_id: str,
        owner: str,
        status: str,
        fields: dict[str, str] | None = None,
        images: list[dict] = (),
        feedback: dict[str, str] | None = None,
    ) -> Finished | None:
        """Move an active stream to a final status, drop the lease and its in-flight slot; with it, keep the reply
        `images` ({base64, md5}) for the final poll and map the stream (its feedback id) to `feedback`
        ({message_id, user}: the Dify message a rating of this answer goes to).

        Returns None if it was not ours or not active; else whether (and with how much text) the bubble had
        already closed early.
        """
        k = self.keys
        args = [
            owner,
            status,
            _now(),
            self.key_ttl,
            stream_id,
            orjson.dumps(feedback).decode() if feedback else "",
            FEEDBACK_TTL_SECONDS,
            len(images),
            *(orjson.dumps(image).decode() for image in images),
            *_pairs(fields or {}),
        ]
        keys = [
            k.stream(stream_id),
            k.stream_chunks(stream_id),
            k.stream_lease(stream_id),
            k.stream_images(stream_id),
            k.feedback(stream_id),
        ]
        row = self._finish(keys=keys, args=args)
        if not row:
            return None
        return Finished(close_reason=row[1], closed_bytes=int(row[2] or 0))

    def poll(
        self, stream_id: str, window_seconds: int, overflow_bytes: int, orphan_note: str, taker: str = ""
    ) -> Snapshot | None:
        """Fold unread deltas into the text and return the snapshot; None for an unknown or expired stream id.

        An active stream whose lease is gone (its replica died) is taken over by `taker` when nothing was shown yet
        (`taken_over` is then set and the caller must start a worker), else becomes `expired` with `orphan_note`.
        An active stream older than `window_seconds`, or with more than `overflow_bytes` of text, is closed early.
        """
        k = self.keys
        keys = [k.stream(stream_id), k.stream_chunks(stream_id), k.stream_lease(stream_id), k.stream_images(stream_id)]
        args = [_now(), window_seconds, overflow_bytes, orphan_note, stream_id, taker, self.lease_ms]
        row = self._poll(keys=keys, args=args)
        if not row:
            return None
        status, text, note, reason, closed_bytes, has_url, event, *images = row
        return Snapshot(
            status=status,
            text=text,
            note=note,
            close_reason=reason,
            closed_bytes=int(closed_bytes or 0),
            has_response_url=bool(has_url),
            event=event,
            images=[orjson.loads(image) for image in images],
        )

    def record(self, stream_id: str, fields: dict[str, str]) -> bool:
        """Set informational fields on an existing stream (no-op if it has expired)."""
        return bool(self._record(keys=[self.keys.stream(stream_id)], args=_pairs(fields)))

    def in_flight(self, aibotid: str, userid: str) -> int:
        """How many of the user's bubbles are open now."""
        key = self.keys.inflight(aibotid, userid)
        return self.client.zcount(key, f"{time.time():.3f}", "+inf")

    def renew_leases(self, stream_ids: list[str], owner: str) -> list[str]:
        """Extend this replica's leases; returns the ids another replica has taken over."""
        if not stream_ids:
            return []
        lost = self._renew(keys=self._lease_pairs(stream_ids), args=[owner, self.lease_ms])
        return [stream_ids[int(i) - 1] for i in lost]

    def release_leases(self, stream_ids: list[str], owner: str) -> int:
        """Give up this replica's leases (graceful shutdown): the next poll elsewhere takes each stream over."""
        if not stream_ids:
            return 0
        return int(self._release(keys=self._lease_pairs(stream_ids), args=[owner, _now()]))

    def _lease_pairs(self, stream_ids: list[str]) -> list[str]:
        keys: list[str] = []
        for stream_id in stream_ids:
            keys += [self.keys.stream_lease(stream_id), self.keys.stream(stream_id)]
        return keys

    def stream_for_msgid(self, msgid: str) -> str | None:
        """The stream id recorded for a WeCom msgid, if any."""
        return self.client.get(self.keys.wecom_msg(msgid))

    def meta(self, stream_id: str) -> dict[str, str]:
        """The whole stream hash (empty if unknown)."""
        return self.client.hgetall(self.keys.stream(stream_id))

    def chunks(self, stream_id: str) -> list[str]:
        """Every delta of the stream, in order."""
        return self.client.lrange(self.keys.stream_chunks(stream_id), 0, -1)


def _now() -> str:
    return f"{time.time():.3f}"


def _pairs(fields: dict[str, str]) -> list[str]:
    flat: list[str] = []
    for name, value in fields.items():
        flat += [name, "" if value is None else str(value)]
    return flat
