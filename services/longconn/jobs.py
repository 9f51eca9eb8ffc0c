"""The holder is not the bottleneck: the answers to a long-connection bot's messages run on any replica.

The connection holder opens each message's stream (msgid claim, limits: cheap Redis calls) and queues it in a Redis
Stream; every worker process of every replica reads the bot's stream through one consumer group and takes a
queued stream over (its owner and lease, atomically, scripts.TAKE) when it has room, then runs its Dify call there.
A job read by a process that died before taking it needs no reclaiming: the stream's lease, still the holder's,
runs out, and the holder's next frame-pump poll restarts the answer itself (as any poll restarts an answer whose
replica died before showing anything).
"""

from __future__ import annotations

import logging
import threading

import redis

from services.keys import Keys
from services.redis_conn import REDIS_FAILURES
from services.streams.service import StreamService
from utils.logging import log_context

logger = logging.getLogger(__name__)

GROUP = "answers"
MAX_JOBS = 10_000  # the Redis Stream is trimmed to about this many entries
JOBS_TTL_SECONDS = 24 * 3600


class JobQueue:
    """Where a holder queues the streams it opened."""

    def __init__(self, client: redis.Redis, keys: Keys, bot_id: str):
        self.client = client
        self.key = keys.ws_jobs(bot_id)

    def submit(self, stream_id: str, opener: str) -> None:
        """Queue a stream for any replica.

        Raises:
            redis.RedisError: Redis did not answer (the message gets the store-unavailable note).
        """
        pipe = self.client.pipeline(transaction=False)
        pipe.xadd(self.key, {"stream": stream_id, "opener": opener}, maxlen=MAX_JOBS, approximate=True)
        pipe.expire(self.key, JOBS_TTL_SECONDS)
        pipe.execute()


class JobConsumer:
    """A thread in every worker process: takes queued streams of one bot and runs them here."""

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
        self._stop.set()

    def _run(self) -> None:
        client, key = self.queue.client, self.queue.key
        with log_context(replica=self.owner, bot=self.streams.bot):
            while not self._stop.is_set():
                if not self.streams.runner.has_capacity():
                    self._stop.wait(0.5)
                    continue
                try:
                    entries = client.xreadgroup(GROUP, self.owner, {key: ">"}, count=10, block=self.block_ms)
                except redis.ResponseError as exc:
                    if "NOGROUP" in str(exc):
                        self._create_group()
                    else:
                        logger.warning("the answer queue refused a read: %s", exc)
                        self._stop.wait(1.0)
                    continue
                except REDIS_FAILURES as exc:
                    logger.warning("Redis unavailable for the answer queue: %s", exc)
                    self._stop.wait(1.0)
                    continue
                for _, messages in entries or []:
                    for entry_id, fields in messages:
                        self._take(entry_id, fields)

    def _take(self, entry_id: str, fields: dict) -> None:
        try:
            if fields.get("stream"):
                self.streams.run_queued(fields["stream"], fields.get("opener", ""))
            self.queue.client.xack(self.queue.key, GROUP, entry_id)
        except REDIS_FAILURES as exc:
            logger.warning("could not take a queued answer (%s); its opener's lease will restart it", exc)

    def _create_group(self) -> None:
        client, key = self.queue.client, self.queue.key
        try:
            if not client.exists(key):  # MKSTREAM, without relying on it (the demo's embedded store lacks it)
                client.xadd(key, {"created": "1"}, maxlen=MAX_JOBS, approximate=True)
            client.xgroup_create(key, GROUP, id="0")
            client.expire(key, JOBS_TTL_SECONDS)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                logger.warning("could not create the answer queue's group: %s", exc)
                self._stop.wait(1.0)
        except REDIS_FAILURES as exc:
            logger.warning("Redis unavailable for the answer queue: %s", exc)
            self._stop.wait(1.0)
