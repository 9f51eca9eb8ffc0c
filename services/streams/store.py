"""Stream state in Redis, shared by every replica: the hash, the Redis message list of deltas, and the owner lease.

Each operation that touches more than one key, or that reads before it writes, is one Lua script on one entity's
keys (services/streams/scripts.py), so replicas never race and every topology runs the same calls: only the owner
may append or finish, and a poll (services/streams/poll_path.py) folds the unread deltas into the cumulative text in
one round trip.

A new message becomes a stream in three steps, each atomic on its own slot (docs/architecture.md, "Opening a stream
on any topology"): the stream is created pending, its msgid is claimed (SET NX: one stream per msgid, whoever comes
second answers with the first's stream), and its user is admitted (at most MAX_IN_FLIGHT_PER_USER open bubbles,
the rate limit). Only a claimed and admitted stream gets a worker, so there is never a second Dify call for one
msgid, whatever the topology.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import orjson
import redis

from services import replication
from services.keys import (
    FEEDBACK_TTL_SECONDS,
    INFLIGHT_TTL_SECONDS,
    MSGID_TTL_SECONDS,
    RATE_WINDOW_SECONDS,
    Keys,
)
from services.lua import LuaScript
from services.replication import Replication, raise_first_error
from services.streams import scripts
from services.streams.life import StreamLife
from services.streams.reads import StreamLeases, StreamReads, lease_keys, script_now
from services.wecom.limits import MAX_IN_FLIGHT_PER_USER, POLL_WINDOW_SECONDS


class StreamConflict(Exception):
    """The chunk list of a stream is not what its owner wrote: another writer interfered."""


def first_attempt(process: str) -> str:
    """The fencing token of a stream's first attempt, made by `process` (scripts.py, "Fencing")."""
    return f"{process}#1"


@dataclass(slots=True)
class AppendRequest:
    """One stream's append by its attempt `owner`: `deltas` go after the `written` ones already in its list;
    `fields` are set too."""

    stream_id: str
    owner: str
    deltas: list[str]
    written: int
    fields: dict[str, str]
    deadline: float = 0.0  # epoch seconds: Redis refuses it (LATE) from then on, when its sender waits no more
    lease_ms: int = 0  # renew the attempt's lease for this long with the append (0: leave it to the keeper)
    taken_at: float = 0.0  # when its writer took it (monotonic): a lease it renews is that old at most

    @property
    def size(self) -> int:
        """How many script arguments it takes."""
        return 4 + 2 * len(self.fields) + len(self.deltas)


# What opening a stream came to (create), and admitting its user (admit).
CREATED, EXISTING = "created", "existing"
ADMITTED, LIMITED, RATE_LIMITED = "admitted", "in_flight_limit", "rate_limited"
# Outcomes of a write by a stream's owner: written; the stream was closed or lost by someone else (keep the answer
# and deliver it another way); or another replica has taken it over (stop at once: never two answers).
WRITTEN, CLOSED, TAKEN = "ok", "closed", "taken"
LATE = "late"  # an append Redis ran past its deadline, and so did not write
CONFLICT = "conflict"  # a writer's state: the list does not hold what it wrote (services/streams/writer.py)


@dataclass(slots=True)
class Finished:
    """The worker's view of a finished stream: whether its bubble had closed early, and with how much text."""

    close_reason: str
    closed_bytes: int
    inflight_key: str = ""  # the user's in-flight set, which the stream must now leave
    orphaned: bool = False  # a poll had given the stream up (its lease was gone) while it was still ours
    held: bool = True  # a replica holds the end (else a failover could take it back: services/replication.py)


@dataclass(slots=True)
class Taken:
    """A queued stream taken over (scripts.TAKE): the taker's attempt, the stream's hash, and the kind of the new
    Dify call the take counted for it (dify_call_kind; "" when none was counted: a form's task)."""

    attempt: str
    meta: dict[str, str]
    counted_call: str


