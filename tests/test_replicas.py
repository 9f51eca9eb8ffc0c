"""Many replicas, in one process: stream ownership and takeover, detaching when a stream is closed elsewhere,
graceful draining, and Redis outages (against a redis-server of the test's own that it stops and pauses)."""

import json
import threading
import time

import httpx
import pytest
import redis

from demo import dify_standin as d
from services.audit.rows import row_of_stream
from services.streams.turn import Turn
from services.texts import CATALOGUE
from tests.conftest import KEYS, PNG, make_simulator, wait_idle, wait_until

ZH = CATALOGUE["zh"]


@pytest.fixture
def pair(make_pair):
    """The two replicas, with a short lease."""
    return make_pair(stream_lease_seconds=2, dify_read_timeout=4.0)


def kill(replica):
    """Make a replica look dead to the others: its lease keeper stops, so its leases run out, and so do its watches
    over what is owed through response_url (alive, it would take back the lease of a stream its worker still runs
    when it looks at a bubble closed early)."""
    replica.gateway.runner.stop()
    for bot in replica.gateway.bots.values():
        bot.delivery.posts.stop()


def test_a_stream_whose_replica_died_before_showing_anything_is_restarted_elsewhere(pair, dify, redis_client):
    first, second = pair
    dify.script([d.stall(8)])  # the dead replica's Dify call never yields anything
    dify.script(d.answer("answered after the takeover"))
    opener = make_simulator(first.url)
    reply = opener.send(opener.text_message("hello", msgid="takeover-1"))
    stream_id = reply["stream"]["id"]
    kill(first)
    poller = make_simulator(second.url, poll_interval=0.2)  # WeCom's polls now land on the healthy replica
    started = time.monotonic()
    conversation = poller.follow(reply)
    assert conversation.text == "answered after the takeover"
    assert time.monotonic() - started < 2 + 5  # within the lease time, plus the answer
    meta = redis_client.hgetall(KEYS.stream(stream_id))
    assert meta["owner"].startswith("replica-b:")
    assert meta["restarts"] == "1"
    assert meta["status"] == "done"
    assert len(dify.chat_requests()) == 2
    # the first replica's worker wakes up later and must not write a second answer
    assert wait_until(lambda: first.gateway.runner.active_count == 0, timeout=10)
    assert redis_client.hget(KEYS.stream(stream_id), "status") == "done"
    assert "".join(redis_client.lrange(KEYS.stream_chunks(stream_id), 0, -1)) == "answered after the takeover"
    opener.close()
    poller.close()


def test_a_process_frozen_between_opening_a_stream_and_calling_dify_makes_no_second_call(
    pair, dify, redis_client, monkeypatch
):
    """The opener's process freezes after opening the stream, before its worker calls Dify (a SIGSTOP, a stalled
    node); its lease runs out and a poll on the other replica restarts the answer. When the opener wakes, its worker
    must not call Dify too: the call's count is fenced by the attempt (the one-server run of seed 16 counted an
    extra Dify call from such a wake)."""
    first, second = pair
    dify.script(d.answer("answered by the restart"), times=None)
    woken = threading.Event()
    take_slot = Turn.take_slot

    def frozen_on_the_opener(turn):
        if turn.job.attempt.startswith("replica-a:"):
            woken.wait(15)
        take_slot(turn)

    monkeypatch.setattr(Turn, "take_slot", frozen_on_the_opener)
    opener = make_simulator(first.url)
    reply = opener.send(opener.text_message("hello", msgid="frozen-opener-1"))
    stream_id = reply["stream"]["id"]
    kill(first)
    poller = make_simulator(second.url, poll_interval=0.2)
    assert poller.follow(reply).text == "answered by the restart"
    woken.set()
    assert wait_until(lambda: first.gateway.runner.active_count == 0, timeout=10)
    time.sleep(0.5)
    assert len(dify.chat_requests()) == 1
    meta = redis_client.hgetall(KEYS.stream(stream_id))
    assert meta["status"] == "done" and meta["dify_calls"] == "1" and meta["owner"].startswith("replica-b:")
    opener.close()
    poller.close()


def test_a_stream_whose_replica_died_after_showing_text_finishes_with_it(pair, dify, redis_client):
    first, second = pair
    dify.script([d.message("what was shown"), d.stall(8)])
    opener = make_simulator(first.url)
    payload = opener.text_message("hello")
    reply = opener.send(payload)
    assert wait_until(lambda: redis_client.llen(KEYS.stream_chunks(reply["stream"]["id"])) == 1)
    kill(first)
    poller = make_simulator(second.url, poll_interval=0.2)
    conversation = poller.follow(reply)
    assert conversation.text == f"what was shown\n\n{ZH['orphaned']}"
    wait_idle(second)
    assert len(dify.chat_requests()) == 1  # text was shown: no restart, no second answer
    opener.close()
    poller.close()


CUT_OFF = [d.message("part one"), d.sleep(3.5), d.message(" and part two"), d.end()]


