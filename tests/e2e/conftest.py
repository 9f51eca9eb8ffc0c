"""What the end-to-end tests share: the environment of a gateway replica run by gunicorn in production mode."""

from __future__ import annotations

from tests.conftest import AES_KEY, DIFY_KEY, TOKEN


def replica_env(dify_url: str, redis_url: str, **settings: str) -> dict[str, str]:
    """A replica's environment against the test's Dify stand-in and Redis, without auth; `settings` add to it or
    override it (e.g. AUTH_MODE="external" with the auth API and the database)."""
    return {
        "DEMO_MODE": "false",
        "BOTS_FILE": "",  # demo.env names the demo's bots file; these replicas are the environment's one bot
        "WECOM_TOKEN": TOKEN,
        "WECOM_ENCODING_AES_KEY": AES_KEY,
        "DIFY_BASE_URL": dify_url,
        "DIFY_API_KEY": DIFY_KEY,
        "REDIS_URL": redis_url,
        "AUTH_MODE": "none",
        "LOG_LEVEL": "INFO",
        **settings,
    }
