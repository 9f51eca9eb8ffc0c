"""Schedules: a bot's backend asked on a timetable, its answer pushed once to each target, across replicas.

Two callback-mode replicas (each with its scheduler's loop running, once a second, as in a serving process) on the
test Redis and MariaDB, the Dify stand-in, WeCom's HTTP APIs played by demo/wecom_api_standin.py. The replicas
share one clock the test moves (a schedule's minute is not waited for); everything else runs as it would: each
tick claimed once across the replicas, its answer made in a stream by the bot's stream core, pushed by one of them
to each target once, one audit row; a tick found past its catch-up skipped and counted; the replica running a slow
tick closed mid-answer (its lease lapses) and the tick taken over by the other, asked again and pushed once; a
failed or empty answer pushing nothing; `flask schedules run` and `list`; the bots file's problems, one line each."""

from __future__ import annotations

import threading
import time
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from config.bots import load_bots
from config.settings import SettingsError
from demo import dify_standin as d
from demo.wecom_api_standin import Sent, WeComApiStandIn
from services import metrics
from services.replication import Replication
from services.schedules import scheduler as scheduler_module
from services.schedules.ticks import MOST_TRIES, TickBook
from tests import test_audit
from tests.conftest import AES_KEY, DIFY_KEY, KEYS, TOKEN, wait_until
from tests.test_audit import rows

KEY = "ops-robot-key-for-schedules-0123"
CORP, SECRET, AGENT = "ww-corp-schedules", "app-secret-for-schedules", 1000002
ZONE = ZoneInfo("Asia/Shanghai")
NINE = datetime(2026, 11, 27, 9, 0, tzinfo=ZONE).timestamp()  # a Friday, 09:00
audit_url, engine = test_audit.audit_url, test_audit.engine  # the audit database's fixtures


class Clock:
    """The replicas' shared clock: now is `at` plus the real seconds since it was set."""

    def __init__(self, at: float):
        self.set(at)

    def set(self, at: float) -> None:
        self.at, self.since = at, time.monotonic()

    def __call__(self) -> float:
        return self.at + time.monotonic() - self.since


@pytest.fixture
def wecom_api():
    standin = WeComApiStandIn(keys=(KEY,), app=(CORP, SECRET)).start()
    yield standin
    standin.stop()


def bots_file(tmp_path, wecom_api, schedules: str) -> str:
    path = tmp_path / "bots.toml"
    path.write_text(
        f"""
[bots.assistant]
token = "{TOKEN}"
encoding_aes_key = "{AES_KEY}"
dify_api_key = "{DIFY_KEY}"
app_corp_id = "{CORP}"
app_agent_id = {AGENT}
app_secret = "{SECRET}"

[bots.assistant.webhooks]
ops = "{wecom_api.webhook_url(KEY)}"
{schedules}
"""
    )
    return str(path)


DAILY = """
[[bots.assistant.schedules]]
name = "daily"
cron = "0 9 * * 1-5"
timezone = "Asia/Shanghai"
question = "今天的销售日报 {date}"
inputs = { report_date = "{date}" }
to = ["webhook:ops", "user:zhangsan", "party:2"]
catch_up_seconds = 120
"""


@pytest.fixture
def start(tmp_path, make_app, wecom_api, audit_url, monkeypatch):
    """`start(schedules, at=...)`: two replicas of the bots file with `schedules`, their clock at `at`. Their
    schedulers stop before the clock is put back: one that stepped on the real clock first found that test's tick
    hours late, recorded it skipped, and the next test's tick of that name was never fired (seen under load)."""
    made = []

    def started(schedules: str = DAILY, at: float = NINE - 5, **changes):
        clock = Clock(at)
        monkeypatch.setattr(scheduler_module, "wall_clock", clock)
        path = bots_file(tmp_path, wecom_api, schedules)
        for name in "ab":
            app = make_app(
                bots_file=path,
                bot_name="",
                replica_id=f"replica-{name}",
                wecom_api_base=wecom_api.url,
                database_url=audit_url,
                **changes,
            )
            made.append(app)
        return clock, made[-2:]

    yield started
    for app in made:
        app.extensions["gateway"].scheduler.stop()


