"""Builds and holds the services of one app instance: each external resource is created once, here."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import redis
from sqlalchemy import Engine

from config.settings import Settings
from services import metrics
from services.auth import db
from services.auth.api import AuthApiClient
from services.auth.authorizer import Authorizer
from services.auth.users import UserDirectory
from services.chat.conversations import ConversationStore
from services.chat.intake import MessageIntake
from services.chat.media import MediaService
from services.chat.texts import Texts
from services.chat.welcome import Welcome
from services.dify.app_profile import DifyAppProfile
from services.dify.client import DifyClient
from services.dify.feedback import FeedbackService
from services.keys import Keys
from services.redis_conn import REDIS_FAILURES, connect_redis
from services.redis_url import parse_redis_url
from services.streams.bubble import BubbleRenderer
from services.streams.finisher import Finisher
from services.streams.runner import StreamRunner
from services.streams.service import StreamService
from services.streams.store import StreamStore
from services.streams.worker import StreamWorker, WorkerDeps
from services.streams.writer import AppendBatcher
from services.wecom.callback import CallbackHandler
from services.wecom.crypto import WeComCrypto
from services.wecom.envelope import Envelope
from services.wecom.events import EventHandler
from services.wecom.replay_guard import ReplayGuard
from services.wecom.response_url import ResponseUrlClient

logger = logging.getLogger(__name__)


@dataclass
class Gateway:
    """Everything one app instance serves with; reached from Flask as `app.extensions["gateway"]`."""

    settings: Settings
    owner: str  # this process as a stream owner and in log lines: Settings.instance_id, taken once per worker
    redis: redis.Redis
    keys: Keys
    store: StreamStore
    dify: DifyClient
    dify_base_url: str
    profile: DifyAppProfile
    engine: Engine | None  # None when no user table is needed (AUTH_MODE=none and no DATABASE_URL)
    users: UserDirectory | None
    authorizer: Authorizer | None
    conversations: ConversationStore
    media: MediaService
    feedback: FeedbackService
    responder: ResponseUrlClient
    runner: StreamRunner
    streams: StreamService
    callback: CallbackHandler
    texts: Texts

    def drain(self, timeout: float) -> list[str]:
        """Graceful shutdown: take no new streams, let running ones finish for up to `timeout` seconds, then hand
        what remains to the other replicas (a poll there restarts it if nothing was shown, else finishes the
        bubble with the partial text and a note). Returns the ids handed over."""
        logger.info("draining %d running streams (up to %.0fs)", self.runner.active_count, timeout)
        remaining = self.runner.drain(timeout)
        if not remaining:
            logger.info("all streams finished; nothing to hand over")
            return []
        self.runner.cancel(remaining)
        try:
            released = self.store.release_leases(remaining, self.owner)
        except REDIS_FAILURES as exc:
            logger.warning("could not release leases (%s); they expire within STREAM_LEASE_SECONDS", exc)
            released = 0
        metrics.STREAM_OUTCOMES.labels("handed_over").inc(released)
        logger.warning("handed %d unfinished streams over to other replicas", released)
        return remaining

    def close(self) -> None:
        """Release pooled connections (running stream threads are left to finish on their own)."""
        self.runner.stop()
        self.feedback.close()
        self.media.close()
        self.responder.close()
        self.dify.close()
        if self.authorizer is not None:
            self.authorizer.api.close()
        if self.users is not None:
            self.users.close()
        self.store.close()
        self.redis.close()


def build_gateway(settings: Settings, instance_path: Path) -> Gateway:
    """Create the clients and services for `settings`; `instance_path` holds the demo's embedded stores."""
    texts = Texts(settings.bot_language)
    client = connect_redis(
        settings.redis_url, settings.redis_socket_timeout, instance_path, settings.redis_sentinel_password
    )
    keys = Keys(settings.redis_key_prefix)
    store = StreamStore(
        client,
        keys,
        settings.stream_key_ttl_seconds,
        settings.stream_lease_seconds,
        settings.rate_limit_per_minute,
        claim_wait_ms=settings.redis_claim_wait_ms if parse_redis_url(settings.redis_url).replicated else 0,
    )
    dify_base_url, dify = settings.dify_base_url, _dify(settings)
    profile = DifyAppProfile(dify)
    crypto = WeComCrypto(settings.wecom_token, settings.wecom_encoding_aes_key, settings.wecom_receive_id)

    engine = _engine(settings, instance_path)
    users = None
    if engine is not None:
        read_engine = (
            db.make_engine(settings.database_read_url, settings.database_timeout)
            if settings.database_read_url
            else None
        )
        users = UserDirectory(engine, read_engine)
    authorizer = _authorizer(settings, client, keys, users, profile)

    conversations = ConversationStore(client, keys, settings.conversation_ttl_seconds)
    media = MediaService(crypto, dify, profile, dify_base_url)
    feedback = FeedbackService(client, keys, dify)
    responder = ResponseUrlClient()
    bubble = BubbleRenderer(texts, settings.stream_placeholder)

    owner = settings.instance_id
    runner = StreamRunner(store, owner, settings.stream_max_active, settings.stream_lease_seconds)
    deps = WorkerDeps(
        store=store,
        dify=dify,
        conversations=conversations,
        media=media,
        appender=AppendBatcher(store, owner),
        finisher=Finisher(store, owner, responder, bubble, texts),
        texts=texts,
    )
    prepare = (lambda job: authorizer.inputs_for(job.userid)) if authorizer is not None else None
    worker = StreamWorker(deps, owner, settings.dify_max_stream_seconds, prepare)
    streams = StreamService(store, runner, worker, texts, bubble, owner, settings.stream_window_seconds)
    events = EventHandler(
        Welcome(profile, texts, settings.welcome_message),
        feedback,
        ReplayGuard(client, keys, 2 * settings.wecom_timestamp_tolerance),
    )
    callback = CallbackHandler(
        Envelope(crypto, settings.wecom_timestamp_tolerance),
        MessageIntake(streams, conversations, texts, settings.wecom_bot_name),
        streams,
        events,
        texts,
    )
    return Gateway(
        settings=settings,
        owner=owner,
        redis=client,
        keys=keys,
        store=store,
        dify=dify,
        dify_base_url=dify_base_url,
        profile=profile,
        engine=engine,
        users=users,
        authorizer=authorizer,
        conversations=conversations,
        media=media,
        feedback=feedback,
        responder=responder,
        runner=runner,
        streams=streams,
        callback=callback,
        texts=texts,
    )


