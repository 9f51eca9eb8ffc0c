"""A differential test of the streaming call's own HTTP/1.1 response parsing (services/transport/http_stream.py)
against h11, the parser httpx uses, as the oracle: the same bytes, cut into the same network reads, must give the
same status, the same body and the same verdict (complete, or a framing error) from both.

Generated responses are valid ones of every framing (chunked with extensions and trailers, Content-Length,
read-to-close), then optionally cut short by the connection closing, or broken in one of the chunked framing's
fields (the part the hand-written decoder owns)."""

from __future__ import annotations

import os

import h11
from hypothesis import given, settings
from hypothesis import strategies as st

from services.transport.http_stream import StreamProtocolError, body_decoder, parse_head, split_head

STATUSES = [200, 201, 400, 401, 404, 429, 500, 502, 503]
TOKEN_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-"
header_names = st.text(TOKEN_CHARS, min_size=1, max_size=12).filter(
    lambda n: n.lower() not in ("content-length", "transfer-encoding", "connection")
)
header_values = st.text("abcdefghijklmnopqrstuvwxyz0123456789 ,;=/-", max_size=20).map(str.strip)


@st.composite
def chunked_body(draw, body: bytes) -> bytes:
    """`body` in chunks of random sizes, hex digits in either case, some with extensions, and a trailer."""
    out, at = b"", 0
    while at < len(body):
        size = draw(st.integers(1, max(1, len(body) - at)))
        digits = format(size, "x")
        digits = digits.upper() if draw(st.booleans()) else digits
        extension = draw(st.sampled_from([b"", b";name=value", b";x", b';q="a b"']))
        out += digits.encode() + extension + b"\r\n" + body[at : at + size] + b"\r\n"
        at += size
    trailer = draw(st.sampled_from([b"", b"X-Checksum: abc\r\n"]))
    return out + b"0\r\n" + trailer + b"\r\n"


# Breakages of the chunked framing: (what is replaced, what replaces it), applied to the first occurrence.
BREAKAGES = [
    (b"\r\n", b"\n"),  # a bare LF where CRLF belongs
    (b"\r\n0\r\n", b"0\r\n"),  # chunk data not followed by CRLF
    (b"0\r\n", b"0x0\r\n"),  # a size Python's int(x, 16) would take
    (b"0\r\n", b"+0\r\n"),
    (b"0\r\n", b" 0\r\n"),
    (b"0\r\n", b"g\r\n"),
]


@st.composite
def responses(draw) -> tuple[bytes, str]:
    """(raw response bytes, framing)."""
    status = draw(st.sampled_from(STATUSES))
    body = draw(st.binary(max_size=300))
    framing = draw(st.sampled_from(["chunked", "length", "close"]))
    headers = [(draw(header_names), draw(header_values)) for _ in range(draw(st.integers(0, 3)))]
    if framing == "chunked":
        headers.append((draw(st.sampled_from(["Transfer-Encoding", "transfer-encoding"])), "chunked"))
        payload = draw(chunked_body(body))
        breakage = draw(st.none() | st.sampled_from(BREAKAGES))
        if breakage is not None and breakage[0] in payload:
            payload = payload.replace(breakage[0], breakage[1], 1)
    elif framing == "length":
        headers.append(("Content-Length", str(len(body))))
        payload = body
    else:
        headers.append(("Connection", "close"))
        payload = body
    eol = draw(st.sampled_from(["\r\n", "\n"]))  # some servers end head lines in a bare LF
    head = f"HTTP/1.1 {status} Whatever{eol}" + "".join(f"{n}: {v}{eol}" for n, v in headers) + eol
    raw = head.encode("latin-1") + payload
    if draw(st.booleans()):
        raw = raw[: draw(st.integers(len(head) + 1, max(len(head) + 1, len(raw))))]  # the connection closes early
    return raw, framing


def network_reads(raw: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(raw) + 1) for c in cuts} | {0, len(raw)})
    return [raw[a:b] for a, b in zip(points, points[1:], strict=False) if b > a]


def ours(reads: list[bytes]) -> tuple:
    """What the gateway's parser makes of the reads, then the connection closing."""
    buffered = b""
    reads = list(reads)
    while (parts := split_head(buffered)) is None:
        if not reads:
            return ("error",)
        buffered += reads.pop(0)
    head, rest = parts
    try:
        status, headers = parse_head(head)
        decoder = body_decoder(headers)
        body = b""
        for data in [rest, *reads]:
            if data and not decoder.complete:
                body += decoder.feed(data)
        if not decoder.complete:
            body += decoder.feed(b"")  # the connection closes
    except StreamProtocolError:
        return ("error",)
    return ("complete", status, body) if decoder.complete else ("error",)


def oracle(reads: list[bytes]) -> tuple:
    """What h11 makes of the same reads, then the connection closing."""
    connection = h11.Connection(h11.CLIENT)
    connection.send(h11.Request(method="POST", target="/v1/chat-messages", headers=[("Host", "dify")]))
    connection.send(h11.EndOfMessage())
    status, body = None, b""
    try:
        for data in [*reads, b""]:
            connection.receive_data(data)
            while True:
                event = connection.next_event()
                if event in (h11.NEED_DATA, h11.PAUSED) or isinstance(event, h11.ConnectionClosed):
                    break
                if isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    return ("complete", status, body)
    except h11.RemoteProtocolError:
        return ("error",)
    return ("error",)


@settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "300")), deadline=None)
@given(response=responses(), cuts=st.lists(st.integers(0, 10_000), max_size=8))
def test_the_streaming_parser_agrees_with_h11(response, cuts):
    raw, _ = response
    reads = network_reads(raw, cuts)
    assert ours(reads) == oracle(reads)


HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"


def test_the_oracle_sees_the_breakages_as_errors():
    """The breakages above are framing errors for h11 too (else the test would compare nothing there)."""
    body = b"5\r\nhello\r\n0\r\n\r\n"
    assert oracle([HEAD + body]) == ("complete", 200, b"hello")
    for old, new in BREAKAGES:
        broken = HEAD + body.replace(old, new, 1)
        assert oracle([broken]) == ("error",), (old, new)
        assert ours([broken]) == ("error",), (old, new)


def test_whitespace_before_a_chunk_extension_is_accepted_as_rfc_9112_allows():
    """RFC 9112 §7.1.1 allows whitespace (BWS) before ';'; h11 does not, so this one is checked here alone."""
    assert ours([HEAD + b"5 ;q=1\r\nhello\r\n0\r\n\r\n"]) == ("complete", 200, b"hello")
