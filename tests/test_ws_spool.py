"""A long connection's message read while Redis is away is kept in the database (services/longconn/spool.py): its
reader drops it once answered, and a row its reader left behind (it died) is answered once, by any process, as a
message of its own. Real Redis (a private server the test pauses), real MariaDB, WeCom's server played by the
stand-in."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import orjson
import pytest
import redis
from sqlalchemy import select, update

from demo import dify_standin as d
from demo.wecom_ws_standin import _message
from services.auth.db import make_engine
from services.chat.intake import MessageIntake
from services.chat.spool_rows import utc_now
from services.keys import Keys
from services.longconn import spool as spool_module
from services.longconn.spool import Spool, wecom_ws_spool
from services.texts import CATALOGUE
from services.wecom.messages import parse_inbound
from tests.conftest import WS_BOT_ID, outbox_settled, wait_until

ZH = CATALOGUE["zh"]


def backdate(engine) -> None:
    """Every kept row written a minute ago: longer than its reader's patience (its reader is gone)."""
    with engine.begin() as connection:
        connection.execute(update(wecom_ws_spool).values(received_at=utc_now() - timedelta(minutes=1)))


def kept_rows(engine) -> list[tuple]:
    with engine.connect() as connection:
        return [tuple(row) for row in connection.execute(select(wecom_ws_spool.c.msgid, wecom_ws_spool.c.taken_by))]


@pytest.fixture
def database(mysql_url):
    engine = make_engine(mysql_url)
    wecom_ws_spool.drop(engine, checkfirst=True)  # each test starts with no row of another's
    wecom_ws_spool.create(engine)
    yield engine
    engine.dispose()


def test_a_message_read_while_redis_is_away_is_kept_until_its_reader_answers_it(
    ws_gateway, private_redis, database, mysql_url, dify
):
    """Before, it lived in its reader's memory alone while the reader took it again (30 s): a reader that died then
    lost it, WeCom delivering it once. Now it is in the database first, and gone from there once answered."""
    _, wecom = ws_gateway(redis_url=private_redis.url, redis_socket_timeout=0.5, database_url=mysql_url)
    dify.script([d.message("Answered after the outage."), d.end()])
    private_redis.pause()
    try:
        req_id = wecom.deliver_text(WS_BOT_ID, "asked while Redis is away", msgid="kept-1")
        assert wait_until(lambda: kept_rows(database) == [("kept-1", "")], timeout=10)
    finally:
        private_redis.resume()
    final = wecom.final(req_id, timeout=30)
    assert final is not None and "Answered after the outage." in final["stream"]["content"]
    assert wait_until(lambda: kept_rows(database) == [], timeout=10)
    assert wecom.proactive == []  # answered on its frame, once


def test_a_kept_message_whose_reader_is_gone_is_answered_once_as_a_message_of_its_own(
    ws_gateway, database, mysql_url, dify, redis_client, monkeypatch
):
    """A row left by a process that died while Redis was away: once it is stale, a serving process takes it (one
    claim), answers it, and the answer goes out whole by aibot_send_msg, the frame it came on being gone. A row
    whose msgid some process took already (it answered, then died before dropping the row) is dropped unanswered."""
    monkeypatch.setattr(spool_module, "SWEEP_SECONDS", 0.3)
    dify.script([d.message("The answer a gone process owed."), d.end()])
    gone = Spool(database, "default", "gone-replica:1")
    assert gone.keep(
        "orphan-1", orjson.dumps(_message(WS_BOT_ID, "alice", "text", {"content": "hi"}, "orphan-1")).decode()
    )
    backdate(database)  # written before its reader died, longer ago than its patience
    gateway, wecom = ws_gateway(database_url=mysql_url)
    assert wait_until(lambda: wecom.proactive, timeout=20)
    assert outbox_settled(redis_client, WS_BOT_ID)
    [sent] = wecom.proactive
    assert sent["chatid"] == "alice" and sent["markdown"]["content"].endswith("The answer a gone process owed.")
    assert wait_until(lambda: kept_rows(database) == [], timeout=5)
    assert gateway.bot("default").streams.store.reads.stream_for_msgid("orphan-1")

    assert gone.keep(
        "orphan-1", orjson.dumps(_message(WS_BOT_ID, "alice", "text", {"content": "hi"}, "orphan-1")).decode()
    )
    backdate(database)
    assert wait_until(lambda: kept_rows(database) == [], timeout=10)
    time.sleep(1.0)
    assert len(wecom.proactive) == 1  # its msgid was taken: no second answer


def test_a_kept_message_whose_stream_a_gone_try_opened_and_never_queued_is_answered_once(
    ws_gateway, database, mysql_url, dify, redis_client, monkeypatch
):
    """A 4-minute one-server run of seed 55: the holder's first try at a message claimed its msgid and met Redis
    losing its replies before it queued the stream; its tries again found the message taken, and the holder was
    killed before it followed that stream. The kept row's drain found the msgid taken and left it to that answer,
    which nobody ran: no answer, no note. Now the drain has the outbox follow such a stream, once."""
    monkeypatch.setattr(spool_module, "SWEEP_SECONDS", 0.3)
    dify.script([d.message("The answer nobody ran."), d.end()])
    body = orjson.dumps(_message(WS_BOT_ID, "alice", "text", {"content": "hi"}, "unqueued-1")).decode()
    gateway, wecom = ws_gateway(database_url=mysql_url, stream_takeover_grace_seconds=0.5)
    bot = gateway.bot("default")

    def redis_failed(*args, **kwargs):
        raise redis.ConnectionError("Connection closed by server.")

    with monkeypatch.context() as failing:  # the try that claimed the msgid, then failed to queue the stream
        failing.setattr(bot.delivery, "dispatch", redis_failed)
        with pytest.raises(redis.ConnectionError):
            bot.streams.open(parse_inbound(body), "hi")
    stream_id = bot.streams.store.reads.stream_for_msgid("unqueued-1")
    redis_client.delete(Keys().stream_lease(stream_id))  # its process is gone
    assert Spool(database, "default", "gone-replica:1").keep("unqueued-1", body)
    backdate(database)
    assert wait_until(lambda: wecom.proactive, timeout=20), "nobody answered the message"
    assert outbox_settled(redis_client, WS_BOT_ID)
    [sent] = wecom.proactive
    assert sent["chatid"] == "alice" and sent["markdown"]["content"].endswith("The answer nobody ran.")
    time.sleep(1.0)  # a bounded look: no second answer
    assert len(wecom.proactive) == 1 and len(dify.chat_requests()) == 1


