"""Writes that must outlive a failover (services/replication.py), on a real Sentinel set and a real Cluster: each
waits for a replica to hold it, and a master that comes back after its failover loses nothing it acknowledged."""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import pytest
import redis

from demo import dify_standin as d
from services import metrics, replication
from services.gateway import build_gateway
from services.keys import Keys
from services.longconn.jobs import JobQueue
from services.longconn.ledger import AckLedger
from services.longconn.outbox import Outbox, tracking
from services.push.direct import DirectPushes
from services.redis_conn import connect_redis
from services.replication import Replication
from services.schedules.ticks import TickBook
from services.streams.poll_path import PollPath
from services.streams.record import DONE
from services.streams.store import WRITTEN, StreamStore, first_attempt
from services.wecom.messages import Inbound
from tests.conftest import SENTINEL_PASSWORD, make_simulator, wait_until

WAIT_MS = 100


def unconfirmed(bot: str) -> dict[str, float]:
    return {write: metrics.UNREPLICATED_WRITES.labels(bot, write)._value.get() for write in metrics.REPLICATED_WRITES}


def replicas_of(kind: str, server) -> list:
    """The servers that replicate a master now (failovers in other tests may have moved the roles)."""
    if kind == "sentinel":
        master = server.current_master()
        return [s for s in server.servers if s is not master and s.running]
    return [node for node in server.nodes if node.running and node.client().info("replication")["role"] == "slave"]


def retried(write, tries: int = 5):
    """The write's result, trying again a moment later while Redis refuses it (a failover under way)."""
    for _ in range(tries - 1):
        try:
            return write()
        except redis.RedisError:
            time.sleep(0.5)
    return write()


@pytest.mark.parametrize("kind", ["sentinel", "cluster"])
def test_every_write_a_failover_must_not_lose_waits_for_a_replica(kind, request):
    """With every replica frozen, each such write reports that no replica holds it; the deltas, which a failover may
    lose without harm, do not wait."""
    server = request.getfixturevalue("sentinel_set" if kind == "sentinel" else "redis_cluster")
    client = connect_redis(server.url, sentinel_password=SENTINEL_PASSWORD)
    bot = f"durable-{kind}"
    keys = Keys(f"durable-{kind}:")
    store = StreamStore(client, keys, 3600, 30, durable=Replication(client, WAIT_MS, bot))
    outbox = Outbox(client, keys, store, "bot-1")
    queue = JobQueue(store.durable, keys, "bot-1", outbox)
    owner = first_attempt("holder:1")
    before = unconfirmed(bot)
    frozen = replicas_of(kind, server)
    assert frozen
    for replica in frozen:
        replica.pause()
    try:
        # A new message on the connection: opened with what it is answered on, then queued and followed at once.
        store.create("s1", "m1", owner, "bot1", "alice", {"userid": "alice", **tracking("req-1", 3, "alice", True)})
        queue.submit("s1", owner)
        outbox.track("s1", "req-2", 3, "alice", True)  # WeCom delivered it again, on a new req_id
        store.append("s1", owner, ["Hello"], 0)
        assert store.set_durably("s1", owner, {"prompt": "Approve?"}) == WRITTEN  # a form's prompt and card
        ledger = AckLedger(client, keys, store.durable, outbox.open_key)
        ledger.flush({"s1"}, "pass-1")  # a pass's frame records, which its polls wrote
        assert outbox.claim("s1", "holder:1")
        outbox.sent("s1")
        assert store.finish("s1", owner, DONE) is not None
        assert TickBook(client, keys, "holder:1", store.durable).claim("daily", 1795741200)  # a schedule's tick
        pushes = DirectPushes(bot, store.durable, keys, None, "holder:1")  # a push's key, then its opening
        push_id, earlier = pushes.claim("report-1")
        assert earlier is None and pushes.opened(push_id, "webhook:ops")
    finally:
        for replica in frozen:
            replica.resume()
    after = unconfirmed(bot)
    counted = {write: after[write] - before[write] for write in after}
    assert counted == {
        "msgid_claim": 1,
        "stream_open": 1,
        "stream_end": 1,
        "answer_queue": 1,
        "outbox": 6,
        "schedule_claim": 1,
        "push_claim": 1,
        "push_open": 1,
        "form": 1,
    }
    client.close()


