"""What one bot's audit trail owes, listed in Redis for the sweep that writes it (trail.py): the streams whose row is
owed, and the rows made without a stream (a command's reply, a refusal).

A stream is listed when it opens, to be looked at once its bubble's window is over, and moved to now when it ends:
the stream store calls `opened` and `ended`, where every stream opens and ends, so no way of ending one is missed
(its worker, a takeover's, a /stop; a poll that gave it up is found at the window's end)."""

from __future__ import annotations

import time

import redis

from services.audit.rows import AuditRow
from services.keys import AUDIT_KEEP_SECONDS, Keys
from services.outage import best_effort

# A stream nobody said ended is looked at this long after its bubble's window (its process died: a poll gave it
# up, or a takeover answers it still).
AFTER_WINDOW_SECONDS = 60.0
LIST_DELAYS = (0.2, 0.5, 1.0, 2.0)  # the waits between tries of listing a row at an answer's end


class AuditQueue:
    """One bot's lists of owed audit rows: `audit_due` (streams: when to look at each) and `audit_pending` (rows
    that wait for the database)."""

    def __init__(self, client: redis.Redis, keys: Keys, window_seconds: float):
        self.client = client
        self.due_key = keys.audit_due()
        self.pending_key = keys.audit_pending()
        self.window_seconds = window_seconds

    def opened(self, stream_id: str, created_at: float) -> None:
        """A stream opened for a message: its row is owed, looked at after its bubble's window at the latest. One
        try (this is the callback's way): its end lists it again."""
        when = created_at + self.window_seconds + AFTER_WINDOW_SECONDS
        self._list(self.due_key, stream_id, when, only_new=True, delays=())

    def ended(self, stream_id: str) -> None:
        """The stream is final: the next sweep writes its row (a blip is waited out: the answer's thread has ended)."""
        self._list(self.due_key, stream_id, time.time())

    def replied(self, row: AuditRow) -> None:
        """A message answered without a stream: its row, written by the next sweep."""
        self._list(self.pending_key, row.dumps(), time.time())

    def _list(
        self, key: str, member: str, when: float, only_new: bool = False, delays: tuple[float, ...] = LIST_DELAYS
    ) -> None:
        """One round trip (tried again after each of `delays` while Redis fails), never raised."""

        def write() -> None:
            pipe = self.client.pipeline(transaction=False)
            pipe.zadd(key, {member: when}, nx=only_new)
            pipe.expire(key, AUDIT_KEEP_SECONDS)
            pipe.execute()

        best_effort(write, "listing an audit row", delays)
