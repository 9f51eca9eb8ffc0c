"""The Dify client against the stand-in over real sockets: events, framing, and every way a call fails."""

import threading
import time

import pytest

from config.settings import DifySettings
from demo import dify_standin as d
from demo.dify_standin import DifyStandIn
from services.dify.client import ChatRequest, DifyClient
from services.dify.events import decode_event
from services.transport.errors import (
    BackendConnectionError,
    BackendHTTPError,
    BackendStreamCut,
    BackendStreamError,
    BackendTimeout,
)
from tests.conftest import DIFY_KEY


@pytest.fixture
def client(dify):
    client = DifyClient(
        DifySettings(base_url=dify.base_url, api_key=DIFY_KEY, read_timeout=1.0, max_retries=2, retry_backoff=0.01)
    )
    yield client
    client.close()


def run(client, query="hi"):
    """All events of one call, flattened, and the number of reads that carried any."""
    events = []
    for batch in client.stream_chat(ChatRequest(query=query, user="wecom:bot:alice")):
        events += batch
    return events


def answer_text(events):
    return "".join(e.answer for e in events if e.kind in ("message", "agent_message"))


def test_streams_deltas_and_ends_at_message_end(client, dify):
    dify.script([d.ping(), *d.answer("Hello there, WeCom!", delay=0.01)])
    events = run(client)
    assert answer_text(events) == "Hello there, WeCom!"
    assert events[-1].kind == "message_end"
    assert all(e.get("task_id") for e in events)


def test_a_relay_handles_plain_reads_in_the_read_pump_and_the_caller_gets_the_rest(client, dify):
    dify.script([d.message("first "), *d.answer("and the rest, piece by piece", pieces=6, delay=0.02)])
    # In the order they arrived: the pump relays only while the caller waits for its next batch. (What came in
    # with the response head reaches the caller without the relay, so either may come first.)
    arrived, relay_threads = [], set()

    def relay(batch):
        if not all(event.kind == "message" for event in batch):
            return False
        relay_threads.add(threading.current_thread().name)
        arrived.append(("relayed", batch))
        return True

    for batch in client.stream_chat(ChatRequest(query="q", user="wecom:bot:alice"), relay):
        arrived.append(("yielded", batch))
    relayed = [event for source, batch in arrived if source == "relayed" for event in batch]
    assert relay_threads == {"read-pump"}
    assert len(relayed) >= 5
    assert answer_text([event for _, batch in arrived for event in batch]) == "first and the rest, piece by piece"
    assert arrived[-1][0] == "yielded"
    assert arrived[-1][1][-1].kind == "message_end"  # the last read reaches the caller


def test_request_shape(client, dify):
    dify.conversations["0b6b3a1e-5a43-4c2e-9a39-5b7f0a6f2c11"] = "wecom:bot:bob"
    dify.script(d.answer("ok"))
    list(
        client.stream_chat(
            ChatRequest(
                query="q", user="wecom:bot:bob", inputs={"a": 1}, conversation_id="0b6b3a1e-5a43-4c2e-9a39-5b7f0a6f2c11"
            )
        )
    )
    [request] = dify.requests
    body = request["body"]
    assert request["headers"]["authorization"] == f"Bearer {DIFY_KEY}"
    assert body["response_mode"] == "streaming"
    assert body["user"] == "wecom:bot:bob"
    assert body["inputs"] == {"a": 1}
    assert body["query"] == "q"
    assert body["conversation_id"] == "0b6b3a1e-5a43-4c2e-9a39-5b7f0a6f2c11"


def test_json_and_utf8_split_across_network_reads(client, dify):
    dify.script(
        [
            d.split(d.message("你好，"), parts=7, gap=0.01),
            d.split(d.message("世界🌏"), parts=5),
            d.split(d.end(), parts=4),
        ]
    )
    assert answer_text(run(client)) == "你好，世界🌏"


def test_pings_between_deltas_are_ignored(client, dify):
    dify.script([d.ping(), d.message("a"), d.sleep(0.5), d.ping(), d.message("b"), d.end()])
    assert answer_text(run(client)) == "ab"


def test_agent_events_and_unknown_events(client, dify):
    dify.script(
        [
            d.thought(""),
            d.agent_message("step "),
            d.event("agent_log", data={}),
            d.event("brand_new_event_type", x=1),
            d.thought("done thinking"),
            d.agent_message("two"),
            d.end(),
        ]
    )
    events = run(client)
    assert answer_text(events) == "step two"
    assert "brand_new_event_type" in [e.kind for e in events]


