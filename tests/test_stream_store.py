"""The Redis side of streams, against the real Redis: atomic dedup, owner-only writes, the poll fold, TTLs."""

import threading
import time

import pytest
import redis

from services.keys import MSGID_TTL_SECONDS, Keys
from services.streams.job import StreamJob
from services.streams.poll_path import PollPath
from services.streams.runner import StreamRunner
from services.streams.store import (
    CLOSED,
    CREATED,
    EXISTING,
    LATE,
    LIMITED,
    RATE_LIMITED,
    TAKEN,
    WRITTEN,
    AppendRequest,
    StreamConflict,
    StreamStore,
)
from services.streams.writer import AppendBatcher
from tests.conftest import KEYS, FirstReplyLost, wait_until

TTL = 3600


@pytest.fixture
def store(redis_client):
    return StreamStore(redis_client, Keys(), TTL, lease_seconds=2)


@pytest.fixture
def polls(store):
    """The poll path of `store`'s streams."""
    path = PollPath(store)
    yield path
    path.close()


def create(store, stream_id, msgid, owner="A", userid="alice", fields=None):
    return store.create(stream_id, msgid, owner, "bot1", userid, fields or {"userid": userid})


def open_stream(store, stream_id="s1", msgid="m1", owner="A", userid="alice"):
    outcome, existing = create(store, stream_id, msgid, owner, userid)
    assert (outcome, existing) == (CREATED, stream_id)
    return stream_id


def poll(store, stream_id="s1", window=330, overflow=20000):
    """A poll of the stream as a replica makes it, taking nothing over."""
    path = PollPath(store)
    try:
        return path.poll(stream_id, window, overflow, "orphan note")
    finally:
        path.close()


def test_create_is_deduplicated_by_msgid(store, redis_client):
    open_stream(store)
    assert create(store, "s2", "m1", "B") == (EXISTING, "s1")
    assert not redis_client.exists("dify_stream:{s2}")
    assert store.reads.stream_for_msgid("m1") == "s1"


def test_concurrent_creates_for_one_msgid_make_one_stream(store):
    results = []
    barrier = threading.Barrier(8)

    def attempt(i):
        barrier.wait()
        results.append(create(store, f"s{i}", "same-msgid", f"R{i}"))

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [sid for outcome, sid in results if outcome == CREATED]
    assert len(winners) == 1
    assert {sid for _, sid in results} == set(winners)


def test_every_key_has_a_ttl(store, redis_client):
    open_stream(store)
    store.append("s1", "A", ["a", "b"], 0)
    for key in (
        "dify_stream:{s1}",
        "dify_stream:{s1}:chunks",
        "dify_stream:{s1}:lease",
        "wecom_msg:m1",
        "inflight:{bot1:alice}",
    ):
        assert redis_client.ttl(key) > 0, key
    assert 0 < redis_client.ttl("wecom_msg:m1") <= MSGID_TTL_SECONDS
    assert redis_client.pttl("dify_stream:{s1}:lease") <= 2000
    store.finish("s1", "A", "done", images=[{"base64": "AA==", "md5": "x"}], feedback={"message_id": "m", "user": "u"})
    assert redis_client.exists("dify_stream:{s1}:images", "feedback:{s1}") == 2
    assert all(redis_client.ttl(k) > 0 for k in redis_client.keys("*"))


def test_a_done_poll_reads_the_images_list_only_when_the_finish_counted_some(store, redis_client):
    for stream_id, images in (("s1", [{"base64": "AA==", "md5": "x"}]), ("s2", [])):
        open_stream(store, stream_id, f"m-{stream_id}")
        store.finish(stream_id, "A", "done", images=images)
    assert poll(store, "s1").images == [{"base64": "AA==", "md5": "x"}]
    assert redis_client.hget("dify_stream:{s2}", "images") == "0"
    redis_client.rpush("dify_stream:{s2}:images", '{"base64": "BB==", "md5": "y"}')
    redis_client.expire("dify_stream:{s2}:images", 60)  # as the finish writes it
    assert poll(store, "s2").images == []  # counted none: the list is not read
    redis_client.hdel("dify_stream:{s2}", "images")  # finished by the release before, which counts none
    assert poll(store, "s2").images == [{"base64": "BB==", "md5": "y"}]


def test_poll_folds_unread_chunks_into_the_cumulative_text(store, redis_client):
    open_stream(store)
    assert poll(store).text == ""
    assert poll(store).status == "pending"
    store.append("s1", "A", ["Hel", "lo"], 0)
    snap = poll(store)
    assert (snap.status, snap.text) == ("streaming", "Hello")
    store.append("s1", "A", [", ", "world"], 2)
    assert poll(store).text == "Hello, world"
    assert redis_client.hget("dify_stream:{s1}", "folded") == "4"
    assert redis_client.lrange("dify_stream:{s1}:chunks", 0, -1) == ["Hel", "lo", ", ", "world"]
    assert redis_client.hget("dify_stream:{s1}", "polls") == "4"


