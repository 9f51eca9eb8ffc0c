"""The push API (POST /api/push, GET /api/push/<id>): a message sent once through the bot's long connection, by
whichever replica holds it, whichever took the request; Idempotency-Key; WeCom's per-chat limits across replicas
(429 on the API, the outbox waiting for its place); WeCom's refusals; every bad request answered with its status
and one JSON error, nothing sent. Two replicas on the test Redis, WeCom's WebSocket played by the stand-in."""

from __future__ import annotations

import logging
import time

import httpx
import pytest
import redis

from tests.conftest import KEYS, WS_BOT_ID, WS_BOT_SECRET, outbox_settled, wait_until

PUSH_TOKEN = "push-token-for-the-tests-0123456789"
BOT = "default"


@pytest.fixture
def deployment(make_pair, wecom_ws):
    """Two long-connection replicas with the push API, WeCom's server, and which replica holds the connection."""

    def start(**changes):
        wecom = wecom_ws({WS_BOT_ID: WS_BOT_SECRET})
        settings = dict(
            wecom_mode="long_connection",
            wecom_bot_id=WS_BOT_ID,
            wecom_bot_secret=WS_BOT_SECRET,
            wecom_ws_url=wecom.url,
            push_api_token=PUSH_TOKEN,
        )
        replicas = make_pair(**{**settings, **changes})
        assert wait_until(lambda: wecom.subscribed(WS_BOT_ID) == 1, timeout=10)
        assert wait_until(lambda: holder_of(replicas) is not None, timeout=10)
        return replicas, wecom

    return start


def holder_of(replicas):
    held = [r for r in replicas if r.gateway.bot().connection.holder.state == "holding"]
    return held[0] if held else None