@pytest.mark.parametrize(
    ("script", "shown", "rest", "withheld"),
    [
        # it was cut off mid-answer: its next write finds the bubble closed, and the rest goes out
        (CUT_OFF, "part one", f"{ZH['continued']}\n\nand part two", 0),
        # every word was shown before the bubble was given up: the user is told there is nothing more
        ([d.message("every word"), d.sleep(3.5), d.end()], "every word", ZH["nothing_more"], 0),
        # Redis withholds what the bubble showed for longer than a best-effort read's 7.5 s: it is read again
        # through the outage, within the window and a minute, and still only the rest goes out
        (CUT_OFF, "part one", f"{ZH['continued']}\n\nand part two", 6),
    ],
    ids=["cut_off_mid_answer", "after_its_last_words", "shown_text_withheld_a_while"],
)
def test_a_live_owner_whose_bubble_was_given_up_sends_what_it_did_not_show_once(
    pair, dify, script, shown, rest, withheld
):
    """The owner was alive but could not renew its lease (a network partition; a process stopped past it): another
    replica finished the bubble with the text so far and "interrupted"; the owner keeps the answer and sends, once,
    through response_url, what the bubble did not show (the whole answer would show its beginning twice)."""
    first, second = pair
    dify.script(script)
    store = first.gateway.bot().streams.store
    store.reads.shown_when_given_up = Blip(store.reads.shown_when_given_up, times=withheld)
    opener = make_simulator(first.url)
    payload = opener.text_message("hello")
    reply = opener.send(payload)
    kill(first)
    poller = make_simulator(second.url, poll_interval=0.2)
    assert poller.follow(reply).text == f"{shown}\n\n{ZH['orphaned']}"
    message = opener.inbox.wait_for(payload["response_url"], timeout=20)
    assert message["markdown"]["content"] == rest
    assert wait_until(lambda: first.gateway.runner.active_count == 0, timeout=10)
    assert len(opener.inbox.received(payload["response_url"])) == 1
    opener.close()
    poller.close()


def test_an_owner_whose_closed_bubble_was_given_up_does_not_claim_the_rest_it_could_not_send(pair, dify, redis_client):
    """The bubble closed early (the answer outgrew it) and its owner then lost its lease: the replica watching the
    bubble gave the answer up and posted, through response_url, the rest Redis held with the note that the answer was
    interrupted. The owner, alive, ends its answer later: its own fuller rest cannot go (the URL takes one post), and
    the stream must not record it as given (it did: the audit row then held sentences no user saw; the fault
    campaign found it)."""
    first, second = pair
    long = "".join(f"句子 {n} " + "长" * 60 + "\n" for n in range(150))  # past what a bubble shows
    dify.script([d.message(long), d.sleep(8), d.message("the last words"), d.end()])
    opener = make_simulator(first.url)
    payload = opener.text_message("a long one")
    reply = opener.send(payload)
    stream_id = reply["stream"]["id"]
    poller = make_simulator(second.url, poll_interval=0.2)
    poller.follow(reply)  # the bubble closes early on `second`, which watches it until the answer ends
    assert redis_client.hget(KEYS.stream(stream_id), "close_reason") == "overflow"
    kill(first)
    posted = opener.inbox.wait_for(payload["response_url"], timeout=30)["markdown"]["content"]
    assert posted.endswith(ZH["orphaned"]) and "the last words" not in posted
    assert wait_until(lambda: first.gateway.runner.active_count == 0, timeout=20)
    assert len(opener.inbox.received(payload["response_url"])) == 1
    assert not redis_client.hget(KEYS.stream(stream_id), "answer_given")
    opener.close()
    poller.close()


def test_drain_lets_short_answers_finish(live, simulator, dify):
    dify.script(d.answer("finished during the drain", delay=0.05))
    first = simulator.send(simulator.text_message("quick"))
    assert live.gateway.drain(5) == []
    assert simulator.follow(first).text == "finished during the drain"
    assert live.gateway.runner.accepting is False
    refused = simulator.send(simulator.text_message("one more"))
    assert refused["stream"]["finish"]
    assert refused["stream"]["content"] == ZH["shutting_down"]


def test_drain_hands_unfinished_streams_to_another_replica(pair, dify, redis_client):
    first, second = pair
    dify.script([d.stall(6)])
    dify.script(d.answer("finished by the other replica"))
    sim_a, sim_b = make_simulator(first.url), make_simulator(second.url, poll_interval=0.1)
    reply = sim_a.send(sim_a.text_message("slow"))
    handed = first.gateway.drain(0.3)
    assert handed == [reply["stream"]["id"]]
    assert redis_client.hget(KEYS.stream(handed[0]), "handed_over_at")
    conversation = sim_b.follow(reply)  # the released lease lets the next poll restart it at once
    assert conversation.text == "finished by the other replica"
    sim_a.close()
    sim_b.close()


def test_readiness_turns_503_while_draining(live, dify):
    client = live.app.test_client()
    assert client.get("/readyz").status_code == 200
    live.gateway.drain(0)
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.get_json()["failed"]["shutdown"] == "draining"


def ask_until_written(sim, store, question: str) -> tuple[dict, dict, str]:
    """Send `question`, and wait until its answer's first delta is in Redis: its payload, reply and stream id."""
    payload = sim.text_message(question)
    reply = sim.send(payload)
    stream_id = reply["stream"]["id"]
    assert wait_until(lambda: store.llen(KEYS.stream_chunks(stream_id)) == 1)
    return payload, reply, stream_id


# --- Redis outages -----------------------------------------------------------------------------------------------


@pytest.fixture
def outage_app(make_app, serve, private_redis):
    return serve(make_app(redis_url=private_redis.url, redis_socket_timeout=0.5, stream_lease_seconds=5))


