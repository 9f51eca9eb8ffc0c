"""What the acks of a connection's frames say, written to Redis in batches: a refused frame (the bubble shows the
last one taken; a dead req_id), a bubble finished (out of the open set); and the undoing of a record of frames that
never went out (its write's reply was lost, so Redis may still run it). What a frame will show is recorded before it
goes out, by the poll that makes it (scripts.POLL), so an ack that says it was shown only makes that record sure
(`ws_acked_by`: a next holder need not wait before it takes the record for shown, orphans.py).

Each of these records must outlive a failover, so it waits for a Redis replica (services/replication.py). Written
one ack at a time, every ack waited: when no replica answers (a shard without one, after a failover), 200 ms each,
about five acks a second for the whole bot, and with them the bot's frames. Here the acks only note their record
(the latest per stream wins), and the connection's keeper writes what was noted once per pass: one round trip and
one wait per Redis node, however many acks came (BENCHMARKS.md §14)."""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Collection

import redis
from redis.cluster import RedisCluster

from services.keys import Keys
from services.replication import OUTBOX, Replication, raise_first_error
from services.streams import scripts
from services.streams.record import F
from services.streams.store import LATE

logger = logging.getLogger(__name__)


class AckLedger:
    """`valid_seconds` (the Redis socket timeout) is how long a record may land: Redis refuses one it runs later
    (scripts.RECORD, and a frame's own in scripts.POLL), so a record whose reply never came cannot overwrite a later
    one, nor stand for a frame that never went out."""

    def __init__(self, client: redis.Redis, keys: Keys, durable: Replication, open_key: str, valid_seconds: float = 0):
        self.client = client
        self.valid_seconds = valid_seconds
        self.keys = keys
        self.durable = durable
        self.open_key = open_key  # the bot's open set (outbox.py)
        self._fields: dict[str, dict[str, str]] = {}
        self._delivered: set[str] = set()
        self._acked: dict[str, str] = {}  # stream id -> the token of its frame WeCom last acknowledged
        self._refused_by: dict[str, str] = {}  # stream id -> the token of its frame WeCom last refused
        # stream id -> {the token of a record to undo: what the bubble shows}: every pass whose record may stand
        self._unsent: dict[str, dict[str, int]] = {}
        self._lock = threading.Lock()

    def refused(self, stream_id: str, shows: int, dead: bool, token: str = "") -> None:
        """WeCom refused a frame (recorded under `token`): the bubble shows `shows` bytes of the stream's text (its
        last frame taken); with `dead`, its req_id can no longer be used."""
        fields = {"ws_shows": str(shows), "ws_sent_final": "", F.ws_sent_at: "", **({"ws_dead": "1"} if dead else {})}
        self._note(stream_id, fields)
        with self._lock:
            self._refused_by[stream_id] = token

    def dead(self, stream_id: str) -> None:
        """The req_id answering the stream can no longer be used (what its bubble shows is recorded already)."""
        self._note(stream_id, {"ws_dead": "1"})

    def shown(self, stream_id: str, token: str) -> None:
        """WeCom acknowledged the frame recorded under `token` as shown: the record is sure, and a next holder need
        not wait for this one to undo it (orphans.py). Dropped when a later record of the stream comes first."""
        with self._lock:
            self._acked[stream_id] = token

    def delivered(self, stream_id: str) -> None:
        """The bubble got its final frame: nothing left to send."""
        with self._lock:
            self._delivered.add(stream_id)

    def unsent(self, stream_id: str, token: str, shows: int) -> None:
        """The frame recorded as about to go out under `token` never went out (or the record's reply was lost, so
        it may yet land): unless a later record replaced it, the bubble shows `shows` bytes of the stream's text.
        Each pass's is kept until written, not only the latest: a pass whose record landed and whose frame then did
        not go out (its write for a replica failed), followed by a pass whose poll failed, left the first record
        standing when only the second was undone (seen in the campaign: the rest skipped what it recorded)."""
        with self._lock:
            self._unsent.setdefault(stream_id, {})[token] = shows

    def _note(self, stream_id: str, fields: dict[str, str]) -> None:
        with self._lock:
            self._fields.setdefault(stream_id, {}).update(fields)

    def flush(self, recorded: Collection[str] = (), token: str = "", frames_out: bool = False) -> None:
        """Write what was noted: per Redis node one round trip, its commands followed by one wait for a replica.
        `recorded` are the streams whose frames this pass's polls just recorded (scripts.POLL, under `token`),
        which a replica must hold before the frames go out: their records are newer than the acks noted before, so
        an ack's word on what such a bubble shows is dropped (a dead req_id is kept), and, where there is a replica
        to wait for, each gets `ws_confirmed` after the polls: the wait covers all before it (a replica that holds
        it holds all that came before it), and the frames go out only once it is written, so a next holder takes a
        record its pass never confirmed for one whose frame never went out (outbox.shown_of: a holder killed
        mid-pass, seed 21's Sentinel run). On one server each poll confirmed its own record (FrameRecord.confirmed):
        a write per stream here would cost Redis three commands a frame (BENCHMARKS.md §10). There the pass's frames
        went out before this write (`frames_out`), so WeCom may have refused one of them already: that refusal is
        kept, and what their records replaced is not noted again when the write fails.

        Raises:
            redis.RedisError: Redis did not answer (what was noted is kept for the next flush; the pass's records
                are the caller's to undo).
        """
        with self._lock:
            fields, delivered, unsent, acked = self._fields, self._delivered, self._unsent, self._acked
            refused_by, self._refused_by = self._refused_by, {}
            self._fields, self._delivered, self._unsent, self._acked = {}, set(), {}, {}
        for stream_id, acked_token in acked.items():
            fields[stream_id] = {F.ws_acked_by: acked_token, **fields.get(stream_id, {})}
        confirm = list(recorded) if self.durable.wait_ms else []  # one server: each poll confirmed its own
        if not fields and not delivered and not unsent and not confirm:
            return
        written = {}
        for stream_id, values in fields.items():
            # the pass's poll recorded what its bubble shows, after this ack came (unless it refused that frame)
            if stream_id in recorded and refused_by.get(stream_id) != token:
                values = {"ws_dead": values["ws_dead"]} if "ws_dead" in values else {}
            if values:
                written[stream_id] = values
        try:
            self._write(written, delivered, unsent, {}, confirm, token)
        except redis.RedisError:
            with self._lock:  # noted again, under whatever came meanwhile (newer wins)
                self._refused_by = {**refused_by, **self._refused_by}
                for stream_id, values in (written if frames_out else fields).items():
                    self._fields[stream_id] = {**values, **self._fields.get(stream_id, {})}
                self._delivered |= delivered
                for stream_id, undos in unsent.items():
                    self._unsent[stream_id] = {**undos, **self._unsent.get(stream_id, {})}
            raise

    def record(self, riding: dict[str, dict[str, str]]) -> None:
        """Write `riding` (fields of the streams' records: a frame about to go out that no poll recorded,
        outbox.sending_record) alone, at once, leaving what was noted to the next flush, which may be running in
        another thread: a record of acks written twice at once could land older last.

        Raises:
            redis.RedisError: Redis did not answer (`riding` is the caller's to undo).
        """
        self._write({}, set(), {}, riding)

    def _write(
        self,
        fields: dict[str, dict[str, str]],
        delivered: set[str],
        unsent: dict[str, dict[str, int]],
        riding: dict[str, dict[str, str]],
        confirm: Collection[str] = (),
        token: str = "",
    ) -> None:
        records = {stream_id: dict(values) for stream_id, values in fields.items()}
        for stream_id, values in riding.items():
            records[stream_id] = {**records.get(stream_id, {}), **values}
        groups: dict[object, tuple[str, list[tuple]]] = defaultdict(lambda: ("", []))
        for stream_id, undos in unsent.items():
            key = self.keys.stream(stream_id)
            for undone, shows in undos.items():  # at most one is the record that stands
                restore = ("ws_shows", str(shows), "ws_sent_final", "", F.ws_sent_at, "")
                self._add(groups, key, ("EVAL", scripts.UNRECORD_SENT, 1, key, undone, *restore))
        deadline = f"{self.deadline():.3f}"
        for stream_id, values in records.items():
            key = self.keys.stream(stream_id)
            pairs = [item for pair in values.items() for item in pair]
            self._add(groups, key, ("EVAL", scripts.RECORD, 1, key, deadline, *pairs))
        if delivered:
            self._add(groups, self.open_key, ("ZREM", self.open_key, *delivered))
        for stream_id in confirm:  # after the pass's polls: its wait covers them, and its frames go out only after
            key = self.keys.stream(stream_id)
            self._add(groups, key, ("EVAL", scripts.RECORD, 1, key, "0", F.ws_confirmed, token))
        for key, commands in groups.values():
            sent = time.time()
            replies = self.durable.execute(key, commands, OUTBOX)
            raise_first_error(replies)
            if LATE in replies:
                self.late(time.time() - sent)
                raise redis.TimeoutError("a record reached Redis after its deadline")

    def deadline(self) -> float:
        """The deadline of a record made now (epoch seconds; 0 for none)."""
        return time.time() + self.valid_seconds if self.valid_seconds else 0.0

    def late(self, took: float) -> None:
        """Redis refused a record as late, answering in `took` seconds: nothing of it is taken for written. When
        the reply came well within the deadline, Redis's clock runs ahead of this host's: deadlines go off (else no
        frame would go)."""
        if self.valid_seconds and took < self.valid_seconds / 2:
            logger.error(
                "Redis refused frame records as late that it answered in %.0f ms: its clock runs ahead of this host's "
                "by more than REDIS_SOCKET_TIMEOUT; records carry no deadline from now on (check the hosts' NTP)",
                took * 1000,
            )
            self.valid_seconds = 0

    def _add(self, groups: dict, key: str, command: tuple) -> None:
        """Add `command` (on `key`) to the group of the node holding `key`."""
        node = self._node(key)
        first, commands = groups[node]
        groups[node] = (first or key, [*commands, command])

    def _node(self, key: str) -> str | None:
        """The name of the Redis node holding `key` (None: there is one)."""
        return self.client.get_node_from_key(key).name if isinstance(self.client, RedisCluster) else None
