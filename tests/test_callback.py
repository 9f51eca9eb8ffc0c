"""The callback endpoint: URL verification, and every kind of bad input answered with a 4xx JSON error."""

import base64
import io
import logging
import struct
import time
from urllib.parse import urlencode

import orjson
import pytest
from werkzeug.test import EnvironBuilder

from services.gateway import VERSION_ASKED_EVERY_SECONDS
from services.texts import CATALOGUE
from services.wecom.crypto import WeComCrypto, pad32
from tests.conftest import AES_KEY, TOKEN, make_simulator

PATH = "/wecom/callback"


@pytest.fixture
def sim():
    simulator = make_simulator("http://unused")
    yield simulator
    simulator.close()


def post(client, query, body, **kwargs):
    return client.post(PATH, query_string=query, data=body, content_type="application/json", **kwargs)


def assert_error(response, status, error):
    assert response.status_code == status, response.get_data(as_text=True)
    body = response.get_json()
    assert body["error"] == error
    assert isinstance(body["message"], str)
    assert body["message"]
    assert set(body) == {"error", "message"}


def test_url_verification_echoes_the_plaintext(client, sim):
    echostr = sim.crypto.encrypt("echo-1234567")
    timestamp, nonce = str(int(time.time())), "n1"
    response = client.get(
        PATH,
        query_string={
            "msg_signature": sim.crypto.sign(timestamp, nonce, echostr),
            "timestamp": timestamp,
            "nonce": nonce,
            "echostr": echostr,
        },
    )
    assert response.status_code == 200
    assert response.data == b"echo-1234567"
    assert response.mimetype == "text/plain"


def test_url_verification_with_a_bad_signature(client, sim):
    echostr = sim.crypto.encrypt("echo")
    response = client.get(
        PATH,
        query_string={"msg_signature": "0" * 40, "timestamp": str(int(time.time())), "nonce": "n", "echostr": echostr},
    )
    assert_error(response, 401, "invalid_signature")


def test_url_verification_without_echostr(client):
    response = client.get(PATH, query_string={"msg_signature": "x", "timestamp": str(int(time.time())), "nonce": "n"})
    assert_error(response, 400, "missing_parameter")


def test_a_text_message_gets_an_encrypted_stream_reply(client, sim):
    query, body = sim.envelope(sim.text_message("hello"))
    response = post(client, query, body)
    assert response.status_code == 200
    reply = sim.open_reply(response.get_json(), query["nonce"])
    assert reply["msgtype"] == "stream"
    assert reply["stream"]["finish"] is False
    assert reply["stream"]["id"]


@pytest.mark.parametrize("missing", ["msg_signature", "timestamp", "nonce"])
def test_missing_query_parameter(client, sim, missing):
    query, body = sim.envelope(sim.text_message("hi"))
    del query[missing]
    assert_error(post(client, query, body), 400, "missing_parameter")


def test_bad_signature(client, sim):
    query, body = sim.envelope(sim.text_message("hi"))
    query["msg_signature"] = "f" * 40
    assert_error(post(client, query, body), 401, "invalid_signature")


def test_signature_made_with_another_token(client):
    other = make_simulator("http://unused")
    other.crypto = WeComCrypto("another-token", AES_KEY, "")
    query, body = other.envelope(other.text_message("hi"))
    assert_error(post(client, query, body), 401, "invalid_signature")


@pytest.mark.parametrize("offset", [-3600, -301, 301, 86400])
def test_timestamp_outside_the_window(client, sim, offset):
    query, body = sim.envelope(sim.text_message("hi"), timestamp=int(time.time()) + offset)
    assert_error(post(client, query, body), 403, "timestamp_out_of_window")


@pytest.mark.parametrize("value", ["abc", "-5", "1.5", "9" * 20, "²", "١٧٠٠٠٠٠٠٠٠", " 1700000000"])
def test_malformed_timestamp(client, sim, value):
    query, body = sim.envelope(sim.text_message("hi"))
    query["timestamp"] = value
    assert_error(post(client, query, body), 400, "invalid_timestamp")


@pytest.mark.parametrize(
    "body", [b"", b"not json", b"[]", b'{"encrypt": 5}', b'{"encrypt": ""}', b'{"x": "y"}', b"\xff\xfe"]
)
def test_body_that_is_not_an_encrypt_object(client, sim, body):
    query, _ = sim.envelope(sim.text_message("hi"))
    assert_error(post(client, query, body), 400, "invalid_body")


def signed(sim, encrypted: str):
    timestamp, nonce = str(int(time.time())), "nonce-x"
    query = {"msg_signature": sim.crypto.sign(timestamp, nonce, encrypted), "timestamp": timestamp, "nonce": nonce}
    return query, orjson.dumps({"encrypt": encrypted})


