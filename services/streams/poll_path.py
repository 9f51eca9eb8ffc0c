"""The poll path: one script (scripts.POLL) folds a stream's unread deltas into the bubble's text and, in the same
step, closes a bubble past its window or size, takes over or resumes an answer whose replica died, and hands out a
waiting card. Polls run on connections of their own (redis_conn.HotPathConnections). Under Sentinel and Cluster a
live bubble shows only text a replica holds (`vouched_bytes`, HOLD_BACK_SECONDS): docs/architecture.md, "Opening a
stream on any topology". Also here: the card a poll's lost reply gives back.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import orjson
from redis.exceptions import NoScriptError

from services import metrics
from services.loops import LazyThread, run_until
from services.lua import LuaScript
from services.redis_conn import REDIS_FAILURES, HotPathConnections
from services.streams import scripts
from services.streams.reads import script_now
from services.streams.record import ACTIVE_STATUSES
from services.streams.store import StreamStore

# Under Sentinel, how often each process asks the sentinels where the master is, for the poll path (_watch_master);
# and a poll reply slower than this may come from a master that was paused past its failover: the master is asked for.
MASTER_WATCH_SECONDS = 1.0
STALLED_READ_SECONDS = 1.0

# How long a live bubble's text may run ahead of what a replica holds before it is shown all the same (as long as a
# Sentinel master with min-replicas-max-lag 10 keeps taking writes from a replica that fell behind).
HOLD_BACK_SECONDS = 10.0

# What a poll found of its text and the replicas (_wait_for_replica): nothing to wait for, a replica holds it, none yet.
NOTHING_AHEAD, HELD, UNHELD = "", "held", "unheld"
# Whether a poll counts as one of its bubble (`polls`: a bubble no poll showed goes out whole, UNPOLLED): WeCom's, that
# it waits for; LATE, read after WeCom stopped waiting (it counts once the bubble is no longer live); NEVER, a look of
# our own (a watch's), which WeCom may never have made.
COUNTED, LATE, NEVER = "1", "", "never"
# the fields read before the reply is made a Snapshot
_AHEAD_FOR, _TEXT = scripts.POLL.row.index("ahead_for"), scripts.POLL.row.index("text")


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
    owed: str = ""  # an ended answer: what its response_url owes of what its bubble did not show (StreamService.look)
    vouched: int = 0  # Sentinel, Cluster: bytes of the text a poll showed once a replica held them (scripts.VOUCH)

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
    writes it only until `deadline` (epoch seconds; 0 for none). With `confirmed` the poll confirms it itself (one
    server: no replica to wait for before the frame goes out); else the pass confirms it once a replica holds it."""

    token: str
    deadline: float
    confirmed: bool = False


