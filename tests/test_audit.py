"""The audit trail: one row per message in the real MariaDB (`wecom_audit`), whichever replica ends it and however
often WeCom repeats it; rows that wait in Redis while the database is cut and go in once after; metadata mode; the
export (CLI and GET /api/audit) and the retention purge."""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import secrets
import threading
import time
from datetime import datetime, timedelta
from urllib.parse import urlsplit

import httpx
import orjson
import pytest
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from app import create_app
from bench.faults.proxy import FaultyLink
from demo import dify_standin as d
from demo import openai_standin as o
from services.audit.records import AuditFilter, AuditRecords
from services.audit.rows import AuditRow
from services.audit.table import ensure_table, wecom_audit
from services.audit.trail import AuditTrail
from services.auth import db
from services.streams.life import ANSWERED, FEEDBACK, FORM_ACTION, MESSAGE, PUSH, STOP
from services.texts import CATALOGUE
from tests.conftest import KEYS, WS_BOT_ID, WS_BOT_SECRET, make_simulator, openai_settings, wait_until
from tests.test_forms import approval, ask_and_click
from tests.test_replicas import kill

ZH = CATALOGUE["zh"]
API_TOKEN = "audit-api-token-0123456789"


@pytest.fixture(scope="module")
def audit_url(mysql_databases) -> str:
    return mysql_databases("audit")


@pytest.fixture
def engine(audit_url):
    """The audit database's engine, its table there as this release makes it, and empty (made again: a test may leave
    the module's database a table of an earlier release)."""
    made = db.make_engine(audit_url, timeout=3)
    wecom_audit.drop(made, checkfirst=True)
    ensure_table(made)
    yield made
    made.dispose()


def rows(engine, **where) -> list[dict]:
    query = select(wecom_audit).order_by(wecom_audit.c.id)
    for name, value in where.items():
        query = query.where(wecom_audit.c[name] == value)
    with engine.connect() as connection:
        return [dict(row._mapping) for row in connection.execute(query)]


def count(engine) -> int:
    with engine.connect() as connection:
        return connection.execute(select(func.count()).select_from(wecom_audit)).scalar_one()


@pytest.fixture
def audited(make_pair, engine, audit_url):
    """Two replicas recording to the audit database."""
    return make_pair(database_url=audit_url, audit_api_token=API_TOKEN)


# --- one row per message -------------------------------------------------------------------------------------


def test_a_message_retried_on_the_other_replica_is_one_row_of_what_the_user_was_shown(audited, engine, dify):
    first, second = audited
    dify.script(d.answer("第一句。第二句。", pieces=4, delay=0.05))
    sims = [make_simulator(first.url), make_simulator(second.url)]
    payload = sims[0].text_message("两句话")
    reply = sims[0].send(payload)
    assert sims[1].send(payload)["stream"]["id"] == reply["stream"]["id"]  # WeCom's retry, on the other replica
    assert sims[1].follow(reply).text == "第一句。第二句。"
    assert wait_until(lambda: count(engine) == 1)
    time.sleep(1.5)  # another sweep on each replica: still one row
    [row] = rows(engine)
    assert (row["bot"], row["msgid"], row["kind"], row["outcome"]) == ("default", payload["msgid"], MESSAGE, ANSWERED)
    assert (row["userid"], row["chattype"], row["msgtype"]) == ("alice", "single", "text")
    assert row["question"] == "两句话" and row["answer"] == "第一句。第二句。"
    assert row["answer_len"] == len("第一句。第二句。")
    assert row["answer_sha256"] == hashlib.sha256("第一句。第二句。".encode()).hexdigest()
    assert row["dify_message_id"] and row["dify_conversation_id"]
    assert row["replica"] == "replica-a" and row["received_at"] <= row["finished_at"]
    for sim in sims:
        sim.close()


