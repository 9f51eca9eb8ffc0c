"""End to end over real sockets: the WeCom simulator -> app instance(s) -> the real Redis -> the Dify stand-in.

Covers the whole stream life, a WeCom retry landing on a second instance, polls alternating between two
instances, and every failure behind the bubble ending in a finished reply with the partial text and a note.
"""

import threading
import time
from urllib.parse import urlsplit

import pytest

from bench.faults.proxy import FaultyLink
from demo import dify_standin as d
from demo.wecom_simulator import ReplyError
from services import metrics
from services.texts import CATALOGUE
from services.wecom.limits import MAX_CONTENT_BYTES
from tests.conftest import KEYS, FirstReplyLost, make_simulator, wait_idle, wait_until

ZH = CATALOGUE["zh"]


def stream_meta(redis_client, stream_id):
    return redis_client.hgetall(KEYS.stream(stream_id))


def test_a_whole_conversation(simulator, dify, redis_client):
    dify.script([d.ping(), *d.answer("Streaming answers arrive piece by piece.", delay=0.03)])
    conversation = simulator.ask("How do answers arrive?", userid="alice")
    assert conversation.finished
    assert conversation.text == "Streaming answers arrive piece by piece."
    contents = conversation.contents()
    assert contents[0] == ZH["placeholder"]
    growing = [c for c in contents[1:-1] if c != ZH["placeholder"]]
    assert growing
    assert all(conversation.text.startswith(c) for c in growing)  # cumulative, never only the new part

    [request] = dify.chat_requests()
    assert request["query"] == "How do answers arrive?"
    assert request["user"] == "wecom:demo-bot:alice"
    meta = stream_meta(redis_client, conversation.stream_id)
    assert meta["status"] == "done"
    assert meta["owner"].startswith("replica-a:")
    assert meta["userid"] == "alice"
    assert meta["task_id"]
    assert meta["message_id"]
    assert meta["conversation_id"]
    assert meta["finished_at"]
    chunks = redis_client.lrange(KEYS.stream_chunks(conversation.stream_id), 0, -1)
    assert "".join(chunks) == conversation.text
    assert len(chunks) > 3
    assert all(redis_client.ttl(key) > 0 for key in redis_client.keys("*"))


def test_a_group_message_records_the_chat(simulator, dify, redis_client):
    dify.script(d.answer("hi group"))
    conversation = simulator.ask("hello", userid="bob", chatid="group-1")
    assert conversation.text == "hi group"
    meta = stream_meta(redis_client, conversation.stream_id)
    assert meta["chatid"] == "group-1"
    assert meta["chattype"] == "group"


def test_a_wecom_retry_on_another_instance_gets_the_same_stream(pair, dify):
    first, second = pair
    sim = make_simulator([first.url, second.url])
    dify.script([d.message("one "), d.sleep(2.0), d.message("two"), d.end()])
    payload = sim.text_message("retry me", msgid="msg-retry-1")

    reply_a = sim.send(payload, replica=0)
    poll = sim.poll_message(reply_a["stream"]["id"])
    # Once the first delta is shown, the retry comes while the answer still streams.
    assert wait_until(lambda: sim.send(poll, replica=0)["stream"]["content"] == "one ", timeout=5)
    reply_b = sim.send(payload, replica=1)  # WeCom did not get reply_a in time and retries elsewhere
    assert reply_b["stream"]["id"] == reply_a["stream"]["id"]
    assert reply_b["stream"]["content"] == "one "
    assert reply_b["stream"]["finish"] is False

    conversation = sim.follow(reply_a)
    assert conversation.text == "one two"
    late_retry = sim.send(payload, replica=1)
    stream_id = reply_a["stream"]["id"]
    assert late_retry["stream"] == {
        "id": stream_id,
        "finish": True,
        "content": "one two",
        "feedback": {"id": stream_id},
    }
    wait_idle(*pair)
    assert len(dify.chat_requests()) == 1
    sim.close()


