"""Runs stream workers in background threads and keeps this replica's leases on their streams alive.

One runner per process, for every bot's streams. One keeper thread renews the leases of all running streams every
third of the lease time (one round trip per bot's store), so a worker blocked on a quiet Dify socket still holds
its stream, and a dead process loses all of its streams within one lease time. A stream whose lease was lost
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


@dataclass(slots=True)
class _Running:
    """A running attempt at a stream: how to cancel it, its fencing token, and where its lease lives."""

    cancelled: threading.Event
    attempt: str
    store: StreamStore
    bot: str


class StreamRunner:
    """Starts one daemon thread per stream; tracks them for capacity, lease renewal and draining."""

    def __init__(self, max_active: int, lease_seconds: int):
        self.max_active = max_active
        self.renew_interval = max(0.5, lease_seconds / 3)
        self._active: dict[str, _Running] = {}
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._keeper = LazyThread(self._keep_leases, "lease-keeper")
        self._stopping = threading.Event()
        self.accepting = True

    @property
    def active_count(self) -> int:
        return len(self._active)

    def active_ids(self) -> list[str]:
        with self._lock:
            return list(self._active)

    def has_capacity(self) -> bool:
        """True while this process takes new streams (below the cap and not draining)."""
        return self.accepting and len(self._active) < self.max_active

    def is_running(self, stream_id: str) -> bool:
        """Whether this process runs an attempt at the stream now (and has not been told to stop it)."""
        with self._lock:
            running = self._active.get(stream_id)
        return running is not None and not running.cancelled.is_set()

    def start(self, job: StreamJob, work: Callable[[threading.Event], None], store: StreamStore, bot: str) -> bool:
        """Run `work(cancelled)`, the job's attempt, in a new thread; `cancelled` is set if the attempt's lease (in
        `store`) is lost. A process never runs two attempts at one stream: False (and nothing started) while one
        runs here."""
        stream_id = job.stream_id
        running = _Running(threading.Event(), job.attempt, store, bot)
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

    def _run(self, stream_id: str, work: Callable[[threading.Event], None], running: _Running) -> None:
        gauge = metrics.ACTIVE_STREAMS.labels(running.bot)
        gauge.inc()
        try:
            work(running.cancelled)
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

    def _keep_leases(self) -> None:
        interval = self.renew_interval
        while not self._stopping.wait(interval):
            renewed = guarded(self._renew_all, "stream_lease_keeper", self._stopping)
            # After a failure (Redis away), try again soon: leases that ran out meanwhile are taken back at once.
            interval = self.renew_interval if renewed else min(_RETRY_INTERVAL, self.renew_interval)

    def _renew_all(self) -> bool:
        with self._lock:
            by_store: dict[int, tuple[StreamStore, list[tuple[str, str]]]] = {}
            for stream_id, running in self._active.items():
                by_store.setdefault(id(running.store), (running.store, []))[1].append((stream_id, running.attempt))
        for store, attempts in by_store.values():
            for start in range(0, len(attempts), _RENEW_BATCH):
                batch = dict(attempts[start : start + _RENEW_BATCH])
                try:
                    lost = store.renew_leases(batch)
                except REDIS_FAILURES as exc:
                    logger.warning("could not renew %d stream leases: %s", len(batch), exc)
                    return False
                for stream_id in lost:
                    logger.warning(
                        "stream %s is no longer this attempt's (taken over elsewhere, or stopped by its user); "
                        "its worker stops",
                        stream_id,
                    )
                self.cancel(lost)
        return True
