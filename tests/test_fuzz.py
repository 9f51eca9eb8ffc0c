"""Property-based fuzzing of the callback endpoint (hypothesis): random and mutated bodies, query strings,
signatures, timestamps, paddings, lengths, receiveids, JSON shapes and msgtypes. Every answer must be a clear 4xx
or a valid encrypted reply (tests/fuzz/checks.py). The number of inputs tried per family, and what they got, is
written to test-artifacts/fuzz-report.json. FUZZ_EXAMPLES sets the inputs per family (default 300)."""

import base64
import collections
import json
import os
import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app import create_app
from config.settings import PROJECT_ROOT
from services.wecom.crypto import WeComCrypto, pad32
from tests.conftest import AES_KEY, TOKEN
from tests.fuzz.checks import check, fuzz_settings

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
REPORT = collections.defaultdict(collections.Counter)
CRYPTO = WeComCrypto(TOKEN, AES_KEY, "")
PATH = "/wecom/callback"


@pytest.fixture(scope="module")
def client(redis_url):
    app = create_app(fuzz_settings(redis_url, dify_connect_timeout=0.2))
    yield app.test_client()
    app.extensions["gateway"].runner.drain(10)
    app.extensions["gateway"].close()


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    (PROJECT_ROOT / "test-artifacts").mkdir(exist_ok=True)
    summary = {family: {"inputs": sum(c.values()), "outcomes": dict(c.most_common())} for family, c in REPORT.items()}
    summary["total_inputs"] = sum(v["inputs"] for v in summary.values())
    (PROJECT_ROOT / "test-artifacts" / "fuzz-report.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))


def send(client, family: str, query: dict, body: bytes) -> None:
    response = client.post(PATH, query_string=query, data=body, content_type="application/json")
    REPORT[family][check(response.status_code, response.get_data(), query.get("nonce"), CRYPTO)] += 1


def signed(encrypted: str, timestamp: str | None = None, nonce: str = "fuzz-nonce") -> dict:
    timestamp = timestamp or str(int(time.time()))
    return {"msg_signature": CRYPTO.sign(timestamp, nonce, encrypted), "timestamp": timestamp, "nonce": nonce}


def raw_encrypt(plain: bytes) -> str:
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    key = base64.b64decode(AES_KEY + "=")
    encryptor = Cipher(algorithms.AES(key), modes.CBC(key[:16])).encryptor()
    return base64.b64encode(encryptor.update(plain) + encryptor.finalize()).decode()


text = st.text(max_size=40)
query_values = st.one_of(text, st.from_regex(r"[0-9]{1,12}", fullmatch=True), st.sampled_from(["", "0", "-1"]))


@FUZZ
@given(
    query=st.dictionaries(st.sampled_from(["msg_signature", "timestamp", "nonce", "echostr", "x"]), query_values),
    body=st.one_of(
        st.binary(max_size=300),
        st.builds(lambda v: json.dumps({"encrypt": v}).encode(), st.one_of(text, st.integers(), st.none())),
    ),
)
def test_random_requests(client, query, body):
    send(client, "random requests", query, body)


@FUZZ
@given(
    encrypted=st.one_of(st.text(max_size=120), st.binary(max_size=200).map(lambda b: base64.b64encode(b).decode())),
    flip=st.integers(min_value=0, max_value=10_000),
)
def test_garbage_behind_a_valid_signature(client, encrypted, flip):
    if flip % 3 == 0:  # a real ciphertext with one character changed
        real = CRYPTO.encrypt('{"msgtype":"stream","stream":{"id":"abc"}}')
        i = flip % len(real)
        encrypted = real[:i] + ("A" if real[i] != "A" else "B") + real[i + 1 :]
    send(client, "garbage behind a valid signature", signed(encrypted), json.dumps({"encrypt": encrypted}).encode())


@FUZZ
@given(
    prefix=st.one_of(st.binary(min_size=16, max_size=16), st.binary(max_size=24)),
    length=st.one_of(st.none(), st.integers(min_value=0, max_value=2**32 - 1)),
    message=st.one_of(st.binary(max_size=120), st.just(b'{"msgtype":"stream","stream":{"id":"abc"}}')),
    receiveid=st.sampled_from([b"", b"", b"wx123", b"\x00", "企业".encode()]),
    pad=st.one_of(st.none(), st.integers(min_value=0, max_value=255)),
)
def test_crafted_framing_paddings_lengths_and_receiveids(client, prefix, length, message, receiveid, pad):
    """A frame built by hand: the length field, the receiveid and the padding each right or wrong."""
    plain = prefix + struct.pack(">I", len(message) if length is None else length) + message + receiveid
    if pad is None:
        plain = pad32(plain)
    else:
        fill = -len(plain) % 16 or 16
        plain += bytes([pad]) * fill
    encrypted = raw_encrypt(plain)
    send(client, "crafted framing", signed(encrypted), json.dumps({"encrypt": encrypted}).encode())


MSGTYPES = st.sampled_from(
    ["text", "stream", "event", "image", "mixed", "voice", "file", "video", "location", "", "TEXT"]
)
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=30))
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)),
    max_leaves=12,
)
FIELDS = [
    "msgid",
    "aibotid",
    "chatid",
    "chattype",
    "from",
    "msgtype",
    "text",
    "stream",
    "event",
    "mixed",
    "image",
    "voice",
    "file",
    "video",
    "quote",
    "response_url",
]