def runs(outcome: str, schedule: str = "daily") -> float:
    return metrics.SCHEDULE_RUNS.labels("assistant", schedule, outcome)._value.get()


def test_a_tick_is_answered_once_and_pushed_once_to_each_target_across_replicas(start, dify, wecom_api, engine):
    dify.script(d.answer("本日销售额 120 万，环比 +8%。"))
    pushed = runs("pushed")
    clock, _ = start()
    assert wait_until(lambda: runs("pushed") == pushed + 1, timeout=15)
    assert len(dify.chat_requests()) == 1
    request = dify.chat_requests()[0]
    assert request["query"] == "今天的销售日报 2026-11-27"
    assert request["inputs"]["report_date"] == "2026-11-27"
    assert request["user"] == "schedule:assistant:daily"
    assert wecom_api.to(KEY) == [{"msgtype": "markdown", "markdown": {"content": "本日销售额 120 万，环比 +8%。"}}]
    assert [(m["touser"], m["toparty"]) for m in wecom_api.app_sent] == [("zhangsan", "2")]
    time.sleep(2.5)  # both replicas' loops go on looking: nothing more is asked or sent
    assert len(dify.chat_requests()) == 1 and len(wecom_api.to(KEY)) == 1 and len(wecom_api.app_sent) == 1
    assert wait_until(lambda: len(rows(engine, kind="schedule")) == 1, timeout=10)
    row = rows(engine, kind="schedule")[0]
    assert row["outcome"] == "pushed" and row["userid"] == "schedule:assistant:daily"
    assert row["question"] == "今天的销售日报 2026-11-27" and row["answer"] == "本日销售额 120 万，环比 +8%。"
    assert row["chatid"] == "webhook:ops=sent user:zhangsan,party:2=sent"
    assert rows(engine, kind="message") == []  # the tick's stream is no message of its own


def test_each_tick_of_an_every_minute_schedule_is_pushed_once(start, dify, wecom_api):
    every_minute = DAILY.replace('"0 9 * * 1-5"', '"* * * * *"').replace(', "user:zhangsan", "party:2"', "")
    dify.script(d.answer("tick report"), times=None)
    clock, _ = start(every_minute, at=NINE - 2)
    for minute in range(3):
        if minute:
            clock.set(NINE + 60 * minute - 2)
        assert wait_until(lambda n=minute: len(wecom_api.to(KEY)) == n + 1, timeout=15), minute
    time.sleep(2.5)  # (09:02:05 at most: the next tick is 09:03)
    assert len(wecom_api.to(KEY)) == 3 and len(dify.chat_requests()) == 3
    assert len({r["inputs"]["report_date"] for r in dify.chat_requests()}) == 1  # the same day, three ticks


def test_a_tick_found_past_its_catch_up_is_skipped_and_said(start, dify, wecom_api, engine):
    clock, _ = start(at=NINE - 90)  # seen before 09:00: its ticks count from then on
    time.sleep(1.5)
    skipped = runs("skipped")
    clock.set(NINE + 600)  # no replica looked between 09:00 and 09:10 (catch-up: 120 s)
    assert wait_until(lambda: runs("skipped") == skipped + 1, timeout=10)
    time.sleep(1.5)
    assert runs("skipped") == skipped + 1 and dify.chat_requests() == [] and wecom_api.to(KEY) == []
    assert wait_until(lambda: len(rows(engine, kind="schedule")) == 1, timeout=10)
    row = rows(engine, kind="schedule")[0]
    assert row["outcome"] == "skipped" and "past catch_up_seconds" in row["answer"]


