"""Dify's events of one call applied to the answer in memory (services/streams/answer.py) and to the stream's
writer (services/streams/writer.py), which sends them to Redis without making the worker wait.

The common read (plain text deltas) is handled in the read pump's thread (relay.py);
everything else goes through `AnswerRecorder.apply` in the stream's own thread, one handler per kind of event.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from services import metrics
from services.backends.dify.run import DifyRun
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
from services.files.model import file_of_event, files_in_outputs
from services.outage import RETRY_DELAYS, best_effort
from services.streams.answer import Answer
from services.streams.conversations import ConversationStore
from services.streams.job import StreamJob
from services.streams.progress import StepProgress
from services.streams.sink import AnswerSink
from services.streams.store import StreamStore

logger = logging.getLogger(__name__)

# The node types that may run for a while before any text comes (a workflow's or chatflow's `node_started`).
SLOW_STEPS = frozenset({"tool", "http-request", "knowledge-retrieval", "agent"})


@dataclass(frozen=True, slots=True)
class AnswerOptions:
    """How a bot's answers are made from its app's events (docs/configuration.md)."""

    app_type: str = "chat"  # the app's type, resolved (never "auto")
    show_reasoning: bool = False  # a model's reasoning before the answer, in a <think> block
    show_citations: bool = True  # the knowledge documents the answer drew on, listed at its end
    workflow_input: str = "query"  # workflow apps: the input variable the question goes into
    workflow_output: str = ""  # workflow apps: the output read when no text_chunk came ("" = first string)


DEFAULT_OPTIONS = AnswerOptions()


class AnswerRecorder(AnswerSink):
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
        super().__init__(job, answer, store, bot, "dify", options.show_reasoning)
        self.options = options
        self.conversations = conversations
        self.run = DifyRun()

    def apply(self, batch: list[DifyEvent]) -> None:
        """Record one network read's worth of events: deltas in one append, a replace in its own call."""
        deltas: list[str] = []
        for event in batch:
            self.answer.note_ids(event)
            handler = _HANDLERS.get(event.kind)
            if handler is not None:
                deltas = handler(self, deltas, event)
            elif event.kind not in QUIET_EVENTS:  # a quiet event comes only to name the run (note_ids took it)
                metrics.DIFY_UNKNOWN_EVENTS.labels(self.bot, event.kind[:40]).inc()
                logger.debug("ignored Dify event %s", event.kind)
        self.write(deltas)
        self.save_conversation(retry=False)

    # --- one handler per kind of event: each takes the deltas not yet written and returns them ------------------

    def _on_agent_message(self, deltas: list[str], event: DifyEvent) -> list[str]:
        self.run.agent_messages = True
        self._answer_text(deltas, event.answer)
        return deltas

    def _on_message(self, deltas: list[str], event: DifyEvent) -> list[str]:
        if not self.run.agent_messages:
            self._answer_text(deltas, event.answer)
        # Dify's newer agent app closes with one `message` holding the whole answer again.
        elif event.answer and event.answer != self.answer_so_far(deltas):
            return self.replace_text(event.answer, deltas)
        return deltas

    def _on_file(self, deltas: list[str], event: DifyEvent) -> list[str]:
        # After an assistant file, Dify labels the message's later text chunks message_file.
        self._answer_text(deltas, event.answer)
        if (file := file_of_event(event.data)) is not None:
            self.answer.files.append(file)
        return deltas

    def _on_workflow_text(self, deltas: list[str], event: DifyEvent) -> list[str]:
        self._answer_text(deltas, str(event.body.get("text") or ""))
        return deltas

    def _on_replace(self, deltas: list[str], event: DifyEvent) -> list[str]:
        text = event.answer if event.kind == REPLACE_EVENT else str(event.body.get("text") or "")
        return self._reconcile(deltas, text) if self.run.reattached else self.replace_text(text, deltas)

    def _on_reasoning(self, deltas: list[str], event: DifyEvent) -> list[str]:
        """A model's reasoning: never part of the answer; with SHOW_REASONING, shown before it in <think>."""
        reasoning = event.body.get("reasoning", event.get("reasoning"))
        self.append_reasoning(deltas, reasoning if isinstance(reasoning, str) else "")
        return deltas

    def _on_end(self, deltas: list[str], event: DifyEvent) -> list[str]:
        answer = self.answer
        answer.message_ended()
        metadata = event.get("metadata")
        if isinstance(metadata, dict) and isinstance(metadata.get("usage"), dict):
            answer.usage = metadata["usage"]
        answer.citations = cited_documents(metadata) or answer.citations
        return deltas

    def _on_thought(self, deltas: list[str], event: DifyEvent) -> list[str]:
        thought = event.get("thought")
        if isinstance(thought, str) and thought.strip():
            self.run.last_thought = thought
        _tool_step(self.answer.progress, event)
        return deltas

    def _on_node(self, deltas: list[str], event: DifyEvent) -> list[str]:
        """A workflow node began or ended: a slow one (a tool, an HTTP request, a retrieval) may show its status. A
        node that begins ends what a resumed run sends again (Dify 1.14.2 repeats the answer before the pause
        ahead of its first node; 1.16.0 repeats nothing, and its first text after a resumption may begin as the
        earlier answer did)."""
        if event.kind == NODE_STARTED:
            self.run.gate.echo_over()
        progress, body = self.answer.progress, event.body
        step = str(body.get("id") or body.get("node_id") or "")
        if progress is None or not step:
            return deltas
        if event.kind == NODE_FINISHED:
            progress.finished(step)
        elif body.get("node_type") in SLOW_STEPS:
            progress.started(step, str(body.get("title") or body.get("node_type")))
        return deltas

    def _on_run_finished(self, deltas: list[str], event: DifyEvent) -> list[str]:
        # Dify's record (services/dify/client.py) speaks for the whole run, like a re-attached one's outputs.
        from_record = bool(event.get("from_record") or event.get("outputs_from_record"))
        return self._run_finished(deltas, event.body, from_record)

    def _on_pause(self, deltas: list[str], event: DifyEvent) -> list[str]:
        answer = self.answer
        if event.kind == PAUSED:
            answer.run_paused()
        else:
            answer.form_asked()
        if event.kind == INPUT_REQUIRED:
            self.run.form_event = {**event.data, **event.body}
        return deltas

    def _on_run_started(self, deltas: list[str], event: DifyEvent) -> list[str]:
        if event.body.get("reason") == "resumption":  # Dify streams the answer before the pause again
            self.run.gate.expect_echo(self._known(deltas))  # the repeat then the rest: nothing missing from here
        return deltas

    def _on_form_done(self, deltas: list[str], event: DifyEvent) -> list[str]:
        self.run.gate.echo_over()  # what follows the form's node is new
        self.run.form_timed_out = self.run.form_timed_out or event.kind == FORM_TIMEOUT
        return deltas

    def _answer_text(self, deltas: list[str], text: str) -> None:
        """Answer text as Dify streams it, through the answer's gate (TextGate: a resumed run's repeat left out,
        text after a hole held back)."""
        self.append_text(deltas, self.run.gate.admit(text))

    def _reconcile(self, deltas: list[str], text: str) -> list[str]:
        """A followed run's word on its whole answer (a snapshot's message_replace, the outputs at its end) against
        the text so far, compared by text: what it adds is appended; what the bubble has already (the `""` of a
        snapshot taken mid-run, what was shown) changes nothing; a different answer (moderation) replaces it."""
        text = self.answer.mask.apply(text)  # compared with the text let go, masked as it was
        known, earlier = self._known(deltas), self.run.earlier
        if known.startswith(text):
            return deltas
        self.run.gate.echo_over()
        if text.startswith(known):
            self.append_text(deltas, text[len(known) :])
            return deltas
        logger.info("the run's answer differs from the text shown; it replaces it")
        return self.replace_text(text[len(earlier) :] if text.startswith(earlier) else text, deltas)

    def _known(self, deltas: list[str]) -> str:
        """The run's answer so far as Dify knows it: what came before this message (`earlier`), then its text."""
        return self.run.earlier + self.answer_so_far(deltas)

    def _run_finished(self, deltas: list[str], data: dict, from_record: bool = False) -> list[str]:
        """A chatflow's or workflow's run ended: a failed run is the answer's error; one stopped before it made its
        outputs keeps what it streamed (`DifyRun.stopped`: the note says so, never that the user stopped it). A run
        followed after its first reader (a resume, the rest after a form), or finished from Dify's record, takes
        from its outputs what no event carried (Dify #38432 streams nothing after a form that followed streamed
        text; a late reader missed what came before); a workflow app's answer is its outputs when no text_chunk
        came. Returns the deltas to write."""
        answer = self.answer
        status = data.get("status")
        outputs = data.get("outputs")
        answer.files += files_in_outputs(outputs)
        answer.run_ended()
        if self.options.app_type == WORKFLOW and isinstance(data.get("total_tokens"), int):
            answer.usage = {"total_tokens": data["total_tokens"], "latency": data.get("elapsed_time", "")}
        if status == "failed":
            self.run.error = str(data.get("error") or "the workflow failed")[:300]
            return deltas
        if status == "stopped" and not outputs:
            logger.warning("Dify stopped the run before it made its outputs (%s)", str(data.get("error"))[:100])
            self.run.stopped = True
            self.append_text(deltas, self.run.gate.release())  # what came is all there is
            return deltas
        if status == "stopped":
            logger.warning("Dify calls the run stopped, but it made its outputs: the answer is whole")
        if self.run.reattached or from_record:
            whole = _whole_answer(self.options, outputs, bool(self._known(deltas)))
            held = self.run.gate.release()
            if not whole and held:  # outputs without the answer: what came is all there is
                self.append_text(deltas, held)
            return self._reconcile(deltas, whole)
        if self.options.app_type == WORKFLOW and not answer.answered:
            self._answer_text(deltas, workflow_answer(outputs, self.options.workflow_output))
        return deltas

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
            if self.store.reads.superseded(job.stream_id, job.attempt):
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