def test_a_durable_write_waits_for_every_replica_of_its_master(sentinel_set):
    """Sentinel promotes the replica furthest ahead as far as it last read, so a write one of two replicas held could
    lose to the other: a durable write returns once both hold it (before, once the first did, with the other frozen
    for half a second)."""
    client = connect_redis(sentinel_set.url, sentinel_password=SENTINEL_PASSWORD)
    durable = Replication(client, 3000, "every-replica")
    durable.execute("every:0", [("SET", "every:0", "0")], replication.STREAM_OPEN)  # asks the master's ROLE too
    replicas = replicas_of("sentinel", sentinel_set)
    assert len(replicas) == 2
    lagging, woken = replicas[0], threading.Event()

    def wake() -> None:
        time.sleep(0.5)
        woken.set()
        lagging.resume()

    lagging.pause()
    waker = threading.Thread(target=wake)
    waker.start()
    try:
        assert durable.execute_held("every:1", [("SET", "every:1", "1")], replication.STREAM_OPEN)[1]
        assert woken.is_set()  # it returned once the frozen replica, woken, held the write too
    finally:
        waker.join()
    assert lagging.client().get("every:1") in ("1", b"1")
    client.close()


def test_a_replica_that_lags_past_the_wait_holds_up_one_write_not_each(sentinel_set):
    """A replica frozen past the wait costs the next write the wait (the other replica holds it), and the writes after
    it wait for the replica that answered only, until the master is asked again how many it has."""
    client = connect_redis(sentinel_set.url, sentinel_password=SENTINEL_PASSWORD)
    durable = Replication(client, 300, "lagging-replica")
    durable.execute("lag:0", [("SET", "lag:0", "0")], replication.STREAM_OPEN)
    lagging = replicas_of("sentinel", sentinel_set)[0]
    took = []
    lagging.pause()
    try:
        for n in (1, 2):
            started = time.monotonic()
            assert durable.execute_held(f"lag:{n}", [("SET", f"lag:{n}", "1")], replication.STREAM_OPEN)[1]
            took.append(time.monotonic() - started)
    finally:
        lagging.resume()
    assert took[0] >= 0.3  # waited out the frozen replica: the other held it
    assert took[1] < 0.3  # not again
    client.close()


def test_a_write_whose_slot_moved_still_waits_for_a_replica_of_its_new_master(redis_cluster):
    """Right after a failover, a client's map still names the old master: its write meets MOVED. It goes to the new
    master with its WAIT there (before, through the cluster client without one: unconfirmed, just when a second
    failover would lose it)."""
    client = connect_redis(redis_cluster.url, socket_timeout=8)
    durable = Replication(client, 5000, "moved")  # a replica just reconfigured may take a while on a busy machine
    key = "moved:dify_stream:{s-moved}"
    master = redis_cluster.node_of(key)
    assert client.get_node_from_key(key).port == master.port  # the client's map names `master` for the slot

    def replica_in_step():
        """`master`'s replica, once its link is up (an earlier test froze the replicas; a coordinated failover asked
        of a replica still resynchronising does not happen: a fresh-clone run failed so)."""
        for node in redis_cluster.nodes:
            if node.running:
                info = node.client().info("replication")
                if info.get("master_port") == master.port and info.get("master_link_status") == "up":
                    return node
        return None

    assert wait_until(lambda: replica_in_step() is not None, timeout=30)
    replica = replica_in_step()

    def swapped() -> bool:
        return master.client().info("replication")["role"] == "slave"

    # A coordinated failover (the roles swap, nothing is lost) is given up by Redis when the master does not answer
    # its replica within 5 s (a loaded machine): asked again then, three times at most.
    for _ in range(3):
        if replica.client().info("replication")["role"] == "slave":  # not promoted late by the previous ask
            replica.client().execute_command("CLUSTER FAILOVER")
        if wait_until(swapped, timeout=10):
            break
    assert swapped()
    assert wait_until(lambda: master.replicating(), timeout=15)
    assert wait_until(lambda: redis_cluster.node_of(key).port == replica.port, timeout=15)
    before = unconfirmed("moved")
    replies = durable.execute(key, [("HSET", key, "userid", "alice")], replication.STREAM_OPEN)
    after = unconfirmed("moved")
    assert replies == [1]
    assert {write: after[write] - before[write] for write in after} == dict.fromkeys(after, 0)
    assert replica.client().hget(key, "userid") == "alice"
    assert wait_until(redis_cluster.healthy, timeout=30)  # the next test finds every node serving every slot
    client.close()