def test_a_stop_makes_the_answer_a_stopped_row_and_the_command_a_stop_row(audited, engine, dify, redis_client):
    first, second = audited
    dify.script([d.message("part one"), d.sleep(0.3), d.message(" part two"), d.sleep(6), d.message(" never"), d.end()])
    sims = [make_simulator(first.url), make_simulator(second.url)]
    question = sims[0].text_message("a long story")
    reply = sims[0].send(question)
    stream_id = reply["stream"]["id"]
    assert wait_until(lambda: "".join(redis_client.lrange(KEYS.stream_chunks(stream_id), 0, -1)) == "part one part two")
    stop = sims[1].text_message("/stop")
    assert sims[1].send(stop)["stream"]["content"] == ZH["stop_done"]
    assert wait_until(lambda: count(engine) == 2)
    [answer] = rows(engine, msgid=question["msgid"])
    assert answer["outcome"] == "stopped" and answer["kind"] == MESSAGE
    assert answer["answer"] == f"part one part two\n\n{ZH['stopped_note']}"
    [command] = rows(engine, msgid=stop["msgid"])
    assert (command["kind"], command["outcome"], command["answer"]) == (STOP, ANSWERED, ZH["stop_done"])
    for sim in sims:
        sim.close()


def test_a_refusal_and_a_command_are_rows_too(make_app, serve, engine, audit_url, dify):
    live = serve(make_app(database_url=audit_url, rate_limit_per_minute=1))
    dify.script(d.answer("ok"), times=None)
    sim = make_simulator(live.url)
    assert sim.ask("one").text == "ok"
    refused = sim.send(sim.text_message("two"))
    assert refused["stream"]["content"] == ZH["rate_limited"]
    sim.send(sim.text_message("/help"))
    assert wait_until(lambda: count(engine) == 3)
    assert sorted((r["question"], r["outcome"]) for r in rows(engine)) == [
        ("/help", ANSWERED),
        ("one", ANSWERED),
        ("two", "busy"),
    ]
    sim.close()


def test_two_sweepers_at_once_write_each_row_once(engine, redis_client):
    """Two processes sweep the same owed streams at the same time (each claims what it reads; a claim that runs
    out is taken by the other): every stream is one row, none is missed."""
    records = AuditRecords(engine)
    trails = [AuditTrail(redis_client, KEYS, records, "default") for _ in range(2)]
    now = time.time()
    stream_ids = [f"s{i}" for i in range(300)]
    for i, stream_id in enumerate(stream_ids):
        redis_client.hset(
            KEYS.stream(stream_id),
            mapping={"status": "done", "msgid": f"m{i}", "userid": "u", "created_at": now, "finished_at": now},
        )
        redis_client.expire(KEYS.stream(stream_id), 600)
    redis_client.zadd(KEYS.audit_due(), dict.fromkeys(stream_ids, now))
    redis_client.expire(KEYS.audit_due(), 600)
    barrier = threading.Barrier(2)

    def sweep(trail):
        barrier.wait()
        while redis_client.zcount(KEYS.audit_due(), "-inf", time.time()):
            trail.sweep()

    threads = [threading.Thread(target=sweep, args=(trail,)) for trail in trails]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert count(engine) == 300
    assert sorted(r["msgid"] for r in rows(engine)) == sorted(f"m{i}" for i in range(300))
    assert redis_client.zcard(KEYS.audit_due()) == 0


# --- the database away ---------------------------------------------------------------------------------------


def test_rows_wait_in_redis_while_the_database_is_cut_and_go_in_once_after(make_app, serve, engine, audit_url, dify):
    url = make_url(audit_url)
    link = FaultyLink(url.port or 3306, url.host).start()
    try:
        live = serve(make_app(database_url=url.set(port=link.port).render_as_string(hide_password=False)))
        gateway = live.gateway
        dify.script(d.answer("answered while the database is away"), times=None)
        sim = make_simulator(live.url)
        assert sim.ask("before").text == "answered while the database is away"
        assert wait_until(lambda: count(engine) == 1)
        link.partition()
        started = time.monotonic()
        texts = [sim.ask(f"during {i}").text for i in range(3)]
        assert texts == ["answered while the database is away"] * 3
        assert time.monotonic() - started < 10  # the answers do not wait for the database
        pending = gateway.bots["default"].audit.pending
        assert wait_until(lambda: pending() == 3, timeout=30)
        assert count(engine) == 1
        link.heal()
        assert wait_until(lambda: count(engine) == 4, timeout=30)
        assert wait_until(lambda: pending() == 0)
        time.sleep(1.5)
        assert sorted(r["question"] for r in rows(engine)) == ["before", "during 0", "during 1", "during 2"]
        sim.close()
    finally:
        link.stop()


