"""The poll path: what a poll of a stream does in Redis, one script (scripts.POLL) that folds the unread deltas into
the bubble's text and, in the same step, closes a bubble past its window or size, takes over or resumes an answer
whose replica died, and hands out a waiting card. Polls come from the request threads of every replica, thousands a
second, so they run on connections of their own (redis_conn.HotPathConnections), and under Sentinel a watch of the
master keeps those connections off a master that was failed over.

Also here: the card a poll's lost reply gives back.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import orjson

from services.loops import LazyThread, run_until
from services.lua import LuaScript
from services.redis_conn import HotPathConnections
from services.streams import scripts
from services.streams.store import ACTIVE_STATUSES, StreamStore, script_now

# Under Sentinel, how often each process asks the sentinels where the master is, for the poll path (_watch_master);
# and a poll reply slower than this may come from a master that was paused past its failover: the master is asked for.
MASTER_WATCH_SECONDS = 1.0
STALLED_READ_SECONDS = 1.0


@dataclass(slots=True)
class Snapshot:
    """What a poll sees: status, the cumulative answer, the final note, and whether the bubble closed early."""

    status: str
    text: str
    note: str
    close_reason: str = ""
    closed_bytes: int = 0
    has_response_url: bool = False
    event: str = ""  # what this poll just did: taken_over, resumed, expired, closed_window, closed_overflow, or ""
    freed_inflight_key: str = ""  # the bubble just closed: the user's in-flight set the stream must leave
    attempt: str = ""  # taken over or resumed: the fencing token of the attempt the poller must start
    prompt: str = ""  # shown below a live bubble's text: a form waiting for its answer says what to do
    card: dict | None = None  # a template card this reply carries (given once per stream)
    recorded: str = ""  # the frame record asked of this poll: "yes", "late" (Redis ran it past its deadline), or ""
    shows: int = 0  # recorded: how many bytes of the text the frame shows (all, or what showed when it closed early)
    files: str = ""  # a recorded frame of a done stream: the answer's files (JSON), which its holder sends next
    images: list[dict] = field(default_factory=list)
    owed: str = ""  # a bubble closed early whose answer was given up: what its response_url owes (StreamService.look)

    @property
    def taken_over(self) -> bool:
        return self.event == "taken_over"

    @property
    def resumed(self) -> bool:
        return self.event == "resumed"

    @property
    def active(self) -> bool:
        return self.status in ACTIVE_STATUSES


@dataclass(frozen=True, slots=True)
class FrameRecord:
    """A poll's record of the frame it returns (a long connection's, scripts.POLL): `token` names it, and Redis
    writes it only until `deadline` (epoch seconds; 0 for none)."""

    token: str
    deadline: float


class PollPath:
    """The polls of `store`'s streams, and the lists they keep."""

    def __init__(self, store: StreamStore):
        self.store = store
        self._connections = HotPathConnections(store.client)
        self._poll = LuaScript(store.client, scripts.POLL, self._connections.execute)
        self._card_back = LuaScript(store.client, scripts.CARD_BACK)
        self._closed = threading.Event()
        self._master_watch = (
            LazyThread(self._watch_master, "redis-master-watch") if self._connections.under_sentinel else None
        )

    def close(self) -> None:
        """Disconnect the poll path's connections, and end its watch of the master (the client's pool is the
        store's owner's to close)."""
        self._closed.set()
        self._connections.close()

    def poll(
        self,
        stream_id: str,
        window_seconds: int,
        overflow_bytes: int,
        orphan_note: str,
        taker: str = "",
        taker_runs_it: bool = False,
        token: str = "",
        hand_card: bool = True,
        record: FrameRecord | None = None,
    ) -> Snapshot | None:
        """Fold unread deltas into the text and return the snapshot; None for an unknown or expired stream id.

        An active stream whose lease is gone (its replica died) is taken over by `taker` when nothing was shown yet
        (`taken_over` is then set and the caller must start a worker), or resumed when its Dify run can be streamed
        again (`resumed`: the caller starts a worker that re-attaches), else becomes `expired` with `orphan_note`.
        An active stream older than `window_seconds`, or with more than `overflow_bytes` of text, is closed early.
        When `taker_runs_it` (the stream's worker is alive in the taker's process), a lost lease is only taken back.
        A card this poll hands out is marked with `token` (see `give_card_back`); with `hand_card` off, a waiting
        card is left for a later poll. With a `record`, the poll records what the frame it returns will show
        (scripts.POLL: a long connection's holder, before it sends that frame).
        """
        k = self.store.keys
        keys = {
            "stream": k.stream(stream_id),
            "chunks": k.stream_chunks(stream_id),
            "lease": k.stream_lease(stream_id),
            "images": k.stream_images(stream_id),
        }
        args = {
            "now": script_now(),
            "window_seconds": window_seconds,
            "overflow_bytes": overflow_bytes,
            "orphan_note": orphan_note,
            "taker": taker,
            "lease_ms": self.store.lease_ms,
            "taker_runs_it": "1" if taker_runs_it else "",
            "grace_seconds": self.store.takeover_grace_seconds,
            "token": token,
            "keep_card": "" if hand_card else "1",
            "record_token": record.token if record else "",
            "record_deadline": f"{record.deadline:.3f}" if record else "0",
        }
        reply = self._run_poll(keys, args)
        return _snapshot(*scripts.POLL.fields(reply)) if reply else None

    def _run_poll(self, keys: dict[str, str], args: dict[str, object]) -> list | None:
        """scripts.POLL's reply, from the master of now: a master that came back after its failover still answers
        reads, from its old data set (a reply that waited out a pause may come from one), so a reply that found
        nothing, or came late, is asked of the new master again before the user is told the answer cannot be found,
        or shown a bubble as it was before."""
        if self._master_watch is not None:
            self._master_watch.ensure()
        started = time.monotonic()
        reply = self._poll.run(keys, args)
        stalled = time.monotonic() - started > STALLED_READ_SECONDS
        if (not reply or stalled) and self._connections.follow_failover():
            reply = self._poll.run(keys, args)
        return reply

    def _watch_master(self) -> None:
        """Under Sentinel, every MASTER_WATCH_SECONDS: drop the poll path's idle connections to a master that was
        failed over. Frozen past its failover, a master comes back a master in its own eyes and answers reads from
        its old data set until the sentinels demote it: a poll on a connection still at it would show a bubble as
        it was before the failover, less than the last poll showed (the 10-minute Sentinel run of seed 12)."""

        def step() -> None:
            self._connections.follow_failover()
            self._closed.wait(MASTER_WATCH_SECONDS)

        run_until(self._closed, step, "redis_master_watch")

    def give_card_back(self, stream_id: str, token: str, most: int) -> int:
        """The reply of poll `token` never reached WeCom: a card it carried goes out with the next poll's reply
        instead (scripts.CARD_BACK: 1 given back, 2 carried by another poll, 0 not handed out yet, 3 given back
        `most` times already: it stays with this reply)."""
        return int(self._card_back(keys=[self.store.keys.stream(stream_id)], args=[token, most]))


def _snapshot(row: dict[str, str], images: list[str]) -> Snapshot:
    """A poll's outcome (scripts.POLL's named result) as the Snapshot the stream service reads."""
    return Snapshot(
        status=row["status"],
        text=row["text"],
        note=row["note"],
        close_reason=row["close_reason"],
        closed_bytes=int(row["closed_bytes"] or 0),
        has_response_url=bool(row["has_response_url"]),
        event=row["event"],
        freed_inflight_key=row["freed_inflight_key"],
        attempt=row["attempt"],
        prompt=row["prompt"],
        card=orjson.loads(row["card"]) if row["card"] else None,
        recorded=row["recorded"],
        shows=int(row["shows"] or 0),
        files=row["files"],
        images=[orjson.loads(image) for image in images],
    )
