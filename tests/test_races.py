"""Races that a fault campaign rarely provokes, each forced here on the real Redis, with the fault placed exactly:
a write that Redis applied but whose reply was lost (a timeout while Redis was paused; Redis runs what it had
buffered when it resumes), and the retry that follows it (issue 35's R2 and R4: those tests failed before their
fixes; the third guards the retry those fixes made possible); and a holder that dies at the worst moment (R3)."""

from __future__ import annotations

import threading
import time

import pytest
import redis

from demo import dify_standin as d
from services.gateway import build_gateway
from services.longconn.outbox import Outbox, shown_of
from services.streams.job import StreamJob
from services.streams.record import F
from services.streams.store import StreamStore
from services.texts import CATALOGUE
from tests.conftest import KEYS, WS_BOT_ID, WS_BOT_SECRET, make_simulator, outbox_settled, wait_idle, wait_until

ZH = CATALOGUE["zh"]


class LostReply:
    """Makes one Redis call run and then fail as if its reply never came: the first `times` calls are applied,
    and raise a timeout after."""

    def __init__(self, call, times: int = 1):
        self.call = call
        self.left = times

    def __call__(self, *args, **kwargs):
        result = self.call(*args, **kwargs)
        if self.left > 0:
            self.left -= 1
            raise redis.TimeoutError("the reply was lost")
        return result


def test_a_finish_applied_whose_reply_was_lost_still_sends_the_promised_rest(make_app, serve, dify, redis_client):
    """R2: the bubble closed early ("the rest follows"); the final state was written but its reply lost; the retry
    must not read "already final" as "someone else ended it", or the rest is never sent."""
    live = serve(make_app(stream_window_seconds=1))
    store = live.gateway.bot().streams.store
    store.finish = LostReply(store.finish)
    dify.script([d.message("shown in the bubble"), d.sleep(1.6), d.message(" and the rest"), d.end()])
    sim = make_simulator(live.url)
    payload = sim.text_message("a slow answer")
    conversation = sim.follow(sim.send(payload))
    assert conversation.finished and conversation.text.startswith("shown in the bubble")
    message = sim.inbox.wait_for(payload["response_url"], timeout=8)
    assert message is not None, "the rest promised by the closed bubble was never sent"
    assert "and the rest" in message["markdown"]["content"]
    wait_idle(live)
    meta = redis_client.hgetall(KEYS.stream(conversation.stream_id))
    assert meta["status"] == "done" and meta["rest_sent"] == "yes"
    assert len(sim.inbox.received(payload["response_url"])) == 1
    sim.close()


def test_an_outbox_claim_applied_whose_reply_was_lost_is_found_ours_by_its_retry(redis_client):
    """R4: the marker's SET NX ran, its reply was lost, and the retry's SET NX answers "taken": read as "sent
    elsewhere", the rest was never sent (or 30 s late)."""
    store = StreamStore(redis_client, KEYS, 3600, lease_seconds=5)
    outbox = Outbox(redis_client, KEYS, store, "race-bot")
    outbox._write = LostReply(outbox._write)
    with pytest.raises(redis.TimeoutError):
        outbox.claim("s-r4", "replica-a:1 attempt-1")
    assert outbox.claim("s-r4", "replica-a:1 attempt-1")  # the same claim, tried again: its own
    assert not outbox.claim("s-r4", "replica-a:1 attempt-2")  # anyone else's claim: taken
    assert not outbox.claim("s-r4", "replica-b:7 pass")


def test_a_rest_handed_to_the_outbox_twice_by_retries_is_one_message(ws_gateway, dify, redis_client):
    """The rest of an answer handed to the outbox (its message made and tracked) while marking the stream sent
    lost its reply: the retry must not make a second message."""
    gateway, wecom = ws_gateway()
    streams = gateway.bot().streams
    job = StreamJob(stream_id="s-rest", msgid="m", userid="alice", aibotid=WS_BOT_ID, attempt="replica-a:1#1")
    delivery = streams.delivery
    delivery.outbox.sent = LostReply(delivery.outbox.sent)
    with pytest.raises(redis.TimeoutError):
        delivery._hand_over(job, "the rest, once", False)
    assert delivery._hand_over(job, "the rest, once", False)
    assert wait_until(lambda: wecom.proactive, timeout=10)
    assert outbox_settled(redis_client, WS_BOT_ID)
    assert [m["markdown"]["content"] for m in wecom.proactive] == ["the rest, once"]


@pytest.fixture
def two_processes(redis_client, settings, wecom_ws, tmp_path):
    """Two processes of one long-connection bot on one WeCom stand-in (lease 2 s): (the holder, the other, WeCom)."""
    wecom = wecom_ws({WS_BOT_ID: WS_BOT_SECRET})
    bot = settings.replace(
        wecom_mode="long_connection",
        wecom_bot_id=WS_BOT_ID,
        wecom_bot_secret=WS_BOT_SECRET,
        wecom_ws_url=wecom.url,
        wecom_ws_lease_seconds=2,
    )
    gateways = []
    first = build_gateway(bot.replace(replica_id="replica-a"), (bot.bot,), tmp_path)
    first.start()
    gateways.append(first)
    assert wait_until(lambda: wecom.subscribed(WS_BOT_ID) == 1, timeout=10)
    second = build_gateway(bot.replace(replica_id="replica-b"), (bot.bot,), tmp_path)
    second.start()
    gateways.append(second)
    yield first, second, wecom
    for gateway in gateways:
        gateway.drain(2)
        gateway.close()