def a_bubble_showing_one(kind: str, request, bot: str):
    """A stream on the Sentinel set or the Cluster whose bubble a poll showed as "One.": (server, client, store, its
    poll path, its owner)."""
    server = request.getfixturevalue("sentinel_set" if kind == "sentinel" else "redis_cluster")
    if kind == "cluster":  # an earlier test's failover may leave a node counting a slot as lost for a while (CI)
        assert wait_until(server.healthy, timeout=30)
    client = connect_redis(server.url, sentinel_password=SENTINEL_PASSWORD)
    store = StreamStore(client, Keys(f"{bot}:"), 3600, 30, durable=Replication(client, WAIT_MS, bot))
    polls = PollPath(store)
    owner = first_attempt("replica-a:1")
    retried(lambda: store.create("s1", "m1", owner, "bot1", "alice", {"userid": "alice"}))
    assert retried(lambda: store.replace("s1", owner, "One."))
    assert retried(lambda: polls.poll("s1", 360, 20_000, "orphaned")).text == "One."
    return server, client, store, polls, owner


@pytest.mark.parametrize("kind", ["sentinel", "cluster"])
def test_a_live_bubble_shows_only_text_a_replica_holds(kind, request, monkeypatch):
    """Appends do not wait for a replica; a poll does before it shows new text, so a failover that promotes a replica
    without the last appends cannot make the next poll show less than this one did. With every replica frozen, the
    poll shows what a replica held (the text of the poll before), and the rest once a replica has it; text ahead of
    the replicas for HOLD_BACK_SECONDS is shown all the same (a replica gone for good must not freeze the bubble).
    Before, the frozen replicas' poll showed "One. Two.", which the next failover could take back."""
    server, client, store, polls, owner = a_bubble_showing_one(kind, request, f"vouch-{kind}")
    bot = f"vouch-{kind}"
    counted = metrics.POLL_TEXT_UNREPLICATED

    def count(outcome: str) -> float:
        return counted.labels(bot, outcome)._value.get()

    frozen = replicas_of(kind, server)
    for replica in frozen:
        replica.pause()
    try:
        assert store.replace("s1", owner, "One. Two.")
        started = time.monotonic()
        held = polls.poll("s1", 360, 20_000, "orphaned")
        assert (held.text, held.active) == ("One.", True)
        assert time.monotonic() - started >= WAIT_MS / 1000
        assert count("held_back") == 1
        monkeypatch.setattr("services.streams.poll_path.HOLD_BACK_SECONDS", 0.3)
        time.sleep(0.4)
        assert polls.poll("s1", 360, 20_000, "orphaned").text == "One. Two."
        assert count("shown") == 1
        monkeypatch.undo()
        assert store.replace("s1", owner, "One. Two. Three.")
    finally:
        for replica in frozen:
            replica.resume()
    assert wait_until(lambda: polls.poll("s1", 360, 20_000, "orphaned").text == "One. Two. Three.", timeout=10)
    assert store.client.hget(store.keys.stream("s1"), "vouched_bytes") == str(len("One. Two. Three."))
    polls.close()
    client.close()


