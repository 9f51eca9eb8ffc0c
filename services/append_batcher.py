"""Batched chunk appends: the deltas of every stream in this process go to Redis together, in one script call.

Like a database's group commit, there is no deliberate wait: a lone append is sent at once, and whatever other
streams queue while a batch is in flight goes out in the next one. Under load this turns thousands of Redis
round trips per second into a few hundred, at the cost of at most one round trip of extra delay.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass, field

import redis

from services.stream_store import AppendRequest, StreamStore

logger = logging.getLogger(__name__)

_MAX_ARGS_PER_BATCH = 4000  # keeps Lua's unpack() and one reply well within limits


@dataclass(slots=True)
class _Pending:
    request: AppendRequest
    done: threading.Event = field(default_factory=threading.Event)
    result: str = ""
    error: BaseException | None = None


class AppendBatcher:
    """Shared by the stream workers of one process; `append` blocks until its batch is written."""

    def __init__(self, store: StreamStore, owner: str, timeout: float = 10.0):
        self.store = store
        self.owner = owner
        self.timeout = timeout
        self._queue: deque[_Pending] = deque()
        self._ready = threading.Condition()
        self._thread: threading.Thread | None = None
        self.batches = 0
        self.appends = 0

    def append(self, stream_id: str, deltas: list[str], written: int, fields: dict[str, str]) -> str:
        """Append like StreamStore.append (WRITTEN, CLOSED or TAKEN), batched with other streams' appends.

        Raises:
            redis.RedisError: the batch could not be written (or did not finish within the timeout).
            StreamConflict: this stream's chunk list is not what its owner wrote.
        """
        pending = _Pending(AppendRequest(stream_id, deltas, written, fields))
        with self._ready:
            self._queue.append(pending)
            self._ready.notify()
        self._ensure_thread()
        if not pending.done.wait(self.timeout):
            raise redis.TimeoutError("batched append did not complete in time")
        if pending.error is not None:
            raise pending.error
        return pending.result

    def _ensure_thread(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        with self._ready:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="append-batcher", daemon=True)
                self._thread.start()

    def _take_batch(self) -> list[_Pending]:
        with self._ready:
            while not self._queue:
                self._ready.wait()
            batch, size = [], 0
            while self._queue and (not batch or size + self._queue[0].request.size <= _MAX_ARGS_PER_BATCH):
                pending = self._queue.popleft()
                batch.append(pending)
                size += pending.request.size
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._take_batch()
            try:
                results = self.store.append_many([p.request for p in batch], self.owner)
            except Exception as exc:  # noqa: BLE001 - handed to every waiting worker, which decides what to do
                for pending in batch:
                    pending.error = exc
            else:
                for pending, result in zip(batch, results, strict=True):
                    if isinstance(result, Exception):
                        pending.error = result
                    else:
                        pending.result = result
            self.batches += 1
            self.appends += len(batch)
            for pending in batch:
                pending.done.set()
