"""One bot's audit trail in Redis: the messages that owe a row (`audit_due`), swept into the database by every
serving process after the bubble finished, and the rows that wait for it while it is down (`audit_pending`). A row
is neither lost nor doubled: docs/audit.md, "Exactly one row per message".
"""

from __future__ import annotations

import logging
import time
from collections import deque

import redis
from sqlalchemy.exc import InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from services import metrics
from services.audit.queue import AuditQueue
from services.audit.records import AuditRecords
from services.audit.rows import AuditRow, is_active, row_of_stream
from services.keys import AUDIT_KEEP_SECONDS, Keys
from services.lua import LuaScript, ScriptSpec
from services.redis_conn import REDIS_FAILURES

logger = logging.getLogger(__name__)

# The database did not answer (down, unreachable, a lock it waited for, its pool exhausted): rows wait. Any other
# failure is a row the table refuses.
UNAVAILABLE = (PoolTimeout, OperationalError, InterfaceError)
PAGE = 200  # streams looked at (and waiting rows written) a round trip
PAGES_PER_SWEEP = 10  # so one process writes up to 2,000 rows a second for a bot
CLAIM_SECONDS = 30.0  # a stream a sweep took is left to the others this long (the sweeper died: another takes it)
AUDIT_PENDING_MAX = 100_000  # rows that wait for the database, at most (the oldest go first, counted as dropped)

# KEYS: due. ARGV: now, count, again_at. Takes up to `count` streams whose time came, and lists them again at
# `again_at`: for this sweep's process now, for another one if it never finishes them.
CLAIM_DUE = ScriptSpec(
    "CLAIM_DUE",
    keys=("due",),
    args=("now", "count", "again_at"),
    body="""
local due = redis.call('ZRANGEBYSCORE', K.due, '-inf', A.now, 'LIMIT', 0, A.count)
for _, stream_id in ipairs(due) do redis.call('ZADD', K.due, A.again_at, stream_id) end
return due
""",
)


class AuditTrail:
    """The audit rows one bot owes, in Redis, and their way into the database (`records`)."""

    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        records: AuditRecords,
        bot: str,
        held: deque[AuditRow] | None = None,
    ):
        self.client = client
        self.keys = keys
        self.records = records
        self.bot = bot
        self.held = held if held is not None else deque()  # the queue's rows Redis could not take (queue.py)
        self.due_key = keys.audit_due()
        self.pending_key = keys.audit_pending()
        self._claim = LuaScript(client, CLAIM_DUE)

    def queue(self) -> AuditQueue:
        """A queue listing rows for this trail (a push's, an operator's), holding them here while Redis is away."""
        return AuditQueue(self.client, self.keys, 0, self.held)

    # --- the sweep --------------------------------------------------------------------------------------------

    def sweep(self) -> int:
        """Write the rows of the streams that ended, and the rows that waited; returns how many went in.

        Raises:
            redis.RedisError (or a cluster error): Redis did not answer (nothing is lost: the next sweep goes on).
        """
        written = self.write_held()
        for _ in range(PAGES_PER_SWEEP):  # a burst is written at once, a page at a time, up to a bound
            now = time.time()
            claim = {"now": now, "count": PAGE, "again_at": now + CLAIM_SECONDS}
            stream_ids = self._claim.run({"due": self.due_key}, claim)
            written += self._write_streams(stream_ids) if stream_ids else 0
            if len(stream_ids) < PAGE:
                break
        return written + self._write_pending()

    def pending(self) -> int:
        return int(self.client.zcard(self.pending_key)) + len(self.held)

    def write_held(self) -> int:
        """Write the rows this process held while Redis was away straight to the database (they stay held while it
        is away too); returns how many went in."""
        rows = list(self.held)[:PAGE]
        if not rows or not self._insert(rows):
            return 0
        for _ in rows:
            self.held.popleft()  # (only the sweep takes from the left; rows held meanwhile were added on the right)
        return len(rows)

    def _write_streams(self, stream_ids: list[str]) -> int:
        rows, done = [], []
        for stream_id, meta, chunks in zip(stream_ids, *self._read(stream_ids), strict=True):
            if not meta:
                logger.warning("the stream of an audit row expired before it was read (stream %s)", stream_id)
                metrics.AUDIT_ROWS.labels(self.bot, "lost").inc()
                done.append(stream_id)
            elif is_active(meta):
                continue  # a takeover answers it still: its end lists it again (else the claim brings it back)
            else:
                if (row := row_of_stream(self.bot, meta, chunks)) is not None:
                    rows.append(row)
                done.append(stream_id)
        if rows and not self._insert(rows):
            self._park(rows)
        if done:
            self.client.zrem(self.due_key, *done)
        return len(rows)

    def _read(self, stream_ids: list[str]) -> tuple[list[dict[str, str]], list[list[str]]]:
        pipe = self.client.pipeline(transaction=False)
        for stream_id in stream_ids:
            pipe.hgetall(self.keys.stream(stream_id))
            pipe.lrange(self.keys.stream_chunks(stream_id), 0, -1)
        replies = pipe.execute()
        return replies[0::2], replies[1::2]

    def _write_pending(self) -> int:
        waiting = self.client.zrange(self.pending_key, 0, PAGE - 1)
        if not waiting:
            return 0
        if not self._insert([AuditRow.loads(raw) for raw in waiting]):
            return 0
        self.client.zrem(self.pending_key, *waiting)
        return len(waiting)

    def _insert(self, rows: list[AuditRow]) -> bool:
        try:
            new = self.records.insert(rows)
        except UNAVAILABLE as exc:
            logger.warning("the database is unavailable (%s); %d audit rows wait", type(exc).__name__, len(rows))
            return False
        except SQLAlchemyError as exc:  # a row the table refuses: written one by one, the one it refuses dropped
            if len(rows) == 1:
                logger.error("the database refused an audit row for good (%s); it is dropped", type(exc).__name__)
                metrics.AUDIT_ROWS.labels(self.bot, "dropped").inc()
                return True
            return all([self._insert([row]) for row in rows])
        for outcome, count in new.items():
            metrics.AUDIT_ROWS.labels(self.bot, outcome).inc(count)
        return True

    def _park(self, rows: list[AuditRow]) -> None:
        """Rows the database did not take wait in Redis, the oldest dropped past AUDIT_PENDING_MAX."""
        now = time.time()
        pipe = self.client.pipeline(transaction=False)
        pipe.zadd(self.pending_key, {row.dumps(): now for row in rows})
        pipe.expire(self.pending_key, AUDIT_KEEP_SECONDS)
        pipe.zremrangebyrank(self.pending_key, 0, -AUDIT_PENDING_MAX - 1)
        dropped = pipe.execute()[2]
        if dropped:
            logger.error("%d audit rows dropped: more than %d waited for the database", dropped, AUDIT_PENDING_MAX)
            metrics.AUDIT_ROWS.labels(self.bot, "dropped").inc(dropped)


def sweep_quietly(trail: AuditTrail) -> None:
    """One sweep; Redis away is waited out by the next one."""
    try:
        trail.sweep()
        metrics.AUDIT_PENDING.labels(trail.bot).set(trail.pending())
    except REDIS_FAILURES as exc:
        logger.debug("could not sweep the audit rows: %s", exc)
