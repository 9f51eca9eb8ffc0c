"""The answer as it is being built: Dify's events of one call applied to the in-memory answer and to the stream's
writer (services/streams/writer.py), which sends them to Redis without making the worker wait.

`TextRelay` handles the common read (plain text deltas) in the read pump's thread; everything else goes through
`AnswerRecorder.apply` in the stream's own thread. Either way the answer in memory stays whole, so whatever
happens to Redis or to the bubble, the finisher can still deliver it.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from services import metrics
from services.dify.client import WORKFLOW
from services.dify.events import (
    AGENT_MESSAGE_EVENT,
    END_EVENT,
    FILE_EVENT,
    FORM_FILLED,
    FORM_TIMEOUT,
    INPUT_REQUIRED,
    MESSAGE_EVENT,
    NODE_FINISHED,
    NODE_STARTED,
    PAUSED,
    QUIET_EVENTS,
    REASONING_EVENT,
    REPLACE_EVENT,
    THOUGHT_EVENT,
    WORKFLOW_FINISHED,
    WORKFLOW_REPLACE,
    WORKFLOW_STARTED,
    WORKFLOW_TEXT,
    DifyEvent,
)
from services.files.model import DifyFile, file_of_event, files_in_outputs
from services.outage import RETRY_DELAYS, best_effort
from services.redis_conn import REDIS_FAILURES
from services.streams.conversations import ConversationStore
from services.streams.job import StreamJob
from services.streams.progress import SLOW_STEPS, StepProgress
from services.streams.store import CLOSED, CONFLICT, TAKEN, WRITTEN, StreamStore
from services.streams.writer import StreamWriter
from utils.logging import bind_log_context

logger = logging.getLogger(__name__)

FLUSH_TIMEOUT = 10.0
THINK_OPEN, THINK_CLOSE = "<think>\n", "\n</think>\n\n"
# Workflow statuses that end a run without its answer.
_FAILED_RUNS = frozenset({"failed", "stopped"})


@dataclass(frozen=True, slots=True)
class AnswerOptions:
    """How a bot's answers are made from its app's events (docs/configuration.md)."""

    app_type: str = "chat"  # the app's type, resolved (never "auto")
    show_reasoning: bool = False  # a model's reasoning before the answer, in a <think> block
    show_citations: bool = True  # the knowledge documents the answer drew on, listed at its end
    workflow_input: str = "query"  # workflow apps: the input variable the question goes into
    workflow_output: str = ""  # workflow apps: the output read when no text_chunk came ("" = first string)


DEFAULT_OPTIONS = AnswerOptions()


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
    answer.writer.reset(1 if answer.text else 0)


class TextRelay:
    """The common case of a read, handled in the read pump's thread without waking the worker: a batch of text
    deltas (or nothing, like a ping) while all is well. Anything else (new ids, the first delta, another event,
    a writer that has news, cancellation, the deadline) returns False, and the recorder's `apply` handles it."""

    __slots__ = ("answer", "cancelled", "deadline")

    def __init__(self, answer: Answer, cancelled: threading.Event, deadline: float):
        self.answer = answer
        self.cancelled = cancelled
        self.deadline = deadline

    def __call__(self, batch: list[DifyEvent]) -> bool:
        answer = self.answer
        writer = answer.writer
        if not answer.answered or answer.thinking or answer.detached or answer.echo or answer.holding:
            return False
        if answer.progress is not None and answer.progress.pending:
            return False
        if writer.state != WRITTEN or writer.error is not None:
            return False
        if self.cancelled.is_set() or time.monotonic() > self.deadline:
            return False
        deltas = []
        for event in batch:
            data = event.data
            if _brings_new_ids(data, answer):
                return False
            if event.kind == AGENT_MESSAGE_EVENT or (event.kind == MESSAGE_EVENT and not answer.agent_messages):
                text = data.get("answer")
            elif event.kind == WORKFLOW_TEXT:
                text = event.body.get("text")
            else:
                return False
            if text and isinstance(text, str):
                deltas.append(text)
        if deltas:
            answer.text += "".join(deltas)
            writer.add(deltas)
        return True


def _brings_new_ids(data: dict, answer: Answer) -> bool:
    return (
        data.get("task_id", answer.task_id) != answer.task_id
        or data.get("message_id", answer.message_id) != answer.message_id
        or data.get("conversation_id", answer.conversation_id) != answer.conversation_id
        or data.get("workflow_run_id", answer.workflow_run_id) != answer.workflow_run_id
    )