def test_a_message_answered_while_redis_and_the_database_are_away_is_a_row_too(
    make_app, serve, engine, audit_url, private_redis, dify
):
    """Redis cut: the message is kept in the database, its bubble open, and gets its row once a poll takes it (Redis
    back). With the database cut as well, it is answered at once with the note, and its row (which Redis cannot
    list) waits in memory until the database is back, though Redis is not."""
    redis_link = FaultyLink(private_redis.port).start()
    url = make_url(audit_url)
    database_link = FaultyLink(url.port or 3306, url.host).start()
    try:
        live = serve(
            make_app(
                redis_url=f"redis://127.0.0.1:{redis_link.port}/0",
                redis_socket_timeout=0.5,
                database_url=url.set(port=database_link.port).render_as_string(hide_password=False),
            )
        )
        sim = make_simulator(live.url, poll_interval=0.2)
        redis_link.partition()
        kept = sim.send(sim.text_message("asked while Redis is away"))
        assert kept["stream"]["finish"] is False  # kept: no row until it is taken
        database_link.partition()
        both = sim.text_message("asked while both are away")
        started = time.monotonic()
        assert sim.send(both)["stream"]["content"] == ZH["store_unavailable"]
        assert time.monotonic() - started < 4  # the note waits on no try of listing the row
        trail = live.gateway.bots["default"].audit
        assert wait_until(lambda: len(trail.held) == 1)
        time.sleep(2.5)  # sweeps while the database is away: the row stays held
        assert count(engine) == 0 and len(trail.held) == 1
        database_link.heal()
        assert wait_until(lambda: count(engine) == 1, timeout=30)
        assert not trail.held
        [row] = rows(engine, msgid=both["msgid"])
        assert (row["kind"], row["outcome"], row["question"]) == (MESSAGE, "error", "asked while both are away")
        assert row["answer"] == ZH["store_unavailable"]
        dify.script(d.answer("answered once Redis was back"))
        redis_link.heal()
        assert sim.follow(kept).text == "answered once Redis was back"
        assert wait_until(lambda: count(engine) == 2, timeout=15)
        time.sleep(1.5)
        assert [(r["question"], r["outcome"]) for r in rows(engine)] == [
            ("asked while both are away", "error"),
            ("asked while Redis is away", "answered"),
        ]
        sim.close()
    finally:
        redis_link.stop()
        database_link.stop()


def test_an_answer_its_owner_sent_after_a_poll_gave_it_up_is_recorded_whole(make_pair, engine, audit_url, dify):
    """A replica cut off from Redis past its lease: a poll on the other one ends the bubble at "interrupted" (its row
    is written, saying so), and the owner, which had the answer, sends the rest through response_url: the row is
    written again, saying what the user has, the whole answer with the note; still one row."""
    first, second = make_pair(stream_lease_seconds=2, dify_read_timeout=4.0, database_url=audit_url)
    dify.script([d.message("part one"), d.sleep(3.5), d.message(" and part two"), d.end()])
    opener = make_simulator(first.url)
    payload = opener.text_message("hello")
    reply = opener.send(payload)
    kill(first)
    poller = make_simulator(second.url, poll_interval=0.2)
    assert poller.follow(reply).text == f"part one\n\n{ZH['orphaned']}"
    assert wait_until(lambda: [r["answer"] for r in rows(engine)] == [f"part one\n\n{ZH['orphaned']}"])
    opener.inbox.wait_for(payload["response_url"], timeout=8)
    whole = f"part one and part two\n\n{ZH['orphaned']}"
    assert wait_until(lambda: [r["answer"] for r in rows(engine)] == [whole])
    [row] = rows(engine)
    assert (row["msgid"], row["outcome"], row["answer_len"]) == (payload["msgid"], "note", len(whole))
    opener.close()
    poller.close()


