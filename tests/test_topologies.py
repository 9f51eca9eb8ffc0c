"""The gateway on every Redis topology (docs/configuration.md), each started for real on private ports: one server, a
Sentinel set (a master, two replicas, three sentinels requiring a password) and a Cluster (three masters with a
replica each). Whole conversations, retries, the in-flight limit, the operator commands and readiness behave the
same on all three."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
import redis
from redis.crc import key_slot

from demo import dify_standin as d
from demo.redis_server import PrivateRedisServer
from demo.replicas import free_port
from demo.wecom_api_standin import WeComApiStandIn
from services import redis_conn
from services.gateway import VERSION_ASKED_EVERY_SECONDS
from services.redis_conn import connect_redis
from services.rules.rules import MASK
from services.texts import CATALOGUE
from tests.conftest import KEYS, SENTINEL_PASSWORD, make_simulator, wait_idle, wait_until

ZH = CATALOGUE["zh"]


@pytest.fixture
def on_topology(topology, make_pair):
    """Two replicas on the topology under test."""
    return make_pair(**topology.settings)


def test_a_conversation_streams_and_continues(topology, on_topology, dify):
    first, second = on_topology
    dify.script(d.answer("Hello from every topology.", pieces=5, delay=0.02))
    dify.script(d.answer("And the second turn."))
    sim = make_simulator([first.url, second.url])
    conversation = sim.ask("hi")
    assert conversation.text == "Hello from every topology."
    assert len(conversation.frames) > 2  # it grew over several polls, alternating between the replicas
    assert sim.ask("again").text == "And the second turn."
    [first_request, second_request] = dify.chat_requests()
    assert second_request["conversation_id"]  # the second message continued the conversation
    client = topology.client()
    meta = client.hgetall(KEYS.stream(conversation.stream_id))
    assert meta["status"] == "done"
    assert client.exists(KEYS.feedback(conversation.stream_id))
    client.close()
    sim.close()


def test_simultaneous_retries_on_two_replicas_make_one_dify_call(topology, on_topology, dify):
    sim = make_simulator([r.url for r in on_topology])
    dify.script(d.answer("only once", delay=0.05), times=None)
    payload = sim.text_message("dup", msgid="msg-dup-topology")
    replies, barrier = [], threading.Barrier(6)

    def send(i):
        barrier.wait()
        replies.append(sim.send(payload, replica=i % 2))

    threads = [threading.Thread(target=send, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({r["stream"]["id"] for r in replies}) == 1
    sim.follow(replies[0])
    wait_idle(*on_topology)
    assert len(dify.chat_requests()) == 1
    sim.close()


def test_at_most_three_open_bubbles_per_user_across_replicas(topology, on_topology, dify):
    sim = make_simulator([r.url for r in on_topology])
    dify.script([d.message("busy"), d.sleep(3), d.end()], times=3)
    replies = [sim.send(sim.text_message(f"q{i}", userid="eager"), replica=i % 2) for i in range(4)]
    assert [r["stream"]["finish"] for r in replies] == [False, False, False, True]
    assert replies[3]["stream"]["content"] == ZH["too_many_in_flight"]
    retry = sim.send(sim.text_message("q3", userid="eager", msgid=None), replica=0)  # a new message, still refused
    assert retry["stream"]["content"] == ZH["too_many_in_flight"]
    for reply in replies[:3]:
        assert sim.follow(reply, userid="eager").text == "busy"
    dify.script(d.answer("room again"))
    assert sim.ask("q4", userid="eager").text == "room again"  # finished answers freed their slots
    sim.close()


def test_operator_commands_and_readiness(topology, on_topology, dify):
    live = on_topology[0]
    dify.script(d.answer("inspect me"))
    sim = make_simulator(live.url)
    conversation = sim.ask("for the operators")
    sim.close()
    runner = live.app.test_cli_runner()
    assert conversation.stream_id in runner.invoke(args=["streams", "list"]).output
    shown = runner.invoke(args=["streams", "show", conversation.stream_id]).output
    assert "inspect me" in shown
    assert "status           done" in shown
    tail = runner.invoke(args=["streams", "tail", conversation.stream_id]).output
    assert tail.strip().endswith("[done]")
    assert "conversation" in runner.invoke(args=["users", "token", "alice"]).output
    purged = runner.invoke(args=["streams", "purge", conversation.stream_id, "--yes"]).output
    assert purged.startswith("deleted ")
    assert conversation.stream_id not in runner.invoke(args=["streams", "list"]).output
    assert live.app.test_client().get("/readyz").status_code == 200
    assert live.app.extensions["gateway"].redis_problem == ""  # new enough


def test_a_cluster_replica_down_does_not_make_a_replica_unready_for_the_version_check(redis_cluster, make_app):
    probe = connect_redis(redis_cluster.url)
    replica = next(node for node in redis_cluster.nodes if node.port in {n.port for n in probe.get_replicas()})
    probe.close()
    replica.kill()
    try:
        app = make_app(redis_url=redis_cluster.url, redis_socket_timeout=0.5)
        # PING answers: Redis serves. (Its version is asked again later: until the cluster marks the node failed,
        # a few seconds, the slot map lists it and its INFO fails.)
        assert app.test_client().get("/readyz").status_code == 200
    finally:
        redis_cluster.restart(replica)
    app.extensions["gateway"].redis_version_asked_at -= VERSION_ASKED_EVERY_SECONDS  # as if that long had passed
    assert app.test_client().get("/readyz").status_code == 200
    assert app.extensions["gateway"].redis_problem == ""


def test_the_version_check_asks_every_node_of_a_cluster(redis_cluster, monkeypatch):
    def info_calls(node) -> int:
        return node.client().info("commandstats").get("cmdstat_info", {}).get("calls", 0)

    client = connect_redis(redis_cluster.url)
    listed = [node for node in redis_cluster.nodes if node.port in {n.port for n in client.get_nodes()}]
    assert len(listed) >= 3  # the masters, and the replicas the slot map lists (one just restarted may not be yet)
    before = [info_calls(node) for node in listed]
    monkeypatch.setattr(redis_conn, "OLDEST_REDIS", (99, 0))  # as if the nodes were too old
    problem = redis_conn.version_problem(client)
    assert problem.startswith("Redis 7.") and "is older than 99.0" in problem
    after = [info_calls(node) for node in listed]
    assert [a - b for a, b in zip(after, before, strict=True)] == [2] * len(listed)  # its INFO, and our count's
    client.close()


def planned_failover(topology: str, server) -> None:
    """A maintenance failover, waited for until the new masters take writes: `SENTINEL FAILOVER`, or
    `CLUSTER FAILOVER` on every replica of a Cluster (each shard's master changes)."""
    if topology == "sentinel":
        old = server.current_master()
        server.sentinel_client(server.sentinels[0]).execute_command("SENTINEL", "FAILOVER", server.service_name)
        server.wait_for_failover(old)
        assert wait_until(lambda: old.client().info("replication")["role"] == "slave", timeout=30)
        return
    replicas = [node for node in server.nodes if node.client().info("replication")["role"] == "slave"]
    for replica in replicas:
        replica.client().execute_command("CLUSTER", "FAILOVER")
    assert wait_until(lambda: all(r.client().info("replication")["role"] == "master" for r in replicas), timeout=30)
    assert wait_until(server.healthy, timeout=30)


@pytest.mark.parametrize("kind", ["sentinel", "cluster"])
def test_after_a_planned_failover_no_message_is_refused_and_no_poll_fails(kind, request, make_pair, dify):
    """Once the new masters take writes, every message is answered and every poll succeeds, on connections that
    pointed at the old masters until then (a Sentinel-managed connection kept its dead socket after the failover's
    CLIENT KILL, so the poll path's one retry went to the same dead socket: a 503 for each such poll)."""
    server = request.getfixturevalue("sentinel_set" if kind == "sentinel" else "redis_cluster")
    server.flush()
    replicas = make_pair(redis_url=server.url, redis_sentinel_password=SENTINEL_PASSWORD)
    sim = make_simulator([r.url for r in replicas])
    dify.script(d.answer("answered"), times=None)
    for i in range(4):  # every process and path holds connections to the old masters now
        assert sim.ask(f"warm-up {i}", userid=f"warm{i}").text == "answered"
    planned_failover(kind, server)
    for i in range(8):
        conversation = sim.ask(f"after the failover {i}", userid=f"user{i}")  # a 503 would raise ReplyError
        assert conversation.text == "answered", conversation.text
    wait_idle(*replicas)
    sim.close()


def test_a_timed_out_command_never_hands_its_late_reply_to_the_next_one(topology):
    """A command that times out may still be answered. redis-py's Sentinel connections do not close themselves on
    a timeout, and the client's retry (for dropped connections only) did not close them either: the pooled
    connection went back with the reply in flight, and the next command on it read that reply as its own (the
    fault campaign on Sentinel saw a GET return a number, and the long connection's lease script return nil)."""
    from services.redis_conn import connect_redis

    client = connect_redis(topology.url, socket_timeout=0.3, sentinel_password=SENTINEL_PASSWORD)
    try:
        client.set("{t}a", "A", ex=60)
        client.set("{t}b", "B", ex=60)
        with pytest.raises(redis.TimeoutError):
            client.execute_command("BLPOP", "{t}nothing", 1)  # answered (nil) after 1 s, past the 0.3 s timeout
        assert client.get("{t}a") == "A"
        assert client.get("{t}b") == "B"
    finally:
        client.close()


_SET = "return redis.call('SET', KEYS[1], ARGV[1])"


def _getkeys_calls(cluster) -> int:
    """How many COMMAND GETKEYS the running nodes of `cluster` have answered."""
    stats = [node.client().info("commandstats") for node in cluster.nodes if node.running]
    return sum(found.get("cmdstat_command|getkeys", {}).get("calls", 0) for found in stats)


def test_a_pipelined_script_call_asks_no_node_for_its_keys(redis_cluster):
    """A script call in a cluster pipeline goes by its first key's slot, as a single call does: redis-py would ask
    its default node which arguments are keys first (a round trip more per call)."""
    from services.lua import LuaScript
    from services.redis_conn import connect_redis
    from services.replication import raise_first_error

    client = connect_redis(redis_cluster.url)
    script = LuaScript(client, _SET)
    calls = [([f"{{k{i}}}x"], ["1"]) for i in range(20)]
    raise_first_error(script.run_each(calls))  # loads the script
    before = _getkeys_calls(redis_cluster)
    raise_first_error(script.run_each(calls))
    assert _getkeys_calls(redis_cluster) == before
    client.close()


def test_a_pipelined_script_call_follows_the_failover_of_the_clients_default_node(redis_cluster):
    """The master the client uses for commands without keys dies. Pipelined script calls on its slots fail until a
    replica takes over, and then go there, as a single command does. (redis-py's pipeline asked that dead node which
    arguments were keys before anything else, and that error never made the client refresh its map or pick another
    node: a gateway process failed every stream write for 40 s after a failover its neighbours had followed.)"""
    from services.lua import LuaScript
    from services.redis_conn import REDIS_FAILURES, connect_redis
    from services.replication import raise_first_error

    client = connect_redis(redis_cluster.url, socket_timeout=0.5)
    script = LuaScript(client, _SET)
    calls = [([f"{{k{i}}}x"], ["1"]) for i in range(20)]
    raise_first_error(script.run_each(calls))
    default = client.get_default_node()
    killed = next(node for node in redis_cluster.nodes if node.port == default.port)
    lost_key = next(keys[0] for keys, _ in calls if client.get_node_from_key(keys[0]).port == killed.port)
    killed.kill()
    try:
        with pytest.raises(REDIS_FAILURES):  # meanwhile: no node takes that slot's writes
            raise_first_error(script.run_each(calls))
        redis_cluster.wait_for_failover(lost_key, killed)

        def written() -> bool:
            try:
                raise_first_error(script.run_each(calls))
            except REDIS_FAILURES:
                return False
            return True

        assert wait_until(written, timeout=5)
    finally:
        client.close()
        redis_cluster.restart(killed)


def test_a_private_server_whose_port_was_taken_meanwhile_starts_on_another(tmp_path):
    """The tests' own servers choose free ports, which another worker's server may take before ours binds them (a
    Cluster once failed to form so): ours then starts on another port, never trusting the server that answers."""
    holder = PrivateRedisServer(tmp_path / "holder").start()
    ports = iter([holder.port])
    server = PrivateRedisServer(tmp_path / "ours", choose_port=lambda: next(ports, None) or free_port())
    try:
        assert server.port == holder.port
        server.start()
        assert server.port != holder.port
        assert int(server.client().info("server")["process_id"]) == server.process.pid
    finally:
        server.stop()
        holder.stop()


def test_a_private_mariadb_whose_port_was_taken_meanwhile_starts_on_another():
    """The same race for the tests' MariaDB (a fresh-clone run lost one test worker's every database test to it):
    a first start whose port another process took moves to another port and answers there."""
    import socket

    import pymysql

    from demo.mariadb_server import PrivateMariaDB, mariadb_binaries

    if mariadb_binaries() is None:
        pytest.skip("mariadb-server is not installed")
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        server = PrivateMariaDB()
        server.port = taken = holder.getsockname()[1]
        try:
            server.start()
            assert server.port != taken
            pymysql.connect(host="127.0.0.1", port=server.port, user="root", connect_timeout=2).close()
        finally:
            server.remove()


def test_the_controls_run_on_every_topology(topology, make_pair, dify, tmp_path):
    """The enterprise's controls on each topology, through two replicas: an answer masked, the cap's slot taken and
    given back, a quota counted once across the replicas, and one audit row a message (their scripts are one slot
    each)."""
    rules = tmp_path / "rules.txt"
    rules.write_text("机密\n", encoding="utf-8")
    controls = dict(
        content_rules_file=str(rules),
        max_active_answers_per_bot=1,
        quota_user_messages_per_day=1,
        database_url=f"sqlite:///{tmp_path / 'audit.db'}",
    )
    first, second = make_pair(**topology.settings, **controls)
    dify.script(d.answer("这是机密的回答", pieces=4, delay=0.05))
    sims = [make_simulator(first.url), make_simulator(second.url)]
    question = sims[0].text_message("hi")
    reply = sims[0].send(question)
    assert sims[1].send(question)["stream"]["id"] == reply["stream"]["id"]  # a retry: not a second question
    assert sims[1].follow(reply).text == f"这是{MASK * 2}的回答"
    assert "已用完" in sims[1].send(sims[1].text_message("again"))["stream"]["content"]
    client = topology.client()
    assert wait_until(lambda: client.zcard(KEYS.answer_slots()) == 0)
    assert wait_until(lambda: first.gateway.audit_records.row("default", question["msgid"], "message") is not None)
    assert first.gateway.audit_records.row("default", question["msgid"], "message")["masked"] == 1
    client.close()
    for sim in sims:
        sim.close()


PUSH_TOKEN = "push-token-for-the-topology-test-0"


def post_push(replica, body: dict, key: str = ""):
    headers = {"Authorization": f"Bearer {PUSH_TOKEN}", **({"Idempotency-Key": key} if key else {})}
    return httpx.post(f"{replica.url}/api/push", json=body, headers=headers, timeout=15)


def test_pushes_through_wecoms_http_apis_run_on_every_topology(topology, make_pair):
    """A push to several members and a department through the app, and one to a group robot: each takes its places
    among its targets' recent sends in one script (one slot: the app's targets share a hash tag), its Idempotency-Key
    holds across the replicas, and a member whose minute is full refuses the push whole."""
    api = WeComApiStandIn(keys=("topology-robot",), app=("ww-topology", "topology-app-secret")).start()
    try:
        app = {"wecom_app_corp_id": "ww-topology", "wecom_app_agent_id": 1000009}
        first, second = make_pair(
            **topology.settings,
            **app,
            wecom_app_secret="topology-app-secret",
            push_api_token=PUSH_TOKEN,
            wecom_api_base=api.url,
            wecom_webhooks=json.dumps({"ops": api.webhook_url("topology-robot")}),
        )
        to_app = {"bot": "default", "touser": "zhangsan|lisi", "toparty": "2", "markdown": "**周报**"}
        sent = [post_push(replica, to_app, key="weekly") for replica in (first, second)]
        assert [reply.json()["status"] for reply in sent] == ["sent", "sent"] and sent[1].json()["repeated"]
        assert post_push(second, {"bot": "default", "webhook": "ops", "text": "hi"}).json()["status"] == "sent"
        client = topology.client()
        slots = {key_slot(key.encode()) for key in client.scan_iter(match="*app_sends*")}
        assert len(slots) == 1 and client.zcard(KEYS.app_sends("ww-topology", 1000009, "user:lisi")) == 1
        full = KEYS.app_sends("ww-topology", 1000009, "user:zhangsan")
        client.zadd(full, {f"earlier-{n}": time.time() - 1 for n in range(30)})
        assert post_push(first, {**to_app, "markdown": "again"}).status_code == 429
        assert client.zcard(KEYS.app_sends("ww-topology", 1000009, "user:lisi")) == 1  # no place taken for lisi
        assert len(api.app_sent) == 1 and len(api.to("topology-robot")) == 1
        client.close()
    finally:
        api.stop()
