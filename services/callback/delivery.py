"""Callback mode's Delivery (services/streams/delivery.py). A callback bot's bubbles are polled by WeCom on any
replica. What a bubble cannot show goes out through the message's response_url, once, whatever process dies
(rest_posts.py); a bubble a poll closed early, or one whose answer ends longer than it shows, is watched until that
rest has gone out; and a bubble no poll ever showed is taken as lost, its answer sent whole.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from services import metrics
from services.callback.kept_ends import KeptEnds
from services.callback.rest_posts import RestPosts
from services.keys import REST_POST_CLAIM_TTL_SECONDS, REST_POST_TTL_SECONDS
from services.outage import RETRY_DELAYS, best_effort, best_effort_value
from services.streams.bubble import SEPARATELY
from services.streams.job import StreamJob
from services.streams.life import StreamLife
from services.streams.poll_path import Snapshot
from services.streams.record import STOPPED_BY_USER, F
from services.streams.store import StreamStore
from services.wecom.messages import Inbound

logger = logging.getLogger(__name__)

# A bubble no poll has shown this long after its message came never reached WeCom: every try of its callback was
# answered too late (three tries of 5 s; a later try finds the stream open and answers with it, so polls start within
# about 15 s when any try got through). Its answer goes out through response_url instead.
UNPOLLED_SECONDS = 20.0
# How many watched streams are looked at per pass of look_after_watched.
WATCHED_PAGE = 50
# An answer about to end is listed before its end is written, which waits through an outage anyway: a try or two.
BEFORE_THE_END_DELAYS = (0.5, 1.0)
# An answer whose bubble closed early has its rest written down (RestPosts) by its finisher right after its end; one
# found ended this long with no rest written down nor sent lost its finisher in between (its process died), and the
# watch makes the rest itself. (As long as a post's claim: a finisher waiting out Redis meanwhile posts without it.)
REST_UNMADE_SECONDS = float(REST_POST_CLAIM_TTL_SECONDS)


class CallbackDelivery:
    """Callback mode: what a bubble cannot show goes through the message's response_url."""

    mode = "callback"
    runs_here = True  # WeCom tries a refused callback again, on another replica
    waits_for_redis = False  # the user is not kept waiting for Redis: response_url needs none
    append_pace = 0.0
    append_deadlines = True

    def __init__(
        self,
        posts: RestPosts,
        store: StreamStore,
        bot: str,
        draining: Callable[[], bool] = lambda: False,
        ends: KeptEnds | None = None,
    ):
        self.posts = posts  # made once whatever process dies, and swept by every serving process
        self.store = store
        self.bot = bot
        self.draining = draining
        self.ends = ends  # where there is a database: the ends that went out while Redis was away

    def dispatch(self, job: StreamJob, run_here: Callable[[StreamJob], None]) -> None:
        run_here(job)  # WeCom's polls reach any replica: the one that opened the stream answers it

    def tracking(self, message: Inbound) -> dict[str, str]:
        return {}

    def track(self, stream_id: str, message: Inbound) -> None:
        return None  # a retried callback is polled as the first one was

    def separate_url(self, response_url: str) -> str:
        return response_url

    def opened_separately(self, job: StreamJob) -> None:
        return None  # its finisher posts its answer through its response_url

    def reaches(self, job: StreamJob) -> bool:
        return bool(job.response_url)

    def send(self, job: StreamJob, message: str, kind: str, patience: float, given_up: bool = False) -> bool:
        delivered = self.posts.send(job.stream_id, job.response_url, message)  # tried through an outage by RestPosts
        metrics.RESPONSE_URL.labels(self.bot, kind, "sent" if delivered else "failed").inc()
        logger.info("%s of the answer %s through response_url", kind, "sent" if delivered else "NOT sent")
        return delivered

    def answer_separately(self, job: StreamJob, message: str) -> None:
        if job.response_url:
            self.send(job, message, "form_rest", 0.0)

    def keep_end(self, job: StreamJob, status: str, fields: dict[str, str]) -> None:
        if self.ends is not None:
            self.ends.keep(job.stream_id, status, fields)

    def kept_end(self, stream_id: str) -> tuple[str, dict[str, str]] | None:
        return self.ends.find(stream_id) if self.ends is not None else None

    def bubble_lost(self, job: StreamJob) -> bool:
        """Whether no poll ever showed the answer's bubble, waited for until UNPOLLED_SECONDS after its message came;
        then the answer is taken to go through response_url. False when a poll came, Redis does not say, or the
        process drains (it does not wait: the bubble, final in Redis, shows the answer to a poll that comes)."""
        while True:
            polls = best_effort_value(
                lambda: self.store.reads.polls(job.stream_id), "reading whether the bubble was polled"
            )
            if polls != 0 or self.draining():
                return False
            wait = job.created_at + UNPOLLED_SECONDS - time.time()
            if wait <= 0:
                break
            time.sleep(min(0.5, wait))
        taken = best_effort_value(lambda: self.store.take_unpolled(job.stream_id), "taking an unpolled answer")
        if taken:
            logger.warning("no poll ever showed this answer's bubble: WeCom never got its reply; sending it whole")
        return bool(taken)

    def follow(self, life: StreamLife) -> CallbackDelivery:
        """Watch each bubble a poll closes early (`life.closed_early`), and each answer about to end longer than its
        live bubble (`life.rest_owed`), until its rest has gone out."""
        life.closed_early.connect(
            lambda stream_id, reason, has_response_url: self.watch(stream_id) if has_response_url else None, weak=False
        )
        life.rest_owed.connect(lambda stream_id: self.watch(stream_id, BEFORE_THE_END_DELAYS), weak=False)
        return self

    def watch(self, stream_id: str, delays: tuple[float, ...] = RETRY_DELAYS) -> None:
        """List the stream: its bubble promised the rest through response_url, and WeCom polls it no more (it
        closed early, or is about to end), so no poll would see its replica die before that rest goes out. The
        list's entries age out by their score; its TTL, renewed with each, ends it when none is left."""
        key = self.store.keys.closed_early()

        def note() -> None:
            with self.store.client.pipeline(transaction=False) as pipe:
                pipe.zadd(key, {stream_id: time.time()}).expire(key, REST_POST_TTL_SECONDS).execute()

        best_effort(note, "listing a bubble whose rest follows", delays)

    def look_after_watched(self, look: Callable[[str], Snapshot | None]) -> int:
        """Each watched stream (its bubble closed early, or its answer about to end longer than its bubble) is
        looked at as a poll would: once its lease has been gone for the takeover grace, a chatflow's run is resumed
        (its finisher sends the rest), and a chat's answer, which cannot be, ends as interrupted: what Redis holds
        of it past what the closed bubble showed goes through response_url, and that note after it (a live bubble
        shows that note itself). An answer found ended is watched until its rest was written down or sent: one
        whose finisher died in between has it made here (REST_UNMADE_SECONDS). Returns how many were found ended
        (and are watched no more)."""
        key, client = self.store.keys.closed_early(), self.store.client
        client.zremrangebyscore(key, "-inf", time.time() - REST_POST_TTL_SECONDS)  # its response_url is gone
        ended = 0
        for stream_id in client.zrange(key, 0, WATCHED_PAGE - 1):
            snapshot = look(stream_id)
            if snapshot is not None and snapshot.active:
                continue
            if snapshot is not None and snapshot.event == "expired" and snapshot.close_reason:
                logger.warning("the answer of a bubble closed early lost its replica; saying so through response_url")
                url = self.store.reads.meta(stream_id).get("response_url", "")
                if url:
                    self.posts.send(stream_id, url, snapshot.owed or snapshot.note)
            elif snapshot is not None and snapshot.owed and (unmade := self._rest_unmade(stream_id)) is not None:
                ended_at, url = unmade
                if time.time() - ended_at < REST_UNMADE_SECONDS:
                    continue  # its finisher writes it down at once: looked at again next pass
                logger.warning("an answer's end was written, not the rest its bubble promised; sending it from here")
                self.posts.send(stream_id, url, snapshot.owed)
            client.zrem(key, stream_id)
            ended += 1
        return ended

    def _rest_unmade(self, stream_id: str) -> tuple[float, str] | None:
        """(when the stream ended, its response_url) if its rest was neither written down nor sent, nor went
        another way (the whole answer sent separately, a stop); else None."""
        keys = self.store.keys
        with self.store.client.pipeline(transaction=False) as pipe:
            pipe.hmget(keys.stream(stream_id), [F.finished_at, F.response_url, F.rest_sent, F.close_reason, F.error])
            pipe.exists(keys.rest_post(stream_id), keys.rest_post_claim(stream_id))
            (ended_at, url, rest_sent, reason, error), recorded = pipe.execute()
        if recorded or rest_sent or reason == SEPARATELY or error == STOPPED_BY_USER or not (ended_at and url):
            return None
        return float(ended_at), url

    def start(self, look: Callable[[str], Snapshot | None]) -> None:
        self.posts.start(also=lambda: self.look_after_watched(look))

    def stop_watching(self) -> None:
        self.posts.stop()

    def close(self) -> None:
        self.posts.stop()
        self.posts.responder.close()
