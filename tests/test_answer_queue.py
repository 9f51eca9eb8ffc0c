"""The long-connection answer queue (services/longconn/jobs.py): its consumer group is created whatever the store
(Redis says NOGROUP, the demo's embedded store words it otherwise), a consumer leaves the group when it stops, and
consumers that died without leaving are removed."""

from __future__ import annotations

import logging
import time

import pytest
import redis
from prometheus_client import REGISTRY

from demo import dify_standin as d
from services.gateway import build_gateway
from services.longconn import jobs
from services.longconn.jobs import GROUP
from tests.conftest import outbox_settled, wait_until

BOT_ID, SECRET = "queue-bot", "queue-secret"


@pytest.fixture
def wecom(wecom_ws):
    return wecom_ws({BOT_ID: SECRET})


def served(settings, wecom, tmp_path, **changes):
    bot = settings.replace(
        wecom_mode="long_connection", wecom_bot_id=BOT_ID, wecom_bot_secret=SECRET, wecom_ws_url=wecom.url, **changes
    )
    gateway = build_gateway(bot, (bot.bot,), tmp_path)  # the embedded store's port file in tmp_path, not the checkout's
    gateway.start()
    return gateway


def dify_calls(kind: str) -> float:
    """dify_calls_total of `kind`, over every bot."""
    return sum(
        sample.value
        for metric in REGISTRY.collect()
        if metric.name == "dify_calls"
        for sample in metric.samples
        if sample.name == "dify_calls_total" and sample.labels.get("kind") == kind
    )


@pytest.mark.parametrize("store", ["redis", "embedded"])
def test_answers_are_queued_and_taken_without_a_warning_on_either_store(store, settings, wecom, dify, tmp_path, caplog):
    changes = {"demo_mode": True, "redis_url": "memory://"} if store == "embedded" else {}
    gateway = served(settings, wecom, tmp_path, **changes)
    before = {kind: dify_calls(kind) for kind in ("new", "duplicate")}
    try:
        assert wait_until(lambda: wecom.subscribed(BOT_ID) == 1, timeout=10)
        with caplog.at_level(logging.WARNING, logger="services.longconn"):
            for i in range(3):
                dify.script(d.answer(f"answer {i}"), match=f"question {i}")
                final = wecom.final(wecom.deliver_text(BOT_ID, f"question {i}"), timeout=20)
                assert final is not None and final["stream"]["content"] == f"answer {i}"
        flood = ("could not create the answer queue's group", "XGROUP", "NOGROUP")  # the demo's log flood
        assert not [r for r in caplog.records if any(words in r.getMessage() for words in flood)]
        # Each queued answer's Dify call was counted once, by its take, as a message's first
        assert {kind: dify_calls(kind) - before[kind] for kind in before} == {"new": 3, "duplicate": 0}
    finally:
        gateway.drain(5)
        gateway.close()


def test_a_stopping_consumer_leaves_the_group(settings, wecom, tmp_path, redis_client):
    gateway = served(settings, wecom, tmp_path)
    consumer = gateway.bot().connection.consumer
    try:
        assert wait_until(lambda: gateway.owner in names(redis_client, consumer.queue.key))
        consumer.stop()
        assert wait_until(lambda: gateway.owner not in names(redis_client, consumer.queue.key), timeout=5)
    finally:
        gateway.drain(5)
        gateway.close()


def test_consumers_of_dead_processes_are_removed_unless_they_hold_an_answer(
    settings, wecom, tmp_path, redis_client, monkeypatch
):
    monkeypatch.setattr(jobs, "DEAD_CONSUMER_IDLE_MS", -1)  # idle "long enough" at once
    gateway = served(settings, wecom, tmp_path)
    consumer = gateway.bot().connection.consumer
    key = consumer.queue.key
    try:
        assert wait_until(lambda: gateway.owner in names(redis_client, key))
        consumer.stop()  # (so it reads nothing itself)
        assert wait_until(lambda: gateway.owner not in names(redis_client, key), timeout=5)
        redis_client.xadd(key, {"stream": "held-by-the-dead"})
        redis_client.xgroup_createconsumer(key, GROUP, "gone:1")
        redis_client.xreadgroup(GROUP, "gone-holding:1", {key: ">"}, count=1)  # read, never acknowledged
        consumer._remove_dead_consumers()
        assert names(redis_client, key) == {"gone-holding:1"}
    finally:
        gateway.drain(5)
        gateway.close()


