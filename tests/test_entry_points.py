"""What each way of starting the gateway may do. The production app (`app.py`, gunicorn, every `flask --app app`
command) reads the environment and `.env` only: no value of `demo.env` reaches it, no demo bot loads and demo mode
is never entered unless the environment says so. One-shot processes (`flask` commands, the db-init Job) start no
background work: they leave a long-connection bot's lease and its queued answers alone."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading

import pytest
import redis

from app import create_app
from config.settings import DEMO_ENV_FILES, PROJECT_ROOT, SettingsError, load_settings
from services.keys import Keys
from services.longconn.jobs import GROUP, JobQueue
from services.longconn.lease import BotLease
from services.longconn.outbox import Outbox
from services.replication import Replication
from services.streams.store import StreamStore
from tests.conftest import AES_KEY, DIFY_KEY, TOKEN

BOT_ID, SECRET = "cli-bot", "cli-secret"
KEYS = Keys()


def clean_environment(**settings: str) -> dict[str, str]:
    """A shell's environment with none of the gateway's settings, plus `settings`."""
    ours = {"DEMO_MODE", "BOTS_FILE", "REDIS_URL", "DATABASE_URL", "AUTH_MODE", "DIFY_BASE_URL", "DIFY_API_KEY"}
    env = {k: v for k, v in os.environ.items() if k not in ours and not k.startswith(("WECOM_", "AUTH_"))}
    return {**env, "LOG_FORMAT": "text", **settings}


def flask(env: dict[str, str], *command: str) -> subprocess.CompletedProcess:
    """`python -m flask --app app <command>` from the checkout, as an operator runs it."""
    return subprocess.run(
        [sys.executable, "-m", "flask", "--app", "app", *command],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def production(redis_url: str, dify_url: str, **more: str) -> dict[str, str]:
    """One callback bot's production settings, as a VM or systemd deployment from a checkout would set them."""
    return clean_environment(
        WECOM_TOKEN=TOKEN,
        WECOM_ENCODING_AES_KEY=AES_KEY,
        DIFY_BASE_URL=dify_url,
        DIFY_API_KEY=DIFY_KEY,
        REDIS_URL=redis_url,
        AUTH_MODE="none",
        **more,
    )


@pytest.mark.parametrize("demo_mode", [None, "0"], ids=["DEMO_MODE-unset", "DEMO_MODE-0"])
def test_a_checkout_with_production_settings_uses_nothing_of_demo_env(demo_mode, redis_url, dify):
    extra = {} if demo_mode is None else {"DEMO_MODE": demo_mode}
    listed = flask(production(redis_url, dify.base_url, **extra), "bots", "list")
    assert listed.returncode == 0, listed.stderr
    bots = [line.split()[0] for line in listed.stdout.splitlines()[1:]]
    assert bots == ["default"]  # demo.env's BOTS_FILE (assistant, helpdesk, ops) is not read
    assert "DEMO MODE" not in listed.stderr + listed.stdout


