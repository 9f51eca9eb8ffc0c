"""The background side of one answer: authorize, call Dify, record its events, and always leave a final state.

Runs in a thread started by the runner. The steps have their own modules: the events become the answer in
`recorder.py`, the ending is `finisher.py`'s, Redis outages are met as `outage.py` says. Every outcome ends in a
final state: `done` with the answer, or `error` with the partial text kept and a short note for the user. If
another replica took the stream over, the worker stops writing at once, so there are never two answers.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from functools import partial

import orjson

from services import metrics
from services.auth.authorizer import AuthError
from services.dify.app_profile import DifyAppProfile
from services.dify.client import COMPLETION, WORKFLOW, ChatRequest, DifyClient
from services.dify.errors import DifyError, DifyHTTPError, DifyStreamCut, DifyStreamError, DifyTimeout
from services.dify.events import DifyEvent, FormsSeen
from services.dify.health import DifyHealth
from services.files.delivery import FileDelivery
from services.forms.service import BUBBLE_OVER, CANCELLED, DRAINING, EXPIRED, WINDOW_MARGIN, Asker, FormService
from services.forms.store import SUBMITTED
from services.media.service import Declined, MediaService
from services.redis_conn import REDIS_FAILURES
from services.streams.conversations import ConversationStore
from services.streams.finisher import Finisher
from services.streams.job import StreamJob
from services.streams.outage import best_effort, best_effort_value, through_outage
from services.streams.recorder import (
    DEFAULT_OPTIONS,
    THINK_CLOSE,
    Answer,
    AnswerOptions,
    AnswerRecorder,
    HandedOver,
    StreamAborted,
    TextRelay,
)
from services.streams.store import DONE, ERROR, StreamStore
from services.streams.writer import AppendBatcher
from services.texts import Texts
from services.wecom.cards import question_card
from utils.logging import log_context

logger = logging.getLogger(__name__)


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
    ):
        self.deps = deps
        self.options = options
        self.owner = owner
        self.bot = bot
        self.max_seconds = max_seconds
        self.prepare = prepare or (lambda job: {})

    def run(self, job: StreamJob, cancelled: threading.Event) -> None:
        """Thread entry point: never raises, always leaves a final state unless another replica owns the stream."""
        with log_context(
            replica=self.owner,
            bot=self.bot,
            stream=job.stream_id,
            msgid=job.msgid,
            user=job.userid,
            chat=job.chatid or None,
        ):
            answer = Answer()
            texts = self.deps.texts
            try:
                self._answer(job, cancelled, answer)
            except HandedOver:
                metrics.STREAM_OUTCOMES.labels(self.bot, "handed_over").inc()
                logger.info("this process stops: the form's wait was handed over to another replica")
            except StreamAborted:
                metrics.STREAM_OUTCOMES.labels(self.bot, "taken_over_elsewhere").inc()
                logger.info("stream is owned or closed elsewhere now; worker stops")
            except AuthError as refusal:
                logger.info("not asking Dify: %s", refusal.code)
                self.deps.finisher.finish(job, answer, ERROR, note=texts.failure_note(refusal), error=refusal.code)
            except Declined as declined:
                logger.info("declined: %s", declined.note_key)
                status, error = (ERROR, declined.note_key) if declined.failed else (DONE, "")
                self.deps.finisher.finish(job, answer, status, note=texts.say(declined.note_key), error=error)
            except DifyError as exc:
                self._fail(job, answer, exc)
            except REDIS_FAILURES as exc:
                logger.warning("Redis stayed unavailable before the answer could start: %s", exc)
                self.deps.finisher.finish(
                    job, answer, ERROR, note=texts.say("store_unavailable"), error="redis_unavailable"
                )
            except Exception:
                logger.exception("stream worker failed")
                self.deps.finisher.finish(job, answer, ERROR, note=texts.say("internal_error"), error="internal_error")

    def _answer(self, job: StreamJob, cancelled: threading.Event, answer: Answer) -> None:
        if job.separate:
            self._continue_form(job, cancelled, answer)
            return
        if job.resume_run:
            self._resume(job, cancelled, answer)
            return
        deps = self.deps
        inputs = through_outage(lambda: self.prepare(job), "authorizing the user")
        files, note_key = deps.media.files_for_question(job.attachments, job.typed_query, job.dify_user)
        options = replace(self.options, app_type=deps.profile.app_type())
        conversation_id = ""
        if options.app_type != WORKFLOW:  # workflows keep no conversations
            conversation_id = through_outage(
                lambda: deps.conversations.current(job.aibotid, job.chatid, job.userid), "looking up the conversation"
            )
        deadline = time.monotonic() + self.max_seconds
        self._count_call(job)
        answer.writer = deps.appender.writer(deps.store, job.stream_id, job.attempt)
        answer.app_type = options.app_type
        recorder = AnswerRecorder(job, answer, deps.store, deps.conversations, self.bot, options)
        while True:
            request = ChatRequest(
                query=job.query,
                user=job.dify_user,
                inputs=inputs,
                conversation_id=conversation_id,
                files=files,
                app_type=options.app_type,
                workflow_input=options.workflow_input,
            )
            logger.info("calling Dify%s", " (continuing the conversation)" if conversation_id else "")
            try:
                self._consume(partial(deps.dify.stream_chat, request), recorder, cancelled, deadline)
                break
            except DifyHTTPError as exc:
                if not conversation_id or not (exc.status == 404 or exc.code == "conversation_completed"):
                    raise
                logger.info("Dify no longer has the conversation (%s); starting a new one", exc.code)
                through_outage(
                    lambda: deps.conversations.forget(job.aibotid, job.chatid, job.userid),
                    "forgetting the conversation",
                )
                conversation_id = ""
        self._through_forms(job, answer, recorder, cancelled)
        self._complete(job, answer, recorder, deps.texts.say(note_key) if note_key else "")

    def _resume(self, job: StreamJob, cancelled: threading.Event, answer: Answer) -> None:
        """Stream again the Dify run of a stream whose replica is gone (a chatflow's or workflow's) and go on from
        where its text stopped: the run's events come again from its start, and what the bubble already has is
        skipped (a run that had ended gives its outputs, which hold the whole answer)."""
        deps = self.deps
        options = replace(self.options, app_type=deps.profile.app_type())
        shown = through_outage(lambda: deps.store.chunks(job.stream_id), "reading the answer so far")
        answer.writer = deps.appender.writer(deps.store, job.stream_id, job.attempt, written=len(shown))
        answer.resumed, answer.shown = True, "".join(shown)
        answer.skip = len(answer.shown)
        answer.app_type, answer.workflow_run_id = options.app_type, job.resume_run
        answer.forms_answered = list(job.forms_answered)
        recorder = AnswerRecorder(job, answer, deps.store, deps.conversations, self.bot, options)
        logger.info("streaming the Dify run again, after the %d characters shown", answer.skip)
        metrics.DIFY_CALLS.labels(self.bot, "resume").inc()
        deadline = job.created_at + self.max_seconds
        seen = FormsSeen(frozenset(job.forms_answered))
        events = partial(deps.dify.stream_run, job.resume_run, job.dify_user, forms=seen)
        self._consume(events, recorder, cancelled, deadline)
        self._through_forms(job, answer, recorder, cancelled)
        self._complete(job, answer, recorder, "")

    def _continue_form(self, job: StreamJob, cancelled: threading.Event, answer: Answer) -> None:
        """The rest of a run after a form's answer, as a message of its own (the bubble no longer waited for it):
        submit the form (once: a resumed attempt finds it submitted), then follow the run from there."""
        deps = self.deps
        record = through_outage(lambda: deps.forms.store.load(job.form_task), "reading the form")
        if record is None:
            deps.finisher.finish(job, answer, DONE, note=deps.texts.say("form_expired"))
            return
        options = replace(self.options, app_type=deps.profile.app_type())
        shown = through_outage(lambda: deps.store.chunks(job.stream_id), "reading the answer so far")
        answer.writer = deps.appender.writer(deps.store, job.stream_id, job.attempt, written=len(shown))
        answer.shown, answer.skip = "".join(shown), len("".join(shown))
        answer.resumed = bool(shown)
        answer.app_type, answer.workflow_run_id = options.app_type, record.form.run_id
        answer.forms_answered = list(job.forms_answered)
        recorder = AnswerRecorder(job, answer, deps.store, deps.conversations, self.bot, options)
        if self._submit(job, answer, record.task_id):
            self._after_form(job, answer, recorder, cancelled, record.form.token)
            self._through_forms(job, answer, recorder, cancelled)
        self._complete(job, answer, recorder, "")

    def _through_forms(self, job: StreamJob, answer: Answer, recorder: AnswerRecorder, cancelled) -> None:
        """A run that paused for a person: each form shown (its card riding on the bubble, once per message), its
        answer awaited while WeCom still polls the bubble, submitted once, and the run followed on to its end or
        its next form. Where the bubble can no longer wait, the answer's final note says what to do, and the rest
        comes as a message of its own (services/forms)."""
        forms = self.deps.forms
        while answer.paused and answer.form_event is not None and forms is not None:
            event, answer.form_event = answer.form_event, None
            asker = Asker(job.stream_id, job.userid, job.chatid, job.aibotid, job.dify_user)
            card_allowed = not job.separate and not job.card_placed  # one card per message
            opening = partial(forms.open, asker, event, answer.workflow_run_id, card_allowed)
            ticket = through_outage(opening, "opening the form")
            if ticket is None:
                key = "form_expired" if event.get("form_token") else "form_by_email"
                answer.form_note = self.deps.texts.say(key)
                return
            fields = {"prompt": ticket.prompt}
            if ticket.card is not None:
                fields["card"] = orjson.dumps(ticket.card).decode()
                job.card_placed = True
            recorder.write_fields(fields)
            waited = time.time()
            until = 0.0 if job.separate else job.created_at + self.deps.finisher.window_seconds - WINDOW_MARGIN
            outcome = forms.wait(ticket, until, cancelled, self.deps.finisher.draining)
            logger.info("form %s: %s after %.1fs", ticket.task_id, outcome, time.time() - waited)
            if outcome == CANCELLED:
                raise StreamAborted
            if outcome == DRAINING:
                self._hand_over(job)
            if outcome != BUBBLE_OVER and outcome != EXPIRED and self._submit(job, answer, ticket.task_id):
                self._after_form(job, answer, recorder, cancelled, ticket.record.form.token)
                continue
            if outcome == EXPIRED and self._after_timeout(job, answer, recorder, cancelled, ticket.record.form.token):
                continue
            if outcome == BUBBLE_OVER:
                waiting = "" if job.separate else self.deps.texts.say("form_waiting")
                answer.form_note = "\n\n".join(filter(None, (ticket.prompt, waiting)))
            elif outcome == EXPIRED:
                answer.form_note = self.deps.texts.say("form_expired")
            return

    def _hand_over(self, job: StreamJob) -> None:
        """A stopping process waits for no form: it releases the stream's lease at once, and the next poll on
        another replica resumes the run up to its pause and waits there instead.

        Raises:
            HandedOver: always.
        """
        store = self.deps.store
        best_effort(lambda: store.release_leases({job.stream_id: job.attempt}), "handing the form's wait over")
        raise HandedOver

    def _after_timeout(self, job: StreamJob, answer: Answer, recorder: AnswerRecorder, cancelled, token: str) -> bool:
        """A form expired while its bubble waited: Dify goes on with the node's timeout path, which the bubble
        follows (human_input_form_timeout, then the rest). False when Dify sends nothing of it."""
        answer.form_timed_out = True  # said in the final note, even if the run ended before the re-attach
        try:
            self._after_form(job, answer, recorder, cancelled, token)
        except DifyError as exc:
            logger.info("no timeout path followed the expired form: %s", exc.code)
            answer.paused, answer.form_timed_out = True, False
            return False
        return True

    def _submit(self, job: StreamJob, answer: Answer, task_id: str) -> bool:
        """Submit the answered form; False (with the final note saying why) if Dify did not take it."""
        result = through_outage(lambda: self.deps.forms.submit(task_id), "submitting the form")
        if result == SUBMITTED:
            return True
        answer.paused = True
        answer.form_note = self.deps.texts.say("form_expired" if result == EXPIRED else "form_submit_failed")
        return False

    def _after_form(self, job: StreamJob, answer: Answer, recorder: AnswerRecorder, cancelled, token: str) -> None:
        """Follow the run on from the form just answered, in the same bubble (or message)."""
        answer.forms_answered.append(token)
        answer.paused, answer.ended, answer.after_form = False, False, True
        recorder.write_fields({"prompt": "", "forms_answered": " ".join(answer.forms_answered)})
        seen = FormsSeen(frozenset(answer.forms_answered[:-1]), after=token)
        metrics.DIFY_CALLS.labels(self.bot, "form").inc()
        events = partial(self.deps.dify.stream_run, answer.workflow_run_id, job.dify_user, forms=seen)
        self._consume(events, recorder, cancelled, time.monotonic() + self.max_seconds)

    def _count_call(self, job: StreamJob) -> None:
        """Count the message's Dify call by kind (dify_calls_total); a second new call for one message is
        counted as a duplicate, which the monitoring bundle alerts on."""
        store = self.deps.store
        kind = best_effort_value(lambda: store.count_dify_call(job.stream_id), "counting the Dify call", ()) or "new"
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
                raise StreamAborted
            recorder.apply(batch)
            if recorder.answer.ended:
                return
            if time.monotonic() > deadline:
                raise DifyTimeout(f"answer ran past {self.max_seconds:.0f}s", code="total_timeout")

    def _complete(self, job: StreamJob, answer: Answer, recorder: AnswerRecorder, note: str) -> None:
        """Dify's answer ended: a failed run is an error (raised for `run` to finish it); else the final state.

        Raises:
            DifyStreamError: the chatflow's or workflow's run failed or was stopped.
        """
        if answer.workflow_error:
            raise DifyStreamError(answer.workflow_error, code="workflow_failed")
        recorder.save_conversation()
        if answer.thinking:  # reasoning with no answer after it
            recorder.write([THINK_CLOSE.rstrip()])
            answer.thinking = False
        uploads = self._deliver_files(answer, recorder)
        if answer.paused:
            note = answer.form_note or self.deps.texts.say("input_required")
        elif not answer.answered:
            if answer.last_thought:
                # Some agent setups put the whole answer in agent_thought and never stream agent_message.
                recorder.write([answer.last_thought])
            elif not answer.images:
                note = self.deps.texts.say("empty_answer")
        if answer.form_timed_out:
            note = "\n".join(filter(None, (self.deps.texts.say("form_timed_out"), note)))
        fields = {
            "note": note,
            "tokens": answer.usage.get("total_tokens", ""),
            "dify_latency": answer.usage.get("latency", ""),
            "card": self._suggestions(job, answer),
            "files": orjson.dumps(uploads).decode() if uploads else "",
        }
        logger.info("answer complete (%s tokens)", fields["tokens"] or "?")
        self.deps.health.answered()
        self.deps.finisher.finish(job, answer, DONE, **{k: v for k, v in fields.items() if v != ""})

    def _deliver_files(self, answer: Answer, recorder: AnswerRecorder) -> list[dict]:
        """The files Dify made: images inline on the final reply, links (or names, or why not) as lines of the
        answer; in long-connection mode, the uploads the connection's holder makes after the answer."""
        if not answer.files or self.deps.files is None:
            return []
        delivered = self.deps.files.deliver(answer.files)
        answer.images = delivered.images
        if delivered.lines:
            recorder.write([("\n\n" if answer.text else "") + "\n".join(delivered.lines)])
            answer.answered = True
        return delivered.uploads

    def _suggestions(self, job: StreamJob, answer: Answer) -> str:
        """The follow-up questions Dify suggests after a chat answer, as a card for the final reply (JSON; "" for
        none): only where the app enables them, the answer has a bubble, and no form's card rode on it."""
        if answer.paused or not answer.message_id or job.separate or job.card_placed:
            return ""
        if answer.app_type in (WORKFLOW, COMPLETION) or not self.deps.profile.suggests_after_answer():
            return ""
        try:
            questions = self.deps.dify.suggested(answer.message_id, job.dify_user)
        except DifyError as exc:
            logger.info("no suggested questions: %s", exc.code)
            return ""
        if not questions:
            return ""
        return orjson.dumps(question_card(self.deps.texts.say("suggestions_title"), "", questions)).decode()

    def _fail(self, job: StreamJob, answer: Answer, exc: DifyError) -> None:
        if isinstance(exc, DifyStreamCut) and answer.workflow_error:
            exc = DifyStreamError(answer.workflow_error, code="workflow_failed")
        metrics.DIFY_ERRORS.labels(self.bot, exc.code).inc()
        self.deps.health.failed(exc.code)
        logger.warning("Dify failed: %s (%s)", exc.code, exc.message[:200])
        if isinstance(exc, DifyTimeout) and answer.task_id:
            self.deps.dify.stop(answer.task_id, job.dify_user, answer.app_type)
        note = self.deps.texts.failure_note(exc)
        self.deps.finisher.finish(job, answer, ERROR, note=note, error=f"{exc.code}: {exc.message[:200]}")
