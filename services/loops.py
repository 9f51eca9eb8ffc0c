"""Background loops that outlive any one failure: a loop's step that raises something unexpected is logged with
its traceback and counted (`background_errors_total`), and the loop goes on after a pause. Without this, one
surprise ends a daemon thread silently and, with it, a bot's connection, its answer queue or its lease renewals.
And the threads a process starts on first use (`LazyThread`), and work tried again later on one (`Retries`)."""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

from services import metrics

logger = logging.getLogger(__name__)
T = TypeVar("T")


def run_until(stop: threading.Event, step: Callable[[], object], loop: str, pause: float = 1.0) -> None:
    """Call `step` until `stop` is set; after an unexpected exception, log it, count it, wait `pause`, go on."""
    while not stop.is_set():
        guarded(step, loop, stop, pause)


def guarded(step: Callable[[], T], loop: str, stop: threading.Event | None = None, pause: float = 1.0) -> T | None:
    """One pass of a background loop: its result, or None after an unexpected exception, which is logged, counted
    and waited out (`pause` seconds, or until `stop` is set), never raised."""
    try:
        return step()
    except Exception:
        logger.exception("background loop %s failed unexpectedly; it goes on", loop)
        metrics.BACKGROUND_ERRORS.labels(loop).inc()
        (stop or threading.Event()).wait(pause)
        return None


class LazyThread:
    """A daemon thread started by the first caller that needs it, once however many callers race, and started again
    when it is gone: threads do not survive a fork, so a forked worker gets its own on first use."""

    def __init__(self, target: Callable[[], object], name: str, before_start: Callable[[], object] | None = None):
        self._target = target
        self._name = name
        self._before_start = before_start  # prepares what the thread will use (run under the start lock)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def running(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive()

    def ensure(self) -> None:
        """Start the thread unless it runs."""
        if self.running():
            return
        with self._lock:
            if self.running():
                return
            if self._before_start is not None:
                self._before_start()
            self._thread = threading.Thread(target=self._target, name=self._name, daemon=True)
            self._thread.start()


class Retries:
    """Tries that wait on a thread of their own (a LazyThread): each is tried after each of its delays in turn until
    it says it is done (True); one that raises is logged and counted as `loop`, and tried at its next delay. At most
    `most` wait at once: past it, a new one is refused (False)."""

    def __init__(self, loop: str, thread: str, most: int):
        self._loop = loop
        self._most = most
        self._due: list[tuple[float, int, int, Callable[[], bool], Sequence[float], Callable[[], object]]] = []
        self._order = itertools.count()
        self._changed = threading.Condition()
        self._thread = LazyThread(self._run, thread)

    def add(
        self, attempt: Callable[[], bool], delays: Sequence[float], gave_up: Callable[[], object], tries: int = 0
    ) -> bool:
        """Try `attempt` after `delays[0]` seconds, and again after each later delay while it is not done; then
        `gave_up()`. False when `most` wait already (nothing is tried)."""
        with self._changed:
            if not tries and len(self._due) >= self._most:
                return False
            heapq.heappush(
                self._due, (time.monotonic() + delays[tries], next(self._order), tries, attempt, delays, gave_up)
            )
            self._changed.notify()
        self._thread.ensure()
        return True

    def waiting(self) -> int:
        return len(self._due)

    def clear(self) -> None:
        """Drop every try that waits (what they tried against is closing)."""
        with self._changed:
            self._due.clear()
            self._changed.notify()

    def _run(self) -> None:
        while True:
            with self._changed:
                while not self._due or self._due[0][0] > time.monotonic():
                    self._changed.wait(self._due[0][0] - time.monotonic() if self._due else None)
                _, _, tries, attempt, delays, gave_up = heapq.heappop(self._due)
            if guarded(attempt, self._loop, pause=0.0):
                continue
            if tries + 1 < len(delays):
                self.add(attempt, delays, gave_up, tries + 1)
            else:
                guarded(gave_up, self._loop, pause=0.0)