def test_a_redis_pause_keeps_the_answer_in_memory_and_writes_it_after(outage_app, private_redis, dify, caplog):
    dify.script([d.message("before "), d.sleep(1.0), d.message("during "), d.sleep(2.5), d.message("after"), d.end()])
    sim = make_simulator(outage_app.url, poll_interval=0.1)
    reply = sim.send(sim.text_message("survive a blip"))
    stream_id = reply["stream"]["id"]
    assert sim.send(sim.poll_message(stream_id)) is not None
    store = private_redis.client()
    assert wait_until(lambda: store.llen(KEYS.stream_chunks(stream_id)) == 1)  # "before " is written
    private_redis.pause()  # "during " arrives while Redis is paused
    started = time.monotonic()
    response = sim.post(sim.poll_message(stream_id))
    assert response.status_code == 503
    assert time.monotonic() - started < 2.5  # fails fast, nothing hangs
    assert response.json()["error"] == "store_unavailable"
    assert wait_until(lambda: "keeping the answer in memory" in caplog.text, timeout=5)
    private_redis.resume()
    conversation = sim.follow(reply)
    assert conversation.text == "before during after"
    assert "keeping the answer in memory" in caplog.text
    assert "Redis is back" in caplog.text
    sim.close()


def card_waiting(sim, private_redis, task_id: str) -> tuple[str, redis.Redis, dict]:
    """Ask on `sim`; once the answer's first text is written, a card (`task_id`) waits on the stream for the next
    poll, as a form's does. Returns the stream id, a client of the test's Redis, and the card."""
    stream_id = sim.send(sim.text_message(f"a question with {task_id}"))["stream"]["id"]
    store = private_redis.client()
    assert wait_until(lambda: store.llen(KEYS.stream_chunks(stream_id)) == 1)
    card = {"card_type": "text_notice", "main_title": {"title": "Approve?"}, "task_id": task_id}
    store.hset(KEYS.stream(stream_id), "card", json.dumps(card))
    return stream_id, store, card


def test_a_card_whose_reply_came_too_late_for_wecom_rides_on_a_later_poll(make_app, serve, private_redis, dify):
    """WeCom takes one card per message, so a poll hands a card out once; and WeCom waits about 5 s for a reply. A
    poll held up longer (here by a Redis pause shorter than the socket timeout) leaves the card out of its late
    reply and gives it back: a later poll carries it, once. Before, the late reply carried it, WeCom had stopped
    waiting, and a form behind the card waited for a tap that could not come (seen in the fault campaign)."""
    app = serve(make_app(redis_url=private_redis.url, redis_socket_timeout=8, stream_lease_seconds=15))
    dify.script([d.message("before "), d.sleep(10.0), d.message("after"), d.end()])
    sim = make_simulator(app.url, poll_interval=0.2)
    stream_id, store, _ = card_waiting(sim, private_redis, "card-in-a-pause")
    impatient = make_simulator(app.url, timeout=4.0)  # WeCom stops waiting for a reply after about 5 s
    private_redis.pause()
    with pytest.raises(httpx.TimeoutException):
        impatient.post(impatient.poll_message(stream_id))
    time.sleep(1.5)
    private_redis.resume()
    time.sleep(0.5)  # the held-up poll ends now, late
    cards = []
    deadline = time.monotonic() + 4
    while time.monotonic() < deadline:
        frame = sim.send(sim.poll_message(stream_id))
        cards += [frame["template_card"]] if "template_card" in frame else []
        time.sleep(0.2)
    assert [c["task_id"] for c in cards] == ["card-in-a-pause"]
    impatient.close()
    sim.close()


def late_poll(sim, stream_id: str, seconds: int) -> dict:
    """A poll callback WeCom sent `seconds` ago (a replica frozen, or a queue, kept it unread meanwhile)."""
    query, body = sim.envelope(sim.poll_message(stream_id), timestamp=int(time.time()) - seconds)
    response = sim.http.post(sim.url(), params=query, content=body, headers={"Content-Type": "application/json"})
    return sim.open_reply(response.json(), query["nonce"])


def test_a_card_rides_on_no_reply_that_comes_later_than_wecom_waits(make_app, serve, private_redis, dify):
    """A callback read long after WeCom sent it (its replica frozen: seen in the campaign) is answered after WeCom
    stopped waiting: the card stays for a later poll, and comes once. A clock that finds every reply late holds the
    card back three times at most."""
    app = serve(make_app(redis_url=private_redis.url))
    dify.script([d.message("before "), d.sleep(6.0), d.message("after"), d.end()])
    sim = make_simulator(app.url, poll_interval=0.2)
    stream_id, store, card = card_waiting(sim, private_redis, "card-late")
    assert "template_card" not in late_poll(sim, stream_id, 8)
    cards = [frame.get("template_card") for frame in (sim.send(sim.poll_message(stream_id)) for _ in range(3))]
    assert [c["task_id"] for c in cards if c][:1] == ["card-late"] and len([c for c in cards if c]) == 1
    store.hset(KEYS.stream(stream_id), mapping={"card": json.dumps({**card, "task_id": "card-skewed"})})
    store.hdel(KEYS.stream(stream_id), "card_shown", "card_by")  # a second card (a test's shortcut)
    late = [late_poll(sim, stream_id, 30).get("template_card") for _ in range(5)]
    assert [bool(c) for c in late] == [False, False, True, False, False]  # the 3 returns of the first card count
    sim.close()