@pytest.mark.parametrize("kind", ["sentinel", "cluster"])
def test_a_poll_shows_new_text_only_once_a_replica_holds_its_note_too(kind, request, monkeypatch):
    """A poll notes what it shows (`vouched_bytes`) so that a later poll, held back, shows no less: a note the master
    took but no replica did is lost in a failover, and the poll after it would show less than this one (a 2-minute
    Sentinel run of seed 7: one sentence taken back under `redis_loss`). With the replicas frozen after the poll's
    text reached them but before its note did, the poll shows what was noted before; once they thaw, the rest.
    Before, it showed "One. Two." with a note only the master held."""
    server, client, store, polls, owner = a_bubble_showing_one(kind, request, f"note-{kind}")
    assert store.replace("s1", owner, "One. Two.")
    frozen, waits = replicas_of(kind, server), []
    execute = polls._connections.execute

    def freeze_after_the_first_wait(*command, then=None):
        if then is None:
            return execute(*command)

        def follow(reply, send):
            def sent(command):
                answer = send(command)
                if command[0] == "WAIT" and not waits:
                    waits.append(answer)
                    for replica in frozen:
                        replica.pause()
                return answer

            return then(reply, sent if send is not None else None)

        return execute(*command, then=follow)

    monkeypatch.setattr(polls._connections, "execute", freeze_after_the_first_wait)
    try:
        assert polls.poll("s1", 360, 20_000, "orphaned").text == "One."
    finally:
        for replica in frozen:
            replica.resume()
    monkeypatch.undo()
    assert waits and waits[0] >= 1  # the text had reached a replica
    assert wait_until(lambda: polls.poll("s1", 360, 20_000, "orphaned").text == "One. Two.", timeout=10)
    polls.close()
    client.close()


def test_a_process_idle_through_a_failover_polls_the_new_master(sentinel_set):
    """A process whose polls sat idle while the master was frozen past its failover still holds connections to that
    master, which, back, answers reads from its old data set until the sentinels demote it: a poll there would show
    a bubble as it was before the failover, less than another replica's poll showed. Each process asks the
    sentinels where the master is every second, so its idle connections have left the old master before it wakes
    (before, they stayed, and the poll showed the old text: the 10-minute Sentinel run of seed 12)."""
    keys = Keys("idle-failover:")
    writer_client = connect_redis(sentinel_set.url, 2.0, sentinel_password=SENTINEL_PASSWORD)
    reader_client = connect_redis(sentinel_set.url, 2.0, sentinel_password=SENTINEL_PASSWORD)
    writer = StreamStore(writer_client, keys, 3600, 30, durable=Replication(writer_client, WAIT_MS, "idle-writer"))
    reader = PollPath(
        StreamStore(reader_client, keys, 3600, 30, durable=Replication(reader_client, WAIT_MS, "idle-reader"))
    )
    owner = first_attempt("replica-a:1")
    writer.create("s1", "m1", owner, "bot1", "alice", {"userid": "alice"})
    assert retried(lambda: writer.replace("s1", owner, "Before the failover."))
    assert reader.poll("s1", 360, 20_000, "orphaned").text == "Before the failover."
    old = sentinel_set.current_master()
    old_address = ("127.0.0.1", old.port)
    assert old_address in reader._connections.connected_to()
    old.pause()
    try:
        assert wait_until(lambda: int(sentinel_set.master_address()[1]) != old.port, timeout=30)
        assert retried(lambda: writer.replace("s1", owner, "Before the failover. And after it."))
        # MASTER_WATCH_SECONDS after the sentinels named the new master, at most (5 s allowed)
        assert wait_until(lambda: old_address not in reader._connections.connected_to(), timeout=5)
    finally:
        old.resume()
    assert reader.poll("s1", 360, 20_000, "orphaned").text == "Before the failover. And after it."
    assert wait_until(lambda: old.client().info("replication")["role"] == "slave", timeout=30)
    reader.close()
    for client in (writer_client, reader_client):
        client.close()


