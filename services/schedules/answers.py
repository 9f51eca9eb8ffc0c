"""A tick's answer, made by the bot's stream core as any answer is (its backend or route's, its content rules, its
cap, the leases that make a try happen in one process), in a stream no bubble shows: its end is read from Redis and
pushed (services/schedules/scheduler.py), never sent as a reply.

Each try asks in a conversation of its own (a report is not a follow-up of yesterday's), as the schedule's own user
`schedule:<bot>:<name>`, with the schedule's workflow inputs in place of a user's authorization (a schedule is the
operator's, not a WeCom user's)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

from services.streams.finisher import Finisher
from services.streams.job import StreamJob
from services.streams.poll_path import Snapshot
from services.streams.record import ACTIVE_STATUSES, F
from services.streams.service import StreamService, backend_kind, new_stream_id
from services.streams.store import first_attempt
from services.streams.worker import StreamWorker
from services.wecom.messages import Inbound

logger = logging.getLogger(__name__)


def has_ended(record: dict[str, str]) -> bool:
    """Whether a try's stream (its hash) is final: done, error, or no longer there to be answered."""
    return bool(record) and record.get(F.status) not in ACTIVE_STATUSES


class NoBubble:
    """The Delivery of a tick's answer: nothing reaches a user but through the tick's pushes."""

    mode = "schedule"
    runs_here = True
    waits_for_redis = True  # an end Redis did not take is left to a takeover: the tick's next try
    append_pace = 0.0
    append_deadlines = False

    def dispatch(self, job: StreamJob, run_here: Callable[[StreamJob], None]) -> None:
        run_here(job)

    def tracking(self, message: Inbound) -> dict[str, str]:
        return {}

    def track(self, stream_id: str, message: Inbound) -> None:
        return None

    def separate_url(self, response_url: str) -> str:
        return ""

    def opened_separately(self, job: StreamJob) -> None:
        return None

    def reaches(self, job: StreamJob) -> bool:
        return False

    def send(self, job: StreamJob, message: str, kind: str, patience: float, given_up: bool = False) -> bool:
        return False

    def answer_separately(self, job: StreamJob, message: str) -> None:
        return None

    def bubble_lost(self, job: StreamJob) -> bool:
        return False

    def start(self, look: Callable[[str], Snapshot | None]) -> None:
        return None

    def stop_watching(self) -> None:
        return None

    def close(self) -> None:
        return None


class TickAnswers:
    """One bot's ticks' answers, on its stream service (`streams`)."""

    def __init__(self, bot: str, streams: StreamService):
        self.bot = bot
        self.streams = streams
        self.store = streams.store
        self.inputs: dict[str, dict[str, str]] = {}  # the workflow inputs of each try running here, by stream
        made = streams.worker
        finisher = Finisher(
            self.store,
            NoBubble(),
            streams.bubble,
            streams.texts,
            bot,
            streams.window_seconds,
            draining=made.deps.turn.finisher.draining,
            closed=made.deps.turn.finisher.closed,
        )
        turn = dataclasses.replace(made.deps.turn, finisher=finisher, prepare=self._inputs_of)
        deps = dataclasses.replace(made.deps, turn=turn, append_pace=0.0, append_deadlines=False)
        self.worker = StreamWorker(deps, made.backends, made.owner, made.rules)

    def has_room(self) -> bool:
        """Whether this process takes another answer now (below its cap, not draining)."""
        return self.streams.runner.has_capacity()

    def runs_here(self, stream_id: str) -> bool:
        return self.streams.runner.is_running(stream_id)

    def start(self, schedule: str, tick: int, tries: int, question: str, inputs: dict[str, str], route: str) -> str:
        """Open the stream of a tick's try and start answering it in this process; its id."""
        userid = f"schedule:{self.bot}:{schedule}"
        job = StreamJob(
            stream_id=new_stream_id(),
            msgid=f"schedule:{schedule}:{tick}#{tries}",
            userid=userid,
            aibotid=f"tick-{tick}-{tries}",  # (the conversation of its own)
            query=question,
            attempt=first_attempt(self.streams.owner),
            route=route,
        )
        fields = {
            F.msgid: job.msgid,
            F.userid: userid,
            F.chattype: "single",
            F.msgtype: "text",
            F.backend: backend_kind(self.streams.backends, route),
            F.trace_id: job.trace_id,
            F.schedule: f"{schedule}:{tick}",
            **job.request_fields(),
        }
        self.store.open_stream(job.stream_id, job.attempt, job.aibotid, userid, fields)
        self.inputs[job.stream_id] = inputs
        self.streams.runner.start(job, lambda cancelled, lease: self._run(job, cancelled, lease), self.store, self.bot)
        return job.stream_id

    def record(self, stream_id: str) -> dict[str, str]:
        """A try's stream's hash ({} for no stream, or one gone)."""
        return self.store.reads.meta(stream_id) if stream_id else {}

    def text(self, stream_id: str) -> str:
        return "".join(self.store.reads.chunks(stream_id))

    def alive(self, stream_id: str, record: dict[str, str]) -> bool:
        """Whether the try (its stream's hash as just read: `record`) is not lost: it ended (the next look pushes
        it), or some process still holds its lease (a finished answer's lease is left to run out, so one that ends
        after the read is not mistaken for lost); a stream gone is lost."""
        if not record:
            return False
        return has_ended(record) or bool(self.store.client.exists(self.store.keys.stream_lease(stream_id)))

    def give_up(self, stream_id: str, note: str) -> None:
        """End a try whose process died (or froze: its writes are refused from now on), and stop its backend's task
        where one is known."""
        if not stream_id:
            return
        ended = self.store.stop(stream_id, note)
        if ended and ended[1]:
            meta = self.store.reads.meta(stream_id)
            backend = self.streams.backends.get(meta.get(F.route, ""))
            if backend is not None:
                backend.stop(ended[1], meta.get(F.userid, ""))

    def _run(self, job: StreamJob, cancelled, lease) -> None:
        try:
            self.worker.run(job, cancelled, lease)
        finally:
            self.inputs.pop(job.stream_id, None)

    def _inputs_of(self, job: StreamJob) -> dict:
        return dict(self.inputs.get(job.stream_id, {}))