def test_a_retry_kept_in_a_redis_outage_shows_the_answer_the_other_replica_gives(
    make_app, serve, engine, audit_url, dify, redis_url
):
    """WeCom's retry of a message reaches a replica cut off from Redis, which keeps it in the database with its
    bubble open; the other replica answers the message. Once Redis is back, the kept bubble shows that answer, and
    the audit has one row of it."""
    parts = urlsplit(redis_url)
    link = FaultyLink(parts.port, parts.hostname).start()
    through_link = parts._replace(
        netloc=parts.netloc.replace(f"{parts.hostname}:{parts.port}", f"127.0.0.1:{link.port}")
    )
    try:
        answering = serve(make_app(database_url=audit_url))
        cut_off = serve(
            make_app(
                replica_id="replica-b",
                database_url=audit_url,
                redis_url=through_link.geturl(),
                redis_socket_timeout=0.5,
            )
        )
        # (the answer ends well after the retry's note: the cut-off replica takes the retry again for 2 s first)
        dify.script([d.message("the answer"), d.sleep(8), d.end()])
        sims = [make_simulator(answering.url), make_simulator(cut_off.url)]
        payload = sims[0].text_message("asked once, delivered twice")
        reply = sims[0].send(payload)
        link.partition()
        kept = sims[1].send(payload)
        assert kept["stream"]["finish"] is False and kept["stream"]["id"] != reply["stream"]["id"]
        assert sims[0].follow(reply).text == "the answer"
        assert wait_until(lambda: [(r["outcome"], r["answer"]) for r in rows(engine)] == [("answered", "the answer")])
        link.heal()
        assert sims[1].follow(kept).text == "the answer"
        assert len(dify.chat_requests()) == 1
        time.sleep(1.0)
        assert [(r["outcome"], r["answer"]) for r in rows(engine)] == [("answered", "the answer")]
        for sim in sims:
            sim.close()
    finally:
        link.stop()


@pytest.fixture(params=["mariadb_utf8", "sqlite"])
def any_database(request, engine, audit_url, tmp_path):
    """An engine on a database the audit table was never in: a MariaDB database whose default character set is the
    3-byte `utf8` an older deployment may have, or the demo's SQLite file."""
    if request.param == "sqlite":
        made = db.make_engine(f"sqlite:///{tmp_path / 'audit.db'}")
        yield made
        made.dispose()
        return
    name = f"audit_utf8_{secrets.token_hex(3)}"
    with engine.begin() as connection:  # (the audit database's, to make another beside it)
        connection.exec_driver_sql(f"CREATE DATABASE `{name}` CHARACTER SET utf8")
    made = db.make_engine(make_url(audit_url).set(database=name).render_as_string(hide_password=False))
    yield made
    made.dispose()
    with engine.begin() as connection:
        connection.exec_driver_sql(f"DROP DATABASE `{name}`")


def test_four_byte_characters_and_a_long_answer_are_stored_whole(any_database):
    """A question with emoji (4 bytes in UTF-8) and a 60 KB answer, in a table the gateway made in a database whose
    default is the 3-byte utf8: stored whole, never cut (the table is utf8mb4, its texts MEDIUMTEXT)."""
    assert ensure_table(any_database)
    question = "能帮我看看这个吗？🙂🎉 𠀋"
    answer = ("第一段回答，带一个表情 😊。" * 4000)[:20_000]  # 20,000 characters, about 60 KB of UTF-8
    assert len(answer.encode()) > 55_000
    now = time.time()
    row = AuditRow(bot="b", msgid="m-emoji", kind=MESSAGE, outcome=ANSWERED, received_at=now, finished_at=now,
                   question=question, answer=answer)  # fmt: skip
    assert AuditRecords(any_database).insert([row]) == {ANSWERED: 1}
    stored = AuditRecords(any_database).row("b", "m-emoji", MESSAGE)
    assert stored["question"] == question and stored["answer"] == answer
    assert stored["answer_len"] == len(answer)


