"""What the end-to-end tests share: the environment of a gateway replica run by gunicorn in production mode."""

from __future__ import annotations

import pytest

from demo.dify_standin import DifyStandIn
from demo.replicas import GunicornReplica
from tests.conftest import AES_KEY, DIFY_KEY, TOKEN, wait_until

LOG_TAIL_BYTES = 30_000  # of each replica's log, shown under a failed test


@pytest.fixture
def another_dify():
    """Another Dify app, played by a stand-in of its own: `another_dify(api_key)` (stopped after the test)."""
    started: list[DifyStandIn] = []

    def start(api_key: str) -> DifyStandIn:
        started.append(DifyStandIn(api_key=api_key, ping_interval=0.2, demo_delay=0.005).start())
        return started[-1]

    yield start
    for server in started:
        server.stop()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test shows the end of each replica's log (gunicorn's processes write to files in the test's
    tmp_path, which pytest keeps only for its last few runs): a failure in CI can be read from its output."""
    report = yield
    tmp_path = getattr(item, "funcargs", {}).get("tmp_path")
    if report.failed and tmp_path is not None:
        for log in sorted(tmp_path.glob("*.log")):
            data = log.read_bytes()[-LOG_TAIL_BYTES:]
            report.sections.append((f"replica log {log.name} (its end)", data.decode("utf-8", "replace")))
    return report


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


def callback_bot(name: str, dify_url: str, **fields) -> str:
    """A callback-mode bot's table for a BOTS_FILE, on the test's token, EncodingAESKey and Dify app; `fields` add
    keys of its own (strings quoted, numbers as they are)."""
    return _bot_table(
        name, token=TOKEN, encoding_aes_key=AES_KEY, dify_base_url=dify_url, dify_api_key=DIFY_KEY, **fields
    )


def connection_bot(name: str, bot_id: str, secret: str, ws_url: str, dify_url: str, **fields) -> str:
    """A long-connection bot's table for a BOTS_FILE (its lease 3 s, so a killed holder's is taken over soon)."""
    return _bot_table(
        name,
        mode="long_connection",
        bot_id=bot_id,
        secret=secret,
        wecom_ws_url=ws_url,
        wecom_ws_lease_seconds=3,
        dify_base_url=dify_url,
        dify_api_key=DIFY_KEY,
        **fields,
    )


def _bot_table(name: str, **fields) -> str:
    lines = [f'{key} = "{value}"' if isinstance(value, str) else f"{key} = {value}" for key, value in fields.items()]
    return "\n".join([f"[bots.{name}]", *lines, ""]) + "\n"


def ready_replicas(env: dict[str, str], tmp_path, count: int = 2, workers: int = 2) -> list[GunicornReplica]:
    """`count` gunicorn replicas of `workers` each on `env`, once every worker has said it is ready."""
    replicas = [GunicornReplica(env, tmp_path, f"replica-{i}", workers=workers).start() for i in range(count)]
    assert wait_until(lambda: _readies(replicas) >= count * workers, timeout=60)
    return replicas


def _readies(replicas: list[GunicornReplica]) -> int:
    return sum(replica.logs().count("gateway ready") for replica in replicas)
