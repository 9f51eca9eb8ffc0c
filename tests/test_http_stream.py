"""The lean streaming HTTP client's body framing (pure logic: a fake socket returns pre-split pieces), and the
request it sends (a real socket)."""

import socket
import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.transport.http_stream import StreamConnectError, StreamingResponse, StreamProtocolError, post_stream

PAYLOAD = b'data: {"event":"message","answer":"\xe4\xbd\xa0\xe5\xa5\xbd"}\n\n' * 3


def chunked(payload: bytes, sizes=(7, 30, 1000)) -> bytes:
    out, i, k = b"", 0, 0
    while i < len(payload):
        size = sizes[k % len(sizes)]
        piece = payload[i : i + size]
        out += b"%x;ext=1\r\n%s\r\n" % (len(piece), piece)
        i, k = i + size, k + 1
    return out + b"0\r\n\r\n"


class FakeSocket:
    def __init__(self, pieces):
        self.pieces = list(pieces)

    def recv(self, size):
        return self.pieces.pop(0) if self.pieces else b""

    def close(self):
        self.pieces = []


def body_of(raw: bytes, headers: dict, cuts: list[int] = ()) -> bytes:
    points = sorted(set(c for c in cuts if 0 < c < len(raw)))
    pieces = [raw[a:b] for a, b in zip([0, *points], [*points, len(raw)], strict=True)]
    first, rest = (pieces[0], pieces[1:]) if pieces else (b"", [])
    response = StreamingResponse(FakeSocket(rest), 200, headers, first)
    return b"".join(response.iter_body())


@given(st.lists(st.integers(min_value=0, max_value=400), max_size=20))
def test_chunked_bodies_decode_whatever_the_splits(cuts):
    assert body_of(chunked(PAYLOAD), {"transfer-encoding": "chunked"}, cuts) == PAYLOAD


def test_byte_by_byte_chunked():
    raw = chunked(PAYLOAD)
    response = StreamingResponse(
        FakeSocket([raw[i : i + 1] for i in range(1, len(raw))]), 200, {"transfer-encoding": "chunked"}, raw[:1]
    )
    assert b"".join(response.iter_body()) == PAYLOAD


def test_malformed_content_length():
    with pytest.raises(StreamProtocolError):
        body_of(PAYLOAD, {"content-length": "\u00b2"})


def test_sized_and_read_to_close_bodies():
    assert body_of(PAYLOAD, {"content-length": str(len(PAYLOAD))}, [5, 50]) == PAYLOAD
    assert body_of(PAYLOAD, {}, [3, 90]) == PAYLOAD


@pytest.mark.parametrize(
    ("raw", "headers"),
    [
        (chunked(PAYLOAD)[:-20], {"transfer-encoding": "chunked"}),  # the connection ends inside the body
        (b"zz\r\nabc\r\n", {"transfer-encoding": "chunked"}),  # not a hex size
        (PAYLOAD[:10], {"content-length": str(len(PAYLOAD))}),  # shorter than announced
        (b"1" * 2000, {"transfer-encoding": "chunked"}),  # a size line that never ends
    ],
)
def test_broken_framing_raises(raw, headers):
    with pytest.raises(StreamProtocolError):
        body_of(raw, headers)


def serve_once(response: bytes):
    """A one-shot raw server; returns (url, what it received)."""
    listener = socket.create_server(("127.0.0.1", 0))
    received = {}

    def run():
        conn, _ = listener.accept()
        data = b""
        while b"\r\n\r\n" not in data:
            data += conn.recv(65536)
        head, _, body = data.partition(b"\r\n\r\n")
        length = int([h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")][0].split(b":")[1])
        while len(body) < length:
            body += conn.recv(65536)
        received.update(head=head.decode(), body=body)
        conn.sendall(response)
        conn.close()
        listener.close()

    threading.Thread(target=run, daemon=True).start()
    return f"http://127.0.0.1:{listener.getsockname()[1]}/v1/chat-messages?x=1", received


def test_request_and_response_over_a_real_socket():
    url, received = serve_once(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(PAYLOAD))
    with post_stream(url, b'{"q":1}', {"Authorization": "Bearer k"}, 2, 2) as response:
        assert response.status == 200
        assert b"".join(response.iter_body()) == PAYLOAD
    head = received["head"]
    assert head.startswith("POST /v1/chat-messages?x=1 HTTP/1.1\r\n")
    assert "Authorization: Bearer k" in head
    assert "Connection: close" in head
    assert received["body"] == b'{"q":1}'


@pytest.mark.parametrize("head", [b"garbage\r\n\r\n", b"HTTP/1.1 \xb200 OK\r\n\r\n", b"HTTP/1.1 20 OK\r\n\r\n"])
def test_malformed_status_lines(head):
    url, _ = serve_once(head)
    with pytest.raises(StreamProtocolError):
        post_stream(url, b"{}", {}, 2, 2)


def test_refused_connection():
    with pytest.raises(StreamConnectError):
        post_stream("http://127.0.0.1:9/x", b"{}", {}, 0.5, 0.5)
