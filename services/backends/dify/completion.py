"""The end of an answer, once Dify's run ended: reasoning closed, the sources cited, the files Dify made delivered
(and the links it left relative rewritten), the follow-up questions as a card, the note a paused or empty answer
gets; then the final state, through the finisher."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import orjson

from services.backends.dify.recorder import AnswerRecorder
from services.dify.app_profile import DifyAppProfile
from services.dify.client import COMPLETION, WORKFLOW, DifyClient
from services.files.delivery import FileDelivery
from services.streams.answer import Answer
from services.streams.finisher import Finisher
from services.streams.health import BackendHealth
from services.streams.job import StreamJob
from services.streams.record import DONE
from services.texts import Texts
from services.transport.errors import BackendError, BackendStreamError
from services.wecom.cards import question_card

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class AnswerCompletion:
    texts: Texts
    finisher: Finisher
    health: BackendHealth
    dify: DifyClient
    profile: DifyAppProfile
    files: FileDelivery | None
    show_citations: bool

    def complete(self, job: StreamJob, answer: Answer, recorder: AnswerRecorder, note: str) -> None:
        """Dify's answer ended: a failed run is an error (raised for `run` to finish it); else the final state.

        Raises:
            BackendStreamError: the chatflow's or workflow's run failed or was stopped.
        """
        run = recorder.run
        if run.error:
            raise BackendStreamError(run.error, code="workflow_failed")
        recorder.save_conversation()
        recorder.close_reasoning()  # reasoning with no answer after it
        if answer.citations and self.show_citations and answer.answered:
            sources = "\n".join(f"{n}. {name}" for n, name in enumerate(answer.citations, 1))
            recorder.write([f"\n\n{self.texts.say('citations_title')}\n{sources}"])
        uploads = self._deliver_files(answer, recorder)
        if answer.paused:
            note = run.form_note or self.texts.say("input_required")
        elif run.stopped:
            note = "\n".join(filter(None, (note, self.texts.say("run_stopped"))))
        elif not answer.answered:
            if run.last_thought:
                # Some agent setups put the whole answer in agent_thought and never stream agent_message.
                recorder.write([run.last_thought])
            elif not answer.images:
                note = self.texts.say("empty_answer")
        if run.form_timed_out:
            note = "\n".join(filter(None, (self.texts.say("form_timed_out"), note)))
        fields = {
            "note": note,
            "tokens": answer.usage.get("total_tokens", ""),
            "prompt_tokens": answer.usage.get("prompt_tokens", ""),
            "completion_tokens": answer.usage.get("completion_tokens", ""),
            "dify_latency": answer.usage.get("latency", ""),
            "card": self._suggestions(job, answer, recorder.options.app_type),
            "files": orjson.dumps(uploads).decode() if uploads else "",
        }
        logger.info("answer complete (%s tokens)", fields["tokens"] or "?")
        self.health.answered()
        self.finisher.finish(job, answer, DONE, **{k: v for k, v in fields.items() if v != ""})

    def _deliver_files(self, answer: Answer, recorder: AnswerRecorder) -> list[dict]:
        """The files Dify made, and the Dify-relative links in the answer's text: images inline on the final reply,
        links (or names, or why not) in the answer; in long-connection mode, the uploads the connection's holder
        makes after the answer."""
        if self.files is None:
            return []
        text, delivered = self.files.rewrite_links(answer.text)
        if text != answer.text:
            recorder.replace_text(text)
        if not answer.files and not delivered.images and not delivered.uploads:
            return []
        delivered = self.files.deliver(answer.files, delivered)
        answer.images = delivered.images
        if delivered.lines:
            recorder.write([("\n\n" if answer.text else "") + "\n".join(delivered.lines)])
            answer.answered = True
        return delivered.uploads

    def _suggestions(self, job: StreamJob, answer: Answer, app_type: str) -> str:
        """The follow-up questions Dify suggests after a chat answer, as a card for the final reply (JSON; "" for
        none): only where the app enables them, the answer has a bubble, and no form's card rode on it."""
        if answer.paused or not answer.message_id or job.separate or job.card_placed:
            return ""
        if app_type in (WORKFLOW, COMPLETION) or not self.profile.suggests_after_answer():
            return ""
        try:
            questions = self.dify.suggested(answer.message_id, job.dify_user)
        except BackendError as exc:
            logger.info("no suggested questions: %s", exc.code)
            return ""
        if not questions:
            return ""
        return orjson.dumps(question_card(self.texts.say("suggestions_title"), "", questions)).decode()
