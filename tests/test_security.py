"""Security behaviour: per-user rate limits shared across replicas, identical requests never processed twice,
and nothing secret in any error body."""

import pytest

from demo import dify_standin as d
from services.texts import CATALOGUE
from tests.conftest import AES_KEY, DIFY_KEY, KEYS, TOKEN, make_simulator, wait_idle

ZH = CATALOGUE["zh"]


def test_the_rate_limit_is_per_user_and_shared_across_replicas(make_pair, dify, redis_client):
    limited_pair = make_pair(rate_limit_per_minute=4)
    sim = make_simulator([r.url for r in limited_pair])
    dify.script(d.answer("ok"), times=None)
    payloads = [sim.text_message(f"q{i}", userid="eager") for i in range(5)]
    answers = [sim.follow(sim.send(p, replica=i % 2), userid="eager").text for i, p in enumerate(payloads[:4])]
    assert answers == ["ok"] * 4
    refused = sim.send(payloads[4], replica=1)
    assert refused["stream"]["finish"] is True
    assert refused["stream"]["content"] == ZH["rate_limited"]
    assert len(dify.chat_requests()) == 4
    retry = sim.send(payloads[0], replica=0)  # a WeCom retry of an answered message is never limited
    assert retry["stream"]["content"] == "ok"
    assert sim.ask("me too", userid="calm").text == "ok"  # other users are not affected
    rate_log = KEYS.rate("demo-bot", "eager")
    assert redis_client.zcard(rate_log) == 4  # the refused message is not counted
    assert 0 < redis_client.ttl(rate_log) <= 60
    sim.close()


def test_a_replayed_identical_message_request_is_one_answer(live, simulator, dify):
    dify.script(d.answer("once"), times=None)
    query, body = simulator.envelope(simulator.text_message("replay me"))
    url = f"{live.url}/wecom/callback"
    replies = [
        simulator.open_reply(simulator.http.post(url, params=query, content=body).json(), query["nonce"])
        for _ in range(3)
    ]
    assert len({r["stream"]["id"] for r in replies}) == 1
    simulator.follow(replies[0])
    wait_idle(live)
    assert len(dify.chat_requests()) == 1


def test_a_replayed_feedback_event_is_forwarded_once(live, simulator, dify):
    dify.script(d.answer("rate me"))
    conversation = simulator.ask("question")
    query, body = simulator.envelope(
        simulator.event_message("feedback_event", {"id": conversation.stream_id, "type": 1})
    )
    url = f"{live.url}/wecom/callback"
    # the signature is hex: its upper-case spelling is the same request, and is a replay too
    for signature in (query["msg_signature"], query["msg_signature"], query["msg_signature"].upper()):
        response = simulator.http.post(url, params={**query, "msg_signature": signature}, content=body)
        assert response.status_code == 200
        assert response.content == b""
    live.gateway.bot().callback.events.feedback.close(
        wait=True
    )  # every forward the three requests started has finished
    assert len(dify.feedbacks) == 1


def test_a_replayed_enter_chat_gets_the_same_welcome(make_app, serve):
    live = serve(make_app(welcome_message="欢迎！"))
    sim = make_simulator(live.url)
    query, body = sim.envelope(sim.event_message("enter_chat"))
    replies = [
        sim.open_reply(sim.http.post(f"{live.url}/wecom/callback", params=query, content=body).json(), query["nonce"])
        for _ in range(2)
    ]
    assert replies[0] == replies[1] == {"msgtype": "text", "text": {"content": "欢迎！"}}
    sim.close()


@pytest.mark.parametrize("path", ["/wecom/callback", "/nope", "/readyz", "/metrics"])
def test_no_secret_in_any_response(client, path):
    for method in ("get", "post", "put"):
        text = getattr(client, method)(
            path, query_string={"msg_signature": "x", "timestamp": "1", "nonce": "n"}, data=b'{"encrypt": "AAAA"}'
        ).get_data(as_text=True)
        for secret in (TOKEN, AES_KEY, DIFY_KEY):
            assert secret not in text