def test_a_card_rides_on_no_reply_that_may_come_later_than_wecom_waits(make_app, serve, private_redis, dify):
    """A callback whose timestamp says it was sent 5.1-5.4 s ago (whole seconds: it may have been sent up to a second
    later, or not) may be answered after WeCom stopped waiting (5 s): the card stays for a later poll. Before, only
    a timestamp past 5.5 s held it back, and a replica frozen for 5.1 s gave a form's card to a reply nobody read (the
    campaign's Sentinel run of seed 12): the user never saw it, and the answer behind it waited for a tap."""
    app = serve(make_app(redis_url=private_redis.url))
    dify.script([d.message("before "), d.sleep(6.0), d.message("after"), d.end()])
    sim = make_simulator(app.url, poll_interval=0.2)
    stream_id, _, _ = card_waiting(sim, private_redis, "card-maybe-late")
    assert wait_until(lambda: 0.05 < time.time() % 1 < 0.3, timeout=2)  # its timestamp then says 5.05-5.4 s ago
    assert "template_card" not in late_poll(sim, stream_id, 5)
    cards = [frame.get("template_card") for frame in (sim.send(sim.poll_message(stream_id)) for _ in range(3))]
    assert [c["task_id"] for c in cards if c] == ["card-maybe-late"]
    sim.close()


def test_a_new_message_met_by_a_redis_blip_is_answered_not_told_to_come_again(outage_app, private_redis, dify):
    """Redis away for a second as a message comes (a shard's link, a failover's last moments): the callback takes it
    again until Redis answers, within the seconds WeCom waits for its reply, instead of "please send it again"."""
    dify.script(d.answer("answered after the blip"))
    sim = make_simulator(outage_app.url, poll_interval=0.1)
    private_redis.kill()
    back = threading.Timer(1.0, private_redis.start)
    back.start()
    try:
        started = time.monotonic()
        reply = sim.send(sim.text_message("during a blip"))
        assert time.monotonic() - started < 4.5  # WeCom's 5 s for the reply
        assert not reply["stream"]["finish"]
        assert sim.follow(reply).text == "answered after the blip"
    finally:
        back.join()  # (before the fixture stops the server: a failed test leaves none behind)
        sim.close()


def test_redis_restarted_empty_mid_answer(outage_app, private_redis, dify):
    """Redis comes back without its data: the bubble learns the stream is gone, the worker sends the whole answer
    through response_url, and new messages work again without a restart of the app."""
    dify.script([d.message("first half, "), d.sleep(2.5), d.message("second half"), d.end()])
    sim = make_simulator(outage_app.url, poll_interval=0.1)
    payload = sim.text_message("during the restart")
    reply = sim.send(payload)
    store = private_redis.client()
    assert wait_until(lambda: store.llen(KEYS.stream_chunks(reply["stream"]["id"])) == 1)  # "first half, "
    private_redis.stop()
    down = sim.send(sim.text_message("anyone?"))
    assert down["stream"]["finish"]
    assert down["stream"]["content"] == ZH["store_unavailable"]
    private_redis.start()
    conversation = sim.follow(reply)
    assert conversation.finished
    assert conversation.text == ZH["unknown_stream"]
    message = sim.inbox.wait_for(payload["response_url"], timeout=8)
    assert message["markdown"]["content"] == f"{ZH['full_answer']}\n\nfirst half, second half"
    dify.script(d.answer("back to normal"))
    assert sim.ask("and now?").text == "back to normal"
    sim.close()


class Blip:
    """Makes one Redis call fail as a short outage would: the first `times` calls raise, the rest go through."""

    def __init__(self, call, times: int = 1):
        self.call = call
        self.left = times

    def __call__(self, *args, **kwargs):
        if self.left > 0:
            self.left -= 1
            raise redis.ConnectionError("Redis blinked")
        return self.call(*args, **kwargs)


def test_a_redis_blip_in_a_side_write_never_fails_an_answer_dify_completed(make_app, serve, dify, redis_client):
    """The conversation, the reply image, the feedback mapping and the response_url record are written beside the
    answer; a blip in any of them leaves the answer done and whole (each is retried, or written with the final
    state)."""
    live = serve(make_app(stream_window_seconds=1))
    gateway = live.gateway
    image = dify.host_file(PNG)
    dify.script([d.message("slow start"), d.sleep(1.5), d.message_file(image), d.message(" and the rest"), d.end()])
    conversations, store = gateway.bot().streams.backends[""].parts.conversations, gateway.bot().streams.store
    conversations.remember = Blip(conversations.remember, times=2)
    store.record = Blip(store.record)
    store.finish = Blip(store.finish)
    sim = make_simulator(live.url)
    payload = sim.text_message("blip please")
    conversation = sim.follow(sim.send(payload))
    assert conversation.finished
    assert sim.inbox.wait_for(payload["response_url"]) is not None  # the rest, after the window closed the bubble
    wait_idle(live)
    meta = redis_client.hgetall(KEYS.stream(conversation.stream_id))
    assert meta["status"] == "done"
    assert meta["rest_sent"] == "yes"
    assert redis_client.get("conversation:demo-bot:single:alice") == meta["conversation_id"]
    assert redis_client.llen(KEYS.stream_images(conversation.stream_id)) == 1
    assert redis_client.exists(KEYS.feedback(conversation.stream_id))


def test_deltas_a_failover_lost_are_written_again_from_memory(live, dify, redis_client, caplog):
    """Replication is asynchronous: a new master may lack the last appends. The next append sees the list shorter
    than what was written (a conflict), and the owner writes the whole answer again."""
    dify.script([d.message("one "), d.sleep(0.6), d.message("two "), d.sleep(0.6), d.message("three"), d.end()])
    sim = make_simulator(live.url)
    reply = sim.send(sim.text_message("survive a failover"))
    stream_id = reply["stream"]["id"]
    assert wait_until(lambda: redis_client.llen(KEYS.stream_chunks(stream_id)) == 2)  # "one ", "two "
    redis_client.ltrim(KEYS.stream_chunks(stream_id), 0, 0)  # the promoted replica had only "one "
    redis_client.hset(KEYS.stream(stream_id), mapping={"folded": 0, "text": ""})
    conversation = sim.follow(reply)
    assert conversation.text == "one two three"
    assert "writing the answer whole" in caplog.text
    assert redis_client.hget(KEYS.stream(stream_id), "status") == "done"