def test_workflow_and_file_events_pass_through(client, dify):
    dify.script(
        [
            d.event("workflow_started", data={}),
            d.event("node_started", data={}),
            d.message("x"),
            d.message_file("https://dify.example/files/a.png"),
            d.workflow_finished("succeeded"),
            d.end(),
        ]
    )
    kinds = [e.kind for e in run(client)]
    # workflow_started (it names the run, and says when a resumed run starts over) and node events (a slow step
    # shows a status line) pass
    assert kinds == ["workflow_started", "node_started", "message", "message_file", "workflow_finished", "message_end"]


def test_garbage_frames_are_skipped(client, dify):
    dify.script(
        [d.raw(b"data: {not json\n\n"), d.raw(b"data: [1,2]\n\n"), d.raw(b"data: {}\n\n"), d.message("fine"), d.end()]
    )
    assert answer_text(run(client)) == "fine"


def test_error_event_raises_after_earlier_deltas(client, dify):
    dify.script([d.message("partial"), d.error("completion_request_error", "model failed", 400)])
    seen = []
    with pytest.raises(BackendStreamError) as caught:
        for batch in client.stream_chat(ChatRequest(query="q", user="u")):
            seen += batch
    assert answer_text(seen) == "partial"
    assert caught.value.code == "completion_request_error"
    assert caught.value.status == 400


def test_clean_close_without_message_end_is_a_cut(client, dify):
    dify.script([d.message("half"), d.close()])
    with pytest.raises(BackendStreamCut):
        run(client)


def test_connection_dropped_mid_stream_is_a_cut(client, dify):
    dify.script([d.message("half"), d.sleep(0.05), d.cut()])
    with pytest.raises(BackendStreamCut):
        run(client)


def test_read_stall_is_a_timeout(client, dify):
    dify.script([d.message("x"), d.stall(3)])
    started = time.monotonic()
    with pytest.raises(BackendTimeout):
        run(client)
    assert time.monotonic() - started < 2.5


def test_slow_first_byte_past_read_timeout(client, dify):
    dify.script([d.first_byte_delay(2.5), *d.answer("late")])
    with pytest.raises(BackendTimeout):
        run(client)


@pytest.mark.parametrize(
    ("status", "code"),
    [(400, "invalid_param"), (401, "unauthorized"), (404, "not_found"), (500, "internal_server_error")],
)
def test_http_errors_are_not_retried_except_gateway_errors(client, dify, status, code):
    dify.script([d.http_error(status, code, "nope")], times=None)
    with pytest.raises(BackendHTTPError) as caught:
        run(client)
    assert caught.value.status == status
    assert caught.value.code == code
    assert len(dify.requests) == 1


@pytest.mark.parametrize("status", [429, 503])
def test_refusals_are_retried_then_raised(client, dify, status):
    dify.script([d.http_error(status, "too_many_requests" if status == 429 else "unavailable")], times=None)
    with pytest.raises(BackendHTTPError) as caught:
        run(client)
    assert caught.value.status == status
    assert len(dify.requests) == 3


@pytest.mark.parametrize("status", [502, 504])
def test_a_chat_behind_a_gateway_error_is_not_sent_again(client, dify, status):
    """A proxy's 502/504 may come after Dify took the request: sending it again could make a second answer."""
    dify.script([d.http_error(status, "bad_gateway")], times=None)
    with pytest.raises(BackendHTTPError) as caught:
        run(client)
    assert caught.value.status == status
    assert len(dify.requests) == 1


def test_a_chat_whose_connection_ends_before_the_answer_is_not_sent_again(client, dify):
    """The whole request went out and the connection closed before any answer: Dify may be answering it."""
    dify.script([d.drop()], times=None)
    with pytest.raises(BackendConnectionError) as caught:
        run(client)
    assert caught.value.request_sent
    assert len(dify.requests) == 1


def test_retry_succeeds_after_a_429(client, dify):
    dify.script([d.http_error(429, "too_many_requests")])
    dify.script(d.answer("second time lucky"))
    assert answer_text(run(client)) == "second time lucky"
    assert len(dify.requests) == 2


def test_wrong_api_key_is_401(dify):
    bad = DifyClient(DifySettings(base_url=dify.base_url, api_key="app-wrong", read_timeout=1.0))
    with pytest.raises(BackendHTTPError) as caught:
        run(bad)
    assert caught.value.status == 401
    bad.close()