def _engine(settings: Settings, instance_path: Path) -> Engine | None:
    """The user table's engine: DATABASE_URL, the demo's embedded SQLite file, or none where none is needed
    (settings require DATABASE_URL outside demo mode when AUTH_MODE=external)."""
    url = settings.database_url or (db.default_sqlite_url(instance_path) if settings.demo_mode else "")
    return db.make_engine(url, settings.database_timeout) if url else None


def _dify(settings: Settings) -> DifyClient:
    return DifyClient(
        settings.dify_base_url,
        settings.dify_api_key,
        connect_timeout=settings.dify_connect_timeout,
        read_timeout=settings.dify_read_timeout,
        max_retries=settings.dify_max_retries,
        retry_backoff=settings.dify_retry_backoff,
    )


def _authorizer(
    settings: Settings, client: redis.Redis, keys: Keys, users: UserDirectory | None, profile: DifyAppProfile
) -> Authorizer | None:
    if settings.auth_mode != "external" or users is None:
        return None
    api = AuthApiClient(settings.auth_api_url, settings.auth_api_key, settings.auth_timeout)
    return Authorizer(
        client,
        keys,
        users,
        api,
        settings.auth_token_margin,
        exchange_timeout=settings.auth_timeout + settings.database_timeout,
        declared_inputs=profile.declared_inputs,
    )
