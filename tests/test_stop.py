"""A user's /stop (also /停止, /cancel): the answer streaming in that chat ends at once, on whichever replica runs
it, with a short note; Dify's stop endpoint is called once; nothing of the answer comes after the note; nobody
takes the stopped run up again. Two replicas on the test Redis (callback mode), and a held long connection."""

from __future__ import annotations

import threading
import time

import pytest

from demo import dify_apps as apps
from demo import dify_flows as flows
from demo import dify_standin as d
from services.texts import CATALOGUE
from tests.conftest import KEYS, WS_BOT_ID, make_simulator, wait_idle, wait_until
from tests.test_forms import approval

ZH = CATALOGUE["zh"]
LONG_ANSWER = [d.message("part one"), d.sleep(0.3), d.message(" part two"), d.sleep(6), d.message(" never"), d.end()]


@pytest.fixture
def pair(make_pair):
    return make_pair(stream_lease_seconds=2)


def chunks(redis_client, stream_id: str) -> str:
    return "".join(redis_client.lrange(KEYS.stream_chunks(stream_id), 0, -1))


@pytest.mark.parametrize("command", ["/stop", "/停止", "/cancel", "/STOP", "／停止"])  # (／: a Chinese keyboard's)
def test_a_stop_sent_to_the_other_replica_ends_the_answer_there_with_a_note(pair, sims, dify, redis_client, command):
    first, second = pair
    dify.script(LONG_ANSWER)
    reply = sims[0].send(sims[0].text_message("tell me a long story"))
    stream_id = reply["stream"]["id"]
    assert wait_until(lambda: chunks(redis_client, stream_id) == "part one part two")

    answer = sims[1].send(sims[1].text_message(command))
    stopped_at = time.monotonic()
    assert answer["stream"]["finish"] and answer["stream"]["content"] == ZH["stop_done"]
    conversation = sims[1].follow(reply)
    assert time.monotonic() - stopped_at < 2
    assert conversation.text == f"part one part two\n\n{ZH['stopped_note']}"
    # Dify's stop endpoint, once, for the answer's task and as its user.
    assert wait_until(lambda: dify.stops, timeout=3)
    [(task_id, body)] = dify.stops
    assert task_id == redis_client.hget(KEYS.stream(stream_id), "task_id")
    assert body == {"user": dify.chat_requests()[0]["user"]}
    assert dify.stop_paths == [f"/v1/chat-messages/{task_id}/stop"]
    # The worker on the first replica stops within its lease renewal, having written nothing more; no second stop.
    wait_idle(first, second)
    assert chunks(redis_client, stream_id) == "part one part two"
    assert sims[0].follow(reply).text == conversation.text
    assert len(dify.stops) == 1 and len(dify.chat_requests()) == 1
    aibotid = redis_client.hget(KEYS.stream(stream_id), "aibotid")
    assert stream_id not in redis_client.zrange(KEYS.inflight(aibotid, "alice"), 0, -1)  # the user's slot is free


def test_a_stop_before_dify_named_its_task_calls_dify_stop_once_when_the_worker_learns_it(sims, dify, redis_client):
    dify.script([d.stall(1.0), d.message("too late"), d.sleep(3), d.end()])
    reply = sims[0].send(sims[0].text_message("slow to start"))
    # Dify has the call (a stop before it would mean no call at all: test_stream_store) and names no task for 1 s.
    assert wait_until(lambda: dify.chat_requests())
    answer = sims[1].send(sims[1].text_message("/stop"))
    assert answer["stream"]["content"] == ZH["stop_done"]
    conversation = sims[1].follow(reply)
    assert conversation.text == ZH["stopped_note"]
    assert wait_until(lambda: dify.stops, timeout=8)
    time.sleep(0.5)  # a bounded look: a second stop call would follow the first within this
    assert len(dify.stops) == 1
    assert chunks(redis_client, reply["stream"]["id"]) == ""


def test_a_stopped_answer_whose_replica_then_dies_is_not_taken_up_again(pair, sims, dify, redis_client):
    first, _ = pair
    dify.script(LONG_ANSWER)
    reply = sims[0].send(sims[0].text_message("tell me a long story"))
    stream_id = reply["stream"]["id"]
    assert wait_until(lambda: chunks(redis_client, stream_id).startswith("part one"))
    sims[1].send(sims[1].text_message("/stop"))
    first.gateway.runner.stop()  # its lease keeper stops: the other replica would take a live stream over
    assert wait_until(lambda: not redis_client.exists(KEYS.stream_lease(stream_id)), timeout=5)  # the lease ends
    conversation = sims[1].follow(reply)
    assert conversation.text.endswith(ZH["stopped_note"])
    assert redis_client.hget(KEYS.stream(stream_id), "run") == "1"  # no second attempt
    assert len(dify.chat_requests()) == 1


