"""The background side of one answer: authorize, call Dify, record its events, and always leave a final state.

Runs in a thread started by the runner. The steps have their own modules: the events become the answer in
`recorder.py`, what is added once Dify's answer ended is `completion.py`'s, the ending is `finisher.py`'s, Redis
outages are met as `outage.py` says. Every outcome ends in a final state: `done` with the answer, or `error` with
the partial text kept and a short note for the user. If another replica took the stream over, the worker stops
writing at once, so there are never two answers.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from functools import partial
from typing import TypeVar

from services import metrics
from services.auth.authorizer import AuthError, AuthUnavailable, DirectoryUnavailable
from services.dify.app_profile import DifyAppProfile
from services.dify.client import WORKFLOW, ChatRequest, DifyClient
from services.dify.events import RUN_APPS, DifyEvent
from services.dify.health import DifyHealth
from services.files.delivery import FileDelivery
from services.forms.service import FormService
from services.forms.store import SUBMITTED
from services.media.service import Declined, MediaService
from services.outage import best_effort_value, delays_for, through_outage
from services.redis_conn import REDIS_FAILURES
from services.rules.file import RulesFile
from services.rules.mask import ContentMask
from services.streams.answer import Answer, HandedOver, StreamAborted
from services.streams.completion import AnswerCompletion
from services.streams.conversations import ConversationStore
from services.streams.finisher import Finisher
from services.streams.form_steps import FormSteps
from services.streams.job import StreamJob
from services.streams.progress import StepProgress
from services.streams.recorder import DEFAULT_OPTIONS, AnswerOptions, AnswerRecorder
from services.streams.runner import LeaseClock
from services.streams.slots import AnswerSlots
from services.streams.stop import AnswerStopper
from services.streams.store import DONE, ERROR, StreamStore
from services.streams.text_relay import TextRelay
from services.streams.writer import AppendBatcher
from services.texts import Texts
from services.transport.errors import (
    BackendConnectionError,
    BackendError,
    BackendHTTPError,
    BackendStreamCut,
    BackendStreamError,
    BackendTimeout,
    never_taken,
)
from utils.logging import log_context

logger = logging.getLogger(__name__)

# A run's events stream cut this many times in a row (each re-attached with the run's snapshot) is taken for Dify
# failing: the answer ends with the note of a cut stream.
MAX_REATTACHES = 3

# A question Dify never took (refused with 429/503, unreachable: a restart, a partition) is asked again for
# DIFY_RETRY_SECONDS (this by default) after the first try, the pause between tries growing to PATIENCE_PAUSES[-1]:
# WeCom waits minutes for the bubble, so an outage of Dify shorter than that costs the user a wait, not the answer.
DIFY_RETRY_SECONDS = 60.0
PATIENCE_PAUSES = (1.0, 2.0, 4.0, 5.0)

# Before an answer starts, Redis away is waited out while the bubble has this long left to show an answer in, trying
# again every START_RETRY_DELAY seconds at most (worker._before_start).
ANSWER_ROOM_SECONDS = 60.0
START_RETRY_DELAY = 2.0

T = TypeVar("T")


@dataclass
class WorkerDeps:
    """The services one answer is made with."""

    store: StreamStore
    dify: DifyClient
    profile: DifyAppProfile
    conversations: ConversationStore
    media: MediaService
    appender: AppendBatcher
    finisher: Finisher
    texts: Texts
    health: DifyHealth
    forms: FormService | None = None  # human-input forms answered in WeCom (None: the bubble says the app waits)
    files: FileDelivery | None = None  # the files Dify makes, delivered at the answer's end
    stopper: AnswerStopper | None = None  # a user's /stop: Dify's stop call when the stop came before the task id
    append_pace: float = 0.0  # at most one append per that many seconds (a long connection's frame interval)
    # Appends carry a deadline (writer.py) where an answer's end may go out without Redis, from the text Redis
    # confirmed holding (callback mode's response_url); a long connection's end waits for Redis instead, and an
    # append Redis runs late is only text the stream then has, which every frame and rest is counted from.
    append_deadlines: bool = True
    slots: AnswerSlots | None = None  # MAX_ACTIVE_ANSWERS_PER_BOT: a slot before each new Dify call (None: no cap)
    rules: RulesFile | None = None  # CONTENT_RULES_FILE: its matches masked in the answer (None: none)


class NoSlot(Exception):
    """The question waited QUEUE_WAIT_SECONDS in line and no answer slot came free."""


class StreamWorker:
    """Answers one StreamJob. `prepare(job)` returns the Dify `inputs` or raises AuthError (no Dify call then)."""

    def __init__(
        self,
        deps: WorkerDeps,
        owner: str,
        max_seconds: float,
        prepare: Callable[[StreamJob], dict] | None = None,
        bot: str = "default",
        options: AnswerOptions = DEFAULT_OPTIONS,
        patience: tuple[float, float] = (DIFY_RETRY_SECONDS, DIFY_RETRY_SECONDS),
    ):
        self.deps = deps
        self.options = options
        # How long a question Dify never took is asked again (DIFY_RETRY_SECONDS), and how long the user table or the
        # auth API away is waited out (AUTH_RETRY_SECONDS).
        self.patience, self.auth_patience = patience
        self.owner = owner
        self.bot = bot
        self.max_seconds = max_seconds
        self.prepare = prepare or (lambda job: {})
        self.form_steps = (
            FormSteps(deps.forms, deps.store, deps.finisher, deps.texts, self._follow_run) if deps.forms else None
        )
        self.completion = AnswerCompletion(
            deps.texts, deps.finisher, deps.health, deps.dify, deps.profile, deps.files, options.show_citations
        )

    def run(self, job: StreamJob, cancelled: threading.Event, lease: LeaseClock | None = None) -> None:
        """Thread entry point: never raises, always leaves a final state unless another replica owns the stream."""
        with log_context(
            replica=self.owner,
            bot=self.bot,
            stream=job.stream_id,
            msgid=job.msgid,
            user=job.userid,
            chat=job.chatid or None,
        ):
            answer = self._new_answer(job, lease)
            texts = self.deps.texts
            try:
                self._answer(job, cancelled, answer)
            except HandedOver:
                metrics.STREAM_OUTCOMES.labels(self.bot, "handed_over").inc()
                logger.info("this process stops: the form's wait was handed over to another replica")
            except StreamAborted:
                metrics.STREAM_OUTCOMES.labels(self.bot, "taken_over_elsewhere").inc()
                logger.info(
                    "stream is owned or closed elsewhere now (taken over, or stopped by its user); worker stops"
                )
                if self.deps.stopper is not None:
                    self.deps.stopper.stop_dify_later(job, answer.task_id)
            except AuthError as refusal:
                logger.info("not asking Dify: %s", refusal.code)
                self.deps.finisher.finish(job, answer, ERROR, note=texts.failure_note(refusal), error=refusal.code)
            except Declined as declined:
                logger.info("declined: %s", declined.note_key)
                status, error = (ERROR, declined.note_key) if declined.failed else (DONE, "")
                self.deps.finisher.finish(job, answer, status, note=texts.say(declined.note_key), error=error)
            except BackendError as exc:
                self._fail(job, answer, exc)
            except NoSlot:
                logger.info("no answer slot came free within QUEUE_WAIT_SECONDS: a busy reply")
                metrics.CAP_REFUSALS.labels(self.bot).inc()
                self.deps.finisher.finish(job, answer, DONE, note=texts.say("queue_busy"), error="busy")
            except REDIS_FAILURES as exc:
                logger.warning("Redis stayed unavailable before the answer could start: %s", exc)
                self.deps.finisher.finish(
                    job, answer, ERROR, note=texts.say("store_unavailable"), error="redis_unavailable"
                )
            except Exception:
                logger.exception("stream worker failed")
                self.deps.finisher.finish(job, answer, ERROR, note=texts.say("internal_error"), error="internal_error")
            finally:
                if answer.progress is not None:
                    answer.progress.close()
                if self.deps.slots is not None:
                    self.deps.slots.release(job.stream_id)
                if answer.mask.count:
                    metrics.MASKED_MATCHES.labels(self.bot).inc(answer.mask.count)

    def _answer(self, job: StreamJob, cancelled: threading.Event, answer: Answer) -> None:
        if job.separate:
            self._continue_form(job, cancelled, answer)
            return
        if job.resume_run:
            self._resume(job, cancelled, answer)
            return
        deps = self.deps
        inputs = self._authorize(job, cancelled)
        declared = deps.profile.declared_inputs()
        inputs |= {name: value for name, value in job.context_inputs(self.bot).items() if name in declared}
        given, note_key = deps.media.files_for_question(job.attachments, job.typed_query, job.dify_user)
        inputs |= given.inputs
        options = replace(self.options, app_type=deps.profile.app_type())
        if options.app_type == WORKFLOW:
            question_input = deps.profile.question_input(options.workflow_input, frozenset(inputs))
            options = replace(options, workflow_input=question_input)
        conversation_id = ""
        if options.app_type != WORKFLOW:  # workflows keep no conversations
            conversation_id = self._before_start(
                job,
                cancelled,
                lambda: deps.conversations.current(job.aibotid, job.chatid, job.conversation_member),
                "looking up the conversation",
            )
        if deps.slots is not None:
            self._take_slot(job, answer, cancelled)
        deadline = self._deadline(job)
        self._count_call(job)
        answer.app_type = options.app_type
        recorder = AnswerRecorder(job, answer, deps.store, deps.conversations, self.bot, options)
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
                self._ask(job, request, recorder, cancelled, deadline)
                break
            except BackendHTTPError as exc:
                gone = exc.status == 404 or exc.code == "conversation_completed"
                # Only the question's own POST speaks of the conversation: an error once a run began is a
                # re-attach's (_follow), and asking the question again would make a second answer.
                if not conversation_id or not gone or answer.workflow_run_id or answer.text:
                    raise
                logger.info("Dify no longer has the conversation (%s); starting a new one", exc.code)
                through_outage(
                    lambda: deps.conversations.forget(job.aibotid, job.chatid, job.conversation_member),
                    "forgetting the conversation",
                )
                conversation_id = ""
        self._through_forms(job, answer, recorder, cancelled)
        self.completion.complete(job, answer, recorder, deps.texts.say(note_key) if note_key else "")

    def _ask(
        self, job: StreamJob, request: ChatRequest, recorder: AnswerRecorder, cancelled: threading.Event, deadline
    ) -> None:
        """The question's Dify call, followed to the answer's end. A call Dify never took (never_taken: refused, or
        not reached; the client tried it DIFY_MAX_RETRIES times already) is asked again for DIFY_RETRY_SECONDS
        (_patiently). A call that may have reached Dify is never asked again: that would be a second answer."""
        answer = recorder.answer

        def may_ask_again(exc: Exception) -> bool:
            return never_taken(exc) and not (answer.text or answer.task_id or answer.workflow_run_id)

        events = partial(self.deps.dify.stream_chat, request)
        self._patiently(job, events, recorder, cancelled, deadline, may_ask_again, "asked_again")

    def _patiently(
        self,
        job: StreamJob,
        open_events: Callable[[TextRelay], Iterator[list[DifyEvent]]],
        recorder: AnswerRecorder,
        cancelled: threading.Event,
        deadline: float,
        may_try_again: Callable[[Exception], bool],
        counted_as: str,
        cuts_left: int = MAX_REATTACHES,
    ) -> None:
        """One Dify call followed to its end (`_follow`), made again while it fails in a way `may_try_again` says
        is safe to repeat, every 1-5 s for DIFY_RETRY_SECONDS, as long as the answer has time and room left
        (_room_ends), the bubble showing what it showed meanwhile: WeCom waits minutes for it, so a Dify outage
        shorter than that costs the user a wait, not the answer. Each try again is counted as `counted_as`.

        Raises:
            StreamAborted: the answer was stopped, or its process drains, while it waited to try again.
        """
        _tried_again(
            lambda: self._follow(job, open_events, recorder, cancelled, deadline, cuts_left),
            may_try_again,
            min(deadline, self._room_ends(job), time.monotonic() + self.patience),
            cancelled,
            "Dify did not take the call",
            lambda: metrics.DIFY_CALLS.labels(self.bot, counted_as).inc(),
        )

    def _authorize(self, job: StreamJob, cancelled: threading.Event) -> dict:
        """The user's inputs from the authorizer (AUTH_MODE=external). The user table or the auth API away (a
        database restart, the API down) is waited out for AUTH_RETRY_SECONDS (`auth_patience`) while there is room
        (_room_ends), trying again every few seconds, as a Redis outage is (_before_start): WeCom waits minutes for
        the bubble, so a short outage costs the user a wait, not a note. A refusal (an unknown or disabled user) is
        final at once.

        Raises:
            AuthError: the user may not ask, or the outage lasted.
            StreamAborted: the answer was stopped, or its process drains, while it waited.
        """
        return _tried_again(
            lambda: self._before_start(job, cancelled, lambda: self.prepare(job), "authorizing the user"),
            lambda exc: isinstance(exc, (DirectoryUnavailable, AuthUnavailable)),
            min(self._room_ends(job), time.monotonic() + self.auth_patience),
            cancelled,
            "could not authorize the user",
        )

    def _before_start(self, job: StreamJob, cancelled: threading.Event, call: Callable[[], T], what: str) -> T:
        """A Redis call the answer cannot start without. Redis away (a failover, a restart) is waited out for as
        long as an answer could still be made and shown in the bubble, not only for a blip: until ANSWER_ROOM_SECONDS
        before WeCom stops polling, or the answer's time is up, or the attempt is no longer this process's. The
        bubble spins meanwhile, and it is answered soon after Redis is back (tries every START_RETRY_DELAY s at
        most)."""
        delays = delays_for(self._room_ends(job) - time.monotonic(), longest=START_RETRY_DELAY)
        return through_outage(call, what, delays, give_up=cancelled.is_set)

    def _room_ends(self, job: StreamJob) -> float:
        """Until when (monotonic) a dependency away may be waited out before the answer starts: while an answer could
        still be made and shown in the bubble (ANSWER_ROOM_SECONDS before WeCom stops polling it), and the answer's
        time is not up."""
        latest = min(self.max_seconds, self.deps.finisher.window_seconds - ANSWER_ROOM_SECONDS)
        return time.monotonic() + job.created_at + latest - time.time()

    def _take_slot(self, job: StreamJob, answer: Answer, cancelled: threading.Event) -> None:
        """One of the bot's answer slots (MAX_ACTIVE_ANSWERS_PER_BOT) before the Dify call: over the cap, the
        question waits in line, its bubble saying how many are ahead.

        Raises:
            NoSlot: none came free within QUEUE_WAIT_SECONDS.
        """
        line = self.deps.texts.say("queued")
        waited = []

        def waiting(ahead: int) -> None:
            waited.append(ahead)
            answer.writer.add([], {"prompt": line.format(ahead=ahead)})

        taken = self._before_start(
            job, cancelled, lambda: self.deps.slots.take(job.stream_id, cancelled, waiting), "waiting for a slot"
        )
        if waited:
            answer.writer.add([], {"prompt": ""})
        if not taken and cancelled.is_set():
            raise StreamAborted  # stopped by its user (or taken elsewhere) while it waited in line
        if not taken:
            raise NoSlot

    def _deadline(self, job: StreamJob) -> float:
        """When the answer's time is up (monotonic): `max_seconds` after the user's message arrived."""
        return time.monotonic() + max(0.0, job.created_at + self.max_seconds - time.time())

    def _resume(self, job: StreamJob, cancelled: threading.Event, answer: Answer) -> None:
        """Follow again the Dify run of a stream whose replica is gone (a chatflow's or workflow's), from where the
        bubble's text stopped. Dify relays only what a run does from the moment one listens, so its saved state
        comes first (`snapshot`): the answer saved at a pause with the pause's form, or a finished run's outputs;
        the recorder compares them with what the bubble shows, by text (AnswerRecorder._reconcile)."""
        recorder = self._attach(job, answer, job.resume_run)
        answer.resumed = True
        logger.info("following the Dify run again, after the %d characters shown", len(answer.shown))
        metrics.DIFY_CALLS.labels(self.bot, "resume").inc()
        self._follow_again(job, recorder, cancelled, self._deadline(job))
        self._through_forms(job, answer, recorder, cancelled)
        self.completion.complete(job, answer, recorder, "")

    def _follow_again(
        self, job: StreamJob, recorder: AnswerRecorder, cancelled, deadline: float, cuts_left: int = MAX_REATTACHES
    ) -> None:
        """Follow the answer's run from Dify's snapshot of it, then live: the way back to a run after its replica
        was lost, or after the stream following it was cut. Dify relays only what a run publishes from the moment
        one listens, so live text may follow a gap: it is held until it can be placed (TextGate)."""
        answer = recorder.answer
        answer.reattached = True
        answer.gate.hold()
        events = partial(self.deps.dify.stream_run, answer.workflow_run_id, job.dify_user, snapshot=True)
        self._patiently(job, events, recorder, cancelled, deadline, _unread, "reattach", cuts_left)
        if answer.paused and answer.gate.held:
            # It paused after live text that could not be placed: the answer Dify saved at the pause says it all.
            logger.info("the run paused after text that followed a gap; reading its saved state again")
            answer.goes_on_after_form()
            answer.gate.drop_held()
            self._follow(job, events, recorder, cancelled, deadline, cuts_left)
        answer.gate.release()

    def _follow(
        self,
        job: StreamJob,
        open_events: Callable[[TextRelay], Iterator[list[DifyEvent]]],
        recorder: AnswerRecorder,
        cancelled: threading.Event,
        deadline: float,
        cuts_left: int = MAX_REATTACHES,
    ) -> None:
        """One Dify call (`open_events(relay)`), recorded to the answer's end. A chatflow's or workflow's run goes
        on in Dify whatever becomes of the stream that follows it, so a stream cut short (a proxy, the network;
        Dify 1.16.0 cuts a plain listener when another subscriber of the run closes) is never taken for a failed
        run: the run is followed again from its snapshot, `cuts_left` times at most.

        Raises:
            BackendStreamCut: a chat's stream was cut, or a run's more than `cuts_left` times.
        """
        try:
            self._consume(open_events, recorder, cancelled, deadline)
        except BackendStreamCut as cut:
            answer = recorder.answer
            if cuts_left <= 0 or not answer.workflow_run_id or answer.app_type not in RUN_APPS:
                raise
            logger.warning("the stream following the run was cut (%s); following it again", cut.message[:120])
            metrics.DIFY_CALLS.labels(self.bot, "reattach").inc()
            self._follow_again(job, recorder, cancelled, deadline, cuts_left - 1)

    def _continue_form(self, job: StreamJob, cancelled: threading.Event, answer: Answer) -> None:
        """The rest of a run after a form's answer, as a message of its own (the bubble no longer waited for it):
        submit the form (once: a resumed attempt finds it submitted), then follow the run from there."""
        deps = self.deps
        record = through_outage(lambda: deps.forms.store.load(job.form_task), "reading the form")
        if record is None:
            deps.finisher.finish(job, answer, DONE, note=deps.texts.say("form_expired"))
            return
        recorder = self._attach(job, answer, record.form.run_id)
        answer.resumed, answer.earlier = bool(answer.shown), record.before
        if self.form_steps.go_on(job, answer, recorder, cancelled, record.task_id, record.form.token) == SUBMITTED:
            self._through_forms(job, answer, recorder, cancelled)
        self.completion.complete(job, answer, recorder, "")

    def _attach(self, job: StreamJob, answer: Answer, run_id: str) -> AnswerRecorder:
        """Make `answer` follow a Dify run already under way (`run_id`), for this attempt at its stream: it starts
        from the text the stream's chunks hold (what the bubble shows), and its writer goes on after them."""
        deps = self.deps
        options = replace(self.options, app_type=deps.profile.app_type())
        chunks = through_outage(lambda: deps.store.chunks(job.stream_id), "reading the answer so far")
        answer.shown = answer.text = "".join(chunks)
        answer.writer.start_after(len(chunks), len(answer.text))
        answer.answered, answer.reattached = bool(answer.shown), True
        answer.app_type, answer.workflow_run_id = options.app_type, run_id
        answer.forms_answered = list(job.forms_answered)
        return AnswerRecorder(job, answer, deps.store, deps.conversations, self.bot, options)

    def _new_answer(self, job: StreamJob, lease: LeaseClock | None) -> Answer:
        """This attempt's answer, with its writes to the stream (they renew the attempt's `lease` when it is due)
        and its status line; an attempt that follows a run already under way starts writing after the stream's
        chunks (`_attach`)."""
        deps = self.deps
        writer = deps.appender.writer(
            deps.store,
            job.stream_id,
            job.attempt,
            pace=deps.append_pace,
            deadlines=deps.append_deadlines,
            lease=lease,
        )
        mask = ContentMask(deps.rules.current()) if deps.rules is not None else ContentMask()
        return Answer(writer=writer, progress=StepProgress(writer, deps.texts.say("progress_step")), mask=mask)

    def _through_forms(self, job: StreamJob, answer: Answer, recorder: AnswerRecorder, cancelled) -> None:
        if self.form_steps is not None:
            self.form_steps.through(job, answer, recorder, cancelled)

    def _follow_run(
        self, job: StreamJob, answer: Answer, recorder: AnswerRecorder, cancelled, on_open: Callable[[], bool]
    ) -> None:
        """Follow the answer's Dify run on from its pause, recording its events: `on_open()` runs once Dify
        relays them (it submits the form), and when it returns False nothing is read."""
        metrics.DIFY_CALLS.labels(self.bot, "form").inc()
        events = partial(
            self.deps.dify.stream_run, answer.workflow_run_id, job.dify_user, continue_on_pause=True, on_open=on_open
        )
        self._patiently(job, events, recorder, cancelled, time.monotonic() + self.max_seconds, _unread, "form")

    def _count_call(self, job: StreamJob) -> None:
        """Count the message's Dify call by kind (dify_calls_total); a second new call for one message is
        counted as a duplicate, which the monitoring bundle alerts on. A queued stream's take counted its first."""
        store = self.deps.store
        counted, job.counted_call = job.counted_call, ""
        kind = counted or best_effort_value(lambda: store.count_dify_call(job.stream_id), "counting the call", ())
        kind = kind or "new"
        if kind == "duplicate":
            logger.error("a second Dify call for this message (not a documented restart)")
        metrics.DIFY_CALLS.labels(self.bot, kind).inc()

    def _consume(
        self,
        open_events: Callable[[TextRelay], Iterator[list[DifyEvent]]],
        recorder: AnswerRecorder,
        cancelled: threading.Event,
        deadline: float,
    ) -> None:
        """One Dify call (`open_events(relay)`), its events recorded as they come; returns at the answer's end."""
        relay = TextRelay(recorder.answer, cancelled, deadline)
        for batch in open_events(relay):
            if cancelled.is_set():
                for event in batch:  # the task's id, for Dify's stop call when the user stopped the answer
                    recorder.answer.note_ids(event)
                raise StreamAborted
            recorder.apply(batch)
            if recorder.answer.ended:
                return
            if time.monotonic() > deadline:
                raise BackendTimeout(f"answer ran past {self.max_seconds:.0f}s", code="total_timeout")

    def _fail(self, job: StreamJob, answer: Answer, exc: BackendError) -> None:
        if isinstance(exc, BackendStreamCut) and answer.workflow_error:
            exc = BackendStreamError(answer.workflow_error, code="workflow_failed")
        metrics.DIFY_ERRORS.labels(self.bot, exc.code).inc()
        self.deps.health.failed(exc.code)
        logger.warning("Dify failed: %s (%s)", exc.code, exc.message[:200])
        if isinstance(exc, BackendTimeout) and answer.task_id:
            self.deps.dify.stop(answer.task_id, job.dify_user, answer.app_type)
            metrics.DIFY_STOPS.labels(self.bot, "timeout").inc()
        note = self.deps.texts.failure_note(exc)
        self.deps.finisher.finish(job, answer, ERROR, note=note, error=f"{exc.code}: {exc.message[:200]}")


