"""Pushes over WeCom's HTTP APIs: to a bot's group robots (POST /api/push with `webhook`) and, below, to users,
departments and tags through its self-built app (one access token for every replica, fetched again once when
WeCom calls it expired; `partial` for targets WeCom does not know). Sent once from whichever replica took the
request, whatever the bot's WeCom mode; text with mentions or markdown; WeCom's 20 a minute per robot held across
replicas (429 with Retry-After, nothing sent); the Idempotency-Key across replicas; a reply lost after the message
went out is `unknown`, never sent again; WeCom's refusals; each push an audit row naming `webhook:<name>`, never the
URL (its key is the credential), and the key in no log line. Two callback-mode replicas on the test Redis and
MariaDB; WeCom's APIs played by demo/wecom_api_standin.py at WECOM_API_BASE."""

from __future__ import annotations

import json
import logging
import random
import threading
import time

import httpx
import pytest
import redis

from bench.faults.proxy import FaultyLink
from config.settings import WECOM_API
from demo.replicas import free_port
from demo.wecom_api_standin import APP_PER_MEMBER_MINUTE, PER_MINUTE, WeComApiStandIn
from services.push import direct
from services.push.webhooks import WebhookMessage, WebhookPushes
from services.redis_conn import connect_redis
from services.replication import Replication
from tests import test_audit
from tests.conftest import KEYS, wait_until
from tests.test_admin import sign_in
from tests.test_audit import rows

TOKEN = "push-token-for-the-webhook-tests-01"
ADMIN_TOKEN = "admin-token-for-the-push-tests-0123"
KEY, OTHER = "ops-robot-key-0123456789", "sales-robot-key-9876543210"
audit_url, engine = test_audit.audit_url, test_audit.engine  # the audit database's fixtures


@pytest.fixture
def wecom_api():
    standin = WeComApiStandIn(keys=(KEY, OTHER)).start()
    yield standin
    standin.stop()


@pytest.fixture
def replicas(make_pair, wecom_api, audit_url, engine):
    # the URLs as a group's "add robot" gives them: WeCom's own, moved to the stand-in by WECOM_API_BASE
    webhooks = {"ops": f"{WECOM_API}/cgi-bin/webhook/send?key={KEY}", "sales": wecom_api.webhook_url(OTHER)}
    return make_pair(
        push_api_token=TOKEN,
        wecom_webhooks=json.dumps(webhooks),
        wecom_api_base=wecom_api.url,
        database_url=audit_url,
        admin_token=ADMIN_TOKEN,
    )