def test_simultaneous_duplicates_on_two_instances_make_one_dify_call(pair, dify):
    sim = make_simulator([pair[0].url, pair[1].url])
    dify.script(d.answer("only once", delay=0.05), times=None)
    payload = sim.text_message("dup", msgid="msg-dup-burst")
    replies = []
    barrier = threading.Barrier(6)

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
    wait_idle(*pair)
    assert len(dify.chat_requests()) == 1
    sim.close()


def test_polls_alternating_between_two_instances(pair, dify, redis_client):
    sim = make_simulator([pair[0].url, pair[1].url])
    dify.script(d.answer("one two three four five six seven", delay=0.04))
    conversation = sim.ask("alternate")
    assert conversation.finished
    assert conversation.text == "one two three four five six seven"
    assert conversation.polls >= 4
    contents = [c for c in conversation.contents() if c != ZH["placeholder"]]
    assert all(b.startswith(a) for a, b in zip(contents, contents[1:], strict=False))
    assert int(redis_client.hget(KEYS.stream(conversation.stream_id), "polls")) == conversation.polls
    sim.close()


def test_unknown_stream_id_finishes_with_a_note(simulator):
    reply = simulator.send(simulator.poll_message("NoSuchStream123"))
    assert reply["stream"] == {"id": "NoSuchStream123", "finish": True, "content": ZH["unknown_stream"]}


def ask_with_url(sim, content, userid="alice", chatid=""):
    """Ask, follow the stream, and return (conversation, the message's response_url)."""
    payload = sim.text_message(content, userid, chatid)
    conversation = sim.follow(sim.send(payload), userid, chatid)
    return conversation, payload["response_url"]


def split_remainder(message):
    header = ZH["continued"] + "\n\n"
    content = message["markdown"]["content"]
    assert message["msgtype"] == "markdown"
    assert content.startswith(header)
    return content[len(header) :]


def test_a_long_answer_fills_one_bubble_and_the_rest_follows_once(simulator, dify):
    text = "汉字" * 4000  # 24000 bytes of 3-byte characters
    dify.script([d.message(text[:3000]), d.message(text[3000:]), d.end()])
    conversation, response_url = ask_with_url(simulator, "long one")
    content = conversation.text
    assert conversation.finished
    assert len(content.encode()) <= MAX_CONTENT_BYTES
    shown, note = content.split("\n\n")
    assert note == ZH["overflow_continues"]
    assert text.startswith(shown)
    assert len(content.encode()) > MAX_CONTENT_BYTES - 10  # filled, not cut short

    message = simulator.inbox.wait_for(response_url)
    assert shown + split_remainder(message) == text
    assert len(simulator.inbox.received(response_url)) == 1


def test_an_answer_whose_bubble_no_poll_ever_showed_goes_out_through_response_url(simulator, dify, monkeypatch):
    """Every try of the message's callback was answered too late (frozen replicas, a failover: the fault campaign),
    so WeCom has no bubble to poll: the answer goes out through response_url once, and a poll that comes after all
    says it was sent separately, never the answer a second time."""
    from services.callback import delivery

    monkeypatch.setattr(delivery, "UNPOLLED_SECONDS", 1.0)
    dify.script([d.message("The whole answer."), d.end()])
    payload = simulator.text_message("hello")
    stream_id = simulator.send(payload)["stream"]["id"]  # the reply WeCom never got: nothing polls it
    message = simulator.inbox.wait_for(payload["response_url"])
    assert message["markdown"]["content"] == f"{ZH['full_answer']}\n\nThe whole answer."
    late = simulator.send(simulator.poll_message(stream_id))
    assert late["stream"]["finish"] and late["stream"]["content"] == ZH["sent_separately"]
    assert len(simulator.inbox.received(payload["response_url"])) == 1


