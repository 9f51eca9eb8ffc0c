"""Create the Redis client for a REDIS_URL: a real server, or `memory://`, the demo's embedded store."""

from __future__ import annotations

import atexit
import logging
import threading
from pathlib import Path

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

logger = logging.getLogger(__name__)

EMBEDDED_PORT_FILE = "embedded-redis.port"


class EmbeddedStoreUnavailable(RuntimeError):
    """memory:// was asked for where the demo extras (fakeredis, lupa) are not installed."""


def connect_redis(url: str, socket_timeout: float = 2.0, instance_path: Path | None = None) -> redis.Redis:
    """A client with short timeouts (a Redis outage fails requests fast instead of hanging threads) and a couple
    of quick retries for a dropped connection only: retrying a timeout would just multiply the wait.

    `memory://` (demo mode only; settings refuse it elsewhere) is the embedded store, see `connect_embedded`.
    """
    if url.startswith("memory://"):
        return connect_embedded(instance_path or Path("instance"))
    return redis.Redis.from_url(
        url,
        decode_responses=True,
        socket_timeout=socket_timeout,
        socket_connect_timeout=socket_timeout,
        health_check_interval=30,
        retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), retries=2, supported_errors=(redis.ConnectionError,)),
    )


def connect_embedded(instance_path: Path) -> redis.Redis:
    """The demo's embedded store, shared by the processes of one checkout: the first process hosts it (an
    in-process fakeredis, also served on a loopback port named in `instance/embedded-redis.port`), and the
    others, such as `flask --app app streams list` while `make demo` runs, connect to it there.

    Raises:
        EmbeddedStoreUnavailable: fakeredis is not installed (the production image does not ship it).
    """
    port_file = instance_path / EMBEDDED_PORT_FILE
    hosted = _attach(port_file)
    if hosted is not None:
        return hosted
    try:
        import fakeredis  # the demo extras only (requirements-demo.txt)
    except ImportError:
        raise EmbeddedStoreUnavailable(
            "REDIS_URL=memory:// needs the demo extras: pip install -r requirements-demo.txt"
        ) from None
    server = fakeredis.TcpFakeServer(("127.0.0.1", 0), server_type="redis")
    server.daemon_threads = True  # a connected CLI must not keep the demo from exiting
    threading.Thread(target=server.serve_forever, name="embedded-redis", daemon=True).start()
    port = str(server.server_address[1])
    instance_path.mkdir(parents=True, exist_ok=True)
    port_file.write_text(port)
    atexit.register(_forget_port, port_file, port)
    logger.info("embedded store (memory://) served to this checkout's other processes on 127.0.0.1:%s", port)
    return fakeredis.FakeRedis(server=server.fake_server, decode_responses=True)


def _attach(port_file: Path) -> redis.Redis | None:
    """A client of the embedded store another process of this checkout hosts, if it still answers."""
    try:
        port = int(port_file.read_text().strip())
    except (OSError, ValueError):
        return None
    client = redis.Redis(host="127.0.0.1", port=port, decode_responses=True, socket_connect_timeout=0.5)
    try:
        client.ping()
    except redis.RedisError:
        client.close()
        return None
    return client


def _forget_port(port_file: Path, port: str) -> None:
    try:
        if port_file.read_text().strip() == port:
            port_file.unlink()
    except OSError:
        return


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