def test_an_answers_last_deltas_a_failover_lost_after_its_last_append_are_written_before_it_ends(
    live, dify, redis_client, caplog
):
    """The failover loses the last appends and none follows to find the list short: the finish does (seed 19's
    Sentinel run ended a bubble two sentences short), and the answer is written whole before it ends."""
    dify.script([d.message("one "), d.message("two"), d.sleep(1.0), d.end()])
    sim = make_simulator(live.url)
    reply = sim.send(sim.text_message("survive a failover at the end"))
    stream_id = reply["stream"]["id"]
    assert wait_until(lambda: "".join(redis_client.lrange(KEYS.stream_chunks(stream_id), 0, -1)) == "one two")
    redis_client.delete(KEYS.stream_chunks(stream_id))  # the promoted replica had none of them
    redis_client.hset(KEYS.stream(stream_id), mapping={"folded": 0, "text": ""})
    conversation = sim.follow(reply)
    assert conversation.text == "one two"
    assert "lacked deltas it had taken" in caplog.text
    assert redis_client.hget(KEYS.stream(stream_id), "status") == "done"


def test_a_poll_on_the_live_owner_whose_lease_was_lost_starts_no_second_answer(live, dify, redis_client):
    """The lease is lost while its owner lives (a failover rolling it back, a Redis pause, a stopped process) and
    WeCom's next poll lands on the owner's own process: it takes its lease back instead of restarting the answer
    in a second worker beside the first (a second Dify call)."""
    dify.script([d.sleep(1.5), *d.answer("the one answer")])  # nothing shown for a while: a restart would be allowed
    sim = make_simulator(live.url, poll_interval=0.1)
    reply = sim.send(sim.text_message("hello", msgid="lost-lease-1"))
    stream_id = reply["stream"]["id"]
    assert wait_until(lambda: len(dify.chat_requests()) == 1)
    redis_client.delete(KEYS.stream_lease(stream_id))
    conversation = sim.follow(reply)
    assert conversation.text == "the one answer"
    wait_idle(live)
    assert len(dify.chat_requests()) == 1
    meta = redis_client.hgetall(KEYS.stream(stream_id))
    assert meta["status"] == "done" and "restarts" not in meta
    sim.close()


def test_a_poll_on_the_live_owner_of_a_chatflow_whose_lease_was_lost_does_not_resume_it_beside_itself(
    make_app, serve, dify, redis_client
):
    """The same with a chatflow, whose run could be streamed again: a second worker in the owner's process would
    write the answer a second time into the bubble."""
    from demo import dify_apps as apps

    words = [f"w{i} " for i in range(20)]
    steps = [apps.workflow_started()]
    for word in words:
        steps += [d.message(word), d.sleep(0.1)]
    dify.mode = "advanced-chat"
    dify.script([*steps, apps.workflow_done({"answer": "".join(words)}), d.end()])
    live = serve(make_app(dify_app_type="advanced-chat"))
    sim = make_simulator(live.url, poll_interval=0.1)
    reply = sim.send(sim.text_message("a chatflow answer", msgid="lost-lease-2"))
    stream_id = reply["stream"]["id"]
    assert wait_until(lambda: redis_client.hget(KEYS.stream(stream_id), "workflow_run_id"))
    redis_client.delete(KEYS.stream_lease(stream_id))
    conversation = sim.follow(reply)
    assert conversation.text == "".join(words)
    wait_idle(live)
    assert dify.reattaches == []
    assert "resumes" not in redis_client.hgetall(KEYS.stream(stream_id))
    sim.close()


def test_a_redis_pause_longer_than_the_retries_at_an_answers_end_delivers_it_once(outage_app, private_redis, dify):
    """Redis pauses as the answer ends, for longer than the finisher's first retries: it keeps the answer and
    waits for Redis while WeCom may still poll the bubble, instead of sending the whole answer through response_url
    and leaving a bubble that a later poll would end as interrupted (the answer twice, once with 'ask again')."""
    dify.script([d.message("before "), d.sleep(1.0), d.message("after"), d.end()])
    sim = make_simulator(outage_app.url, poll_interval=0.2)
    store = private_redis.client()
    payload, reply, stream_id = ask_until_written(sim, store, "a pause at the end")  # "before " is written
    private_redis.pause()  # the rest, the end and the final state come while Redis is paused
    time.sleep(15)  # past the first retries (about 7.5 s, plus a 0.5 s timeout each) and the 5 s lease
    private_redis.resume()
    conversation = sim.follow(reply)
    assert conversation.text == "before after"
    assert wait_until(lambda: outage_app.gateway.runner.active_count == 0, timeout=10)
    assert sim.inbox.wait_for(payload["response_url"], timeout=2) is None  # nothing sent a second time
    assert len(dify.chat_requests()) == 1
    sim.close()


