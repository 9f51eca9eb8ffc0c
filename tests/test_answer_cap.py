"""A cap on the answers one bot has running in Dify at once (MAX_ACTIVE_ANSWERS_PER_BOT), across two replicas on
the test Redis: a question over it waits in line (its bubble says so), first come first served, then gets a busy
reply; a slot comes back when an answer ends and when its process died."""

from __future__ import annotations

import threading
import time

import pytest

from demo import dify_standin as d
from services.streams.slots import AnswerSlots
from services.texts import CATALOGUE
from tests.conftest import KEYS, make_simulator, wait_until

ZH = CATALOGUE["zh"]


@pytest.fixture
def capped(make_pair):
    def start(**changes):
        replicas = make_pair(max_active_answers_per_bot=1, **changes)
        sims = [make_simulator(replica.url, poll_interval=0.1) for replica in replicas]
        return replicas, sims

    return start


def slow(text: str, seconds: float) -> list[tuple]:
    return [d.message(text), d.sleep(seconds), d.end()]


def follow_all(conversations: list[tuple]) -> dict:
    """Follow every bubble at once, as WeCom polls each of them (sim, first reply, userid, on_frame)."""
    results = {}

    def follow(i, sim, first, userid, on_frame):
        results[i] = sim.follow(first, userid=userid, on_frame=on_frame)

    threads = [threading.Thread(target=follow, args=(i, *c)) for i, c in enumerate(conversations)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_a_question_over_the_cap_waits_in_line_then_is_answered(capped, dify):
    _, sims = capped()
    dify.script(slow("first", 1.5), match="first")
    dify.script(slow("second", 0.1), match="second")
    first = sims[0].send(sims[0].text_message("first", userid="bob"))
    assert dify.wait_for_requests(1)
    second = sims[1].send(sims[1].text_message("second", userid="carol"))
    prompts = []
    seen = lambda frame: prompts.append(frame["stream"]["content"])  # noqa: E731
    results = follow_all([(sims[0], first, "bob", None), (sims[1], second, "carol", seen)])
    assert [results[0].text, results[1].text] == ["first", "second"]
    assert any(ZH["queued"].format(ahead=1) in prompt for prompt in prompts)  # the bubble said it waits
    [one, two] = dify.requests
    assert two["at"] - one["at"] >= 1.4  # the second call began once the first answer ended
    assert dify.most_answering == 1


def test_the_line_is_first_come_first_served_across_replicas(capped, dify):
    _, sims = capped()
    dify.script(slow("running", 1.0), match="running")
    dify.script(d.answer("answered"), times=None)
    conversations = [(sims[0], sims[0].send(sims[0].text_message("running", userid="u0")), "u0", None)]
    assert dify.wait_for_requests(1)
    for i in range(1, 4):  # three questions join the line in turn, on alternating replicas
        sim = sims[i % 2]
        conversations.append((sim, sim.send(sim.text_message(f"waiting {i}", userid=f"u{i}")), f"u{i}", None))
        time.sleep(0.2)
    results = follow_all(conversations)
    assert [results[i].text for i in range(1, 4)] == ["answered"] * 3
    assert [r["body"]["query"] for r in dify.requests] == ["running", "waiting 1", "waiting 2", "waiting 3"]
    assert dify.most_answering == 1


def test_a_wait_that_runs_out_gets_a_busy_reply_and_no_dify_call(capped, dify):
    _, sims = capped(queue_wait_seconds=1)
    dify.script(slow("long", 3), match="long")
    sims[0].send(sims[0].text_message("long", userid="bob"))
    assert dify.wait_for_requests(1)
    conversation = sims[1].ask("too many", userid="carol")
    assert conversation.finished and conversation.text == ZH["queue_busy"]
    assert len(dify.requests) == 1


def test_the_slot_of_a_process_that_died_comes_back_within_the_lease(capped, dify, redis_client):
    """A process that took the only slot and died (SIGKILL: it never gives it back, never renews it): the next
    question waits, then gets the slot once its lease (STREAM_LEASE_SECONDS, 3 s here) has lapsed."""
    replicas, sims = capped()
    dead = AnswerSlots(redis_client, KEYS, cap=1, wait_seconds=1, lease_seconds=3, bot="default")
    assert dead.take("a-stream-of-a-dead-process", threading.Event(), lambda ahead: None)
    dead._held.clear()
    taken = time.monotonic()
    dify.script(d.answer("answered after the lapse"))
    assert sims[0].ask("waiting for the dead one's slot").text == "answered after the lapse"
    assert 2.0 <= time.monotonic() - taken <= 6.0
    assert wait_until(lambda: redis_client.zcard(KEYS.answer_slots()) == 0)  # and the answer gave its own back
    assert replicas[0].gateway.bot().streams.worker.deps.turn.slots is not None


def test_a_stop_while_waiting_in_line_leaves_the_line(capped, dify, redis_client):
    _, sims = capped()
    dify.script(slow("long", 3), match="long")
    sims[0].send(sims[0].text_message("long", userid="bob"))
    assert dify.wait_for_requests(1)
    waiting = sims[1].send(sims[1].text_message("in line", userid="carol"))
    assert wait_until(lambda: redis_client.zcard(KEYS.answer_line()) == 1)
    assert sims[1].send(sims[1].text_message("/stop", userid="carol"))["stream"]["content"] == ZH["stop_done"]
    assert sims[1].follow(waiting, userid="carol").text.endswith(ZH["stopped_note"])
    assert wait_until(lambda: redis_client.zcard(KEYS.answer_line()) == 0)
    assert len(dify.requests) == 1