def die(holder) -> None:
    """The holder's process dies: no more lease renewals, frames or acks on its connection."""
    holder._stop.set()
    holder._session.drop()


def test_a_holder_that_dies_right_after_queueing_an_answer_leaves_it_to_the_next_holders_outbox(
    two_processes, dify, redis_client
):
    """R3: the connection's holder queued a message's answer and died before anything recorded where the answer
    goes; the answer was made and never sent. The stream is now tracked before it is queued."""
    first, second, wecom = two_processes
    holder = first.bot().connection.holder
    queue = first.bot().streams.delivery.queue
    real_submit = queue.submit

    def submit_and_die(stream_id, attempt):
        real_submit(stream_id, attempt)
        die(holder)
        raise RuntimeError("the holder died right after queueing the answer")

    queue.submit = submit_and_die
    dify.script([d.message("answered after all"), d.end()])
    wecom.deliver_text(WS_BOT_ID, "a question at the worst moment")
    assert wait_until(lambda: second.bot().connection.holder.state == "holding", timeout=15)
    assert wait_until(lambda: wecom.proactive, timeout=15), "the answer was made and never sent"
    assert outbox_settled(redis_client, WS_BOT_ID)
    [message] = wecom.proactive
    assert message["markdown"]["content"].endswith("answered after all")
    assert len(dify.chat_requests()) == 1


def shown_frame(wecom, req_id, text):
    return any(text in f["stream"]["content"] for f in wecom.frames(req_id))


def test_a_frame_wecom_showed_whose_ack_the_dead_holder_never_got_is_not_sent_again(two_processes, dify, redis_client):
    """R5: WeCom showed a frame and the holder died before its ack came (WeCom acks about 0.3 s later); the next
    holder must not send that text again as part of the rest."""
    first, second, wecom = two_processes
    wecom.ack_delay = 1.0
    dify.script([d.message("shown before the death. "), d.sleep(2.5), d.message("The rest."), d.end()])
    req_id = wecom.deliver_text(WS_BOT_ID, "a question")
    assert wait_until(lambda: shown_frame(wecom, req_id, "shown before the death."), timeout=10)
    die(first.bot().connection.holder)  # the frame's ack is still a second away
    assert wait_until(lambda: second.bot().connection.holder.state == "holding", timeout=15)
    assert wait_until(lambda: wecom.proactive, timeout=20)
    assert outbox_settled(redis_client, WS_BOT_ID)
    [message] = wecom.proactive
    assert message["markdown"]["content"].endswith("The rest.")
    assert "shown before the death" not in message["markdown"]["content"]


def test_a_drained_holder_hands_over_once_its_frames_acks_came(two_processes, dify, redis_client):
    """A drained holder closed its connection 0.1-0.25 s after its last frames, before their acks: it now waits for
    them, so what each bubble shows is recorded from WeCom's own word."""
    first, second, wecom = two_processes
    wecom.ack_delay = 0.5
    dify.script([d.message("shown before the drain. "), d.sleep(2.5), d.message("The rest."), d.end()])
    req_id = wecom.deliver_text(WS_BOT_ID, "a question")
    assert wait_until(lambda: shown_frame(wecom, req_id, "shown before the drain."), timeout=10)
    first.bot().connection.holder.stop()
    stream_id = wecom.frames(req_id)[0]["stream"]["id"]
    assert "shown before the drain." in shown_of(redis_client.hgetall(KEYS.stream(stream_id)))[0]
    assert wait_until(lambda: wecom.proactive, timeout=20)
    assert outbox_settled(redis_client, WS_BOT_ID)
    [message] = wecom.proactive
    assert message["markdown"]["content"].endswith("The rest.")
    assert "shown before the drain" not in message["markdown"]["content"]