def test_a_superseded_attempt_writes_nothing_even_from_a_process_of_the_same_name(make_app, serve, dify, redis_client):
    """Fencing per attempt. An answer's first attempt loses its lease while it lives, before showing anything; a
    poll on another process restarts it as the stream's second attempt. Both processes have the same name (a
    container restarted in its pod keeps the pod's name and, often, its pid): with owners named by process, the
    first attempt's late write passed the owner check, took the second's delta for its own and ended the bubble
    with it, and the second's answer went out again through response_url. Its token is superseded now: its first
    write is refused and it stops."""
    dify.script([d.sleep(1.5), d.message("the first attempt's answer"), d.end()])
    dify.script([d.message("the second "), d.sleep(2.5), d.message("attempt's answer"), d.end()])
    first, second = (serve(make_app(replica_id="same-name", stream_lease_seconds=2)) for _ in range(2))
    opener = make_simulator(first.url)
    payload = opener.text_message("hello", msgid="superseded-1")
    reply = opener.send(payload)
    stream_id = reply["stream"]["id"]
    assert wait_until(lambda: len(dify.chat_requests()) == 1)
    first.gateway.runner.stop()  # its keeper stops: the lease runs out while the first attempt waits for Dify
    redis_client.delete(KEYS.stream_lease(stream_id))
    poller = make_simulator(second.url, poll_interval=0.1)
    conversation = poller.follow(reply)
    assert conversation.text == "the second attempt's answer"
    assert wait_until(lambda: first.gateway.runner.active_count == 0, timeout=10)
    assert poller.inbox.wait_for(payload["response_url"], timeout=1) is None  # nothing went out a second time
    meta = redis_client.hgetall(KEYS.stream(stream_id))
    assert meta["status"] == "done" and meta["restarts"] == "1"
    assert meta["owner"].endswith("#2")
    opener.close()
    poller.close()


def test_an_answer_ended_in_an_outage_reaches_the_user_once(outage_app, private_redis, dify):
    """A draining process meets Redis away at an answer's end: it sends what the bubble has not shown through
    response_url at once (what follows the text Redis confirmed holding, not the whole answer: the bubble keeps
    what it shows). The stream is closed at that text when Redis is back, saying the rest was sent separately: no
    poll shows more of it, resumes, restarts or ends it as 'interrupted, ask again' after the user has it whole."""
    dify.script([d.message("before "), d.sleep(1.0), d.message("after"), d.end()])
    sim = make_simulator(outage_app.url, poll_interval=0.2)
    store = private_redis.client()
    payload, reply, stream_id = ask_until_written(sim, store, "a pause while draining")  # "before " is written
    private_redis.pause()
    outage_app.gateway.runner.accepting = False  # the process drains: its finisher waits no longer for Redis
    sent = sim.inbox.wait_for(payload["response_url"], timeout=15)
    assert sent is not None
    assert sent["markdown"]["content"] == f"{ZH['continued']}\n\nafter"  # the rest, and only the rest
    time.sleep(6)  # past the 5 s lease
    private_redis.resume()
    conversation = sim.follow(reply)
    # The appends of "after" sent while Redis was paused ran when it resumed, past their deadlines: refused, so no
    # poll between the resume and the stream's end can show what the response_url message carries.
    assert store.lrange(KEYS.stream_chunks(stream_id), 0, -1) == ["before "]
    assert conversation.text == f"before\n\n{ZH['rest_sent_separately']}"
    assert ZH["orphaned"] not in conversation.text
    assert wait_until(lambda: outage_app.gateway.runner.active_count == 0, timeout=10)
    meta = store.hgetall(KEYS.stream(stream_id))
    assert meta["status"] == "done" and meta["delivered"] == "response_url" and meta["close_reason"] == "separately"
    assert "resumes" not in meta and "restarts" not in meta
    # Its audit row records what the user has, the bubble and the message together, not only what Redis holds
    # (the 10-minute campaign on a Cluster, seed 14: a row with 17 of the 20 sentences the user was shown).
    row = row_of_stream("default", meta, store.lrange(KEYS.stream_chunks(stream_id), 0, -1))
    assert row.answer == f"before after\n\n{ZH['rest_sent_separately']}"
    assert len(dify.chat_requests()) == 1
    sim.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the exit, in its thread