def test_append_is_idempotent_when_a_call_is_retried(store, redis_client):
    open_stream(store)
    assert store.append("s1", "A", ["x", "y"], 0) == WRITTEN
    assert store.append("s1", "A", ["x", "y"], 0) == WRITTEN  # the retry of a call whose reply was lost
    assert redis_client.lrange("dify_stream:{s1}:chunks", 0, -1) == ["x", "y"]
    with pytest.raises(StreamConflict):
        store.append("s1", "A", ["z"], 5)
    assert redis_client.lrange("dify_stream:{s1}:chunks", 0, -1) == ["x", "y"]  # the push was taken back
    assert store.append("s1", "A", ["y", "z"], 1) == WRITTEN  # a retry that overlaps what is there
    assert redis_client.lrange("dify_stream:{s1}:chunks", 0, -1) == ["x", "y", "z"]
    open_stream(store, "s2", "m2", userid="u2")
    with pytest.raises(StreamConflict):  # a failover lost the list this writer counted
        store.append("s2", "A", ["lost"], 1)
    assert not redis_client.exists("dify_stream:{s2}:chunks")


def test_only_the_owner_writes(store):
    open_stream(store)
    assert store.append("s1", "B", ["intruder"], 0) == TAKEN
    assert store.replace("s1", "B", "intruder") == TAKEN
    assert store.finish("s1", "B", "done") is None
    assert poll(store).text == ""


def test_a_long_connection_writer_sends_appends_without_a_deadline(store):
    """Only an answer whose end may go out without Redis (callback mode's response_url, from the text Redis
    confirmed) needs its late appends refused; a long connection's end waits for Redis, so its appends carry no
    deadline, and Redis checks none (a TIME call fewer per append)."""
    batcher = AppendBatcher(5.0)
    assert batcher.writer(store, "s1", "A").take().deadline > time.time()
    assert batcher.writer(store, "s1", "A", deadlines=False).take().deadline == 0


def test_an_append_redis_runs_past_its_deadline_writes_nothing(store):
    """An append whose sender stopped waiting for its reply (Redis was paused with it in its socket) is refused
    when Redis runs it late: it never lands behind the back of a writer that took it for unwritten."""
    open_stream(store)
    [late, timely] = store.append_many(
        [
            AppendRequest("s1", "A", ["stale"], 0, {"note": "x"}, deadline=time.time() - 0.5),
            AppendRequest("s1", "A", ["fresh"], 0, {}, deadline=time.time() + 5),
        ]
    )
    assert (late, timely) == (LATE, WRITTEN)
    assert store.reads.chunks("s1") == ["fresh"]
    assert "note" not in store.reads.meta("s1")


def test_fields_are_set_with_an_append(store, redis_client):
    open_stream(store)
    store.append("s1", "A", [], 0, {"task_id": "t-1", "conversation_id": "c-1"})
    meta = store.reads.meta("s1")
    assert meta["task_id"] == "t-1"
    assert meta["conversation_id"] == "c-1"
    assert meta["status"] == "streaming"
    assert "first_token_at" not in meta
    store.append("s1", "A", ["a"], 0)
    first = store.reads.meta("s1")["first_token_at"]
    store.replace("s1", "A", "")  # the list is empty again: the next delta is not the answer's first
    time.sleep(0.01)
    store.append("s1", "A", ["b"], 0)
    assert store.reads.meta("s1")["first_token_at"] == first


def test_replace_resets_the_text(store):
    open_stream(store)
    store.append("s1", "A", ["bad ", "words"], 0)
    assert poll(store).text == "bad words"
    store.replace("s1", "A", "[moderated]")
    assert poll(store).text == "[moderated]"
    store.append("s1", "A", [" more"], 1)
    assert poll(store).text == "[moderated] more"
    assert store.reads.chunks("s1") == ["[moderated]", " more"]


