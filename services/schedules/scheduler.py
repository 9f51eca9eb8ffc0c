"""Schedules: a bot's backend asked on a timetable, its answer pushed (docs/operations.md, "Schedules"). Every
serving process runs one Scheduler, which once a second fires the ticks that fell due (each claimed once across
processes: ticks.py; one later than `catch_up_seconds` is skipped) and follows the ticks not yet settled, whichever
process started them: a try whose process died is tried again (at most MOST_TRIES), and an answer that ended is
pushed to each target once (targets.py).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial

from services import metrics
from services.audit.queue import AuditQueue
from services.audit.rows import AuditRow, row_of_stream
from services.loops import guarded, run_until
from services.push.pushes import OverQuota
from services.redis_conn import REDIS_FAILURES
from services.schedules.answers import TickAnswers, has_ended
from services.schedules.targets import Pushers, SentNothing, groups, push_group
from services.schedules.ticks import (
    FAILED,
    MOST_TRIES,
    PARTIAL,
    PUSHED,
    PUSHING,
    RUNNING,
    SETTLED,
    TickBook,
    TickState,
)
from services.schedules.timetable import Timetable
from services.streams.life import SCHEDULE
from services.streams.record import DONE, F

logger = logging.getLogger(__name__)

STEP_SECONDS = 1.0
STEP_OFFSET_SECONDS = 0.005  # a step comes this long after a whole second
STOP_WAIT_SECONDS = 5.0  # how long a stopping scheduler waits for its step under way (a Redis round trip or a few)
WAIT_LIMIT_SECONDS = 600  # a target over WeCom's limit, or not reached, is tried again this long past its tick
SEND_AGAIN_SECONDS = 30.0  # how long a target WeCom could not be reached for waits before it is tried again
TAKEN_OVER_NOTE = "(this try's process stopped; the schedule asked again)"
# An answer that failed on the way, not on the question (the backend's link broke or timed out, it was busy or
# away, Redis was), is asked again this long after it ended, while its tick is within catch_up_seconds and has had
# fewer than MOST_TRIES tries: nobody has seen it, so a new try costs a backend call and nothing else. Codes as the
# stream's record keeps them (services/transport/errors.py, record_code): a refusal by its HTTP status.
ASK_AGAIN_AFTER_SECONDS = 20.0
PASSING_FAILURES = (
    "stream_cut",
    "timeout",
    "connect_error",
    "redis_unavailable",
    "too_many_requests",
    "http_429",
    "http_5",
)


@dataclass
class ScheduledBot:
    """What one bot's schedules run with."""

    name: str
    timetables: dict[str, Timetable]  # by schedule name
    book: TickBook
    answers: TickAnswers
    pushers: Pushers
    audit: AuditQueue | None
    lease_seconds: float  # a try whose stream has no lease this long after its claim is taken over
    due: dict[str, int] = field(default_factory=dict)  # each schedule's next tick, as this process knows it


def wall_clock() -> float:
    """Now, in epoch seconds: what a Scheduler's clock reads unless it is given another (tests move it)."""
    return time.time()


