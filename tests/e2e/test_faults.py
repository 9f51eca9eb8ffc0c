"""Fault injection against a running multi-replica setup: two gunicorn replicas (two workers each) with external
auth, sharing a private Redis and a private MariaDB that the tests stop and restart, with the Dify and auth
stand-ins misbehaving on demand.

For every fault: each affected bubble finishes with the expected clear message, no stream stays active and no
threads pile up in the workers, and once the fault is gone the service answers normally again by itself. The
table of faults and outcomes is written to test-artifacts/fault-report.md.
"""

from __future__ import annotations

import itertools
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import pymysql
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import delete

from config.settings import PROJECT_ROOT
from demo import auth_standin
from demo import dify_standin as d
from demo.mariadb_server import PrivateMariaDB
from demo.redis_server import PrivateRedisServer
from demo.replicas import GunicornReplica
from services.auth import db
from services.texts import CATALOGUE
from tests.conftest import AUTH_KEY, KEYS, make_simulator, wait_until
from tests.e2e.conftest import replica_env

pytestmark = pytest.mark.e2e
ZH = CATALOGUE["zh"]
ROWS: list[tuple[str, str, str, str]] = []
USER_IDS = itertools.count()


@pytest.fixture(scope="module")
def private_db():
    """A MariaDB of this module's own, which its tests stop and start; the users every scenario needs."""
    server = PrivateMariaDB().start()
    admin = pymysql.connect(host="127.0.0.1", port=server.port, user="root", autocommit=True)
    with admin.cursor() as cursor:
        cursor.execute("CREATE DATABASE gateway CHARACTER SET utf8mb4")
    admin.close()
    engine = db.make_engine(f"{server.url}/gateway")
    db.init_schema(engine)
    with engine.begin() as connection:
        connection.execute(delete(db.wecom_users))
    with engine.begin() as connection:  # enough users for every scenario's fresh ones
        connection.execute(
            db.wecom_users.insert(),
            [{"wecom_userid": f"user{i}", "account": f"user{i}@corp.example"} for i in range(1000)],
        )
    engine.dispose()
    yield server
    server.remove()


@pytest.fixture(scope="module")
def module_redis():
    server = PrivateRedisServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def replicas(dify_server, auth_server, module_redis, private_db):
    log_dir = Path(tempfile.mkdtemp(prefix="fault-logs-"))
    env = replica_env(
        dify_server.base_url,
        module_redis.url,
        DIFY_READ_TIMEOUT="2",
        DIFY_MAX_RETRIES="1",
        DIFY_RETRY_BACKOFF="0.05",
        DIFY_RETRY_SECONDS="2",  # a lasting outage: its note after a short wait (a short one is waited out)
        AUTH_RETRY_SECONDS="2",
        REDIS_SOCKET_TIMEOUT="0.5",
        AUTH_MODE="external",
        AUTH_API_URL=auth_server.url,
        AUTH_API_KEY=AUTH_KEY,
        AUTH_TIMEOUT="1",
        DATABASE_URL=f"{private_db.url}/gateway",
        DATABASE_TIMEOUT="1",
        STREAM_LEASE_SECONDS="3",
        RATE_LIMIT_PER_MINUTE="0",
    )
    started = [GunicornReplica(env, log_dir, f"fault-{i}", workers=2).start() for i in range(2)]
    yield started
    for replica in started:
        replica.stop()
    report = [
        "| fault | what the users saw | afterwards | threads in the 4 workers, before → after |",
        "|---|---|---|---|",
    ]
    report += [f"| {fault} | {seen} | {after} | {threads} |" for fault, seen, after, threads in ROWS]
    (PROJECT_ROOT / "test-artifacts").mkdir(exist_ok=True)
    (PROJECT_ROOT / "test-artifacts" / "fault-report.md").write_text("\n".join(report) + "\n")


@pytest.fixture
def sim(replicas):
    simulator = make_simulator([r.url for r in replicas], poll_interval=0.1)
    yield simulator
    simulator.close()


def fresh_user() -> str:
    return f"user{next(USER_IDS)}"


def worker_threads(replicas) -> int:
    return sum(w.num_threads() for r in replicas for w in psutil.Process(r.process.pid).children())


def active_streams(replica) -> float:
    """The replica's streams being answered now (1 while its /metrics does not answer: it is not settled)."""
    try:
        text = httpx.get(f"{replica.url}/metrics", timeout=5).text
    except httpx.HTTPError:
        return 1.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "streams_active":
                return sample.value
    return 0.0