def test_metadata_mode_keeps_lengths_and_hashes_but_no_text(make_app, serve, engine, audit_url, dify):
    live = serve(make_app(database_url=audit_url, audit_content="metadata"))
    dify.script(d.answer("秘密的回答"))
    sim = make_simulator(live.url)
    assert sim.ask("秘密的问题").text == "秘密的回答"
    assert wait_until(lambda: count(engine) == 1)
    [row] = rows(engine)
    assert row["question"] is None and row["answer"] is None
    assert (row["question_len"], row["answer_len"]) == (5, 5)
    assert row["question_sha256"] == hashlib.sha256("秘密的问题".encode()).hexdigest()
    sim.close()


# --- export and retention ------------------------------------------------------------------------------------


def seed(engine, how_many: int, start: datetime, bot: str = "default") -> None:
    records = AuditRecords(engine)
    made = []
    for i in range(how_many):
        at = (start + timedelta(minutes=i)).timestamp()
        made.append(AuditRow(bot, f"{bot}-{i}", MESSAGE, ANSWERED, at, at + 1, userid=f"u{i % 3}", question=f"q{i}"))
    records.insert(made)


def test_the_api_pages_add_up_to_the_cli_export_oldest_first(audited, engine):
    seed(engine, 25, datetime(2026, 11, 1, 8, 0))
    client = audited[0].app.test_client()
    auth = {"Authorization": f"Bearer {API_TOKEN}"}
    lines, cursor, pages = [], "", 0
    while True:
        response = client.get("/api/audit", query_string={"limit": 10, "cursor": cursor}, headers=auth)
        assert response.status_code == 200
        lines += response.get_data(as_text=True).splitlines()
        pages += 1
        cursor = response.headers.get("X-Next-Cursor", "")
        if not cursor:
            break
    assert pages == 3
    exported = audited[0].app.test_cli_runner().invoke(args=["audit", "export"])
    assert exported.exit_code == 0, exported.output
    assert exported.output.splitlines() == lines
    assert [orjson.loads(line)["msgid"] for line in lines] == [f"default-{i}" for i in range(25)]
    assert orjson.loads(lines[0])["received_at"] == "2026-11-01T08:00:00Z"

    one_user = client.get("/api/audit", query_string={"user": "u1", "format": "csv"}, headers=auth)
    table = list(csv.DictReader(io.StringIO(one_user.get_data(as_text=True))))
    assert [r["msgid"] for r in table] == [f"default-{i}" for i in range(1, 25, 3)]
    window = {"since": "2026-11-01T08:05:00Z", "until": "2026-11-01T08:07:00Z"}
    assert len(client.get("/api/audit", query_string=window, headers=auth).get_data(as_text=True).splitlines()) == 2


@pytest.mark.parametrize(
    ("query", "headers", "status"),
    [
        ({}, {}, 401),
        ({}, {"Authorization": "Bearer wrong-token-wrong-token"}, 401),
        ({"limit": 0}, None, 400),
        ({"limit": 1001}, None, 400),
        ({"since": "yesterday"}, None, 400),
        ({"format": "xml"}, None, 400),
        ({"cursor": "not-a-cursor"}, None, 400),
        ({"colour": "red"}, None, 400),
    ],
)
def test_the_api_refuses_clearly(audited, query, headers, status):
    headers = {"Authorization": f"Bearer {API_TOKEN}"} if headers is None else headers
    response = audited[0].app.test_client().get("/api/audit", query_string=query, headers=headers)
    assert response.status_code == status
    body = response.get_json()
    assert set(body) == {"error", "message"} and API_TOKEN not in response.get_data(as_text=True)