def test_a_chatflow_run_the_real_dify_way_is_stopped_with_its_chat_task(sims, dify, redis_client):
    """The captured slow chatflow on the faithful stand-in: a stop while its HTTP node runs; no resume follows."""
    dify.serve_flow(flows.slow_chatflow(6))
    reply = sims[0].send(sims[0].text_message("slow one"))
    stream_id = reply["stream"]["id"]
    assert wait_until(lambda: chunks(redis_client, stream_id).startswith("part one"), timeout=10)
    assert sims[1].send(sims[1].text_message("/cancel"))["stream"]["content"] == ZH["stop_done"]
    assert sims[1].follow(reply).text == f"part one (slow one).\n\n{ZH['stopped_note']}"
    assert wait_until(lambda: dify.stop_paths, timeout=3)
    task_id = redis_client.hget(KEYS.stream(stream_id), "task_id")
    assert dify.stop_paths == [f"/v1/chat-messages/{task_id}/stop"]
    assert dify.reattaches == []


def test_a_workflow_is_stopped_through_its_own_endpoint(make_pair, dify, redis_client):
    first, second = make_pair(stream_lease_seconds=2, dify_app_type="workflow")
    dify.mode = "workflow"
    dify.script([apps.workflow_started(), apps.text_chunk("step one"), d.sleep(6), apps.workflow_done()])
    sims = [make_simulator(first.url), make_simulator(second.url)]
    reply = sims[0].send(sims[0].text_message("run it"))
    assert wait_until(lambda: chunks(redis_client, reply["stream"]["id"]) == "step one", timeout=10)
    sims[1].send(sims[1].text_message("/stop"))
    assert sims[1].follow(reply).text == f"step one\n\n{ZH['stopped_note']}"
    assert wait_until(lambda: dify.stop_paths, timeout=3)
    [path] = dify.stop_paths
    assert path.startswith("/v1/workflows/tasks/") and path.endswith("/stop")
    for sim in sims:
        sim.close()


def test_with_nothing_streaming_the_reply_says_so(sims, dify):
    dify.script([d.message("short"), d.end()])
    assert sims[0].ask("hello").text == "short"
    answer = sims[1].send(sims[1].text_message("/stop"))
    assert answer["stream"]["finish"] and answer["stream"]["content"] == ZH["nothing_to_stop"]
    assert dify.stops == []


def test_a_stop_ends_only_the_answer_in_its_own_chat(sims, dify, redis_client):
    dify.script(LONG_ANSWER)
    in_group = sims[0].send(sims[0].text_message("in the group", chatid="group-1"))
    assert wait_until(lambda: chunks(redis_client, in_group["stream"]["id"]))
    answer = sims[1].send(sims[1].text_message("/stop"))  # the user's 1:1 chat: nothing streams there
    assert answer["stream"]["content"] == ZH["nothing_to_stop"]
    answer = sims[1].send(sims[1].text_message("@bot /stop", chatid="group-1"))
    assert answer["stream"]["content"] == ZH["stop_done"]
    assert sims[1].follow(in_group, chatid="group-1").text.endswith(ZH["stopped_note"])


def test_another_members_stop_does_not_end_my_answer(sims, dify, redis_client):
    dify.script([d.message("mine"), d.sleep(1.5), d.message(" whole"), d.end()])
    mine = sims[0].send(sims[0].text_message("my question", userid="alice", chatid="group-1"))
    assert wait_until(lambda: chunks(redis_client, mine["stream"]["id"]))
    answer = sims[1].send(sims[1].text_message("@bot /stop", userid="bob", chatid="group-1"))
    assert answer["stream"]["content"] == ZH["nothing_to_stop"]
    assert sims[0].follow(mine, chatid="group-1").text == "mine whole"


def test_a_form_card_of_a_stopped_answer_no_longer_takes_the_run_up(sims, dify, redis_client):
    dify.script(approval())
    cards: list[dict] = []
    reply = sims[0].send(sims[0].text_message("buy laptops"))

    def on_frame(frame: dict) -> None:
        if "template_card" in frame:
            cards.append(frame["template_card"])

    conversation = threading.Thread(target=lambda: sims[0].follow(reply, on_frame=on_frame))
    conversation.start()
    assert wait_until(lambda: cards, timeout=10)
    sims[1].send(sims[1].text_message("/stop"))
    conversation.join(10)
    click = sims[1].send(sims[1].card_click(cards[0], "approve", "alice", ""))
    assert click["template_card"]["main_title"]["desc"] == ZH["form_expired_card"]
    assert dify.form_submissions == []


def test_on_a_long_connection_a_stop_ends_the_bubble_with_its_note(ws_gateway, dify):
    gateway, wecom = ws_gateway()
    dify.script(LONG_ANSWER)
    message = wecom.deliver_text(WS_BOT_ID, "tell me a long story")
    assert wait_until(lambda: any("part two" in f["stream"]["content"] for f in wecom.frames(message)), timeout=10)
    stop = wecom.deliver_text(WS_BOT_ID, "/stop")
    stopped_at = time.monotonic()
    assert wecom.final(stop, timeout=5)["stream"]["content"] == ZH["stop_done"]
    final = wecom.final(message, timeout=5)
    assert time.monotonic() - stopped_at < 2
    assert final["stream"]["content"] == f"part one part two\n\n{ZH['stopped_note']}"
    assert wait_until(lambda: len(dify.stops) == 1, timeout=3)
    assert wait_until(lambda: gateway.runner.active_count == 0, timeout=10)
    frames = wecom.frames(message)
    assert frames[-1]["stream"]["content"] == final["stream"]["content"]  # nothing after the note
    assert not any("never" in f["stream"]["content"] for f in frames)