def settle(replicas, timeout: float = 30.0) -> None:
    """Wait until no replica streams anything any more: long enough for an answer no poll showed (its callback's
    reply was lost under load) to end its tries through response_url, which these tests do not serve (five, over
    15 s)."""
    assert wait_until(lambda: all(active_streams(r) == 0 for r in replicas), timeout), "streams still active"


def ask_like_wecom(sim, content: str, userid: str, window: float = 30.0) -> str:
    """Send, then poll any replica about every interval until finish, shrugging off failed polls like WeCom."""
    first = None
    deadline = time.monotonic() + window
    while first is None and time.monotonic() < deadline:
        try:
            first = sim.send(sim.text_message(content, userid=userid))
        except Exception:  # a refused or failed callback: WeCom retries
            time.sleep(0.2)
    stream = first["stream"]
    while not stream["finish"] and time.monotonic() < deadline:
        time.sleep(sim.poll_interval)
        try:
            stream = sim.send(sim.poll_message(stream["id"], userid))["stream"]
        except Exception:
            continue
    assert stream["finish"], f"bubble still open: {stream['content'][:100]!r}"
    return stream["content"]


def recovered(sim, dify, replicas) -> str:
    dify.reset()
    dify.script(d.answer("back to normal"), match="after the fault", times=None)
    answer = ask_like_wecom(sim, "after the fault", fresh_user())
    assert answer == "back to normal"
    settle(replicas)
    return "recovered by itself"


@pytest.fixture
def baseline(replicas, sim, dify):
    """Warm every worker up with concurrent conversations (gunicorn's request threads and our lazily started
    threads all exist then), and count the workers' threads."""
    import threading

    dify.script(d.answer("warm", delay=0.05), match="warm up", times=None)
    users = [fresh_user() for _ in range(12)]
    threads = [threading.Thread(target=ask_like_wecom, args=(sim, "warm up", u)) for u in users]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    settle(replicas)
    return worker_threads(replicas)


def record(fault: str, seen: str, after: str, replicas, baseline: int) -> None:
    threads = worker_threads(replicas)
    assert threads <= baseline + 4, f"threads grew from {baseline} to {threads}"
    ROWS.append((fault, seen, after, f"{baseline} → {threads}"))


DIFY_FAULTS = [
    ("Dify HTTP 401", [d.http_error(401, "unauthorized", "Access token is invalid")], "", "dify_rejected"),
    ("Dify HTTP 404", [d.http_error(404, "not_found", "The requested URL was not found")], "", "dify_failed"),
    ("Dify HTTP 429", [d.http_error(429, "too_many_requests")], "", "dify_busy"),
    ("Dify HTTP 500", [d.http_error(500, "internal_server_error")], "", "dify_unavailable"),
    (
        "Dify `error` event mid-stream",
        [d.message("partial "), d.error("completion_request_error", "boom", 400)],
        "partial",
        "dify_failed",
    ),
    ("Dify cut mid-stream", [d.message("partial "), d.sleep(0.1), d.cut()], "partial", "stream_cut"),
    ("Dify stalls past the read timeout", [d.message("partial "), d.stall(6)], "partial", "timeout"),
    (
        "Dify sends garbage SSE",
        [d.raw(b"data: {not json\n\n"), d.raw(b"\x00\xff\xfe garbage"), d.close()],
        "",
        "stream_cut",
    ),
    ("Dify's first byte slower than the read timeout", [d.first_byte_delay(4), *d.answer("late")], "", "timeout"),
]


@pytest.mark.parametrize(("fault", "steps", "partial", "note"), DIFY_FAULTS, ids=[f[0] for f in DIFY_FAULTS])
def test_dify_faults(fault, steps, partial, note, replicas, sim, dify, baseline):
    dify.script(steps, match="faulty", times=None)
    for _ in range(3):
        answer = ask_like_wecom(sim, "faulty", fresh_user())
        assert answer == (f"{partial.strip()}\n\n{ZH[note]}" if partial else ZH[note])
    settle(replicas)
    record(
        fault, f"{'partial text + ' if partial else ''}“{ZH[note]}”", recovered(sim, dify, replicas), replicas, baseline
    )


def test_a_slow_first_byte_within_the_timeout_is_only_slow(replicas, sim, dify, baseline):
    dify.script([d.first_byte_delay(1.2), *d.answer("slow but fine")], match="faulty", times=None)
    assert ask_like_wecom(sim, "faulty", fresh_user()) == "slow but fine"
    record("Dify's first byte slow (1.2 s, under the 2 s timeout)", "the answer, later", "-", replicas, baseline)


