"""A schedule's ticks across daylight-saving changes (pure logic: croniter in a time zone, no Redis).

A wall-clock time the clocks pass twice is a tick once for a job at a fixed time, as cron does; a job every N
minutes ticks at each real moment; a time the clocks skip ticks just after the jump. New York changes on
2026-03-08 (02:00 -> 03:00) and 2026-11-01 (02:00 -> 01:00)."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from config.settings import ScheduleSettings
from services.schedules.timetable import Timetable

ZONE = ZoneInfo("America/New_York")


def timetable(cron: str, zone: str = "America/New_York") -> Timetable:
    return Timetable(ScheduleSettings(name="report", cron=cron, timezone=zone, question="q", targets=("user:a",)))


def ticks(cron: str, start: datetime, count: int) -> list[str]:
    """The next `count` ticks from `start`, each asked from the one before (as the scheduler does)."""
    table, now, found = timetable(cron), start.timestamp(), []
    for _ in range(count):
        tick = table.next(now)
        found.append(tick.local.isoformat())
        now = tick.at
    return found


def test_a_daily_tick_in_the_hour_the_clocks_repeat_falls_once():
    assert ticks("30 1 * * *", datetime(2026, 10, 31, 12, tzinfo=ZONE), 3) == [
        "2026-11-01T01:30:00-04:00",
        "2026-11-02T01:30:00-05:00",
        "2026-11-03T01:30:00-05:00",
    ]


def test_a_job_every_half_hour_ticks_through_the_repeated_hour_in_real_time():
    assert ticks("*/30 * * * *", datetime(2026, 11, 1, 0, 50, tzinfo=ZONE), 5) == [
        "2026-11-01T01:00:00-04:00",
        "2026-11-01T01:30:00-04:00",
        "2026-11-01T01:00:00-05:00",
        "2026-11-01T01:30:00-05:00",
        "2026-11-01T02:00:00-05:00",
    ]


def test_a_tick_the_clocks_skip_falls_just_after_the_jump_once():
    assert ticks("30 2 * * *", datetime(2026, 3, 7, 12, tzinfo=ZONE), 3) == [
        "2026-03-08T03:00:00-04:00",
        "2026-03-09T02:30:00-04:00",
        "2026-03-10T02:30:00-04:00",
    ]


@pytest.mark.parametrize("fold", [0, 1])
def test_the_latest_tick_in_the_repeated_hour_is_its_first_pass(fold):
    table = timetable("30 1 * * *")
    now = datetime(2026, 11, 1, 1, 45, fold=fold, tzinfo=ZONE).timestamp()
    latest = table.latest(now)
    assert latest.local.isoformat() == "2026-11-01T01:30:00-04:00"
    assert table.next(latest.at).local.isoformat() == "2026-11-02T01:30:00-05:00"


def test_a_zone_without_daylight_saving_ticks_as_written():
    table = timetable("0 9 * * 1-5", "Asia/Shanghai")
    friday = datetime(2026, 11, 27, 9, 0, tzinfo=ZoneInfo("Asia/Shanghai")).timestamp()
    assert table.latest(friday + 30).at == friday
    assert table.next(friday).local.isoformat() == "2026-11-30T09:00:00+08:00"  # Monday
