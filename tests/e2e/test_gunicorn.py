"""The production command, `gunicorn -c gunicorn.conf.py 'app:create_app()'` with two workers, serving whole
conversations from the simulator against the real Redis and the Dify stand-in."""

import json
import socket
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from demo import dify_standin as d
from demo.replicas import GunicornReplica, free_port
from tests.conftest import AES_KEY, DIFY_KEY, KEYS, TOKEN, make_simulator
from tests.e2e.conftest import replica_env

pytestmark = pytest.mark.e2e


@pytest.fixture
def gunicorn_env(dify, redis_url):
    """`gunicorn_env(**settings)`: a replica's environment against the test's Dify stand-in and Redis."""
    return lambda **settings: replica_env(dify.base_url, redis_url, **settings)


@pytest.fixture
def replica(dify, redis_client, tmp_path, gunicorn_env):
    server = GunicornReplica(gunicorn_env(), tmp_path, "gunicorn-a", workers=2).start()
    yield server
    server.stop()


def test_two_workers_serve_whole_conversations(replica, dify, redis_client):
    dify.script(d.answer("Answered by a gunicorn worker, polled by any worker.", delay=0.02), times=None)
    sim = make_simulator(replica.url, poll_interval=0.05)
    with ThreadPoolExecutor(6) as pool:
        conversations = list(pool.map(lambda i: sim.ask(f"question {i}", userid=f"user{i}"), range(6)))
    assert all(c.finished and c.text == "Answered by a gunicorn worker, polled by any worker." for c in conversations)
    assert len(dify.chat_requests()) == 6
    statuses = {redis_client.hget(KEYS.stream(c.stream_id), "status") for c in conversations}
    assert statuses == {"done"}
    owners = {redis_client.hget(KEYS.stream(c.stream_id), "owner") for c in conversations}
    assert all(owner.startswith("gunicorn-a:") for owner in owners)  # one per worker process that took messages
    sim.close()


def test_logs_are_json_lines_under_gunicorn(replica, dify):
    dify.script(d.answer("logged"))
    sim = make_simulator(replica.url)
    conversation = sim.ask("log me")
    sim.close()
    replica.stop()
    entries = [json.loads(line) for line in replica.logs().splitlines() if line.startswith("{")]
    mine = [e for e in entries if e.get("stream") == conversation.stream_id]
    assert mine
    assert all(e["replica"].startswith("gunicorn-a:") for e in mine)
    assert TOKEN not in replica.logs()
    assert AES_KEY not in replica.logs()
    assert DIFY_KEY not in replica.logs()


@pytest.mark.parametrize(
    ("change", "line"),
    [
        ({"REDIS_URL": "memory://"}, "configuration error: REDIS_URL=memory:// is the demo's embedded store"),
        ({"REDIS_URL": ""}, "configuration error: REDIS_URL is required"),
        (
            {"AUTH_MODE": "external", "AUTH_API_URL": "http://127.0.0.1:9/token", "AUTH_API_KEY": "k"},
            "configuration error: DATABASE_URL is required with AUTH_MODE=external",
        ),
    ],
    ids=["memory-store", "no-redis", "no-database"],
)
def test_production_settings_without_shared_stores_stop_even_with_one_worker(
    dify, tmp_path, change, line, gunicorn_env
):
    server = GunicornReplica({**gunicorn_env(), **change}, tmp_path, "refused", workers=1)
    with pytest.raises(RuntimeError, match="exited with 2"):
        server.start(timeout=15)
    problems = [entry for entry in server.logs().splitlines() if entry.startswith("configuration error:")]
    assert len(problems) == 1
    assert problems[0].startswith(line)


def test_the_embedded_store_is_refused_with_several_workers_even_in_demo_mode(dify, tmp_path, gunicorn_env):
    env = {**gunicorn_env(), "DEMO_MODE": "true", "REDIS_URL": "memory://"}
    server = GunicornReplica(env, tmp_path, "refused", workers=2)
    with pytest.raises(RuntimeError, match="exited with 2"):
        server.start(timeout=15)
    assert "configuration error: REDIS_URL=memory:// keeps state inside one process" in server.logs()