def aes_raw(plain: bytes) -> str:
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    key = base64.b64decode(AES_KEY + "=")
    encryptor = Cipher(algorithms.AES(key), modes.CBC(key[:16])).encryptor()
    return base64.b64encode(encryptor.update(plain) + encryptor.finalize()).decode()


def test_bad_base64(client, sim):
    assert_error(post(client, *signed(sim, "%%%not-base64%%%")), 400, "invalid_base64")


def test_ciphertext_not_whole_blocks(client, sim):
    assert_error(post(client, *signed(sim, base64.b64encode(b"x" * 17).decode())), 400, "decrypt_failed")


def test_bad_padding(client, sim):
    assert_error(post(client, *signed(sim, aes_raw(b"r" * 32 + b"\x00" * 32))), 400, "invalid_padding")


def test_length_field_beyond_the_plaintext(client, sim):
    plain = b"r" * 16 + struct.pack(">I", 5000) + b'{"msgtype":"text"}'
    assert_error(post(client, *signed(sim, aes_raw(pad32(plain)))), 400, "invalid_buffer")


def test_wrong_receiveid(client, sim):
    message = b'{"msgtype":"text"}'
    plain = b"r" * 16 + struct.pack(">I", len(message)) + message + b"wx-some-corpid"
    assert_error(post(client, *signed(sim, aes_raw(pad32(plain)))), 400, "invalid_receiveid")


@pytest.mark.parametrize(
    "payload",
    [
        "not json at all",
        "[1, 2]",
        '{"msgid": "m"}',
        '{"msgtype": 7}',
        '{"msgtype": "text", "from": {"userid": "u"}}',
        '{"msgtype": "text", "msgid": "m", "text": {"content": "x"}}',
        '{"msgtype": "stream", "stream": {}}',
        '{"msgtype": "stream", "stream": {"id": "../../etc"}}',
        '{"msgtype": "stream", "stream": {"id": "abc:chunks"}}',
        '{"msgtype": "event", "from": {"userid": "u"}, "event": {}}',
        '{"msgtype": "text", "msgid": ["m"], "from": {"userid": "u"}, "text": {"content": "x"}}',
    ],
)
def test_malformed_message(client, sim, payload):
    assert_error(post(client, *signed(sim, sim.crypto.encrypt(payload))), 400, "invalid_message")


def test_an_unknown_message_type_gets_a_finished_bubble_saying_so(client, sim):
    """Not an HTTP error, which WeCom would retry: a bubble that ends at once."""
    query, body = sim.envelope(sim.message("location", {"lat": 1, "lng": 2}, userid="u"))
    response = post(client, query, body)
    assert response.status_code == 200
    reply = sim.open_reply(response.get_json(), query["nonce"])
    assert reply["stream"]["finish"] is True
    assert reply["stream"]["content"] == CATALOGUE["zh"]["unsupported_message"]


def test_oversize_body(make_app, sim):
    client = make_app(wecom_max_body_bytes=4096).test_client()
    query, _ = sim.envelope(sim.text_message("hi"))
    assert_error(post(client, query, b'{"encrypt": "' + b"A" * 8000 + b'"}'), 413, "body_too_large")


def test_rejections_are_logged_once_at_warning_without_secrets(client, sim, caplog):
    query, body = sim.envelope(sim.text_message("hi"))
    query["msg_signature"] = "f" * 40
    with caplog.at_level(logging.INFO):
        post(client, query, body)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "invalid_signature" in warnings[0].getMessage()
    text = caplog.text
    assert TOKEN not in text
    assert AES_KEY not in text
    assert query["msg_signature"] not in text


def test_other_paths_and_methods_answer_json(client):
    assert_error(client.get("/nope"), 404, "not_found")
    assert_error(client.put(PATH), 405, "method_not_allowed")


def test_health_and_readiness(client):
    assert client.get("/healthz").get_json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200


def test_readiness_names_redis_when_it_is_down(make_app):
    client = make_app(redis_url="redis://127.0.0.1:1/0", redis_socket_timeout=0.2).test_client()
    response = client.get("/readyz")
    assert response.status_code == 503
    body = response.get_json()
    assert body["error"] == "not_ready"
    assert "redis" in body["failed"]


def test_readiness_names_a_redis_too_old_for_the_gateway_until_it_is_upgraded(make_app):
    app = make_app()
    gateway = app.extensions["gateway"]
    gateway.redis_problem = "Redis 6.2.14 is older than 7.0, which the gateway needs"  # as the last ask found
    response = app.test_client().get("/readyz")
    assert response.status_code == 503
    assert response.get_json()["failed"]["redis"].startswith("Redis 6.2.14 is older than 7.0")
    gateway.redis_version_asked_at -= VERSION_ASKED_EVERY_SECONDS  # a minute later, the server (7.0) asked again
    assert app.test_client().get("/readyz").status_code == 200
    assert gateway.redis_problem == ""


