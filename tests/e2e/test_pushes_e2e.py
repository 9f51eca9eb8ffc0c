"""The push API's own cases as in production: two gunicorn replicas of two workers each (four processes taking the
requests) on one BOTS_FILE, the test Redis and the real MariaDB (the audit trail on), WeCom's HTTP APIs played by
demo/wecom_api_standin.py at WECOM_API_BASE. A callback-mode bot pushes to a group robot and through its self-built
app; a long-connection bot to a group robot of its own. Requests go to both replicas at once, so the workers race:
a webhook's text with mentions and markdown, one access token for the four processes and fetched again once after
WeCom expires it, `partial`, a lost reply `unknown` and never sent again, one Idempotency-Key sent once, WeCom's 20
a minute per robot and the app's 30 a minute per member held across the processes, and each push its audit row."""

from __future__ import annotations

import secrets
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from sqlalchemy import select

from demo.wecom_api_standin import APP_PER_MEMBER_MINUTE, PER_MINUTE, WeComApiStandIn
from services.audit.table import wecom_audit
from services.auth import db
from tests.conftest import wait_until
from tests.e2e.conftest import callback_bot, connection_bot, ready_replicas, replica_env

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]
PUSH_TOKEN = "e2e-push-api-token-0123456789"
OPS, DESK_OPS = "e2e-ops-robot-key-0123", "e2e-desk-robot-key-4567"
CORP, AGENT, SECRET = "ww-e2e-push-corp", 1000003, "e2e-push-app-secret-0123"
DESK_ID, DESK_SECRET = "lc-push-desk", "lc-push-desk-secret"


def bots_file(dify: str, api: WeComApiStandIn, ws_url: str) -> str:
    app = {"app_corp_id": CORP, "app_agent_id": AGENT, "app_secret": SECRET}
    return f"""
{callback_bot("assistant", dify, **app)}
[bots.assistant.webhooks]
ops = "{api.webhook_url(OPS)}"

{connection_bot("desk", DESK_ID, DESK_SECRET, ws_url, dify)}
[bots.desk.webhooks]
ops = "{api.webhook_url(DESK_OPS)}"
"""


@pytest.fixture
def wecom_api():
    standin = WeComApiStandIn(keys=(OPS, DESK_OPS), app=(CORP, SECRET)).start()
    yield standin
    standin.stop()


@pytest.fixture
def deployment(tmp_path, dify, wecom_api, wecom_ws, redis_url, redis_client, mysql_databases):
    """(the two replicas, the audit database's URL): Redis flushed, a database of the test's own (WeCom's minute
    for a robot is counted in Redis, and the rows of a test are its own)."""
    wecom = wecom_ws({DESK_ID: DESK_SECRET})
    path = tmp_path / "bots.toml"
    path.write_text(bots_file(dify.base_url, wecom_api, wecom.url))
    database_url = mysql_databases(f"pushes_{secrets.token_hex(3)}")
    env = replica_env(
        dify.base_url,
        redis_url,
        BOTS_FILE=str(path),
        DATABASE_URL=database_url,
        WECOM_API_BASE=wecom_api.url,
        PUSH_API_TOKEN=PUSH_TOKEN,
    )
    replicas = ready_replicas(env, tmp_path)
    yield replicas, database_url
    for replica in replicas:
        replica.stop()


def push(replica, body: dict, key: str = "") -> httpx.Response:
    headers = {"Authorization": f"Bearer {PUSH_TOKEN}", **({"Idempotency-Key": key} if key else {})}
    return httpx.post(f"{replica.url}/api/push", json={"bot": "assistant", **body}, headers=headers, timeout=20)


def at_once(replicas, bodies: list[dict], key: str = "") -> list[httpx.Response]:
    """Each body posted at the same moment, to the replicas in turn (each replica's two workers take them as they
    come)."""
    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(lambda n: push(replicas[n % len(replicas)], bodies[n], key), range(len(bodies))))


def push_rows(database_url: str) -> list[dict]:
    engine = db.make_engine(database_url)
    try:
        with engine.connect() as connection:
            query = select(wecom_audit).where(wecom_audit.c.kind == "push").order_by(wecom_audit.c.id)
            return [dict(row._mapping) for row in connection.execute(query)]
    finally:
        engine.dispose()


def test_webhook_pushes_of_both_modes_with_mentions_and_markdown_each_with_its_audit_row(deployment, wecom_api):
    (a, b), database_url = deployment
    said = push(a, {"webhook": "ops", "text": "磁盘告警", "mentioned_list": ["zhangsan", "@all"]})
    assert said.status_code == 200 and said.json()["status"] == "sent", said.text
    shown = push(b, {"bot": "desk", "webhook": "ops", "markdown": "**值班** 交接完成"})
    assert shown.status_code == 200 and shown.json()["status"] == "sent", shown.text
    assert wecom_api.to(OPS) == [
        {"msgtype": "text", "text": {"content": "磁盘告警", "mentioned_list": ["zhangsan", "@all"]}}
    ]
    assert wecom_api.to(DESK_OPS) == [{"msgtype": "markdown", "markdown": {"content": "**值班** 交接完成"}}]
    assert wait_until(lambda: len(push_rows(database_url)) == 2, timeout=15)
    rows = {row["bot"]: row for row in push_rows(database_url)}
    assert (rows["assistant"]["chatid"], rows["assistant"]["outcome"]) == ("webhook:ops", "sent")
    assert (rows["desk"]["chatid"], rows["desk"]["msgtype"]) == ("webhook:ops", "markdown")
    logs = "".join(replica.logs() for replica in (a, b))
    assert OPS not in logs and DESK_OPS not in logs and SECRET not in logs