class StreamStore:
    """The Redis operations on streams but a poll's (poll_path.py). Stateless apart from the client and the
    registered scripts."""

    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        key_ttl: int,
        lease_seconds: int,
        rate_limit: int = 0,
        durable: Replication | None = None,
        takeover_grace_seconds: float = 0.0,
        life: StreamLife | None = None,
    ):
        self.life = life or StreamLife()  # the streams' events: each opens and ends here (or in a poll giving it up)
        self.rate_limit = rate_limit  # messages per user in any RATE_WINDOW_SECONDS; 0 = no limit
        # The writes that must outlive a failover wait for a replica through this (services/replication.py).
        self.durable = durable or Replication(client)
        self.client = client
        self.keys = keys
        self.key_ttl = key_ttl  # how long a final stream's keys stay, at least, after its finish
        # Given at its open (and to its chunks list when it starts): a tenth more, so that a finish within that tenth
        # of the open (most answers) still leaves key_ttl and need not renew the TTLs (scripts.FINISH).
        self.open_ttl = key_ttl + key_ttl // 10
        self.lease_ms = lease_seconds * 1000
        # A lease found missing is taken over only this much later (scripts.POLL): time for a living owner to take
        # it back after a Redis pause or failover. 0 takes over at once.
        self.takeover_grace_seconds = takeover_grace_seconds
        self._open = LuaScript(client, scripts.OPEN, replication=self.durable, write=replication.STREAM_OPEN)
        self._admit = LuaScript(client, scripts.ADMIT)
        self._append = LuaScript(client, scripts.APPEND)
        self._append_durably = LuaScript(client, scripts.APPEND, replication=self.durable, write=replication.FORM)
        self._replace = LuaScript(client, scripts.REPLACE)
        self._finish = LuaScript(client, scripts.FINISH, replication=self.durable, write=replication.STREAM_END)
        self._record = LuaScript(client, scripts.RECORD)
        self._record_durably = LuaScript(client, scripts.RECORD, replication=self.durable, write=replication.OUTBOX)
        self._take = LuaScript(client, scripts.TAKE)
        self._called = LuaScript(client, scripts.CALLED)
        self._stop = LuaScript(client, scripts.STOP, replication=self.durable, write=replication.STREAM_END)
        self._stop_dify = LuaScript(client, scripts.STOP_DIFY)
        self._unpolled = LuaScript(client, scripts.UNPOLLED, replication=self.durable, write=replication.STREAM_END)
        self.reads = StreamReads(client, keys)  # what a stream holds now, read without a script
        self.leases = StreamLeases(client, keys, self.lease_ms)  # its owners' leases, renewed and given up

    # --- opening a stream -------------------------------------------------------------------------------------

    def create(
        self, stream_id: str, msgid: str, owner: str, aibotid: str, userid: str, fields: dict[str, str]
    ) -> tuple[str, str]:
        """Open a stream for `msgid`: create it pending, claim the msgid, admit the user.

        `owner` is the stream's first attempt (first_attempt). Returns (CREATED, stream_id): start a worker;
        (EXISTING, the msgid's stream id): a retry, answer with that stream (ours is deleted again); (LIMITED or
        RATE_LIMITED, stream_id): the user may not open another bubble now, and the caller ends the stream with the
        reason (a retry of the message then finds it).
        """
        self.open_stream(stream_id, owner, aibotid, userid, fields)
        holder = self.claim_msgid(msgid, stream_id)
        if holder != stream_id:
            self.discard(stream_id)
            return EXISTING, holder
        self.life.opened.send(stream_id, at=time.time())
        outcome = self.admit(stream_id, aibotid, userid)
        return (CREATED if outcome == ADMITTED else outcome), stream_id

    def open_stream(self, stream_id: str, owner: str, aibotid: str, userid: str, fields: dict[str, str]) -> None:
        """Create a pending stream owned by its first attempt `owner`, with its lease (not yet claimed for a msgid
        nor admitted)."""
        k = self.keys
        args = [owner, script_now(), self.open_ttl, self.lease_ms, k.inflight(aibotid, userid), *_pairs(fields)]
        self._open(keys=[k.stream(stream_id), k.stream_lease(stream_id)], args=args)

    def claim_msgid(self, msgid: str, stream_id: str) -> str:
        """Claim `msgid` for `stream_id` (SET NX). Returns the stream id the msgid belongs to: `stream_id` when this
        call (or an earlier try of it whose reply was lost) claimed it, else the stream of whoever came first.

        Under Sentinel or on a Cluster, a claim is only as durable as its replication: a failover right after it
        could lose it, and a WeCom retry would then open a second stream. So the claim waits for a replica to hold
        it (services/replication.py; BENCHMARKS.md has the cost). `SET NX GET` (Redis 7.0) answers who held it
        before in the same command: nothing when this call claimed it.
        """
        key = self.keys.wecom_msg(msgid)
        commands = [("SET", key, stream_id, "NX", "GET", "EX", MSGID_TTL_SECONDS)]
        [holder] = self.durable.execute(key, commands, replication.MSGID_CLAIM)
        raise_first_error([holder])
        return holder or stream_id

    def admit(self, stream_id: str, aibotid: str, userid: str) -> str:
        """Give the stream one of its user's open-bubble slots (across all replicas), and count it against the
        user's rate limit. Returns ADMITTED, LIMITED (the user has MAX_IN_FLIGHT_PER_USER open bubbles) or
        RATE_LIMITED."""
        now = time.time()
        k = self.keys
        args = [
            stream_id,
            f"{now:.3f}",
            MAX_IN_FLIGHT_PER_USER,
            f"{now + POLL_WINDOW_SECONDS:.3f}",
            INFLIGHT_TTL_SECONDS,
            self.rate_limit,
            RATE_WINDOW_SECONDS,
        ]
        code = self._admit(keys=[k.inflight(aibotid, userid), k.rate(aibotid, userid)], args=args)
        return {1: ADMITTED, 2: LIMITED, 3: RATE_LIMITED}[int(code)]

    def discard(self, stream_id: str) -> None:
        """Delete a stream that never started (its msgid belonged to another stream already)."""
        self.client.delete(self.keys.stream(stream_id), self.keys.stream_lease(stream_id))

    def release_inflight(self, inflight_key: str, stream_id: str) -> None:
        """Take a stream out of its user's in-flight set (its bubble closed). The set's scores expire it anyway
        when WeCom's polling window ends, should this call be lost."""
        self.client.zrem(inflight_key, stream_id)

    # --- the owner's writes -----------------------------------------------------------------------------------

    def append(
        self, stream_id: str, owner: str, deltas: list[str], written: int, fields: dict[str, str] | None = None
    ) -> str:
        """Append deltas after the `written` ones already in the list (and set fields).

        Returns WRITTEN, CLOSED or TAKEN.
        Raises:
            StreamConflict: the list does not hold `written` deltas (someone else wrote to it).
            redis.RedisError: Redis did not answer.
        """
        [result] = self.append_many([AppendRequest(stream_id, owner, deltas, written, fields or {})])
        if isinstance(result, BaseException):
            raise result
        return result

    def set_durably(self, stream_id: str, owner: str, fields: dict[str, str]) -> str:
        """Set fields of the attempt's active stream in a write a replica holds before this returns (a form's prompt
        and card: a failover that lost them would leave the user nothing to answer, and no later write finds them
        missing as an append finds a lost delta). Returns WRITTEN, CLOSED or TAKEN.

        Raises:
            redis.RedisError: Redis did not answer.
        """
        args = {"owner": owner, "ttl": self.open_ttl, "now": script_now(), "expected": 0, "field_count": len(fields)}
        args |= {"delta_count": 0, "deadline": 0, "lease_ms": 0}
        return self._append_durably.run(self._append_keys(stream_id), args, _pairs(fields))

    def append_many(self, requests: list[AppendRequest]) -> list[str | BaseException]:
        """Several streams' appends in one round trip (one script call per stream): a result per request, in
        order, each WRITTEN, CLOSED, TAKEN, LATE (past its deadline: nothing written), a StreamConflict, or the
        Redis error that call met."""
        now = script_now()
        calls = [
            self._append.call_of(
                self._append_keys(r.stream_id),
                {
                    "owner": r.owner,
                    "ttl": self.open_ttl,
                    "now": now,
                    "expected": r.written,
                    "field_count": len(r.fields),
                    "delta_count": len(r.deltas),
                    "deadline": f"{r.deadline:.3f}",
                    "lease_ms": r.lease_ms,
                },
                rest=[*_pairs(r.fields), *r.deltas],
            )
            for r in requests
        ]
        return [
            StreamConflict(r.stream_id) if result == "conflict" else result
            for r, result in zip(requests, self._append.run_each(calls), strict=True)
        ]

    def _append_keys(self, stream_id: str) -> dict[str, str]:
        """An append's keys: the stream, its list, and its lease (which an append may renew)."""
        k = self.keys
        return {"stream": k.stream(stream_id), "chunks": k.stream_chunks(stream_id), "lease": k.stream_lease(stream_id)}

    def replace(self, stream_id: str, owner: str, answer: str) -> str:
        """Replace the whole answer (Dify's message_replace); returns WRITTEN, CLOSED or TAKEN."""
        args = [owner, self.open_ttl, script_now(), answer]
        return self._replace(keys=[self.keys.stream(stream_id), self.keys.stream_chunks(stream_id)], args=args)

    def finish(
        self,
        stream_id: str,
        owner: str,
        status: str,
        fields: dict[str, str] | None = None,
        images: list[dict] = (),
        feedback: dict[str, str] | None = None,
        finish_id: str = "",
        window_seconds: int = 0,
        chunks: int = -1,
    ) -> Finished | None:
        """Move an active stream to a final status (its lease is left to run out); with it, keep the reply `images`
        ({base64, md5}) for the final poll and map the stream (its feedback id) to `feedback` ({message_id, user}:
        the Dify message a rating of this answer goes to). The caller then frees the user's in-flight slot
        (`Finished.inflight_key`).

        Returns None if it was not ours or not active; `orphaned` if a poll had given it up while it was still
        ours (nothing else is written then); else whether (and with how much text) the bubble had already closed
        early, and whether a replica holds the end. `finish_id`, the same for every try of one finish, makes a try
        whose reply was lost, or that no replica held, safe to repeat: the repeat answers as the try did
        (scripts.FINISH). Past `window_seconds` (0: not looked at) a bubble no
        poll closed is closed at the window, at what it shows.

        Raises:
            StreamConflict: the list does not hold the `chunks` deltas the owner's writer confirmed (-1: not looked
                at); nothing was written.
        """
        k = self.keys
        args = {
            "owner": owner,
            "status": status,
            "now": script_now(),
            "ttl": self.key_ttl,
            "feedback": orjson.dumps(feedback).decode() if feedback else "",
            "feedback_ttl": FEEDBACK_TTL_SECONDS,
            "finish_id": finish_id,
            "image_count": len(images),
            "window_seconds": window_seconds,
            "chunks": chunks,
        }
        keys = {
            "stream": k.stream(stream_id),
            "chunks": k.stream_chunks(stream_id),
            "images": k.stream_images(stream_id),
            "feedback": k.feedback(stream_id),
        }
        images_then_fields = [*(orjson.dumps(image).decode() for image in images), *_pairs(fields or {})]
        reply, held = self._finish.run_held(keys, args, images_then_fields)
        if not reply:
            return None
        if reply == 2:
            return Finished(close_reason="", closed_bytes=0, orphaned=True)
        if reply == 3:
            raise StreamConflict(stream_id)
        self.life.ended.send(stream_id)
        row, _ = scripts.FINISH.fields(reply)
        return Finished(row["close_reason"], int(row["closed_bytes"] or 0), row["inflight_key"], held=held)

    def take(self, stream_id: str, opener: str, taker: str) -> Taken | None:
        """Take a queued stream over from the attempt that opened it (see scripts.TAKE), or None if the stream is no
        longer waiting for someone."""
        keys = [self.keys.stream(stream_id), self.keys.stream_lease(stream_id)]
        row = self._take(keys=keys, args=[opener, taker, self.lease_ms, script_now()])
        if not row:
            return None
        attempt, calls, restarts, *pairs = row
        meta = dict(zip(pairs[::2], pairs[1::2], strict=True))
        meta.update(owner=attempt, run=attempt.rpartition("#")[2])
        counted = dify_call_kind(int(calls), int(restarts)) if int(calls) else ""
        return Taken(attempt, meta, counted)

    def take_unpolled(self, stream_id: str) -> bool:
        """Take a finished answer whose bubble no poll ever showed, to send it through response_url (scripts.UNPOLLED:
        a poll that comes after all says it was sent separately); False when a poll came first."""
        return bool(int(self._unpolled(keys=[self.keys.stream(stream_id)], args=[])))

    def count_dify_call(self, stream_id: str, attempt: str) -> str:
        """Count a new Dify call that `attempt` is about to make for the stream (not a resume): its kind
        (dify_call_kind), or TAKEN when the stream is another attempt's now (or stopped), and no call is to be made."""
        calls, restarts = (int(n) for n in self._called(keys=[self.keys.stream(stream_id)], args=[attempt]))
        return TAKEN if calls < 0 else dify_call_kind(calls, restarts)

    def record(self, stream_id: str, fields: dict[str, str], durable: bool = False) -> bool:
        """Set informational fields on an existing stream (no-op if it has expired); `durable` for the
        long-connection outbox's records, which must outlive a failover (services/replication.py)."""
        script = self._record_durably if durable else self._record
        return bool(script(keys=[self.keys.stream(stream_id)], args=["0", *_pairs(fields)]))

    # --- stops (services/streams/stop.py) ---------------------------------------------------------------------

    def stop(self, stream_id: str, note: str) -> tuple[str, str] | None:
        """End an active stream at its user's word, with `note` after its text so far; None if it was not active.
        Returns (the user's in-flight set, which the caller frees; the Dify task id whose stop call the caller makes,
        or "" when it is not known yet or was claimed already)."""
        row = self._stop(keys=lease_keys(self.keys, stream_id), args=[script_now(), note])
        if row:
            self.life.ended.send(stream_id)
        return (row[0], row[1]) if row else None

    def claim_dify_stop(self, stream_id: str) -> bool:
        """Whether this caller makes the Dify stop call of a stream its user stopped (once across replicas)."""
        return bool(self._stop_dify(keys=[self.keys.stream(stream_id)], args=[script_now()]))


def dify_call_kind(calls: int, restarts: int) -> str:
    """What a stream's new Dify call is, counted as its `calls`-th: "new" for its first, "restart" for the one
    allowed restart of an answer that had shown nothing, "duplicate" for any other (never expected: an alert)."""
    if calls <= 1:
        return "new"
    return "restart" if calls == 2 and restarts == 1 else "duplicate"


def _pairs(fields: dict[str, str]) -> list[str]:
    flat: list[str] = []
    for name, value in fields.items():
        flat += [name, "" if value is None else str(value)]
    return flat
