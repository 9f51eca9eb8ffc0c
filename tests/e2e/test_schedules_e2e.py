"""Schedules as in production: two gunicorn replicas of two workers each (four schedulers racing for every tick) on
one BOTS_FILE, the test Redis and the real MariaDB (the audit trail on), Dify played by its stand-in, WeCom's HTTP
APIs by demo/wecom_api_standin.py and its WebSocket by the WebSocket stand-in. A callback bot pushes to a group
robot and, through its self-built app, to a user and a department; a long-connection bot to a group chat. Every
minute, on the real clock: each tick answered once and pushed once to each target; then the replica running a slow
tick SIGKILLed, and the other pushing it, once."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import select

from demo import dify_standin as d
from demo.wecom_api_standin import WeComApiStandIn
from services.audit.table import wecom_audit
from services.auth import db
from tests.conftest import wait_until
from tests.e2e.conftest import callback_bot, connection_bot, ready_replicas, replica_env

pytestmark = pytest.mark.e2e
KEY, CORP, SECRET = "e2e-ops-robot-key", "ww-e2e-corp", "e2e-app-secret"
DESK_ID, DESK_SECRET, DESK_CHAT = "lc-scheduled", "lc-scheduled-secret", "wrkDeskE2E"
LEASE_SECONDS = 4


def bots_file(dify: str, webhook: str, ws_url: str) -> str:
    return f"""
{callback_bot("assistant", dify, app_corp_id=CORP, app_agent_id=1000002, app_secret=SECRET)}
[bots.assistant.webhooks]
ops = "{webhook}"

[[bots.assistant.schedules]]
name = "minutely"
cron = "* * * * *"
question = "每分钟报告 {{datetime}}"
to = ["webhook:ops", "user:zhangsan", "party:2"]
catch_up_seconds = 30

