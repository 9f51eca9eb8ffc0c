"""Builds and holds the services of one app instance: each external resource is created once, here."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import redis

from config.settings import Settings
from services.callback import CallbackHandler
from services.crypto import WeComCrypto
from services.dify_client import DifyClient
from services.keys import Keys
from services.redis_conn import connect_redis
from services.runner import StreamRunner
from services.stream_store import StreamStore
from services.stream_worker import StreamWorker
from services.streams import StreamService
from services.texts import Texts

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

    def close(self) -> None:
        """Release pooled connections (running stream threads are left to finish on their own)."""
        self.runner.stop()
        self.dify.close()
        self.redis.close()


def build_gateway(settings: Settings) -> Gateway:
    """Create the clients and services for `settings` (starting the built-in Dify stand-in in demo mode)."""
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

    owner = settings.instance_id
    runner = StreamRunner(store, owner, settings.stream_max_active, settings.stream_lease_seconds)
    worker = StreamWorker(store, dify, texts, owner, settings.dify_max_stream_seconds)
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
    )