def test_of_every_process_sweeping_at_once_one_takes_a_kept_row(database):
    """Every serving process sweeps the spool: a stale row is claimed by one of them (a conditional UPDATE), and
    given back to all when Redis is still away."""
    owners = [Spool(database, "default", f"replica-{n}:1") for n in range(8)]
    assert owners[0].keep("raced", "{}")
    backdate(database)
    [(msgid, _, received_at)] = owners[0].stale()
    with ThreadPoolExecutor(len(owners)) as pool:
        won = list(pool.map(lambda spool: spool.claim(msgid, received_at), owners))
    assert won.count(True) == 1
    winner = owners[won.index(True)]
    assert owners[0].stale() == []  # held by a living drain
    winner.release(msgid)
    assert [row[0] for row in owners[0].stale()] == ["raced"]


def test_a_kept_command_whose_reader_is_gone_gets_its_reply_as_a_message_once(
    ws_gateway, database, mysql_url, redis_client, monkeypatch
):
    """A kept message that opens no answer (a command, a refusal) gets its finished reply as a message of its own,
    once however often its row is taken (the second row: as a drain that died after posting, before dropping it,
    would leave)."""
    monkeypatch.setattr(spool_module, "SWEEP_SECONDS", 0.3)
    body = orjson.dumps(_message(WS_BOT_ID, "alice", "text", {"content": "/stop"}, "stop-1")).decode()
    gone = Spool(database, "default", "gone-replica:1")
    _, wecom = ws_gateway(database_url=mysql_url)
    for _ in range(2):
        assert gone.keep("stop-1", body)
        backdate(database)
        assert wait_until(lambda: kept_rows(database) == [], timeout=10)
    assert outbox_settled(redis_client, WS_BOT_ID)
    [sent] = wecom.proactive
    assert sent["markdown"]["content"] == ZH["nothing_to_stop"]


def test_a_message_whose_intake_is_slow_is_kept_and_answered_though_its_reader_dies_in_it(
    ws_gateway, database, mysql_url, dify, redis_client, monkeypatch
):
    """Redis slow, not away: an intake that has run for a quarter of a second keeps its message, dropped once the
    intake ends. Before, a holder SIGKILLed 1.5 s into an intake under a Redis 189 ms slower took the message with
    it (the fault campaign's one-server run of 2026-11-28). Here the first message's intake is slow and ends; the
    second's reader "dies" in it (its intake never opens a stream), and a serving process answers it once."""
    monkeypatch.setattr(spool_module, "SWEEP_SECONDS", 0.3)
    taken, seen = MessageIntake.take, []

    def slow_take(intake, message):
        time.sleep(1.0)
        seen.append(kept_rows(database))
        if message.msgid == "dies-1":
            raise SystemExit("the reader dies before the stream opens")
        return taken(intake, message)

    monkeypatch.setattr(MessageIntake, "take", slow_take)
    dify.script([d.message("Answered, slowly."), d.end()])
    dify.script([d.message("Answered by another process."), d.end()])
    _, wecom = ws_gateway(database_url=mysql_url)
    req_id = wecom.deliver_text(WS_BOT_ID, "asked while Redis is slow", msgid="slow-1")
    final = wecom.final(req_id, timeout=20)
    assert final is not None and "Answered, slowly." in final["stream"]["content"]
    assert seen == [[("slow-1", "")]] and kept_rows(database) == []  # kept while taken, dropped once answered

    wecom.deliver_text(WS_BOT_ID, "asked of a reader that dies", msgid="dies-1")
    assert wait_until(lambda: kept_rows(database) == [("dies-1", "")], timeout=10)
    monkeypatch.setattr(MessageIntake, "take", taken)
    backdate(database)
    assert wait_until(lambda: wecom.proactive, timeout=20)
    assert outbox_settled(redis_client, WS_BOT_ID)
    [sent] = wecom.proactive
    assert sent["markdown"]["content"].endswith("Answered by another process.")
    assert wait_until(lambda: kept_rows(database) == [], timeout=5)


def test_a_message_taken_at_once_is_never_written_to_the_spool(ws_gateway, database, mysql_url, dify, monkeypatch):
    writes = []
    monkeypatch.setattr(Spool, "keep", lambda spool, msgid, body: writes.append(msgid) or True)
    dify.script([d.message("At once."), d.end()])
    _, wecom = ws_gateway(database_url=mysql_url)
    final = wecom.final(wecom.deliver_text(WS_BOT_ID, "hello", msgid="fast-1"), timeout=20)
    assert final is not None and "At once." in final["stream"]["content"] and writes == []