def test_a_schedule_new_to_the_file_is_not_late_for_the_ticks_before_it(start, dify, wecom_api):
    skipped, pushed = runs("skipped"), runs("pushed")
    start(at=NINE + 3 * 3600)  # first seen at noon: 09:00 was before its time
    time.sleep(2.5)
    assert runs("skipped") == skipped and runs("pushed") == pushed and dify.chat_requests() == []


def test_the_replica_running_a_slow_tick_dies_and_the_other_pushes_it_once(start, dify, wecom_api):
    dify.script(d.answer("first try, never finished", pieces=5, delay=2.0))
    dify.script(d.answer("second try's whole report"))
    clock, (a, b) = start(DAILY.replace(', "user:zhangsan", "party:2"', ""))
    assert wait_until(lambda: len(dify.chat_requests()) == 1, timeout=15)
    runner = next(app for app in (a, b) if app.extensions["gateway"].runner.active_count)
    other = b if runner is a else a
    gateway = runner.extensions["gateway"]
    gateway.scheduler.stop()
    gateway.runner.cancel(list(gateway.runner._active))  # as a process gone: its lease stops being renewed
    assert wait_until(lambda: len(wecom_api.to(KEY)) == 1, timeout=30)
    time.sleep(2.5)
    assert wecom_api.to(KEY) == [{"msgtype": "markdown", "markdown": {"content": "second try's whole report"}}]
    assert len(dify.chat_requests()) == 2
    assert other.extensions["gateway"].runner.active_count == 0


def test_a_daily_tick_in_the_hour_the_clocks_repeat_is_pushed_once(start, dify, wecom_api):
    """New York's clocks go back from 02:00 to 01:00 on 2026-11-01: 01:30 comes twice, an hour apart; a report due
    at 01:30 is asked and pushed once, as cron runs it (before, twice)."""
    york = ZoneInfo("America/New_York")
    nightly = DAILY.replace('"0 9 * * 1-5"', '"30 1 * * *"').replace('"Asia/Shanghai"', '"America/New_York"')
    dify.script(d.answer("nightly report"), times=None)
    first = datetime(2026, 11, 1, 1, 30, tzinfo=york).timestamp()
    clock, _ = start(nightly.replace(', "user:zhangsan", "party:2"', ""), at=first - 3)
    assert wait_until(lambda: len(wecom_api.to(KEY)) == 1, timeout=15)
    again = datetime(2026, 11, 1, 1, 30, fold=1, tzinfo=york).timestamp()
    assert again == first + 3600
    clock.set(again - 3)
    time.sleep(5)
    assert len(wecom_api.to(KEY)) == 1 and len(dify.chat_requests()) == 1


def test_a_failed_or_empty_answer_pushes_nothing_and_says_why(start, dify, wecom_api, engine):
    dify.script([d.error("provider_not_initialize", "no model", 400)])
    failed = runs("failed")
    start(DAILY.replace(', "user:zhangsan", "party:2"', ""))
    assert wait_until(lambda: runs("failed") == failed + 1, timeout=15)
    time.sleep(1.5)
    assert wecom_api.to(KEY) == []
    assert wait_until(lambda: len(rows(engine, kind="schedule")) == 1, timeout=10)
    row = rows(engine, kind="schedule")[0]
    assert row["outcome"] == "failed" and row["answer"].startswith("the answer failed")


