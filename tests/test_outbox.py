"""The long-connection outbox (services/longconn/outbox.py): which tracked streams no live reply covers any more,
found however many streams are open."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import redis

from demo import dify_standin as d
from services.keys import SENT_TTL_SECONDS, Keys
from services.longconn import outbox as outbox_module
from services.longconn.orphans import OrphanDelivery
from services.longconn.outbox import HANDED_WAIT_SECONDS, PAGE, Outbox, claimant_token, rest_of, shown_of
from services.longconn.replies import ReplyPump
from services.streams.poll_path import FrameRecord, PollPath
from services.streams.service import Frame
from services.streams.store import StreamStore
from tests.conftest import WS_BOT_ID, outbox_settled, wait_until


def test_an_orphan_is_found_behind_more_than_a_page_of_live_streams(redis_client):
    keys = Keys()
    store = StreamStore(redis_client, keys, 3600, lease_seconds=5)
    outbox = Outbox(redis_client, keys, store, "bot-1")
    live_count = PAGE + 50
    for i in range(live_count + 1):
        stream_id = f"s{i:04d}"
        store.create(stream_id, f"m{i}", "holder:1", "bot1", "alice", {"userid": "alice"})
        generation = 7 if i < live_count else 6  # the last one was answered on an earlier connection
        outbox.track(stream_id, f"req-{i}", generation, "alice", True)
    found = outbox.orphans(7, live={"s0000"})
    assert found == [f"s{live_count:04d}"]
    store.discard("s0001")  # a stream whose keys are gone is dropped from the open set
    redis_client.delete(keys.stream("s0001"))
    outbox.orphans(7, live=set())
    assert redis_client.zscore(keys.ws_open("bot-1"), "s0001") is None
    assert redis_client.zcard(keys.ws_open("bot-1")) == live_count


class _Connection:
    """Stands in for the WebSocket session: takes frames while `open` (their acks come when the test says)."""

    def __init__(self):
        self.open = True
        self.acks = []

    def send(self, text, req_id="", on_ack=None):
        if self.open:
            self.acks.append(on_ack)
        return self.open


class _Streams:
    """Stands in for the stream service: each stream's bubble shows the text the test gives it (written to the
    stream in Redis), and the pump's frames are polled, and recorded, by the real poll script."""

    def __init__(self, store: StreamStore):
        self.store = store
        self.polls = PollPath(store)
        self.bubble = SimpleNamespace(placeholder="Thinking…")

    def show(self, stream_id: str, text: str, finish: bool = False) -> None:
        fields = {"text": text, "status": "done" if finish else "streaming"}
        self.store.client.hset(self.store.keys.stream(stream_id), mapping=fields)

    def poll(self, stream_id: str) -> dict:
        return self.frame(stream_id, None).reply

    def frame(self, stream_id: str, record: FrameRecord | None) -> Frame:
        snapshot = self.polls.poll(stream_id, 330, 20000, "", record=record)
        finish = not snapshot.active
        reply = {"msgtype": "stream", "stream": {"id": stream_id, "content": snapshot.text, "finish": finish}}
        return Frame(reply, snapshot.shows, snapshot.recorded)


def sent_in_a_pass(streams: _Streams, stream_id: str, token: str) -> None:
    """A frame of the stream recorded by a pump's pass (`token`), which then confirmed it and sent it."""
    streams.frame(stream_id, FrameRecord(token, 0))
    streams.store.client.hset(streams.store.keys.stream(stream_id), "ws_confirmed", token)


def tracked_stream(client, lease_seconds: int) -> tuple[StreamStore, Outbox, _Streams]:
    """A store and a bot's outbox on `client`, with stream s1 (message m1, alice's) open and tracked on req-1, and
    the stream service standing in for the pump's."""
    keys = Keys()
    store = StreamStore(client, keys, 3600, lease_seconds=lease_seconds)
    outbox = Outbox(client, keys, store, "bot-1")
    store.create("s1", "m1", "holder:1", "bot1", "alice", {"userid": "alice"})
    outbox.track("s1", "req-1", 3, "alice", True)
    return store, outbox, _Streams(store)


def answering(client, text: str, lease_seconds: int = 5) -> tuple[StreamStore, _Streams, _Connection, ReplyPump]:
    """Stream s1 answered on req-1 by a pump on a connection of its own, its first frame (showing `text`, or the
    placeholder) acknowledged."""
    store, outbox, streams = tracked_stream(client, lease_seconds)
    connection = _Connection()
    pump = ReplyPump("bot", streams, outbox, lambda: connection)
    streams.show("s1", text)
    pump.open("req-1", "s1", streams.poll("s1"))
    connection.acks.pop()({"errcode": 0})
    return store, streams, connection, pump


def test_a_frame_that_never_went_out_is_not_taken_for_what_the_bubble_shows(redis_client):
    """The pump records what a frame will show before it goes out (a holder may die before the ack). A frame the
    ended connection did not take must not stand as shown: the next holder sends the rest from the last frame
    acknowledged (before, a final frame recorded so made it send nothing: a bubble stuck, seen in the campaign)."""
    store, streams, connection, pump = answering(redis_client, "The first words")  # WeCom showed "The first words"
    connection.open = False  # the connection ends (kicked), and the answer finishes
    streams.show("s1", "The first words, and the rest.", True)
    pump.pump()
    pump.flush_acks()
    assert shown_of(store.reads.meta("s1")) == ("The first words", False)
    assert rest_of("The first words, and the rest.", "The first words") == ", and the rest."
    assert "s1" not in pump.live_streams()


