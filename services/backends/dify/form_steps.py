"""What a stream's worker does when its Dify run pauses for a person (docs/architecture.md, "Forms"): each form
opened (its card riding on the bubble, once per message), its answer awaited while WeCom still polls the bubble,
submitted once, and the run followed on to its end or its next form. Where the bubble can no longer wait, the
answer's final note says what to do, and the rest comes as a message of its own (services/forms)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from functools import partial

import orjson

from services.backends.dify.recorder import AnswerRecorder
from services.forms.service import (
    BUBBLE_OVER,
    CANCELLED,
    DRAINING,
    EXPIRED,
    REFUSED,
    WINDOW_MARGIN,
    Asker,
    FormNotHere,
    FormService,
    Ticket,
)
from services.forms.store import SUBMITTED
from services.outage import best_effort, best_effort_value, through_outage
from services.streams.answer import FLUSH_TIMEOUT, Answer, HandedOver, StreamAborted
from services.streams.finisher import Finisher
from services.streams.job import StreamJob
from services.streams.store import StreamStore
from services.streams.turn import Turn
from services.texts import Texts
from services.transport.errors import BackendError

logger = logging.getLogger(__name__)

# Follows the answer's run on from a form: (the turn, its recorder, on_open: runs once Dify relays the run's events,
# and says whether to read them).
FollowRun = Callable[[Turn, AnswerRecorder, Callable[[], bool]], None]


class FormSteps:
    def __init__(self, forms: FormService, store: StreamStore, finisher: Finisher, texts: Texts, follow: FollowRun):
        self.forms = forms
        self.store = store
        self.finisher = finisher
        self.texts = texts
        self.follow = follow

    def through(self, turn: Turn, recorder: AnswerRecorder) -> None:
        """Take the answer through every form its run pauses at; returns when the run ended, or waits for a form
        the bubble can no longer wait for (`DifyRun.form_note` says why)."""
        job, answer, run = turn.job, turn.answer, recorder.run
        while answer.paused and run.form_event is not None:
            event, run.form_event = run.form_event, None
            asker = Asker(job.stream_id, job.userid, job.chatid, job.aibotid, job.dify_user, job.route)
            card_allowed = not job.separate and not job.card_placed  # one card per message
            before = run.earlier + recorder.answer_so_far()
            opening = partial(self.forms.open, asker, event, answer.workflow_run_id, card_allowed, before)
            try:
                ticket = through_outage(opening, "opening the form")
            except FormNotHere as elsewhere:
                run.form_note = self.texts.say(elsewhere.note_key)
                return
            if ticket is None:
                run.form_note = self.texts.say("form_expired")
                return
            if not self._answered(turn, recorder, ticket):
                return

    def _answered(self, turn: Turn, recorder: AnswerRecorder, ticket: Ticket) -> bool:
        """Show the form, wait for its answer while the bubble lasts, and go on with the run from it: True when the
        run went on (to its end or its next pause), False when the answer ends here (`DifyRun.form_note` says why).
        A submission Dify refused as invalid opens the form again: the bubble says why and asks anew."""
        job, cancelled = turn.job, turn.cancelled
        while True:
            fields = {"prompt": ticket.prompt}
            if ticket.card is not None:
                fields["card"] = orjson.dumps(ticket.card).decode()
                job.card_placed = True
            shown = partial(recorder.write_fields, fields, durable=True)  # (again, should a failover take it back)
            shown()
            waited = time.time()
            until = 0.0 if job.separate else job.created_at + self.finisher.window_seconds - WINDOW_MARGIN
            outcome = self.forms.wait(ticket, until, cancelled, self.finisher.draining, shown)
            logger.info("form %s: %s after %.1fs", ticket.task_id, outcome, time.time() - waited)
            token = ticket.record.form.token
            if outcome == CANCELLED:
                raise StreamAborted
            if outcome == DRAINING:
                self._hand_over(job, turn.answer)
            if outcome not in (BUBBLE_OVER, EXPIRED):
                result = self.go_on(turn, recorder, ticket.task_id, token)
                if result == REFUSED and not job.separate and (again := self._asked_again(ticket)) is not None:
                    ticket = again  # the run still waits at this form, which is open again
                    continue
                return result == SUBMITTED
            if outcome == EXPIRED and self._after_timeout(turn, recorder, token):
                return True
            if outcome == BUBBLE_OVER:
                waiting = "" if job.separate else self.texts.say("form_waiting")
                recorder.run.form_note = "\n\n".join(filter(None, (ticket.prompt, waiting)))
            elif outcome == EXPIRED:
                recorder.run.form_note = self.texts.say("form_expired")
            return False

    def _asked_again(self, ticket: Ticket) -> Ticket | None:
        """The form Dify refused, open again: its new prompt (Dify's words, what to give anew); its card was shown
        already (once per message), and the click that was refused was answered with it still usable."""
        record = best_effort_value(lambda: self.forms.store.load(ticket.task_id), "reading the refused form")
        if record is None:
            return None
        return Ticket(record, self.forms.prompt(record), None)

    def submit(self, recorder: AnswerRecorder, task_id: str) -> str:
        """Submit the answered form; what became of it (SUBMITTED, REFUSED: open again; else the final note says
        why Dify did not take it)."""
        result = through_outage(lambda: self.forms.submit(task_id), "submitting the form")
        if result in (SUBMITTED, REFUSED):
            if result == REFUSED:
                recorder.answer.form_asked()
                recorder.run.form_note = self.forms.prompt_of(task_id)
            return result
        recorder.answer.form_asked()
        recorder.run.form_note = self.texts.say("form_expired" if result == EXPIRED else "form_submit_failed")
        return result

    def go_on(self, turn: Turn, recorder: AnswerRecorder, task_id: str, token: str) -> str:
        """Submit the answered form and follow the run on from it, in the same bubble (or message). Dify relays
        only what a run publishes once one listens, and a resumed run may end 0.1 s after the submission: so the
        run's events are subscribed first, and the form is submitted once Dify answered. Returns what became of
        the submission (SUBMITTED; else the final note says why, "" when Dify was not reached)."""
        taken = []

        def submit() -> bool:
            taken.append(self.submit(recorder, task_id))
            if taken[-1] == SUBMITTED:
                self._following(recorder, token)
            return taken[-1] == SUBMITTED

        self.follow(turn, recorder, submit)
        return taken[-1] if taken else ""

    def _following(self, recorder: AnswerRecorder, token: str) -> None:
        """The run goes on from the form `token`: the bubble no longer shows its prompt."""
        recorder.answer.goes_on_after_form()
        recorder.run.reattached = True
        recorder.write_fields({"prompt": ""})

    def _hand_over(self, job: StreamJob, answer: Answer) -> None:
        """A stopping process waits for no form: it releases the stream's lease at once, and the next poll on
        another replica resumes the run up to its pause and waits there instead. What the writer still holds (the
        run's id above all: a stream without it is restarted, a second Dify call, where it should be resumed) is
        written first; if Redis does not take it, the lease is left to lapse, which gives the writes that time.

        Raises:
            HandedOver: always.
        """
        flushed = answer.writer is None or best_effort(
            lambda: answer.writer.flush(FLUSH_TIMEOUT), "writing what the answer holds", delays=()
        )
        if flushed:
            release = partial(self.store.leases.release, {job.stream_id: job.attempt})
            best_effort(release, "handing the form's wait over")
        raise HandedOver

    def _after_timeout(self, turn: Turn, recorder: AnswerRecorder, token: str) -> bool:
        """A form expired while its bubble waited: Dify goes on with the node's timeout path, which the bubble
        follows (human_input_form_timeout, then the rest). False when Dify sends nothing of it."""
        recorder.run.form_timed_out = True  # said in the final note, even if the run ended before the re-attach
        try:
            self.follow(turn, recorder, lambda: self._following(recorder, token) or True)
        except BackendError as exc:
            logger.info("no timeout path followed the expired form: %s", exc.code)
            recorder.answer.form_asked()
            recorder.run.form_timed_out = False
            return False
        return True
