"""A user's /stop: the answer streaming in that chat ends now, whichever replica runs it, in one script on the stream
(scripts.STOP); the backend's stop is called once (docs/architecture.md, "Stopping an answer from any replica").
Dify may go on running a chatflow's nodes after its stop (dify #40966); the bubble has ended whatever it does.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping

from services import metrics
from services.redis_conn import REDIS_FAILURES
from services.streams.backend import Backend
from services.streams.job import StreamJob
from services.streams.record import ACTIVE_STATUSES, F
from services.streams.store import StreamStore
from services.texts import Texts

logger = logging.getLogger(__name__)


class AnswerStopper:
    def __init__(self, store: StreamStore, backends: Mapping[str, Backend], texts: Texts, bot: str):
        self.store = store
        self.backends = backends  # by route ("": the bot's own): an answer's is its route's
        self.texts = texts
        self.bot = bot

    def stop_in_chat(self, aibotid: str, chatid: str, userid: str) -> int:
        """Stop the user's answers streaming in this chat (`chatid` "" for the 1:1 chat); returns how many.

        Raises:
            redis.RedisError: Redis did not answer (the caller says the service is unavailable).
        """
        stream_ids = self.store.reads.open_streams(aibotid, userid)
        stopped = 0
        for stream_id, meta in zip(stream_ids, self.store.reads.metas(stream_ids), strict=True):
            if (meta.get(F.chatid) or "") == (chatid or "") and self._stop(stream_id, meta, "its user"):
                stopped += 1
        metrics.STOPS.labels(self.bot, "stopped" if stopped else "nothing").inc()
        return stopped

    def stop(self, stream_id: str, by: str) -> bool:
        """Stop one answer as its user's /stop would (the operator's page: `by` names who, for the log); False if it
        was not streaming.

        Raises:
            redis.RedisError: Redis did not answer.
        """
        stopped = self._stop(stream_id, self.store.reads.meta(stream_id), by)
        metrics.STOPS.labels(self.bot, "stopped" if stopped else "nothing").inc()
        return stopped

    def _stop(self, stream_id: str, meta: dict, by: str) -> bool:
        if meta.get(F.status) not in ACTIVE_STATUSES:
            return False
        result = self.store.stop(stream_id, self.texts.say("stopped_note"))
        if result is None:  # it ended meanwhile
            return False
        inflight_key, task_id = result
        self.store.release_inflight(inflight_key, stream_id)
        logger.info("stream %s stopped by %s", stream_id, by)
        if task_id:
            self._stop_backend(StreamJob.from_meta(stream_id, meta, ""), task_id)
        return True

    def stop_backend_later(self, job: StreamJob, task_id: str) -> None:
        """A worker found its stream stopped by the user (its writes refused): it calls the backend's stop for the
        task when nobody has yet. Never raises."""
        try:
            mine = bool(task_id) and self.store.claim_dify_stop(job.stream_id)
        except REDIS_FAILURES as exc:  # Redis away: the run goes on in Dify, its answer is shown to nobody
            logger.warning("could not tell whether Dify's task was stopped: %s", type(exc).__name__)
            return
        if mine:
            self._stop_at_backend(job, task_id)

    def _stop_backend(self, job: StreamJob, task_id: str) -> None:
        """The backend's stop call, off the request thread (the callback's reply, or the WebSocket's reader, waits
        for nothing)."""
        threading.Thread(target=self._stop_at_backend, args=(job, task_id), name="backend-stop", daemon=True).start()

    def _stop_at_backend(self, job: StreamJob, task_id: str) -> None:
        backend = self.backends.get(job.route)
        if backend is None:  # a route the bots file no longer has: its answer ended; its task runs out by itself
            return
        backend.stop(task_id, job.dify_user)
        metrics.DIFY_STOPS.labels(self.bot, backend.name, "user", job.route).inc()