def test_a_frame_is_recorded_by_the_poll_that_makes_it_and_counts_bytes_of_the_text(redis_client):
    """The pump's poll records what its frame will show in the same write as the fold (no record of its own): the
    bytes of the stream's text the frame shows, under the pass's token; an unchanged bubble sends nothing."""
    store, streams, connection, pump = answering(redis_client, "")  # the placeholder
    streams.show("s1", "你好, world")
    pump.pump()
    meta = store.reads.meta("s1")
    assert meta["ws_shows"] == str(len("你好, world".encode())) and meta["ws_sent_by"]
    assert shown_of(meta) == ("你好, world", False)
    connection.acks.pop()({"errcode": 0})
    pump.pump()  # nothing changed
    assert connection.acks == []
    assert shown_of(store.reads.meta("s1")) == ("你好, world", False)


def test_a_frame_wecom_refused_goes_out_again_and_the_record_says_what_was_taken_meanwhile(redis_client):
    """WeCom refused a frame (not for a dead req_id): the bubble shows the last frame it took, and the record says so
    until the next pass sends that frame again, even when no new text came (before, it waited for new text, and at
    an answer's end none comes)."""
    store, streams, connection, pump = answering(redis_client, "The first words")
    streams.show("s1", "The first words, and more")
    pump.pump()
    connection.acks.pop()({"errcode": 45009, "errmsg": "busy"})
    pump.flush_acks()
    assert shown_of(store.reads.meta("s1")) == ("The first words", False)
    pump.pump()  # sent again, recorded again
    assert len(connection.acks) == 1
    assert shown_of(store.reads.meta("s1")) == ("The first words, and more", False)


def test_a_replaced_answer_leaves_no_record_of_text_it_no_longer_has(redis_client):
    """The record counts bytes of the stream's text. Dify replaced the answer (a message_replace): the bubble showed
    text the answer no longer begins with, so the rest is the whole final answer; an answer written again whole with
    the same start (after a conflict) keeps its record."""
    store, outbox, streams = tracked_stream(redis_client, lease_seconds=5)
    owner = "holder:1"
    store.append("s1", owner, ["Hello world"], 0)
    sent_in_a_pass(streams, "s1", "pass-1")
    store.replace("s1", owner, "Hello world, again")  # the same start
    streams.poll("s1")  # the holder's rest is made from the text as a poll folded it
    assert shown_of(store.reads.meta("s1"))[0] == "Hello world"
    store.replace("s1", owner, "Something else")
    streams.poll("s1")
    assert shown_of(store.reads.meta("s1"))[0] == ""
    sent_in_a_pass(streams, "s1", "pass-2")  # the next frame shows the new text
    assert shown_of(store.reads.meta("s1"))[0] == "Something else"


def test_a_message_answered_after_its_connection_ended_is_recorded_as_dead_at_once(redis_client):
    """A message read from a connection just before it ended is taken after the end (the intake runs behind the
    reader): its first frame goes nowhere. Its req_id is recorded dead at once, not at the next pass of a connection
    this process may never hold again, so the holder that has the bot now sends the answer through aibot_send_msg
    (before, the record stayed in memory and the answer reached nobody; seen in the campaign)."""
    store, outbox, streams = tracked_stream(redis_client, lease_seconds=5)
    pump = ReplyPump("bot", streams, outbox, lambda: None)  # no connection any more
    streams.show("s1", "")
    pump.open("req-1", "s1", streams.poll("s1"))
    assert store.reads.meta("s1").get("ws_dead") == "1"
    assert shown_of(store.reads.meta("s1")) == ("", False)


@pytest.mark.parametrize("session_left", [False, True], ids=["no-session", "closed-session"])
def test_a_late_delivery_of_the_message_does_not_take_back_what_its_repeat_showed(redis_client, session_left):
    """WeCom delivered a message twice. The first delivery's intake was held up by a Redis outage; the repeat opened
    the stream, and its bubble showed text; then the connection ended. The first delivery, taken at last after the
    end, answers on its own req_id, whose frame goes nowhere: that marks its req_id dead but leaves what the repeat's
    bubble showed, so the next holder sends the rest from there (before, from nothing: the user got the text twice;
    seen in the campaign)."""
    store, outbox, streams = tracked_stream(redis_client, lease_seconds=5)
    connection = _Connection()
    pump = ReplyPump("bot", streams, outbox, lambda: connection if connection.open or session_left else None)
    streams.show("s1", "")
    pump.open("req-2", "s1", streams.poll("s1"))  # the repeat
    connection.acks.pop()({"errcode": 0})
    streams.show("s1", "The first words")
    pump.pump()
    connection.acks.pop()({"errcode": 0})
    pump.flush_acks()
    connection.open = False
    pump.clear()  # the connection ended
    outbox.track("s1", "req-1", 3, "alice", True)  # the first delivery, taken late
    streams.show("s1", "The first words and")
    pump.open("req-1", "s1", streams.poll("s1"))
    pump.flush_acks()
    meta = store.reads.meta("s1")
    assert meta.get("ws_dead") == "1"
    assert shown_of(meta) == ("The first words", False)


