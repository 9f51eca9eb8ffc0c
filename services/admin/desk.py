"""What the operator's page shows and does, apart from Flask (its routes: web/admin.py): each bot's state, the
answers in flight and their Stop, the audit trail's search, quotas and their Reset; every sign-in and change is an
audit row of its own (kind `admin`: the operator in `userid`, the action in `question`, what it acted on in
`answer`)."""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from sqlalchemy.exc import SQLAlchemyError

from services.admin.live import LiveAnswer, LiveAnswers
from services.audit.export import lines
from services.audit.records import AuditFilter, AuditRecords
from services.audit.rows import ADMIN, AuditRow
from services.bot_build import Bot
from services.push.direct import FAILED, PARTIAL, SENT, UNKNOWN
from services.redis_conn import REDIS_FAILURES
from services.streams.life import PUSH
from services.streams.stop import AnswerStopper

logger = logging.getLogger(__name__)

SEARCH_ROWS = 100  # rows a search shows (the CSV has every row of the filter)
PUSH_ROWS = 50  # the latest pushes shown
DIRECT_OUTCOMES = (SENT, PARTIAL, FAILED, UNKNOWN)  # a push over WeCom's HTTP APIs: its row's outcome is its status
SIGN_IN, STOP, QUOTA_RESET = "sign_in", "stop", "quota_reset"
DONE, REFUSED = "done", "refused"  # an admin row's outcome


@dataclass(frozen=True)
class BotView:
    name: str
    mode: str  # callback or long_connection
    backend: str
    routes: list[tuple[str, str, str]]  # (name, command or "", backend)
    holder: str  # the process holding its long connection ("" for none, "-" in callback mode)
    today: dict[str, int]  # messages today by outcome (empty when the audit trail is off)


@dataclass(frozen=True)
class PushView:
    row: dict  # its audit row
    status: str  # queued, sent, failed, or unknown (its record in Redis is gone: a day after it was made)
    error: str = ""


@dataclass(frozen=True)
class QuotaView:
    bot: str
    used: int
    limit: int  # 0: none


