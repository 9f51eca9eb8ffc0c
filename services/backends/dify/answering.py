"""A Dify app as a bot's backend (services/streams/backend.py): each app type's call, its events recorded into the
answer (recorder.py), a chatflow's or workflow's run followed again where its stream was cut or its replica was
lost, the forms its runs pause at (form_steps.py), and what Dify adds once the answer ended (completion.py).

A call Dify never took (refused, or not reached) is asked again while the bubble can wait; a call that may have
reached Dify is never asked again: that would be a second answer.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial

from services.backends.dify.completion import AnswerCompletion
from services.backends.dify.form_steps import FormSteps
from services.backends.dify.recorder import AnswerOptions, AnswerRecorder
from services.backends.dify.relay import TextRelay
from services.dify.app_profile import DifyAppProfile
from services.dify.client import WORKFLOW, ChatRequest, DifyClient
from services.dify.events import RUN_APPS, DifyEvent
from services.files.delivery import FileDelivery
from services.forms.service import FormService
from services.forms.store import SUBMITTED
from services.media.service import MediaService
from services.outage import through_outage
from services.streams.answer import Answer, StreamAborted
from services.streams.backend import Capabilities
from services.streams.conversations import ConversationStore
from services.streams.finisher import Finisher
from services.streams.health import BackendHealth
from services.streams.job import StreamJob
from services.streams.record import DONE
from services.streams.store import StreamStore
from services.streams.turn import Turn
from services.texts import Texts
from services.transport.errors import (
    BackendConnectionError,
    BackendHTTPError,
    BackendStreamCut,
    BackendStreamError,
    BackendTimeout,
    never_taken,
)

logger = logging.getLogger(__name__)

# A run's events stream cut this many times in a row (each re-attached with the run's snapshot) is taken for Dify
# failing: the answer ends with the note of a cut stream.
MAX_REATTACHES = 3

OpenEvents = Callable[[TextRelay], Iterator[list[DifyEvent]]]


@dataclass(frozen=True)
class DifyParts:
    """A Dify app and what the gateway keeps of it: its client and profile, the conversations its users continue,
    the files users send it, the forms its runs pause at (None: the bubble says the app waits), the files it makes
    (None: not delivered), and the stream store its followed runs are read back from."""

    client: DifyClient
    profile: DifyAppProfile
    conversations: ConversationStore
    media: MediaService
    store: StreamStore
    forms: FormService | None = None
    files: FileDelivery | None = None


class DifyBackend:
    """One bot's Dify app."""

    name = "dify"
    capabilities = Capabilities(resumes=True, forms=True)

    def __init__(
        self,
        parts: DifyParts,
        options: AnswerOptions,
        bot: str,
        finisher: Finisher,
        texts: Texts,
        health: BackendHealth,
    ):
        self.parts = parts
        self.options = options
        self.bot = bot
        self.form_steps = None
        if parts.forms is not None:
            self.form_steps = FormSteps(parts.forms, parts.store, finisher, texts, self._follow_run)
        self.completion = AnswerCompletion(
            texts, finisher, health, parts.client, parts.profile, parts.files, options.show_citations
        )

    # --- the port ----------------------------------------------------------------------------------------------

    def answer(self, turn: Turn) -> None:
        """A new question: the app's inputs (the user's, the chat's, the files they sent), the conversation it
        continues, then the call, its forms, and its end."""
        job, answer, parts = turn.job, turn.answer, self.parts
        inputs = turn.authorize()
        declared = parts.profile.declared_inputs()
        inputs |= {name: value for name, value in job.context_inputs(self.bot).items() if name in declared}
        given, note_key = parts.media.files_for_question(job.attachments, job.typed_query, job.dify_user)
        inputs |= given.inputs
        options = replace(self.options, app_type=parts.profile.app_type())
        if options.app_type == WORKFLOW:
            question_input = parts.profile.question_input(options.workflow_input, frozenset(inputs))
            options = replace(options, workflow_input=question_input)
        conversation_id = ""
        if options.app_type != WORKFLOW:  # workflows keep no conversations
            conversation_id = turn.before_start(
                lambda: parts.conversations.current(job.aibotid, job.chatid, job.conversation_member),
                "looking up the conversation",
            )
        turn.take_slot()
        turn.count_call(self.name)
        recorder = AnswerRecorder(job, answer, parts.store, parts.conversations, self.bot, options)
        with _run_failures(recorder):
            while True:
                request = ChatRequest(
                    query=job.query,
                    user=job.dify_user,
                    inputs=inputs,
                    conversation_id=conversation_id,
                    files=given.files,
                    app_type=options.app_type,
                    workflow_input=options.workflow_input,
                )
                logger.info("calling Dify%s", " (continuing the conversation)" if conversation_id else "")
                try:
                    self._ask(turn, request, recorder)
                    break
                except BackendHTTPError as exc:
                    gone = exc.status == 404 or exc.code == "conversation_completed"
                    # Only the question's own POST speaks of the conversation: an error once a run began is a
                    # re-attach's (_follow), and asking the question again would make a second answer.
                    if not conversation_id or not gone or answer.workflow_run_id or answer.text:
                        raise
                    logger.info("Dify no longer has the conversation (%s); starting a new one", exc.code)
                    through_outage(
                        lambda: parts.conversations.forget(job.aibotid, job.chatid, job.conversation_member),
                        "forgetting the conversation",
                    )
                    conversation_id = ""
            self._through_forms(turn, recorder)
        self.completion.complete(job, answer, recorder, turn.texts.say(note_key) if note_key else "")

    def resume(self, turn: Turn) -> None:
        """Follow again the Dify run of a stream whose replica is gone (a chatflow's or workflow's), from where the
        bubble's text stopped. Dify relays only what a run does from the moment one listens, so its saved state
        comes first (`snapshot`): the answer saved at a pause with the pause's form, or a finished run's outputs;
        the recorder compares them with what the bubble shows, by text (AnswerRecorder._reconcile)."""
        job, answer = turn.job, turn.answer
        recorder = self._attach(job, answer, job.resume_run)
        answer.resumed = True
        logger.info("following the Dify run again, after the %d characters shown", len(answer.text))
        turn.count_follow_up(self.name, "resume")
        with _run_failures(recorder):
            self._follow_again(turn, recorder, turn.deadline)
            self._through_forms(turn, recorder)
        self.completion.complete(job, answer, recorder, "")

    def continue_form(self, turn: Turn) -> None:
        """The rest of a run after a form's answer, as a message of its own (the bubble no longer waited for it):
        submit the form (once: a resumed attempt finds it submitted), then follow the run from there."""
        job, answer, parts = turn.job, turn.answer, self.parts
        record = through_outage(lambda: parts.forms.store.load(job.form_task), "reading the form")
        if record is None:
            turn.finisher.finish(job, answer, DONE, note=turn.texts.say("form_expired"))
            return
        recorder = self._attach(job, answer, record.form.run_id)
        answer.resumed, recorder.run.earlier = bool(answer.text), record.before
        with _run_failures(recorder):
            if self.form_steps.go_on(turn, recorder, record.task_id, record.form.token) == SUBMITTED:
                self._through_forms(turn, recorder)
        self.completion.complete(job, answer, recorder, "")

    def stop(self, task_id: str, user: str) -> None:
        self.parts.client.stop(task_id, user, self.parts.profile.app_type())

    def check(self, timeout: float = 5.0) -> str:
        return self.parts.client.access_problem(timeout)

    def where(self) -> str:
        return self.parts.client.host

    # --- the calls -------------------------------------------------------------------------------------------

    def _ask(self, turn: Turn, request: ChatRequest, recorder: AnswerRecorder) -> None:
        """The question's Dify call, followed to the answer's end. A call Dify never took (never_taken: refused, or
        not reached; the client tried it DIFY_MAX_RETRIES times already) is asked again for DIFY_RETRY_SECONDS
        (_patiently). A call that may have reached Dify is never asked again: that would be a second answer."""
        answer = turn.answer

        def may_ask_again(exc: Exception) -> bool:
            return never_taken(exc) and not (answer.text or answer.task_id or answer.workflow_run_id)

        events = partial(self.parts.client.stream_chat, request, trace_id=turn.job.trace_id)
        self._patiently(turn, events, recorder, turn.deadline, may_ask_again, "asked_again")

    def _patiently(
        self,
        turn: Turn,
        open_events: OpenEvents,
        recorder: AnswerRecorder,
        deadline: float,
        may_try_again: Callable[[Exception], bool],
        counted_as: str,
        cuts_left: int = MAX_REATTACHES,
    ) -> None:
        """One Dify call followed to its end (`_follow`, by `deadline`), made again while it fails in a way
        `may_try_again` says is safe to repeat, every 1-5 s for DIFY_RETRY_SECONDS, as long as the answer has time and
        room left (Turn.patience_ends), the bubble showing what it showed meanwhile. Each try again is counted as
        `counted_as`.

        Raises:
            StreamAborted: the answer was stopped, or its process drains, while it waited to try again.
        """
        turn.tried_again(
            lambda: self._follow(turn, open_events, recorder, deadline, cuts_left),
            may_try_again,
            turn.patience_ends(deadline),
            "Dify did not take the call",
            lambda: turn.count_follow_up(self.name, counted_as),
        )

    def _follow_again(
        self, turn: Turn, recorder: AnswerRecorder, deadline: float, cuts_left: int = MAX_REATTACHES
    ) -> None:
        """Follow the answer's run from Dify's snapshot of it, then live: the way back to a run after its replica
        was lost, or after the stream following it was cut. Dify relays only what a run publishes from the moment
        one listens, so live text may follow a gap: it is held until it can be placed (TextGate)."""
        answer, run, job = recorder.answer, recorder.run, turn.job
        run.reattached = True
        run.gate.hold()
        events = partial(
            self.parts.client.stream_run, answer.workflow_run_id, job.dify_user, snapshot=True, trace_id=job.trace_id
        )
        self._patiently(turn, events, recorder, deadline, _unread, "reattach", cuts_left)
        if answer.paused and run.gate.held:
            # It paused after live text that could not be placed: the answer Dify saved at the pause says it all.
            logger.info("the run paused after text that followed a gap; reading its saved state again")
            answer.goes_on_after_form()
            run.gate.drop_held()
            self._follow(turn, events, recorder, deadline, cuts_left)
        run.gate.release()

    def _follow(
        self, turn: Turn, open_events: OpenEvents, recorder: AnswerRecorder, deadline: float, cuts_left: int
    ) -> None:
        """One Dify call (`open_events(relay)`), recorded to the answer's end. A chatflow's or workflow's run goes
        on in Dify whatever becomes of the stream that follows it, so a stream cut short (a proxy, the network;
        Dify 1.16.0 cuts a plain listener when another subscriber of the run closes) is never taken for a failed
        run: the run is followed again from its snapshot, `cuts_left` times at most.

        Raises:
            BackendStreamCut: a chat's stream was cut, or a run's more than `cuts_left` times.
        """
        try:
            self._consume(turn, open_events, recorder, deadline)
        except BackendStreamCut as cut:
            if cuts_left <= 0 or not recorder.answer.workflow_run_id or recorder.options.app_type not in RUN_APPS:
                raise
            logger.warning("the stream following the run was cut (%s); following it again", cut.message[:120])
            turn.count_follow_up(self.name, "reattach")
            self._follow_again(turn, recorder, deadline, cuts_left - 1)

    def _follow_run(self, turn: Turn, recorder: AnswerRecorder, on_open: Callable[[], bool]) -> None:
        """Follow the answer's Dify run on from its pause, recording its events: `on_open()` runs once Dify
        relays them (it submits the form), and when it returns False nothing is read."""
        turn.count_follow_up(self.name, "form")
        answer, job = turn.answer, turn.job
        events = partial(
            self.parts.client.stream_run,
            answer.workflow_run_id,
            job.dify_user,
            continue_on_pause=True,
            on_open=on_open,
            trace_id=job.trace_id,
        )
        self._patiently(turn, events, recorder, time.monotonic() + turn.rules.max_seconds, _unread, "form")

    def _consume(self, turn: Turn, open_events: OpenEvents, recorder: AnswerRecorder, deadline: float) -> None:
        """One Dify call (`open_events(relay)`), its events recorded as they come; returns at the answer's end.

        Raises:
            BackendTimeout: the answer ran past `deadline` (monotonic).
        """
        cancelled = turn.cancelled
        relay = TextRelay(recorder.answer, recorder.run, cancelled, deadline)
        for batch in open_events(relay):
            if cancelled.is_set():
                for event in batch:  # the task's id, for Dify's stop call when the user stopped the answer
                    recorder.answer.note_ids(event)
                raise StreamAborted
            recorder.apply(batch)
            if recorder.answer.ended:
                return
            if time.monotonic() > deadline:
                raise BackendTimeout(f"answer ran past {turn.rules.max_seconds:.0f}s", code="total_timeout")

    def _attach(self, job: StreamJob, answer: Answer, run_id: str) -> AnswerRecorder:
        """Make `answer` follow a Dify run already under way (`run_id`), for this attempt at its stream: it starts
        from the text the stream's chunks hold (what the bubble shows), and its writer goes on after them."""
        parts = self.parts
        options = replace(self.options, app_type=parts.profile.app_type())
        chunks = through_outage(lambda: parts.store.reads.chunks(job.stream_id), "reading the answer so far")
        answer.text = "".join(chunks)
        answer.writer.start_after(len(chunks), len(answer.text))
        answer.answered, answer.workflow_run_id = bool(answer.text), run_id
        recorder = AnswerRecorder(job, answer, parts.store, parts.conversations, self.bot, options)
        recorder.run.reattached = True
        return recorder

    def _through_forms(self, turn: Turn, recorder: AnswerRecorder) -> None:
        if self.form_steps is not None:
            self.form_steps.through(turn, recorder)


@contextmanager
def _run_failures(recorder: AnswerRecorder):
    """A run's stream cut after the run said it failed is the run's failure, with its reason (the user's note says
    why), not a cut."""
    try:
        yield
    except BackendStreamCut as cut:
        if not recorder.run.error:
            raise
        raise BackendStreamError(recorder.run.error, code="workflow_failed") from cut


def _unread(exc: Exception) -> bool:
    """Whether a call that follows a run (a GET: it makes nothing, and a form is submitted only once its events
    flow) failed before any of its events came: Dify unreachable, or refusing it for now (429, 502, 503, 504)."""
    if isinstance(exc, BackendConnectionError):
        return True
    return isinstance(exc, BackendHTTPError) and exc.status in (429, 502, 503, 504)