@pytest.mark.parametrize("how", ["connection-replaced", "frame-refused-by-the-socket"])
def test_what_one_bubble_of_a_stream_was_sent_stands_when_its_other_bubble_s_frame_does_not_go_out(redis_client, how):
    """WeCom delivered a message twice, both deliveries answered by the one stream: two bubbles, two req_ids. A pass
    sent one bubble's frame, and the connection ended before the other's went out. What the sent frame shows stands
    as what the stream's bubbles show, so the next holder's rest begins after it (before, the frame that did not go
    out undid the pass's record for the whole stream, and the rest repeated what the other bubble had shown; the
    campaign's one-server run of seed 12, a holder kicked 18 ms after such a frame)."""
    store, outbox, streams = tracked_stream(redis_client, lease_seconds=5)
    connection = _Connection()
    holder = {"session": connection}
    pump = ReplyPump("bot", streams, outbox, lambda: holder["session"])
    streams.show("s1", "")
    pump.open("req-1", "s1", streams.poll("s1"))
    outbox.track("s1", "req-2", 3, "alice", True)  # the repeat
    pump.open("req-2", "s1", streams.poll("s1"))
    for ack in connection.acks:
        ack({"errcode": 0})  # both placeholders shown
    connection.acks.clear()
    pump.flush_acks()
    streams.show("s1", "The first words")
    send = connection.send

    def end_after_one_frame(text, req_id="", on_ack=None):
        taken = send(text, req_id, on_ack)
        connection.open = False  # the connection ends right after it took one frame
        if how == "connection-replaced":
            holder["session"] = _Connection()
        return taken

    connection.send = end_after_one_frame
    pump.pump()
    pump.flush_acks()
    assert len(connection.acks) == 1  # one bubble's frame went out
    assert shown_of(store.reads.meta("s1")) == ("The first words", False)


def test_a_repeat_whose_first_frame_shows_text_is_recorded_before_it_goes_out(redis_client):
    """WeCom delivered a message again while its answer streamed: the repeat's first frame shows the text so far. It
    is recorded before it goes out, so when the holder dies before the ack, the next holder sends only what follows
    (before, the whole answer again: that text reached the user twice; seen in the campaign)."""
    store, streams, connection, pump = answering(redis_client, "")  # the placeholder
    pump.flush_acks()
    streams.show("s1", "The first words")
    pump.outbox.track("s1", "req-2", 3, "alice", True)
    pump.open("req-2", "s1", streams.poll("s1"))  # sent; its ack never comes (the holder dies)
    assert len(connection.acks) == 1
    assert shown_of(store.reads.meta("s1")) == ("The first words", False)


def test_a_pass_its_connection_outlived_records_nothing_and_sends_nothing_on_the_next(redis_client):
    """A keeper's pass can outlive its connection (a holder frozen mid-pass, polls slowed by a Redis stall) while
    the process already holds the next one. The pass records nothing more and sends nothing on the new connection,
    where the old req_id is refused: what the bubble shows stays what it showed (before, the pass recorded its frame
    as shown and sent it on the new connection, and the next holder's rest began after text the user never saw;
    seen in the campaign)."""
    store, outbox, streams = tracked_stream(redis_client, lease_seconds=5)
    old, new = _Connection(), _Connection()
    holder = {"session": old}
    pump = ReplyPump("bot", streams, outbox, lambda: holder["session"])
    streams.show("s1", "")
    pump.open("req-1", "s1", streams.poll("s1"))
    old.acks.pop()({"errcode": 0})
    streams.show("s1", "The first words")
    pump.pump(old)
    old.acks.pop()({"errcode": 0})
    pump.flush_acks()
    streams.show("s1", "The first words, and more")
    frames = streams.frame

    def poll_as_the_connection_ends(stream_id, record):
        old.open, holder["session"] = False, new  # the process holds the next connection when the pass goes on
        return frames(stream_id, record)

    streams.frame = poll_as_the_connection_ends
    pump.pump(old)
    pump.flush_acks()
    assert new.acks == []
    assert shown_of(store.reads.meta("s1")) == ("The first words", False)


def test_a_pass_that_outlived_its_lease_sends_nothing_though_its_connection_seems_open(redis_client):
    """Seed 59's aimed Cluster run: the holder was frozen (SIGSTOP) in a pass, after its poll recorded a frame and
    before the frame went out, for longer than its lease; another process took the connection. It woke, and its
    pass wrote the frame to its old socket before its reader heard that the socket was closed: taken for sent, the
    record stood, and the next holder's rest began after a sentence the user never saw. A pass sends only while the
    lease it last renewed still runs, and undoes the records of the frames it holds back."""
    store, streams, connection, pump = answering(redis_client, "The first words")
    streams.show("s1", "The first words, and more")
    frames = streams.frame

    def frozen_after_the_poll(stream_id, record):
        framed = frames(stream_id, record)
        time.sleep(0.3)  # frozen past the lease, which still runs as far as the connection knows
        return framed

    streams.frame = frozen_after_the_poll
    pump.pump(held_until=time.monotonic() + 0.1)
    pump.flush_acks()
    assert connection.acks == []
    assert shown_of(store.reads.meta("s1")) == ("The first words", False)
    streams.frame = frames
    pump.pump(held_until=time.monotonic() + 10)  # its lease renewed: the frame goes out
    assert len(connection.acks) == 1