def test_a_finished_stream_s_keys_stay_at_least_the_ttl_and_a_quick_finish_renews_nothing(store, redis_client):
    for stream_id, msgid, age in (("quick", "m-quick", 0), ("slow", "m-slow", TTL // 10 + 1)):
        open_stream(store, stream_id, msgid)
        store.append(stream_id, "A", ["text"], 0)
        if age:  # opened that long ago
            redis_client.hincrbyfloat(f"dify_stream:{{{stream_id}}}", "created_at", -age)
            for key in (f"dify_stream:{{{stream_id}}}", f"dify_stream:{{{stream_id}}}:chunks"):
                redis_client.expire(key, store.open_ttl - age)
        assert store.finish(stream_id, "A", "done") is not None
    for suffix in ("", ":chunks"):
        quick, slow = (redis_client.ttl(f"dify_stream:{{{s}}}{suffix}") for s in ("quick", "slow"))
        assert TTL < quick <= store.open_ttl  # given at the open, left as it was
        assert TTL - 5 < slow <= TTL  # past a tenth of the TTL: renewed by the finish


def test_finish_records_the_final_state_and_leaves_the_lease_to_run_out(store, redis_client):
    open_stream(store)
    store.append("s1", "A", ["done text"], 0)
    finished = store.finish("s1", "A", "error", {"note": "oops", "error": "stream_cut: x"})
    assert finished is not None
    assert finished.close_reason == ""
    assert finished.closed_bytes == 0
    snap = poll(store)
    assert (snap.status, snap.text, snap.note, snap.active) == ("error", "done text", "oops", False)
    assert 0 < redis_client.pttl("dify_stream:{s1}:lease") <= store.lease_ms  # nothing reads it any more
    assert store.finish("s1", "A", "done") is None
    assert store.append("s1", "A", ["late"], 1) == CLOSED
    assert store.append("never-existed", "A", ["x"], 0) == CLOSED


def test_a_finish_whose_list_lacks_confirmed_deltas_writes_nothing(store, redis_client):
    open_stream(store)
    assert store.append("s1", "A", ["one ", "two"], 0) == WRITTEN
    redis_client.rpop("dify_stream:{s1}:chunks")  # a failover lost the last append after Redis confirmed it
    with pytest.raises(StreamConflict):
        store.finish("s1", "A", "done", chunks=2)
    assert redis_client.hget("dify_stream:{s1}", "status") == "streaming"
    assert store.finish("s1", "A", "done", chunks=1) is not None


def test_unknown_stream_polls_as_none(store):
    assert poll(store, "nope") is None


def test_lost_lease_makes_the_stream_expired_on_the_next_poll(store, redis_client):
    open_stream(store)
    store.append("s1", "A", ["partial"], 0)
    redis_client.delete("dify_stream:{s1}:lease")  # the owner died and its lease ran out
    assert poll(store).status == "streaming"  # text came since the last poll: its writer lived a moment ago
    snap = poll(store)
    assert (snap.status, snap.text, snap.note) == ("expired", "partial", "orphan note")
    assert redis_client.hget("dify_stream:{s1}", "error") == "owner_lost"
    assert store.append("s1", "A", ["zombie"], 1) == CLOSED


def test_finishing_a_stream_a_poll_gave_up_tells_its_owner_so(store, redis_client):
    open_stream(store)
    store.append("s1", "A", ["every word"], 0)
    poll(store)
    redis_client.delete("dify_stream:{s1}:lease")  # lost in a failover, though the owner lives
    assert poll(store).status == "expired"
    assert store.finish("s1", "A", "done").orphaned
    assert store.finish("s1", "B", "done") is None  # not B's to end
    assert redis_client.hget("dify_stream:{s1}", "status") == "expired"  # nothing else was written
    finished = store.finish(open_stream(store, "s2", "m2"), "A", "done")
    assert not finished.orphaned
    assert store.finish("s2", "A", "done") is None  # a retried finish whose reply was lost sends nothing again


def test_a_poll_takes_over_a_dead_owners_stream_when_nothing_was_shown(store, polls, redis_client):
    open_stream(store, owner="A")
    redis_client.delete("dify_stream:{s1}:lease")
    snap = polls.poll("s1", 330, 20000, "orphan note", taker="B")
    assert snap.taken_over
    assert snap.status == "pending"
    assert snap.text == ""
    meta = redis_client.hgetall("dify_stream:{s1}")
    assert snap.attempt == meta["owner"] == "B#2"  # the stream's second attempt, made by B
    assert meta["restarts"] == "1"
    assert meta["taken_over_at"]
    assert redis_client.get("dify_stream:{s1}:lease") == "B#2"
    assert store.append("s1", "A", ["old owner"], 0) == TAKEN  # the old owner, if alive, must stop
    assert store.append("s1", "B#2", ["new owner"], 0) == WRITTEN


def test_the_live_owners_own_poll_takes_its_lost_lease_back_and_starts_nothing(store, polls, redis_client):
    """Its process still runs the stream (it lost only its lease): no take-over, no second attempt beside it."""
    open_stream(store)
    redis_client.delete("dify_stream:{s1}:lease")
    snap = polls.poll("s1", 330, 20000, "orphan note", taker="A", taker_runs_it=True)
    assert not snap.taken_over and not snap.resumed and snap.event == "" and snap.active
    assert redis_client.get("dify_stream:{s1}:lease") == "A"
    assert "restarts" not in redis_client.hgetall("dify_stream:{s1}")
    redis_client.delete("dify_stream:{s1}:lease")  # another process's poll still takes it over
    assert polls.poll("s1", 330, 20000, "orphan note", taker="B", taker_runs_it=False).taken_over


def test_each_attempt_has_a_token_of_its_own_and_a_superseded_one_can_write_nothing(store, polls, redis_client):
    """Fencing: the same process's earlier attempt is refused once a later one took the stream (its token is not
    the process's name, which both share)."""
    open_stream(store, owner="P#1")
    redis_client.delete("dify_stream:{s1}:lease")
    own_process = polls.poll("s1", 330, 20000, "orphan note", taker="P", taker_runs_it=True)
    assert own_process.event == "" and redis_client.get("dify_stream:{s1}:lease") == "P#1"  # the same attempt
    redis_client.delete("dify_stream:{s1}:lease")
    snap = polls.poll("s1", 330, 20000, "orphan note", taker="P", taker_runs_it=False)  # P no longer runs it
    assert snap.taken_over and snap.attempt == "P#2"
    assert store.append("s1", "P#1", ["late"], 0) == TAKEN
    assert store.replace("s1", "P#1", "late") == TAKEN
    assert store.leases.renew({"s1": "P#1"}) == ["s1"]
    assert store.leases.release({"s1": "P#1"}) == 0
    assert store.finish("s1", "P#1", "done") is None
    assert store.reads.superseded("s1", "P#1") and not store.reads.superseded("s1", "P#2")
    assert store.append("s1", "P#2", ["answer"], 0) == WRITTEN
    assert store.finish("s1", "P#2", "done") is not None


def test_a_superseded_attempt_learns_it_was_taken_even_once_its_successor_finished(store, polls, redis_client):
    """Not 'closed' (which would make it send its whole answer through response_url again): its successor
    answered the user."""
    open_stream(store, owner="P#1")
    redis_client.delete("dify_stream:{s1}:lease")
    assert polls.poll("s1", 330, 20000, "orphan note", taker="Q").attempt == "Q#2"
    assert store.finish("s1", "Q#2", "done") is not None
    assert store.append("s1", "P#1", ["late"], 0) == TAKEN
    assert store.replace("s1", "P#1", "late") == TAKEN
    assert store.append("gone", "P#1", ["late"], 0) == CLOSED  # a stream that is gone: the answer goes another way


def test_a_missing_lease_is_taken_over_only_after_the_grace_its_living_owner_has_to_take_it_back(redis_client):
    store = StreamStore(redis_client, Keys(), TTL, 2, takeover_grace_seconds=0.5)
    polls = PollPath(store)
    open_stream(store, owner="P#1")
    redis_client.delete("dify_stream:{s1}:lease")  # a Redis pause outlasted the lease; its owner lives
    noted = polls.poll("s1", 330, 20000, "orphan note", taker="Q")
    assert noted.event == "" and noted.active
    assert redis_client.hget("dify_stream:{s1}", "lease_missing_at")
    assert store.leases.renew({"s1": "P#1"}) == []  # the owner's keeper takes it back
    assert redis_client.get("dify_stream:{s1}:lease") == "P#1"
    assert not redis_client.hget("dify_stream:{s1}", "lease_missing_at")
    redis_client.delete("dify_stream:{s1}:lease")  # now its owner is dead
    assert polls.poll("s1", 330, 20000, "orphan note", taker="Q").event == ""
    assert polls.poll("s1", 330, 20000, "orphan note", taker="Q").event == ""  # within the grace
    time.sleep(0.6)
    assert polls.poll("s1", 330, 20000, "orphan note", taker="Q").taken_over


def test_a_queued_stream_is_taken_once_with_a_new_token(store, redis_client):
    open_stream(store, owner="P#1")
    taken = store.take("s1", "P#1", "Q")
    assert (taken.attempt, taken.counted_call) == ("Q#2", "new")  # the Dify call it makes next, counted
    assert (taken.meta["userid"], taken.meta["owner"], taken.meta["run"]) == ("alice", "Q#2", "2")
    stored = redis_client.hgetall("dify_stream:{s1}")
    assert stored.pop("dify_calls") == "1"
    assert taken.meta == {**stored, "updated_at": taken.meta["updated_at"]}
    assert store.count_dify_call("s1", "Q#2") == "duplicate"  # a second new call for the message
    assert store.count_dify_call("s1", "P#1") == TAKEN  # the opener's: no call (its process froze, and woke)
    assert store.take("s1", "P#1", "R") is None  # taken already
    assert redis_client.get("dify_stream:{s1}:lease") == "Q#2"
    assert store.append("s1", "P#1", ["opener"], 0) == TAKEN
    assert store.append("s1", "Q#2", ["taker"], 0) == WRITTEN


def test_a_queued_form_task_is_taken_without_counting_a_call(store, redis_client):
    outcome, _ = store.create("s1", "m1", "P#1", "bot1", "alice", {"userid": "alice", "form_task": "t1"})
    assert outcome == CREATED
    taken = store.take("s1", "P#1", "Q")
    assert (taken.attempt, taken.counted_call, taken.meta["form_task"]) == ("Q#2", "", "t1")
    assert redis_client.hget("dify_stream:{s1}", "dify_calls") is None


def test_a_stream_is_restarted_only_once(store, polls, redis_client):
    open_stream(store, owner="A")
    redis_client.delete("dify_stream:{s1}:lease")
    assert polls.poll("s1", 330, 20000, "orphan note", taker="B").taken_over
    redis_client.delete("dify_stream:{s1}:lease")  # B dies too
    snap = polls.poll("s1", 330, 20000, "orphan note", taker="C")
    assert not snap.taken_over
    assert snap.status == "expired"


def test_no_takeover_once_something_was_shown(store, polls, redis_client):
    open_stream(store, "s1", "m1")
    store.append("s1", "A", ["shown"], 0)
    polls.poll("s1", 330, 20000, "orphan note", taker="B")  # it is shown
    redis_client.delete("dify_stream:{s1}:lease")
    assert polls.poll("s1", 330, 20000, "orphan note", taker="B").status == "expired"


def test_a_process_that_takes_no_stream_leaves_an_orphan_to_one_that_does_within_the_window(store, polls, redis_client):
    open_stream(store, "s2", "m2")
    redis_client.delete("dify_stream:{s2}:lease")
    left = polls.poll("s2", 330, 20000, "orphan note", taker="")  # draining, or at STREAM_MAX_ACTIVE
    assert (left.status, left.event) == ("pending", "")
    assert polls.poll("s2", 330, 20000, "orphan note", taker="C").taken_over
    open_stream(store, "s3", "m3")
    redis_client.delete("dify_stream:{s3}:lease")
    redis_client.hset("dify_stream:{s3}", "created_at", time.time() - 400)  # WeCom stops polling: end it
    assert polls.poll("s3", 330, 20000, "orphan note", taker="").status == "expired"


def test_release_hands_streams_over(store, redis_client):
    open_stream(store, "s1", "m1", owner="A")
    open_stream(store, "s2", "m2", owner="A")
    redis_client.set("dify_stream:{s2}:lease", "B", ex=30)
    assert store.leases.release({"s1": "A", "s2": "A"}) == 1
    assert not redis_client.exists("dify_stream:{s1}:lease")
    assert redis_client.get("dify_stream:{s2}:lease") == "B"
    assert redis_client.hget("dify_stream:{s1}", "handed_over_at")


def test_renewal_ignores_streams_that_are_gone_or_final(store, redis_client):
    open_stream(store, "s1", "m1")
    store.finish("s1", "A", "done")
    redis_client.delete("dify_stream:{s1}:lease")  # a final stream's lease runs out
    assert store.leases.renew({"s1": "A", "gone": "A"}) == []
    assert not redis_client.exists("dify_stream:{s1}:lease")
    assert not redis_client.exists("dify_stream:{gone}:lease")


def test_window_close_is_flagged_once_the_stream_is_too_old(store, redis_client):
    open_stream(store)
    store.append("s1", "A", ["so far"], 0)
    assert not poll(store, window=330).close_reason
    redis_client.hset("dify_stream:{s1}", "created_at", f"{time.time() - 400:.3f}")
    snap = poll(store, window=330)
    assert (snap.close_reason, snap.closed_bytes, snap.active) == ("window", 6, True)
    assert redis_client.hget("dify_stream:{s1}", "closed_at")
    assert snap.freed_inflight_key == "inflight:{bot1:alice}"  # the bubble is done for WeCom: its slot is free
    store.release_inflight(snap.freed_inflight_key, "s1")
    assert redis_client.zcard("inflight:{bot1:alice}") == 0
    store.append("s1", "A", [" and later"], 1)
    assert poll(store, window=330).closed_bytes == 6  # closed once, with the text it had then
    finished = store.finish("s1", "A", "done")
    assert (finished.close_reason, finished.closed_bytes) == ("window", 6)


def test_overflow_closes_the_bubble(store):
    open_stream(store)
    store.append("s1", "A", ["x" * 50], 0)
    assert poll(store, overflow=100).close_reason == ""
    store.append("s1", "A", ["y" * 60], 1)
    snap = poll(store, overflow=100)
    assert (snap.close_reason, snap.closed_bytes) == ("overflow", 110)


def test_a_watch_s_look_neither_closes_a_live_bubble_nor_counts_as_its_poll(store, redis_client):
    """The watch over answers whose rest follows looks at live bubbles too (counted NEVER): what WeCom's polls show
    decides when a bubble closes, and whether any poll ever showed it."""
    from services.streams.poll_path import NEVER

    open_stream(store)
    store.append("s1", "A", ["x" * 150], 0)
    path = PollPath(store)
    try:
        look = path.poll("s1", 330, 100, "orphan note", counted=NEVER)
        assert (look.close_reason, look.text) == ("", "x" * 150)
        assert store.reads.polls("s1") == 0
        store.finish("s1", "A", "done")
        assert path.poll("s1", 330, 100, "orphan note", counted=NEVER).status == "done"
        assert store.reads.polls("s1") == 0  # an ended bubble's look neither
    finally:
        path.close()
    assert poll(store, overflow=100).close_reason == ""  # ended live: WeCom's poll shows it whole with its note
    assert store.reads.polls("s1") == 1


def test_in_flight_limit_is_three_open_bubbles_per_user(store, redis_client):
    for i in range(3):
        open_stream(store, f"s{i}", f"m{i}")
    assert create(store, "s3", "m3") == (LIMITED, "s3")  # the stream exists; the caller ends it with the reason
    assert store.reads.stream_for_msgid("m3") == "s3"  # so a retry of that message gets the same refusal
    assert len(store.reads.open_streams("bot1", "alice")) == 3
    assert create(store, "s0-again", "m0") == (EXISTING, "s0")  # a retry is never refused
    assert create(store, "t1", "n1", userid="bob")[0] == CREATED  # other users are not affected
    finished = store.finish("s0", "A", "done")
    store.release_inflight(finished.inflight_key, "s0")
    assert len(store.reads.open_streams("bot1", "alice")) == 2
    assert create(store, "s4", "m4")[0] == CREATED


def test_a_refused_stream_leaves_its_user_s_sets_as_they_were(redis_client):
    store = StreamStore(redis_client, Keys(), TTL, lease_seconds=2, rate_limit=1)
    redis_client.zadd("ratelimit:{bot1:alice}", {"earlier": time.time()})
    redis_client.expire("ratelimit:{bot1:alice}", 60)
    assert create(store, "s1", "m1") == (RATE_LIMITED, "s1")  # counted into the set, then taken out
    assert not redis_client.exists("inflight:{bot1:alice}")  # the set it created is gone: no key without a TTL
    for i in range(3):
        redis_client.zadd("inflight:{bot1:bob}", {f"open{i}": time.time() + 300})
    redis_client.expire("inflight:{bot1:bob}", 400)
    assert create(store, "t1", "n1", userid="bob") == (LIMITED, "t1")
    assert redis_client.zrange("inflight:{bot1:bob}", 0, -1) == ["open0", "open1", "open2"]
    assert 0 < redis_client.ttl("inflight:{bot1:bob}") <= 400
    assert all(redis_client.ttl(k) > 0 for k in redis_client.keys("*"))


def test_stale_in_flight_entries_expire_by_score(store, redis_client):
    for i in range(3):
        open_stream(store, f"s{i}", f"m{i}")
    redis_client.zadd("inflight:{bot1:alice}", {"s0": time.time() - 1})  # e.g. its replica died long ago
    assert create(store, "s3", "m3")[0] == CREATED


def test_the_rate_limit_is_a_sliding_window(redis_client):
    store = StreamStore(redis_client, Keys(), TTL, lease_seconds=2, rate_limit=2)
    for i in range(2):
        finished = store.finish(open_stream(store, f"s{i}", f"m{i}"), "A", "done")
        store.release_inflight(finished.inflight_key, f"s{i}")
    assert create(store, "s2", "m2") == (RATE_LIMITED, "s2")
    assert redis_client.zcard("ratelimit:{bot1:alice}") == 2  # a refused message is not counted
    # s0 was admitted 59 s ago: still inside the window, wherever the minute's edge lies
    redis_client.zadd("ratelimit:{bot1:alice}", {"s0": time.time() - 59})
    assert create(store, "s3", "m3") == (RATE_LIMITED, "s3")
    redis_client.zadd("ratelimit:{bot1:alice}", {"s0": time.time() - 61})  # now it has left the window
    assert create(store, "s4", "m4")[0] == CREATED
    assert 0 < redis_client.ttl("ratelimit:{bot1:alice}") <= 60


def test_record_only_touches_existing_streams(store, redis_client):
    open_stream(store)
    assert store.record("s1", {"rest_sent": "yes"})
    assert redis_client.hget("dify_stream:{s1}", "rest_sent") == "yes"
    assert not store.record("gone", {"rest_sent": "yes"})
    assert not redis_client.exists("dify_stream:{gone}")


def test_lease_renewal_keeps_reacquires_and_reports_lost(store, redis_client):
    open_stream(store, "s1", "m1", "A")
    open_stream(store, "s2", "m2", "A")
    open_stream(store, "s3", "m3", "A")
    redis_client.delete("dify_stream:{s2}:lease")  # expired, nobody else took it: ours again
    redis_client.set("dify_stream:{s3}:lease", "B", ex=30)  # taken over by replica B
    lost = store.leases.renew({"s1": "A", "s2": "A", "s3": "A"})
    assert lost == ["s3"]
    assert redis_client.get("dify_stream:{s2}:lease") == "A"
    assert redis_client.pttl("dify_stream:{s1}:lease") > 1500


def test_an_append_renews_the_lease_when_asked_and_only_its_owner_s(store, redis_client):
    open_stream(store, "s1", "m1", "A")
    redis_client.pexpire("dify_stream:{s1}:lease", 100)
    store.append_many([AppendRequest("s1", "A", ["a"], 0, {}, lease_ms=0)])
    assert redis_client.pttl("dify_stream:{s1}:lease") <= 100  # not asked: left alone
    store.append_many([AppendRequest("s1", "A", ["b"], 1, {}, lease_ms=2000)])
    assert redis_client.pttl("dify_stream:{s1}:lease") > 1500
    redis_client.delete("dify_stream:{s1}:lease")  # lost in a failover, though its owner lives
    redis_client.hset("dify_stream:{s1}", "lease_missing_at", time.time())  # and a poll noted it
    store.append_many([AppendRequest("s1", "A", ["c"], 2, {}, lease_ms=2000)])
    assert redis_client.get("dify_stream:{s1}:lease") == "A"  # taken back, as the keeper would
    assert not redis_client.hexists("dify_stream:{s1}", "lease_missing_at")
    redis_client.set("dify_stream:{s1}:lease", "B#2", px=100)
    redis_client.hset("dify_stream:{s1}", "owner", "B#2")  # taken over
    assert store.append_many([AppendRequest("s1", "A", ["d"], 3, {}, lease_ms=2000)]) == [TAKEN]
    assert redis_client.get("dify_stream:{s1}:lease") == "B#2"
    assert redis_client.pttl("dify_stream:{s1}:lease") <= 100


def test_a_writing_attempt_s_lease_is_renewed_by_its_appends_and_a_quiet_one_s_by_the_keeper(redis_client, monkeypatch):
    """A 6 s lease is renewed before it is 2 s old (the renewal interval): by the appends from 1.5 s on, by the
    keeper from 1.8 s on; an attempt that appends every 50 ms renews its own, so a stall of 0.3 s in the appends
    would be needed for the keeper to come first."""
    store = StreamStore(redis_client, Keys(), TTL, lease_seconds=6)
    runner, batcher = StreamRunner(10, lease_seconds=6), AppendBatcher()
    renewed_by_keeper: list[str] = []
    real_renew = store.leases.renew

    def renew_leases(attempts):
        renewed_by_keeper.extend(attempts)
        return real_renew(attempts)

    monkeypatch.setattr(store.leases, "renew", renew_leases)
    open_stream(store, "s1", "m1", "A")
    left: dict[str, list[int]] = {"appending": [], "quiet": []}
    while_appending: list[str] = []

    def work(cancelled, lease):
        writer = batcher.writer(store, "s1", "A", lease=lease)
        started = time.monotonic()
        while time.monotonic() - started < 4.0:  # without a renewal, 2 s would be left of the lease by now
            writer.add(["x"])
            writer.flush(2.0)
            left["appending"].append(redis_client.pttl("dify_stream:{s1}:lease"))
            time.sleep(0.05)
        while_appending.extend(renewed_by_keeper)
        while time.monotonic() - started < 6.5:  # no append (a quiet Dify socket) for longer than an interval
            left["quiet"].append(redis_client.pttl("dify_stream:{s1}:lease"))
            time.sleep(0.05)

    job = StreamJob(stream_id="s1", msgid="m1", userid="alice", attempt="A")
    assert runner.start(job, work, store, "bot1")
    assert wait_until(lambda: not runner.is_running("s1"), timeout=15)
    runner.stop()
    assert while_appending == []  # its appends kept the lease: the keeper had nothing to renew
    assert min(left["appending"]) > 3500  # renewed by the appends, never older than the interval and a little
    assert set(renewed_by_keeper) == {"s1"}  # the quiet attempt's
    assert min(left["quiet"]) > 3500
    assert len(store.reads.chunks("s1")) == len(left["appending"])


def test_key_prefix_namespaces_every_key(redis_client):
    store = StreamStore(redis_client, Keys("tenant1:"), TTL, 2)
    create(store, "s1", "m1")
    store.append("s1", "A", ["x"], 0)
    assert set(redis_client.keys("*")) == {
        "tenant1:dify_stream:{s1}",
        "tenant1:dify_stream:{s1}:chunks",
        "tenant1:dify_stream:{s1}:lease",
        "tenant1:wecom_msg:m1",
        "tenant1:inflight:{bot1:alice}",
    }


def test_append_many_gives_each_stream_its_own_result(store, redis_client):
    open_stream(store, "a", "ma")
    open_stream(store, "b", "mb", owner="B")
    open_stream(store, "c", "mc")
    store.finish("c", "A", "done")
    open_stream(store, "d", "md", userid="bob")
    requests = [
        AppendRequest("a", "A", ["a1", "a2"], 0, {"task_id": "t"}),
        AppendRequest("b", "A", ["x"], 0, {}),
        AppendRequest("c", "A", ["late"], 0, {}),
        AppendRequest("d", "A", ["d1"], 5, {}),
        AppendRequest("gone", "A", ["?"], 0, {}),
    ]
    results = store.append_many(requests)
    assert results[:3] == [WRITTEN, TAKEN, CLOSED]
    assert isinstance(results[3], StreamConflict)
    assert results[4] == CLOSED
    assert store.reads.chunks("a") == ["a1", "a2"]
    assert redis_client.hget("dify_stream:{a}", "task_id") == "t"
    assert store.append_many(requests[:1]) == [WRITTEN]  # the retry of an applied call changes nothing
    assert store.reads.chunks("a") == ["a1", "a2"]


def test_writers_send_concurrent_streams_together(store, redis_client):
    from services.streams.writer import AppendBatcher

    streams = [f"s{i}" for i in range(40)]
    for i, stream_id in enumerate(streams):
        open_stream(store, stream_id, f"m{i}", userid=f"u{i}")
    batcher = AppendBatcher()
    barrier = threading.Barrier(len(streams))

    def write(stream_id):
        writer = batcher.writer(store, stream_id, "A")
        barrier.wait()
        for n in range(5):
            writer.add([f"{stream_id}-{n}"], {"task_id": f"t{n}"} if n == 0 else None)
        writer.flush(5)
        assert writer.written == 5
        assert writer.state == WRITTEN
        assert writer.error is None

    threads = [threading.Thread(target=write, args=(s,)) for s in streams]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(store.reads.chunks(s) == [f"{s}-{n}" for n in range(5)] for s in streams)
    assert redis_client.hget("dify_stream:{s0}", "task_id") == "t0"
    # deltas that arrived while a stream's append was in flight went out together, in batches of many streams
    assert batcher.appends < 200
    assert batcher.batches < batcher.appends


def test_a_paced_writer_appends_at_once_then_at_most_once_per_pace_and_a_flush_goes_at_once(store):
    """A long connection's bubble gets a frame every half second at most, so its answer's writer is paced: the first
    delta goes at once (the first frame shows it), what comes within the pace waits for it and goes in one append,
    and the answer's end (a flush) does not wait."""
    from services.streams.writer import AppendBatcher

    open_stream(store, "slow", "m1")
    open_stream(store, "fast", "m2", userid="u2")
    batcher = AppendBatcher()
    slow = batcher.writer(store, "slow", "A", pace=30.0)
    slow.add(["first"])
    assert wait_until(lambda: slow.written == 1, timeout=5)
    for delta in ("a", "b", "c"):
        slow.add([delta])
    time.sleep(0.3)  # a bounded look: within its 30 s pace, nothing more is written
    assert store.reads.chunks("slow") == ["first"]
    slow.flush(5)
    assert store.reads.chunks("slow") == ["first", "a", "b", "c"]
    assert batcher.appends == 2
    fast = batcher.writer(store, "fast", "A", pace=0.2)
    fast.add(["x"])
    fast.add(["y"])
    assert wait_until(lambda: fast.written == 2, timeout=5)  # its pace over, the rest goes without a flush
    assert store.reads.chunks("fast") == ["x", "y"]


def test_a_writer_reports_taken_and_closed(store):
    from services.streams.writer import AppendBatcher

    open_stream(store, "mine", "m1", owner="A")
    open_stream(store, "theirs", "m2", owner="B")
    batcher = AppendBatcher()
    taken, closed = batcher.writer(store, "theirs", "A"), batcher.writer(store, "gone", "A")
    for writer in (taken, closed):
        writer.add(["x"])
        writer.flush(5)
    assert taken.state == TAKEN
    assert closed.state == CLOSED
    taken.add(["more"])  # nothing more goes to Redis
    taken.flush(5)
    assert store.reads.chunks("theirs") == []


def test_a_failed_append_keeps_its_deltas_in_order_for_the_next_try(redis_client, private_redis):
    from services.redis_conn import connect_redis
    from services.streams.writer import AppendBatcher

    store = StreamStore(connect_redis(private_redis.url, 0.3), Keys(), TTL, 30)
    open_stream(store, "s1", "m1")
    writer = AppendBatcher().writer(store, "s1", "A")
    writer.add(["one "])
    writer.flush(5)
    private_redis.pause()
    writer.add(["two "])
    with pytest.raises(redis.RedisError):
        writer.flush(5)
    writer.add(["three"])
    private_redis.resume()
    writer.flush(5)
    assert store.reads.chunks("s1") == ["one ", "two ", "three"]
    assert writer.error is None


def test_a_retry_that_grew_skips_what_the_lost_call_already_wrote(store):
    open_stream(store)
    assert store.append("s1", "A", ["a", "b"], 0) == WRITTEN  # ran, but its reply was lost
    assert store.append("s1", "A", ["a", "b", "c"], 0) == WRITTEN  # the retry carries what arrived meanwhile
    assert store.reads.chunks("s1") == ["a", "b", "c"]


def test_dify_calls_are_counted_by_kind(store, polls, redis_client):
    open_stream(store, owner="A#1")
    assert store.count_dify_call("s1", "A#1") == "new"
    redis_client.delete("dify_stream:{s1}:lease")
    assert polls.poll("s1", 330, 20000, "orphan note", taker="B").taken_over
    taker = redis_client.hget("dify_stream:{s1}", "owner")
    assert store.count_dify_call("s1", "A#1") == TAKEN  # the superseded attempt makes no call, and none is counted
    assert store.count_dify_call("s1", taker) == "restart"  # the documented restart of an answer that showed nothing
    assert store.count_dify_call("s1", taker) == "duplicate"
    assert store.count_dify_call("gone", "A#1") == "new"  # a stream that is gone keeps no count
    assert not redis_client.exists("dify_stream:{gone}")


def test_a_stream_its_user_stopped_before_the_call_makes_none(store):
    open_stream(store, owner="A#1")
    assert store.stop("s1", "stopped") is not None
    assert store.count_dify_call("s1", "A#1") == TAKEN


def test_a_card_is_handed_again_to_its_own_poll_run_twice_and_to_no_other(store, polls, redis_client):
    """A poll whose script ran on Redis and whose reply was lost with its connection is sent again by the client, with
    the same token: that run must hand out the card again (the first reply, which carried it, never came back), while
    any other poll finds it given (WeCom takes one card per message). Before, the second run found the card shown, and
    the form waited for a tap that could not come (the 10-minute Cluster run of 2026-11-27, under
    `redis_replies_lost`)."""
    open_stream(store)
    redis_client.hset(KEYS.stream("s1"), "card", '{"card_type": "button_interaction"}')
    first = polls.poll("s1", 330, 20000, "orphan note", token="t1")
    again = polls.poll("s1", 330, 20000, "orphan note", token="t1")
    other = polls.poll("s1", 330, 20000, "orphan note", token="t2")
    assert first.card == again.card == {"card_type": "button_interaction"}
    assert other.card is None


def test_a_poll_whose_reply_redis_lost_still_carries_its_card(store, redis_client):
    """The same through a link that loses the poll's reply: redis-py sends the script again on a new connection."""
    from bench.faults.proxy import FaultyLink
    from services.redis_conn import connect_redis

    open_stream(store)
    redis_client.hset(KEYS.stream("s1"), "card", '{"card_type": "button_interaction"}')
    kwargs = redis_client.connection_pool.connection_kwargs
    link = FaultyLink(kwargs["port"]).start()
    client = connect_redis(f"redis://127.0.0.1:{link.port}/{kwargs.get('db', 0)}")
    path = PollPath(StreamStore(client, Keys(), TTL, lease_seconds=2))
    try:
        path.poll("s1", 330, 20000, "orphan note", token="warm")  # connected: the next reply is the poll's
        redis_client.hdel(KEYS.stream("s1"), "card_shown", "card_by")
        link.lose_replies(0.5, FirstReplyLost())
        snapshot = path.poll("s1", 330, 20000, "orphan note", token="t1")
        assert snapshot.card == {"card_type": "button_interaction"}
    finally:
        path.close()
        link.stop()
        client.close()