def _tried_again(
    call: Callable[[], T],
    may_try_again: Callable[[Exception], bool],
    until: float,
    cancelled: threading.Event,
    what: str,
    on_again: Callable[[], object] = lambda: None,
) -> T:
    """`call()`, made again while it fails in a way `may_try_again` says may be waited out (a dependency away), the
    waits between tries PATIENCE_PAUSES then its last, until `until` (monotonic); `on_again` before each new try.

    Raises:
        Exception: the call's last failure, once `may_try_again` says no or the time is up.
        StreamAborted: `cancelled` was set while it waited (the answer was stopped, or its process drains).
    """
    pauses = itertools.chain(PATIENCE_PAUSES, itertools.repeat(PATIENCE_PAUSES[-1]))
    while True:
        try:
            return call()
        except Exception as exc:
            pause = next(pauses)
            if not may_try_again(exc) or time.monotonic() + pause > until:
                raise
            logger.warning("%s (%s); trying again in %.0fs", what, getattr(exc, "code", type(exc).__name__), pause)
            on_again()
        if cancelled.wait(pause):
            raise StreamAborted


def _unread(exc: Exception) -> bool:
    """Whether a call that follows a run (a GET: it makes nothing, and a form is submitted only once its events
    flow) failed before any of its events came: Dify unreachable, or refusing it for now (429, 502, 503, 504)."""
    if isinstance(exc, BackendConnectionError):
        return True
    return isinstance(exc, BackendHTTPError) and exc.status in (429, 502, 503, 504)