def test_frames_recorded_in_a_redis_pause_and_never_sent_are_not_taken_for_shown(private_redis):
    """The pump records frames before they go out. When that record times out against a paused Redis, nothing is
    sent, yet Redis runs the record when it resumes: it is undone, so the next holder sends the rest from what the
    bubble shows (before, from the unsent frame: its text never reached the user; seen in the campaign)."""
    client = redis.Redis(port=private_redis.port, decode_responses=True, socket_timeout=0.5)
    store, streams, connection, pump = answering(client, "The first words", lease_seconds=30)
    pump.pump()  # nothing changed: nothing sent
    streams.show("s1", "The first words, and more")
    polls = int(store.reads.meta("s1")["polls"])
    private_redis.pause()
    try:
        pump.pump()  # the poll that records the frame times out: nothing goes out
    finally:
        time.sleep(0.3)
        private_redis.resume()
    assert connection.acks == []
    assert wait_until(lambda: int(store.reads.meta("s1")["polls"]) == polls + 1)  # it ran late, and recorded the frame
    pump.flush_acks()
    assert shown_of(store.reads.meta("s1")) == ("The first words", False)
    client.close()


def growing_past_a_first_frame(
    private_redis, wait_ms: int = 0
) -> tuple[redis.Redis, StreamStore, _Connection, ReplyPump]:
    """Stream s1 on a private Redis (a socket timeout of 0.5 s), answered by a pump whose records carry that deadline:
    its first frame, "The first words", acknowledged, and the stream grown past it since."""
    client = redis.Redis(port=private_redis.port, decode_responses=True, socket_timeout=0.5)
    store, outbox, streams = tracked_stream(client, lease_seconds=30)
    connection = _Connection()
    pump = ReplyPump("bot", streams, outbox, lambda: connection, valid_seconds=0.5)
    streams.show("s1", "The first words")
    pump.open("req-1", "s1", streams.poll("s1"))
    connection.acks.pop()({"errcode": 0})
    streams.show("s1", "The first words, and more")
    store.durable.wait_ms = wait_ms  # from here on, the pump's passes wait for a replica (Sentinel, Cluster)
    return client, store, connection, pump


def test_a_record_whose_undo_waited_behind_a_later_failed_pass_is_still_undone(private_redis):
    """Where the pass waits for a replica (Sentinel, Cluster), a pass's poll records its frame; Redis then stops
    answering before the pass's write for a replica, so the frame does not go out; the next pass's poll fails too.
    When Redis is back, the first record is undone, not only the second pass's (seen in the campaign: only the latest
    undo per stream was kept, the first record stood, and the next holder's rest began after text the bubble never
    showed)."""
    client, store, connection, pump = growing_past_a_first_frame(private_redis, wait_ms=50)
    pump.ledger.dead("another")  # an ack noted earlier, for the pass's write to carry
    real_flush = pump.ledger.flush

    def flush_in_a_pause(*args, **kwargs):
        private_redis.pause()  # after the pass's poll recorded its frame
        pump.ledger.flush = real_flush
        return real_flush(*args, **kwargs)

    pump.ledger.flush = flush_in_a_pause
    try:
        pump.pump()  # recorded, then its write fails: the frame does not go out
        assert store.client is client and connection.acks == []
        pump.pump()  # the next pass's poll fails (and Redis refuses it as late when it resumes)
    finally:
        time.sleep(0.8)  # past the records' deadline
        private_redis.resume()
    pump.flush_acks()
    assert connection.acks == []
    assert shown_of(store.reads.meta("s1"))[0] == "The first words"
    client.close()


def test_on_one_server_no_call_of_the_pass_stands_between_a_frame_s_record_and_its_frame(redis_client):
    """On one server each poll confirms its own record, and its frame went out only after the pass's other polls
    and its write of the acks: a reply Redis lost in between held the pass for the socket timeout, and a holder
    killed then left a record that no frame followed, so the next holder's rest skipped that text and said nothing
    more followed (seed 46's one-server run). Now the frame goes out before the pass asks Redis anything else."""
    store, outbox, streams = tracked_stream(redis_client, lease_seconds=5)
    store.create("s2", "m2", "holder:1", "bot1", "bob", {"userid": "bob"})
    outbox.track("s2", "req-2", 3, "bob", True)
    connection = _Connection()
    pump = ReplyPump("bot", streams, outbox, lambda: connection)
    for stream_id in ("s1", "s2"):
        pump.open(f"req-{stream_id[1]}", stream_id, streams.poll(stream_id))
        connection.acks.pop()({"errcode": 0})
    streams.show("s1", "The first words")
    streams.show("s2", "Other words")
    out_when_blocked = []
    polled = streams.frame

    def frame(stream_id: str, record: FrameRecord | None) -> Frame:
        if stream_id == "s2":  # its reply is lost: the holder waits, and is killed while it waits
            out_when_blocked.append(len(connection.acks))
            raise redis.TimeoutError("Timeout reading from socket")
        return polled(stream_id, record)

    streams.frame = frame
    pump.pump()
    assert out_when_blocked == [1]  # s1's frame, recorded and confirmed by its poll, was out by then
    assert shown_of(store.reads.meta("s1")) == ("The first words", False)


def test_on_one_server_a_refusal_that_came_before_the_pass_s_write_is_not_taken_for_old_news(redis_client):
    """On one server a pass's frames go out before its write of the acks, which drops what earlier acks said of the
    bubbles the pass recorded anew. A refusal of the pass's own frame may be among them: it stands, and the record
    says the bubble shows what WeCom last took (else the next holder's rest would skip the refused frame's text)."""
    store, streams, connection, pump = answering(redis_client, "The first words")
    streams.show("s1", "The first words, and more")
    taking = connection.send

    def refused_at_once(text, req_id="", on_ack=None):
        went_out = taking(text, req_id, on_ack)
        connection.acks.pop()({"errcode": 40058, "errmsg": "refused"})
        return went_out

    connection.send = refused_at_once
    pump.pump()
    pump.flush_acks()
    assert shown_of(store.reads.meta("s1")) == ("The first words", False)


