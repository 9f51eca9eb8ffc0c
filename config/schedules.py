"""A bot's schedules as a bots file gives them (`[[bots.<name>.schedules]]`, docs/configuration.md "Schedules"):
each checked here against the bot it belongs to, one line per problem naming bot, schedule and key, so a bad
timetable is said at start-up (and a live reload that brings one keeps the last good file)."""

from __future__ import annotations

import re
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadDateError, croniter

from config.settings import BotSettings, ScheduleSettings
from config.tables import named_tables

SCHEDULE_KEYS = ("name", "cron", "timezone", "question", "inputs", "route", "to", "catch_up_seconds")
TARGET = re.compile(r"(webhook|chat|user|party|tag):([^\s|]{1,128})")
DEFAULT_CATCH_UP_SECONDS = 300
MOST_CATCH_UP_SECONDS = 24 * 3600  # a tick's record is kept two days (services/keys.py)
PLACEHOLDERS = re.compile(r"\{(?!date\}|datetime\})[^{}]*\}")  # a {...} that is neither {date} nor {datetime}


def load_schedules(tables, bot: BotSettings, where: str, problems: list[str]) -> tuple[ScheduleSettings, ...]:
    """The schedules of `bot` (its routes, webhooks, self-built app and WeCom mode known), in the file's order;
    their problems added to `problems`."""
    schedules: list[ScheduleSettings] = []
    for _, here, table in named_tables(tables, where, "schedule", problems):
        found: list[str] = []
        schedule = _schedule(table, bot, found)
        problems += [f"{here}: {problem}" for problem in found]
        if schedule is not None and not found:
            schedules.append(schedule)
    return tuple(schedules)


def _schedule(table: dict, bot: BotSettings, problems: list[str]) -> ScheduleSettings | None:
    problems += [
        f"unknown key {key!r} (a schedule gives {', '.join(SCHEDULE_KEYS)})"
        for key in table
        if key not in SCHEDULE_KEYS
    ]
    cron, zone, question = table.get("cron"), table.get("timezone", bot.quotas.timezone), table.get("question")
    if not isinstance(cron, str) or len(cron.split()) != 5 or not croniter.is_valid(cron):
        problems.append(f'cron must be five fields, such as "0 9 * * 1-5" (got {cron!r})')
    elif not _falls_due(cron):
        problems.append(f"cron names no day that comes, such as the 30th of February (got {cron!r})")
    try:
        ZoneInfo(zone)
    except (TypeError, ValueError, ZoneInfoNotFoundError):
        problems.append(f"timezone must be a time zone such as Asia/Shanghai (got {zone!r})")
    if not isinstance(question, str) or not question.strip():
        problems.append("question must be the text the backend is asked")
    elif PLACEHOLDERS.search(question):
        problems.append("question may name {date} and {datetime}, no other {...}")
    inputs = table.get("inputs", {})
    if not isinstance(inputs, dict) or not all(isinstance(v, (str, int, float)) for v in inputs.values()):
        problems.append('inputs must be a table of names and texts, such as { report_date = "{date}" }')
        inputs = {}
    route = table.get("route", "")
    if not isinstance(route, str) or (route and route not in {r.name for r in bot.routes}):
        problems.append(f"route names no route of this bot (got {route!r})")
    catch_up = table.get("catch_up_seconds", DEFAULT_CATCH_UP_SECONDS)
    if not isinstance(catch_up, int) or isinstance(catch_up, bool) or not 0 <= catch_up <= MOST_CATCH_UP_SECONDS:
        problems.append(f"catch_up_seconds must be 0 to {MOST_CATCH_UP_SECONDS} seconds")
    targets = table.get("to")
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        problems.append('to must list where the answer goes, such as ["webhook:ops", "user:zhangsan"]')
        targets = []
    for target in targets:
        problem = _target_problem(target, bot)
        if problem:
            problems.append(f"to {target!r}: {problem}")
    if len(set(targets)) != len(targets):
        problems.append("to names a target twice")
    if problems:
        return None
    return ScheduleSettings(
        name=table["name"],
        cron=" ".join(cron.split()),
        timezone=zone,
        question=question,
        targets=tuple(targets),
        inputs=tuple((str(k), str(v)) for k, v in inputs.items()),
        route=route,
        catch_up_seconds=catch_up,
    )


def _falls_due(cron: str) -> bool:
    """Does the cron have a next tick and a latest one? ("0 9 30 2 *" has neither: its every lookup would raise.)"""
    try:
        croniter(cron).get_next()
        croniter(cron).get_prev()
    except CroniterBadDateError:
        return False
    return True


def _target_problem(target: str, bot: BotSettings) -> str:
    """Why `target` is not one the bot can push to ("" when it is)."""
    matched = TARGET.fullmatch(target)
    if not matched:
        return "a target is webhook:<name>, chat:<chatid>, user:<userid>, party:<id> or tag:<id>"
    kind, value = matched.groups()
    if kind == "webhook" and value not in bot.wecom.webhook_urls():
        return "the bot names no webhook of that name ([bots.<name>.webhooks])"
    if kind == "chat" and not bot.long_connection:
        return "a chat is pushed to over the long connection: the bot is in callback mode (name a webhook instead)"
    if kind in ("user", "party", "tag") and not bot.wecom.app_corp_id:
        return "users, departments and tags are reached through the bot's self-built app (app_corp_id, ...)"
    return ""