def test_an_answer_whose_only_poll_came_after_wecom_stopped_waiting_goes_out_through_response_url(
    simulator, dify, monkeypatch
):
    """A WeCom repeat of the message, read by a replica frozen past WeCom's wait, is answered with the stream as far
    as it has come, but WeCom waits for that reply no more: it does not count as a poll of the bubble, so the answer,
    which no bubble showed, still goes out through response_url, once. (Counted, it kept the answer from its user,
    whom the next try told the service was unavailable: the 10-minute Cluster run of seed 12.)"""
    from services.callback import delivery

    monkeypatch.setattr(delivery, "UNPOLLED_SECONDS", 2.0)
    dify.script([d.message("The whole "), d.sleep(1.0), d.message("answer."), d.end()])
    payload = simulator.text_message("hello")
    stream_id = simulator.send(payload)["stream"]["id"]  # the reply WeCom never got: nothing polls it
    late = simulator.send(payload, timestamp=int(time.time()) - 10)  # the repeat, read 10 s after it was sent
    assert late["stream"]["id"] == stream_id and not late["stream"]["finish"]
    message = simulator.inbox.wait_for(payload["response_url"])
    assert message["markdown"]["content"] == f"{ZH['full_answer']}\n\nThe whole answer."
    assert len(simulator.inbox.received(payload["response_url"])) == 1


def test_an_answer_done_before_its_first_poll_stays_in_its_bubble(simulator, dify, monkeypatch):
    """An answer that ends before WeCom's first poll waits for it: the bubble shows it, and nothing more is sent."""
    from services.callback import delivery

    monkeypatch.setattr(delivery, "UNPOLLED_SECONDS", 3.0)
    dify.script([d.message("Quick."), d.end()])
    payload = simulator.text_message("hello")
    first = simulator.send(payload)
    time.sleep(1.0)  # the answer is done by now, and no poll has come yet
    assert simulator.follow(first).text == "Quick."
    time.sleep(3.0)  # a bounded look: past UNPOLLED_SECONDS, nothing went through response_url
    assert simulator.inbox.received(payload["response_url"]) == []


@pytest.mark.parametrize("closed_early", [True, False], ids=["closed_early", "live_at_its_end"])
def test_the_rest_a_bubble_promised_comes_though_its_finisher_died_after_the_end(
    simulator, dify, monkeypatch, closed_early
):
    """An answer longer than its bubble ends in two writes: its end, then its rest written down (RestPosts), which
    any process makes should its poster die. An owner killed between the two (the 10-minute Sentinel run of seed 43:
    95 of 113 sentences, "the rest follows", and the rest never sent) left a done stream whose rest nobody owed. The
    watch on bubbles whose rest follows makes it, once, when none was written down REST_UNMADE_SECONDS after the
    end: a bubble a poll closed early is listed by that poll; one still live at the answer's end (its final reply
    says the rest follows: item 14's twin) by its finisher, before the end. Here the finisher sends no rest, as if
    its process had died right after the end."""
    from services.callback import delivery, rest_posts
    from services.streams.finisher import Finisher

    monkeypatch.setattr(rest_posts, "SWEEP_SECONDS", 0.3)
    monkeypatch.setattr(delivery, "REST_UNMADE_SECONDS", 1.5)
    monkeypatch.setattr(Finisher, "_send_rest", lambda *args: None)
    text = "汉字" * 4000  # 24000 bytes: more than a bubble holds
    # a poll closes the bubble before the answer ends; or the answer ends before the first poll
    dify.script([d.message(text), d.sleep(2.0), d.end()] if closed_early else [d.message(text), d.end()])
    payload = simulator.text_message("a long one, then a death")
    first = simulator.send(payload)
    if not closed_early:
        time.sleep(1.0)
    conversation = simulator.follow(first)
    assert conversation.text.endswith(ZH["overflow_continues"])
    message = simulator.inbox.wait_for(payload["response_url"], timeout=20)
    assert message is not None, "the rest the bubble promised never came"
    shown = conversation.text.removesuffix(f"\n\n{ZH['overflow_continues']}")
    assert shown + message["markdown"]["content"].removeprefix(f"{ZH['continued']}\n\n") == text
    time.sleep(1.5)  # a bounded look: no second post follows (WeCom would refuse it)
    assert len(simulator.inbox.received(payload["response_url"])) == 1


