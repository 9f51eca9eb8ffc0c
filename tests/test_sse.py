"""The SSE parser: framing rules, and the same events whatever the network splits."""

from hypothesis import given
from hypothesis import strategies as st

from services.transport.sse import SSEEvent, SSEParser

STREAM = (
    "event: ping\n\n"
    'data: {"event": "message", "answer": "你好，世界"}\n\n'
    ": a comment line\n"
    "data: first\ndata: second\n\n"
    "id: 7\nevent: custom\ndata:no-space\n\n"
    'retry: 100\nunknown: field\ndata: {"event":"message_end"}\n\n'
).encode()

EXPECTED = [
    SSEEvent("ping", "", None),
    SSEEvent("message", '{"event": "message", "answer": "你好，世界"}', None),
    SSEEvent("message", "first\nsecond", None),
    SSEEvent("custom", "no-space", "7"),
    SSEEvent("message", '{"event":"message_end"}', "7"),
]


def feed_all(pieces):
    parser = SSEParser()
    events = []
    for piece in pieces:
        events += parser.feed(piece)
    return events


def test_whole_stream():
    assert feed_all([STREAM]) == EXPECTED


def test_byte_by_byte_splits_json_and_utf8():
    assert feed_all([STREAM[i : i + 1] for i in range(len(STREAM))]) == EXPECTED


@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=12))
def test_any_split_gives_the_same_events(cuts):
    points = sorted(set(cuts))
    pieces = [STREAM[a:b] for a, b in zip([0, *points], [*points, len(STREAM)], strict=True)]
    assert feed_all(pieces) == EXPECTED


def test_crlf_and_cr_line_endings_even_split_between_cr_and_lf():
    crlf = STREAM.replace(b"\n", b"\r\n")
    assert feed_all([crlf]) == EXPECTED
    assert feed_all([crlf[i : i + 1] for i in range(len(crlf))]) == EXPECTED
    assert feed_all([STREAM.replace(b"\n", b"\r")]) == EXPECTED


def test_leading_bom_is_skipped_even_when_split():
    data = b"\xef\xbb\xbf" + STREAM
    assert feed_all([data[:1], data[1:2], data[2:]]) == EXPECTED


def test_unterminated_frame_is_not_dispatched():
    parser = SSEParser()
    assert parser.feed(b'data: {"event": "message", "ans') == []
    assert parser.pending_bytes() > 0


def test_empty_feed_and_blank_lines_alone():
    parser = SSEParser()
    assert parser.feed(b"") == []
    assert parser.feed(b"\n\n\n") == []


def test_invalid_utf8_is_replaced_not_fatal():
    events = feed_all([b"data: \xff\xfeok\n\n"])
    assert events[0].data.endswith("ok")
