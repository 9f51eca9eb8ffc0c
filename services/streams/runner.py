"""Runs stream workers in background threads and keeps this replica's leases on their streams alive.

One runner per process, for every bot's streams. A running attempt's lease is renewed before it is one renewal
interval (a third of the lease time) old: by the attempt's own next append once it is three quarters of that old
(scripts.APPEND, one command where the keeper's renewal takes three), else by one keeper thread that looks ten
times an interval and renews, in one round trip per bot's store, each lease nine tenths of that old. So a writing
attempt keeps its lease with its appends, a worker blocked on a quiet Dify socket still holds its stream through
the keeper, and a dead process loses all of its streams within one lease time. A stream whose lease was lost
(another replica took it over) is cancelled.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from services import metrics
from services.loops import LazyThread, guarded
from services.redis_conn import REDIS_FAILURES
from services.streams.job import StreamJob
from services.streams.store import StreamStore

logger = logging.getLogger(__name__)

_RENEW_BATCH = 500
_RETRY_INTERVAL = 0.5


class LeaseClock:
    """When a running attempt's lease was last set, and whether it is due for renewal: by the attempt's appends
    (services/streams/writer.py) from `due_after` seconds on, by the runner's keeper from `keeper_after` on (later,
    so that an attempt that appends renews its own)."""

    def __init__(self, due_after: float, keeper_after: float):
        self.due_after = due_after
        self.keeper_after = keeper_after
        self._set_at = time.monotonic()  # the attempt started just after its lease was set (open, take, poll)

    def due(self, by_keeper: bool = False) -> bool:
        return time.monotonic() - self._set_at >= (self.keeper_after if by_keeper else self.due_after)

    def renewed(self, sent_at: float) -> None:
        """A renewal sent at `sent_at` (monotonic) was written."""
        self._set_at = max(self._set_at, sent_at)


# An attempt's body: (cancelled, the attempt's lease clock) -> None.
Work = Callable[[threading.Event, LeaseClock], None]


@dataclass(slots=True)
class _Running:
    """A running attempt at a stream: how to cancel it, its fencing token, where its lease lives, and its age."""

    cancelled: threading.Event
    attempt: str
    store: StreamStore
    bot: str
    lease: LeaseClock


class StreamRunner:
    """Starts one daemon thread per stream; tracks them for capacity, lease renewal and draining."""

    def __init__(self, max_active: int, lease_seconds: int):
        self.max_active = max_active
        self.renew_interval = max(0.5, lease_seconds / 3)  # the oldest a lease gets before it is renewed
        self._active: dict[str, _Running] = {}
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._keeper = LazyThread(self._keep_leases, "lease-keeper")
        self._stopping = threading.Event()
        self._closed = threading.Event()
        self.accepting = True

    @property
    def active_count(self) -> int:
        return len(self._active)

    def has_capacity(self) -> bool:
        """True while this process takes new streams (below the cap and not draining)."""
        return self.accepting and len(self._active) < self.max_active

    def is_running(self, stream_id: str) -> bool:
        """Whether this process runs an attempt at the stream now (and has not been told to stop it)."""
        with self._lock:
            running = self._active.get(stream_id)
        return running is not None and not running.cancelled.is_set()

    def start(self, job: StreamJob, work: Work, store: StreamStore, bot: str) -> bool:
        """Run `work(cancelled, lease)`, the job's attempt, in a new thread; `cancelled` is set if the attempt's
        lease (in `store`) is lost, and `lease` is the attempt's lease clock, for its appends to renew the lease.
        A process never runs two attempts at one stream: False (and nothing started) while one runs here."""
        stream_id = job.stream_id
        lease = LeaseClock(self.renew_interval * 0.75, self.renew_interval * 0.9)
        running = _Running(threading.Event(), job.attempt, store, bot, lease)
        with self._lock:
            if stream_id in self._active:
                logger.error("stream %s already runs in this process; not starting a second attempt", stream_id)
                return False
            self._active[stream_id] = running
        self._keeper.ensure()
        thread = threading.Thread(
            target=self._run, args=(stream_id, work, running), name=f"stream-{stream_id}", daemon=True
        )
        thread.start()
        return True

    def _run(self, stream_id: str, work: Work, running: _Running) -> None:
        gauge = metrics.ACTIVE_STREAMS.labels(running.bot)
        gauge.inc()
        try:
            work(running.cancelled, running.lease)
        except Exception:
            # Workers record their own final state; this only guards the bookkeeping below.
            logger.exception("stream worker crashed outside its own error handling")
        finally:
            gauge.dec()
            with self._lock:
                self._active.pop(stream_id, None)
                self._idle.notify_all()

    def drain(self, timeout: float) -> list[str]:
        """Stop taking streams and wait up to `timeout` s for running ones; returns the ids still running."""
        self.accepting = False
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._active:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._idle.wait(left)
            return list(self._active)

    def cancel(self, stream_ids: list[str]) -> None:
        """Tell these streams' workers to stop writing (their streams are being handed to other replicas)."""
        with self._lock:
            running = [self._active[i] for i in stream_ids if i in self._active]
        for each in running:
            each.cancelled.set()

    def by_bot(self, stream_ids: list[str]) -> dict[str, dict[str, str]]:
        """These running streams' attempts ({stream id: attempt}), by the bot they answer for."""
        grouped: dict[str, dict[str, str]] = {}
        with self._lock:
            for stream_id in stream_ids:
                if running := self._active.get(stream_id):
                    grouped.setdefault(running.bot, {})[stream_id] = running.attempt
        return grouped

    def stop(self) -> None:
        """Stop the lease keeper (running workers are left to their own ends)."""
        self._stopping.set()

    def close(self) -> None:
        """The process closes: stop the lease keeper, and tell running workers there is nothing left to wait for."""
        self._closed.set()
        self.stop()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def _keep_leases(self) -> None:
        look = self.renew_interval / 10
        interval = look
        while not self._stopping.wait(interval):
            renewed = guarded(self._renew_all, "stream_lease_keeper", self._stopping)
            # After a failure (Redis away), try again soon: leases that ran out meanwhile are taken back at once.
            interval = look if renewed else min(_RETRY_INTERVAL, look)

    def _renew_all(self) -> bool:
        """Renew the leases that are due (their appends did not); False if Redis did not answer."""
        with self._lock:
            by_store: dict[int, tuple[StreamStore, list[tuple[str, _Running]]]] = {}
            for stream_id, running in self._active.items():
                if running.lease.due(by_keeper=True):
                    by_store.setdefault(id(running.store), (running.store, []))[1].append((stream_id, running))
        for store, due in by_store.values():
            for start in range(0, len(due), _RENEW_BATCH):
                batch = dict(due[start : start + _RENEW_BATCH])
                sent = time.monotonic()
                try:
                    lost = store.leases.renew({stream_id: running.attempt for stream_id, running in batch.items()})
                except REDIS_FAILURES as exc:
                    logger.warning("could not renew %d stream leases: %s", len(batch), exc)
                    return False
                for running in batch.values():
                    running.lease.renewed(sent)
                for stream_id in lost:
                    logger.warning(
                        "stream %s is no longer this attempt's (taken over elsewhere, or stopped by its user); "
                        "its worker stops",
                        stream_id,
                    )
                self.cancel(lost)
        return True
