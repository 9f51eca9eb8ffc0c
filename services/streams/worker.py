"""The background side of one answer: the bot's backend makes it (services/streams/backend.py), and this module
always leaves a final state.

Runs in a thread started by the runner. Every outcome ends in a final state: `done` with the answer, or `error`
with the partial text kept and a short note for the user (the finisher's, services/streams/finisher.py). If another
replica took the stream over, the worker stops writing at once, so there are never two answers.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass

from services import metrics
from services.auth.authorizer import AuthError
from services.redis_conn import REDIS_FAILURES
from services.rules.file import RulesFile
from services.rules.mask import ContentMask
from services.streams.answer import Answer, HandedOver, StreamAborted
from services.streams.backend import Backend
from services.streams.health import BackendHealth
from services.streams.job import StreamJob
from services.streams.progress import StepProgress
from services.streams.record import DONE, ERROR
from services.streams.runner import LeaseClock
from services.streams.stop import AnswerStopper
from services.streams.turn import NoSlot, Turn, TurnDeps, TurnRules
from services.streams.writer import AppendBatcher
from services.transport.errors import BackendError, BackendTimeout, Declined, record_code
from utils.logging import log_context

logger = logging.getLogger(__name__)


@dataclass
class WorkerDeps:
    """What one answer is made with, besides its backend."""

    turn: TurnDeps  # the stream store, the finisher and texts, the cap, the users' authorization
    appender: AppendBatcher
    health: BackendHealth
    stopper: AnswerStopper  # a user's /stop: the backend's stop call when it came before the task id
    append_pace: float = 0.0  # at most one append per that many seconds (a long connection's frame interval)
    # Appends carry a deadline (writer.py) where an answer's end may go out without Redis, from the text Redis
    # confirmed holding (callback mode's response_url); a long connection's end waits for Redis instead, and an
    # append Redis runs late is only text the stream then has, which every frame and rest is counted from.
    append_deadlines: bool = True
    rules: RulesFile | None = None  # CONTENT_RULES_FILE: its matches masked in the answer (None: none)


class StreamWorker:
    """Answers one StreamJob through the backend of its route, within its route's limits (`backends`, `rules`: ""
    the bot's own)."""

    def __init__(self, deps: WorkerDeps, backends: Mapping[str, Backend], owner: str, rules: Mapping[str, TurnRules]):
        self.deps = deps
        self.backends = backends
        self.owner = owner
        self.rules = rules
        self.bot = deps.turn.bot

    def run(self, job: StreamJob, cancelled: threading.Event, lease: LeaseClock | None = None) -> None:
        """Thread entry point: never raises, always leaves a final state unless another replica owns the stream."""
        backend = self.backends.get(job.route)
        with log_context(
            replica=self.owner,
            bot=self.bot,
            backend=backend.name if backend is not None else None,
            route=job.route or None,
            stream=job.stream_id,
            msgid=job.msgid,
            user=job.userid,
            chat=job.chatid or None,
        ):
            answer = self._new_answer(job, lease)
            limits = self.rules.get(job.route, self.rules[""])  # its route's (a route gone: the bot's own)
            turn = Turn(job, answer, cancelled, limits, self.deps.turn)
            finisher, texts, life = turn.finisher, turn.texts, self.deps.turn.store.life
            try:
                if backend is None:
                    raise Declined("route_gone", failed=True)
                self._answer(turn, backend)
            except HandedOver:
                life.handed_over.send(job.stream_id, how="handed_over")
                logger.info("this process stops: the form's wait was handed over to another replica")
            except StreamAborted:
                life.handed_over.send(job.stream_id, how="taken_over_elsewhere")
                logger.info(
                    "stream is owned or closed elsewhere now (taken over, or stopped by its user); worker stops"
                )
                self.deps.stopper.stop_backend_later(job, answer.task_id)
            except AuthError as refusal:
                logger.info("not asking the backend: %s", refusal.code)
                finisher.finish(job, answer, ERROR, note=texts.failure_note(refusal), error=refusal.code)
            except Declined as declined:
                logger.info("declined: %s", declined.note_key)
                status, error = (ERROR, declined.note_key) if declined.failed else (DONE, "")
                finisher.finish(job, answer, status, note=texts.say(declined.note_key), error=error)
            except BackendError as exc:
                self._fail(turn, backend, exc)
            except NoSlot:
                logger.info("no answer slot came free within QUEUE_WAIT_SECONDS: a busy reply")
                metrics.CAP_REFUSALS.labels(self.bot).inc()
                finisher.finish(job, answer, DONE, note=texts.say("queue_busy"), error="busy")
            except REDIS_FAILURES as exc:
                logger.warning("Redis stayed unavailable before the answer could start: %s", exc)
                finisher.finish(job, answer, ERROR, note=texts.say("store_unavailable"), error="redis_unavailable")
            except Exception:
                logger.exception("stream worker failed")
                finisher.finish(job, answer, ERROR, note=texts.say("internal_error"), error="internal_error")
            finally:
                if answer.progress is not None:
                    answer.progress.close()
                life.left.send(job.stream_id)
                if answer.mask.count:
                    metrics.MASKED_MATCHES.labels(self.bot).inc(answer.mask.count)

    def _answer(self, turn: Turn, backend: Backend) -> None:
        """A new question, the run of an answer whose replica is gone, or the rest of a run after a form: each as
        far as the backend can take it (one that cannot follow a run again never gets one: nothing names a run).
        A taken-over answer whose end went out before its replica was gone is only ended."""
        job = turn.job
        if job.taken_over and turn.finisher.finish_kept_end(job):
            return
        if job.separate and backend.capabilities.forms:
            backend.continue_form(turn)
        elif job.resume_run and backend.capabilities.resumes:
            backend.resume(turn)
        else:
            backend.answer(turn)

    def _fail(self, turn: Turn, backend: Backend, exc: BackendError) -> None:
        """The backend call failed: the answer ends with the note that says how, its text so far kept; a call that
        ran out of time is stopped at the backend."""
        route = turn.job.route
        metrics.DIFY_ERRORS.labels(self.bot, backend.name, exc.code, route).inc()
        self.deps.health.failed(exc.code)
        logger.warning("the backend failed: %s (%s)", exc.code, exc.message[:200])
        answer = turn.answer
        if isinstance(exc, BackendTimeout) and answer.task_id:
            backend.stop(answer.task_id, turn.job.dify_user)
            metrics.DIFY_STOPS.labels(self.bot, backend.name, "timeout", route).inc()
        note = turn.texts.failure_note(exc)
        code = record_code(exc)
        error = f"{code}: {exc.message[:200]}" if code == exc.code else f"{code}: {exc.code}: {exc.message[:200]}"
        turn.finisher.finish(turn.job, answer, ERROR, note=note, error=error)

    def _new_answer(self, job: StreamJob, lease: LeaseClock | None) -> Answer:
        """This attempt's answer, with its writes to the stream (they renew the attempt's `lease` when it is due)
        and its status line; an attempt that follows a run already under way starts writing after the stream's
        chunks (its backend's business)."""
        deps = self.deps
        writer = deps.appender.writer(
            deps.turn.store,
            job.stream_id,
            job.attempt,
            pace=deps.append_pace,
            deadlines=deps.append_deadlines,
            lease=lease,
        )
        mask = ContentMask(deps.rules.current()) if deps.rules is not None else ContentMask()
        line = deps.turn.texts.say("progress_step")
        return Answer(writer=writer, progress=StepProgress(writer, line), mask=mask)