@pytest.mark.parametrize(
    ("changes", "because"),
    [({}, "there is no database: set DATABASE_URL"), ({"audit": "off"}, "AUDIT=off")],
    ids=["no-database", "turned-off"],
)
def test_a_gateway_without_an_audit_trail_says_so_at_start_and_in_readiness(
    make_app, audit_url, caplog, changes, because
):
    """AUTH_MODE=none needs no database, and without one nothing is recorded: each serving process says so once, in
    one WARNING, and /readyz names it per bot, rather than the operator learning it at export time."""
    if changes:
        changes["database_url"] = audit_url
    with caplog.at_level(logging.WARNING, logger="services.gateway"):
        app = make_app(**changes)
        app.extensions["gateway"].start()  # once per process: a second start says nothing more
    said = [r.getMessage() for r in caplog.records if "audit trail is off" in r.getMessage()]
    assert len(said) == 1 and because in said[0]
    assert app.test_client().get("/readyz").get_json()["bots"]["default"]["audit"] == "off"
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="services.gateway"):
        recorded = make_app(database_url=audit_url)
    assert "audit trail is off" not in caplog.text
    assert recorded.test_client().get("/readyz").get_json()["bots"]["default"]["audit"] == "on"


def test_without_a_token_there_is_no_audit_api(make_app, engine, audit_url):
    app = make_app(database_url=audit_url)
    assert app.test_client().get("/api/audit").status_code == 404


def test_purge_deletes_only_the_rows_past_their_term(settings, engine, audit_url):
    seed(engine, 3, datetime.now() - timedelta(days=200))
    seed(engine, 2, datetime.now() - timedelta(days=10), bot="recent")
    app = create_app(settings.replace(database_url=audit_url, audit_retention_days=180))  # a flask command's app
    result = app.test_cli_runner().invoke(args=["audit", "purge"])
    app.extensions["gateway"].close()
    assert result.exit_code == 0, result.output
    assert "deleted 3 audit rows older than 180 days" in result.output
    assert {r["bot"] for r in rows(engine)} == {"recent"}
    assert AuditRecords(engine).purge(5) == 2


def test_the_sweep_purges_on_one_replica_at_a_time(make_pair, engine, audit_url):
    seed(engine, 4, datetime.now() - timedelta(days=400))
    seed(engine, 1, datetime.now(), bot="recent")
    replicas = make_pair(database_url=audit_url)  # each one's sweeper looks at once; one of them takes the hour's turn
    assert wait_until(lambda: count(engine) == 1)
    assert sum(replica.gateway.audit_sweeper.purge_if_due() for replica in replicas) == 0  # the turn is taken


def test_an_export_streams_a_page_at_a_time(engine):
    seed(engine, 30, datetime(2026, 1, 1))
    records = AuditRecords(engine)
    pages = []
    original = records.page

    def page(which, limit, cursor=""):
        found, after = original(which, limit, cursor)
        pages.append(len(found))
        return found, after

    records.page = page
    assert len(list(records.every(AuditFilter(), page_size=7))) == 30
    assert pages == [7, 7, 7, 7, 2]


# --- events and pushes ---------------------------------------------------------------------------------------


def test_a_rating_and_a_tap_on_a_forms_card_are_rows_of_their_own(audited, engine, dify):
    first, second = audited
    sims = [make_simulator(first.url), make_simulator(second.url)]
    dify.script(approval())
    conversation, reply, _ = ask_and_click(sims[0], sims[1])
    assert reply["template_card"]["main_title"]["desc"] == ZH["form_submitted"].format(choice="Approve")
    stream_id = conversation.stream_id
    rating = {"id": stream_id, "type": 2, "content": "too long", "inaccurate_reason_list": [1]}
    sims[1].send(sims[1].event_message("feedback_event", rating))
    assert wait_until(lambda: {r["kind"] for r in rows(engine)} == {MESSAGE, FORM_ACTION, FEEDBACK})
    [tap] = rows(engine, kind=FORM_ACTION)
    assert tap["question"].startswith(conversation.cards[0]["task_id"]) and tap["replica"] == "replica-b"
    [feedback] = rows(engine, kind=FEEDBACK)
    assert feedback["question"] == "dislike: 内容不相关 (unrelated); too long"
    [message] = rows(engine, kind=MESSAGE)
    assert message["question"] == "buy laptops" and message["dify_run_id"]
    for sim in sims:
        sim.close()


