"""One answer as it is being built, in memory: what its backend has said so far, and how it stands with the stream's
writer (services/streams/writer.py). Whatever happens to Redis or to the bubble, the answer in memory stays whole,
so the finisher can still deliver it."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from enum import Enum

from services.files.model import DifyFile
from services.redis_conn import REDIS_FAILURES
from services.rules.mask import ContentMask
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


class Phase(Enum):
    """Where the answer's backend call stands. A chat's call streams and ends; a run (a Dify chatflow's) may ask
    for a person's input (a form) while its events go on, pause (its events end, the run waits), and go on after
    the form's answer. The names of the transitions below are the only ways between them."""

    STREAMING = "streaming"  # the call's events go on
    FORM_ASKED = "form_asked"  # the run asked for a form (human_input_required); its events go on to the pause
    PAUSED = "paused"  # the run waits for a form: this call's events are over
    ENDED = "ended"  # the answer is whole: this call's events are over

    @property
    def waits_for_form(self) -> bool:
        return self in (Phase.FORM_ASKED, Phase.PAUSED)

    @property
    def events_over(self) -> bool:
        return self in (Phase.PAUSED, Phase.ENDED)


_PHASE_OF = {  # (waits for a form, events over)
    (False, False): Phase.STREAMING,
    (True, False): Phase.FORM_ASKED,
    (True, True): Phase.PAUSED,
    (False, True): Phase.ENDED,
}


@dataclass(slots=True)
class Answer:
    """Everything known about one answer so far. Its `phase` changes only through the transitions below."""

    task_id: str = ""
    message_id: str = ""
    conversation_id: str = ""
    writer: StreamWriter | None = None  # this stream's ordered Redis writes
    text: str = ""  # the whole answer so far
    outage_since: float | None = None
    detached: bool = False  # the stream was closed elsewhere: the answer goes out through response_url
    phase: Phase = Phase.STREAMING
    answered: bool = False  # answer text (not reasoning) has arrived
    thinking: bool = False  # a <think> block of reasoning is open in the text
    resumed: bool = False  # this attempt follows the backend's run again after the stream's replica was lost
    mask: ContentMask = field(default_factory=ContentMask)  # content rules: matches masked, a possible one held
    progress: StepProgress | None = None  # the status line while a slow step runs without text
    workflow_run_id: str = ""  # the backend's run, where it can be followed again (a Dify chatflow's or workflow's)
    images: list[dict] = field(default_factory=list)  # msg_item payloads, written with the final state
    files: list[DifyFile] = field(default_factory=list)  # files Dify made for the answer (services/files)
    usage: dict = field(default_factory=dict)
    citations: list[str] = field(default_factory=list)  # the knowledge documents the answer drew on, distinct
    new_fields: dict = field(default_factory=dict)
    conversation_saved: str = ""

    @property
    def paused(self) -> bool:
        """The app asked for a person's input (human_input_required, or its run paused)."""
        return self.phase.waits_for_form

    @property
    def ended(self) -> bool:
        """This call's events are over: the answer is whole, or its run paused."""
        return self.phase.events_over

    def form_asked(self) -> None:
        """The run asks for a form (or a form must be asked again: refused, expired, not followed)."""
        self.phase = _PHASE_OF[(True, self.ended)]

    def run_paused(self) -> None:
        """The run paused for its form: this call's events are over."""
        self.phase = Phase.PAUSED

    def message_ended(self) -> None:
        """message_end: a chat's answer is whole; a run's ends at workflow_finished, later."""
        self.phase = _PHASE_OF[(self.paused, not self.workflow_run_id)]

    def run_ended(self) -> None:
        """workflow_finished (or Dify's record of the run): this call's events are over."""
        self.phase = _PHASE_OF[(self.paused, True)]

    def goes_on_after_form(self) -> None:
        """The form was answered (or the held text is dropped for the saved state): the run streams again."""
        self.phase = Phase.STREAMING

    def note_ids(self, event) -> None:
        """Take the task, message, conversation and run ids a backend's event names (anything with `.get(name)`;
        new ones go to the hash too)."""
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