@pytest.mark.parametrize(
    ("settings", "line"),
    [
        ({"GUNICORN_WORKER_CLASS": "gevent"}, "GUNICORN_WORKER_CLASS must be one of gthread, sync (got 'gevent')"),
        ({"GUNICORN_THREADS": "four"}, "GUNICORN_THREADS must be a whole number of at least 1 (got 'four')"),
        ({"GUNICORN_TIMEOUT": "0"}, "GUNICORN_TIMEOUT must be a whole number of at least 1 (got '0')"),
        (
            {"GUNICORN_WORKER_CLASS": "sync", "GUNICORN_THREADS": "4"},
            "GUNICORN_WORKER_CLASS=sync takes one thread per worker (got GUNICORN_THREADS=4)",
        ),
    ],
)
def test_a_bad_gunicorn_setting_is_one_clear_line(dify, tmp_path, settings, line, gunicorn_env):
    server = GunicornReplica({**gunicorn_env(), **settings}, tmp_path, "refused", workers=2)
    with pytest.raises(RuntimeError, match="exited with 2"):
        server.start(timeout=15)
    assert server.logs().strip() == f"configuration error: {line}"


def test_the_sync_worker_class_serves_whole_conversations(dify, tmp_path, gunicorn_env):
    dify.script(d.answer("Answered by a sync worker.", delay=0.02))
    server = GunicornReplica({**gunicorn_env(), "GUNICORN_WORKER_CLASS": "sync"}, tmp_path, "sync", workers=2)
    server.start()
    try:
        sim = make_simulator(server.url, poll_interval=0.05)
        conversation = sim.ask("question")
        sim.close()
    finally:
        server.stop()
    assert conversation.finished
    assert conversation.text == "Answered by a sync worker."
    assert "Using worker: sync" in server.logs()


def test_metrics_add_up_every_worker(replica, dify):
    from prometheus_client.parser import text_string_to_metric_families

    dify.script(d.answer("counted", delay=0.01), times=None)
    sim = make_simulator(replica.url, poll_interval=0.05)
    sim.http.close()  # a fresh connection per request, so requests reach both workers
    sim.http = httpx.Client(timeout=10, trust_env=False, limits=httpx.Limits(max_keepalive_connections=0))

    def owners() -> set[str]:
        """The workers that opened a stream so far."""
        lines = [json.loads(x) for x in replica.logs().splitlines() if x.startswith("{")]
        return {e["replica"] for e in lines if "opened" in e.get("msg", "")}

    # The kernel hands each fresh connection to a worker at random: 8 messages all went to one in a CI run (1 in 128).
    # Ask until both have opened one: at least 8, at most 40 (all 40 on one worker: 1 in 2 ** 39).
    asked = 0
    while asked < 8 or (len(owners()) < 2 and asked < 40):
        sim.ask(f"q{asked}", userid=f"m{asked}")
        asked += 1
    sim.close()

    def opened() -> float:
        text = httpx.get(f"{replica.url}/metrics", timeout=5).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "wecom_messages_total" and sample.labels == {"bot": "default", "outcome": "opened"}:
                    return sample.value
        return 0.0

    assert len(owners()) == 2  # both workers took messages
    assert {opened() for _ in range(6)} == {float(asked)}  # whichever worker answers /metrics, the sum is the same


def test_metrics_port_serves_every_worker_and_the_public_port_does_not(dify, redis_client, tmp_path, gunicorn_env):

    metrics_port = free_port()
    env = {**gunicorn_env(), "METRICS_PORT": str(metrics_port)}
    server = GunicornReplica(env, tmp_path, "metrics-port", workers=2).start()
    try:
        dify.script(d.answer("counted"))
        sim = make_simulator(server.url, poll_interval=0.05)
        sim.ask("count me")
        sim.close()
        assert httpx.get(f"{server.url}/metrics", timeout=5).status_code == 404
        scraped = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5)
        assert scraped.status_code == 200
        assert 'wecom_messages_total{bot="default",outcome="opened"} 1.0' in scraped.text
    finally:
        server.stop()


def test_an_oversized_callback_body_gets_its_413_before_the_connection_closes(replica):
    """A 12 MB POST to a callback path (WECOM_MAX_BODY_BYTES is 256 KiB), written as a client writes it, whole,
    before it reads: it is all taken, and the client reads the 413 and its short JSON body. Before, the server
    answered at once and closed with the body unread: the client's write broke (a reset) and the answer could be
    lost with it."""
    size = 12 * 1024 * 1024
    port = int(replica.url.rsplit(":", 1)[1])
    head = "POST /wecom/callback?msg_signature=x&timestamp=1&nonce=n HTTP/1.1\r\nHost: gateway\r\n"
    head += f"Content-Type: application/json\r\nContent-Length: {size}\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=20) as connection:
        connection.sendall(head.encode())
        piece = b"A" * 65536
        for _ in range(size // len(piece)):
            connection.sendall(piece)  # a reset here is the failure
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.endswith(b"}"):
            answer += connection.recv(4096)
    status, _, body = answer.partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 413")
    assert json.loads(body)["error"] == "body_too_large"
