"""How a bot's backend did on its last answer in this process, for /readyz: operators see which bot's app is
failing without one bot's outage making any replica unready for the others."""

from __future__ import annotations

import threading
import time


class BackendHealth:
    """The outcome of the latest answer (ok, or its backend's error code) and when it came."""

    def __init__(self):
        self._lock = threading.Lock()
        self._outcome = ""
        self._at = 0.0

    def answered(self) -> None:
        self._record("ok")

    def failed(self, code: str) -> None:
        self._record(code)

    def _record(self, outcome: str) -> None:
        with self._lock:
            self._outcome, self._at = outcome, time.monotonic()

    def report(self) -> dict:
        """{"dify": "ok" | <error code> | "unknown" (no answer yet here), "seconds_ago": ...}."""
        with self._lock:
            if not self._outcome:
                return {"dify": "unknown"}
            return {"dify": self._outcome, "seconds_ago": round(time.monotonic() - self._at, 1)}