def test_the_watch_over_a_long_answer_does_not_pass_for_a_poll_of_its_bubble(simulator, dify, monkeypatch):
    """The watch looks at a long answer's stream as a poll would, but WeCom may never have had its bubble (every try
    of the callback answered too late): the watch's looks do not count as polls, so such an answer still goes out
    whole through response_url, once."""
    from services.callback import delivery, rest_posts

    monkeypatch.setattr(rest_posts, "SWEEP_SECONDS", 0.3)
    monkeypatch.setattr(delivery, "UNPOLLED_SECONDS", 6.0)  # the watch looks at it many times meanwhile
    dify.script([d.message("汉字" * 4000), d.end()])
    payload = simulator.text_message("a long one nobody polls")
    simulator.send(payload)  # the reply WeCom never got: nothing polls it
    message = simulator.inbox.wait_for(payload["response_url"], timeout=20)
    assert message is not None and message["markdown"]["content"].startswith(ZH["full_answer"])
    time.sleep(1.5)  # several passes of the watch
    assert len(simulator.inbox.received(payload["response_url"])) == 1


def test_a_rest_its_finisher_wrote_down_is_not_made_again_by_the_watch(simulator, dify, monkeypatch):
    """The watch on bubbles closed early leaves an ended answer whose rest its finisher wrote down (or sent) alone:
    one post, however long it looks."""
    from services.callback import delivery, rest_posts

    monkeypatch.setattr(rest_posts, "SWEEP_SECONDS", 0.3)
    monkeypatch.setattr(delivery, "REST_UNMADE_SECONDS", 0.0)
    text = "汉字" * 4000
    dify.script([d.message(text), d.sleep(2.0), d.end()])
    payload = simulator.text_message("a long one")
    conversation = simulator.follow(simulator.send(payload))
    assert conversation.text.endswith(ZH["overflow_continues"])
    assert simulator.inbox.wait_for(payload["response_url"], timeout=20) is not None
    time.sleep(2.0)  # several passes of the watch
    assert len(simulator.inbox.received(payload["response_url"])) == 1


def test_a_post_to_response_url_that_wecom_was_too_busy_for_is_tried_again_and_lands_once(simulator):
    """WeCom busy for a moment (HTTP 503) must not lose the rest of an answer: the post is tried again, and lands
    once; a refusal (an errcode: here the URL's second use) is final."""
    from services.wecom.response_url import ResponseUrlClient

    client = ResponseUrlClient(retry_delays=(0.3, 0.3, 0.3, 0.3))
    url = simulator.inbox.new_response_url()
    simulator.inbox.busy_until = time.time() + 0.5
    assert client.send_markdown(url, "the rest")
    assert simulator.inbox.busy_posts >= 1
    assert [m["markdown"]["content"] for m in simulator.inbox.received(url)] == ["the rest"]
    assert not client.send_markdown(url, "once more")  # refused, and not tried again
    assert len(simulator.inbox.received(url)) == 2
    client.close()


