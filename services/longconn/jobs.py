"""The holder is not the bottleneck: the answers to a long-connection bot's messages run on any replica.

The connection holder opens each message's stream (msgid claim, limits: cheap Redis calls) and queues it in a Redis
Stream; every worker process of every replica reads the bot's stream through one consumer group and takes a
queued stream over (its owner and lease, atomically, scripts.TAKE) when it has room, then runs its Dify call there.
A job read by a process that died before taking it needs no reclaiming: the stream's lease, still the holder's,
runs out, and the holder's next frame-pump poll restarts the answer itself (as any poll restarts an answer whose
replica died before showing anything). So jobs are read with NOACK: nothing is left pending, and no XACK follows.
A job read by a process that cannot take it after all (it filled up, or began to drain, while its read waited) is
put back at once for another.
"""

from __future__ import annotations

import logging
import threading
import time

import redis

from services.keys import ANSWER_QUEUE_TTL_SECONDS, Keys
from services.longconn.outbox import Outbox
from services.loops import guarded, run_until
from services.outage import best_effort
from services.redis_conn import REDIS_FAILURES
from services.replication import ANSWER_QUEUE, Replication, raise_first_error
from services.streams.service import StreamService
from utils.logging import log_context

logger = logging.getLogger(__name__)

GROUP = "answers"
MAX_JOBS = 10_000  # the Redis Stream is trimmed to about this many entries
# A consumer idle this long with nothing pending is a process that died without leaving the group.
DEAD_CONSUMER_IDLE_MS = 3600 * 1000


class JobQueue:
    """Where a holder queues the streams it opened, each followed by the bot's outbox first."""

    def __init__(self, durable: Replication, keys: Keys, bot_id: str, outbox: Outbox):
        self.durable = durable  # a queued answer must outlive a failover (services/replication.py)
        self.client = durable.client
        self.key = keys.ws_jobs(bot_id)
        self.outbox = outbox

    def submit(self, stream_id: str, opener: str) -> None:
        """Queue a stream for any replica, in one write with the outbox's following of it (the bot's open set and
        its queue share a hash tag: one node, one wait for its replica). Followed before anyone may answer it: a
        holder that dies right after leaves an answer the next holder's outbox delivers, never one nobody sends.

        Raises:
            redis.RedisError: Redis did not answer (the message gets the store-unavailable note).
        """
        commands = [*self.outbox.following(stream_id), *self._entry(stream_id, opener)]
        raise_first_error(self.durable.execute(self.key, commands, ANSWER_QUEUE))

    def put_back(self, stream_id: str, opener: str) -> None:
        """Queue again a stream read by a process that cannot take it after all (it filled up, or began to drain,
        while its read waited), so that another process takes it now, not once its opener's lease has run out.

        Raises:
            redis.RedisError: Redis did not answer (its opener's lease restarts it).
        """
        raise_first_error(self.durable.execute(self.key, self._entry(stream_id, opener), ANSWER_QUEUE))

    def _entry(self, stream_id: str, opener: str) -> list[tuple]:
        entry = ("XADD", self.key, "MAXLEN", "~", MAX_JOBS, "*", "stream", stream_id, "opener", opener)
        return [entry, ("EXPIRE", self.key, ANSWER_QUEUE_TTL_SECONDS)]


class JobConsumer:
    """A thread in every serving process: takes queued streams of one bot and runs them here. It joins the queue's
    consumer group under this process's name and leaves it when it stops; consumers that died without leaving are
    removed by the next consumer to start once they have been idle for a while with nothing pending."""

    def __init__(self, queue: JobQueue, streams: StreamService, owner: str, block_ms: int):
        self.queue = queue
        self.streams = streams
        self.owner = owner
        self.block_ms = block_ms
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"wecom-ws-jobs-{streams.bot}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop taking answers; the thread leaves the consumer group once its last read has returned (within
        `block_ms`). Returns at once, so a draining process hands its connection over without waiting."""
        self._stop.set()

    def join(self) -> None:
        """Wait for a stopped consumer's thread to leave the group (at most its last read, and the leaving)."""
        if self._thread.is_alive():
            self._thread.join(self.block_ms / 1000 + 2.0)

    def _run(self) -> None:
        with log_context(replica=self.owner, bot=self.streams.bot):
            guarded(self._join, "wecom_ws_jobs", self._stop)
            run_until(self._stop, self._step, "wecom_ws_jobs")
            best_effort(self._leave, "leaving the answer queue's group", delays=())

    def _step(self) -> None:
        """Read a few queued answers (blocking a moment) and take each."""
        if not self.streams.runner.has_capacity():
            self._stop.wait(0.5)
            return
        asked = time.monotonic()
        try:
            entries = self.queue.client.xreadgroup(
                GROUP, self.owner, {self.queue.key: ">"}, count=10, block=self.block_ms, noack=True
            )
        except redis.ResponseError:
            # No group (yet, or again: the queue expired when idle). How a store words that differs (NOGROUP on
            # Redis, another text on the demo's embedded store), so create it whatever the text says.
            if not self._join():
                self._stop.wait(1.0)
            return
        except REDIS_FAILURES as exc:
            logger.warning("Redis unavailable for the answer queue: %s", exc)
            self._stop.wait(1.0)
            return
        if not entries:
            # Redis blocks for block_ms when nothing is queued; a store that answers at once (the demo's embedded
            # one) would make this loop spin a whole core: the rest of the block is waited here.
            self._stop.wait(max(0.0, self.block_ms / 1000 - (time.monotonic() - asked)))
            return
        for _, messages in entries:
            for _, fields in messages:
                self._take(fields)

    def _take(self, fields: dict) -> None:
        stream_id, opener = fields.get("stream", ""), fields.get("opener", "")
        if not stream_id:
            return
        try:
            if not self.streams.run_queued(stream_id, opener) and not self.streams.runner.has_capacity():
                self.queue.put_back(stream_id, opener)  # (read as this process filled up or began to drain)
        except REDIS_FAILURES as exc:
            logger.warning("could not take a queued answer (%s); its opener's lease will restart it", exc)

    def _join(self) -> bool:
        """Make sure the queue and its group exist, and remove long-dead consumers; False if Redis refused."""
        client, key = self.queue.client, self.queue.key
        try:
            if not client.exists(key):  # MKSTREAM, without relying on it (the demo's embedded store lacks it)
                client.xadd(key, {"created": "1"}, maxlen=MAX_JOBS, approximate=True)
            client.xgroup_create(key, GROUP, id="0")
            client.expire(key, ANSWER_QUEUE_TTL_SECONDS)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                logger.warning("could not create the answer queue's group: %s", exc)
                return False
        except REDIS_FAILURES as exc:
            logger.warning("Redis unavailable for the answer queue: %s", exc)
            return False
        best_effort(self._remove_dead_consumers, "removing dead consumers of the answer queue", delays=())
        return True

    def _remove_dead_consumers(self) -> None:
        client, key = self.queue.client, self.queue.key
        for consumer in client.xinfo_consumers(key, GROUP):
            if int(consumer.get("pending", 0)) == 0 and int(consumer.get("idle", 0)) > DEAD_CONSUMER_IDLE_MS:
                client.xgroup_delconsumer(key, GROUP, consumer["name"])

    def _leave(self) -> None:
        self.queue.client.xgroup_delconsumer(self.queue.key, GROUP, self.owner)