def test_a_record_of_frames_redis_runs_after_its_writer_gave_up_writes_nothing(private_redis):
    """A record of frames carries a deadline, the Redis socket timeout: one whose reply never came (Redis paused
    with it in its socket) is refused when Redis runs it, so it cannot land after a newer record (seen on Sentinel in
    the 10-minute campaign: a record from before a pause, run after the record of the frame that followed, made the
    next holder send two sentences again)."""
    client, store, connection, pump = growing_past_a_first_frame(private_redis)
    private_redis.pause()
    try:
        pump.pump()  # the record times out: nothing goes out
    finally:
        time.sleep(0.8)  # past the record's deadline
        private_redis.resume()
    time.sleep(0.5)  # a bounded look: Redis has run what it held by now
    assert shown_of(store.reads.meta("s1"))[0] == "The first words"
    pump.pump()  # the next pass records and sends it
    assert shown_of(store.reads.meta("s1"))[0] == "The first words, and more"
    assert connection.acks
    client.close()


def test_an_answer_whose_stream_was_lost_reaches_the_user_once_through_send_msg(ws_gateway, dify, redis_client):
    """A failover can lose a stream's hash a moment after it was made (FAULTS.md): its worker, finding the stream
    gone, hands the whole answer to the outbox, never to a response_url that a long connection cannot count on."""
    _, wecom = ws_gateway()
    dify.script([d.message("The first words, "), d.sleep(1.0), d.message("and the rest."), d.end()])
    message = wecom.deliver_text(WS_BOT_ID, "lose my stream")
    assert wait_until(lambda: len(wecom.frames(message)) >= 2, timeout=10)
    stream_id = wecom.frames(message)[0]["stream"]["id"]
    keys = Keys()
    redis_client.delete(keys.stream(stream_id), keys.stream_chunks(stream_id), keys.stream_lease(stream_id))
    assert wait_until(lambda: wecom.proactive, timeout=20)
    assert outbox_settled(redis_client, WS_BOT_ID)
    [sent] = wecom.proactive
    assert sent["msgtype"] == "markdown" and sent["chatid"] == "alice"
    assert sent["markdown"]["content"].endswith("The first words, and the rest.")


def test_a_kick_redis_cannot_explain_cools_nothing_down(ws_gateway, redis_client, monkeypatch):
    """A failover often changes the connection's holder while Redis cannot answer: a kicked holder that cannot tell
    whether the newcomer is ours must not lock every process out for the cool-down (FAULTS.md: five minutes
    without a holder, 35 messages lost, in a Sentinel run); it stands by, and the connection is held again."""
    gateway, wecom = ws_gateway(wecom_ws_kick_cooldown_seconds=300)
    lease = gateway.bot().connection.holder.lease

    def redis_away(*args, **kwargs):
        raise redis.ConnectionError("Redis unavailable (injected)")

    monkeypatch.setattr(lease, "cool_down", redis_away)
    subscribes = len(wecom.subscribes)
    wecom.kick(WS_BOT_ID)  # a subscriber we cannot place takes the bot
    assert wait_until(lambda: len(wecom.subscribes) > subscribes and wecom.subscribed(WS_BOT_ID) == 1, timeout=20)
    assert not redis_client.exists(Keys().ws_cooldown(WS_BOT_ID))


def test_the_rest_of_a_bubble_that_showed_a_note_below_its_text_is_only_the_rest():
    """A bubble whose last frame showed a form's prompt under its text: the final text does not begin with that
    frame, and before, the whole answer went out again (pure logic)."""
    shown = "You said: hi. Waiting...\n\nPlease review: hi\n\nChoose below."
    assert rest_of("You said: hi. Waiting...APPROVED.", shown) == "APPROVED."
    assert rest_of("Part one.\n\nPart two.", "Part one.\n\nPart") == " two."
    assert rest_of("Thinking done.", "正在思考…") == "Thinking done."  # only the placeholder was shown
    assert rest_of("All of it.", "All of it.") == ""


def test_a_long_connection_answer_is_appended_at_most_once_per_frame_interval(ws_gateway, dify):
    """A bubble on a long connection gets a frame every half second at most, so its answer is written to Redis no
    more often (an LLM's tokens were an append each): 30 deltas over 1.5 s are a handful of appends, whole."""
    gateway, wecom = ws_gateway()
    assert not gateway.bot().streams.worker.deps.append_deadlines  # and they carry no deadline (writer.py)
    pieces = [f"w{n} " for n in range(30)]
    dify.script([step for piece in pieces for step in (d.message(piece), d.sleep(0.05))] + [d.end()])
    before = gateway.appender.appends
    final = wecom.final(wecom.deliver_text(WS_BOT_ID, "many tokens"), timeout=20)
    assert final["stream"]["content"].strip() == "".join(pieces).strip()
    assert gateway.appender.appends - before <= 6  # the first delta, one per 0.5 s, the end


