"""What one bot's audit trail owes, listed in Redis for the sweep that writes it (trail.py): the streams whose row is
owed, and the rows made without a stream (a command's reply, a refusal).

A stream is listed when it opens, to be looked at once its bubble's window is over, and moved to now when it ends:
the stream store calls `opened` and `ended`, where every stream opens and ends, so no way of ending one is missed
(its worker, a takeover's, a /stop; a poll that gave it up is found at the window's end)."""

from __future__ import annotations

import logging
import time

import redis

from services.audit.rows import AuditRow
from services.keys import AUDIT_KEEP_SECONDS, Keys
from services.redis_conn import REDIS_FAILURES

logger = logging.getLogger(__name__)

# A stream nobody said ended is looked at this long after its bubble's window (its process died: a poll gave it
# up, or a takeover answers it still).
AFTER_WINDOW_SECONDS = 60.0


class AuditQueue:
    """One bot's lists of owed audit rows: `audit_due` (streams: when to look at each) and `audit_pending` (rows
    that wait for the database)."""

    def __init__(self, client: redis.Redis, keys: Keys, window_seconds: float):
        self.client = client
        self.due_key = keys.audit_due()
        self.pending_key = keys.audit_pending()
        self.window_seconds = window_seconds

    def opened(self, stream_id: str, created_at: float) -> None:
        """A stream opened for a message: its row is owed, looked at after its bubble's window at the latest."""
        self._list(self.due_key, stream_id, created_at + self.window_seconds + AFTER_WINDOW_SECONDS, only_new=True)

    def ended(self, stream_id: str) -> None:
        """The stream is final: the next sweep writes its row."""
        self._list(self.due_key, stream_id, time.time())

    def replied(self, row: AuditRow) -> None:
        """A message answered without a stream: its row, written by the next sweep."""
        self._list(self.pending_key, row.dumps(), time.time())

    def _list(self, key: str, member: str, when: float, only_new: bool = False) -> None:
        """One round trip, never raised: a stream that could not be listed at its end still is from its opening."""
        try:
            pipe = self.client.pipeline(transaction=False)
            pipe.zadd(key, {member: when}, nx=only_new)
            pipe.expire(key, AUDIT_KEEP_SECONDS)
            pipe.execute()
        except REDIS_FAILURES as exc:
            logger.warning("could not list an audit row (%s)", exc)
