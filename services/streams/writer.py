"""Batched chunk appends without blocking the stream workers.

Each stream has a StreamWriter with at most one append in flight: deltas that arrive meanwhile wait in the
writer and go out together in its next append, so a busy stream's appends grow larger and fewer by themselves.
One AppendBatcher thread per process sends the appends of all streams that have something to write in one round
trip (a group commit: a pipeline of one script call per stream, since each stream is its own Redis Cluster slot;
on a cluster, one round trip per node), at most one batch per `BATCH_INTERVAL_SECONDS`: what arrives meanwhile
joins the next batch without waking the batcher, a delay a 1-second poll interval does not notice. A writer may
also be paced (`pace`: at most one append per that many seconds, the first at once; a flush goes at once): on a
long connection each bubble gets a frame at most every half second, so appending more often than that only adds
Redis work (an LLM's 20-50 tokens a second were as many appends). A stream worker never waits for Redis while it
streams; it reads the writer's state (taken over, closed elsewhere, in conflict, Redis failing) and waits once, at
the end.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import queue
import threading
import time

import redis

from services.loops import LazyThread, guarded
from services.streams.runner import LeaseClock
from services.streams.store import CLOSED, CONFLICT, LATE, WRITTEN, AppendRequest, StreamConflict, StreamStore

logger = logging.getLogger(__name__)

_MAX_ARGS_PER_BATCH = 4000  # keeps one pipeline, and Lua's unpack() of one stream's deltas, well within limits
_MAX_DELTAS_PER_APPEND = 1000
BATCH_INTERVAL_SECONDS = 0.01


class StreamWriter:
    """The ordered Redis writes of one attempt at a stream (`attempt`, its fencing token). Its worker calls `add`
    and `flush`; the batcher thread calls `take` and `settle`. `state` is WRITTEN until the stream is TAKEN by
    another attempt or CLOSED elsewhere, or in CONFLICT: its list no longer holds what this writer wrote (a Redis
    failover lost the last appends), and nothing more is appended until the owner has rewritten the answer whole
    and called `reset`."""

    def __init__(
        self,
        batcher: AppendBatcher,
        store: StreamStore,
        stream_id: str,
        attempt: str,
        pace: float = 0.0,
        deadlines: bool = True,
        lease: LeaseClock | None = None,
    ):
        self.batcher = batcher
        self.store = store  # its bot's
        self.stream_id = stream_id
        self.attempt = attempt
        self.written = 0  # deltas confirmed in the Redis list (start_after: those it held before this writer)
        self.written_chars = 0  # the characters of those deltas: the answer's start Redis holds
        self.state = WRITTEN
        self.error: BaseException | None = None  # the last failed append's error, until one succeeds
        # When the last append whose outcome is unknown (its reply never came) stops being able to land: its deadline.
        self.unsettled_until = 0.0
        self._pending: list[str] = []
        self._fields: dict[str, str] = {}
        self._in_flight = False  # an append is queued, waiting for its pace, or being sent
        self.pace = pace  # seconds between the starts of two appends (0: as soon as the batcher can)
        self.deadlines = deadlines  # its appends carry the batcher's deadline (AppendBatcher)
        self.lease = lease  # the attempt's lease clock: an append renews the lease when it is due (runner.py)
        self._taken_at = float("-inf")  # when the last append was taken (monotonic)
        self._paced = False  # waiting in the batcher for its pace (a flush sends it at once)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)

    def start_after(self, written: int, written_chars: int) -> None:
        """Write after what the stream holds already: `written` chunks of `written_chars` characters (an attempt
        that follows a run under way). Only before the first append."""
        with self._lock:
            if self._pending or self._in_flight or self.written:
                raise RuntimeError("start_after once, before anything is written")
            self.written, self.written_chars = written, written_chars

    def add(self, deltas: list[str], fields: dict[str, str] | None = None) -> None:
        """Queue deltas (and fields to set) behind what is already queued; returns at once."""
        with self._lock:
            self._pending.extend(deltas)
            if fields:
                self._fields.update(fields)
            submit = self._claim()
            if submit:
                self._paced = self.pace > 0
        if submit:
            self.batcher.submit(self)

    def flush(self, timeout: float) -> None:
        """Wait until everything queued is written (or the stream was taken, closed, or is in conflict).

        Raises:
            redis.RedisError: the last append failed and something is still unwritten, or the wait timed out.
        """
        with self._lock:
            submit = self._claim() or self._paced  # what waits for its pace goes now
            self._paced = False
        if submit:
            self.batcher.send_now(self)
        with self._idle:
            if not self._idle.wait_for(lambda: not self._in_flight, timeout):
                raise redis.TimeoutError("appends did not complete in time")
            if self.state == WRITTEN and (self._pending or self._fields):
                raise self.error or redis.RedisError("appends left unwritten")

    def reset(self, written: int, written_chars: int) -> None:
        """After the answer was written whole (a message_replace, or a rewrite after a conflict): the list now
        holds `written` deltas of `written_chars` characters, and nothing is queued."""
        with self._lock:
            self.written, self.written_chars = written, written_chars
            self._pending.clear()
            if self.state == CONFLICT:
                self.state, self.error = WRITTEN, None

    def confirmed_chars(self) -> int | None:
        """How many characters at the start of the answer Redis confirmed holding (a bubble shows no more than
        that while this writer is the stream's), or None when not known (its list lost deltas: a conflict)."""
        with self._lock:
            return None if self.state == CONFLICT else self.written_chars

    def wait_settled(self) -> None:
        """Wait until no append whose reply never came can still land (its deadline passed: Redis refuses it from
        then on), so that `confirmed_chars` is all the stream will ever hold of this writer's. Only a writer whose
        appends carry deadlines can know that (`deadlines`: the callback mode's, the one that asks)."""
        with self._lock:
            until = self.unsettled_until
        time.sleep(max(0.0, until - time.time()))

    def abandon(self) -> None:
        """Send nothing more (the answer went out another way): what is queued is dropped, and an append that is in
        flight is the last."""
        with self._lock:
            self._pending.clear()
            self._fields.clear()
            if self.state == WRITTEN:
                self.state = CLOSED

    def due(self) -> float:
        """When the next append may be taken (monotonic): its pace after the last one."""
        return self._taken_at + self.pace

    def release_paced(self) -> bool:
        """The batcher's: the pace of a paced writer is over; True if it still waits for it (a flush did not send it
        meanwhile: whoever clears the mark queues the writer, so it is queued once)."""
        with self._lock:
            waiting, self._paced = self._paced, False
            return waiting

    def _claim(self) -> bool:
        """Under the lock: mark an append in flight if one should start now."""
        if self._in_flight or self.state != WRITTEN or not (self._pending or self._fields):
            return False
        self._in_flight = True
        return True

    # --- the batcher's side -----------------------------------------------------------------------------------

    def take(self) -> AppendRequest:
        with self._lock:
            self._taken_at = time.monotonic()
            deltas = self._pending[:_MAX_DELTAS_PER_APPEND]
            del self._pending[: len(deltas)]
            fields, self._fields = self._fields, {}
            deadline = self.batcher.deadline() if self.deadlines else 0.0
            lease_ms = self.store.lease_ms if self.lease is not None and self.lease.due() else 0
            return AppendRequest(
                self.stream_id, self.attempt, deltas, self.written, fields, deadline, lease_ms, self._taken_at
            )

    def settle(self, request: AppendRequest, outcome: str | BaseException) -> bool:
        """Record an append's outcome; True if this writer has more to send right away."""
        with self._lock:
            if isinstance(outcome, StreamConflict):
                self.state = CONFLICT  # the owner rewrites the answer whole
                self._pending.clear()
                self._fields = {**request.fields, **self._fields}
            elif isinstance(outcome, BaseException) or outcome == LATE:
                self._pending[:0] = request.deltas  # back in front, in order, for the next try
                self._fields = {**request.fields, **self._fields}
                if outcome == LATE:  # surely not written
                    self.error = redis.TimeoutError("the append reached Redis after its deadline")
                else:  # it may still run, until its deadline
                    self.error = outcome
                    self.unsettled_until = max(self.unsettled_until, request.deadline)
            else:
                self.error = None
                if outcome == WRITTEN:
                    self.written += len(request.deltas)
                    self.written_chars += sum(len(delta) for delta in request.deltas)
                    if request.lease_ms and self.lease is not None:
                        self.lease.renewed(request.taken_at)
                else:
                    self.state = outcome  # TAKEN or CLOSED: nothing more goes to Redis
                    self._pending.clear()
            again = self.error is None and self.state == WRITTEN and bool(self._pending or self._fields)
            if not again:
                self._in_flight = False
                self._idle.notify_all()
            else:
                self._paced = self.pace > 0
            return again


class AppendBatcher:
    """One per process: sends the pending appends of every stream together (every bot's: one round trip per bot).

    Each append carries a deadline, `valid_seconds` (the Redis socket timeout: how long its reply is waited for)
    after it is taken: Redis refuses it from then on, so an append whose reply never came cannot land later, behind
    the back of a writer that took it for unwritten (Redis paused with the call in its socket, a link that held it).
    The deadline is read against Redis's clock: a replica whose clock runs that far behind Redis's would find every
    append refused, so an append refused although its reply came well within the deadline turns deadlines off for
    the process, with an error in the log."""

    def __init__(self, valid_seconds: float = 0.0):
        self._queue: queue.SimpleQueue[StreamWriter] = queue.SimpleQueue()
        self._paced: list[tuple[float, int, StreamWriter]] = []  # (due, order, writer): a heap
        self._order = itertools.count()
        self._paced_lock = threading.Lock()
        self._thread = LazyThread(self._loop, "append-batcher")
        self.valid_seconds = valid_seconds  # 0: appends carry no deadline
        self.batches = 0
        self.appends = 0

    def deadline(self) -> float:
        """The deadline of an append taken now (epoch seconds; 0 for none)."""
        return time.time() + self.valid_seconds if self.valid_seconds else 0.0

    def writer(self, store: StreamStore, stream_id: str, attempt: str, **state) -> StreamWriter:
        """A writer whose appends this batcher sends (`state`: StreamWriter's pace, deadlines and lease)."""
        return StreamWriter(self, store, stream_id, attempt, **state)

    def submit(self, writer: StreamWriter) -> None:
        """Queue `writer`'s next append: at once, or a paced writer's when its pace allows."""
        self._thread.ensure()
        if not writer.pace:
            self._queue.put(writer)
            return
        with self._paced_lock:
            heapq.heappush(self._paced, (writer.due(), next(self._order), writer))
        self._queue.put(None)  # wakes the batcher to see when it is due

    def send_now(self, writer: StreamWriter) -> None:
        """Queue `writer`'s next append at once, whatever its pace (a flush)."""
        self._thread.ensure()
        self._queue.put(writer)

    def _release_due(self) -> float | None:
        """Queue the paced writers whose time came; how long until the next one's (None: none waits)."""
        now = time.monotonic()
        with self._paced_lock:
            while self._paced and self._paced[0][0] <= now:
                writer = heapq.heappop(self._paced)[2]
                if writer.release_paced():
                    self._queue.put(writer)
            return self._paced[0][0] - now if self._paced else None

    def _next_writer(self, wait: bool) -> StreamWriter | None:
        """The next writer queued (None: none, or with `wait`, none until a paced one's time came)."""
        while True:
            until = self._release_due()
            try:
                writer = self._queue.get(timeout=until) if wait else self._queue.get_nowait()
            except queue.Empty:
                if wait:
                    continue
                return None
            if writer is not None:
                return writer

    def _take_batch(self) -> list[tuple[StreamWriter, AppendRequest]]:
        """Every writer queued now (at least one, waiting for it or for a paced one's time), up to the size
        limit."""
        first = self._next_writer(wait=True)
        batch = [(first, first.take())]
        size = batch[0][1].size
        while size < _MAX_ARGS_PER_BATCH:
            writer = self._next_writer(wait=False)
            if writer is None:
                break
            request = writer.take()
            batch.append((writer, request))
            size += request.size
        return batch

    def _loop(self) -> None:
        while True:
            guarded(self._send_batch, "append_batcher")

    def _send_batch(self) -> None:
        """Send every append queued now (waiting for one), then pause so the next batch can gather."""
        batch = self._take_batch()
        started = time.monotonic()
        by_store: dict[int, list[tuple[StreamWriter, AppendRequest]]] = {}
        for writer, request in batch:
            by_store.setdefault(id(writer.store), []).append((writer, request))
        for group in by_store.values():
            self._send(group)
        self.batches += 1
        self.appends += len(batch)
        time.sleep(max(0.0, started + BATCH_INTERVAL_SECONDS - time.monotonic()))

    def _send(self, group: list[tuple[StreamWriter, AppendRequest]]) -> None:
        """One store's appends in one round trip; each writer learns its own outcome."""
        sent = time.time()
        try:
            outcomes: list = group[0][0].store.append_many([request for _, request in group])
        except Exception as exc:  # noqa: BLE001 - each writer keeps its deltas and reports the error
            outcomes = [exc] * len(group)
        if self.valid_seconds and LATE in outcomes and time.time() - sent < self.valid_seconds / 2:
            logger.error(
                "Redis refused appends as late that it answered in %.0f ms: its clock runs ahead of this host's by "
                "more than REDIS_SOCKET_TIMEOUT; appends carry no deadline from now on (check the hosts' NTP)",
                (time.time() - sent) * 1000,
            )
            self.valid_seconds = 0.0
        for (writer, request), outcome in zip(group, outcomes, strict=True):
            if writer.settle(request, outcome):
                self.submit(writer)