class _Socket:
    """Stands in for a connection's session as the outbox's sender sees it: frames numbered as sent, WeCom's
    reading of them (`read_through`) and the connection's end as the test says."""

    def __init__(self):
        self.sent: list[str] = []
        self.acks: list = []  # each frame's on_ack, for the test to answer
        self.read_through = 0
        self.ended = False

    def send(self, text, req_id="", on_ack=None) -> int:
        self.sent.append(text)
        self.acks.append(on_ack)
        return len(self.sent)

    def received(self, number: int) -> bool:
        return self.read_through >= number


def _sender(streams: _Streams, outbox: Outbox, owner: str, record_wait: float = 0) -> OrphanDelivery:
    """The outbox's sender of process `owner`, its bubbles' text as is and every chat's window open."""
    streams.bubble = SimpleNamespace(placeholder="Thinking…", live=lambda text: text, remainder=lambda rest: rest)
    sends = SimpleNamespace(take=lambda chat, stream_id: 0, give_back=lambda chat, stream_id: None)
    return OrphanDelivery("bot", streams, outbox, owner, sends, record_wait=record_wait)


def orphaned_rest(client) -> tuple[Outbox, OrphanDelivery, Keys]:
    """Stream s1, answered on an earlier connection and now final, left for the outbox's sender of process "p1"."""
    store, outbox, streams = tracked_stream(client, lease_seconds=5)
    streams.show("s1", "The whole answer.", finish=True)
    return outbox, _sender(streams, outbox, "p1"), Keys()


def _sender_beside(pump: ReplyPump, record_wait: float) -> OrphanDelivery:
    """The outbox's sender of another process, "p2", that took the connection of `pump`'s holder."""
    return _sender(pump.streams, pump.outbox, "p2", record_wait)


def test_a_rest_waits_for_a_frozen_holder_to_undo_a_frame_it_recorded_and_never_sent(redis_client):
    """Seed 21's one-server run: a holder recorded its pass's frames, then froze (14 s, past its lease) before it
    wrote them to its socket. A new holder took the connection and sent each answer's rest from those records, 2 s
    before the frozen one woke to undo them: two users missed what those frames would have shown. A record no ack
    confirmed is left that long to its holder, then taken as it stands."""
    store, streams, connection, pump = answering(redis_client, "The first words")
    sender = _sender_beside(pump, record_wait=30)
    socket = _Socket()
    seen_while_frozen = []

    def frozen_before_the_write(text, req_id="", on_ack=None):
        connection.open = False  # its lease ran out while it was frozen: another holder took the connection
        streams.show("s1", "The first words, and more. The end.", finish=True)
        sender.deliver(socket, generation=4, live=set())
        seen_while_frozen.extend(socket.sent)
        return False  # it wakes: the connection has ended

    streams.show("s1", "The first words, and more")
    connection.send = frozen_before_the_write
    pump.pump()  # records the frame, then "freezes" in the write
    pump.flush_acks()  # its keeper writes the undo
    assert seen_while_frozen == []
    sender.deliver(socket, generation=4, live=set())
    assert socket.sent and ", and more. The end." in socket.sent[0]


def test_a_record_made_this_millisecond_is_not_in_doubt_to_a_sender_that_waits_for_none(redis_client):
    """A record's time is its maker's clock rounded to the millisecond, so one made a moment ago may read ahead of
    the sender's clock (by half a millisecond on one host, more across hosts): its age counts as 0, and with no wait
    for records (`record_wait` 0) it is not in doubt and the rest goes. (A run of the suite at e1a797d once sent
    nothing in the test below: a negative age was less than a wait of 0.)"""
    store, streams, connection, pump = answering(redis_client, "The first words")
    streams.frame("s1", FrameRecord("pass-0", 0))  # never confirmed, never acked
    streams.show("s1", "The first words, and more. The end.", finish=True)
    ahead = f"{time.time() + 0.2:.3f}"
    store.client.hset(store.keys.stream("s1"), "ws_sent_at", ahead)
    socket = _Socket()
    _sender_beside(pump, record_wait=0).deliver(socket, generation=4, live=set())
    assert len(socket.sent) == 1 and ", and more. The end." in socket.sent[0]


@pytest.mark.parametrize("passes", [1, 2], ids=["one-pass", "after-a-pass-whose-write-failed"])
def test_a_rest_skips_no_text_of_frames_recorded_by_a_pass_its_holder_never_finished(redis_client, passes):
    """Seed 21's Sentinel run: a holder killed with its last frame recorded, and the user missed what it would have
    shown. A pass's polls record its frames, and the frames go out only once the pass has confirmed them: a record
    with no confirmation never went out (its holder died mid-pass, here after `passes` such passes), and the rest
    begins after the last frame that did."""
    store, streams, connection, pump = answering(redis_client, "The first words")
    for number in range(passes):
        streams.show("s1", "The first words, and more" + " more" * number)
        streams.frame("s1", FrameRecord(f"pass-{number}", pump.ledger.deadline()))  # its confirmation never comes
    streams.show("s1", "The first words, and more more. The end.", finish=True)
    assert shown_of(store.reads.meta("s1")) == ("The first words", False)
    socket = _Socket()
    _sender_beside(pump, record_wait=0).deliver(socket, generation=4, live=set())
    assert len(socket.sent) == 1 and ", and more more. The end." in socket.sent[0]