@pytest.mark.parametrize("app", ["chatflow", "chat"])
def test_a_rest_sent_by_a_process_that_exited_before_redis_came_back_is_not_shown_again(
    make_app, serve, private_redis, mysql_url, dify, monkeypatch, app
):
    """An answer ends in a draining process while Redis is away: the rest goes through response_url at once, and
    the process exits before Redis is back to mark the stream so (the 10-minute campaign on one server, seed 48:
    its drain ended 0.8 s before Redis came back). The end was kept in the database first. The poll that finds the
    stream's lease gone on another replica ends it so: a chatflow's run is not followed again into the bubble,
    which showed the user the rest a second time (the campaign's count); a chat's answer, which cannot be, is not
    ended as "interrupted, ask again" under the rest the user has."""
    from demo import dify_flows as flows
    from services.auth.db import make_engine
    from services.callback.kept_ends import wecom_kept_ends

    engine = make_engine(mysql_url)
    wecom_kept_ends.drop(engine, checkfirst=True)  # no row of another test's
    if app == "chatflow":
        dify.serve_flow(flows.slow_chatflow(seconds=2))
        shown, rest = "part one (drained).", "SLEPT (part two)"
    else:
        dify.script([d.message("before "), d.sleep(2.0), d.message("after"), d.end()])
        shown, rest = "before", "after"
    first, second = (
        serve(
            make_app(
                replica_id=f"replica-{name}",
                redis_url=private_redis.url,
                redis_socket_timeout=0.5,
                stream_lease_seconds=5,
                database_url=mysql_url,
            )
        )
        for name in "ab"
    )
    delivery = first.gateway.bot().delivery
    keep_end = delivery.keep_end

    def exit_now(*args):
        kill(first)
        raise _Died  # the process exits with its drain: nothing after this runs

    def keep_and_exit(*args):
        keep_end(*args)
        exit_now()

    # The drain ends at the first wait for Redis after the post: the end must be kept before any (in the aimed run
    # of seed 49 the process exited while it waited to settle its post in Redis, before it kept the end).
    monkeypatch.setattr(delivery.posts, "_settle", exit_now)
    monkeypatch.setattr(delivery, "keep_end", keep_and_exit)
    sim = make_simulator(first.url, poll_interval=0.2)
    payload = sim.text_message("drained")
    reply = sim.send(payload)
    stream_id = reply["stream"]["id"]
    assert wait_until(lambda: shown in sim.send(sim.poll_message(stream_id))["stream"]["content"])
    private_redis.pause()
    first.gateway.runner.accepting = False  # it drains: its finisher waits no longer for Redis
    sent = sim.inbox.wait_for(payload["response_url"], timeout=15)
    assert sent is not None and sent["markdown"]["content"] == f"{ZH['continued']}\n\n{rest}"
    time.sleep(6)  # past the 5 s lease
    private_redis.resume()
    store = private_redis.client()
    poller = make_simulator(second.url, poll_interval=0.2)
    conversation = poller.follow(reply)
    assert conversation.text == f"{shown}\n\n{ZH['rest_sent_separately']}"
    assert wait_until(lambda: second.gateway.runner.active_count == 0, timeout=10)
    assert dify.reattaches == [] and len(dify.chat_requests()) == 1
    meta = store.hgetall(KEYS.stream(stream_id))
    assert meta["status"] == "done" and meta["delivered"] == "response_url" and meta["close_reason"] == "separately"
    assert len(sim.inbox.received(payload["response_url"])) == 1
    row = row_of_stream("default", meta, store.lrange(KEYS.stream_chunks(stream_id), 0, -1))
    assert row.answer == f"{shown} {rest}\n\n{ZH['rest_sent_separately']}"  # what the user has
    engine.dispose()
    sim.close()
    poller.close()


def test_a_post_made_without_a_record_returns_at_once_and_is_settled_once_redis_is_back(
    outage_app, private_redis, monkeypatch
):
    """A post through response_url whose record Redis did not take goes out at once, and its caller goes on (its
    answer's end is kept next, before any wait for Redis); the sweep settles it once Redis is back, so that a record
    Redis ran late (its write sent before the outage's timeout) is never taken for a post whose poster is gone."""
    from services.callback import rest_posts

    monkeypatch.setattr(rest_posts, "SWEEP_SECONDS", 0.3)
    posts = outage_app.gateway.bot().delivery.posts
    sim = make_simulator(outage_app.url)
    url = sim.inbox.new_response_url()
    private_redis.pause()
    started = time.monotonic()
    assert posts.send("unsettled-1", url, "the rest")
    assert time.monotonic() - started < 5  # its record's tries, not a wait to settle it
    private_redis.resume()
    store = private_redis.client()
    claim = KEYS.rest_post_claim("unsettled-1")
    assert wait_until(lambda: store.get(claim) == "sent", timeout=10)
    assert store.zscore(KEYS.rest_posts(), "unsettled-1") is None
    assert [m["markdown"]["content"] for m in sim.inbox.received(url)] == ["the rest"]
    sim.close()


def test_an_answer_whose_bubble_only_redis_can_tell_waits_for_it_and_sends_what_follows(
    make_app, serve, private_redis, dify
):
    """Redis away as the bubble's window ends, past the finisher's patience: only Redis knows what the bubble showed
    (a poll on another clock may have closed it at the window at less than Redis confirmed holding), so the finisher
    waits for Redis instead of sending the whole answer over what the bubble showed. Back, the stream is closed at
    the window at what the last poll showed, and only what follows goes through response_url, once."""
    live = serve(
        make_app(redis_url=private_redis.url, redis_socket_timeout=0.5, stream_lease_seconds=5, stream_window_seconds=4)
    )
    dify.script([d.message("shown "), d.sleep(2.0), d.message("never shown"), d.end()])
    sim = make_simulator(live.url, poll_interval=0.2)
    store = private_redis.client()
    payload, reply, stream_id = ask_until_written(sim, store, "an outage over the window's end")
    assert sim.send(sim.poll_message(stream_id))["stream"]["content"].startswith("shown")  # the bubble shows it
    private_redis.pause()  # the rest comes, the answer ends and the window closes while Redis is paused
    time.sleep(12)  # past the finisher's first patience (about 7.5 s) and the 4 s window
    private_redis.resume()
    message = sim.inbox.wait_for(payload["response_url"], timeout=15)
    assert message is not None
    assert message["markdown"]["content"] == f"{ZH['continued']}\n\nnever shown"  # what follows, not the whole
    conversation = sim.follow(reply)
    assert conversation.finished and "never shown" not in conversation.text
    assert wait_until(lambda: live.gateway.runner.active_count == 0, timeout=10)
    meta = store.hgetall(KEYS.stream(stream_id))
    assert meta["status"] == "done" and meta["close_reason"] == "window" and meta["closed_bytes"] == "6"
    assert len(sim.inbox.received(payload["response_url"])) == 1
    sim.close()