class PollPath:
    """The polls of `store`'s streams, and the lists they keep."""

    def __init__(self, store: StreamStore):
        self.store = store
        self._connections = HotPathConnections(store.client)
        self._wait_ms = store.durable.wait_ms  # 0: one server, no replica to wait for
        self._poll = LuaScript(store.client, scripts.POLL, self._send_poll)
        self._card_back = LuaScript(store.client, scripts.CARD_BACK)
        self._vouch = LuaScript(store.client, scripts.VOUCH)  # sent on the poll's own connection (_vouch_on)
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
        counted: str = COUNTED,
    ) -> Snapshot | None:
        """Fold unread deltas into the text and return the snapshot; None for an unknown or expired stream id.

        An active stream whose lease is gone (its replica died) is taken over by `taker` when nothing was shown yet
        (`taken_over` is then set and the caller must start a worker), or resumed when its Dify run can be streamed
        again (`resumed`: the caller starts a worker that re-attaches), else becomes `expired` with `orphan_note`.
        An active stream older than `window_seconds`, or with more than `overflow_bytes` of text, is closed early.
        When `taker_runs_it` (the stream's worker is alive in the taker's process), a lost lease is only taken back.
        A card this poll hands out is marked with `token` (see `give_card_back`); with `hand_card` off, a waiting
        card is left for a later poll. With a `record`, the poll records what the frame it returns will show
        (scripts.POLL: a long connection's holder, before it sends that frame). A poll `counted` LATE (its reply
        comes after WeCom stopped waiting) does not make a live bubble count as shown (scripts.UNPOLLED), nor does
        one counted NEVER (a watch's look) make any bubble."""
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
            "record_confirmed": "1" if record and record.confirmed else "",
            "vouch": "1" if self._wait_ms and record is None else "",
            "counted": counted,
        }
        reply, replica = self._run_poll(keys, args)
        if not reply:
            return None
        snapshot = _snapshot(*scripts.POLL.fields(reply))
        if replica == UNHELD:
            snapshot.text = snapshot.text.encode()[: snapshot.vouched].decode("utf-8", "ignore")
            metrics.POLL_TEXT_UNREPLICATED.labels(self.store.durable.bot, "held_back").inc()
        return snapshot

    def _send_poll(self, *command) -> tuple[list | None, str]:
        """scripts.POLL's reply, and what a replica holds of the text it would show (_wait_for_replica)."""
        if not self._wait_ms:
            return self._connections.execute(*command), NOTHING_AHEAD
        stream_key = command[3]  # EVALSHA sha numkeys stream ...
        return self._connections.execute(
            *command, then=lambda reply, send: self._wait_for_replica(stream_key, reply, send)
        )

    def _wait_for_replica(self, stream_key: str, reply: list | None, send) -> tuple[list | None, str]:
        """After a poll's script, on its connection (`send`): whether a replica holds what the poll would show and
        the note that it was shown (scripts.VOUCH, written once a replica held the text), when its text ran ahead of
        what was vouched for (NOTHING_AHEAD otherwise, or when it has been ahead so long that it is shown all the
        same). A note the master took but no replica did is lost in a failover, and a later poll, held back, would
        show less than this one: so the poll waits for a replica twice (seen in the campaign, a 2-minute Sentinel
        run of seed 7: one sentence taken back after `redis_loss`)."""
        ahead_for = reply[_AHEAD_FOR] if reply else ""
        if ahead_for == "":
            return reply, NOTHING_AHEAD
        if float(ahead_for) >= HOLD_BACK_SECONDS:
            metrics.POLL_TEXT_UNREPLICATED.labels(self.store.durable.bot, "shown").inc()
            return reply, NOTHING_AHEAD
        if send is None:  # sent through the cluster client: no connection of its own to wait on
            return reply, UNHELD
        text = reply[_TEXT]
        shows = len(text.encode() if isinstance(text, str) else text)
        try:
            if not self._replicas_hold(send):
                return reply, UNHELD
            self._vouch_on(send, stream_key, shows)
            return reply, HELD if self._replicas_hold(send) else UNHELD
        except REDIS_FAILURES:
            return reply, UNHELD

    def _replicas_hold(self, send) -> bool:
        """Wait, on the poll's connection (`send`), for the replicas to hold what it wrote; whether one does."""
        wait = self.store.durable.wait_command()
        return self.store.durable.held(wait, send(wait))

    def _vouch_on(self, send, stream_key: str, shows: int) -> None:
        """Note, on a poll's own connection (`send`), that it shows `shows` bytes of the stream's text
        (scripts.VOUCH), loading the script where Redis does not know it yet."""
        try:
            send(self._vouch.command([stream_key], [shows]))
        except NoScriptError:
            self._vouch.load()
            send(self._vouch.command([stream_key], [shows]))

    def _run_poll(self, keys: dict[str, str], args: dict[str, object]) -> tuple[list | None, str]:
        """scripts.POLL's reply, from the master of now: a master that came back after its failover still answers
        reads, from its old data set (a reply that waited out a pause may come from one), so a reply that found
        nothing, or came late, is asked of the new master again before the user is told the answer cannot be found,
        or shown a bubble as it was before."""
        if self._master_watch is not None:
            self._master_watch.ensure()
        started = time.monotonic()
        reply, replica = self._poll.run(keys, args)
        stalled = time.monotonic() - started > STALLED_READ_SECONDS + self._wait_ms / 1000
        if (not reply or stalled) and self._connections.follow_failover():
            reply, replica = self._poll.run(keys, args)
        return reply, replica

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
        vouched=int(row["vouched"] or 0),
    )