def test_a_master_back_from_a_pause_past_its_failover_loses_no_acknowledged_write(sentinel_set):
    """A master frozen past its failover comes back still a master in its own eyes, and clients' pooled connections
    still point at it. It has lost its replicas, so (min-replicas-to-write) it refuses writes, and the gateway's
    connection treats that as the failover it is: the write goes to the new master. Without that, the old master
    would acknowledge the write, and lose it when the sentinels demote it. A poll, a read, on a connection still at
    the old master finds nothing of a stream opened since: it asks the new master before saying so."""
    client = connect_redis(sentinel_set.url, 2.0, sentinel_password=SENTINEL_PASSWORD)
    keys = Keys("comeback:")
    store = StreamStore(client, keys, 3600, 30, durable=Replication(client, WAIT_MS, "comeback"))
    polls = PollPath(store)
    owner = first_attempt("replica-a:1")
    store.create("s1", "m1", owner, "bot1", "alice", {"userid": "alice"})  # the pool now holds a connection to it
    assert polls.poll("s1", 360, 20_000, "orphaned").status == "pending"  # and so does the poll path
    old = sentinel_set.current_master()
    old.pause()
    try:
        assert wait_until(lambda: int(sentinel_set.master_address()[1]) != old.port, timeout=30)
    finally:
        old.resume()
    time.sleep(0.3)  # the old master reads its replicas' goodbyes first
    # Refused, or sent to the new master; never acknowledged by the old one alone. (The client's retry usually
    # lands on the new master; a refusal is what the gateway's outage handling then retries, as here.)
    assert retried(lambda: store.record("s1", {"ws_shown": "after the failover"}, durable=True))
    assert retried(lambda: store.create("s2", "m2", owner, "bot1", "alice", {"userid": "alice"}))
    assert old.client().info("replication")["role"] == "master"  # not demoted yet: the poll path still points at it
    snapshot = polls.poll("s2", 360, 20_000, "orphaned")
    assert snapshot is not None and snapshot.status == "pending"
    new = sentinel_set.current_master()
    assert wait_until(lambda: old.client().info("replication")["role"] == "slave", timeout=30)
    assert new.client().hget(keys.stream("s1"), "ws_shown") == "after the failover"
    polls.close()
    client.close()


def test_a_new_message_on_a_long_connection_waits_for_a_replica_three_times(sentinel_set, settings, wecom_ws, tmp_path):
    """Its stream is opened with what it is answered on (req_id, connection, chat), its msgid claimed, and its answer
    queued in the write that puts it in the outbox's open set: three waits, none the outbox's own (a record of the
    route and a follow of their own each waited before: five, 1.1 s with no replica answering)."""
    wecom = wecom_ws({"three-bot": "three-secret"})
    bot_settings = settings.replace(
        wecom_mode="long_connection",
        wecom_bot_id="three-bot",
        wecom_bot_secret="three-secret",
        wecom_ws_url=wecom.url,
        redis_url=sentinel_set.url,
        redis_sentinel_password=SENTINEL_PASSWORD,
        redis_claim_wait_ms=WAIT_MS,
        bot_name="three",
    )
    gateway = build_gateway(bot_settings, (bot_settings.bot,), tmp_path)  # not started: no holder, no consumer
    streams = gateway.bot("three").streams
    message = Inbound("text", msgid="m-three", aibotid="three-bot", userid="zoe", text="hi", ws_req_id="req-7")
    before = unconfirmed("three")
    frozen = replicas_of("sentinel", sentinel_set)
    for replica in frozen:
        replica.pause()
    try:
        reply = streams.open(replace(message, ws_generation=5), "hi")
    finally:
        for replica in frozen:
            replica.resume()
    after = unconfirmed("three")
    assert {write: after[write] - before[write] for write in after if after[write] != before[write]} == {
        "stream_open": 1,
        "msgid_claim": 1,
        "answer_queue": 1,
    }
    stream_id = reply["stream"]["id"]
    meta = streams.store.reads.meta(stream_id)
    assert (meta["ws_req_id"], meta["ws_generation"], meta["ws_chat"], meta["ws_single"]) == ("req-7", "5", "zoe", "1")
    assert gateway.bot("three").connection.pushes.outbox.tracked(stream_id)
    gateway.close()


