"""Three replicas as in production: separate gunicorn processes (two workers each) on separate ports, sharing one
Redis and the real MariaDB, with external auth; on each Redis topology in turn (one server of the test's own, a
Sentinel set, a Cluster). The simulator spreads retries and polls over all three; a user's fourth open bubble is
refused; a long answer overflows into response_url; a stream's owner is killed with SIGKILL, another replica is
drained with SIGTERM; and Redis itself fails: restarted empty (one server), its master killed (Sentinel,
Cluster). No log line of any replica may show a cross-slot script."""

import signal
import threading
import time

import pytest
from sqlalchemy import select

from demo import dify_standin as d
from demo.redis_server import PrivateRedisServer
from demo.replicas import GunicornReplica
from services.audit.table import wecom_audit
from services.texts import CATALOGUE
from tests.conftest import AUTH_KEY, KEYS, SENTINEL_PASSWORD, Topology, make_simulator, wait_until
from tests.e2e.conftest import replica_env

pytestmark = pytest.mark.e2e
ZH = CATALOGUE["zh"]
USERS = [f"user{i}" for i in range(8)]
LEASE_SECONDS = 3
GRACE_SECONDS = 1.5  # STREAM_TAKEOVER_GRACE_SECONDS: above the 0.5 s socket timeout plus a lease keeper's retry
GRACEFUL_SECONDS = 10  # the drain budget is this minus gunicorn.conf.py's 5 s margin


@pytest.fixture
def users(user_table):
    for userid in USERS:
        user_table.add(userid, f"{userid}@corp.example")
    return USERS


# What a script touching keys of several slots gets from a Redis Cluster, or from a managed cluster proxy.
CROSS_SLOT_ERRORS = ("CROSSSLOT", "non local key", "accessing a non local key", "Lua script attempted to access")


@pytest.fixture(params=["standalone", "sentinel", "cluster"])
def e2e_topology(request, tmp_path):
    """One Redis topology: a server of this test's own, or the session's Sentinel set or Cluster (flushed)."""
    if request.param == "standalone":
        server = PrivateRedisServer(tmp_path / "redis").start()
        yield Topology("standalone", server.url, server)
        server.stop()
        return
    server = request.getfixturevalue("sentinel_set" if request.param == "sentinel" else "redis_cluster")
    server.flush()
    yield Topology(request.param, server.url, server)
    server.flush()