def test_four_processes_share_one_access_token_and_fetch_it_again_once_when_it_expires(deployment, wecom_api):
    replicas, database_url = deployment
    first = at_once(replicas, [{"touser": "zhangsan", "toparty": "2", "markdown": f"早报 {n}"} for n in range(8)])
    assert [reply.json()["status"] for reply in first] == ["sent"] * 8
    assert wecom_api.token_fetches == 1
    wecom_api.expire_token()
    again = at_once(replicas, [{"touser": "lisi", "markdown": f"晚报 {n}"} for n in range(8)])
    assert [reply.json()["status"] for reply in again] == ["sent"] * 8
    assert wecom_api.token_fetches == 2  # the processes that met 42001 together waited for one fetch
    sent = sorted(message["markdown"]["content"] for message in wecom_api.app_sent)
    assert sent == sorted([f"早报 {n}" for n in range(8)] + [f"晚报 {n}" for n in range(8)])  # each once
    assert wait_until(lambda: len(push_rows(database_url)) == 16, timeout=15)
    assert {row["chatid"] for row in push_rows(database_url)} == {"user:zhangsan party:2", "user:lisi"}


def test_partial_names_what_wecom_refused_and_a_lost_reply_is_unknown_on_every_replica(deployment, wecom_api):
    (a, b), _ = deployment
    wecom_api.unknown_targets = {"ghost", "77"}
    partial = push(a, {"touser": "zhangsan|ghost", "totag": "77", "markdown": "周会改期"}).json()
    assert partial["status"] == "partial" and partial["error"] == "WeCom does not know users ghost, tags 77"
    wecom_api.lose_replies = 1
    lost = push(b, {"webhook": "ops", "text": "did it arrive?"}, key="e2e-lost-1").json()
    assert lost["status"] == "unknown"
    again = at_once((a, b), [{"webhook": "ops", "text": "did it arrive?"}] * 4, key="e2e-lost-1")
    assert {(reply.json()["id"], reply.json()["status"], reply.json()["repeated"]) for reply in again} == {
        (lost["id"], "unknown", True)
    }
    assert len(wecom_api.to(OPS)) == 1 and len(wecom_api.app_sent) == 1  # WeCom has each once


def test_one_idempotency_key_posted_to_four_processes_at_once_is_sent_once(deployment, wecom_api):
    replicas, database_url = deployment
    replies = at_once(replicas, [{"webhook": "ops", "markdown": "发布完成 v2.3"}] * 8, key="e2e-release-23")
    assert all(reply.status_code == 200 for reply in replies), [reply.text for reply in replies]
    assert len({reply.json()["id"] for reply in replies}) == 1
    assert sum(1 for reply in replies if not reply.json().get("repeated")) == 1  # one request made it
    assert wecom_api.to(OPS) == [{"msgtype": "markdown", "markdown": {"content": "发布完成 v2.3"}}]
    push_id = replies[0].json()["id"]
    status = httpx.get(
        f"{replicas[1].url}/api/push/{push_id}", headers={"Authorization": f"Bearer {PUSH_TOKEN}"}, timeout=5
    )
    assert status.json() == {"id": push_id, "status": "sent"}
    assert wait_until(lambda: len(push_rows(database_url)) == 1, timeout=15)


def test_wecoms_twenty_a_minute_per_robot_hold_across_four_processes(deployment, wecom_api):
    replicas, _ = deployment
    for number in range(2):
        assert push(replicas[number], {"webhook": "ops", "text": f"alert {number}"}).json()["status"] == "sent"
    replies = at_once(replicas, [{"webhook": "ops", "text": f"burst {n}"} for n in range(25)])
    codes = sorted(reply.status_code for reply in replies)
    assert codes == [200] * (PER_MINUTE - 2) + [429] * 7
    assert all(1 <= int(reply.headers["retry-after"]) <= 60 for reply in replies if reply.status_code == 429)
    assert len(wecom_api.to(OPS)) == PER_MINUTE  # refused before going out: WeCom never had to say 45009
    assert all(reply.json()["status"] == "sent" for reply in replies if reply.status_code == 200)
    desk = push(replicas[0], {"bot": "desk", "webhook": "ops", "text": "another robot, its own minute"})
    assert desk.json()["status"] == "sent"


def test_the_apps_thirty_a_minute_per_member_hold_across_four_processes(deployment, wecom_api):
    """WeCom would drop a member's 31st message of a minute from the app without an error: the processes count
    them together and refuse the rest with 429, so no copy is dropped."""
    replicas, _ = deployment
    replies = at_once(replicas, [{"touser": "zhangsan", "markdown": f"告警 {n}"} for n in range(36)])
    codes = sorted(reply.status_code for reply in replies)
    assert codes == [200] * APP_PER_MEMBER_MINUTE + [429] * 6
    assert len(wecom_api.app_sent) == APP_PER_MEMBER_MINUTE and wecom_api.app_dropped == []