USERIDS = st.sampled_from(["alice", "bob", "张三", "u" * 64, "carol"])
VALID_BODIES = {
    "text": lambda draw: {"content": draw(st.text(max_size=80))},
    "voice": lambda draw: {"content": draw(st.text(max_size=40))},
    "stream": lambda draw: {"id": draw(st.from_regex(r"[A-Za-z0-9_-]{1,70}", fullmatch=True))},
    "event": lambda draw: {
        "eventtype": (kind := draw(st.sampled_from(["enter_chat", "feedback_event", "other"]))),
        kind: {"id": draw(st.text(max_size=30)), "type": draw(st.integers(-1, 5))},
    },
    "mixed": lambda draw: {"msg_item": [{"msgtype": "text", "text": {"content": draw(st.text(max_size=30))}}]},
    "image": lambda draw: {"url": "http://127.0.0.1:9/img"},
    "file": lambda draw: {"url": "http://127.0.0.1:9/file"},
    "video": lambda draw: {"url": "http://127.0.0.1:9/video"},
}


@st.composite
def messages(draw):
    """A well-formed message of any type, then up to three random mutations (drop, replace or add a field)."""
    kind = draw(st.sampled_from([*VALID_BODIES, "location", ""]))
    message = {
        "msgid": draw(st.text(min_size=1, max_size=40)),
        "aibotid": "fuzz-bot",
        "from": {"userid": draw(USERIDS)},
        "chattype": draw(st.sampled_from(["single", "group"])),
        "msgtype": kind,
    }
    if draw(st.booleans()):
        message["chatid"] = draw(st.text(min_size=1, max_size=20))
    if kind in VALID_BODIES:
        message[kind] = VALID_BODIES[kind](draw)
    if draw(st.booleans()):
        message["quote"] = draw(st.one_of(json_values, st.just({"msgtype": "text", "text": {"content": "q"}})))
    for _ in range(draw(st.integers(min_value=0, max_value=3))):
        operation, field = draw(st.sampled_from(["drop", "replace", "add"])), draw(st.sampled_from(FIELDS))
        if operation == "drop":
            message.pop(field, None)
        else:
            message[field if operation == "replace" else draw(st.text(max_size=8))] = draw(json_values)
    return message


@FUZZ
@given(message=messages(), as_text=st.booleans())
def test_random_json_messages_and_msgtypes(client, message, as_text):
    plaintext = json.dumps(message, ensure_ascii=as_text)
    encrypted = CRYPTO.encrypt(plaintext)
    send(client, "random JSON messages", signed(encrypted), json.dumps({"encrypt": encrypted}).encode())


@FUZZ
@given(
    timestamp=st.one_of(
        st.integers(min_value=-(10**12), max_value=10**13).map(str),
        st.text(max_size=14),
        st.integers(min_value=-400, max_value=400).map(lambda d: str(int(time.time()) + d)),
    )
)
def test_timestamps(client, timestamp):
    encrypted = CRYPTO.encrypt('{"msgtype":"stream","stream":{"id":"fuzzstream"}}')
    send(
        client, "timestamps", signed(encrypted, timestamp=timestamp or "0"), json.dumps({"encrypt": encrypted}).encode()
    )


def test_coverage_guided_fuzzing_with_atheris(tmp_path, redis_url, redis_client):
    """atheris (libFuzzer) mutates inputs towards new code paths for FUZZ_SECONDS (default 20), against the test
    Redis; any violation of the checks, or any unhandled exception, fails it."""
    import re
    import subprocess
    import sys

    pytest.importorskip("atheris")
    seconds = int(os.environ.get("FUZZ_SECONDS", "20"))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.fuzz.fuzz_callback",
            f"-max_total_time={seconds}",
            "-print_final_stats=1",
            f"-artifact_prefix={tmp_path}/",
        ],
        cwd=PROJECT_ROOT,
        env={**os.environ, "FUZZ_REDIS_URL": redis_url},
        capture_output=True,
        text=True,
        timeout=seconds + 120,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    runs = int(re.search(r"stat::number_of_executed_units:\s+(\d+)", output).group(1))
    REPORT["atheris (coverage-guided)"]["executions, all passed"] += runs
    assert runs > 1000
