"""One long-connection session (services/longconn/session.py) against a WebSocket server of the test's own: acks
name only a req_id, and every frame of a stream reply shares its message's req_id, so acks are matched to frames
in the order they were sent. A late ack (one that arrives after a later frame on the same req_id was sent, as when
the frame pump gave up waiting after 5 s) reaches its own frame's callback."""

from __future__ import annotations

import threading

import orjson
import pytest
from websockets.sync.server import serve

from services.longconn import frames
from services.longconn.session import Session
from tests.conftest import wait_until


@pytest.fixture
def server():
    """Acks the subscription at once; holds the first stream frame's ack until the second frame has arrived, then
    acks both, in order, each ack's errmsg naming the frame's content."""

    def handler(connection):
        held = []
        for text in connection:
            data = orjson.loads(text)
            req_id = data["headers"]["req_id"]
            if data.get("cmd") == frames.SUBSCRIBE:
                connection.send(orjson.dumps({"headers": {"req_id": req_id}, "errcode": 0, "errmsg": "ok"}).decode())
                continue
            content = data["body"]["stream"]["content"]
            held.append({"headers": {"req_id": req_id}, "errcode": 0, "errmsg": f"ack of {content}"})
            if len(held) == 2:
                for ack in held:
                    connection.send(orjson.dumps(ack).decode())

    with serve(handler, "127.0.0.1", 0) as ws_server:
        thread = threading.Thread(target=ws_server.serve_forever, daemon=True)
        thread.start()
        yield f"ws://127.0.0.1:{ws_server.socket.getsockname()[1]}"
        ws_server.shutdown()


def test_a_late_ack_reaches_its_own_frame(server):
    session = Session(server, "bot", "secret", on_callback=lambda data: None)
    session.open()
    threading.Thread(target=session.run, daemon=True).start()
    acked = []

    def frame(content: str) -> str:
        body = {"msgtype": "stream", "stream": {"id": "s1", "finish": False, "content": content}}
        return frames.frame(frames.RESPOND, "req-1", body)

    assert session.send(frame("first"), "req-1", lambda ack: acked.append(("first", ack["errmsg"])))
    assert session.send(frame("second"), "req-1", lambda ack: acked.append(("second", ack["errmsg"])))
    assert wait_until(lambda: len(acked) == 2, timeout=5), acked
    assert acked == [("first", "ack of first"), ("second", "ack of second")]
    session.close()
