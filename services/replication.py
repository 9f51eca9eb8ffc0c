"""Writes that must outlive a failover: `Replication.execute` follows such a write with `WAIT <replicas> <wait_ms>`
on its connection, so it returns once every replica of the master holds it, or at most after `wait_ms` (a write no
replica holds is counted in redis_writes_unreplicated_total), and `until_held` makes a write no replica confirmed
again, off the answer's path, until one does. Which writes wait and why: docs/architecture.md, "Opening a stream on
any topology".

Every replica, not one: Sentinel promotes the replica whose offset it last read is the highest, read once a second
at best, so a write only one of two replicas held can lose to the other (how, we think, the Sentinel run of seed 50
lost a form's card). How many replicas the master has is its ROLE's answer, asked with a write at most every
ROLE_EVERY_SECONDS; a replica that lags past `wait_ms` is not waited for again until then.
"""

from __future__ import annotations

import logging
import time
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
# How often a durable write asks its master, in the same round trip, how many replicas it has (ROLE).
ROLE_EVERY_SECONDS = 5.0


class Replication:
    """Runs a durable write's commands on one connection to the node of their key, followed by WAIT."""

    def __init__(self, client: redis.Redis, wait_ms: int = 0, bot: str = "default"):
        self.client = client
        self.wait_ms = wait_ms  # 0: do not wait (no replicas)
        self.bot = bot  # whose writes these are (metrics)
        self._again = Retries("writes_again", f"writes-again-{bot}", AGAIN_MAX)
        self._replicas = 1  # how many replicas a write waits for: the master's, less one that lagged past the wait
        self._replicas_read_at = -ROLE_EVERY_SECONDS  # when the master's ROLE last said how many (monotonic)

    def wait_command(self) -> tuple:
        """The WAIT that follows a durable write (and a poll's text) on its connection."""
        return ("WAIT", self._replicas, self.wait_ms)

    def held(self, wait: tuple, acknowledged) -> bool:
        """Whether a replica holds a write that `acknowledged` replicas confirmed (WAIT's reply; an error: none) after
        `wait` (a `wait_command()`). Fewer than it waited for: one lagged past the wait, and the writes after it wait
        for as many as answered, until the master's ROLE is asked again."""
        if isinstance(acknowledged, BaseException):
            return False
        if int(acknowledged) < wait[1]:
            self._replicas = max(1, int(acknowledged))
        return int(acknowledged) >= 1

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
            replies, held = self._waited(self._node_of(key), commands)
            moves = [reply for reply in replies if isinstance(reply, CLUSTER_MOVES)] if cluster else []
        except CLUSTER_MOVES as exc:
            if not cluster:
                raise
            moves = [exc]
        if moves:
            moved_to = next((move.node_addr for move in moves if isinstance(move, MovedError)), None)
            replies, held = self._after_a_move(key, commands, moved_to)
        wrote = not any(isinstance(reply, BaseException) for reply in replies)  # an error reply wrote nothing
        if wrote and not held:
            metrics.UNREPLICATED_WRITES.labels(self.bot, write).inc()
            logger.debug("%s not yet held by a replica after %d ms", write, self.wait_ms)
        return replies, held or not wrote

    def until_held(self, again: Callable[[], bool], what: str) -> None:
        """Make a write no replica confirmed again, off the caller's path, until a replica holds it: `again()` makes
        it (safe to repeat) and says whether one does now, or that it need not (the stream is no longer ours)."""
        if not self._again.add(partial(_held, again), AGAIN_DELAYS, partial(_never_held, what)):
            logger.warning("%d writes no replica holds wait to be made again; %s is not", AGAIN_MAX, what)

    def _after_a_move(self, key: str, commands: list[tuple], moved_to: tuple[str, int] | None) -> tuple[list, bool]:
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
            replies, held = self._waited(connection, commands)
            if not any(isinstance(reply, CLUSTER_MOVES) for reply in replies):
                return replies, held
        except CLUSTER_MOVES as exc:
            logger.info("the slot's new master is not known yet (%s); writing through the cluster client", exc)
        return self._pipeline(self.client, commands), False

    def _waited(self, client, commands: list[tuple]) -> tuple[list, bool]:
        """`commands`' replies, in one round trip on one connection with their WAIT, and whether a replica holds
        them; the master's ROLE too when it is due, read into how many replicas the next writes wait for (those in
        sync: a replica still loading its first copy has acknowledged no offset yet)."""
        now = time.monotonic()
        role_due = now - self._replicas_read_at >= ROLE_EVERY_SECONDS
        wait = self.wait_command()
        *replies, acknowledged = self._pipeline(client, [*commands, wait, *([("ROLE",)] if role_due else [])])
        if role_due:  # (a ROLE refused, as a managed service may refuse it, leaves the count as it was)
            acknowledged, role = replies.pop(), acknowledged
            self._replicas_read_at = now
            if isinstance(role, list) and role and role[0] in ("master", b"master"):
                self._replicas = max(1, sum(1 for replica in role[2] if int(replica[2]) > 0))
        return replies, self.held(wait, acknowledged)

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