class CutOff:
    """A master whose replicas lost their link and cannot sync again, so that no replica gets what it writes from
    now on, which it acknowledges all the same (as a slow master does while its lagging replicas are within
    min-replicas-max-lag); then `fail_over`: it freezes, and the sentinels promote one of the replicas that lack
    its last writes; `back` resumes it, to become a replica of the new master."""

    def __init__(self, sentinel_set):
        self.sentinel_set = sentinel_set
        self.old = sentinel_set.current_master()
        self.replicas = replicas_of("sentinel", sentinel_set)
        self.old.client().config_set("min-replicas-to-write", 0)
        for replica in self.replicas:
            replica.client().config_set("masterauth", "not-the-masters")
        self.old.client().client_kill_filter(_type="replica")

    def fail_over(self):
        self.old.pause()
        for replica in self.replicas:
            replica.client().config_set("masterauth", "")
        assert wait_until(lambda: int(self.sentinel_set.master_address()[1]) != self.old.port, timeout=30)
        return self.sentinel_set.current_master()

    def back(self) -> None:
        self.old.resume()
        assert wait_until(lambda: self.old.client().info("replication")["role"] == "slave", timeout=30)
        self.old.client().config_set("min-replicas-to-write", 1)


def sentinel_app(make_app, serve, sentinel_set, prefix: str):
    app = make_app(
        redis_url=sentinel_set.url,
        redis_sentinel_password=SENTINEL_PASSWORD,
        redis_claim_wait_ms=WAIT_MS,
        redis_key_prefix=prefix,
    )
    return serve(app), app.extensions["gateway"].bot("default").streams.store


def test_an_answers_end_a_failover_took_back_is_made_again_on_the_new_master(sentinel_set, make_app, serve, dify):
    """No replica held an answer's end when the sentinels failed its slow master over (the aimed Sentinel run of
    seed 19): the new master held the stream open after its bubble had finished, nothing wrote to it again, and its
    audit row was lost. The end is made again, off the answer's path, until a replica holds it."""
    live, store = sentinel_app(make_app, serve, sentinel_set, "end-again:")
    keys = store.keys
    dify.script([d.message("The whole answer."), d.sleep(1.5), d.end()])
    sim = make_simulator(live.url)
    stream_id = sim.send(sim.text_message("end me", msgid="end-again-1"))["stream"]["id"]
    client = connect_redis(sentinel_set.url, 2.0, sentinel_password=SENTINEL_PASSWORD)
    assert wait_until(lambda: client.lrange(keys.stream_chunks(stream_id), 0, -1) == ["The whole answer."])
    time.sleep(0.3)  # the replicas take the text in
    ends = unconfirmed("default")["stream_end"]
    cut = CutOff(sentinel_set)
    try:
        assert wait_until(lambda: unconfirmed("default")["stream_end"] > ends, timeout=10)  # the finisher has it
        assert cut.old.client().hget(keys.stream(stream_id), "status") == DONE
        assert all(replica.client().hget(keys.stream(stream_id), "status") != DONE for replica in cut.replicas)
        new = cut.fail_over()
        assert wait_until(lambda: new.client().hget(keys.stream(stream_id), "status") == DONE, timeout=30)
    finally:
        cut.back()
    assert wait_until(lambda: store.durable._again.waiting() == 0)
    sim.close()
    client.close()


def test_an_answer_whose_opening_a_failover_took_back_is_recorded_by_its_worker(sentinel_set, make_app, serve, dify):
    """No replica held a message's opening (its stream, its msgid's claim) when the master was failed over: its
    worker finds the stream gone, and sends the answer whole through response_url. Its audit row, read from the
    stream once it ends, was lost; the worker records it itself."""
    live, store = sentinel_app(make_app, serve, sentinel_set, "open-again:")
    replies = []
    store.life.replied.connect(replies.append, weak=False)
    dify.script([d.sleep(1.0), d.message("The answer, sent whole."), d.end()])
    sim = make_simulator(live.url)
    cut = CutOff(sentinel_set)
    message = sim.text_message("open me", msgid="open-again-1")
    try:
        stream_id = sim.send(message)["stream"]["id"]
        assert cut.old.client().exists(store.keys.stream(stream_id))
        new = cut.fail_over()
        assert not new.client().exists(store.keys.stream(stream_id))
        assert wait_until(lambda: replies, timeout=30)
    finally:
        cut.back()
    [reply] = replies
    assert (reply.message.msgid, reply.message.userid, reply.message.text) == ("open-again-1", "alice", "open me")
    assert (reply.note, reply.outcome, reply.kind) == ("The answer, sent whole.", "answered", "message")
    assert "The answer, sent whole." in str(sim.inbox.wait_for(message["response_url"]))
    sim.close()