@pytest.mark.parametrize("acked", [False, True], ids=["record-left-to-its-wait", "record-its-ack-confirmed"])
def test_a_rest_is_sent_from_a_frame_record_its_holder_left_once_it_is_sure(redis_client, acked):
    """A holder killed with a frame recorded leaves no one to undo it: once the wait is over (here none), or at once
    when WeCom's ack of that frame was recorded, the rest begins after what the record says the bubble shows."""
    store, streams, connection, pump = answering(redis_client, "The first words")
    streams.show("s1", "The first words, and more")
    pump.pump()
    if acked:
        connection.acks.pop()({"errcode": 0})
        pump.flush_acks()
    streams.show("s1", "The first words, and more. The end.", finish=True)  # the holder is killed meanwhile
    sender = _sender_beside(pump, record_wait=0 if not acked else 30)
    socket = _Socket()
    sender.deliver(socket, generation=4, live=set())
    assert len(socket.sent) == 1 and ". The end." in socket.sent[0] and "and more" not in socket.sent[0]


def test_a_send_whose_ack_was_lost_is_taken_as_made_once_a_later_frame_is_acked(redis_client):
    """WeCom took the rest and its ack never came: an ack of a frame sent after it says WeCom read it (one socket,
    read in order), so it is marked sent, and never sent again when its claim would have lapsed."""
    outbox, sender, keys = orphaned_rest(redis_client)
    socket = _Socket()
    sender.deliver(socket, generation=4, live=set())
    assert len(socket.sent) == 1 and outbox.marker("s1").startswith("handed p1 ")
    assert redis_client.ttl(keys.ws_outbox("s1")) > 3600  # no claim that lapses into a second send
    sender.deliver(socket, generation=4, live=set())
    assert len(socket.sent) == 1 and outbox.marker("s1").startswith("handed")  # no proof yet: it waits
    socket.read_through = 2  # a later frame (a ping) was acked
    sender.deliver(socket, generation=4, live=set())
    assert outbox.marker("s1").startswith("sent ") and not outbox.tracked("s1")
    sender.deliver(socket, generation=4, live=set())
    assert len(socket.sent) == 1


def test_a_send_wecom_refused_while_redis_was_away_is_sent_again_not_taken_for_made(redis_client, monkeypatch):
    """WeCom refused the rest (busy) as the Redis master was cut off (seed 19's Sentinel run at ab4e2eb): the
    refusal was not recorded, the marker still said `handed`, and the next holder took the rest for made; the user
    never had it. The marker is cleared at a later pass, and the rest goes out again."""
    outbox, sender, _ = orphaned_rest(redis_client)
    socket = _Socket()
    sender.deliver(socket, generation=4, live=set())
    assert len(socket.sent) == 1

    def redis_away(*args, **kwargs):
        raise redis.ConnectionError("Error 111 connecting: Connection refused.")

    with monkeypatch.context() as away:
        away.setattr(outbox, "refused", redis_away)
        socket.acks[0]({"errcode": -1, "errmsg": "system busy"})
    assert outbox.marker("s1").startswith("handed p1 ")
    sender.deliver(socket, generation=4, live=set())  # Redis is back
    assert len(socket.sent) == 2 and outbox.marker("s1").startswith("handed p1 ")
    socket.acks[1]({"errcode": 0})
    assert outbox.marker("s1") == "sent" and not outbox.tracked("s1")


class _MarkRepliesLost:
    """The outbox's compare-and-set as a lost reply leaves it: the mark of a send as handed is made, and its reply
    lost; then redis-py sends it again on a new connection (`again`: it finds the mark made, and answers 0), or the
    caller is told Redis failed."""

    def __init__(self, swap, again: bool):
        self.swap, self.again, self.lost = swap, again, 0

    def run(self, keys, args):
        reply = self.swap.run(keys, args)
        if not args["expected"].startswith("sending ") or self.lost:
            return reply
        self.lost += 1
        if self.again:
            return self.swap.run(keys, args)
        raise redis.ConnectionError("Connection closed by server.")


@pytest.mark.parametrize("again", [True, False], ids=["tried-again", "redis-failed"])
def test_a_rest_whose_mark_as_handed_lost_its_reply_is_still_sent_once(redis_client, monkeypatch, again):
    """The one-server run of seed 53: the holder marked the rest of an answer handed to its socket as Redis lost
    the reply. Its retry found the mark made and took the claim for someone else's, so nothing went out; the mark,
    left saying `handed`, was taken for made by the next holder, and the user never had the rest. Now the holder
    knows its own mark, and sends (tried again) or clears it at its next pass and sends then (Redis failed)."""
    outbox, sender, _ = orphaned_rest(redis_client)
    monkeypatch.setattr(outbox, "_swap", _MarkRepliesLost(outbox._swap, again))
    socket = _Socket()
    sender.deliver(socket, generation=4, live=set())
    assert outbox._swap.lost == 1
    if not again:
        assert socket.sent == [] and outbox.marker("s1").startswith("handed p1 ")
        sender.deliver(socket, generation=4, live=set())  # Redis answers: the mark cleared, the claim let go
        sender.deliver(socket, generation=4, live=set())
    assert len(socket.sent) == 1
    socket.acks[0]({"errcode": 0})
    assert outbox.marker("s1") == "sent" and not outbox.tracked("s1")


class _SettleRepliesLost:
    """The outbox's compare-and-set as a lost reply leaves it when a handed send is settled as made: the mark is
    made, its reply lost, and redis-py sends it again on a new connection, which finds the marker swapped."""

    def __init__(self, swap):
        self.swap, self.lost = swap, 0

    def run(self, keys, args):
        reply = self.swap.run(keys, args)
        if not args["expected"].startswith("handed ") or self.lost:
            return reply
        self.lost += 1
        return self.swap.run(keys, args)