@pytest.mark.parametrize(
    ("failure", "calls"),
    [
        pytest.param([d.message("half a rep"), d.cut()], 1, id="cut mid-answer"),
        # refused each time its client asked (DIFY_MAX_RETRIES 2 here), with the code in Dify's body, not the status
        pytest.param([d.http_error(503, "unavailable")], 3, id="503 with a code"),
        # an OpenAI-compatible server's word for busy, mid-stream
        pytest.param([d.message("half"), d.error("rate_limit_error", "slow down", 429)], 1, id="busy mid-stream"),
    ],
)
def test_a_tick_whose_answer_broke_on_the_way_is_asked_again_and_pushed_once(
    start, dify, wecom_api, monkeypatch, failure, calls
):
    """Dify's connection breaks mid-answer, or Dify is away or busy: nobody saw that answer, so the tick asks again
    (after ASK_AGAIN_AFTER_SECONDS, within its catch-up, at most MOST_TRIES tries in all) and pushes the new one,
    once; before, the report was failed and pushed nothing. A 503 whose body named a code of Dify's, and a busy error
    in an OpenAI server's words, were taken for failures of the question (their codes were read, not what they
    mean). A failure of the question itself is not asked again (the test below)."""
    monkeypatch.setattr(scheduler_module, "ASK_AGAIN_AFTER_SECONDS", 0.5)
    dify.script(failure, times=calls)
    dify.script(d.answer("the whole report"))
    retried = runs("pushed")
    start(DAILY.replace(', "user:zhangsan", "party:2"', ""))
    assert wait_until(lambda: runs("pushed") == retried + 1, timeout=20)
    time.sleep(2)
    assert wecom_api.to(KEY) == [{"msgtype": "markdown", "markdown": {"content": "the whole report"}}]
    assert len(dify.chat_requests()) == calls + 1


def test_a_tick_whose_answer_keeps_breaking_fails_after_its_tries(start, dify, wecom_api, monkeypatch):
    monkeypatch.setattr(scheduler_module, "ASK_AGAIN_AFTER_SECONDS", 0.2)
    dify.script([d.message("never whole"), d.cut()], times=None)
    failed = runs("failed")
    start(DAILY.replace(', "user:zhangsan", "party:2"', ""))
    assert wait_until(lambda: runs("failed") == failed + 1, timeout=30)
    time.sleep(1.5)
    assert wecom_api.to(KEY) == [] and len(dify.chat_requests()) == MOST_TRIES


def test_schedules_run_and_list_from_the_command_line(start, dify, wecom_api):
    dify.script(d.answer("report on demand"))
    _, (a, _) = start(at=NINE + 3600)
    runner = a.test_cli_runner()
    ran = runner.invoke(args=["schedules", "run", "daily"])
    assert ran.exit_code == 0, ran.output
    assert "webhook:ops: sent" in ran.output and ran.output.strip().endswith(": pushed")
    assert wecom_api.to(KEY) == [{"msgtype": "markdown", "markdown": {"content": "report on demand"}}]
    listed = runner.invoke(args=["schedules", "list"])
    assert listed.exit_code == 0 and "daily" in listed.output and "2026-11-30 09:00" in listed.output
    assert runner.invoke(args=["schedules", "run", "nope"]).exit_code != 0


def test_a_long_answer_goes_to_a_webhook_in_parts_each_once(start, dify, wecom_api):
    lines = [f"第 {n} 行：" + "销售数据" * 40 for n in range(60)]  # about 30 KB
    dify.script(d.answer("\n".join(lines)))
    start(DAILY.replace(', "user:zhangsan", "party:2"', ""))
    assert wait_until(lambda: runs("pushed") and len(wecom_api.to(KEY)) >= 8, timeout=20)
    time.sleep(1.5)
    parts = [m["markdown"]["content"] for m in wecom_api.to(KEY)]
    assert "".join(parts) == "\n".join(lines)
    assert all(len(part.encode()) <= 4096 for part in parts)