def post(replica, body, token=PUSH_TOKEN, key=None, raw=None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    if key is not None:
        headers["Idempotency-Key"] = key
    if raw is not None:
        return httpx.post(f"{replica.url}/api/push", content=raw, headers=headers, timeout=5)
    return httpx.post(f"{replica.url}/api/push", json=body, headers=headers, timeout=5)


def status(replica, push_id, token=PUSH_TOKEN) -> httpx.Response:
    return httpx.get(f"{replica.url}/api/push/{push_id}", headers={"Authorization": f"Bearer {token}"}, timeout=5)


def sent_to(wecom, chat) -> list[str]:
    return [m["markdown"]["content"] for m in wecom.proactive if m["chatid"] == chat]


def test_a_push_taken_by_either_replica_is_sent_once_by_the_connection_holder(deployment, redis_client):
    replicas, wecom = deployment()
    other = next(r for r in replicas if r is not holder_of(replicas))
    answer = post(other, {"bot": BOT, "userid": "alice", "markdown": "**Reminder**: the review is at 3 pm"})
    assert answer.status_code == 202
    push_id = answer.json()["id"]
    assert status(other, push_id).json() == {"id": push_id, "status": "queued"}
    assert wait_until(lambda: sent_to(wecom, "alice"), timeout=10)
    [message] = [m for m in wecom.proactive if m["chatid"] == "alice"]
    assert message["chat_type"] == 1 and message["msgtype"] == "markdown"
    assert message["markdown"]["content"] == "**Reminder**: the review is at 3 pm"
    assert wait_until(lambda: status(other, push_id).json()["status"] == "sent", timeout=5)
    redis_client.set(KEYS.ws_outbox(push_id), "sent 0a1b2c3d4e5f", ex=60)  # as settled when its ack was lost
    assert status(other, push_id).json()["status"] == "sent"
    group = post(other, {"bot": BOT, "chatid": "group-9", "markdown": "to the group"})
    assert wait_until(lambda: sent_to(wecom, "group-9") == ["to the group"], timeout=10)
    assert [m["chat_type"] for m in wecom.proactive if m["chatid"] == "group-9"] == [2]
    assert status(replicas[0], group.json()["id"]).json()["status"] in ("queued", "sent")
    assert outbox_settled(redis_client, WS_BOT_ID)  # nothing goes out twice
    assert len(wecom.proactive) == 2


def test_the_same_idempotency_key_gives_the_same_id_and_one_message(deployment, redis_client):
    replicas, wecom = deployment()
    body = {"bot": BOT, "userid": "bob", "markdown": "once only"}
    first = post(replicas[0], body, key="job-42")
    second = post(replicas[1], body, key="job-42")
    assert (first.status_code, second.status_code) == (202, 200)
    assert first.json()["id"] == second.json()["id"]
    assert wait_until(lambda: sent_to(wecom, "bob"), timeout=10)
    third = post(replicas[1], body, key="job-42")  # after it went out, too
    assert third.status_code == 200 and third.json()["id"] == first.json()["id"]
    assert outbox_settled(redis_client, WS_BOT_ID)
    assert sent_to(wecom, "bob") == ["once only"]


def test_a_push_left_half_made_by_a_failure_is_made_whole_by_its_retry(deployment, monkeypatch):
    """The replica that took the request recorded the push's delivery fields, then failed before tracking it (a
    replica killed there, the fault campaign's race); the caller's retry with the same key, on the other replica,
    must not take the recorded fields for a tracked push."""
    replicas, wecom = deployment()

    def dies(stream_id):
        raise redis.ConnectionError("the replica died here")

    monkeypatch.setattr(replicas[0].gateway.bot().connection.pushes.outbox, "follow", dies)
    body = {"bot": BOT, "userid": "frank", "markdown": "made whole"}
    assert post(replicas[0], body, key="half").status_code == 503
    retried = post(replicas[1], body, key="half")
    assert retried.status_code == 200
    assert wait_until(lambda: sent_to(wecom, "frank") == ["made whole"], timeout=10)
    assert status(replicas[0], retried.json()["id"]).json()["status"] == "sent"


def test_a_push_is_sent_once_across_the_holders_death(deployment, redis_client):
    replicas, wecom = deployment()
    holder = holder_of(replicas)
    survivor = next(r for r in replicas if r is not holder)
    wecom.refuse_sends = []
    push_id = post(survivor, {"bot": BOT, "userid": "carol", "markdown": "across a holder change"}).json()["id"]
    holder.gateway.drain(0)  # the holder goes away; the other replica takes the connection and the outbox
    assert wait_until(lambda: holder_of([survivor]) is not None, timeout=10)
    assert wait_until(lambda: sent_to(wecom, "carol"), timeout=15)
    assert wait_until(lambda: status(survivor, push_id).json()["status"] == "sent", timeout=5)
    assert outbox_settled(redis_client, WS_BOT_ID)
    assert sent_to(wecom, "carol") == ["across a holder change"]


def test_over_wecoms_limit_for_a_chat_the_api_answers_429_across_replicas(deployment, redis_client):
    replicas, wecom = deployment(wecom_send_per_minute=2)
    body = {"bot": BOT, "chatid": "group-1", "markdown": "status update"}
    assert post(replicas[0], body).status_code == 202
    assert post(replicas[1], body).status_code == 202
    refused = post(replicas[0], body, key="third")
    assert refused.status_code == 429
    assert refused.json()["error"] == "quota_exceeded"
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    assert post(replicas[1], {**body, "chatid": "group-2"}).status_code == 202  # another chat has its own
    # The refused key stays free: the same request later is accepted.
    assert redis_client.get(KEYS.push_idempotency("third")) is None
    assert wait_until(lambda: len(wecom.proactive) == 3, timeout=10)


def test_the_outbox_waits_for_the_chats_place_and_drops_nothing(deployment, redis_client):
    replicas, wecom = deployment(wecom_send_per_minute=2)
    window = KEYS.ws_sends("dave")
    now = time.time()
    redis_client.zadd(window, {"earlier-1": now, "earlier-2": now})  # two messages went to dave this minute
    push_id = post(replicas[0], {"bot": BOT, "userid": "dave", "markdown": "waits its turn"}).json()["id"]
    time.sleep(5)  # a bounded look: two outbox passes
    assert sent_to(wecom, "dave") == []
    assert status(replicas[1], push_id).json()["status"] == "queued"
    redis_client.zrem(window, "earlier-1", "earlier-2")  # the minute has passed
    assert wait_until(lambda: sent_to(wecom, "dave") == ["waits its turn"], timeout=10)


def test_a_command_conflict_is_tried_again_after_a_back_off(deployment):
    replicas, wecom = deployment()
    wecom.refuse_sends = [6000]
    push_id = post(replicas[0], {"bot": BOT, "userid": "erin", "markdown": "after the conflict"}).json()["id"]
    assert wait_until(lambda: wecom.refused_sends, timeout=10)
    assert wait_until(lambda: sent_to(wecom, "erin") == ["after the conflict"], timeout=15)
    assert status(replicas[1], push_id).json()["status"] == "sent"


def test_a_push_wecom_keeps_refusing_is_given_up_as_failed(deployment, redis_client):
    replicas, wecom = deployment()
    wecom.refuse_sends = [93006, 93006, 93006]
    push_id = post(replicas[0], {"bot": BOT, "chatid": "no-such-chat", "markdown": "nobody"}).json()["id"]
    assert wait_until(lambda: status(replicas[1], push_id).json()["status"] == "failed", timeout=20)
    assert "93006" in status(replicas[1], push_id).json()["error"]
    assert outbox_settled(redis_client, WS_BOT_ID)  # given up, not tried again
    assert len(wecom.refused_sends) == 3 and wecom.proactive == []


@pytest.mark.parametrize(
    ("body", "token", "code", "error"),
    [
        ({"bot": BOT, "userid": "a", "markdown": "x"}, None, 401, "unauthorized"),
        ({"bot": BOT, "userid": "a", "markdown": "x"}, "wrong-token-0123456789", 401, "unauthorized"),
        ({"bot": "nobody", "userid": "a", "markdown": "x"}, PUSH_TOKEN, 404, "unknown_bot"),
        ({"bot": BOT, "markdown": "x"}, PUSH_TOKEN, 400, "bad_request"),
        ({"bot": BOT, "userid": "a", "chatid": "g", "markdown": "x"}, PUSH_TOKEN, 400, "bad_request"),
        ({"bot": BOT, "userid": "a", "markdown": "  "}, PUSH_TOKEN, 400, "bad_request"),
        ({"bot": BOT, "userid": "a", "markdown": "长" * 7000}, PUSH_TOKEN, 400, "bad_request"),
        ({"bot": BOT, "userid": 7, "markdown": "x"}, PUSH_TOKEN, 400, "bad_request"),
        ({"userid": "a", "markdown": "x"}, PUSH_TOKEN, 400, "bad_request"),
        (["not", "an", "object"], PUSH_TOKEN, 400, "bad_request"),
    ],
)
def test_bad_requests_get_their_status_and_one_json_error_and_nothing_is_sent(
    deployment, caplog, body, token, code, error
):
    replicas, wecom = deployment()
    caplog.set_level(logging.DEBUG)
    answer = post(replicas[0], body, token=token)
    assert answer.status_code == code
    assert answer.json()["error"] == error and answer.json()["message"]
    assert status(replicas[0], "anything", token="wrong-token-0123456789").status_code == 401
    assert status(replicas[0], "no-such-push").status_code == 404
    time.sleep(0.5)
    assert wecom.proactive == []
    assert PUSH_TOKEN not in caplog.text and "wrong-token" not in caplog.text


def test_a_body_that_is_not_json_is_400(deployment):
    replicas, _ = deployment()
    answer = post(replicas[0], None, raw=b"{not json")
    assert (answer.status_code, answer.json()["error"]) == (400, "bad_request")


def test_a_callback_mode_bot_answers_409(make_app, serve):
    replica = serve(make_app(push_api_token=PUSH_TOKEN))
    answer = post(replica, {"bot": BOT, "userid": "a", "markdown": "x"})
    assert (answer.status_code, answer.json()["error"]) == (409, "not_long_connection")


def test_without_a_push_api_token_there_is_no_push_api(make_app, serve):
    replica = serve(make_app())
    answer = post(replica, {"bot": BOT, "userid": "a", "markdown": "x"})
    assert answer.status_code == 404
    assert answer.json()["error"] == "not_found"