def test_an_operator_command_prints_its_output_and_no_start_up_lines(redis_url, dify):
    """A `flask` command is no gateway starting: no "gateway ready", no warnings about serving (PUBLIC_BASE_URL,
    demo mode), no INFO lines; only the command's output (and a WARNING or worse, should there be one). The demo's
    commands start no stand-ins either."""
    listed = flask(production(redis_url, dify.base_url, LOG_LEVEL="INFO"), "bots", "list")
    assert listed.returncode == 0, listed.stderr
    assert listed.stderr == ""
    assert listed.stdout.splitlines()[0].split()[0] == "BOT" and "gateway ready" not in listed.stdout
    demo = subprocess.run(
        [sys.executable, "-m", "flask", "--app", "demo.app", "bots", "list"],
        cwd=PROJECT_ROOT,
        env=clean_environment(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert demo.returncode == 0, demo.stderr
    assert demo.stderr == "" and "demo:" not in demo.stdout and "DEMO MODE" not in demo.stdout
    assert [line.split()[0] for line in demo.stdout.splitlines()[1:]] == ["assistant", "helpdesk", "model", "ops"]


def test_without_settings_the_production_app_refuses_to_start_instead_of_entering_demo_mode():
    """demo.env would have made this a demo (embedded store, demo credentials); the production app says what is
    missing instead."""
    result = flask(clean_environment(), "bots", "list")
    assert result.returncode == 2
    assert "configuration error: REDIS_URL is required" in result.stderr
    assert "DEMO MODE" not in result.stderr


def test_only_the_demos_entry_points_read_demo_env():
    with pytest.raises(SettingsError, match="REDIS_URL is required"):
        load_settings({})  # the production app's files: .env only
    demo = load_settings({}, env_files=DEMO_ENV_FILES)
    assert demo.demo_mode
    assert demo.bots_file == "demo/bots.toml"


@pytest.fixture
def long_connection_bot(redis_url, redis_client, dify, wecom_ws):
    """The settings of a long-connection bot whose WeCom server (the stand-in) counts the connections it gets."""
    wecom = wecom_ws({BOT_ID: SECRET})
    env = production(
        redis_url,
        dify.base_url,
        WECOM_MODE="long_connection",
        WECOM_BOT_ID=BOT_ID,
        WECOM_BOT_SECRET=SECRET,
        WECOM_WS_URL=wecom.url,
        WECOM_WS_LEASE_SECONDS="3",
    )
    return env, wecom


def test_flask_commands_leave_the_lease_and_the_queued_answers_alone(long_connection_bot, redis_client, redis_url):
    """`db init` run before the replicas start, and an operator's `streams list` while they run, must neither take
    the bot's connection (its lease, a subscription) nor a queued answer."""
    env, wecom = long_connection_bot
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    store = StreamStore(client, KEYS, 3600, 30, durable=Replication(client))
    queue = JobQueue(store.durable, KEYS, BOT_ID, Outbox(client, KEYS, store, BOT_ID))
    queue.submit("queued-stream", "replica-x:1")
    client.xgroup_create(queue.key, GROUP, id="0")

    for command in (("streams", "list"), ("bots", "list")):  # nobody holds the lease: a serving process would
        result = flask(env, *command)
        assert result.returncode == 0, result.stderr
    assert not redis_client.exists(KEYS.ws_lease(BOT_ID))
    assert not redis_client.exists(KEYS.ws_generation(BOT_ID))
    assert wecom.connections == 0

    holding = BotLease(client, KEYS, BOT_ID, "replica-x:1", 30).acquire()  # now a serving process holds it
    before = redis_client.get(KEYS.ws_lease(BOT_ID))
    result = flask(env, "streams", "list")
    assert result.returncode == 0, result.stderr
    assert redis_client.get(KEYS.ws_lease(BOT_ID)) == before == f"replica-x:1 {holding.generation}"
    [group] = redis_client.xinfo_groups(queue.key)
    assert group["consumers"] == 0 and group["pending"] == 0  # nothing read, nothing taken
    assert wecom.connections == 0
    client.close()


def test_building_the_app_starts_no_thread_and_serving_it_does(settings, dify, wecom_ws):
    wecom = wecom_ws({BOT_ID: SECRET})
    bot = settings.replace(
        wecom_mode="long_connection", wecom_bot_id=BOT_ID, wecom_bot_secret=SECRET, wecom_ws_url=wecom.url
    )
    before = {thread.name for thread in threading.enumerate()}
    app = create_app(bot)
    gateway = app.extensions["gateway"]
    try:
        assert not {thread.name for thread in threading.enumerate()} - before
        assert not gateway.started
        gateway.start()
        started = {thread.name for thread in threading.enumerate()} - before
        assert {"wecom-ws-default", "wecom-ws-jobs-default"} <= started
    finally:
        gateway.drain(1)
        gateway.close()


def test_a_port_left_in_time_wait_by_a_demo_just_stopped_is_free_again():
    """`make demo` right after Ctrl-C: the old server's closed connections sit in TIME-WAIT on its port; the
    demo's check must not call that port in use (it was refused for up to a minute), while a listener still is."""
    from demo.__main__ import _port_is_free

    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = listener.accept()
    accepted.close()  # the server side closes first: its end of the connection goes to TIME-WAIT
    client.close()
    assert not _port_is_free("127.0.0.1", port)  # still listening
    listener.close()
    assert _port_is_free("127.0.0.1", port)


def test_a_serving_process_says_at_once_when_redis_does_not_answer(settings, caplog):
    """An unreachable Redis left only 'gateway ready' in the log (for 24 s, until a request came); a serving
    process now says it in one line at start-up, without the URL's password."""
    from demo.replicas import free_port

    closed = settings.replace(redis_url=f"redis://:hunter2@127.0.0.1:{free_port()}/0", redis_socket_timeout=0.5)
    gateway = create_app(closed).extensions["gateway"]
    try:
        with caplog.at_level(logging.WARNING, logger="services.gateway"):
            gateway.start()
        [line] = [r.getMessage() for r in caplog.records if "does not answer" in r.getMessage()]
        assert line.startswith("Redis (REDIS_URL) does not answer") and "hunter2" not in line
    finally:
        gateway.close()


def test_make_says_in_one_line_that_python_3_11_is_needed(tmp_path):
    """`make demo` (or `make test`) with an older Python stops at once with one line, before any venv or install
    (Python 3.10 failed later, on tomllib)."""
    old = tmp_path / "python3.10"
    old.write_text('#!/bin/sh\n[ "$1" = "-V" ] && echo "Python 3.10.13" && exit 0\nexit 1\n')
    old.chmod(0o755)
    result = subprocess.run(
        ["make", "-C", str(PROJECT_ROOT), f"PYTHON={old}", f"VENV={tmp_path / 'venv'}", "setup-demo"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "Python 3.11 or newer is needed" in result.stdout and "Python 3.10.13" in result.stdout
    assert not (tmp_path / "venv").exists()