def push(replica, body: dict, key: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {TOKEN}", **({"Idempotency-Key": key} if key else {})}
    return httpx.post(f"{replica.url}/api/push", json={"bot": "default", **body}, headers=headers, timeout=15)


def status(replica, push_id: str) -> dict:
    reply = httpx.get(f"{replica.url}/api/push/{push_id}", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5)
    return reply.json()


def test_a_callback_bot_pushes_text_with_mentions_and_markdown_once(replicas, wecom_api, engine, caplog):
    a, b = replicas
    caplog.set_level(logging.INFO)
    said = push(a, {"webhook": "ops", "text": "服务器 CPU 告警", "mentioned_list": ["zhangsan", "@all"]})
    assert said.status_code == 200 and said.json()["status"] == "sent"
    shown = push(b, {"webhook": "sales", "markdown": "**日报** 已生成"})
    assert shown.json()["status"] == "sent"
    assert wecom_api.to(KEY) == [
        {"msgtype": "text", "text": {"content": "服务器 CPU 告警", "mentioned_list": ["zhangsan", "@all"]}}
    ]
    assert wecom_api.to(OTHER) == [{"msgtype": "markdown", "markdown": {"content": "**日报** 已生成"}}]
    assert status(b, said.json()["id"]) == {"id": said.json()["id"], "status": "sent"}
    assert wait_until(lambda: len(rows(engine, kind="push")) == 2, timeout=10)
    by_target = {row["chatid"]: row for row in rows(engine, kind="push")}
    assert by_target["webhook:ops"]["answer"] == "服务器 CPU 告警" and by_target["webhook:ops"]["outcome"] == "sent"
    assert by_target["webhook:sales"]["msgtype"] == "markdown"
    logged = caplog.text + json.dumps([dict(row) for row in rows(engine)], default=str)
    assert KEY not in logged and OTHER not in logged
    # and the operator's page lists them, each with its status
    page = sign_in(b.url, token=ADMIN_TOKEN).get("/admin/pushes").text
    assert page.count("<td>sent") == 2 and "webhook:ops" in page and KEY not in page


def test_the_idempotency_key_sends_once_across_replicas(replicas, wecom_api):
    a, b = replicas
    first = push(a, {"webhook": "ops", "markdown": "周报"}, key="weekly-47")
    again = push(b, {"webhook": "ops", "markdown": "周报"}, key="weekly-47")
    assert first.json()["id"] == again.json()["id"] and again.json() == {**first.json(), "repeated": True}
    assert len(wecom_api.to(KEY)) == 1


def test_wecoms_limit_a_minute_holds_across_replicas(replicas, wecom_api):
    a, b = replicas
    for number in range(PER_MINUTE):
        assert push((a, b)[number % 2], {"webhook": "ops", "text": f"alert {number}"}).json()["status"] == "sent"
    refused = push(a, {"webhook": "ops", "text": "one too many"})
    assert refused.status_code == 429 and 1 <= int(refused.headers["retry-after"]) <= 60
    assert len(wecom_api.to(KEY)) == PER_MINUTE  # refused before it went out: WeCom never said 45009
    assert push(b, {"webhook": "sales", "text": "another robot"}).json()["status"] == "sent"  # each its own minute


def test_a_lost_reply_is_unknown_and_never_sent_again(replicas, wecom_api):
    a, b = replicas
    wecom_api.lose_replies = 1
    lost = push(a, {"webhook": "ops", "text": "did it arrive?"}, key="job-1")
    assert lost.status_code == 200 and lost.json()["status"] == "unknown" and "not sent again" in lost.json()["error"]
    assert push(b, {"webhook": "ops", "text": "did it arrive?"}, key="job-1").json()["status"] == "unknown"
    assert status(b, lost.json()["id"])["status"] == "unknown"
    assert len(wecom_api.to(KEY)) == 1  # WeCom has it once


def test_wecoms_refusals_and_bad_requests_send_nothing(replicas, wecom_api, make_pair):
    a, _ = replicas
    wecom_api.keys.discard(OTHER)  # the robot was removed from its group
    gone = push(a, {"webhook": "sales", "text": "hello"})
    assert gone.json()["status"] == "failed" and gone.json()["error"] == "the webhook is invalid or removed"
    assert push(a, {"webhook": "nope", "text": "x"}).status_code == 404
    for body in (
        {"webhook": "ops"},
        {"webhook": "ops", "text": "x", "markdown": "y"},
        {"webhook": "ops", "markdown": "x", "mentioned_list": ["a"]},
        {"webhook": "ops", "text": "x" * 2049},
        {"webhook": "ops", "text": "x", "mentioned_list": "zhangsan"},
    ):
        assert push(a, body).status_code == 400, body
    assert wecom_api.to(KEY) == []
    # a bot that names no webhook cannot be pushed to one
    plain, _ = make_pair(push_api_token=TOKEN)
    assert push(plain, {"webhook": "ops", "text": "x"}).status_code == 409


def test_a_bad_webhook_setting_is_one_line_at_start_up(settings):
    from config.settings import SettingsError

    with pytest.raises(SettingsError) as raised:
        settings.replace(wecom_webhooks='{"ops": "https://qyapi.weixin.qq.com/cgi-bin/webhook/send"}')
    assert raised.value.problems == ["WECOM_WEBHOOKS gives 'ops' no group robot's URL (one with its key=)"]
    with pytest.raises(SettingsError) as raised:
        settings.replace(wecom_app_corp_id=CORP)
    assert raised.value.problems == [
        "WECOM_APP_CORP_ID, WECOM_APP_AGENT_ID and WECOM_APP_SECRET go together (the self-built app's corp id, "
        "agent id and secret)"
    ]


# --- users, departments and tags through the bot's self-built app ----------------------------------------------------

CORP, AGENT, APP_SECRET = "ww-corp-7", 1000002, "app-secret-for-the-tests-0123"


@pytest.fixture
def app_api():
    standin = WeComApiStandIn(app=(CORP, APP_SECRET)).start()
    yield standin
    standin.stop()


@pytest.fixture
def app_replicas(make_pair, app_api, audit_url, engine):
    app = {"wecom_app_corp_id": CORP, "wecom_app_agent_id": AGENT, "wecom_app_secret": APP_SECRET}
    return make_pair(push_api_token=TOKEN, wecom_api_base=app_api.url, database_url=audit_url, **app)


def test_the_app_reaches_users_departments_and_tags_with_one_token_for_every_replica(app_replicas, app_api, engine):
    a, b = app_replicas
    for number, replica in enumerate((a, b, a, b)):
        reply = push(replica, {"touser": "zhangsan|lisi", "toparty": "2", "markdown": f"**日报** {number}"})
        assert reply.status_code == 200 and reply.json()["status"] == "sent", reply.json()
    assert app_api.token_fetches == 1  # fetched once, shared by both replicas
    assert [body["markdown"]["content"] for body in app_api.app_sent] == [f"**日报** {n}" for n in range(4)]
    first = app_api.app_sent[0]
    assert (first["touser"], first["toparty"], first["agentid"], first["msgtype"]) == (
        "zhangsan|lisi",
        "2",
        AGENT,
        "markdown",
    )
    assert wait_until(lambda: len(rows(engine, kind="push")) == 4, timeout=10)
    assert {row["chatid"] for row in rows(engine, kind="push")} == {"user:zhangsan|lisi party:2"}


def test_an_expired_token_is_fetched_again_once_and_the_message_sent_once(app_replicas, app_api):
    a, b = app_replicas
    assert push(a, {"touser": "zhangsan", "markdown": "one"}).json()["status"] == "sent"
    app_api.expire_token()
    assert push(b, {"touser": "zhangsan", "markdown": "two"}).json()["status"] == "sent"
    assert push(a, {"touser": "zhangsan", "markdown": "three"}).json()["status"] == "sent"
    assert app_api.token_fetches == 2 and [m["markdown"]["content"] for m in app_api.app_sent] == [
        "one",
        "two",
        "three",
    ]


def test_wecoms_limits_per_member_hold_across_replicas_before_it_drops_a_copy(app_replicas, app_api, redis_client):
    """WeCom drops, without an error, an app's 31st message of a minute to one member (and its 1,001st of an hour):
    the gateway counts them across replicas and answers 429 with Retry-After instead, sending nothing."""
    a, b = app_replicas
    for number in range(APP_PER_MEMBER_MINUTE):
        reply = push((a, b)[number % 2], {"touser": "zhangsan", "markdown": f"告警 {number}"})
        assert reply.json()["status"] == "sent", reply.json()
    refused = push(a, {"touser": "zhangsan|lisi", "markdown": "one too many for zhangsan"}, key="alert-31")
    assert refused.status_code == 429 and 1 <= int(refused.headers["retry-after"]) <= 60
    assert refused.json()["error"] == "quota_exceeded"
    assert push(b, {"touser": "lisi", "markdown": "lisi has room"}).json()["status"] == "sent"
    assert push(b, {"toparty": "2", "markdown": "a department counts as one member"}).json()["status"] == "sent"
    assert len(app_api.app_sent) == APP_PER_MEMBER_MINUTE + 2 and app_api.app_dropped == []
    # an hour's thousand, sent two minutes ago: the next is refused until the oldest is an hour old
    hour = KEYS.app_sends(CORP, AGENT, "user:wangwu")
    then = time.time() - 120
    redis_client.zadd(hour, {f"earlier-{n}": then + n / 1000 for n in range(1000)})
    redis_client.expire(hour, 3600)
    late = push(a, {"touser": "wangwu", "markdown": "the hour is full"})
    assert late.status_code == 429 and 3470 <= int(late.headers["retry-after"]) <= 3481
    # the refused key is free again: once zhangsan's minute has room, the retry sends it
    redis_client.delete(KEYS.app_sends(CORP, AGENT, "user:zhangsan"))
    retried = push(a, {"touser": "zhangsan|lisi", "markdown": "one too many for zhangsan"}, key="alert-31")
    assert retried.json()["status"] == "sent" and len(app_api.app_sent) == APP_PER_MEMBER_MINUTE + 3


def test_targets_wecom_does_not_know_make_a_push_partial_and_a_lost_reply_unknown(app_replicas, app_api):
    a, b = app_replicas
    app_api.unknown_targets = {"ghost", "99"}
    partial = push(a, {"touser": "zhangsan|ghost", "toparty": "99", "markdown": "hi"}).json()
    assert partial["status"] == "partial" and partial["error"] == "WeCom does not know users ghost, departments 99"
    assert status(b, partial["id"])["status"] == "partial"
    app_api.lose_replies = 1
    lost = push(a, {"touser": "zhangsan", "markdown": "did it arrive?"}, key="job-9").json()
    again = push(b, {"touser": "zhangsan", "markdown": "did it arrive?"}, key="job-9").json()
    assert lost["status"] == again["status"] == "unknown" and again["repeated"]
    assert len(app_api.app_sent) == 2  # the partial one, and the lost reply's once


def test_a_wrong_app_secret_fails_the_push_and_sends_nothing(make_pair, app_api):
    a, _ = make_pair(
        push_api_token=TOKEN,
        wecom_api_base=app_api.url,
        wecom_app_corp_id=CORP,
        wecom_app_agent_id=AGENT,
        wecom_app_secret="not-the-apps-secret-0000",
    )
    failed = push(a, {"touser": "zhangsan", "markdown": "hi"}).json()
    assert failed["status"] == "failed" and "errcode 40001" in failed["error"]
    assert app_api.app_sent == []
    assert push(a, {"touser": "", "markdown": "hi"}).status_code == 400
    plain, _ = make_pair(push_api_token=TOKEN)
    assert push(plain, {"touser": "zhangsan", "markdown": "hi"}).status_code == 409


def test_a_retry_after_a_request_that_failed_before_sending_sends_it_once(replicas, wecom_api, redis_client):
    """The first request took its Idempotency-Key, then Redis failed before the push was opened (503): nothing
    went out, so the retry sends it, under the first id, once; a third request finds it sent."""
    a, b = replicas
    redis_client.set(KEYS.push_idempotency("nightly-3"), "first-push-id", ex=3600)
    retried = push(a, {"webhook": "ops", "text": "nightly report"}, key="nightly-3").json()
    assert retried["id"] == "first-push-id" and retried["status"] == "sent"
    assert push(b, {"webhook": "ops", "text": "nightly report"}, key="nightly-3").json()["repeated"]
    assert len(wecom_api.to(KEY)) == 1


def test_a_push_wecom_could_not_be_reached_for_sent_nothing_and_its_retry_sends_it_once(make_pair, audit_url, engine):
    """WeCom's API cannot be reached: the push fails and says it sent nothing. A retry with its Idempotency-Key, on
    the other replica once WeCom answers, sends it under the first id, once; a third request is a repeat. The
    audit trail keeps one row of it, sent (it replaces the failed one)."""
    port = free_port()  # nothing listens there yet
    a, b = make_pair(
        push_api_token=TOKEN,
        wecom_webhooks=json.dumps({"ops": f"{WECOM_API}/cgi-bin/webhook/send?key={KEY}"}),
        wecom_api_base=f"http://127.0.0.1:{port}",
        database_url=audit_url,
    )
    failed = push(a, {"webhook": "ops", "markdown": "the nightly report"}, key="nightly-5").json()
    assert failed["status"] == "failed" and failed["sent_nothing"] is True and failed["error"] == direct.UNREACHED
    assert status(b, failed["id"]) == {
        "id": failed["id"],
        "status": "failed",
        "error": direct.UNREACHED,
        "sent_nothing": True,
    }
    wecom_api = WeComApiStandIn(keys=(KEY,), port=port).start()
    try:
        sent = push(b, {"webhook": "ops", "markdown": "the nightly report"}, key="nightly-5").json()
        assert sent == {"id": failed["id"], "status": "sent"}
        assert push(a, {"webhook": "ops", "markdown": "the nightly report"}, key="nightly-5").json()["repeated"]
        assert len(wecom_api.to(KEY)) == 1
    finally:
        wecom_api.stop()

    def outcomes() -> list[str]:
        return [r["outcome"] for r in rows(engine, kind="push")]

    assert wait_until(lambda: outcomes() == ["sent"], timeout=10), outcomes()


@pytest.fixture
def linked(redis_url):
    """A link the test faults, in front of the test Redis, and a client through it: (the link, the client)."""
    link = FaultyLink(int(redis_url.rsplit(":", 1)[1].split("/")[0])).start()
    client = connect_redis(f"redis://127.0.0.1:{link.port}/15")
    yield link, client
    client.close()
    link.stop()


def webhook_pushes(client: redis.Redis, wecom_api: WeComApiStandIn, http: httpx.Client, owner: str = "r"):
    """The `ops` robot's pushes, made with `client`, as a process named `owner` makes them."""
    return WebhookPushes("default", Replication(client), KEYS, {"ops": wecom_api.webhook_url(KEY)}, None, owner, http)


def test_an_opening_whose_reply_was_lost_is_undone_and_the_retry_sends_once(wecom_api, linked, redis_client):
    """Redis ran the push's opening and its reply was lost (every try of it, a reset each time): the request fails
    before sending (503 at the API). It undoes its own opening on a connection that answers, so the retry with its
    key sends the push, under the first id, once; not `sending` until it reads `unknown`."""
    link, client = linked
    with httpx.Client() as http:
        pushes = webhook_pushes(client, wecom_api, http)
        link.lose_replies(1.0, random.Random(1), to=b"HSETNX")  # (only the opening's script carries it)
        with pytest.raises(redis.RedisError):
            pushes.push("ops", WebhookMessage("the nightly report", markdown=True), "nightly-4")
        link.heal()
        assert wecom_api.to(KEY) == []
        first = redis_client.get(KEYS.push_idempotency("nightly-4"))
        assert first and not redis_client.exists(KEYS.direct_push(first))  # the key kept, its opening undone
        push_id, found, new = pushes.push("ops", WebhookMessage("the nightly report", markdown=True), "nightly-4")
        assert (push_id, found["status"], new) == (first, "sent", True)
        assert pushes.push("ops", WebhookMessage("again", markdown=True), "nightly-4")[1:] == (
            {"status": "sent"},
            False,
        )
    assert len(wecom_api.to(KEY)) == 1


def test_an_opening_redis_kept_while_away_for_its_undo_is_sent_by_a_retry_in_its_process_once(
    wecom_api, linked, redis_client
):
    """Redis ran the push's opening and lost its reply, then was away for the undo (a scheduled tick's push met
    this in a campaign: its retry found the push `sending`, and the tick said `unknown` for a push that never went
    out). The record stays `sending`; a retry in the same process, which knows nothing went out, opens it again as
    its own and sends it once; another process finds it `sending`, never sends it, and neither does a third try."""
    link, client = linked
    with httpx.Client() as http:
        pushes, elsewhere = webhook_pushes(client, wecom_api, http), webhook_pushes(redis_client, wecom_api, http, "s")
        undo = pushes._undo_opening

        def undo_while_redis_is_away(keys, args):
            link.partition()
            return undo(keys, args)

        pushes._undo_opening = undo_while_redis_is_away
        link.lose_replies(1.0, random.Random(1), to=b"HSETNX")
        with pytest.raises(redis.RedisError):
            pushes.push("ops", WebhookMessage("the nightly report", markdown=True), "nightly-6")
        link.heal()
        pushes._undo_opening = undo
        first = redis_client.get(KEYS.push_idempotency("nightly-6"))
        assert redis_client.hget(KEYS.direct_push(first), "status") == "sending" and wecom_api.to(KEY) == []
        assert elsewhere.push("ops", WebhookMessage("the nightly report", markdown=True), "nightly-6")[1:] == (
            {"status": "sending"},
            False,
        )
        push_id, found, new = pushes.push("ops", WebhookMessage("the nightly report", markdown=True), "nightly-6")
        assert (push_id, found["status"], new) == (first, "sent", True)
        again = pushes.push("ops", WebhookMessage("again", markdown=True), "nightly-6")
        assert again[1:] == ({"status": "sent"}, False)
    assert len(wecom_api.to(KEY)) == 1


def test_a_push_that_went_out_as_redis_went_away_still_records_its_status(wecom_api, linked, redis_client):
    """The push went out, then Redis lost the replies to what follows the send (its sends counted from WeCom's
    reply; seed 63 met it): the push still says `sent`, once Redis answers, and its record (with its audit row) says
    so, where it used to fail with 503, its record left `sending` until it read `unknown`, "the process sending it
    stopped", and no audit row."""
    link, client = linked
    with httpx.Client() as http:
        pushes = webhook_pushes(client, wecom_api, http)
        pushes.push("ops", WebhookMessage("a first push, its scripts loaded", markdown=True), "nightly-7")
        link.lose_replies(1.0, random.Random(1), to=b"ZADD")  # (only the counting after the send carries it)
        healing = threading.Timer(1.0, link.heal)
        healing.start()
        push_id, found, new = pushes.push("ops", WebhookMessage("the nightly report", markdown=True), "nightly-8")
        healing.join()
        assert (found, new) == ({"status": "sent"}, True)
        assert redis_client.hget(KEYS.direct_push(push_id), "status") == "sent"
    assert [body["markdown"]["content"] for body in wecom_api.to(KEY)][1:] == ["the nightly report"]


def test_a_push_whose_sender_died_mid_send_reads_unknown(replicas, redis_client):
    """A push opened and never closed (its replica died mid-send) reads `sending`, then, once older than any send
    could take, `unknown`: it is never sent again."""
    a, _ = replicas
    redis_client.hset(KEYS.direct_push("dead-send"), mapping={"status": "sending", "created_at": f"{time.time():.3f}"})
    redis_client.expire(KEYS.direct_push("dead-send"), 3600)
    assert status(a, "dead-send")["status"] == "sending"
    redis_client.hset(
        KEYS.direct_push("dead-send"), "created_at", f"{time.time() - direct.SENDING_STALE_SECONDS - 1:.3f}"
    )
    found = status(a, "dead-send")
    assert found["status"] == "unknown" and "stopped" in found["error"]
