"""The long-connection outbox (services/longconn/outbox.py): which tracked streams no live reply covers any more,
found however many streams are open."""

from __future__ import annotations

from services.keys import Keys
from services.longconn.outbox import PAGE, Outbox
from services.streams.store import StreamStore


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
    assert [stream_id for stream_id, _ in found] == [f"s{live_count:04d}"]
    store.discard("s0001")  # a stream whose keys are gone is dropped from the open set
    redis_client.delete(keys.stream("s0001"))
    outbox.orphans(7, live=set())
    assert redis_client.zscore(keys.ws_open("bot-1"), "s0001") is None
    assert redis_client.zcard(keys.ws_open("bot-1")) == live_count