def test_a_push_is_a_row_once_whatever_the_retries(make_pair, wecom_ws, engine, audit_url):
    wecom = wecom_ws({WS_BOT_ID: WS_BOT_SECRET})
    replicas = make_pair(
        wecom_mode="long_connection",
        wecom_bot_id=WS_BOT_ID,
        wecom_bot_secret=WS_BOT_SECRET,
        wecom_ws_url=wecom.url,
        push_api_token=API_TOKEN,
        database_url=audit_url,
    )
    body = {"bot": "default", "userid": "bob", "markdown": "**Reminder**: review at 3 pm"}
    headers = {"Authorization": f"Bearer {API_TOKEN}", "Idempotency-Key": "job-7"}
    ids = {httpx.post(f"{r.url}/api/push", json=body, headers=headers, timeout=5).json()["id"] for r in replicas}
    assert len(ids) == 1
    assert wait_until(lambda: count(engine) == 1)
    time.sleep(1.5)
    [row] = rows(engine)
    assert (row["kind"], row["msgid"], row["userid"], row["chattype"]) == (PUSH, f"push:{ids.pop()}", "bob", "single")
    assert row["answer"] == "**Reminder**: review at 3 pm"


def test_a_forms_rest_sent_after_its_bubble_ended_is_a_row_of_its_own_once(make_pair, engine, audit_url, dify):
    """The bubble ended while its form waited; the tap came on the other replica, and the run's rest went out as a
    message of its own: the question is one row (the bubble as it ended), the tap one, the rest one."""
    a, b = make_pair(stream_window_seconds=22, database_url=audit_url)
    sim, other = make_simulator(a.url), make_simulator(b.url)
    dify.script(approval())
    question = sim.text_message("buy laptops")
    conversation = sim.follow(sim.send(question))
    assert ZH["form_waiting"] in conversation.text
    click = other.card_click(conversation.cards[0], "approve")
    other.send(click)
    assert other.inbox.wait_for(click["response_url"], timeout=10) is not None
    assert wait_until(lambda: count(engine) == 3)
    time.sleep(1.5)
    assert count(engine) == 3
    [message] = rows(engine, kind=MESSAGE)
    assert message["msgid"] == question["msgid"] and ZH["form_waiting"] in message["answer"]
    tap, rest = sorted(rows(engine, kind=FORM_ACTION), key=lambda row: row["msgid"].startswith("form:"))
    assert rest["msgid"] == f"form:{conversation.cards[0]['task_id']}" and rest["replica"] == "replica-b"
    assert rest["answer"] and tap["question"].startswith(conversation.cards[0]["task_id"])
    sim.close()
    other.close()


def test_a_table_made_by_an_earlier_release_gains_the_new_columns_and_keeps_its_rows(audit_url, caplog):
    """The backend, route, model, tokens and trace of a row came with a later release: a serving replica adds them
    to the table an earlier one made (ALTER TABLE, its rows kept), and writes rows with them; and the indexes a later
    release searches by."""
    from sqlalchemy import Column, MetaData, Table, UniqueConstraint, inspect

    engine = db.make_engine(audit_url, timeout=3)
    with engine.begin() as connection:
        connection.exec_driver_sql("DROP TABLE IF EXISTS wecom_audit")
    newer = {"backend", "route", "model", "prompt_tokens", "completion_tokens", "trace_id"}
    columns = [
        Column(c.name, c.type, primary_key=c.primary_key, nullable=c.nullable, server_default=c.server_default)
        for c in wecom_audit.columns
        if c.name not in newer
    ]
    # (one row per message was the table's rule from its first release)
    old = Table(
        "wecom_audit", MetaData(), *columns, UniqueConstraint("bot", "msgid", "kind", name="uq_wecom_audit_message")
    )
    old.create(engine)
    now = datetime.now()
    with engine.begin() as connection:
        made = {"bot": "earlier", "msgid": "m-old", "kind": MESSAGE, "outcome": ANSWERED}
        connection.execute(old.insert(), {**made, "received_at": now, "finished_at": now})
    with caplog.at_level(logging.WARNING, logger="services.audit.table"):
        assert not ensure_table(engine)  # not made: changed
    assert not caplog.records  # its unique key is there
    assert newer <= {column["name"] for column in inspect(engine).get_columns("wecom_audit")}
    # and the indexes the operator's page searches by
    assert {index.name for index in wecom_audit.indexes} <= {
        i["name"] for i in inspect(engine).get_indexes("wecom_audit")
    }
    records = AuditRecords(engine)
    at = time.time()
    trace = "ab" * 16
    row = AuditRow(
        "b", "m-new", MESSAGE, ANSWERED, at, at, backend="openai", model="m", prompt_tokens=3, trace_id=trace
    )
    records.insert([row])
    [earlier] = rows(engine, bot="earlier")
    [new] = rows(engine, msgid="m-new")
    assert earlier["backend"] == "" and earlier["prompt_tokens"] is None
    assert (new["backend"], new["model"], new["prompt_tokens"], new["trace_id"]) == ("openai", "m", 3, trace)
    engine.dispose()


