"""Every background loop outlives a surprise: an unexpected exception in one pass is logged with its traceback,
counted in `background_errors_total`, and the loop goes on (services/loops.py). Each test injects one failure into
one real loop of a served gateway and shows its work still gets done: the connection holder, the connection's
keeper, the answer queue's consumer, the stream lease keeper and the append batcher."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from app import create_app
from demo import dify_standin as d
from services import metrics
from services.loops import Retries, run_until
from tests.conftest import wait_until

BOT_ID, SECRET = "loops-bot", "loops-secret"


def fail_once(function):
    """`function`, except that its first call raises RuntimeError."""
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected failure")
        return function(*args, **kwargs)

    wrapper.calls = calls
    return wrapper


def errors(loop: str) -> float:
    return metrics.BACKGROUND_ERRORS.labels(loop)._value.get()


@pytest.fixture
def wecom(wecom_ws):
    return wecom_ws({BOT_ID: SECRET})


@pytest.fixture
def gateway(settings, wecom):
    """A long-connection bot's gateway, built but not started: a test injects its failure first."""
    bot = settings.replace(
        wecom_mode="long_connection",
        wecom_bot_id=BOT_ID,
        wecom_bot_secret=SECRET,
        wecom_ws_url=wecom.url,
        wecom_ws_lease_seconds=3,
    )
    gateway = create_app(bot).extensions["gateway"]
    yield gateway
    gateway.drain(5)
    gateway.close()


def ask(gateway, wecom, dify, text: str = "hello", answer: str = "answered") -> dict:
    gateway.start()
    assert wait_until(lambda: wecom.subscribed(BOT_ID) == 1, timeout=10)
    dify.script(d.answer(answer), match=text)
    final = wecom.final(wecom.deliver_text(BOT_ID, text), timeout=20)
    assert final is not None, "no final frame"
    return final


def test_run_until_logs_counts_and_goes_on(caplog):
    stop, passes = threading.Event(), []
    before = errors("test_loop")

    def step():
        passes.append(1)
        if len(passes) == 1:
            raise RuntimeError("injected failure")
        if len(passes) == 3:
            stop.set()

    with caplog.at_level(logging.ERROR):
        run_until(stop, step, "test_loop", pause=0.01)
    assert len(passes) == 3
    assert errors("test_loop") == before + 1
    [record] = [r for r in caplog.records if "test_loop" in r.getMessage()]
    assert record.exc_info is not None  # the traceback is in the log


def test_retries_try_after_each_delay_until_done_and_a_failure_is_counted_and_tried_again():
    """A try that is not done waits for its next delay; one that raises is logged, counted and tried at its next
    delay too; one whose delays ran out gives up once; past `most` waiting, a new one is refused."""
    before = errors("test_retries")
    retries = Retries("test_retries", "test-retries", most=2)
    tries, gave_up = [], []

    def attempt():
        tries.append(1)
        if len(tries) == 2:
            raise RuntimeError("injected failure")
        return len(tries) == 3

    assert retries.add(attempt, (0.5, 0.01, 0.01, 0.01), lambda: gave_up.append("done"))
    assert retries.add(lambda: False, (0.5, 0.01), lambda: gave_up.append("never"))
    assert not retries.add(lambda: True, (0.0,), lambda: None)  # two wait already
    assert wait_until(lambda: len(tries) == 3 and gave_up == ["never"] and retries.waiting() == 0)
    assert errors("test_retries") == before + 1
    assert retries.add(lambda: tries.append("late") or True, (0.3,), lambda: None)
    retries.clear()  # (what it tried against closes)
    time.sleep(0.5)
    assert retries.waiting() == 0 and "late" not in tries


def fail_first_call(obj, name: str) -> None:
    setattr(obj, name, fail_once(getattr(obj, name)))


@pytest.mark.parametrize(
    ("loop", "inject"),
    [
        ("wecom_ws_holder", lambda gateway: fail_first_call(gateway.bot().connection.holder.lease, "acquire")),
        ("wecom_ws_keeper", lambda gateway: fail_first_call(gateway.bot().connection.holder.replies, "pump")),
        ("append_batcher", lambda gateway: fail_first_call(gateway.appender, "_take_batch")),
    ],
    ids=["connection-holder", "connection-keeper", "append-batcher"],
)
def test_the_loop_survives_a_failure(loop, inject, gateway, wecom, dify):
    inject(gateway)
    before = errors(loop)
    assert ask(gateway, wecom, dify)["stream"]["content"] == "answered"
    assert errors(loop) == before + 1


def test_the_answer_queue_consumer_survives_a_failure(gateway, wecom, dify):
    """The failed take leaves its answer to the opener's lease (restarted by a poll); the next is taken at once."""
    streams = gateway.bot().streams
    streams.run_queued = fail_once(streams.run_queued)
    before = errors("wecom_ws_jobs")
    assert ask(gateway, wecom, dify, "first", "first answer")["stream"]["content"] == "first answer"
    assert ask(gateway, wecom, dify, "second", "second answer")["stream"]["content"] == "second answer"
    assert errors("wecom_ws_jobs") == before + 1


def test_the_stream_lease_keeper_survives_a_failure(gateway, wecom, dify, redis_client):
    """An answer longer than its lease completes once, on this process, though one renewal pass failed."""
    store = gateway.bot().streams.store
    store.leases.renew = fail_once(store.leases.renew)
    before = errors("stream_lease_keeper")
    gateway.start()
    assert wait_until(lambda: wecom.subscribed(BOT_ID) == 1, timeout=10)
    dify.script([d.message("slow "), d.sleep(5), *d.answer("answer")], match="slow")
    final = wecom.final(wecom.deliver_text(BOT_ID, "slow"), timeout=30)
    assert final is not None and "answer" in final["stream"]["content"]
    assert len(dify.chat_requests()) == 1
    assert errors("stream_lease_keeper") == before + 1
