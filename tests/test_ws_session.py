"""One long-connection session (services/longconn/session.py) against a WebSocket server of the test's own: acks
name only a req_id, and every frame of a stream reply shares its message's req_id, so acks are matched to frames
in the order they were sent. A late ack (one that arrives after a later frame on the same req_id was sent, as when
the frame pump gave up waiting after 5 s) reaches its own frame's callback."""

from __future__ import annotations

import threading

import orjson
import pytest
from websockets.sync.server import serve

from demo.wecom_ws_standin import WeComWebSocketStandIn
from services.longconn import frames
from services.longconn.session import KICKED, Session
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


def test_a_kicked_session_reads_the_acks_of_the_frames_sent_before_the_kick():
    """WeCom answers every frame sent before a kick, shown (0) or refused (846609: it came after the kick), before
    it closes the socket. The session reads those acks before it ends, so the pump learns what each bubble shows;
    and it sends nothing more (before, it ended at the event: a final frame WeCom never showed was taken for shown,
    and its bubble kept spinning, in the 10-minute one-server run of seed 12)."""
    standin = WeComWebSocketStandIn({"bot": "secret"}).start()
    try:
        standin.ack_delay = 0.3  # WeCom's: the frame is shown, its ack comes a moment later
        session = Session(standin.url, "bot", "secret", on_callback=lambda data: None)
        session.open()
        outcome: list[str] = []
        reader = threading.Thread(target=lambda: outcome.append(session.run()), daemon=True)
        reader.start()
        req_id = standin.deliver_text("bot", "hello")
        body = {"msgtype": "stream", "stream": {"id": "s1", "finish": True, "content": "The whole answer."}}
        acked: list[dict] = []
        assert session.send(frames.frame(frames.RESPOND, req_id, body), req_id, acked.append)
        assert wait_until(lambda: standin.frames(req_id), timeout=5)
        standin.kick("bot")
        reader.join(5)
        assert outcome == [KICKED]
        assert [ack["errcode"] for ack in acked] == [0]
        assert not session.send(frames.frame(frames.RESPOND, req_id, body), req_id, acked.append)
    finally:
        standin.stop()
