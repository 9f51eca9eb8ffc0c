"""Three replicas as in production: separate gunicorn processes (two workers each) on separate ports, sharing one
Redis (the test's own, so it can be restarted) and the real MariaDB, with external auth. The simulator spreads
retries and polls over all three; then a stream's owner is killed with SIGKILL, another replica is drained with
SIGTERM, and Redis is restarted under load."""

import signal
import threading
import time

import pytest

from demo import dify_standin as d
from demo.replicas import GunicornReplica
from services.chat.texts import CATALOGUE
from tests.conftest import AUTH_KEY, KEYS, make_simulator, wait_until
from tests.e2e.conftest import replica_env

pytestmark = pytest.mark.e2e
ZH = CATALOGUE["zh"]
USERS = [f"user{i}" for i in range(8)]
LEASE_SECONDS = 3
GRACEFUL_SECONDS = 10  # the drain budget is this minus gunicorn.conf.py's 5 s margin


@pytest.fixture
def users(user_table):
    for userid in USERS:
        user_table.add(userid, f"{userid}@corp.example")
    return USERS


@pytest.fixture
def replicas(dify, auth, private_redis, mysql_url, users, tmp_path):
    env = replica_env(
        dify.base_url,
        private_redis.url,
        DIFY_READ_TIMEOUT="20",
        REDIS_SOCKET_TIMEOUT="0.5",
        AUTH_MODE="external",
        AUTH_API_URL=auth.url,
        AUTH_API_KEY=AUTH_KEY,
        DATABASE_URL=mysql_url,
        STREAM_LEASE_SECONDS=str(LEASE_SECONDS),
        GUNICORN_GRACEFUL_TIMEOUT=str(GRACEFUL_SECONDS),
    )
    started = []
    for name in ("replica-0", "replica-1", "replica-2"):
        started.append(GunicornReplica(env, tmp_path, name, workers=2))
    for replica in started:
        replica.start()
    yield started
    for replica in started:
        replica.stop()


def owner_replica(redis_client_for, stream_id):
    owner = redis_client_for.hget(KEYS.stream(stream_id), "owner") or ""
    return owner.split(":")[0]


@pytest.fixture
def store_client(private_redis):
    import redis

    client = redis.Redis.from_url(private_redis.url, decode_responses=True)
    yield client
    client.close()


def follow_like_wecom(sim, first, window=60.0, replicas=None):
    """Poll until finish like WeCom: any replica, about every poll interval, shrugging off failed polls."""
    stream_id = first["stream"]["id"]
    contents = [first["stream"]["content"]]
    deadline = time.monotonic() + window
    index = 0
    while time.monotonic() < deadline:
        time.sleep(sim.poll_interval)
        replica = None if replicas is None else replicas[index % len(replicas)]
        index += 1
        try:
            reply = sim.send(sim.poll_message(stream_id), replica=replica)
        except Exception:  # a 503 or a refused connection: WeCom simply polls again
            continue
        contents.append(reply["stream"]["content"])
        if reply["stream"]["finish"]:
            return contents, reply
    raise AssertionError(f"stream {stream_id} still open after {window}s: {contents[-1][:200]!r}")


