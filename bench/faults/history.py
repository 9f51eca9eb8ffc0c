"""What a fault campaign saw, as a list of events (dicts with a `kind` and a time `t`), kept in memory while it runs
and written as JSON lines afterwards, for the checker and for whoever wants to see why a count is not zero.

Kinds: `message` (a user's message and the answer it should get), `delivery` (a callback carrying it, to one
replica, and the reply), `poll` (a stream-refresh callback and its reply), `response_url` (a message the gateway
posted to WeCom), `dify_call` (a chat request Dify received for it), `fault` (what the nemesis did, and when).
"""

from __future__ import annotations

import gzip
import threading
import time
from pathlib import Path

import orjson


class History:
    def __init__(self) -> None:
        self.events: list[dict] = []
        self._lock = threading.Lock()

    def add(self, kind: str, **fields) -> dict:
        event = {"kind": kind, "t": round(time.time(), 3), **fields}
        with self._lock:
            self.events.append(event)
        return event

    def of(self, kind: str) -> list[dict]:
        with self._lock:
            return [event for event in self.events if event["kind"] == kind]

    def write(self, path: Path) -> None:
        with self._lock:
            path.write_bytes(b"".join(orjson.dumps(event) + b"\n" for event in self.events))


def read(path: Path) -> list[dict]:
    """The events of a history written by `History.write` (or that file gzipped: `*.gz`)."""
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return [orjson.loads(line) for line in data.splitlines() if line]