def test_a_table_made_by_hand_without_its_unique_key_is_said_when_first_opened(audit_url, caplog):
    """One row per (bot, msgid, kind) is the database's to keep: a table made without that key would keep a row
    written twice (a retry, a takeover) twice. It is said, with the key's name, and the table is used as it is (rows
    written twice may be in it already, so no key is added behind the operator's back)."""
    from sqlalchemy import Column, MetaData, Table

    engine = db.make_engine(audit_url, timeout=3)
    wecom_audit.drop(engine, checkfirst=True)
    columns = [Column(c.name, c.type, primary_key=c.primary_key, nullable=c.nullable) for c in wecom_audit.columns]
    Table("wecom_audit", MetaData(), *columns).create(engine)
    with caplog.at_level(logging.WARNING, logger="services.audit.table"):
        assert not ensure_table(engine)
    assert [record.getMessage() for record in caplog.records] == [
        "the wecom_audit table has no unique key on (bot, msgid, kind): a row written twice is kept twice; add it "
        "(uq_wecom_audit_message)"
    ]
    wecom_audit.drop(engine)
    engine.dispose()


def test_an_answers_row_names_its_backend_model_tokens_and_trace(make_app, serve, engine, audit_url, openai, dify):
    """Both backends: the row says where the answer came from and the trace its calls carried (the headers the
    servers got: W3C traceparent and X-Trace-Id), and an OpenAI-compatible server's model and tokens."""
    model_bot = serve(make_app(**openai_settings(openai, database_url=audit_url)))
    dify_bot = serve(make_app(database_url=audit_url, replica_id="replica-b"))
    sim_model, sim_dify = make_simulator(model_bot.url), make_simulator(dify_bot.url)
    openai.script(o.answer("Counted words."))
    dify.script(d.answer("Dify's words."))
    first, second = sim_model.ask("count me"), sim_dify.ask("and me")
    assert wait_until(lambda: count(engine) == 2)
    by_answer = {row["answer"]: row for row in rows(engine)}
    model_row, dify_row = by_answer["Counted words."], by_answer["Dify's words."]
    assert (model_row["backend"], model_row["model"]) == ("openai", "test-model")
    assert (model_row["prompt_tokens"], model_row["completion_tokens"]) == (12, 2)
    assert dify_row["backend"] == "dify" and dify_row["dify_message_id"]
    openai_headers = openai.requests[0]["headers"]
    dify_headers = dify.requests[0]["headers"]
    for row, headers in ((model_row, openai_headers), (dify_row, dify_headers)):
        assert len(row["trace_id"]) == 32 and headers["x-trace-id"] == row["trace_id"]
        version, trace, span, flags = headers["traceparent"].split("-")
        assert (version, trace, flags) == ("00", row["trace_id"], "01") and len(span) == 16
    assert first.stream_id != second.stream_id and model_row["trace_id"] != dify_row["trace_id"]
    sim_model.close()
    sim_dify.close()
