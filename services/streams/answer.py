"""One answer as it is being built, in memory: what Dify has said so far, and how it stands with the stream's
writer (services/streams/writer.py). Whatever happens to Redis or to the bubble, the answer in memory stays whole,
so the finisher can still deliver it."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from services.dify.events import DifyEvent
from services.files.model import DifyFile
from services.redis_conn import REDIS_FAILURES
from services.streams.progress import StepProgress
from services.streams.store import CLOSED, CONFLICT, TAKEN, StreamStore
from services.streams.writer import StreamWriter
from utils.logging import bind_log_context

logger = logging.getLogger(__name__)

FLUSH_TIMEOUT = 10.0


class StreamAborted(Exception):
    """This replica no longer owns the stream (taken over or closed elsewhere): stop without writing."""


class HandedOver(StreamAborted):
    """This process is stopping and released the stream's lease: another replica's next poll takes it over."""


@dataclass(slots=True)
class Answer:
    """Everything known about one answer so far."""

    task_id: str = ""
    message_id: str = ""
    conversation_id: str = ""
    writer: StreamWriter | None = None  # this stream's ordered Redis writes
    text: str = ""  # the whole answer so far
    outage_since: float | None = None
    detached: bool = False  # the stream was closed elsewhere: the answer goes out through response_url
    ended: bool = False
    answered: bool = False  # answer text (not reasoning) has arrived
    thinking: bool = False  # a <think> block of reasoning is open in the text
    agent_messages: bool = False  # the answer came as agent_message deltas (so a closing message repeats it)
    paused: bool = False  # the app asked for a person's input (human_input_required / workflow_paused)
    form_event: dict | None = None  # the human_input_required data of the pause (its form_token, content...)
    forms_answered: list[str] = field(default_factory=list)  # tokens of the run's forms answered so far
    form_note: str = ""  # how the last form ended, for the final note (waits, expired, by e-mail)
    form_timed_out: bool = False  # a form expired unanswered and the run went on with its timeout path
    app_type: str = "chat"
    resumed: bool = False  # this replica streams the Dify run again after the stream's replica was lost
    reattached: bool = False  # the events come from following a run (GET /workflow/{run}/events): reconciled
    shown: str = ""  # reattached: the text the bubble had when this attempt began
    echo: str = ""  # text Dify is sending again (a resumed run repeats its answer before the pause): left out
    earlier: str = ""  # a message of its own after a form: the run's answer before the form, which it leaves out
    # Resumed after its replica was lost: Dify relays only what the run publishes from the moment one listens, so
    # live text may follow a hole. It is held back (`held`) until it can be placed: the run ends (its outputs say
    # the whole answer) or is seen starting again after a form (everything after that is whole).
    holding: bool = False
    held: str = ""
    progress: StepProgress | None = None  # the status line while a slow step runs without text
    workflow_run_id: str = ""
    last_thought: str = ""
    workflow_error: str = ""
    run_stopped: bool = False  # Dify stopped the run before it made its outputs: the answer is what it streamed
    images: list[dict] = field(default_factory=list)  # msg_item payloads, written with the final state
    files: list[DifyFile] = field(default_factory=list)  # files Dify made for the answer (services/files)
    usage: dict = field(default_factory=dict)
    citations: list[str] = field(default_factory=list)  # the knowledge documents the answer drew on, distinct
    new_fields: dict = field(default_factory=dict)
    conversation_saved: str = ""

    def note_ids(self, event: DifyEvent) -> None:
        """Take the task, message and conversation ids an event names (new ones go to the hash too)."""
        for name in ("task_id", "message_id", "conversation_id", "workflow_run_id"):
            value = event.get(name)
            if isinstance(value, str) and value and value != getattr(self, name):
                setattr(self, name, value)
                self.new_fields[name] = value
                if name == "task_id":
                    bind_log_context(task=value)

    def check_writer(self) -> None:
        """Act on what the writer has learnt: stop at once (taken over), go on without Redis (closed elsewhere),
        or note a Redis outage (the writer keeps the deltas and sends them when Redis is back).

        Raises:
            StreamAborted: another replica owns the stream now.
        """
        writer = self.writer
        if writer.state == TAKEN:
            raise StreamAborted
        if writer.state == CLOSED and not self.detached:
            logger.warning("the stream was closed elsewhere; the answer will be sent through response_url")
            self.detached = True
        if writer.error is not None and self.outage_since is None:
            self.outage_since = time.monotonic()
            logger.warning("Redis unavailable; keeping the answer in memory until it returns: %s", writer.error)
        elif writer.error is None and self.outage_since is not None:
            logger.info("Redis is back after %.1fs; answer written", time.monotonic() - self.outage_since)
            self.outage_since = None


def keep_in_step(answer: Answer, store: StreamStore, attempt: str, stream_id: str) -> None:
    """Act on what the stream's writer has learnt (Answer.check_writer); and when its list lost deltas (a Redis
    failover: replication is asynchronous, so the new master may lack the last appends), write the answer whole
    again from memory, so the bubble shows it all, once.

    Raises:
        StreamAborted: another replica owns the stream now.
    """
    answer.check_writer()
    if answer.writer.state == CONFLICT and not answer.detached:
        logger.warning("the stream's list lost deltas it had taken (a Redis failover?); writing the answer whole")
        write_whole(answer, store, attempt, stream_id)


def write_whole(answer: Answer, store: StreamStore, attempt: str, stream_id: str) -> None:
    """Replace the stream's list with the whole answer (`answer.text`), after what is queued. If Redis will not
    take it, or the stream was closed elsewhere, the answer goes through response_url at the end instead.

    Raises:
        StreamAborted: another replica owns the stream now.
    """
    if answer.detached:
        return
    try:
        answer.writer.flush(FLUSH_TIMEOUT)
        result = store.replace(stream_id, attempt, answer.text)
    except REDIS_FAILURES as exc:
        logger.warning("could not write the answer whole (%s); it will be sent through response_url", exc)
        answer.detached = True
        return
    if result == TAKEN:
        raise StreamAborted
    if result == CLOSED:
        answer.detached = True
        return
    answer.writer.reset(1 if answer.text else 0, len(answer.text))