def test_retries_and_polls_spread_over_three_replicas(replicas, dify, store_client):
    sim = make_simulator([r.url for r in replicas], poll_interval=0.1)
    dify.script(d.answer("one answer, polled by every replica", delay=0.05), times=None)
    results = {}

    def converse(i, userid):
        payload = sim.text_message(f"question from {userid}", userid=userid)
        first = sim.send(payload, replica=i % 3)
        retry = sim.send(payload, replica=(i + 1) % 3)  # WeCom's retry lands on another replica
        assert retry["stream"]["id"] == first["stream"]["id"]
        results[userid] = follow_like_wecom(sim, first)

    threads = [threading.Thread(target=converse, args=(i, u)) for i, u in enumerate(USERS[:6])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 6
    for contents, final in results.values():
        assert final["stream"]["content"] == "one answer, polled by every replica"
        assert all(final["stream"]["content"].startswith(c) or c == ZH["placeholder"] for c in contents)
    assert len(dify.chat_requests()) == 6  # the retries made no second Dify call
    owners = {owner_replica(store_client, final["stream"]["id"]) for _, final in results.values()}
    assert owners == {"replica-0", "replica-1", "replica-2"}
    sim.close()


def test_sigkill_of_a_streams_owner(replicas, dify, store_client):
    victim, survivors = replicas[0], replicas[1:]
    sim = make_simulator([r.url for r in replicas], poll_interval=0.2)
    dify.script([d.message("text shown before the crash"), d.sleep(60), d.end()], match="shown-then-killed")
    dify.script([d.sleep(60), d.end()], match="killed-before-anything")
    dify.script(d.answer("answered by a surviving replica"), match="killed-before-anything")

    shown = sim.send(sim.text_message("shown-then-killed", userid="user0"), replica=0)
    silent = sim.send(sim.text_message("killed-before-anything", userid="user1"), replica=0)
    # the victim must have made both Dify calls (taking both slow scripts) before it dies
    assert len(dify.wait_for_requests(2)) == 2
    assert wait_until(lambda: store_client.llen(KEYS.stream_chunks(shown["stream"]["id"])) > 0, timeout=5)
    assert owner_replica(store_client, shown["stream"]["id"]) == "replica-0"

    victim.signal(signal.SIGKILL)
    killed_at = time.monotonic()
    results = {}

    def follow(name, first):
        results[name] = follow_like_wecom(sim, first, replicas=[1, 2]), time.monotonic() - killed_at

    threads = [threading.Thread(target=follow, args=a) for a in (("shown", shown), ("silent", silent))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    (_, final), elapsed = results["shown"]
    assert final["stream"]["content"] == f"text shown before the crash\n\n{ZH['orphaned']}"
    assert elapsed < LEASE_SECONDS + 2  # finished within the lease time (plus a poll)
    (_, final), _ = results["silent"]
    assert final["stream"]["content"] == "answered by a surviving replica"
    assert owner_replica(store_client, silent["stream"]["id"]) in ("replica-1", "replica-2")
    assert all(r.process.poll() is None for r in survivors)
    sim.close()


def test_sigterm_drains_then_hands_over(replicas, dify, store_client):
    draining = replicas[0]
    sim = make_simulator([r.url for r in replicas], poll_interval=0.2)
    dify.script(d.answer("finished while its replica drained", delay=0.15), match="short")
    dify.script([d.message("too long for the drain"), d.sleep(60), d.end()], match="long")
    short = sim.send(sim.text_message("short", userid="user2"), replica=0)
    long = sim.send(sim.text_message("long", userid="user3"), replica=0)
    assert wait_until(lambda: store_client.llen(KEYS.stream_chunks(long["stream"]["id"])) > 0, timeout=10)

    draining.signal(signal.SIGTERM)
    signalled = time.monotonic()
    (_, short_final) = follow_like_wecom(sim, short, replicas=[1, 2])
    assert short_final["stream"]["content"] == "finished while its replica drained"
    (_, long_final) = follow_like_wecom(sim, long, replicas=[1, 2])
    assert long_final["stream"]["content"] == f"too long for the drain\n\n{ZH['orphaned']}"
    draining.process.wait(GRACEFUL_SECONDS + 5)
    assert time.monotonic() - signalled < GRACEFUL_SECONDS + 5
    logs = draining.logs()
    assert "handed 1 unfinished streams over" in logs
    assert store_client.hget(KEYS.stream(long["stream"]["id"]), "handed_over_at")
    # new messages are answered by the others meanwhile
    dify.script(d.answer("served elsewhere"))
    assert (
        follow_like_wecom(sim, sim.send(sim.text_message("new", userid="user4"), replica=1))[1]["stream"]["content"]
        == "served elsewhere"
    )
    sim.close()


def test_redis_restarted_under_load(replicas, dify, private_redis):
    sim = make_simulator([r.url for r in replicas], poll_interval=0.2)
    dify.script(d.answer("a long answer that keeps streaming " * 3, delay=0.15), match="under load", times=None)
    payloads = [sim.text_message("under load", userid=u) for u in USERS[:6]]
    firsts = [sim.send(p, replica=i % 3) for i, p in enumerate(payloads)]
    results = {}

    def follow(i):
        results[i] = follow_like_wecom(sim, firsts[i])

    threads = [threading.Thread(target=follow, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    store = private_redis.client()
    began = lambda: all(store.llen(KEYS.stream_chunks(f["stream"]["id"])) for f in firsts)  # noqa: E731
    assert wait_until(began, timeout=10)  # every answer is streaming
    private_redis.stop()
    during = sim.send(sim.text_message("while Redis is down", userid=USERS[6]), replica=1)
    assert during["stream"]["finish"]
    assert during["stream"]["content"] == ZH["store_unavailable"]
    time.sleep(1.5)  # the outage lasts a moment
    private_redis.start()
    for t in threads:
        t.join()

    # every bubble finished, and every answer reached the user whole through response_url
    assert all(final["stream"]["finish"] for _, final in results.values())
    full = ("a long answer that keeps streaming " * 3).strip()
    for payload in payloads:
        message = sim.inbox.wait_for(payload["response_url"], timeout=20)
        assert message is not None
        assert message["markdown"]["content"].rstrip().endswith(full)
    # the replicas reconnected by themselves: new conversations work everywhere, nothing died
    dify.script(d.answer("after the restart"), times=None)
    for i, replica in enumerate(replicas):
        answer = follow_like_wecom(sim, sim.send(sim.text_message("again", userid=USERS[7]), replica=i))[1]
        assert answer["stream"]["content"] == "after the restart"
        assert replica.process.poll() is None
    sim.close()