class AnswerRecorder:
    """Applies one stream's Dify events (every event of Dify's streaming API): deltas to its writer, a replace, ids, the
    agent's thoughts and closing message, reasoning, a workflow's text and outputs, a failed or paused run, usage,
    the files Dify made (services/files delivers them at the end), and the conversation to continue next time."""

    def __init__(
        self,
        job: StreamJob,
        answer: Answer,
        store: StreamStore,
        conversations: ConversationStore,
        bot: str = "default",
        options: AnswerOptions = DEFAULT_OPTIONS,
    ):
        self.bot = bot
        self.options = options
        self.job = job
        self.answer = answer
        self.store = store
        self.conversations = conversations

    def apply(self, batch: list[DifyEvent]) -> None:
        """Record one network read's worth of events: deltas in one append, a replace in its own call."""
        answer = self.answer
        deltas: list[str] = []
        for event in batch:
            answer.note_ids(event)
            kind = event.kind
            if kind == AGENT_MESSAGE_EVENT:
                answer.agent_messages = True
                self._answer_text(deltas, event.answer)
            elif kind == MESSAGE_EVENT and answer.agent_messages:
                # Dify's newer agent app closes with one `message` holding the whole answer again.
                if event.answer and event.answer != self._answer_so_far(deltas):
                    deltas = self._replace_with(deltas, event.answer)
            elif kind == MESSAGE_EVENT:
                self._answer_text(deltas, event.answer)
            elif kind == FILE_EVENT:
                # After an assistant file, Dify labels the message's later text chunks message_file.
                self._answer_text(deltas, event.answer)
                if (file := file_of_event(event.data)) is not None:
                    answer.files.append(file)
            elif kind == WORKFLOW_TEXT:
                self._answer_text(deltas, str(event.body.get("text") or ""))
            elif kind in (REPLACE_EVENT, WORKFLOW_REPLACE):
                text = event.answer if kind == REPLACE_EVENT else str(event.body.get("text") or "")
                deltas = self._reconcile(deltas, text) if answer.reattached else self._replace_with(deltas, text)
            elif kind == REASONING_EVENT:
                self._reasoning(deltas, event)
            elif kind == END_EVENT:
                answer.ended = not answer.workflow_run_id  # a run's answer ends at workflow_finished
                metadata = event.get("metadata")
                if isinstance(metadata, dict) and isinstance(metadata.get("usage"), dict):
                    answer.usage = metadata["usage"]
                answer.citations = cited_documents(metadata) or answer.citations
            elif kind == THOUGHT_EVENT:
                thought = event.get("thought")
                if isinstance(thought, str) and thought.strip():
                    answer.last_thought = thought
                self._tool_step(event)
            elif kind in (NODE_STARTED, NODE_FINISHED):
                self._node_step(kind, event.body)
            elif kind == WORKFLOW_FINISHED:
                deltas = self._run_finished(deltas, event.body)
            elif kind in (INPUT_REQUIRED, PAUSED):
                answer.paused = True
                answer.ended = answer.ended or kind == PAUSED
                if kind == INPUT_REQUIRED:
                    answer.form_event = {**event.data, **event.body}
            elif kind == WORKFLOW_STARTED:
                if event.body.get("reason") == "resumption":  # Dify streams the answer before the pause again
                    answer.echo = self._known(deltas)
                    answer.holding, answer.held = False, ""  # the repeat then the rest: nothing missing from here
            elif kind in (FORM_FILLED, FORM_TIMEOUT):
                answer.echo = ""  # what follows the form's node is new
                answer.form_timed_out = answer.form_timed_out or kind == FORM_TIMEOUT
            elif kind not in QUIET_EVENTS:  # a quiet event comes only to name the run (note_ids took it)
                metrics.DIFY_UNKNOWN_EVENTS.labels(self.bot, kind[:40]).inc()
                logger.debug("ignored Dify event %s", kind)
        self.write(deltas)
        self.save_conversation(retry=False)

    def _answer_text(self, deltas: list[str], text: str) -> None:
        """Answer text as Dify streams it: what a resumed run sends again (`echo`) is left out, and while
        `holding`, it waits in `held` (Answer.holding)."""
        if self.answer.echo:
            text = self._past_echo(text)
        if self.answer.holding:
            self.answer.held += text
            return
        self._append(deltas, text)

    def _append(self, deltas: list[str], text: str) -> None:
        """Text for the bubble: after reasoning shown in a <think> block, the block is closed first; a status line
        goes."""
        if not text:
            return
        if self.answer.progress is not None:
            self.answer.progress.text_came()
        if self.answer.thinking:
            deltas.append(THINK_CLOSE)
            self.answer.thinking = False
        self.answer.answered = True
        deltas.append(text)

    def _node_step(self, kind: str, body: dict) -> None:
        """A workflow node began or ended: a slow one (a tool, an HTTP request, a retrieval) may show its status."""
        progress, step = self.answer.progress, str(body.get("id") or body.get("node_id") or "")
        if progress is None or not step:
            return
        if kind == NODE_FINISHED:
            progress.finished(step)
        elif body.get("node_type") in SLOW_STEPS:
            progress.started(step, str(body.get("title") or body.get("node_type")))

    def _tool_step(self, event: DifyEvent) -> None:
        """An agent's thought: one that calls a tool, with no observation yet, is a step under way; its observation
        ends it."""
        progress, tool = self.answer.progress, event.get("tool")
        if progress is None or not isinstance(tool, str) or not tool:
            return
        step = f"tool:{event.get('id') or event.get('position') or tool}"
        if event.get("observation"):
            progress.finished(step)
        else:
            progress.started(step, tool)

    def _reasoning(self, deltas: list[str], event: DifyEvent) -> None:
        """A model's reasoning: never part of the answer; with SHOW_REASONING, shown before it in <think>."""
        reasoning = event.body.get("reasoning", event.get("reasoning"))
        if not self.options.show_reasoning or self.answer.answered or not isinstance(reasoning, str) or not reasoning:
            return
        if not self.answer.thinking:
            deltas.append(THINK_OPEN)
            self.answer.thinking = True
        deltas.append(reasoning)

    def _past_echo(self, text: str) -> str:
        """The part of `text` that is not Dify repeating the answer, compared by text: while `text` is where the
        repeat is up to, it is left out; once it differs, the repeat is over and it is new."""
        answer = self.answer
        if answer.echo.startswith(text):
            answer.echo = answer.echo[len(text) :]
            return ""
        echo, answer.echo = answer.echo, ""
        return text[len(echo) :] if text.startswith(echo) else text

    def _reconcile(self, deltas: list[str], text: str) -> list[str]:
        """A followed run's word on its whole answer (a snapshot's message_replace, the outputs at its end) against
        the text so far, compared by text: what it adds is appended; what the bubble has already (the `""` of a
        snapshot taken mid-run, what was shown) changes nothing; a different answer (moderation) replaces it."""
        known, earlier = self._known(deltas), self.answer.earlier
        if known.startswith(text):
            return deltas
        self.answer.echo = ""
        if text.startswith(known):
            self._append(deltas, text[len(known) :])
            return deltas
        logger.info("the run's answer differs from the text shown; it replaces it")
        return self._replace_with(deltas, text[len(earlier) :] if text.startswith(earlier) else text)

    def _known(self, deltas: list[str]) -> str:
        """The run's answer so far as Dify knows it: what came before this message (`earlier`), then its text."""
        return self.answer.earlier + self._answer_so_far(deltas)

    def answer_so_far(self) -> str:
        """The answer text written so far (without a <think> block)."""
        return self._answer_so_far([])

    def _answer_so_far(self, deltas: list[str]) -> str:
        """The answer text (without a <think> block) including `deltas` not yet written."""
        text = self.answer.text + "".join(deltas)
        return text.split(THINK_CLOSE, 1)[1] if THINK_CLOSE in text else text

    def _replace_with(self, deltas: list[str], text: str) -> list[str]:
        """Write what came before, then replace the whole answer by `text`; returns the (new, empty) deltas."""
        self.write(deltas)
        self._replace(text)
        self.answer.answered = self.answer.answered or bool(text)
        self.answer.thinking = False
        return []

    def _run_finished(self, deltas: list[str], data: dict) -> list[str]:
        """A chatflow's or workflow's run ended: a failed or stopped run is the answer's error. A run followed
        after its first reader (a resume, the rest after a form) takes from its outputs what no event carried (Dify
        #38432 streams nothing after a form that followed streamed text; a late reader missed what came before);
        a workflow app's answer is its outputs when no text_chunk came. Returns the deltas to write."""
        answer = self.answer
        status = data.get("status")
        outputs = data.get("outputs")
        answer.files += files_in_outputs(outputs)
        answer.ended = True
        if self.options.app_type == WORKFLOW and isinstance(data.get("total_tokens"), int):
            answer.usage = {"total_tokens": data["total_tokens"], "latency": data.get("elapsed_time", "")}
        if status in _FAILED_RUNS:
            answer.workflow_error = str(data.get("error") or f"the workflow {status}")[:300]
            return deltas
        if answer.reattached:
            whole = self._whole_answer(outputs, bool(self._known(deltas)))
            held, answer.holding, answer.held = answer.held, False, ""
            if not whole and held:  # outputs without the answer: what came is all there is
                self._append(deltas, held)
            return self._reconcile(deltas, whole)
        if self.options.app_type == WORKFLOW and not answer.answered:
            self._answer_text(deltas, workflow_answer(outputs, self.options.workflow_output))
        return deltas

    def _whole_answer(self, outputs, shown: bool) -> str:
        """The whole answer a run's outputs hold: a chatflow's `answer`; a workflow's outputs as its text chunks
        spell them (joined by newlines), or, when nothing was shown, the output the bot reads."""
        if self.options.app_type != WORKFLOW:
            return workflow_answer(outputs, "answer")
        return streamed_outputs(outputs) if shown else workflow_answer(outputs, self.options.workflow_output)

    def write_fields(self, fields: dict[str, str]) -> None:
        """Set fields of the stream hash, in order with the deltas before them (a form's prompt and card)."""
        self.answer.new_fields.update(fields)
        self.write([])

    def write(self, deltas: list[str]) -> None:
        """Hand deltas (and new fields) to the stream's writer, which sends them without making us wait."""
        answer = self.answer
        if deltas and not answer.text and not answer.resumed:  # the first words (or thoughts) the user sees
            metrics.FIRST_TOKEN_SECONDS.labels(self.bot).observe(max(0.0, time.time() - self.job.created_at))
        answer.text += "".join(deltas)
        if answer.detached or not (deltas or answer.new_fields):
            return
        answer.writer.add(deltas, answer.new_fields)
        answer.new_fields = {}
        keep_in_step(answer, self.store, self.job.attempt, self.job.stream_id)

    def replace_text(self, text: str) -> None:
        """The whole answer becomes `text` (written after what is queued)."""
        self._replace(text)

    def _replace(self, text: str) -> None:
        """Dify's message_replace: everything before it is written first, then the whole answer is replaced."""
        self.answer.text = text
        write_whole(self.answer, self.store, self.job.attempt, self.job.stream_id)

    def save_conversation(self, retry: bool = True) -> None:
        """Remember the conversation Dify named, so the user's next message continues it. Mid-stream one try is
        enough (the next read tries again); at the end a short outage is waited out."""
        answer = self.answer
        conversation_id = answer.conversation_id
        if not conversation_id or conversation_id == answer.conversation_saved:
            return
        job = self.job

        def remember() -> None:
            # Only the stream's current attempt: a superseded one's conversation must not replace its successor's.
            if self.store.superseded(job.stream_id, job.attempt):
                logger.info("another attempt answers this stream now; its conversation is not remembered")
                return
            self.conversations.remember(job.aibotid, job.chatid, job.conversation_member, conversation_id)

        saved = best_effort(remember, "remembering the conversation", delays=RETRY_DELAYS if retry else ())
        if saved:
            answer.conversation_saved = conversation_id