def test_a_made_send_whose_settling_lost_its_reply_still_sends_its_files_once(redis_client, monkeypatch):
    """A send settled as made while Redis lost the reply: the retry found the marker already `sent` and took it
    for another holder's settling, so the answer's files were never uploaded. The settling knows its own mark."""
    outbox, sender, _ = orphaned_rest(redis_client)
    uploaded: list[str] = []
    sender.files = SimpleNamespace(after_answer=uploaded.append)
    monkeypatch.setattr(outbox, "_swap", _SettleRepliesLost(outbox._swap))
    socket = _Socket()
    sender.deliver(socket, generation=4, live=set())
    socket.read_through = 2  # its ack lost, a later frame's taken
    sender.deliver(socket, generation=4, live=set())
    sender.deliver(socket, generation=4, live=set())
    assert outbox._swap.lost == 1 and uploaded == ["s1"] and len(socket.sent) == 1
    assert outbox.marker("s1").startswith("sent ") and not outbox.tracked("s1")


def test_a_send_whose_connection_ended_before_wecom_read_it_is_sent_again(redis_client):
    outbox, sender, _ = orphaned_rest(redis_client)
    first = _Socket()
    sender.deliver(first, generation=4, live=set())
    first.ended = True  # the connection broke with the frame in it: no ack, no later frame read
    second = _Socket()
    sender.deliver(second, generation=5, live=set())  # settles the first send, then sends on the new connection
    sender.deliver(second, generation=5, live=set())
    assert len(first.sent) == 1 and len(second.sent) == 1
    assert outbox.marker("s1").startswith("handed p1 ")


@pytest.mark.parametrize("age", [5, HANDED_WAIT_SECONDS + 1], ids=["just-handed", "handed-long-ago"])
def test_a_send_a_gone_process_handed_to_its_socket_is_taken_for_made_not_sent_again(redis_client, age):
    """Process p0 handed the rest to its socket and died before the ack: its socket still sent it. The next holder
    leaves the marker alone while p0 could still settle it, then takes the send for made."""
    outbox, sender, keys = orphaned_rest(redis_client)
    redis_client.set(keys.ws_outbox("s1"), f"handed {claimant_token('p0')}", ex=SENT_TTL_SECONDS - age)
    socket = _Socket()
    sender.deliver(socket, generation=4, live=set())
    assert socket.sent == []
    if age > HANDED_WAIT_SECONDS:
        assert outbox.marker("s1").startswith("sent ") and not outbox.tracked("s1")
    else:
        assert outbox.marker("s1").startswith("handed p0 ") and outbox.tracked("s1")


def test_a_proactive_rest_whose_ack_wecom_never_sends_is_sent_once(ws_gateway, dify, redis_client, monkeypatch):
    """WeCom takes an aibot_send_msg and its ack is lost (the campaign's ws_send_acks_lost): the holder, alive and
    connected, reads its pongs; the rest is not sent again when its claim would have run out (30 s; 2 s here)."""
    monkeypatch.setattr(outbox_module, "OUTBOX_CLAIM_TTL_SECONDS", 2)
    _, wecom = ws_gateway(wecom_ws_heartbeat_seconds=1.0)
    dify.script([d.message("The first words, "), d.sleep(1.0), d.message("and the rest."), d.end()])
    message = wecom.deliver_text(WS_BOT_ID, "lose my stream")
    assert wait_until(lambda: len(wecom.frames(message)) >= 2, timeout=10)
    stream_id = wecom.frames(message)[0]["stream"]["id"]
    keys = Keys()
    wecom.send_acks_lost = True
    redis_client.delete(keys.stream(stream_id), keys.stream_chunks(stream_id), keys.stream_lease(stream_id))
    assert wait_until(lambda: wecom.proactive, timeout=20)
    assert outbox_settled(redis_client, WS_BOT_ID)
    time.sleep(2 + 2)  # a bounded look: past the claim's 2 s, and an outbox pass after it (a second a pass)
    assert len(wecom.proactive) == 1


@pytest.mark.parametrize("given_up", [False, True], ids=["finished-here", "given-up-by-a-poll"])
def test_the_rest_of_an_answer_a_poll_gave_up_is_made_though_the_outbox_ended_its_bubble(redis_client, given_up):
    """The outbox's pass holds the stream's marker (it sends what the final bubble did not show). For an answer this
    process finished, that is the answer's rest: handed over, not made twice. For an answer a poll gave up while
    its owner still ran (a stall past the lease), what the pass sends is the note that it was given up, not the
    answer: the owner's rest is made all the same (once: the message's own id), and the hand-over says so."""
    from services.longconn.delivery import ConnectionDelivery
    from services.streams.job import StreamJob

    store, outbox, _ = tracked_stream(redis_client, lease_seconds=5)
    assert outbox.claim("s1", claimant_token("the-pass"))
    delivery = ConnectionDelivery(SimpleNamespace(), outbox, "p1", "bot")
    job = StreamJob("s1", "m1", "alice", aibotid="bot1", attempt="holder:1")
    for _ in range(2):  # a try whose reply was lost is made again: one message still
        assert delivery.send(job, "the rest", "rest", 5.0, given_up=given_up)
    assert outbox.posted("rest.s1") is given_up
    assert outbox.marker("s1").startswith("sending the-pass")  # the pass's marker, settled by the pass