{connection_bot("desk", DESK_ID, DESK_SECRET, ws_url, dify)}
[[bots.desk.schedules]]
name = "minutely"
cron = "* * * * *"
question = "值班报告 {{datetime}}"
to = ["chat:{DESK_CHAT}"]
catch_up_seconds = 30
"""


@pytest.fixture
def wecom_api():
    standin = WeComApiStandIn(keys=(KEY,), app=(CORP, SECRET)).start()
    yield standin
    standin.stop()


@pytest.fixture
def deployment(tmp_path, dify, wecom_api, wecom_ws, redis_url, mysql_databases):
    """(the replicas, the audit database's URL, the WebSocket stand-in)."""
    wecom = wecom_ws({DESK_ID: DESK_SECRET})
    path = tmp_path / "bots.toml"
    path.write_text(bots_file(dify.base_url, wecom_api.webhook_url(KEY), wecom.url))
    database_url = mysql_databases("schedules_e2e")
    env = replica_env(
        dify.base_url,
        redis_url,
        BOTS_FILE=str(path),
        DATABASE_URL=database_url,
        WECOM_API_BASE=wecom_api.url,
        STREAM_LEASE_SECONDS=str(LEASE_SECONDS),
    )
    replicas = ready_replicas(env, tmp_path)
    yield replicas, database_url, wecom
    for replica in replicas:
        replica.stop()


def schedule_rows(database_url: str) -> list[tuple[str, str, str]]:
    """(bot, msgid, outcome) of every schedule row."""
    engine = db.make_engine(database_url)
    try:
        with engine.connect() as connection:
            query = select(wecom_audit.c.bot, wecom_audit.c.msgid, wecom_audit.c.outcome).where(
                wecom_audit.c.kind == "schedule"
            )
            return sorted(tuple(row) for row in connection.execute(query))
    finally:
        engine.dispose()


def to_desk(wecom) -> list[dict]:
    return [m for m in wecom.proactive if m.get("chatid") == DESK_CHAT]


@pytest.mark.timeout(300)  # two ticks of the real clock, a minute apart, may take 2 min 30 s from the first worker up
def test_each_tick_runs_once_across_four_workers_and_pushes_once_to_each_target(deployment, dify, wecom_api):
    _, database_url, wecom = deployment
    dify.script(d.answer("本分钟的报告"), times=None)
    assert wait_until(lambda: len(wecom_api.to(KEY)) >= 2 and len(to_desk(wecom)) >= 2, timeout=150)
    time.sleep(3)  # every worker goes on looking: nothing more goes out for those ticks
    ticks = len(wecom_api.to(KEY))
    assert ticks in (2, 3)  # (a third minute may have begun meanwhile)
    assert len(wecom_api.app_sent) == ticks
    assert all(m["touser"] == "zhangsan" and m["toparty"] == "2" for m in wecom_api.app_sent)
    questions = [r["body"]["query"] for r in dify.requests if "query" in r["body"]]
    assert len(questions) == len(set(questions))  # each bot's tick asked once
    assert len(to_desk(wecom)) == len([q for q in questions if q.startswith("值班报告")])
    assert wait_until(lambda: len(schedule_rows(database_url)) >= 4, timeout=20)
    rows = schedule_rows(database_url)
    assert len(rows) == len(set(rows)) and {outcome for _, _, outcome in rows} == {"pushed"}


@pytest.mark.timeout(240)
def test_the_replica_running_a_slow_tick_is_killed_and_the_other_pushes_it_once(
    redis_client, deployment, dify, wecom_api
):
    replicas, database_url, _ = deployment
    dify.script(d.answer("first try, cut short by the kill", pieces=20, delay=1.0), match="每分钟报告")
    dify.script(d.answer("the report, asked again"), match="每分钟报告")
    dify.script(d.answer("值班"), match="值班报告", times=None)
    asked_first = wait_until(lambda: any("每分钟报告" in r["body"].get("query", "") for r in dify.requests), timeout=75)
    assert asked_first, ([r["body"] for r in dify.requests], [r.logs()[-3000:] for r in replicas])
    owner = wait_until(lambda: _tick_owner(redis_client), timeout=10) and _tick_owner(redis_client)
    victim = next(replica for replica in replicas if owner.startswith(f"{replica.name}:"))
    victim.kill()
    pushed = wait_until(lambda: len(wecom_api.to(KEY)) == 1, timeout=LEASE_SECONDS + 30)
    assert pushed, (
        _open_ticks(redis_client),
        [r["body"].get("query") for r in dify.requests],
        replicas[1 - replicas.index(victim)].logs()[-4000:],
    )
    time.sleep(3)
    assert wecom_api.to(KEY) == [{"msgtype": "markdown", "markdown": {"content": "the report, asked again"}}]
    asked = [r for r in dify.requests if "每分钟报告" in r["body"].get("query", "")]
    assert len(asked) == 2 and asked[0]["body"]["query"] == asked[1]["body"]["query"]  # the same tick, asked again
    assert len(wecom_api.app_sent) == 1


def _open_ticks(redis_client) -> list[dict]:
    """The assistant's open ticks as Redis holds them, each with its try's stream (what a failure shows)."""
    ticks = []
    for member in redis_client.zrange("bot:assistant:schedule:{bot:assistant:schedules}:open", 0, -1):
        name, _, tick = member.rpartition(":")
        state = redis_client.hgetall(f"bot:assistant:schedule:{{bot:assistant:schedules}}:{name}:{tick}")
        stream = state.get("stream", "")
        record = redis_client.hgetall(f"bot:assistant:dify_stream:{{{stream}}}") if stream else {}
        ticks.append({"tick": member, **state, "stream_status": record.get("status"), "owner": record.get("owner")})
    return ticks


def _tick_owner(redis_client) -> str:
    """The process answering the assistant's open tick (its stream's owner), once it has one."""
    for member in redis_client.zrange("bot:assistant:schedule:{bot:assistant:schedules}:open", 0, -1):
        name, _, tick = member.rpartition(":")
        stream = redis_client.hget(f"bot:assistant:schedule:{{bot:assistant:schedules}}:{name}:{tick}", "stream")
        if stream:
            return redis_client.hget(f"bot:assistant:dify_stream:{{{stream}}}", "owner") or ""
    return ""
