"""HotPathConnections against the real Redis: reuse, one connection per concurrent caller, reconnecting, timeouts,
closing; and the check of the server's version."""

from __future__ import annotations

import threading

import pytest
import redis

from services import redis_conn
from services.redis_conn import HotPathConnections, connect_redis, version_problem
from tests.conftest import wait_until


@pytest.fixture
def client(redis_url, redis_client):
    client = connect_redis(redis_url, socket_timeout=0.3)
    yield client
    client.close()


def test_replies_are_decoded_as_the_clients_are(client):
    connections = HotPathConnections(client)
    assert connections.execute("SET", "k", "値", "EX", 60) == "OK"
    assert connections.execute("GET", "k") == client.get("k") == "値"
    with pytest.raises(redis.ResponseError):
        connections.execute("INCR", "k")
    assert connections.execute("PING") == "PONG"  # an error reply leaves the connection usable
    connections.close()


def test_sequential_calls_share_one_connection_and_concurrent_ones_get_their_own(redis_url, redis_client):
    client = redis.Redis.from_url(redis_url, decode_responses=True, socket_timeout=3.0, client_name="hot-path-test")
    connections = HotPathConnections(client)

    def ours() -> int:
        return sum(1 for entry in redis_client.client_list() if entry["name"] == "hot-path-test")

    ids = [connections.execute("CLIENT", "ID") for _ in range(3)]
    from_thread: list[int] = []
    thread = threading.Thread(target=lambda: from_thread.append(connections.execute("CLIENT", "ID")))
    thread.start()
    thread.join()
    assert len(set(ids + from_thread)) == 1
    assert ours() == 1

    waiting = [threading.Thread(target=connections.execute, args=("BLPOP", "nothing", "1")) for _ in range(3)]
    for thread in waiting:
        thread.start()
    for thread in waiting:
        thread.join()
    assert ours() == 3  # three at once: the idle one and two more, all kept for the next callers
    connections.close()
    assert wait_until(lambda: ours() == 0, timeout=5)  # Redis notices the closed sockets on its own time
    client.close()


def test_a_connection_the_server_dropped_is_reconnected_once(client):
    connections = HotPathConnections(client)
    first = connections.execute("CLIENT", "ID")
    client.execute_command("CLIENT", "KILL", "ID", first)
    second = connections.execute("CLIENT", "ID")
    assert second != first
    connections.close()


def test_a_timeout_is_raised_and_the_late_reply_is_not_read_as_the_next(client):
    connections = HotPathConnections(client)
    with pytest.raises(redis.TimeoutError):
        connections.execute("BLPOP", "nothing-here", "1")  # blocks longer than the 0.3 s socket timeout
    assert connections.execute("PING") == "PONG"
    connections.close()


def test_redis_down_raises_connection_error_then_recovers(private_redis):
    client = connect_redis(private_redis.url, socket_timeout=0.5)
    connections = HotPathConnections(client)
    assert connections.execute("PING") == "PONG"
    private_redis.stop()
    with pytest.raises(redis.ConnectionError):
        connections.execute("PING")
    private_redis.start()
    assert connections.execute("PING") == "PONG"
    connections.close()
    client.close()


def test_close_disconnects_the_idle_connections(client):
    connections = HotPathConnections(client)
    first = connections.execute("CLIENT", "ID")
    connections.close()
    assert wait_until(lambda: first not in {int(entry["id"]) for entry in client.client_list()}, timeout=5)
    assert connections.execute("PING") == "PONG"  # a later call connects again


def test_the_embedded_store_works_the_same(tmp_path):
    client = connect_redis("memory://", instance_path=tmp_path)
    connections = HotPathConnections(client)
    assert connections.execute("SET", "k", "v") == "OK"
    assert client.get("k") == "v"
    assert connections.execute("GET", "k") == "v"


def test_a_stale_port_file_never_attaches_to_another_server(tmp_path, private_redis):
    """A demo killed before it removed its port file: the next process must not take whatever Redis listens on that
    port now (a test's private server, a developer's own) for the checkout's embedded store."""
    from services.embedded_store import EMBEDDED_PORT_FILE

    (tmp_path / EMBEDDED_PORT_FILE).write_text(str(private_redis.port))
    client = connect_redis("memory://", instance_path=tmp_path)
    client.set("demo-key", "1")
    assert private_redis.client().get("demo-key") is None  # a store of its own, not the server on that port
    other = connect_redis("memory://", instance_path=tmp_path)  # a second process of this checkout attaches
    assert other.get("demo-key") == "1"


def test_the_real_redis_is_new_enough_and_its_version_is_read(client, monkeypatch):
    assert version_problem(client) == ""
    monkeypatch.setattr(redis_conn, "OLDEST_REDIS", (99, 0))  # as if it were too old
    assert version_problem(client).startswith(f"Redis {client.info('server')['redis_version']} is older than 99.0")


class _Answers:
    """What INFO answers (pure logic: the reading of it)."""

    def __init__(self, info):
        self._info = info

    def info(self, section):
        if isinstance(self._info, Exception):
            raise self._info
        return self._info


@pytest.mark.parametrize(
    ("info", "refused"),
    [
        ({"redis_version": "6.2.14"}, "6.2.14"),
        ({"redis_version": "7.0.15"}, ""),
        ({"redis_version": "7.2.4"}, ""),
        ({"redis_version": "8.0.0"}, ""),
        ({"n1:7000": {"redis_version": "7.2.4"}, "n2:7001": {"redis_version": "6.0.9"}}, "6.0.9"),  # a Cluster's
        ({"n1:7000": {"redis_version": "7.2.4"}, "n2:7001": {"redis_version": "7.0.0"}}, ""),
        ({"redis_version": "unknown"}, ""),  # not spelled as Redis does: not refused on a guess
        ({}, ""),
        (redis.ResponseError("unknown command 'info'"), ""),  # a proxy, or the demo's embedded store
    ],
)
def test_a_redis_older_than_7_0_is_named_in_one_line(info, refused):
    problem = version_problem(_Answers(info))
    if not refused:
        assert problem == ""
    else:
        assert problem.startswith(f"Redis {refused} is older than 7.0")
        assert "SET NX GET" in problem and "\n" not in problem