@pytest.mark.parametrize(
    "schedule, problem",
    [
        ('name = "x"\ncron = "0 9 * *"\nquestion = "q"\nto = ["webhook:ops"]', "cron must be five fields"),
        ('name = "x"\ncron = "0 9 30 2 *"\nquestion = "q"\nto = ["webhook:ops"]', "no day that comes"),
        ('name = "x"\ncron = "0 9 * * *"\ntimezone = "Mars/Base"\nquestion = "q"\nto = ["webhook:ops"]', "timezone"),
        ('name = "x"\ncron = "0 9 * * *"\nquestion = "q"\nto = ["webhook:nope"]', "names no webhook"),
        ('name = "x"\ncron = "0 9 * * *"\nquestion = "q"\nto = ["chat:wrk1"]', "callback mode"),
        ('name = "x"\ncron = "0 9 * * *"\nquestion = "q {when}"\nto = ["webhook:ops"]', "{date} and {datetime}"),
        ('name = "x"\ncron = "0 9 * * *"\nquestion = "q"\nroute = "sales"\nto = ["webhook:ops"]', "no route"),
        ('name = "x"\ncron = "0 9 * * *"\nquestion = "q"\nto = []', "to must list"),
    ],
)
def test_a_bad_schedule_is_one_line_naming_bot_schedule_and_key(tmp_path, wecom_api, settings, schedule, problem):
    path = bots_file(tmp_path, wecom_api, f"[[bots.assistant.schedules]]\n{schedule}\n")
    with pytest.raises(SettingsError) as raised:
        load_bots(settings.replace(bots_file=path, bot_name=""))
    assert any(p.startswith("BOTS_FILE bots.assistant schedule x:") and problem in p for p in raised.value.problems)


def test_ticks_are_claimed_once_by_processes_racing_for_them(start, dify, wecom_api):
    """Many processes' schedulers stepping at the same instant: one claim per tick."""
    every_minute = DAILY.replace('"0 9 * * 1-5"', '"* * * * *"').replace(', "user:zhangsan", "party:2"', "")
    dify.script(d.answer("raced"), times=None)
    clock, apps = start(every_minute, at=NINE - 1)
    schedulers = [app.extensions["gateway"].scheduler for app in apps]
    for scheduler in schedulers:
        scheduler.stop()
    clock.set(NINE + 1)
    go = threading.Barrier(len(schedulers) * 4)

    def race(scheduler):
        go.wait()
        scheduler.step()

    threads = [threading.Thread(target=race, args=(s,)) for s in schedulers * 4]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    def followed() -> bool:  # every process follows the open tick, as its loop would
        for scheduler in schedulers:
            scheduler.step()
        time.sleep(0.2)
        return len(wecom_api.to(KEY)) >= 1

    assert wait_until(followed, timeout=15)
    for _ in range(3):
        followed()
    assert len(wecom_api.to(KEY)) == 1 and len(dify.chat_requests()) == 1


def test_a_try_that_never_named_its_stream_is_taken_over_once_by_processes_racing(redis_client):
    """A try whose process died before it named its stream (or whose naming met Redis away) reads stream '' before a
    take-over and after it, until the new try names its own: the try's number fences it, so of the processes that
    read it at once one takes it over; the others find it taken. (Before, each took it over in turn, and the third
    gave the tick up as failed while two tries ran: a 10-minute one-server run of seed 29.)"""

    def book(owner: str) -> TickBook:
        return TickBook(redis_client, KEYS, owner, Replication(redis_client))

    tick = int(NINE)
    assert book("a").claim("daily", tick)
    seen = book("a").state("daily", tick)
    assert (seen.status, seen.tries, seen.stream) == ("running", 1, "")
    assert [book(owner).take_over("daily", tick, seen) for owner in "bcd"] == ["2", None, None]
    assert book("a").state("daily", tick).owner == "b"


def test_a_try_taken_over_after_its_answer_was_read_is_not_pushed_nor_settled_for_it(redis_client):
    """A process reads a try as its stream's answer ended (the take-over ends the old stream, as the user's stop
    would), while another takes the try over: the reader's push of that ended answer claims nothing, so it neither
    settles the tick as failed nor keeps the new try from naming its stream. (Before, the push was claimed on the
    tick alone: the tick was settled `failed (stopped)`, and the new try was given up, in a CI run of
    tests/e2e/test_schedules_e2e.py.)"""

    def book(owner: str) -> TickBook:
        return TickBook(redis_client, KEYS, owner, Replication(redis_client))

    tick = int(NINE)
    assert book("a").claim("daily", tick) and book("a").name_stream("daily", tick, "first")
    seen = book("b").state("daily", tick)  # b looks at the try, then reads its stream: ended by c's take-over
    assert book("c").take_over("daily", tick, seen) == "2"
    assert not book("b").claim_push("daily", tick, seen.stream)
    assert book("c").name_stream("daily", tick, "second")
    assert book("c").state("daily", tick).status == "running"
    assert book("c").claim_push("daily", tick, "second")  # the new try's answer is pushed as ever


