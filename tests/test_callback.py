"""The callback endpoint: URL verification, and every kind of bad input answered with a 4xx JSON error."""

import base64
import logging
import struct
import time

import orjson
import pytest

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


def test_feedback_and_unknown_events_get_an_empty_reply(client, sim):
    for event in ("feedback_event", "some_future_event"):
        response = post(client, *sim.envelope(sim.event_message(event, {"id": "f1", "type": 1})))
        assert response.status_code == 200
        assert response.data == b""