def test_feedback_and_unknown_events_get_an_empty_reply(client, sim):
    for event in ("feedback_event", "some_future_event"):
        response = post(client, *sim.envelope(sim.event_message(event, {"id": "f1", "type": 1})))
        assert response.status_code == 200
        assert response.data == b""


# --- the POST route, answered in front of Flask (web/callback_route.py) -----------------------------------------


def call_wsgi(app, query, body: bytes, **environ_changes) -> tuple[str, dict, bytes]:
    """POST straight to the app's WSGI callable with a hand-made environ (a server's framing that the test client
    cannot make): (status line, headers, body)."""
    environ = EnvironBuilder(path=PATH, method="POST", query_string=query, data=body).get_environ()
    environ.update(environ_changes)
    if environ_changes.get("CONTENT_LENGTH") is None:
        environ.pop("CONTENT_LENGTH", None)
    started = {}

    def start_response(status, headers, exc_info=None):
        started.update(status=status, headers=dict(headers))

    answer = b"".join(app(environ, start_response))
    return started["status"], started["headers"], answer


def test_a_chunked_callback_is_read_to_its_end(app, sim):
    query, body = sim.envelope(sim.text_message("hi"))
    status, headers, answer = call_wsgi(
        app, query, body, CONTENT_LENGTH=None, **{"wsgi.input_terminated": True, "wsgi.input": io.BytesIO(body)}
    )
    assert status == "200 OK"
    assert headers["Content-Type"] == "application/json"
    assert int(headers["Content-Length"]) == len(answer)
    assert sim.open_reply(orjson.loads(answer), query["nonce"])["msgtype"] == "stream"


def test_a_chunked_callback_over_the_size_limit_is_refused(make_app, sim):
    app = make_app(wecom_max_body_bytes=4096)
    query, _ = sim.envelope(sim.text_message("hi"))
    body = b'{"encrypt": "' + b"A" * 8000 + b'"}'
    status, _, answer = call_wsgi(
        app, query, body, CONTENT_LENGTH=None, **{"wsgi.input_terminated": True, "wsgi.input": io.BytesIO(body)}
    )
    assert status == "413 REQUEST ENTITY TOO LARGE"
    assert orjson.loads(answer)["error"] == "body_too_large"


@pytest.mark.parametrize(
    ("declared", "sent", "message"),
    [("12", b"{}", "ended before"), ("abc", b"{}", "whole number"), ("-1", b"{}", "whole number")],
)
def test_a_body_that_does_not_match_its_content_length_is_refused(app, sim, declared, sent, message):
    query, _ = sim.envelope(sim.text_message("hi"))
    status, _, answer = call_wsgi(app, query, sent, CONTENT_LENGTH=declared, **{"wsgi.input": io.BytesIO(sent)})
    assert status == "400 BAD REQUEST"
    body = orjson.loads(answer)
    assert body["error"] == "invalid_body"
    assert message in body["message"]


def test_a_body_the_server_cannot_read_is_refused(app, sim):
    class Broken(io.RawIOBase):
        def read(self, size=-1):
            raise RuntimeError("chunk size line is not hexadecimal")

    query, _ = sim.envelope(sim.text_message("hi"))
    status, _, answer = call_wsgi(
        app, query, b"", CONTENT_LENGTH=None, **{"wsgi.input_terminated": True, "wsgi.input": Broken()}
    )
    assert status == "400 BAD REQUEST"
    assert orjson.loads(answer)["error"] == "invalid_body"


def test_a_query_parameter_given_twice_counts_with_its_first_value(client, sim):
    query, body = sim.envelope(sim.text_message("hi"))
    doubled = urlencode(query) + "&msg_signature=" + "f" * 40 + "&nonce=other"
    response = client.post(f"{PATH}?{doubled}", data=body, content_type="application/json")
    assert response.status_code == 200
    assert sim.open_reply(response.get_json(), query["nonce"])["msgtype"] == "stream"


def test_a_failure_no_one_foresaw_is_a_logged_500_that_says_no_more(app, sim, monkeypatch, caplog):
    handler = app.extensions["gateway"].bots["default"].callback

    def broken(query, body):
        raise KeyError("a secret detail")

    monkeypatch.setattr(handler, "handle", broken)
    with caplog.at_level(logging.ERROR):
        response = post(app.test_client(), *sim.envelope(sim.text_message("hi")))
    assert_error(response, 500, "internal_error")
    assert "secret detail" not in response.get_data(as_text=True)
    assert [r.exc_info[0] for r in caplog.records if r.levelno == logging.ERROR] == [KeyError]


def test_the_post_route_answers_only_its_exact_path(client, sim):
    query, body = sim.envelope(sim.text_message("hi"))
    assert_error(client.post(PATH + "/", query_string=query, data=body), 404, "not_found")
    assert_error(client.patch(PATH, query_string=query, data=body), 405, "method_not_allowed")