def test_a_tick_runs_though_redis_lost_the_schedules_record_meanwhile(start, dify, wecom_api, redis_client):
    """A failover (or a flush) loses the record of the schedule's latest tick while the replicas watch it: the tick
    they waited for still runs, once (a schedule is new only to a process that never saw it)."""
    dify.script(d.answer("still on time"))
    start(DAILY.replace(', "user:zhangsan", "party:2"', ""), at=NINE - 4)
    time.sleep(1.5)  # the replicas have seen the schedule (its latest tick recorded)
    redis_client.flushdb()
    assert wait_until(lambda: len(wecom_api.to(KEY)) == 1, timeout=15)
    time.sleep(1.5)
    assert len(wecom_api.to(KEY)) == 1 and len(dify.chat_requests()) == 1


def test_a_schedule_added_to_the_bots_file_runs_on_every_replica_without_a_restart(start, dify, wecom_api, tmp_path):
    dify.script(d.answer("the half-hour report"))
    clock, apps = start(at=NINE + 3600)  # 10:00
    half_hourly = (
        '[[bots.assistant.schedules]]\nname = "half"\ncron = "30 * * * *"\nquestion = "q"\nto = ["webhook:ops"]'
    )
    bots_file(tmp_path, wecom_api, DAILY + half_hourly)
    served = [app.extensions["gateway"].scheduler for app in apps]
    assert wait_until(lambda: all("half" in s.bots["assistant"].timetables for s in served), timeout=20)
    clock.set(NINE + 3600 + 30 * 60 - 2)  # 10:29:58
    assert wait_until(lambda: len(wecom_api.to(KEY)) == 1, timeout=15)
    time.sleep(1.5)
    assert wecom_api.to(KEY) == [{"msgtype": "markdown", "markdown": {"content": "the half-hour report"}}]


def test_a_try_whose_answer_just_ended_is_not_taken_over(start, dify, wecom_api, redis_client):
    """A process looking at a tick between its answer's end and the push sees an ended try as alive (the next look
    pushes it), never as lost: bench/schedules.py once saw a tick asked twice so, its answer ended meanwhile."""
    dify.script(d.answer("once"))
    _, (a, _) = start(DAILY.replace(', "user:zhangsan", "party:2"', ""))
    assert wait_until(lambda: len(wecom_api.to(KEY)) == 1, timeout=15)
    scheduled = a.extensions["gateway"].scheduler.bots["assistant"]
    assert wait_until(lambda: scheduled.book.state("daily", int(NINE)).status == "pushed", timeout=5)
    state = scheduled.book.state("daily", int(NINE))
    assert scheduled.answers.alive(state.stream, scheduled.answers.record(state.stream))
    redis_client.delete(f"bot:assistant:dify_stream:{{{state.stream}}}")
    gone = scheduled.answers.record(state.stream)
    assert not scheduled.answers.alive(state.stream, gone)  # (a stream gone is lost: its tick is asked again)