def names(client, key: str) -> set[str]:
    """The consumers in the queue's group (none before the group exists)."""
    try:
        return {each["name"] for each in client.xinfo_consumers(key, GROUP)}
    except redis.ResponseError:
        return set()


def test_a_bubble_that_showed_every_word_but_lost_its_end_is_told_nothing_more_follows(
    settings, wecom, tmp_path, redis_client
):
    """Its req_id died with the holder's connection after the last words, before the final frame: the new holder
    cannot finish the bubble, so the user is told, once, that the answer was complete."""
    from services.streams.poll_path import FrameRecord
    from services.streams.record import DONE
    from services.streams.store import first_attempt
    from services.texts import CATALOGUE

    gateway = served(settings, wecom, tmp_path)
    try:
        assert wait_until(lambda: wecom.subscribed(BOT_ID) == 1, timeout=10)
        bot = gateway.bots["default"]
        store, attempt = bot.streams.store, first_attempt("gone-holder:1")
        store.create("every-word", "m-every-word", attempt, BOT_ID, "carol", {"userid": "carol"})
        store.append("every-word", attempt, ["the whole answer"], 0)
        bot.streams.frame("every-word", FrameRecord("old-holder", 0))  # its last frame, as the old holder recorded it
        acked = {"ws_confirmed": "old-holder", "ws_acked_by": "old-holder"}  # then sent, and WeCom acked it
        redis_client.hset(store.keys.stream("every-word"), mapping=acked)
        assert store.finish("every-word", attempt, DONE) is not None
        outbox = bot.connection.holder.orphans.outbox
        outbox.track("every-word", "dead-req-id", 1, "carol", True)  # an earlier connection's generation
        time.sleep(1)
        assert not wecom.proactive  # not in the connection's first seconds: the old holder's acks come first
        assert wait_until(lambda: wecom.proactive, timeout=15)
        assert outbox_settled(redis_client, BOT_ID)  # and never a second time
        (sent,) = wecom.proactive
        assert sent["chatid"] == "carol"
        assert sent["markdown"]["content"] == CATALOGUE["zh"]["nothing_more"]
    finally:
        gateway.drain(5)
        gateway.close()


def test_an_idle_consumer_on_the_embedded_store_waits_its_block(settings, wecom, tmp_path, monkeypatch):
    """The demo's embedded store answers a blocking XREADGROUP at once: the idle demo's consumer spun a whole core
    on it. It now waits out the rest of the block, as Redis would have."""
    gateway = served(settings, wecom, tmp_path, demo_mode=True, redis_url="memory://")
    try:
        consumer = gateway.bot().connection.consumer
        client = consumer.queue.client
        reads = []
        original = client.xreadgroup
        monkeypatch.setattr(client, "xreadgroup", lambda *a, **k: reads.append(1) or original(*a, **k))
        time.sleep(2.0)
        assert len(reads) <= 2 / (consumer.block_ms / 1000) + 2  # about one read a block, not thousands
    finally:
        gateway.drain(5)
        gateway.close()


def test_a_holder_that_drains_still_takes_a_message_and_another_process_answers_it(make_pair, wecom, dify):
    """WeCom delivers a long connection's message once, to the process that holds it: one read while that process
    drains (a rolling restart reaches it before the connection moves) is taken and queued, not refused with
    "restarting, ask again" on a bubble the next holder may never finish; a serving process answers it at once
    (the holder's own read of the queue, waiting as its drain began, puts the answer back for it)."""
    replicas = make_pair(
        wecom_mode="long_connection", wecom_bot_id=BOT_ID, wecom_bot_secret=SECRET, wecom_ws_url=wecom.url
    )
    assert wait_until(lambda: any(r.gateway.bot().connection.holder.state == "holding" for r in replicas), timeout=10)
    holder = next(r for r in replicas if r.gateway.bot().connection.holder.state == "holding")
    holder.gateway.runner.accepting = False  # its drain began, and it still reads the socket
    dify.script(d.answer("answered elsewhere"), match="question while draining")
    final = wecom.final(wecom.deliver_text(BOT_ID, "question while draining"), timeout=20)
    assert final is not None and final["stream"]["content"] == "answered elsewhere"