class _Died(BaseException):
    """The process is gone: nothing after this runs in the thread that met it."""


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the death, in its thread
def test_the_rest_of_an_answer_whose_replica_died_while_posting_it_is_posted_by_another(pair, dify, monkeypatch):
    """A bubble that closed early promised the rest; the replica posting it through response_url died between two
    tries while WeCom was busy (the 10-minute campaign on one server: 95 of 118 sentences never came). The post was
    written down first, so another replica makes it, once, when the dead one's claim lapses."""
    from services.callback import rest_posts

    monkeypatch.setattr(rest_posts, "REST_POST_CLAIM_TTL_SECONDS", 2)
    monkeypatch.setattr(rest_posts, "SWEEP_SECONDS", 0.3)
    first, second = pair
    tries = []

    def die(url, message, still_ours=None):
        tries.append(url)
        raise _Died

    first.gateway.bot().delivery.posts.responder.send_markdown = die
    text = "汉字" * 4000  # 24000 bytes: more than a bubble holds
    dify.script([d.message(text[:3000]), d.message(text[3000:]), d.end()])
    sim = make_simulator(first.url)
    payload = sim.text_message("a long one")
    conversation = sim.follow(sim.send(payload))
    shown, note = conversation.text.split("\n\n")
    assert note == ZH["overflow_continues"]
    message = sim.inbox.wait_for(payload["response_url"], timeout=20)
    assert tries, "the first replica never tried the post"
    assert shown + message["markdown"]["content"].removeprefix(ZH["continued"] + "\n\n") == text
    time.sleep(1.0)  # a bounded look: no second post follows (WeCom would refuse it)
    assert len(sim.inbox.received(payload["response_url"])) == 1
    sim.close()


def test_a_bubble_closed_early_whose_replica_then_died_is_not_left_promising_the_rest(make_pair, dify, monkeypatch):
    """A bubble that overflowed closed with "the rest follows"; WeCom polls it no more. Its replica then died before
    the answer ended (the 10-minute Cluster run of seed 12: 95 of 136 sentences never came, and nobody said so). A
    chat's answer cannot be taken up again: another replica, watching the bubbles closed early, ends it as
    interrupted and says so through response_url, once, after the text Redis held past what the bubble showed (a
    3-minute run of seed 12: that text was in the audit row, never sent)."""
    from services.callback import rest_posts

    monkeypatch.setattr(rest_posts, "SWEEP_SECONDS", 0.3)
    first, second = make_pair(stream_lease_seconds=2, dify_read_timeout=90.0)
    text = "汉字" * 4000  # 24000 bytes: more than a bubble holds
    dify.script([d.message(text), d.stall(60), d.message("never written"), d.end()])
    sim = make_simulator(first.url)
    payload = sim.text_message("a long one, then a death")
    conversation = sim.follow(sim.send(payload))
    assert conversation.text.endswith(ZH["overflow_continues"])
    kill(first)  # its lease runs out while its worker waits for Dify
    message = sim.inbox.wait_for(payload["response_url"], timeout=20)
    assert message is not None, "nothing told the user that the promised rest will not come"
    shown = conversation.text.removesuffix(f"\n\n{ZH['overflow_continues']}")
    rest, note = message["markdown"]["content"].removeprefix(f"{ZH['continued']}\n\n").rsplit("\n\n", 1)
    assert (shown + rest, note) == (text, ZH["orphaned"])
    time.sleep(1.0)  # a bounded look: no second post follows (WeCom would refuse it)
    assert len(sim.inbox.received(payload["response_url"])) == 1
    assert len(dify.chat_requests()) == 1
    sim.close()


def test_a_bubble_closed_by_a_poll_whose_reply_was_lost_is_watched_all_the_same(make_pair, dify, monkeypatch):
    """A 4-minute one-server run of seed 55: the poll that closed an overflowing bubble met Redis losing its reply
    (the script ran, the poll failed), so no process heard of the closing and nobody watched the bubble; WeCom's
    next poll got it closed, "the rest follows", and its replica died before the answer ended. 95 of 133 sentences
    never came, and nobody said so. A poll that finds a bubble closed under an answer still running lists it too."""
    from services.callback import rest_posts

    monkeypatch.setattr(rest_posts, "SWEEP_SECONDS", 0.3)
    first, second = make_pair(stream_lease_seconds=2, dify_read_timeout=90.0)
    text = "汉字" * 4000  # 24000 bytes: more than a bubble holds
    dify.script([d.message(text), d.stall(60), d.message("never written"), d.end()])
    sim = make_simulator(first.url)
    payload = sim.text_message("a long one, a lost reply, then a death")
    reply = sim.send(payload)
    streams = first.gateway.bot().streams

    def closed_by_a_lost_poll() -> bool:  # the poll's script runs; what it said never reaches the gateway
        polled = streams.poll_path.poll(reply["stream"]["id"], 360, streams.overflow_bytes, ZH["orphaned"])
        return polled.event == "closed_overflow"

    assert wait_until(closed_by_a_lost_poll, timeout=10)
    conversation = sim.follow(reply)  # WeCom polls again, and gets the bubble closed
    assert conversation.text.endswith(ZH["overflow_continues"])
    kill(first)  # its lease runs out while its worker waits for Dify
    message = sim.inbox.wait_for(payload["response_url"], timeout=20)
    assert message is not None, "nothing told the user that the promised rest will not come"
    assert message["markdown"]["content"].endswith(ZH["orphaned"])
    time.sleep(1.0)  # a bounded look: no second post follows
    assert len(sim.inbox.received(payload["response_url"])) == 1
    sim.close()