class Scheduler:
    """This process's schedules, of every bot served (`serve`)."""

    def __init__(self, clock: Callable[[], float] | None = None):
        self.clock = clock or (lambda: wall_clock())  # (looked up at each call)
        self.bots: dict[str, ScheduledBot] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._stepping = threading.Lock()
        self._send_again_at: dict[tuple[str, str, int, str], float] = {}  # a target that sent nothing: when to try

    def serve(self, bots: dict[str, ScheduledBot]) -> None:
        """The bots whose schedules run from now on (a bots file changed: a bot's schedules as the file says, each
        schedule's next tick kept where its timetable did not change)."""
        for name, bot in bots.items():
            for schedule in bot.timetables:
                metrics.initialise_schedule(name, schedule)
            before = self.bots.get(name)
            if before is not None:
                bot.due = {
                    schedule: due
                    for schedule, due in before.due.items()
                    if schedule in bot.timetables
                    and bot.timetables[schedule].schedule == before.timetables[schedule].schedule
                }
        self.bots = bots

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="schedules", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """No step starts after this, and the one under way is given up to STOP_WAIT_SECONDS to end: a process that
        drains leaves no step half made behind it (and a test's clock, put back after, is read by none)."""
        self._stop.set()
        if self._stepping.acquire(timeout=STOP_WAIT_SECONDS):
            self._stepping.release()

    def _loop(self) -> None:
        run_until(self._stop, self._step_and_wait, "schedules")

    def _step_and_wait(self) -> None:
        """A step, then a wait until just past the next whole second (ticks fall on whole minutes: a tick is
        claimed within milliseconds of its time, not up to a second later)."""
        self.step()
        now = self.clock()
        self._stop.wait(max(0.05, math.floor(now) + STEP_SECONDS + STEP_OFFSET_SECONDS - now))

    def step(self) -> None:
        """Fire the ticks due and follow the open ones, for every bot: one bot's Redis away, or a surprise in its
        step (logged with its traceback and counted), holds back no other. One step at a time in a process (what it
        knows of each schedule's next tick is its own)."""
        with self._stepping:
            for bot in list(self.bots.values()):
                guarded(partial(self._step_bot, bot), "schedules", pause=0.0)
            if self._send_again_at:  # (a tick another process pushed leaves its entry here)
                stale = time.monotonic() - WAIT_LIMIT_SECONDS
                self._send_again_at = {k: at for k, at in self._send_again_at.items() if at > stale}

    def _step_bot(self, bot: ScheduledBot) -> None:
        try:
            self._fire(bot, self.clock())
            self._follow(bot, self.clock())
        except REDIS_FAILURES as exc:
            logger.warning("schedules of bot %s wait for Redis (%s)", bot.name, type(exc).__name__)

    # --- firing ------------------------------------------------------------------------------------------------

    def _fire(self, bot: ScheduledBot, now: float) -> None:
        due = [name for name in bot.timetables if bot.due.get(name, 0) <= now]
        if not due or not bot.answers.has_room():
            return
        last = bot.book.last(due)
        wanted: list[tuple[str, int, str]] = []
        for name in due:
            timetable, waited_for = bot.timetables[name], bot.due.get(name)
            watched = waited_for is not None  # this process knew the schedule before the tick (its record may be lost)
            # the tick waited for, unless a later one fell since (ticks are a minute apart at least)
            tick = timetable.at(waited_for) if watched and 0 <= now - waited_for < 60 else timetable.latest(now)
            bot.due[name] = timetable.next(tick.at).at
            late = now - tick.at
            if last[name] is None and not watched:  # new: its ticks count from the next one on
                bot.book.seen(name, tick.at)
                last[name] = tick.at
            elif last[name] is None:
                last[name] = tick.at - 1
            if tick.at <= last[name]:
                continue
            catch_up = timetable.schedule.catch_up_seconds
            why = f"found {late:.0f} s late, past catch_up_seconds ({catch_up})" if late > catch_up else ""
            wanted.append((name, tick.at, why))
        claimed = bot.book.claim_each(wanted)  # (one round trip for every tick due: a thousand at 9:00 sharp)
        for (name, tick, why), mine in zip(wanted, claimed, strict=True):
            if mine and why:
                logger.warning("schedule %s of bot %s: tick %s skipped: %s", name, bot.name, tick, why)
                self._record(bot, name, tick, "skipped", why, {}, {}, "")
            elif mine:
                self._start_try(bot, name, tick, 1)

    def run_now(self, bot_name: str, schedule: str) -> int:
        """One tick of `schedule` now, as its timetable would run it (`flask schedules run`): claimed, started here,
        followed by this process to its end; its tick (epoch second)."""
        bot = self.bots[bot_name]
        if schedule not in bot.timetables:
            raise KeyError(schedule)
        tick = int(self.clock())
        while not bot.book.claim(schedule, tick, by_hand=True):
            tick += 1
        self._start_try(bot, schedule, tick, 1)
        return tick

    def _start_try(self, bot: ScheduledBot, name: str, tick: int, tries: int) -> None:
        timetable = bot.timetables[name]
        at = timetable.at(tick)
        question, inputs = timetable.question(at), timetable.inputs(at)
        stream = bot.answers.start(name, tick, tries, question, inputs, timetable.schedule.route)
        if not bot.book.name_stream(name, tick, stream):
            bot.answers.give_up(stream, TAKEN_OVER_NOTE)  # another process took the try over meanwhile
            return
        logger.info(
            "schedule %s of bot %s: tick %s, try %d, answering in stream %s", name, bot.name, tick, tries, stream
        )

    # --- following ---------------------------------------------------------------------------------------------

    def _follow(self, bot: ScheduledBot, now: float) -> None:
        for name, tick in bot.book.open_ticks():
            self._follow_tick(bot, name, tick, now)

    def _follow_tick(self, bot: ScheduledBot, name: str, tick: int, now: float) -> None:
        """Take the tick one step on: its ended answer pushed, its lost try taken over."""
        state = bot.book.state(name, tick)
        if state is None or state.status in SETTLED or name not in bot.timetables:
            if state is not None and state.status not in SETTLED:
                logger.warning("schedule %s of bot %s left the bots file: tick %s not followed", name, bot.name, tick)
            bot.book.forget_open(name, tick)
            return
        record = bot.answers.record(state.stream)  # (read once a look)
        if state.status == RUNNING and has_ended(record) and _failed_in_passing(record):
            self._ask_again(bot, name, tick, state, record, now)
        elif state.status == PUSHING or (state.status == RUNNING and has_ended(record)):
            self._push(bot, name, tick, state, record, now)
        elif state.status == RUNNING and not self._alive(bot, state, record, now):
            self._take_over(bot, name, tick, state)

    def settle(self, bot_name: str, name: str, tick: int, timeout: float) -> TickState | None:
        """Follow one tick here until it is settled or `timeout` seconds pass (`flask schedules run`); its state."""
        bot, deadline = self.bots[bot_name], time.monotonic() + timeout
        while True:
            with self._stepping:
                self._follow_tick(bot, name, tick, self.clock())
            state = bot.book.state(name, tick)
            if state is None or state.status in SETTLED or time.monotonic() > deadline:
                return state
            time.sleep(0.2)

    def report(self) -> list[dict[str, str]]:
        """Each schedule of each bot: its timetable, its next tick, its latest tick and what became of it."""
        now, rows = self.clock(), []
        for bot in self.bots.values():
            last = bot.book.last(list(bot.timetables))
            for name, timetable in bot.timetables.items():
                schedule = timetable.schedule
                state = bot.book.state(name, last[name]) if last[name] else None
                outcome = f"{state.status}{f' ({state.why})' if state.why else ''}" if state else "none yet"
                rows.append(
                    {
                        "bot": bot.name,
                        "schedule": name,
                        "cron": f"{schedule.cron} {schedule.timezone}",
                        "next": _local(timetable.next(now).local),
                        "last": _local(timetable.at(last[name]).local) if state else "",
                        "outcome": outcome,
                    }
                )
        return rows

    def _alive(self, bot: ScheduledBot, state: TickState, record: dict[str, str], now: float) -> bool:
        """Whether the tick's try still runs somewhere: in this process, or with its stream's lease held (a try not
        yet given a stream: within the lease of its claim)."""
        if not state.stream:
            return now - state.claimed_at < bot.lease_seconds
        return bot.answers.runs_here(state.stream) or bot.answers.alive(state.stream, record)

    def _take_over(self, bot: ScheduledBot, name: str, tick: int, state: TickState) -> None:
        if not bot.answers.has_room():
            return
        taken = bot.book.take_over(name, tick, state)
        if taken is None:
            return
        bot.answers.give_up(state.stream, TAKEN_OVER_NOTE)
        if taken == FAILED:
            logger.error(
                "schedule %s of bot %s: tick %s failed: its processes died %d times", name, bot.name, tick, state.tries
            )
            self._record(bot, name, tick, FAILED, "its processes died", {}, {}, "")
            bot.book.forget_open(name, tick)
            return
        logger.warning("schedule %s of bot %s: tick %s taken over (its try's process stopped)", name, bot.name, tick)
        self._start_try(bot, name, tick, int(taken))

    def _ask_again(self, bot: ScheduledBot, name: str, tick: int, state: TickState, record: dict, now: float) -> None:
        """The try's answer failed in passing: a new try once ASK_AGAIN_AFTER_SECONDS have passed (one process takes
        it, as it takes over a dead try's), or, past the tick's catch-up or its tries, the failure pushed as it is."""
        if state.tries >= MOST_TRIES or now - tick > bot.timetables[name].schedule.catch_up_seconds:
            self._push(bot, name, tick, state, record, now)
            return
        if time.time() - float(record.get(F.finished_at) or 0) < ASK_AGAIN_AFTER_SECONDS or not bot.answers.has_room():
            return
        taken = bot.book.take_over(name, tick, state)
        if taken is None or taken == FAILED:  # (another process asked again first; FAILED: past MOST_TRIES)
            return
        logger.warning(
            "schedule %s of bot %s: tick %s asked again (try %s): the answer failed (%s)",
            name,
            bot.name,
            tick,
            taken,
            record.get(F.error, "").partition(":")[0],
        )
        self._start_try(bot, name, tick, int(taken))

    # --- pushing -----------------------------------------------------------------------------------------------

    def _push(self, bot: ScheduledBot, name: str, tick: int, state: TickState, meta: dict, now: float) -> None:
        """Push the tick's answer (its stream's hash: `meta`) to each target not pushed yet, holding the claim on its
        pushing; settle it."""
        if not meta and state.status == PUSHING:
            meta = {F.status: "gone", F.error: "its record expired before it was pushed"}
        if not has_ended(meta) or not bot.book.claim_push(name, tick, state.stream):
            return
        text = bot.answers.text(state.stream)
        why = _why_not_pushed(meta, text)
        if why:
            bot.book.settle(name, tick, FAILED, why)
            logger.warning("schedule %s of bot %s: tick %s pushes nothing: %s", name, bot.name, tick, why)
            self._record(bot, name, tick, FAILED, why, meta, {}, text)
            return
        pushed = dict(state.pushed)
        for group in groups(bot.timetables[name].schedule.targets):
            label = " ".join(group)
            if label in pushed:
                continue
            waiting = (bot.name, name, tick, label)
            if self._send_again_at.get(waiting, 0.0) > time.monotonic():
                return
            if not bot.book.claim_push(name, tick, state.stream):
                return  # (another process took the pushing over: it goes on from what is recorded)
            try:
                said = push_group(bot.pushers, group, text, f"schedule:{bot.name}:{name}:{tick}")
            except OverQuota as waiting:
                if now - tick < WAIT_LIMIT_SECONDS:
                    logger.info(
                        "schedule %s: %s is at WeCom's limit; trying again in %d s", name, label, waiting.retry_after
                    )
                    return
                said = "failed: WeCom's limit of messages held it past 10 minutes"
            except SentNothing as unsent:
                if now - tick < WAIT_LIMIT_SECONDS:
                    logger.warning(
                        "schedule %s: %s sent nothing (%s); trying again in %.0f s",
                        name,
                        label,
                        unsent,
                        SEND_AGAIN_SECONDS,
                    )
                    self._send_again_at[waiting] = time.monotonic() + SEND_AGAIN_SECONDS
                    return
                said = f"failed: {unsent}"
            self._send_again_at.pop(waiting, None)
            bot.book.pushed(name, tick, label, said)
            pushed[label] = said
        outcome = PUSHED if all(s.partition(":")[0] in ("sent", "queued") for s in pushed.values()) else PARTIAL
        bot.book.settle(name, tick, outcome)
        logger.info("schedule %s of bot %s: tick %s %s (%s)", name, bot.name, tick, outcome, _summary(pushed))
        self._record(bot, name, tick, outcome, "", meta, pushed, text)

    def _record(
        self, bot: ScheduledBot, name: str, tick: int, outcome: str, why: str, meta: dict, pushed: dict, text: str
    ) -> None:
        """The tick's count and audit row: its question, its answer (or why nothing was pushed), its targets."""
        metrics.SCHEDULE_RUNS.labels(bot.name, name, outcome).inc()
        if bot.audit is None:
            return
        timetable = bot.timetables[name]
        question = meta.get(F.query) or timetable.question(timetable.at(tick))
        targets = _summary(pushed) if pushed else " ".join(timetable.schedule.targets)
        found = row_of_stream(bot.name, {**meta, F.schedule: ""}, [text]) if meta else None
        row = found or AuditRow(bot.name, "", SCHEDULE, outcome, tick, time.time())
        row = replace(
            row,
            msgid=f"schedule:{name}:{tick}",
            kind=SCHEDULE,
            outcome=outcome,
            received_at=float(tick),
            finished_at=time.time(),
            userid=f"schedule:{bot.name}:{name}",
            chatid=targets[:128],
            chattype="",
            msgtype="markdown",
            question=question,
            answer=text if outcome in (PUSHED, PARTIAL) else why,
            supersedes="",
        )
        bot.audit.replied(row)


def _failed_in_passing(meta: dict[str, str]) -> bool:
    """Did the answer fail on the way to it (PASSING_FAILURES), not on the question?"""
    code = meta.get(F.error, "").partition(":")[0]
    return meta.get(F.status) != DONE and code.startswith(PASSING_FAILURES)


def _why_not_pushed(meta: dict[str, str], text: str) -> str:
    """Why a tick's ended answer is not pushed ("": it is)."""
    if meta.get(F.status) != DONE or meta.get(F.error):
        return f"the answer failed ({meta.get(F.error) or meta.get(F.status)})"
    if not text.strip():
        return "the answer was empty"
    return ""


def _local(moment) -> str:
    return moment.strftime("%Y-%m-%d %H:%M")


def _summary(pushed: dict[str, str]) -> str:
    """Each target with what became of its push: `webhook:ops=sent user:a|b=partial`."""
    return " ".join(f"{label.replace(' ', ',')}={said.partition(':')[0]}" for label, said in pushed.items())
