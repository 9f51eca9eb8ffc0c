"""Control and reach (CONTRACT §16) through gunicorn replicas of two workers each, in production settings: a /stop
that lands on another replica (and worker) than the answer's, in both modes; a push taken by one replica while the
connection's holder is SIGKILLed, sent once by the next holder."""

from __future__ import annotations

import time

import httpx
import pytest

from demo import dify_standin as d
from demo.replicas import GunicornReplica
from services.texts import CATALOGUE
from tests.conftest import KEYS, make_simulator, wait_until
from tests.e2e.conftest import replica_env

pytestmark = pytest.mark.e2e
ZH = CATALOGUE["zh"]
BOT_ID, SECRET = "control-bot", "control-secret"
PUSH_TOKEN = "e2e-push-token-0123456789abcdef"
LONG_ANSWER = [d.message("part one"), d.sleep(0.5), d.message(" part two"), d.sleep(8), d.message(" never"), d.end()]


@pytest.fixture
def callback_replicas(dify, redis_url, redis_client, tmp_path):
    env = replica_env(dify.base_url, redis_url)
    replicas = [GunicornReplica(env, tmp_path, f"replica-{n}", workers=2).start() for n in range(2)]
    yield replicas
    for replica in replicas:
        replica.kill()


@pytest.fixture
def ws_replicas(dify, wecom_ws, redis_url, redis_client, tmp_path):  # redis_client first: it empties Redis
    wecom = wecom_ws({BOT_ID: SECRET})
    env = replica_env(dify.base_url, redis_url, PUSH_API_TOKEN=PUSH_TOKEN, WECOM_WS_LEASE_SECONDS="4")
    env |= {"WECOM_MODE": "long_connection", "WECOM_BOT_ID": BOT_ID, "WECOM_BOT_SECRET": SECRET}
    env["WECOM_WS_URL"] = wecom.url
    replicas = [GunicornReplica(env, tmp_path, f"ws-{n}", workers=2).start() for n in range(2)]
    assert wait_until(lambda: wecom.subscribed(BOT_ID) == 1, timeout=15)
    yield replicas, wecom
    for replica in replicas:
        replica.kill()


def holder(replicas, redis_client):
    lease = redis_client.get(KEYS.ws_lease(BOT_ID)) or ""
    name = lease.rpartition(" ")[0].split(":")[0]
    return next(r for r in replicas if r.name == name)


def test_a_stop_on_the_other_replica_ends_the_answer_with_its_note(callback_replicas, dify, redis_client):
    dify.script(LONG_ANSWER)
    sims = [make_simulator(replica.url, poll_interval=0.2) for replica in callback_replicas]
    reply = sims[0].send(sims[0].text_message("tell me a long story"))
    stream_id = reply["stream"]["id"]
    chunks = KEYS.stream_chunks(stream_id)
    assert wait_until(lambda: "".join(redis_client.lrange(chunks, 0, -1)) == "part one part two", timeout=10)
    assert sims[1].send(sims[1].text_message("/stop"))["stream"]["content"] == ZH["stop_done"]
    stopped = time.monotonic()
    conversation = sims[1].follow(reply)
    assert time.monotonic() - stopped < 2
    assert conversation.text == f"part one part two\n\n{ZH['stopped_note']}"
    assert wait_until(lambda: len(dify.stops) == 1, timeout=5)
    time.sleep(3)  # a bounded look past the worker's next lease renewal: nothing more written, no second stop
    assert "".join(redis_client.lrange(chunks, 0, -1)) == "part one part two"
    assert len(dify.stops) == 1 and len(dify.chat_requests()) == 1
    for sim in sims:
        sim.close()


def test_on_a_long_connection_a_stop_ends_the_answer_wherever_it_runs(ws_replicas, dify):
    _, wecom = ws_replicas
    dify.script(LONG_ANSWER)
    message = wecom.deliver_text(BOT_ID, "tell me a long story")
    assert wait_until(lambda: any("part two" in f["stream"]["content"] for f in wecom.frames(message)), timeout=10)
    assert wecom.final(wecom.deliver_text(BOT_ID, "/停止"), timeout=5)["stream"]["content"] == ZH["stop_done"]
    final = wecom.final(message, timeout=3)
    assert final["stream"]["content"] == f"part one part two\n\n{ZH['stopped_note']}"
    assert wait_until(lambda: len(dify.stops) == 1, timeout=5)
    time.sleep(3)  # a bounded look: no frame after the note
    assert wecom.frames(message)[-1] == final


def test_a_push_is_sent_once_when_the_holder_is_killed_right_after(ws_replicas, redis_client):
    replicas, wecom = ws_replicas
    killed = holder(replicas, redis_client)
    survivor = next(r for r in replicas if r is not killed)
    headers = {"Authorization": f"Bearer {PUSH_TOKEN}", "Idempotency-Key": "e2e-1"}
    body = {"bot": "default", "userid": "alice", "markdown": "sent once, whoever sends it"}
    answer = httpx.post(f"{survivor.url}/api/push", json=body, headers=headers, timeout=5)
    assert answer.status_code == 202
    killed.kill()
    assert wait_until(lambda: wecom.proactive, timeout=20)
    status = httpx.get(f"{survivor.url}/api/push/{answer.json()['id']}", headers=headers, timeout=5)
    assert status.json()["status"] in ("queued", "sent")
    time.sleep(4)  # a bounded look past two of the new holder's outbox passes
    assert [m["markdown"]["content"] for m in wecom.proactive] == ["sent once, whoever sends it"]


def test_a_cap_slot_of_a_replica_killed_mid_answer_comes_back_within_the_lease(dify, redis_url, redis_client, tmp_path):
    """MAX_ACTIVE_ANSWERS_PER_BOT=1 over two replicas of two workers: replica-0 runs the one answer allowed and is
    SIGKILLed (master and workers: nothing gives the slot back); a question on replica-1 waits in line, its bubble
    saying so, and is answered once the dead slot lapses with its lease, not a busy reply."""
    env = replica_env(
        dify.base_url, redis_url, MAX_ACTIVE_ANSWERS_PER_BOT="1", QUEUE_WAIT_SECONDS="30", STREAM_LEASE_SECONDS="3"
    )
    replicas = [GunicornReplica(env, tmp_path, f"cap-{n}", workers=2).start() for n in range(2)]
    sims = [make_simulator(replica.url, poll_interval=0.2) for replica in replicas]
    try:
        dify.script([d.message("holding the slot"), d.sleep(30), d.end()], match="first")
        sims[0].send(sims[0].text_message("first: a long one"))
        assert wait_until(lambda: redis_client.zcard(KEYS.answer_slots()) == 1, timeout=10)
        replicas[0].kill()
        killed_at = time.monotonic()

        dify.script(d.answer("the slot came back"), match="second")
        second = sims[1].send(sims[1].text_message("second: after the kill"))
        conversation = sims[1].follow(second)
        assert conversation.text == "the slot came back"
        assert time.monotonic() - killed_at < 3 * 3 + 10  # the lease (and its keeper's beat), not QUEUE_WAIT_SECONDS
        assert ZH["queued"].split("{", 1)[0] in "".join(f["stream"]["content"] for f in conversation.frames)
        assert wait_until(lambda: redis_client.zcard(KEYS.answer_slots()) == 0, timeout=10)  # none leaked
    finally:
        for sim in sims:
            sim.close()
        for replica in replicas:
            replica.kill()
