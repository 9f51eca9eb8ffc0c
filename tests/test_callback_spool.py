"""A callback's new message Redis cannot take is kept in the database under the id of the live bubble it is answered
with, and taken by the first poll of that bubble Redis answers (services/callback/spool.py). Real Redis (a private
server the test pauses), real MariaDB, Dify played by the stand-in."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import orjson
import pytest
from sqlalchemy import select
from sqlalchemy.engine import make_url

from bench.faults.proxy import FaultyLink
from demo import dify_standin as d
from demo.wecom_simulator import ReplyError
from services.auth.db import make_engine
from services.callback.spool import CallbackSpool, wecom_callback_spool
from services.texts import CATALOGUE
from tests.conftest import make_simulator

ZH = CATALOGUE["zh"]


def kept_rows(engine) -> list[tuple]:
    c = wecom_callback_spool.c
    with engine.connect() as connection:
        return [tuple(row) for row in connection.execute(select(c.msgid, c.stream_id, c.answered_as))]


@pytest.fixture
def database(mysql_url):
    engine = make_engine(mysql_url)
    wecom_callback_spool.drop(engine, checkfirst=True)  # each test starts with no row of another's
    wecom_callback_spool.create(engine)
    yield engine
    engine.dispose()


def test_a_message_redis_cannot_take_is_answered_by_its_bubbles_first_poll_once_redis_is_back(
    make_app, serve, private_redis, database, mysql_url, dify
):
    """Before, a Redis outage longer than the 2 s a callback's message is taken again for ended it with "please send
    it again". Now its bubble stays open, WeCom's repeat of it gets the same bubble, and the answer comes once Redis
    is back: one Dify call, the row gone."""
    live = serve(make_app(redis_url=private_redis.url, redis_socket_timeout=0.5, database_url=mysql_url))
    sim = make_simulator(live.url, poll_interval=0.2)
    dify.script([d.message("Answered after the outage."), d.end()])
    payload = sim.text_message("asked while Redis is away")
    private_redis.pause()
    try:
        first = sim.send(payload)
        assert first["stream"]["finish"] is False and first["stream"]["content"] == ZH["placeholder"]
        stream_id = first["stream"]["id"]
        assert kept_rows(database) == [(payload["msgid"], stream_id, "")]
        assert sim.send(payload)["stream"]["id"] == stream_id  # WeCom's repeat: the same bubble
        with pytest.raises(ReplyError, match="HTTP 503"):
            sim.send(sim.poll_message(stream_id))  # WeCom polls again
    finally:
        private_redis.resume()
    conversation = sim.follow(first)
    assert conversation.finished and conversation.text == "Answered after the outage."
    assert len(dify.chat_requests()) == 1
    assert kept_rows(database) == []
    assert sim.send(payload)["stream"]["id"] == stream_id  # a repeat now finds the stream in Redis
    assert len(dify.chat_requests()) == 1
    sim.close()


def test_a_kept_message_whose_msgid_was_answered_meanwhile_shows_that_answer(
    make_app, serve, database, mysql_url, dify
):
    """A try that ran in Redis though its reply was lost, or a repeat another replica took: the msgid has its stream.
    The kept bubble shows that stream, poll after poll; no second Dify call."""
    live = serve(make_app(database_url=mysql_url))
    sim = make_simulator(live.url, poll_interval=0.2)
    dify.script([d.message("The one answer."), d.end()])
    payload = sim.text_message("kept by one replica, taken by another")
    CallbackSpool(database, "default", "cut-off:1").keep(payload["msgid"], orjson.dumps(payload).decode(), "kept01")
    taken = sim.send(payload)
    assert sim.follow(taken).text == "The one answer."
    conversation = sim.follow(sim.send(sim.poll_message("kept01")))
    assert conversation.finished and conversation.stream_id == "kept01"
    assert conversation.text == "The one answer."
    assert kept_rows(database) == [(payload["msgid"], "kept01", taken["stream"]["id"])]
    assert len(dify.chat_requests()) == 1
    sim.close()


def test_of_many_polls_of_a_kept_bubble_on_two_replicas_one_takes_the_message(make_pair, database, mysql_url, dify):
    """Every poll of the bubble, on any replica, may be the first Redis answers: one claims the row, the others show
    the bubble as it is; one stream, one Dify call, every poll after it the same answer."""
    pair = make_pair(database_url=mysql_url)
    sims = [make_simulator(server.url, poll_interval=0.2) for server in pair]
    dify.script([d.message("Taken once."), d.end()])
    payload = sims[0].text_message("polled by everyone at once")
    CallbackSpool(database, "default", "gone:1").keep(payload["msgid"], orjson.dumps(payload).decode(), "kept02")
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda n: sims[n % 2].send(sims[n % 2].poll_message("kept02")), range(8)))
    assert {reply["stream"]["id"] for reply in replies} == {"kept02"}
    for n, sim in enumerate(sims):
        assert sim.follow(replies[n]).text == "Taken once."
    assert len(dify.chat_requests()) == 1
    assert kept_rows(database) == []
    for sim in sims:
        sim.close()


def test_a_kept_command_is_answered_under_its_bubble(make_app, serve, database, mysql_url, dify):
    """A kept message that opens no answer (here /help) gets its finished reply under the bubble's id."""
    live = serve(make_app(database_url=mysql_url))
    sim = make_simulator(live.url)
    payload = sim.text_message("/help")
    CallbackSpool(database, "default", "gone:1").keep(payload["msgid"], orjson.dumps(payload).decode(), "kept03")
    reply = sim.send(sim.poll_message("kept03"))
    assert reply["stream"]["id"] == "kept03" and reply["stream"]["finish"] is True
    assert reply["stream"]["content"]
    assert kept_rows(database) == [] and dify.chat_requests() == []
    sim.close()


def test_a_kept_bubble_polled_while_the_database_is_away_is_polled_again(make_app, serve, database, mysql_url, dify):
    """A poll of a stream Redis does not know looks for a kept message in the database: with the database away it is
    answered 503 (WeCom polls again), not "unknown", and the next poll takes the message."""
    url = make_url(mysql_url)
    link = FaultyLink(url.port or 3306, url.host).start()
    try:
        live = serve(make_app(database_url=url.set(port=link.port).render_as_string(hide_password=False)))
        sim = make_simulator(live.url, poll_interval=0.2)
        dify.script([d.message("Answered once the database was back."), d.end()])
        payload = sim.text_message("kept, then the database went away")
        CallbackSpool(database, "default", "gone:1").keep(payload["msgid"], orjson.dumps(payload).decode(), "kept04")
        link.partition()
        with pytest.raises(ReplyError, match="HTTP 503"):
            sim.send(sim.poll_message("kept04"))
        link.heal()
        conversation = sim.follow(sim.send(sim.poll_message("kept04")))
        assert conversation.text == "Answered once the database was back."
        assert len(dify.chat_requests()) == 1
        sim.close()
    finally:
        link.stop()
