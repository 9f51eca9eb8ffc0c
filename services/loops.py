"""Background loops that outlive any one failure: a loop's step that raises something unexpected is logged with
its traceback and counted (`background_errors_total`), and the loop goes on after a pause. Without this, one
surprise ends a daemon thread silently and, with it, a bot's connection, its answer queue or its lease renewals.
And the threads a process starts on first use (`LazyThread`)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
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