class AdminDesk:
    """The page's work over the bots served (`bots()`, read again at each call: they change with BOTS_FILE)."""

    def __init__(
        self, bots: Callable[[], dict[str, Bot]], client, records: AuditRecords | None, timezone: str, pushes: bool
    ):
        self.bots = bots
        self.client = client
        self.records = records
        self.zone = ZoneInfo(timezone)
        self.pushes_on = pushes and records is not None  # the push API, and the audit rows that list its pushes

    # --- bots ---------------------------------------------------------------------------------------------------

    def bot_views(self) -> list[BotView]:
        today = self._today_counts()
        views = []
        for name, bot in sorted(self.bots().items()):
            settings = bot.settings
            routes = [(r.name, r.command, r.settings.backend) for r in settings.routes]
            views.append(
                BotView(name, bot.delivery.mode, settings.backend, routes, self._holder(bot), today.get(name, {}))
            )
        return views

    def _holder(self, bot: Bot) -> str:
        if not bot.settings.long_connection:
            return "-"
        try:
            owner = self.client.get(bot.keys.ws_lease(bot.settings.connection.bot_id))
        except REDIS_FAILURES:
            return "unknown (Redis did not answer)"
        return owner or ""

    def _today_counts(self) -> dict[str, dict[str, int]]:
        if self.records is None:
            return {}
        midnight = datetime.now(self.zone).replace(hour=0, minute=0, second=0, microsecond=0)
        try:
            return self.records.outcomes_since(midnight.astimezone(UTC).replace(tzinfo=None))
        except SQLAlchemyError:
            return {}

    # --- live answers -------------------------------------------------------------------------------------------

    def live(self) -> list[LiveAnswer]:
        """Every bot's answers in flight, oldest first.

        Raises:
            redis.RedisError: Redis did not answer.
        """
        found = [a for name, bot in self.bots().items() for a in LiveAnswers(self.client, bot.keys, name).now()]
        return sorted(found, key=lambda answer: -answer.age_seconds)

    def stop(self, operator: str, bot_name: str, stream_id: str) -> bool:
        """Stop one answer as its user's /stop would; False if it was not streaming (or no such bot).

        Raises:
            redis.RedisError: Redis did not answer.
        """
        bot = self.bots().get(bot_name)
        stopped = False
        if bot is not None:  # a stopper of the bot's answers, as its /stop has (it keeps nothing of its own)
            streams = bot.streams
            stopper = AnswerStopper(streams.store, streams.backends, streams.texts, bot_name)
            stopped = stopper.stop(stream_id, f"operator {operator}")
        self.record(operator, STOP, f"{bot_name}/{stream_id}", DONE if stopped else "nothing", bot_name)
        return stopped

    # --- the audit trail ----------------------------------------------------------------------------------------

    def search(self, which: AuditFilter) -> list[dict]:
        """The newest rows of `which` (SEARCH_ROWS at most). The audit's methods need the audit trail (`records`).

        Raises:
            SQLAlchemyError: the database did not answer.
        """
        return self.records.latest(which, SEARCH_ROWS)

    def oldest_of_newest(self, until, rows: int):
        """When the oldest of the newest `rows` rows received before `until` was received (None: fewer rows).

        Raises:
            SQLAlchemyError: the database did not answer.
        """
        return self.records.received_before(until, rows)

    def row(self, row_id: int) -> dict | None:
        return self.records.by_id(row_id)

    def csv(self, which: AuditFilter) -> Iterator[str]:
        """Every row of `which` as `audit export --format csv` writes it, oldest first."""
        return lines(self.records.every(which), "csv")

    # --- pushes -------------------------------------------------------------------------------------------------

    def pushes(self) -> list[PushView]:
        """The latest pushes (their audit rows), newest first, each with its status now.

        Raises:
            SQLAlchemyError: the database did not answer.
            redis.RedisError: Redis did not answer.
        """
        if not self.pushes_on:
            return []
        bots, views = self.bots(), []
        for row in self.records.latest(AuditFilter(kind=PUSH), PUSH_ROWS):
            if row["outcome"] in DIRECT_OUTCOMES:  # a webhook's or the app's: written once it was sent, or not
                views.append(PushView(row, row["outcome"]))
                continue
            bot = bots.get(row["bot"])
            found = None
            if bot is not None and bot.connection is not None:  # through the long connection: its outbox says
                found = bot.connection.pushes.status(row["msgid"].removeprefix("push:"))
            found = found or {"status": "unknown"}
            views.append(PushView(row, found["status"], found.get("error", "")))
        return views

    # --- quotas -------------------------------------------------------------------------------------------------

    def quotas(self, scope: str, who: str) -> list[QuotaView]:
        """Each bot's count of `who` today (`scope` user or chat), against its quota."""
        views = []
        for name, bot in sorted(self.bots().items()):
            quotas = bot.quotas
            limit = quotas.limits[scope] if quotas is not None else 0
            views.append(QuotaView(name, quotas.used(scope, who) if quotas is not None else 0, limit))
        return views

    def reset_quota(self, operator: str, scope: str, who: str) -> int:
        """Give `who` today's quota again on every bot; returns on how many there was a count."""
        reset = sum(1 for bot in self.bots().values() if bot.quotas is not None and bot.quotas.reset(scope, who))
        self.record(operator, QUOTA_RESET, f"{scope} {who}", DONE if reset else "nothing")
        return reset

    # --- the operators' own rows --------------------------------------------------------------------------------

    def record(self, operator: str, action: str, target: str, outcome: str = DONE, bot: str = "") -> None:
        """An audit row of an operator's sign-in or change: written now, or (the database away) listed in Redis for
        the audit sweep; logged either way."""
        logger.info("operator %r: %s %s (%s)", operator, action, target, outcome)
        if self.records is None:
            return
        now = time.time()
        row = AuditRow(
            bot=bot,
            msgid=f"admin-{secrets.token_hex(8)}",
            kind=ADMIN,
            outcome=outcome,
            received_at=now,
            finished_at=now,
            userid=operator,
            question=action,
            answer=target,
        )
        try:
            self.records.insert([row])
        except SQLAlchemyError as exc:
            logger.warning("the database did not take an operator's audit row (%s); it waits in Redis", exc)
            trail = next((bot.audit for bot in self.bots().values() if bot.audit is not None), None)
            if trail is not None:
                trail.queue().replied(row)
