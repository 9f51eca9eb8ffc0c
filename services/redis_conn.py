"""The Redis client for a REDIS_URL (services/redis_url.py): one server, a Sentinel-monitored master, a Cluster,
or the demo's embedded store; and the poll path's own connections on each of them.

Sentinel and Cluster are redis-py's own clients (`Sentinel.master_for`, `RedisCluster`): they find the master,
follow a failover and refresh the slot map themselves. Every topology gets the same short timeouts and the same
retry policy, so an outage fails a request fast instead of hanging a thread.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import hiredis
import redis
from redis.backoff import ExponentialBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.commands.policies import (
    BasePolicyResolver,
    CommandPolicies,
    RequestPolicy,
    ResponsePolicy,
    StaticPolicyResolver,
)
from redis.exceptions import AskError, ClusterDownError, MovedError, RedisClusterException, TryAgainError
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelConnectionPool, SentinelManagedConnection, SentinelManagedSSLConnection

from services.embedded_store import connect_embedded
from services.redis_url import CLUSTER, EMBEDDED, SENTINEL, parse_redis_url

# Everything a Redis call may raise when Redis is down, slow, failing over or reconfiguring: redis-py's cluster
# client raises some of its errors (a slot with no node while the cluster reconfigures) outside RedisError.
REDIS_FAILURES = (redis.RedisError, RedisClusterException)


# The oldest Redis the gateway runs on: a message's id is claimed with `SET ... NX GET`, which 6.x refuses.
OLDEST_REDIS = (7, 0)


def version_problem(client: redis.Redis) -> str:
    """Why the Redis behind `client` cannot serve the gateway, in one line; '' when it can, or when it does not
    say (a proxy that refuses INFO, a version it does not spell as Redis does). On a Cluster, every node its slot map
    lists is asked (one left at 6.x by an upgrade refuses the messages whose ids hash to it).

    Raises:
        redis.RedisError: Redis did not answer.
    """
    every_node = {"target_nodes": RedisCluster.ALL_NODES} if isinstance(client, RedisCluster) else {}
    try:
        info = client.info("server", **every_node)
    except redis.ResponseError:
        return ""
    servers = [info] if "redis_version" in info else [each for each in info.values() if isinstance(each, dict)]
    too_old = [
        version
        for version in (server.get("redis_version", "") for server in servers)
        if _release(version) < OLDEST_REDIS
    ]
    if not too_old:
        return ""
    return (
        f"Redis {min(too_old, key=_release)} is older than {'.'.join(map(str, OLDEST_REDIS))}, which the gateway "
        "needs (a message's id is claimed with SET NX GET): every new message would get the note asking to resend"
    )


def _release(version: str) -> tuple[int, int]:
    """'6.2.14' -> (6, 2); one it cannot read counts as new enough (refusing a server on a guess is worse)."""
    try:
        major, minor = version.split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        return OLDEST_REDIS


class _DroppedConnectionRetry(Retry):
    """Retries a dropped connection a couple of times, never a timeout; but a timed-out command's connection is
    closed too (the failure handler redis-py passes in closes it), for its reply may still come, and the next
    command on that connection would read it as its own. redis-py's Sentinel connections do not close themselves
    on a timeout, unlike its other connections (tests/test_topologies.py, the late-reply test)."""

    def call_with_retry(self, do, fail, is_retryable=None, with_failure_count=False):
        try:
            return super().call_with_retry(do, fail, is_retryable, with_failure_count)
        except redis.TimeoutError as error:
            if with_failure_count:
                fail(error, 1)
            else:
                fail(error)
            raise


class _FollowsFailovers:
    """A Sentinel master connection that points itself at the new master when it meets a failover, so the client's
    retry of the command goes there.

    redis-py disconnects a master connection that meets READONLY (the master was demoted), so that its next
    `connect()` asks the sentinels where the master is now. But the client's retry sends again on the same
    connection, and sending on a disconnected one reconnects to its old address: to the old master again. Here the
    connection asks the sentinels at once and keeps the answer, for a failed read (READONLY, a dropped socket) and for
    NOREPLICAS: a master run with `min-replicas-to-write` (docs/architecture.md) that has lost its replicas, most
    likely because it was paused or cut off and a replica was promoted meanwhile, and that the sentinels have not
    demoted yet (they wait a few seconds before they do). Such a write goes to the new master, or at worst fails (and
    the caller's outage handling tries again); it is never acknowledged by the old master alone, and then lost."""

    def read_response(self, *args, **kwargs):
        try:
            return super().read_response(*args, **kwargs)
        except redis.ResponseError as error:
            if not (self.connection_pool.is_master and str(error).startswith("NOREPLICAS")):
                raise
            self._point_at_the_master()
            raise redis.ConnectionError("the Redis master lost its replicas (a failover under way)") from error
        except redis.ConnectionError:
            if self.connection_pool.is_master:
                self._point_at_the_master()
            raise

    def _point_at_the_master(self) -> None:
        self.disconnect()
        try:
            self.host, self.port = self.connection_pool.get_master_address()
        except redis.ConnectionError:
            pass  # no sentinel names a master yet: the next connect() asks again


class _SentinelMasterConnection(_FollowsFailovers, SentinelManagedConnection):
    pass


class _SentinelMasterSSLConnection(_FollowsFailovers, SentinelManagedSSLConnection):
    pass


class _ScriptCallsByKey(BasePolicyResolver):
    """Routes a script call (EVALSHA and kin) by the slot of its first key, as redis-py's cluster client does for a
    single command, instead of asking a node which arguments are keys.

    Unresolved, a script call in a cluster pipeline makes redis-py send `COMMAND GETKEYS` to its *default node* first:
    a round trip more per call, and a failure that never heals when that node is the master just killed. That error
    is raised before the pipeline meets the dead node itself, so the client never refreshes its map or picks another
    default node: in a test of ours, one gateway process failed every stream write for over 40 s after a failover
    its neighbours had followed within 4 s (tests/test_topologies.py, the pipelined script after a master's death)."""

    _KEYED = CommandPolicies(request_policy=RequestPolicy.DEFAULT_KEYED, response_policy=ResponsePolicy.DEFAULT_KEYED)
    _SCRIPT_CALLS = ("eval", "evalsha", "eval_ro", "evalsha_ro", "fcall", "fcall_ro")

    def __init__(self, fallback=None):
        super().__init__({"core": dict.fromkeys(self._SCRIPT_CALLS, self._KEYED)}, fallback or StaticPolicyResolver())

    def with_fallback(self, fallback):
        return _ScriptCallsByKey(fallback)


class _Cluster(RedisCluster):
    """redis-py's cluster client, whose pipelines resolve commands as the client does (redis-py 8.1 gives each
    pipeline the default resolver, whatever the client was given)."""

    def pipeline(self, transaction=None, shard_hint=None):
        pipe = super().pipeline(transaction, shard_hint)
        pipe._policy_resolver = self._policy_resolver
        return pipe


def connect_redis(
    url: str, socket_timeout: float = 2.0, instance_path: Path | None = None, sentinel_password: str = ""
) -> redis.Redis:
    """A client for `url`. A couple of quick retries for a dropped connection only: retrying a timeout would just
    multiply the wait. (A RedisCluster has the same commands as a Redis client, and is typed as one here.)"""
    target = parse_redis_url(url)
    timeouts = {"socket_timeout": socket_timeout, "socket_connect_timeout": socket_timeout}
    retry = _DroppedConnectionRetry(
        ExponentialBackoff(cap=0.2, base=0.02), retries=2, supported_errors=(redis.ConnectionError,)
    )
    if target.kind == EMBEDDED:
        return connect_embedded(instance_path or Path("instance"))
    if target.kind == SENTINEL:
        sentinel = Sentinel(
            list(target.nodes),
            sentinel_kwargs={**timeouts, "password": sentinel_password or None, "ssl": target.tls},
            **timeouts,
        )
        return sentinel.master_for(
            target.service_name,
            db=target.db,
            username=target.username,
            password=target.password,
            ssl=target.tls,
            decode_responses=True,
            health_check_interval=30,
            retry=retry,
            connection_class=_SentinelMasterSSLConnection if target.tls else _SentinelMasterConnection,
        )
    if target.kind == CLUSTER:
        return _Cluster(
            startup_nodes=[ClusterNode(host, port) for host, port in target.nodes],
            username=target.username,
            password=target.password,
            ssl=target.tls,
            decode_responses=True,
            health_check_interval=30,
            retry=retry,
            policy_resolver=_ScriptCallsByKey(),
            **timeouts,
        )
    return redis.Redis.from_url(url, decode_responses=True, health_check_interval=30, retry=retry, **timeouts)


# What follows a command on its connection (HotPathConnections.execute): called with the reply and a function that
# sends one more command on that connection (None where there is none to keep).
FollowUp = Callable[[object, Callable[[tuple], object] | None], object]


class HotPathConnections:
    """Connections for one hot command path, kept on a stack of their own instead of in the client's pool.

    For the poll script, which the request threads run thousands of times a second: taking a connection from the
    pool and giving it back (a lock, a pid check, a readability poll of the socket, observability hooks) cost
    23 of a poll's 198 µs of CPU (BENCHMARKS.md §1). Here a caller pops an idle connection (or
    makes one) and pushes it back after the reply; both are single atomic list operations, so there is no lock,
    and there are only ever as many connections as concurrent callers (any threading model: gthread, gevent, the
    development server's thread per request).

    The connections are redis-py's own, made with the pool's class and settings (TLS, AUTH, timeouts, health
    checks, Sentinel's master discovery, the embedded store). A connection that failed (a socket error, a timeout)
    is disconnected before it goes back, so one is always fit to push back: a closed one connects again when next
    used (to the new master, after a Sentinel failover). A dropped connection gets the command once more, as the
    client's retry does; a timeout is not retried. On a Cluster there is a stack per node, picked by the slot of
    the command's key (an EVALSHA's first key, else its first argument); a redirect (MOVED, ASK), a node that is
    down or a cluster that is reconfiguring sends the command through the cluster client instead, which follows
    the redirect and refreshes its slot map. Make it after the fork, as the gateway is.
    """

    def __init__(self, client: redis.Redis):
        self._client = client
        self._cluster = isinstance(client, RedisCluster)
        self._stacks: dict[str, _ConnectionStack] = {}
        self._single = None if self._cluster else _ConnectionStack(client.connection_pool)

    def execute(self, *args, then: FollowUp | None = None):
        """Send one command and return its reply (errors as the client raises them). With `then`, return what
        `then(reply, send)` returns, where `send(command)` sends a command on the same connection (a WAIT counts
        the replicas holding what its own connection wrote); through the cluster client (a redirect), `send` is
        None."""
        if self._single is not None:
            return self._single.execute(args, then)
        key = args[3] if args[0] == "EVALSHA" and int(args[2]) > 0 else args[1]
        node = self._client.nodes_manager.get_node_from_slot(self._client.keyslot(key))
        stack = self._stacks.get(node.name)
        if stack is None:
            pool = self._client.get_redis_connection(node).connection_pool
            stack = self._stacks.setdefault(node.name, _ConnectionStack(pool))
        try:
            return stack.execute(args, then)
        except (MovedError, AskError, ClusterDownError, TryAgainError, redis.ConnectionError):
            reply = self._client.execute_command(*args)
            return reply if then is None else then(reply, None)

    @property
    def under_sentinel(self) -> bool:
        return self._single is not None and isinstance(self._client.connection_pool, SentinelConnectionPool)

    def follow_failover(self) -> bool:
        """Under Sentinel: ask the sentinels where the master is, and disconnect the idle connections that point
        elsewhere (they connect to the master when next used); True if there were any. For a reply that may come
        from a master that was failed over but not yet demoted (paused, cut off): it still answers reads, from its
        old data set. A round trip to a sentinel: for a reply that needs it (a stream not found, a read that waited
        out a stall), and now and then from a thread of the caller's."""
        if not self.under_sentinel:
            return False
        try:
            host, port = self._client.connection_pool.get_master_address()
        except redis.ConnectionError:
            return False
        return self._single.disconnect_unless_at((host, int(port)))

    def connected_to(self) -> set[tuple[str, int]]:
        """The addresses the idle connections are connected to (one server's or a Sentinel master's)."""
        if self._single is None:
            return set()
        return {(c.host, int(c.port)) for c in list(self._single._idle) if c._sock is not None}

    def close(self) -> None:
        """Disconnect the idle connections (call when no more commands are coming)."""
        for stack in [self._single, *self._stacks.values()]:
            if stack is not None:
                stack.close()


class _ConnectionStack:
    """The idle connections of one pool's kind (see HotPathConnections)."""

    def __init__(self, pool: redis.ConnectionPool):
        self._pool = pool
        self._idle: list = []

    def execute(self, args: tuple, then: FollowUp | None = None):
        try:
            connection = self._idle.pop()
        except IndexError:
            connection = self._pool.connection_class(**self._pool.connection_kwargs)
        try:
            try:
                reply = self._round_trip(connection, args)
            except redis.ConnectionError:
                # The socket was closed (a master demoted or gone, a failover's CLIENT KILL): send once more on a
                # new one. Disconnect first: a Sentinel-managed connection keeps its dead socket after an error,
                # and connect() on it would return at once.
                connection.disconnect()
                reply = self._round_trip(connection, args)
            return reply if then is None else then(reply, lambda command: self._follow(connection, command))
        except redis.ResponseError:
            raise  # an error reply: the connection is in step and fit for the next command
        except BaseException:
            connection.disconnect()  # a timeout leaves a reply in flight: never reuse such a socket
            raise
        finally:
            self._idle.append(connection)

    def close(self) -> None:
        while self._idle:
            self._idle.pop().disconnect()

    def disconnect_unless_at(self, address: tuple) -> bool:
        """Disconnect the idle connections connected to another address than `address`; True if there were any."""
        stale = [c for c in list(self._idle) if c._sock is not None and (c.host, int(c.port)) != address]
        for connection in stale:
            connection.disconnect()
        return bool(stale)

    @classmethod
    def _follow(cls, connection, args: tuple):
        """A command after the first on `connection`: one that fails leaves it disconnected even when its caller
        handles the error (a reply still in flight must not be read as the next command's)."""
        try:
            return cls._round_trip(connection, args)
        except redis.ResponseError:
            raise
        except BaseException:
            connection.disconnect()
            raise

    @staticmethod
    def _round_trip(connection, args: tuple):
        # connect() first, as the pool does when it hands a connection out: sending on a closed connection
        # reconnects to the connection's own address, which bypasses Sentinel's discovery of the master.
        # On an open connection it returns at once.
        connection.connect()
        # Packed by hiredis (a requirement) directly: redis-py's packer around it took 3 of the poll's 40 µs here.
        connection.send_packed_command([hiredis.pack_command(args)])
        return connection.read_response()