@pytest.mark.parametrize("redis_topology", ["one_server", "with_replica"])
def test_a_drained_holder_lets_its_pass_under_way_end_before_it_closes_the_connection(
    two_processes, dify, redis_client, redis_topology
):
    """A holder drained while its keeper's pass was between recording a frame and sending it closed the connection
    under that pass: the frame never went out, and its record was undone only by the keeper thread after the drain,
    or never, when the process exited first. The record stood, and the next holder's rest began after text no frame
    showed (a 2-minute Sentinel campaign, one message). The drain now waits for the pass: when it returns, the
    record says what WeCom was shown. The pass is held where it stands between a record and its frame: on one
    server, right after the poll that recorded it; where the pass waits for a replica, in that write."""
    first, second, wecom = two_processes
    holder = first.bot().connection.holder
    steps = [d.message("Shown first. "), d.sleep(2.5), d.message("Pumped during the drain. "), d.sleep(3.0)]
    dify.script([*steps, d.message("The rest."), d.end()])
    req_id = wecom.deliver_text(WS_BOT_ID, "a question")
    assert wait_until(lambda: shown_frame(wecom, req_id, "Shown first."), timeout=10)
    stream_id = wecom.frames(req_id)[0]["stream"]["id"]
    in_pass = threading.Event()

    def hold_the_pass() -> None:  # once, for the pass whose frame first shows the sentence
        folded = redis_client.hget(KEYS.stream(stream_id), F.text) or ""
        if "Pumped during the drain." in folded and not in_pass.is_set():
            in_pass.set()
            time.sleep(1.0)

    replies = holder.replies
    if redis_topology == "one_server":
        poll = replies.streams.frame

        def slow_poll(polled: str, record):
            made = poll(polled, record)
            if record is not None and polled == stream_id:
                hold_the_pass()
            return made

        replies.streams.frame = slow_poll
    else:
        replies.outbox.durable.wait_ms = 50  # the pass confirms its records in its write for a replica
        flush = replies.ledger.flush

        def slow_flush(recorded=(), token="", **rest):
            if recorded:
                hold_the_pass()
            flush(recorded, token, **rest)

        replies.ledger.flush = slow_flush
    assert in_pass.wait(10)
    assert not shown_frame(wecom, req_id, "Pumped during the drain.")
    holder.stop()  # the process may exit as soon as this returns
    shown = shown_of(redis_client.hgetall(KEYS.stream(stream_id)))[0]
    assert ("Pumped during the drain." in shown) == shown_frame(wecom, req_id, "Pumped during the drain.")
    assert wait_until(lambda: wecom.proactive, timeout=20)
    assert outbox_settled(redis_client, WS_BOT_ID)
    [message] = wecom.proactive
    assert message["markdown"]["content"].endswith("The rest.")
    bubble = wecom.frames(req_id)[-1]["stream"]["content"]
    assert ("Pumped during the drain." in bubble) != ("Pumped during the drain." in message["markdown"]["content"])


def test_a_long_connection_message_met_by_a_redis_outage_is_answered_once_redis_is_back(
    ws_gateway, dify, private_redis
):
    """WeCom delivers a long connection's message once (a callback it tries again). One taken while Redis does not
    answer is taken again until Redis is back, then answered; before, it ended at once with "please ask again" on a
    req_id that was often dead by then (the 10-minute campaign lost two: a holder frozen with them in its socket woke
    into a Redis pause, and its connection had moved)."""
    _, wecom = ws_gateway(redis_url=private_redis.url, redis_socket_timeout=0.5)
    dify.script([d.message("Answered after the outage."), d.end()])
    private_redis.pause()
    try:
        message = wecom.deliver_text(WS_BOT_ID, "asked in an outage")
        time.sleep(2.0)
    finally:
        private_redis.resume()
    final = wecom.final(message, timeout=30)
    assert final["stream"]["content"] == "Answered after the outage."
    assert ZH["store_unavailable"] not in str(wecom.frames(message))


def test_a_long_connection_answer_ended_in_an_outage_by_a_draining_process_goes_on_from_what_the_bubble_showed(
    ws_gateway, dify, private_redis
):
    """On a long connection the bubble shows what its holder sent, which may be less than Redis holds (here its
    req_id died with a dropped socket after the first sentence). A draining process that meets Redis away at the
    answer's end used to send what followed the text Redis confirmed, as it does for callback polls, and close the
    stream there: the sentence Redis held and no frame showed was lost (the 10-minute Cluster run of seed 12). Only
    Redis knows what the bubble shows, and nothing reaches a long connection's user without it: the answer's end
    waits for Redis, and the rest goes out from what the bubble showed."""
    gateway, wecom = ws_gateway(redis_url=private_redis.url, redis_socket_timeout=0.5)
    steps = [d.message("Shown. "), d.sleep(1.5), d.message("Written, never shown. "), d.sleep(1.5)]
    dify.script([*steps, d.message("The end."), d.end()])
    message = wecom.deliver_text(WS_BOT_ID, "a drop, then an outage while draining")
    assert wait_until(lambda: "Shown." in str(wecom.frames(message)), timeout=10)
    stream_id = wecom.frames(message)[0]["stream"]["id"]
    wecom.drop(WS_BOT_ID)  # the bubble's req_id dies with its socket; the holder connects again
    store = private_redis.client()
    assert wait_until(lambda: "Written, never shown. " in store.lrange(KEYS.stream_chunks(stream_id), 0, -1))
    private_redis.pause()
    gateway.runner.accepting = False  # the process drains: it waits no longer for Redis to end a callback answer
    try:
        time.sleep(3.0)  # the answer ends, and its final state cannot be written
    finally:
        private_redis.resume()
    assert wait_until(lambda: wecom.proactive, timeout=30)
    assert outbox_settled(store, WS_BOT_ID)
    shown = "".join(frame["stream"]["content"] for frame in wecom.frames(message))
    assert "Written" not in shown
    [rest] = [sent["markdown"]["content"] for sent in wecom.proactive]
    assert rest.endswith("Written, never shown. The end.")
