"""Create the Redis client for a REDIS_URL: a real server, or `memory://`, an embedded store for one process."""

from __future__ import annotations

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry


def connect_redis(url: str, socket_timeout: float = 2.0) -> redis.Redis:
    """A client with short timeouts (a Redis outage fails requests fast instead of hanging threads) and a couple
    of quick retries for a dropped connection only: retrying a timeout would just multiply the wait."""
    if url.startswith("memory://"):
        import fakeredis  # only the embedded default needs it

        return fakeredis.FakeRedis(server=fakeredis.FakeServer(), decode_responses=True)
    return redis.Redis.from_url(
        url,
        decode_responses=True,
        socket_timeout=socket_timeout,
        socket_connect_timeout=socket_timeout,
        health_check_interval=30,
        retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), retries=2, supported_errors=(redis.ConnectionError,)),
    )


class HotPathConnections:
    """Connections for one hot command path, kept on a stack of their own instead of in the client's pool.

    For the poll script, which the request threads run thousands of times a second: taking a connection from the
    pool and giving it back (a lock, a pid check, a readability poll of the socket, observability hooks) cost
    23 of a poll's 198 µs of CPU (BENCHMARKS.md §1). Here a caller pops an idle connection (or
    makes one) and pushes it back after the reply; both are single atomic list operations, so there is no lock,
    and there are only ever as many connections as concurrent callers (any threading model: gthread, gevent, the
    development server's thread per request).

    The connections are redis-py's own, made with the pool's class and settings (TLS, AUTH, timeouts, health
    checks, the embedded store). redis-py closes a connection on any socket error or timeout, so one is always fit
    to push back: a closed one connects again when next used. A dropped connection gets the command once more,
    as the client's retry does; a timeout is not retried. Make it after the fork, as the gateway is.
    """

    def __init__(self, client: redis.Redis):
        self._pool = client.connection_pool
        self._idle: list = []

    def execute(self, *args):
        """Send one command and return its reply (errors as the client raises them)."""
        try:
            connection = self._idle.pop()
        except IndexError:
            connection = self._pool.connection_class(**self._pool.connection_kwargs)
        try:
            try:
                return self._round_trip(connection, args)
            except redis.ConnectionError:
                return self._round_trip(connection, args)  # the socket was closed; sending connects again
        finally:
            self._idle.append(connection)

    def close(self) -> None:
        """Disconnect the idle connections (call when no more commands are coming)."""
        while self._idle:
            self._idle.pop().disconnect()

    @staticmethod
    def _round_trip(connection, args: tuple):
        connection.send_command(*args)
        return connection.read_response()