MAX_CITATIONS = 5


def cited_documents(metadata) -> list[str]:
    """The distinct knowledge documents an answer drew on (`message_end.metadata.retriever_resources`), in the
    order Dify ranks them, at most MAX_CITATIONS."""
    resources = metadata.get("retriever_resources") if isinstance(metadata, dict) else None
    names: list[str] = []
    for resource in resources if isinstance(resources, list) else []:
        name = resource.get("document_name") if isinstance(resource, dict) else None
        if isinstance(name, str) and name.strip() and name.strip() not in names:
            names.append(name.strip())
    return names[:MAX_CITATIONS]


def streamed_outputs(outputs) -> str:
    """A workflow's outputs as Dify streams them in text chunks: each value, joined by newlines."""
    if not isinstance(outputs, dict):
        return ""
    return "\n".join(str(v) for v in outputs.values() if isinstance(v, (str, int, float)) and not isinstance(v, bool))


def workflow_answer(outputs, name: str) -> str:
    """A workflow's answer from its outputs: the output `name`, or (no name) the first string output."""
    if not isinstance(outputs, dict):
        return ""
    if name:
        value = outputs.get(name)
        return value if isinstance(value, str) else ("" if value is None else str(value))
    return next((value for value in outputs.values() if isinstance(value, str) and value), "")
