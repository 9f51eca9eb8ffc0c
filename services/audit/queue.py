"""What one bot's audit trail owes, listed in Redis for the sweep that writes it (trail.py): the streams whose row is
owed, and the rows made without a stream (a command's reply, a refusal).

A row made while Redis is away (the message answered with "service unavailable", or Redis failing through the
tries) is held in this process instead (`held`), and this process's own sweep writes it to the database: a message
is recorded even when the store that lists rows was what failed. Only a process that dies while both Redis and the
database are away loses what it held (counted `lost` on a clean stop).

A stream is listed when it opens, to be looked at once its bubble's window is over, and moved to now when it ends:
the queue follows the bot's streams' events (`follow`: services/streams/life.py), sent where every stream opens and
ends, so no way of ending one is missed (its worker, a takeover's, a /stop, a poll that gave it up)."""

from __future__ import annotations

import logging
import time
from collections import deque

import redis

from services import metrics
from services.audit.rows import AuditRow, row_of_reply
from services.keys import AUDIT_KEEP_SECONDS, Keys
from services.outage import best_effort
from services.streams.life import Reply, StreamLife

logger = logging.getLogger(__name__)

# A stream nobody said ended is looked at this long after its bubble's window (its process died: a poll gave it
# up, or a takeover answers it still).
AFTER_WINDOW_SECONDS = 60.0
LIST_DELAYS = (0.2, 0.5, 1.0, 2.0)  # the waits between tries of listing a row at an answer's end
HELD_MAX = 10_000  # rows one process holds while Redis is away, at most (the oldest go first, counted dropped)


class AuditQueue:
    """One bot's lists of owed audit rows: `audit_due` (streams: when to look at each) and `audit_pending` (rows
    that wait for the database)."""

    def __init__(self, client: redis.Redis, keys: Keys, window_seconds: float, held: deque[AuditRow] | None = None):
        self.client = client
        self.due_key = keys.audit_due()
        self.pending_key = keys.audit_pending()
        self.window_seconds = window_seconds
        # rows Redis could not take, for this process's sweep to write straight to the database (oldest first; a
        # queue of the same bot's may share them: the webhooks' pushes)
        self.held: deque[AuditRow] = held if held is not None else deque()

    def follow(self, life: StreamLife) -> AuditQueue:
        """List the rows `life`'s streams owe as they open and end, and the replies made without one."""
        life.opened.connect(lambda stream_id, at: self.opened(stream_id, at), weak=False)
        life.ended.connect(lambda stream_id: self.ended(stream_id), weak=False)
        life.replied.connect(self._replied, weak=False)
        return self

    def _replied(self, reply: Reply) -> None:
        row = row_of_reply(reply.bot, reply.message, reply.note, reply.outcome, reply.kind, reply.owner)
        self.replied(row, redis_away=reply.redis_away)

    def opened(self, stream_id: str, created_at: float) -> None:
        """A stream opened for a message: its row is owed, looked at after its bubble's window at the latest. One
        try (this is the callback's way): its end lists it again."""
        when = created_at + self.window_seconds + AFTER_WINDOW_SECONDS
        self._list(self.due_key, stream_id, when, only_new=True, delays=())

    def ended(self, stream_id: str) -> None:
        """The stream is final: the next sweep writes its row (a blip is waited out: the answer's thread has ended)."""
        self._list(self.due_key, stream_id, time.time())

    def replied(self, row: AuditRow, redis_away: bool = False) -> None:
        """A message answered without a stream: its row, written by the next sweep. Held in this process when Redis
        does not take it, at once when the caller knows it is away (`redis_away`: no reply waits on its tries)."""
        if redis_away or not self._list(self.pending_key, row.dumps(), time.time()):
            self.hold(row)

    def hold(self, row: AuditRow) -> None:
        """Keep `row` for this process's sweep, dropping the oldest held past HELD_MAX."""
        if len(self.held) >= HELD_MAX:
            self.held.popleft()
            logger.error("an audit row dropped: %d were held while Redis was away", HELD_MAX)
            metrics.AUDIT_ROWS.labels(row.bot, "dropped").inc()
        self.held.append(row)

    def _list(
        self, key: str, member: str, when: float, only_new: bool = False, delays: tuple[float, ...] = LIST_DELAYS
    ) -> bool:
        """One round trip (tried again after each of `delays` while Redis fails), never raised; True if listed."""

        def write() -> None:
            pipe = self.client.pipeline(transaction=False)
            pipe.zadd(key, {member: when}, nx=only_new)
            pipe.expire(key, AUDIT_KEEP_SECONDS)
            pipe.execute()

        return best_effort(write, "listing an audit row", delays)