def test_a_post_whose_poster_died_is_made_once_however_many_processes_sweep_at_once(
    simulator, redis_client, monkeypatch
):
    """A response_url post is written down before its first try; when its poster dies, every serving process's sweep
    finds it once the claim lapses, and exactly one of them makes it (services/callback/rest_posts.py)."""
    from services.callback import rest_posts
    from services.replication import Replication
    from services.wecom.response_url import ResponseUrlClient

    class DiesPosting:
        def send_markdown(self, url, message, still_ours=None):
            raise RuntimeError("the poster died")

    monkeypatch.setattr(rest_posts, "REST_POST_CLAIM_TTL_SECONDS", 1)
    durable = Replication(redis_client)
    url = simulator.inbox.new_response_url()
    poster = rest_posts.RestPosts(redis_client, KEYS, durable, DiesPosting(), "dead", "default")
    with pytest.raises(RuntimeError):
        poster.send("owed-1", url, "the rest")
    time.sleep(1.2)  # the dead poster's claim lapses
    clients = [ResponseUrlClient() for _ in range(4)]
    sweepers = [rest_posts.RestPosts(redis_client, KEYS, durable, c, f"p{n}", "default") for n, c in enumerate(clients)]
    taken, start = [], threading.Barrier(len(sweepers))

    def sweep(sweeper):
        start.wait()
        taken.append(sweeper.sweep())

    threads = [threading.Thread(target=sweep, args=(s,)) for s in sweepers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert sorted(taken) == [0, 0, 0, 1]
    assert [m["markdown"]["content"] for m in simulator.inbox.received(url)] == ["the rest"]
    assert redis_client.get(KEYS.rest_post_claim("owed-1")) == "sent"
    assert sweepers[0].sweep() == 0  # nothing is owed any more
    for client in clients:
        client.close()


def test_a_post_whose_claim_ran_but_whose_reply_was_lost_is_still_made_once(simulator, redis_url, redis_client):
    """The claim of a response_url post runs on Redis and its reply is lost with the connection; the client sends it
    again on a new one (a dropped connection is retried). That retry must find the claim its own, and post: a
    bare SET NX answered it as a claim someone else held, and the rest of the answer was never posted (the fault
    campaign's redis_replies_lost found it)."""
    from bench.faults.proxy import FaultyLink
    from services.callback import rest_posts
    from services.redis_conn import connect_redis
    from services.replication import Replication
    from services.wecom.response_url import ResponseUrlClient

    port = redis_client.connection_pool.connection_kwargs["port"]
    link = FaultyLink(port).start()
    client = connect_redis(redis_url.replace(f":{port}", f":{link.port}"))
    responder = ResponseUrlClient()
    try:
        client.ping()  # connected: the next reply through the link is the claim's
        link.lose_replies(0.5, FirstReplyLost())
        url = simulator.inbox.new_response_url()
        poster = rest_posts.RestPosts(client, KEYS, Replication(client), responder, "p1", "default")
        assert poster.send("owed-2", url, "the rest")
        assert [m["markdown"]["content"] for m in simulator.inbox.received(url)] == ["the rest"]
        assert redis_client.get(KEYS.rest_post_claim("owed-2")) == "sent"
    finally:
        link.stop()
        client.close()
        responder.close()


def test_a_long_answer_without_response_url_is_cut_with_a_note(simulator, dify):
    text = "word " * 5000
    dify.script([d.message(text), d.end()])
    payload = simulator.text_message("long, no url")
    del payload["response_url"]
    conversation = simulator.follow(simulator.send(payload))
    shown, note = conversation.text.rsplit("\n\n", 1)
    assert note == ZH["overflow_truncated"]
    assert text.startswith(shown)
    assert len(conversation.text.encode()) <= MAX_CONTENT_BYTES


def test_message_replace_replaces_the_bubble(simulator, dify):
    dify.script(
        [d.message("something "), d.message("unsafe"), d.sleep(0.2), d.replace("[removed by moderation]"), d.end()]
    )
    assert simulator.ask("moderate me").text == "[removed by moderation]"


def test_agent_answer_only_in_thoughts_is_used(simulator, dify):
    dify.script([d.thought(""), d.thought("The answer is 42."), d.end()])
    assert simulator.ask("agent").text == "The answer is 42."


def test_empty_answer_says_so(simulator, dify, redis_client):
    dify.script([d.message(""), d.end()])
    conversation = simulator.ask("say nothing")
    assert conversation.finished
    assert conversation.text == ZH["empty_answer"]
    assert stream_meta(redis_client, conversation.stream_id)["status"] == "done"


def test_an_empty_question_is_answered_at_once_without_dify(simulator, dify):
    reply = simulator.send(simulator.text_message("   "))
    assert reply["stream"]["finish"] is True
    assert reply["stream"]["content"] == ZH["empty_query"]
    assert dify.chat_requests() == []


def test_voice_transcript_is_the_query(simulator, dify):
    dify.script(d.answer("heard you"))
    first = simulator.send(simulator.message("voice", {"content": "what time is it"}))
    assert simulator.follow(first).text == "heard you"
    assert dify.chat_requests()[0]["query"] == "what time is it"


# --- failures behind the bubble -------------------------------------------------------------------------------


def ends_with_note(conversation, partial, note_key):
    """The bubble ends with `partial` and the note `note_key` names (or that is the note itself)."""
    assert conversation.finished
    note = ZH.get(note_key, note_key)
    expected = f"{partial}\n\n{note}" if partial else note
    assert conversation.text == expected


@pytest.mark.parametrize(
    ("steps", "partial", "note"),
    [
        ([d.http_error(500, "internal_server_error")], "", "dify_unavailable"),
        ([d.http_error(401, "unauthorized", "Access token is invalid")], "", "dify_rejected"),
        ([d.http_error(400, "provider_quota_exceeded")], "", "dify_rejected"),
        ([d.http_error(400, "invalid_param", "bad")], "", "dify_failed"),
        (
            [d.message("Half an "), d.message("answer"), d.error("completion_request_error", "boom", 400)],
            "Half an answer",
            "dify_failed",
        ),
        ([d.message("Half "), d.error("rate_limit_error", "slow down", 429)], "Half", "dify_busy"),
        ([d.message("Cut "), d.message("here"), d.sleep(0.1), d.cut()], "Cut here", "stream_cut"),
        ([d.message("Closed early"), d.close()], "Closed early", "stream_cut"),
        ([d.message("Stalled"), d.stall(3)], "Stalled", "timeout"),
        (
            [d.message("Flow"), d.workflow_finished("failed", "node exploded"), d.close()],
            "Flow",
            ZH["workflow_failed"].format(reason="node exploded"),
        ),
        ([d.raw(b"data: {{{garbage\n\n"), d.raw(b"\x00\xff garbage without newline")], "", "stream_cut"),
    ],
)
def test_failures_finish_the_bubble_with_partial_text_and_a_note(
    make_app, serve, dify, redis_client, steps, partial, note
):
    live = serve(make_app(dify_read_timeout=1.0, dify_max_retries=0))
    sim = make_simulator(live.url)
    dify.script(steps)
    conversation = sim.ask("fail please")
    ends_with_note(conversation, partial, note)
    meta = stream_meta(redis_client, conversation.stream_id)
    assert meta["status"] == "error"
    assert meta["error"]
    sim.close()


def test_429_is_retried_before_giving_up(make_app, serve, dify):
    live = serve(make_app(dify_max_retries=2))
    sim = make_simulator(live.url)
    dify.script([d.http_error(429, "too_many_requests")], times=3)
    ends_with_note(sim.ask("busy"), "", "dify_busy")
    assert len(dify.chat_requests()) == 3
    sim.close()


def test_unreachable_dify(make_app, serve):
    live = serve(make_app(dify_base_url="http://127.0.0.1:9/v1", dify_connect_timeout=0.3, dify_max_retries=0))
    sim = make_simulator(live.url)
    ends_with_note(sim.ask("anyone there?"), "", "dify_unavailable")
    sim.close()


def test_answer_past_the_total_limit_is_stopped(make_app, serve, dify, redis_client):
    live = serve(make_app(dify_max_stream_seconds=1))
    sim = make_simulator(live.url)
    dify.script([d.message("a"), *[s for i in range(40) for s in (d.sleep(0.1), d.message(" more"))], d.end()])
    conversation = sim.ask("never ends")
    assert conversation.finished
    assert conversation.text.endswith(ZH["timeout"])
    assert stream_meta(redis_client, conversation.stream_id)["error"].startswith("total_timeout")
    assert wait_until(lambda: dify.stops, timeout=3)
    assert dify.stops[0][1]["user"] == "wecom:demo-bot:alice"
    sim.close()


def test_a_worker_that_dies_still_finishes_the_bubble(live, dify, redis_client):
    def explode(job):
        raise RuntimeError("bug in preparing the request")

    live.gateway.bot().streams.worker.deps.turn.prepare = explode
    sim = make_simulator(live.url)
    conversation = sim.ask("crash")
    ends_with_note(conversation, "", "internal_error")
    assert stream_meta(redis_client, conversation.stream_id)["error"] == "internal_error"
    assert dify.chat_requests() == []
    sim.close()


def test_an_answer_outliving_the_window_closes_the_bubble_and_follows_up(make_app, serve, dify, redis_client):
    live = serve(make_app(stream_window_seconds=1))
    sim = make_simulator(live.url)
    dify.script([d.message("slow start"), d.sleep(2), d.message(" and the rest"), d.end()])
    conversation, response_url = ask_with_url(sim, "take your time")
    assert conversation.finished
    assert conversation.text == f"slow start\n\n{ZH['window_continues']}"
    message = sim.inbox.wait_for(response_url)
    assert message is not None
    assert split_remainder(message) == "and the rest"
    # the worker records the delivery right after it, so the record may lag the message by a moment
    assert wait_until(lambda: "rest_sent" in stream_meta(redis_client, conversation.stream_id), timeout=5)
    meta = stream_meta(redis_client, conversation.stream_id)
    assert meta["close_reason"] == "window"
    assert meta["status"] == "done"
    assert meta["rest_sent"] == "yes"
    sim.close()


def test_a_failure_after_the_window_still_follows_up_with_the_note(make_app, serve, dify):
    live = serve(make_app(stream_window_seconds=1, dify_max_retries=0))
    sim = make_simulator(live.url)
    dify.script([d.message("begun"), d.sleep(1.6), d.message(" more"), d.cut()])
    conversation, response_url = ask_with_url(sim, "fragile")
    assert conversation.text == f"begun\n\n{ZH['window_continues']}"
    content = sim.inbox.wait_for(response_url)["markdown"]["content"]
    assert content.endswith(ZH["stream_cut"])
    assert "more" in content
    sim.close()


def test_without_response_url_the_window_just_closes(make_app, serve, dify):
    live = serve(make_app(stream_window_seconds=1))
    sim = make_simulator(live.url)
    dify.script([d.message("slow start"), d.sleep(2), d.message(" and the rest"), d.end()])
    payload = sim.text_message("no url")
    del payload["response_url"]
    conversation = sim.follow(sim.send(payload))
    assert conversation.text == f"slow start\n\n{ZH['window_closed']}"
    sim.close()


def test_an_orphaned_stream_is_finished_by_whoever_polls(live, simulator, redis_client):
    store = live.gateway.bot().streams.store
    store.create("orphan01", "msg-orphan", "dead-replica", "demo-bot", "alice", {"userid": "alice"})
    store.append("orphan01", "dead-replica", ["what was said ", "before the crash"], 0)
    simulator.send(simulator.poll_message("orphan01"))  # shows it (a poll that found new text looks at no lease)
    redis_client.delete(KEYS.stream_lease("orphan01"))  # the dead replica's lease ran out
    reply = simulator.send(simulator.poll_message("orphan01"))
    assert reply["stream"]["finish"] is True
    assert reply["stream"]["content"] == f"what was said before the crash\n\n{ZH['orphaned']}"
    assert stream_meta(redis_client, "orphan01")["status"] == "expired"


def test_a_message_while_redis_is_down_gets_a_finished_reply(make_app, serve, dify):
    live = serve(make_app(redis_url="redis://127.0.0.1:1/0", redis_socket_timeout=0.2))
    sim = make_simulator(live.url)
    reply = sim.send(sim.text_message("hello?"))
    assert reply["stream"]["finish"] is True
    assert reply["stream"]["content"] == ZH["store_unavailable"]
    with pytest.raises(ReplyError, match="HTTP 503"):
        sim.send(sim.poll_message("SomeStream"))
    assert dify.chat_requests() == []
    sim.close()


def test_no_stream_threads_are_left_behind(live, simulator, dify):
    dify.script(d.answer("done", delay=0.01), times=None)
    for i in range(5):
        simulator.ask(f"q{i}")
    assert live.gateway.runner.drain(5) == []
    assert not [t for t in threading.enumerate() if t.name.startswith("stream-")]


def test_english_catalogue(make_app, serve, dify):
    live = serve(make_app(bot_language="en"))
    sim = make_simulator(live.url)
    dify.script([d.http_error(503, "unavailable")], times=None)
    assert sim.ask("hi").text == CATALOGUE["en"]["dify_unavailable"]
    sim.close()


# --- a question Dify never took is asked again (DIFY_RETRY_SECONDS) -----------------------------------------------


def test_a_question_dify_refused_is_asked_again_until_it_is_answered(make_app, serve, dify):
    live = serve(make_app(dify_retry_seconds=30, dify_max_retries=0))
    sim = make_simulator(live.url)
    dify.script([d.http_error(503, "unavailable")], times=2)
    dify.script([d.http_error(429, "too_many_requests")])
    dify.script(d.answer("here at last"))
    asked_again = metrics.DIFY_CALLS.labels("default", "dify", "asked_again", "")._value.get()

    assert sim.ask("are you there?").text == "here at last"  # after 1 + 2 + 4 s of pauses, the bubble waiting
    assert [r["query"] for r in dify.chat_requests()] == ["are you there?"] * 4
    assert metrics.DIFY_CALLS.labels("default", "dify", "asked_again", "")._value.get() == asked_again + 3
    sim.close()


def test_dify_unreachable_for_seconds_costs_a_wait_and_not_the_answer(make_app, serve, dify):
    link = FaultyLink(urlsplit(dify.base_url).port)  # its port is free: nothing listens there until it starts
    live = serve(make_app(dify_base_url=f"http://127.0.0.1:{link.port}/v1", dify_retry_seconds=30))
    sim = make_simulator(live.url)
    dify.script(d.answer("back again"))
    sent = sim.send(sim.text_message("Dify is restarting"))
    threading.Timer(2.5, link.start).start()  # Dify comes back
    try:
        assert sim.follow(sent).text == "back again"
        assert len(dify.chat_requests()) == 1
    finally:
        link.stop()
        sim.close()


def test_a_question_that_may_have_reached_dify_is_never_asked_again(make_app, serve, dify):
    live = serve(make_app(dify_retry_seconds=30, dify_max_retries=2))
    sim = make_simulator(live.url)
    dify.script([d.http_error(502, "bad_gateway")], times=None)  # a proxy's 502: Dify may have begun to answer
    ends_with_note(sim.ask("once only"), "", "dify_unavailable")
    assert len(dify.chat_requests()) == 1
    sim.close()


def test_stop_ends_the_wait_for_a_dify_that_refuses(make_app, serve, dify):
    live = serve(make_app(dify_retry_seconds=60, dify_max_retries=0))
    sim = make_simulator(live.url)
    dify.script([d.http_error(503, "unavailable")], times=None)
    sent = sim.send(sim.text_message("wait for me"))
    assert wait_until(lambda: len(dify.chat_requests()) >= 2)  # asked again once already
    assert sim.ask("/stop").text == ZH["stop_done"]
    assert sim.follow(sent).text == ZH["stopped_note"]
    asked = len(dify.chat_requests())
    assert live.gateway.runner.drain(10) == []  # the worker ended its wait at once
    assert len(dify.chat_requests()) == asked
    sim.close()