@pytest.fixture
def replicas(request, dify, auth, e2e_topology, mysql_url, users, tmp_path):
    marker = request.node.get_closest_marker("lease")
    lease = marker.args[0] if marker else LEASE_SECONDS
    env = replica_env(
        dify.base_url,
        e2e_topology.url,
        REDIS_SENTINEL_PASSWORD=SENTINEL_PASSWORD,
        DIFY_READ_TIMEOUT="20",
        REDIS_SOCKET_TIMEOUT="0.5",
        # The claim's WAIT for a replica: on this shared 2-core machine an ack can take longer than the 200 ms
        # default, and the failover test kills the master right after a claim (BENCHMARKS.md §7 measures the cost).
        # It must stay below the socket timeout (settings check that).
        REDIS_CLAIM_WAIT_MS="450",
        AUTH_MODE="external",
        AUTH_API_URL=auth.url,
        AUTH_API_KEY=AUTH_KEY,
        DATABASE_URL=mysql_url,
        STREAM_LEASE_SECONDS=str(lease),
        STREAM_TAKEOVER_GRACE_SECONDS=str(GRACE_SECONDS),
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
    logs = "\n".join(replica.logs() for replica in started)
    assert not [error for error in CROSS_SLOT_ERRORS if error in logs]


def owner_replica(redis_client_for, stream_id):
    owner = redis_client_for.hget(KEYS.stream(stream_id), "owner") or ""
    return owner.split(":")[0]


@pytest.fixture
def store_client(e2e_topology):
    client = e2e_topology.client()
    yield client
    client.close()


def follow_like_wecom(sim, first, window=60.0, replicas=None, failures=None):
    """Poll until finish like WeCom: any replica, about every poll interval, shrugging off failed polls (kept in
    `failures`, if given)."""
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
        except Exception as exc:  # a 503 or a refused connection: WeCom simply polls again
            if failures is not None:
                failures.append(str(exc))
            continue
        contents.append(reply["stream"]["content"])
        if reply["stream"]["finish"]:
            return contents, reply
    raise AssertionError(f"stream {stream_id} still open after {window}s: {contents[-1][:200]!r}")


def audit_rows(engine, payloads: list[dict]) -> list[dict]:
    """The audit rows (services/audit) of these messages."""
    query = select(wecom_audit).where(wecom_audit.c.msgid.in_([payload["msgid"] for payload in payloads]))
    with engine.connect() as connection:
        return [dict(row._mapping) for row in connection.execute(query)]


def test_retries_and_polls_spread_over_three_replicas(replicas, dify, store_client, user_table):
    sim = make_simulator([r.url for r in replicas], poll_interval=0.1)
    dify.script(d.answer("one answer, polled by every replica", delay=0.05), times=None)
    results, payloads = {}, []

    def converse(i, userid):
        payload = sim.text_message(f"question from {userid}", userid=userid)
        payloads.append(payload)
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
    assert wait_until(lambda: len(audit_rows(user_table.engine, payloads)) == 6)  # one row each, retries and all
    assert {row["replica"] for row in audit_rows(user_table.engine, payloads)} == owners
    sim.close()


def test_sigkill_of_a_streams_owner(replicas, dify, store_client, user_table):
    victim, survivors = replicas[0], replicas[1:]
    sim = make_simulator([r.url for r in replicas], poll_interval=0.2)
    dify.script([d.message("text shown before the crash"), d.sleep(60), d.end()], match="shown-then-killed")
    dify.script([d.sleep(60), d.end()], match="killed-before-anything")
    dify.script(d.answer("answered by a surviving replica"), match="killed-before-anything")

    payloads = [
        sim.text_message("shown-then-killed", userid="user0"),
        sim.text_message("killed-before-anything", userid="user1"),
    ]
    shown = sim.send(payloads[0], replica=0)
    silent = sim.send(payloads[1], replica=0)
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
    assert elapsed < LEASE_SECONDS + GRACE_SECONDS + 2  # within the lease and the take-over grace (plus a poll)
    (_, final), _ = results["silent"]
    assert final["stream"]["content"] == "answered by a surviving replica"
    assert owner_replica(store_client, silent["stream"]["id"]) in ("replica-1", "replica-2")
    assert all(r.process.poll() is None for r in survivors)
    # One audit row each: the orphaned answer as its bubble ended, the restarted one by the survivor that answered.
    assert wait_until(lambda: len(audit_rows(user_table.engine, payloads)) == 2)
    rows = {row["question"]: row for row in audit_rows(user_table.engine, payloads)}
    assert rows["shown-then-killed"]["outcome"] == "note"
    assert rows["shown-then-killed"]["answer"] == f"text shown before the crash\n\n{ZH['orphaned']}"
    assert rows["killed-before-anything"]["outcome"] == "answered"
    assert rows["killed-before-anything"]["replica"] in ("replica-1", "replica-2")
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


@pytest.mark.parametrize("e2e_topology", ["standalone"], indirect=True)
def test_redis_restarted_under_load(replicas, dify, e2e_topology):
    private_redis = e2e_topology.server
    sim = make_simulator([r.url for r in replicas], poll_interval=0.2)
    dify.script(d.answer("a long answer that keeps streaming " * 3, delay=0.15), match="under load", times=None)
    dify.script(d.answer("kept through the restart"), match="while Redis is down")
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
    assert not during["stream"]["finish"]  # kept in the database, its bubble open
    time.sleep(1.5)  # the outage lasts a moment
    private_redis.start()
    for t in threads:
        t.join()
    # the message Redis could not take, kept in the database, is answered by its bubble's polls, on any replica
    assert follow_like_wecom(sim, during)[1]["stream"]["content"] == "kept through the restart"

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


def test_a_long_answer_fills_the_bubble_and_the_rest_follows(replicas, dify):
    text = "".join(f"段落 {i}：企业微信一个气泡最多显示 20480 字节，其余通过 response_url 发送。\n" for i in range(400))
    dify.script(d.answer(text, pieces=40, delay=0.02))
    sim = make_simulator([r.url for r in replicas], poll_interval=0.2)
    payload = sim.text_message("a long one", userid="user5")
    _, final = follow_like_wecom(sim, sim.send(payload, replica=0))
    shown, note = final["stream"]["content"].rsplit("\n\n", 1)
    assert note == ZH["overflow_continues"]
    message = sim.inbox.wait_for(payload["response_url"], timeout=10)
    assert message is not None
    header = ZH["continued"] + "\n\n"
    assert message["markdown"]["content"].startswith(header)
    assert shown + message["markdown"]["content"][len(header) :] == text
    sim.close()


def test_a_users_fourth_open_bubble_is_refused_whichever_replicas_take_them(replicas, dify):
    dify.script([d.message("taking a while"), d.sleep(3), d.end()], match="slow", times=3)
    sim = make_simulator([r.url for r in replicas], poll_interval=0.2)
    firsts = [sim.send(sim.text_message(f"slow {i}", userid="user6"), replica=i % 3) for i in range(4)]
    assert [first["stream"]["finish"] for first in firsts] == [False, False, False, True]
    assert firsts[3]["stream"]["content"] == ZH["too_many_in_flight"]
    for first in firsts[:3]:
        assert follow_like_wecom(sim, first)[1]["stream"]["content"] == "taking a while"
    assert len(dify.chat_requests()) == 3
    sim.close()


@pytest.mark.parametrize("e2e_topology", ["sentinel", "cluster"], indirect=True)
# Longer than a failover plus the age of the lease's copy on the new master (up to a third of a lease), as the
# overlays advise: a Cluster's failover takes up to 4 s here, a Sentinel election that splits its votes is tried
# again after 2 x failover-timeout (6 s). A lease that ran out meanwhile would let a poll restart an answer whose
# owner is alive but could not reach Redis, a second Dify call.
@pytest.mark.lease(20)
def test_a_master_failover_mid_answer(replicas, dify, e2e_topology, store_client):
    """The master (or, on a Cluster, the master of a streaming answer's slot) is killed mid-answer: polls fail
    meanwhile (WeCom polls again), the replicas reconnect to the new master by themselves, every bubble finishes,
    every user gets the whole answer (in the bubble, or through response_url), and no message is asked twice:
    not even one claimed just before the failover and retried after it."""
    full = "".join(f"第 {i} 句。" for i in range(40))
    dify.script(d.answer(full, pieces=40, delay=0.15), match="during the failover", times=None)
    sim = make_simulator([r.url for r in replicas], poll_interval=0.2)
    payloads = [sim.text_message("during the failover", userid=user) for user in USERS[:4]]
    firsts = [sim.send(payload, replica=i % 3) for i, payload in enumerate(payloads)]
    began = lambda: all(store_client.llen(KEYS.stream_chunks(f["stream"]["id"])) for f in firsts)  # noqa: E731
    assert wait_until(began, timeout=10)
    claimed = sim.text_message("during the failover", userid=USERS[4])
    claimed_first = sim.send(claimed, replica=0)  # claimed just before the master dies

    server = e2e_topology.server
    sentinel, key = e2e_topology.name == "sentinel", KEYS.wecom_msg(claimed["msgid"])
    killed = server.kill_master() if sentinel else server.kill_master_of(key)  # on a Cluster, the claim's master
    try:
        server.wait_for_failover(killed) if sentinel else server.wait_for_failover(key, killed)
        retried = sim.send(claimed, replica=1)  # WeCom's retry of that message, after the failover
        assert retried["stream"]["id"] == claimed_first["stream"]["id"]

        results, failures = {}, []

        def follow(i, first):
            results[i] = follow_like_wecom(sim, first, failures=failures)

        threads = [threading.Thread(target=follow, args=(i, f)) for i, f in enumerate([*firsts, claimed_first])]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i, payload in enumerate([*payloads, claimed]):
            final = results[i][1]["stream"]
            assert final["finish"]
            if final["content"] != full:  # the bubble was cut short: the whole answer came through response_url
                message = sim.inbox.wait_for(payload["response_url"], timeout=20)
                assert message is not None, final["content"]
                assert message["markdown"]["content"].rstrip().endswith(full[-20:])
        assert len(dify.chat_requests()) == 5  # no message was asked twice
        assert [f for f in failures if not f.startswith("HTTP 503")] == []  # polls meanwhile: 503s, never another 5xx
    finally:
        server.restart(killed)  # the next test gets the whole topology back
        sim.close()