def test_a_tick_waits_for_its_webhooks_minute_then_pushes_once(start, dify, wecom_api, redis_client):
    from services.push.webhooks import WebhookMessage

    dify.script(d.answer("after the wait"))
    _, (a, _) = start(DAILY.replace(', "user:zhangsan", "party:2"', ""))
    scheduled = a.extensions["gateway"].scheduler.bots["assistant"]
    for number in range(20):  # the robot's minute is full (WeCom takes 20)
        scheduled.pushers.webhooks.push("ops", WebhookMessage(f"alert {number}", False))
    assert wait_until(lambda: getattr(scheduled.book.state("daily", int(NINE)), "status", "") == "pushing", 15)
    time.sleep(1.5)
    assert len(wecom_api.to(KEY)) == 20  # held back, not refused by WeCom
    # the minute has passed, for the gateway's count and WeCom's
    redis_client.delete("bot:assistant:webhook_sends:ops")
    wecom_api.sent[:] = [Sent(sent.key, sent.body, sent.at - 60) for sent in wecom_api.sent]
    assert wait_until(lambda: len(wecom_api.to(KEY)) == 21, timeout=10)
    assert wait_until(lambda: scheduled.book.state("daily", int(NINE)).status == "pushed", timeout=5)
    assert wecom_api.to(KEY)[-1] == {"msgtype": "markdown", "markdown": {"content": "after the wait"}}


def test_a_tick_whose_webhook_could_not_be_reached_is_pushed_once_it_can_be(start, dify, wecom_api, monkeypatch):
    """WeCom cannot be reached when the tick's answer is ready: its push sent nothing, so it is tried again (every
    SEND_AGAIN_SECONDS, within WAIT_LIMIT_SECONDS of the tick), with the same Idempotency-Key, and goes out once."""
    monkeypatch.setattr(scheduler_module, "SEND_AGAIN_SECONDS", 1.0)
    failed_before = metrics.PUSHES.labels("assistant", "failed")._value.get()
    dify.script(d.answer("sent once WeCom is back"))
    wecom_api.stop()
    _, (a, _) = start(DAILY.replace(', "user:zhangsan", "party:2"', ""))
    scheduled = a.extensions["gateway"].scheduler.bots["assistant"]
    assert wait_until(lambda: metrics.PUSHES.labels("assistant", "failed")._value.get() >= failed_before + 2, 20)
    assert scheduled.book.state("daily", int(NINE)).status == "pushing"  # not given up
    wecom_api.start()
    assert wait_until(lambda: scheduled.book.state("daily", int(NINE)).status == "pushed", timeout=15)
    assert wecom_api.to(KEY) == [{"msgtype": "markdown", "markdown": {"content": "sent once WeCom is back"}}]


def test_a_tick_is_claimed_and_pushed_once_on_every_topology(topology, start, dify, wecom_api):
    """On Sentinel and Cluster the claims wait for a replica (a claim a failover lost would run the tick twice): a
    bot's schedule keys share one slot, and its claims go in one round trip with their WAIT."""
    dify.script(d.answer("on every topology"))
    start(DAILY.replace(', "user:zhangsan", "party:2"', ""), **topology.settings)
    assert wait_until(lambda: len(wecom_api.to(KEY)) == 1, timeout=20)
    time.sleep(1.5)
    assert len(wecom_api.to(KEY)) == 1 and len(dify.chat_requests()) == 1
    client = topology.client()
    assert client.hget("bot:assistant:schedule:{bot:assistant:schedules}:daily:" + str(int(NINE)), "status") == "pushed"
    client.close()


class _Book:
    """A stand-in for a bot's tick book (pure logic): it lists no open tick, or raises something unexpected."""

    def __init__(self, fails: bool):
        self.fails, self.looked = fails, 0

    def open_ticks(self) -> list:
        self.looked += 1
        if self.fails:
            raise RuntimeError("a surprise")
        return []


def test_a_surprise_in_one_bots_step_holds_back_no_other(caplog):
    books = {"broken": _Book(fails=True), "sound": _Book(fails=False)}
    scheduler = scheduler_module.Scheduler(clock=lambda: NINE)
    scheduler.bots = {
        name: scheduler_module.ScheduledBot(name, {}, book, None, None, None, 30.0) for name, book in books.items()
    }
    errors = metrics.BACKGROUND_ERRORS.labels("schedules")
    before = errors._value.get()
    scheduler.step()
    assert books["sound"].looked == 1  # in the same step, not a second later
    assert errors._value.get() == before + 1
    assert "background loop schedules failed unexpectedly" in caplog.text
