"""Builds and holds the services of one app instance: each external resource is created once, here."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import redis
from sqlalchemy import Engine

from config.settings import Settings
from services import db
from services.auth import Authorizer
from services.auth_api import AuthApiClient
from services.callback import CallbackHandler
from services.crypto import WeComCrypto
from services.dify_app import DifyAppProfile
from services.dify_client import DifyClient
from services.keys import Keys
from services.redis_conn import connect_redis
from services.runner import StreamRunner
from services.stream_store import StreamStore
from services.stream_worker import StreamWorker
from services.streams import StreamService
from services.texts import Texts
from services.users import UserDirectory

logger = logging.getLogger(__name__)


@dataclass
class Gateway:
    """Everything one app instance serves with; reached from Flask as `app.extensions["gateway"]`."""

    settings: Settings
    redis: redis.Redis
    keys: Keys
    store: StreamStore
    dify: DifyClient
    runner: StreamRunner
    streams: StreamService
    callback: CallbackHandler
    texts: Texts
    dify_base_url: str
    engine: Engine
    users: UserDirectory
    profile: DifyAppProfile
    authorizer: Authorizer | None

    def close(self) -> None:
        """Release pooled connections (running stream threads are left to finish on their own)."""
        self.runner.stop()
        self.dify.close()
        if self.authorizer is not None:
            self.authorizer.api.close()
        self.engine.dispose()
        self.redis.close()


# Seeded into the database in demo mode, so the local chat works with AUTH_MODE=external out of the box.
DEMO_USERS = (("alice", "alice@example.com", "Alice", True), ("bob", "bob@example.com", "Bob", False))


def build_gateway(settings: Settings, instance_path: Path) -> Gateway:
    """Create the clients and services for `settings` (starting the built-in stand-ins in demo mode)."""
    texts = Texts(settings.bot_language)
    client = connect_redis(settings.redis_url, settings.redis_socket_timeout)
    keys = Keys(settings.redis_key_prefix)
    store = StreamStore(client, keys, settings.stream_key_ttl_seconds, settings.stream_lease_seconds)

    dify_base_url = settings.dify_base_url
    if not dify_base_url:
        from demo.dify_standin import start_builtin_standin  # demo mode only (settings enforce it)

        dify_base_url = start_builtin_standin()
        logger.warning("demo mode: answering with the built-in Dify stand-in at %s", dify_base_url)
    dify = DifyClient(
        dify_base_url,
        settings.dify_api_key,
        connect_timeout=settings.dify_connect_timeout,
        read_timeout=settings.dify_read_timeout,
        max_retries=settings.dify_max_retries,
        retry_backoff=settings.dify_retry_backoff,
    )

    profile = DifyAppProfile(dify)

    engine = db.make_engine(settings.database_url or db.default_sqlite_url(instance_path), settings.database_timeout)
    users = UserDirectory(engine)
    if settings.demo_mode:
        seed_demo_users(engine, users)
    authorizer = None
    prepare = None
    if settings.auth_mode == "external":
        auth_url = settings.auth_api_url
        if not auth_url:
            from demo.auth_standin import start_builtin_auth_standin  # demo mode only (settings enforce it)

            auth_url = start_builtin_auth_standin(settings.auth_api_key)
            logger.warning("demo mode: authenticating with the built-in auth stand-in at %s", auth_url)
        api = AuthApiClient(auth_url, settings.auth_api_key, settings.auth_timeout)
        authorizer = Authorizer(
            client,
            keys,
            users,
            api,
            settings.auth_token_margin,
            exchange_timeout=settings.auth_timeout + settings.database_timeout,
            declared_inputs=profile.declared_inputs,
        )

        def prepare(job):
            return authorizer.inputs_for(job.userid)

    owner = settings.instance_id
    runner = StreamRunner(store, owner, settings.stream_max_active, settings.stream_lease_seconds)
    worker = StreamWorker(store, dify, texts, owner, settings.dify_max_stream_seconds, prepare)
    streams = StreamService(
        store, runner, worker, texts, owner, settings.stream_window_seconds, settings.stream_placeholder
    )
    crypto = WeComCrypto(settings.wecom_token, settings.wecom_encoding_aes_key, settings.wecom_receive_id)
    callback = CallbackHandler(crypto, streams, texts, settings.wecom_timestamp_tolerance)
    return Gateway(
        settings=settings,
        redis=client,
        keys=keys,
        store=store,
        dify=dify,
        runner=runner,
        streams=streams,
        callback=callback,
        texts=texts,
        dify_base_url=dify_base_url,
        engine=engine,
        users=users,
        profile=profile,
        authorizer=authorizer,
    )


def seed_demo_users(engine: Engine, users: UserDirectory) -> None:
    """Create the schema and the demo users (alice enabled, bob disabled) if they are missing."""
    db.init_schema(engine)
    for userid, account, name, enabled in DEMO_USERS:
        if users.find(userid) is None:
            users.add(userid, account, name, enabled)
