"""Create the Redis client for a REDIS_URL: a real server, or `memory://`, an embedded store for one process."""

from __future__ import annotations

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry


def connect_redis(url: str, socket_timeout: float = 2.0) -> redis.Redis:
    """A client with short timeouts (a Redis outage fails requests fast instead of hanging threads) and a couple
    of quick retries for a dropped connection only: retrying a timeout would just multiply the wait."""
    if url.startswith("memory://"):
        import fakeredis  # only the embedded default needs it

        return fakeredis.FakeRedis(server=fakeredis.FakeServer(), decode_responses=True)
    return redis.Redis.from_url(
        url,
        decode_responses=True,
        socket_timeout=socket_timeout,
        socket_connect_timeout=socket_timeout,
        health_check_interval=30,
        retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), retries=2, supported_errors=(redis.ConnectionError,)),
    )
