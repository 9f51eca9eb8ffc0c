"""Writes that must outlive a failover: `Replication.execute` follows such a write with `WAIT 1 <wait_ms>` on its
connection, so it returns once a replica holds it (or counts it in redis_writes_unreplicated_total and goes on), and
`until_held` makes a write no replica confirmed again, off the answer's path, until one does. Which writes wait and
why: docs/architecture.md, "Opening a stream on any topology".
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial

import redis
from redis.cluster import RedisCluster
from redis.exceptions import AskError, ClusterDownError, MovedError

from services import metrics
from services.loops import Retries
from services.redis_conn import REDIS_FAILURES

logger = logging.getLogger(__name__)

# What a direct connection to a cluster node meets when the slot is no longer there.
CLUSTER_MOVES = (MovedError, AskError, ClusterDownError, redis.ConnectionError, redis.TimeoutError)

# The writes that wait for a replica (the `write` label of redis_writes_unreplicated_total).
MSGID_CLAIM, STREAM_OPEN, STREAM_END, ANSWER_QUEUE, OUTBOX, SCHEDULE_CLAIM, PUSH_CLAIM, PUSH_OPEN, FORM = (
    metrics.REPLICATED_WRITES
)
# The waits before each try of making again a write no replica confirmed (about two minutes in all: a failover
# with Sentinel's usual down-after of 30 s, and its election, is over well before).
AGAIN_DELAYS = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0)
# Writes that wait to be made again, at most, per bot: past it (replicas that lag for minutes, which the alert on
# redis_writes_unreplicated_total names), a new one is not waited for.
AGAIN_MAX = 2_000


class Replication:
    """Runs a durable write's commands on one connection to the node of their key, followed by WAIT."""

    def __init__(self, client: redis.Redis, wait_ms: int = 0, bot: str = "default"):
        self.client = client
        self.wait_ms = wait_ms  # 0: do not wait (no replicas)
        self.bot = bot  # whose writes these are (metrics)
        self._again = Retries("writes_again", f"writes-again-{bot}", AGAIN_MAX)

    def execute(self, key: str, commands: list[tuple], write: str) -> list:
        """Send `commands` (each a tuple of a command's words, all on `key`'s slot) in one round trip and wait for
        a replica to hold them. Returns their replies in order, an error in the place of the command that met it
        (NOSCRIPT, say).

        Raises:
            redis.RedisError: Redis did not answer.
        """
        return self.execute_held(key, commands, write)[0]

    def execute_held(self, key: str, commands: list[tuple], write: str) -> tuple[list, bool]:
        """`execute`, and whether a replica holds the write (always, where there is none to wait for)."""
        if not self.wait_ms:
            return self._pipeline(self.client, commands), True
        cluster = isinstance(self.client, RedisCluster)
        try:
            *replies, replicas = self._pipeline(self._node_of(key), [*commands, ("WAIT", 1, self.wait_ms)])
            moves = [reply for reply in replies if isinstance(reply, CLUSTER_MOVES)] if cluster else []
        except CLUSTER_MOVES as exc:
            if not cluster:
                raise
            moves = [exc]
        if moves:
            moved_to = next((move.node_addr for move in moves if isinstance(move, MovedError)), None)
            replies, replicas = self._after_a_move(key, commands, moved_to)
        wrote = not any(isinstance(reply, BaseException) for reply in replies)  # an error reply wrote nothing
        held = not isinstance(replicas, BaseException) and int(replicas) >= 1
        if wrote and not held:
            metrics.UNREPLICATED_WRITES.labels(self.bot, write).inc()
            logger.debug("%s not yet held by a replica after %d ms", write, self.wait_ms)
        return replies, held or not wrote

    def until_held(self, again: Callable[[], bool], what: str) -> None:
        """Make a write no replica confirmed again, off the caller's path, until a replica holds it: `again()` makes
        it (safe to repeat) and says whether one does now, or that it need not (the stream is no longer ours)."""
        if not self._again.add(partial(_held, again), AGAIN_DELAYS, partial(_never_held, what)):
            logger.warning("%d writes no replica holds wait to be made again; %s is not", AGAIN_MAX, what)

    def _after_a_move(self, key: str, commands: list[tuple], moved_to: tuple[str, int] | None) -> tuple[list, object]:
        """The slot moved, or its node died or became a replica (a failover): the write goes to the slot's new
        master, the node a MOVED reply named (`moved_to`), else the one the cluster client's refreshed map names (a
        node asked for the map may not know of the failover yet), with its WAIT on the same connection. While no
        master holds the slot yet, it goes through the cluster client, which follows the failover itself, without a
        WAIT (which would run on a connection of its own): unconfirmed, and counted."""
        try:
            self.client.nodes_manager.initialize()
            node = self.client.get_node(*moved_to) if moved_to else None
            node = node or self.client.get_node_from_key(key)
            connection = self.client.get_redis_connection(node)
            *replies, replicas = self._pipeline(connection, [*commands, ("WAIT", 1, self.wait_ms)])
            if not any(isinstance(reply, CLUSTER_MOVES) for reply in replies):
                return replies, replicas
        except CLUSTER_MOVES as exc:
            logger.info("the slot's new master is not known yet (%s); writing through the cluster client", exc)
        return self._pipeline(self.client, commands), 0

    def _node_of(self, key: str):
        """A client whose pipeline keeps to one connection, to the node holding `key` (WAIT needs that)."""
        if isinstance(self.client, RedisCluster):
            return self.client.get_redis_connection(self.client.get_node_from_key(key))
        return self.client

    @staticmethod
    def _pipeline(client, commands: list[tuple]) -> list:
        pipe = client.pipeline(transaction=False)
        for command in commands:
            # A SET with GET answers the value it replaced; redis-py makes a SET's reply a bool unless told so.
            replaced = command[0] == "SET" and "GET" in command[3:]
            pipe.execute_command(*command, **({"get": True} if replaced else {}))
        return pipe.execute(raise_on_error=False)


def _held(again: Callable[[], bool]) -> bool:
    try:
        return again()
    except REDIS_FAILURES as exc:
        logger.info("a write made again met Redis failing (%s); tried later", type(exc).__name__)
        return False


def _never_held(what: str) -> None:
    logger.error("no replica holds %s after %.0f s of tries; a failover could still lose it", what, sum(AGAIN_DELAYS))


def raise_first_error(replies: list) -> None:
    """Raise the first error among a pipeline's replies, if any."""
    for reply in replies:
        if isinstance(reply, BaseException):
            raise reply