_HANDLERS = {
    AGENT_MESSAGE_EVENT: AnswerRecorder._on_agent_message,
    MESSAGE_EVENT: AnswerRecorder._on_message,
    FILE_EVENT: AnswerRecorder._on_file,
    WORKFLOW_TEXT: AnswerRecorder._on_workflow_text,
    REPLACE_EVENT: AnswerRecorder._on_replace,
    WORKFLOW_REPLACE: AnswerRecorder._on_replace,
    REASONING_EVENT: AnswerRecorder._on_reasoning,
    END_EVENT: AnswerRecorder._on_end,
    THOUGHT_EVENT: AnswerRecorder._on_thought,
    NODE_STARTED: AnswerRecorder._on_node,
    NODE_FINISHED: AnswerRecorder._on_node,
    WORKFLOW_FINISHED: AnswerRecorder._on_run_finished,
    INPUT_REQUIRED: AnswerRecorder._on_pause,
    PAUSED: AnswerRecorder._on_pause,
    WORKFLOW_STARTED: AnswerRecorder._on_run_started,
    FORM_FILLED: AnswerRecorder._on_form_done,
    FORM_TIMEOUT: AnswerRecorder._on_form_done,
}


def _tool_step(progress: StepProgress | None, event: DifyEvent) -> None:
    """An agent's thought: one that calls a tool, with no observation yet, is a step under way; its observation
    ends it."""
    tool = event.get("tool")
    if progress is None or not isinstance(tool, str) or not tool:
        return
    step = f"tool:{event.get('id') or event.get('position') or tool}"
    if event.get("observation"):
        progress.finished(step)
    else:
        progress.started(step, tool)


def _whole_answer(options: AnswerOptions, outputs, shown: bool) -> str:
    """The whole answer a followed run's outputs hold: a chatflow's `answer`; a workflow's outputs as its End
    streams them in text chunks (joined by newlines), as a listener that missed them would have shown them,
    unless nothing was shown and the bot reads one output (DIFY_WORKFLOW_OUTPUT)."""
    if options.app_type != WORKFLOW:
        return workflow_answer(outputs, "answer")
    if shown or not options.workflow_output:
        return streamed_outputs(outputs)
    return workflow_answer(outputs, options.workflow_output)