def test_non_json_error_body_from_a_proxy(client, dify):
    async def proxy(request, conn):
        await conn.send(502, "<html>Bad Gateway</html>", content_type="text/html")

    from demo.http_server import StandInServer

    server = StandInServer(proxy).start()
    try:
        proxied = DifyClient(DifySettings(base_url=server.url + "/v1", api_key="k", max_retries=0))
        with pytest.raises(BackendHTTPError) as caught:
            run(proxied)
        assert caught.value.status == 502
        assert "Bad Gateway" in caught.value.message
        proxied.close()
    finally:
        server.stop()


def test_unreachable_dify_is_a_connection_error():
    dead = DifyClient(
        DifySettings(
            base_url="http://127.0.0.1:9/v1", api_key="k", connect_timeout=0.5, max_retries=1, retry_backoff=0.01
        )
    )
    with pytest.raises(BackendConnectionError):
        run(dead)
    dead.close()


def test_stop_is_sent_with_the_same_user(client, dify):
    client.stop("task-1", "wecom:bot:alice")
    assert dify.stops == [("task-1", {"user": "wecom:bot:alice"})]


def test_decode_event_rules():
    assert decode_event("ping", "") is None
    assert decode_event("message", "") is None
    assert decode_event("message", "nope") is None
    assert decode_event("message", '"string"') is None
    assert decode_event("message", "{}") is None
    assert decode_event("message", '{"event": "message", "answer": "x"}').answer == "x"
    assert decode_event("custom", '{"a": 1}').kind == "custom"


def test_unknown_conversation_is_404(client, dify):
    request = ChatRequest(query="q", user="u", conversation_id="0b6b3a1e-5a43-4c2e-9a39-5b7f0a6f2c11")
    with pytest.raises(BackendHTTPError) as caught:
        list(client.stream_chat(request))
    assert caught.value.status == 404
    assert caught.value.message == "Conversation Not Exists."


def test_upload_and_feedback(client, dify):
    file_id = client.upload_file(b"\x89PNG\r\n\x1a\n" + b"0" * 100, "photo.png", "image/png", "wecom:bot:alice")
    assert dify.uploads[file_id]["name"] == "photo.png"
    assert dify.uploads[file_id]["user"] == "wecom:bot:alice"
    dify.blocked_extensions = {"exe"}  # Dify's UPLOAD_FILE_EXTENSION_BLACKLIST
    with pytest.raises(BackendHTTPError) as caught:
        client.upload_file(b"MZ...", "tool.exe", "application/octet-stream", "wecom:bot:alice")
    assert (caught.value.status, caught.value.code) == (400, "file_extension_blocked")

    dify.script(d.answer("ok"))
    events = run(client)
    message_id = events[-1].get("message_id")
    # the feedback's user must be the one who got the message
    with pytest.raises(BackendHTTPError):
        client.feedback(message_id, "like", "someone-else")
    client.feedback(message_id, "like", "wecom:bot:alice")
    assert dify.feedbacks == [(message_id, {"rating": "like", "user": "wecom:bot:alice", "content": ""})]


def test_parameters(client, dify):
    assert client.parameters()["file_upload"]["image"]["enabled"] is True


def test_the_streaming_call_over_https_verifies_the_server(tls):
    """The streaming call's own client (services/transport) over TLS: certificate and host name checked,
    JSON split across TLS records, pings, a stream; the side endpoints (httpx) trust the same CA."""
    server = DifyStandIn(api_key=DIFY_KEY, ping_interval=0.05, tls=tls.server_context()).start()
    try:
        assert server.base_url.startswith("https://127.0.0.1:")
        server.script([d.ping(), d.split(d.message("加密的"), parts=5), d.sleep(0.12), *d.answer(" answer")])
        client = DifyClient(
            DifySettings(base_url=server.base_url, api_key=DIFY_KEY, read_timeout=2.0), tls=tls.client_context()
        )
        assert answer_text(run(client)) == "加密的 answer"
        assert client.parameters()["file_upload"]
        client.close()
        untrusting = DifyClient(
            DifySettings(base_url=server.base_url, api_key=DIFY_KEY, read_timeout=2.0, max_retries=0)
        )
        with pytest.raises(BackendConnectionError):
            run(untrusting)  # the system's CAs do not know the private one
        untrusting.close()
    finally:
        server.stop()