AUTH_FAULTS = [
    ("auth API down (HTTP 503)", auth_standin.DOWN),
    ("auth API slow (past its 1 s timeout)", auth_standin.SLOW),
    ("auth API answers malformed JSON", auth_standin.MALFORMED),
    ("auth API answers without a token", auth_standin.NO_TOKEN),
]


@pytest.mark.parametrize(("fault", "mode"), AUTH_FAULTS, ids=[f[0] for f in AUTH_FAULTS])
def test_auth_api_faults(fault, mode, replicas, sim, dify, auth, baseline):
    cached = fresh_user()
    dify.script(d.answer("answered"), match="hello", times=None)
    assert ask_like_wecom(sim, "hello", cached) == "answered"  # this user's token is now cached
    auth.mode = mode
    for _ in range(2):
        assert ask_like_wecom(sim, "hello", fresh_user()) == ZH["auth_unavailable"]
    assert ask_like_wecom(sim, "hello", cached) == "answered"  # cached users keep working
    auth.reset()
    settle(replicas)
    record(
        fault,
        f"new users: “{ZH['auth_unavailable']}”; cached users answered",
        recovered(sim, dify, replicas),
        replicas,
        baseline,
    )


def test_mariadb_stopped(replicas, sim, dify, private_db, baseline):
    cached = fresh_user()
    dify.script(d.answer("answered"), match="hello", times=None)
    assert ask_like_wecom(sim, "hello", cached) == "answered"
    private_db.stop()
    try:
        for _ in range(2):
            assert ask_like_wecom(sim, "hello", fresh_user()) == ZH["database_unavailable"]
        assert ask_like_wecom(sim, "hello", cached) == "answered"
        not_ready = [httpx.get(f"{r.url}/readyz", timeout=5) for r in replicas]
        assert all(r.status_code == 503 and "database" in r.json()["failed"] for r in not_ready)
    finally:
        private_db.start()
    ready = lambda: all(httpx.get(f"{r.url}/readyz", timeout=5).status_code == 200 for r in replicas)  # noqa: E731
    assert wait_until(ready, timeout=20), "replicas did not become ready again"
    settle(replicas)
    record(
        "MariaDB stopped",
        f"uncached users: “{ZH['database_unavailable']}”; cached users answered; /readyz 503",
        recovered(sim, dify, replicas),
        replicas,
        baseline,
    )


def test_redis_stopped_and_restarted(replicas, sim, dify, module_redis, baseline):
    dify.script(d.answer("a long answer during the Redis outage " * 2, delay=0.15), match="during", times=None)
    payloads = [sim.text_message("during", userid=fresh_user()) for _ in range(3)]
    firsts = [sim.send(p) for p in payloads]
    store = module_redis.client()
    written = lambda: all(store.llen(KEYS.stream_chunks(f["stream"]["id"])) for f in firsts)  # noqa: E731
    assert wait_until(written, timeout=10)  # every answer has begun
    dify.script(d.answer("kept until Redis was back"), match="hello?")
    module_redis.stop()
    kept = sim.send(sim.text_message("hello?", userid=fresh_user()))
    assert not kept["stream"]["finish"]  # kept in the database, its bubble open
    assert sim.post(sim.poll_message(firsts[0]["stream"]["id"])).status_code == 503
    time.sleep(1.0)  # the outage lasts a second
    module_redis.start()
    for first, payload in zip(firsts, payloads, strict=True):
        stream = first["stream"]
        deadline = time.monotonic() + 30
        while not stream["finish"] and time.monotonic() < deadline:
            time.sleep(0.1)
            try:
                stream = sim.send(sim.poll_message(stream["id"], payload["from"]["userid"]))["stream"]
            except Exception:
                continue
        assert stream["finish"]
        assert stream["content"] == ZH["unknown_stream"]
        message = sim.inbox.wait_for(payload["response_url"], timeout=20)
        assert message
        assert message["markdown"]["content"].rstrip().endswith("during the Redis outage")
    stream = kept["stream"]
    deadline = time.monotonic() + 30
    while not stream["finish"] and time.monotonic() < deadline:  # kept in the database: its polls take it
        time.sleep(0.2)
        stream = sim.send(sim.poll_message(stream["id"]))["stream"]
    assert stream["content"] == "kept until Redis was back"
    settle(replicas)
    record(
        "Redis stopped, restarted empty",
        "new messages: kept in the database, answered once Redis is back; polls 503; running "
        "bubbles finished, whole answers sent through response_url",
        recovered(sim, dify, replicas),
        replicas,
        baseline,
    )
