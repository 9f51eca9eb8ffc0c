"""Builds and holds the services of one app instance: each external resource is created once, here; what the bots
of a deployment share once, and each bot's own once per bot.

Building starts no background work. Only a serving process (a gunicorn worker, `python app.py`, the demo) calls
`Gateway.start()`, which starts each long-connection bot's connection holder and answer consumer; a one-shot
process (every `flask` command, the db-init Job) never takes a bot's connection lease or a queued answer."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from config.bots import DEFAULT_BOT
from config.settings import WECOM_API, BotSettings, FileSettings, Settings, SettingsError
from services import metrics
from services.audit.api import AuditApi
from services.audit.queue import AFTER_WINDOW_SECONDS, AuditQueue
from services.audit.records import AuditRecords
from services.audit.sweeper import AuditSweeper
from services.audit.trail import CLAIM_SECONDS
from services.auth import db
from services.auth.users import UserDirectory
from services.bot_build import Bot, Shared, build_bot
from services.bots_watch import BotsFileWatch
from services.callback.handler import CallbackPaths
from services.files.links import LinkSigner
from services.files.server import BotFiles, FileServer
from services.keys import Keys
from services.push.api import PushApi
from services.push.app import AppPushes
from services.push.webhooks import WebhookPushes
from services.redis_conn import REDIS_FAILURES, connect_redis, version_problem
from services.redis_url import parse_redis_url
from services.rules.rules import RulesError
from services.schedules.answers import TickAnswers
from services.schedules.scheduler import ScheduledBot, Scheduler
from services.schedules.targets import Pushers
from services.schedules.ticks import TickBook
from services.schedules.timetable import Timetable
from services.streams.runner import StreamRunner
from services.streams.writer import AppendBatcher
from utils.logging import redact_also

logger = logging.getLogger(__name__)


# How often a Redis that did not say its version (a node down) is asked again (Gateway.redis_refuses).
VERSION_ASKED_EVERY_SECONDS = 60.0
# A bot retired from BOTS_FILE is closed this long after its answers' window: the time in which its last audit rows
# are looked at (AFTER_WINDOW_SECONDS) and written (a sweep's claim lapses in CLAIM_SECONDS), with 30 s to spare.
RETIRED_GRACE_SECONDS = AFTER_WINDOW_SECONDS + CLAIM_SECONDS + 30.0


@dataclass(frozen=True)
class Retired:
    """A bot that left BOTS_FILE, or whose changed copy took its place: it finishes its answers under way (its polls
    are answered at its path while no bot served takes the path) and is closed at `until` (monotonic)."""

    bot: Bot
    until: float


@dataclass
class Gateway:
    """Everything one app instance serves with; reached from Flask as `app.extensions["gateway"]`. What the bots
    share (Redis, the user table, the stream threads and their writes) is here; each bot's own is in `bots`."""

    settings: Settings  # the deployment's
    owner: str  # this process as a stream owner and in log lines: Settings.instance_id, taken once per worker
    redis: redis.Redis
    engine: Engine | None  # None when no user table is needed (no bot with AUTH_MODE=external, no DATABASE_URL)
    users: UserDirectory | None
    runner: StreamRunner
    appender: AppendBatcher
    bots: dict[str, Bot]  # the bots served (replaced whole when BOTS_FILE changes: apply)
    files: FileServer  # serves the signed links to the files Dify makes, for every bot
    shared: Shared | None = None  # what a bot added while the process runs is built on
    push: PushApi | None = None  # POST /api/push (None without PUSH_API_TOKEN: the route answers 404)
    audit_records: AuditRecords | None = None  # the audit trail's table (None: AUDIT off)
    audit_sweeper: AuditSweeper | None = None  # writes the rows the bots owe (a serving process's, once started)
    audit_api: AuditApi | None = None  # GET /api/audit (None without AUDIT_API_TOKEN: the route answers 404)
    started: bool = False  # start() ran: this is a serving process
    redis_problem: str | None = None  # why Redis cannot serve us ('': nothing, for good; None: not known yet)
    redis_version_asked_at: float = -VERSION_ASKED_EVERY_SECONDS  # monotonic: when it was last asked (redis_refuses)
    retired: list[Retired] = field(default_factory=list)  # bots that finish their answers, oldest first
    paths: CallbackPaths = field(default_factory=dict)  # the callback paths served, with their bots (_publish)
    watch: BotsFileWatch | None = None  # reads BOTS_FILE again in a serving process (None without one)
    webhook_http: httpx.Client = field(default_factory=httpx.Client)  # the pushes over WeCom's HTTP APIs
    scheduler: Scheduler = field(default_factory=Scheduler)  # the bots' schedules (run in a serving process)

    def bot(self, name: str | None = None) -> Bot:
        """The bot of that name; without one, the deployment's only bot (or `default`).

        Raises:
            KeyError: no such bot (or no name given with several bots and none called `default`).
        """
        if name is None:
            if len(self.bots) == 1:
                return next(iter(self.bots.values()))
            name = DEFAULT_BOT
        return self.bots[name]

    def redis_refuses(self) -> str:
        """Why the Redis we were given cannot serve the gateway ('' when it can: redis_conn.version_problem). Once
        every server said it can, for good; until then asked at most once a minute: a Redis too old is asked again
        (it may be upgraded in place: this replica is then ready without a restart), and one that does not answer
        (a Cluster's replica down) is no reason to be unready (a PING says whether Redis serves), while a node whose
        calls time out slows one readiness check a minute, never the two in a row that make a pod unready."""
        now = time.monotonic()
        if self.redis_problem == "" or now - self.redis_version_asked_at < VERSION_ASKED_EVERY_SECONDS:
            return self.redis_problem or ""
        self.redis_version_asked_at = now
        try:
            self.redis_problem = version_problem(self.redis)
        except REDIS_FAILURES as exc:  # it stays what it was: not known yet, or too old when last asked
            logger.info("could not ask every Redis server its version (%s); asking again in a minute", exc)
        return self.redis_problem or ""

    def readiness(self) -> tuple[dict[str, str], dict[str, dict]]:
        """What keeps this replica from serving, by dependency (Redis, 7.0 or later; the user table, with a bot of
        AUTH_MODE=external; `shutdown` while it drains), and each bot's state (Bot.report). Kept in gateway_ready
        and gateway_dependency_up."""
        failed = {}
        try:
            self.redis.ping()
            if problem := self.redis_refuses():
                failed["redis"] = problem
        except REDIS_FAILURES as exc:
            failed["redis"] = type(exc).__name__
        metrics.DEPENDENCY_UP.labels("redis").set(0 if "redis" in failed else 1)
        if any(bot.authorizer is not None for bot in self.bots.values()):
            try:
                db.check_user_table(self.engine)
            except db.SchemaMissing as exc:
                failed["database"] = str(exc)
            except SQLAlchemyError as exc:
                failed["database"] = type(exc).__name__
            metrics.DEPENDENCY_UP.labels("database").set(0 if "database" in failed else 1)
        if not self.runner.accepting:
            failed["shutdown"] = "draining"
        metrics.READY.set(0 if failed else 1)
        return failed, {name: bot.report() for name, bot in self.bots.items()}

    def start(self) -> None:
        """Start the background work of a serving process, once: the audit trail's sweep (or one WARNING that there
        is none); each bot's delivery watch (a callback bot's sweep of the response_url posts whose poster died and
        of the bubbles closed before their answers ended); each long-connection bot's answer consumer (first: the
        holder queues into it) and connection holder; and the watch of BOTS_FILE, which applies its changes."""
        if self.started:
            return
        self.started = True
        try:
            self.redis.ping()
            if problem := self.redis_refuses():
                logger.error("%s (REDIS_URL); GET /readyz says 503", problem)
        except REDIS_FAILURES as exc:  # one line now, rather than a silence that only /readyz explains
            logger.warning(
                "Redis (REDIS_URL) does not answer: %s. Until it does, polls get 503, new messages a note asking to "
                "resend, and GET /readyz says 503",
                exc,
            )
        if self.audit_sweeper is not None:
            self.audit_sweeper.start()
        else:
            logger.warning("the audit trail is off: no message is recorded (%s)", self.audit_off_because())
        for bot in self.bots.values():
            bot.start()
        if self.watch is not None:
            self.watch.start()
        if self.scheduler.bots:
            self.scheduler.start()

    def audit_off_because(self) -> str:
        """Why there is no audit trail, in the words an operator acts on."""
        if self.settings.audit.enabled == "off":
            return "AUDIT=off"
        return "there is no database: set DATABASE_URL to keep one (AUTH_MODE=none needs none otherwise)"

    def drain(self, timeout: float) -> list[str]:
        """Graceful shutdown: hand each long-connection bot's WebSocket over at once, take no new streams, let
        running ones finish for up to `timeout` seconds, then hand what remains to the other replicas (a poll there
        resumes it, restarts it, or finishes its bubble with what it showed: docs/architecture.md). Returns the ids
        handed over."""
        if self.watch is not None:
            self.watch.stop()  # the bots stay as they are while they drain
        self.scheduler.stop()  # a tick under way here is taken over elsewhere once its lease lapses
        for bot in self._every_bot():  # long-connection bots: another replica holds the connection at once
            if bot.connection is not None:
                bot.connection.stop()
        logger.info("draining %d running streams (up to %.0fs)", self.runner.active_count, timeout)
        remaining = self.runner.drain(timeout)
        if not remaining:
            logger.info("all streams finished; nothing to hand over")
            return []
        self.runner.cancel(remaining)
        released = 0
        for bot, attempts in self.runner.by_bot(remaining).items():
            try:
                handed = self._named(bot).streams.store.leases.release(attempts)
            except REDIS_FAILURES as exc:
                logger.warning("could not release leases (%s); they expire within STREAM_LEASE_SECONDS", exc)
                continue
            metrics.STREAM_OUTCOMES.labels(bot, "handed_over").inc(handed)
            released += handed
        logger.warning("handed %d unfinished streams over to other replicas", released)
        return remaining

    def close(self) -> None:
        """Release pooled connections (running stream threads are left to finish on their own, waiting for nothing)."""
        self.runner.close()
        self.scheduler.stop()
        if self.watch is not None:
            self.watch.stop()
        if self.audit_sweeper is not None:
            self.audit_sweeper.stop()
        for bot in self._every_bot():
            bot.close()
        if self.users is not None:
            self.users.close()
        self.webhook_http.close()
        self.redis.close()

    # --- bots changed live (services/bots_watch.py) --------------------------------------------------------------

    def apply(self, wanted: tuple[BotSettings, ...]) -> None:
        """Serve `wanted` from now on: a bot new to the file is built (and started in a serving process); a changed
        one is built again and takes the old one's place, which hands its background work (and a long connection)
        over to it at once; a bot gone from the file refuses new messages (Bot.retire). The old and the gone finish
        their answers under way and are closed by `close_retired`.

        Raises:
            SettingsError: a bot could not be built (nothing is changed then).
        """
        served = self.bots
        try:
            built = {
                bot.name: build_bot(bot, self.shared)
                for bot in wanted
                if bot.name not in served or served[bot.name].settings != bot
            }
        except RulesError as exc:  # its content rules file went bad between the check and the build
            raise SettingsError(f"BOTS_FILE: a bot could not be built ({exc})") from None
        names = {bot.name for bot in wanted}
        now = time.monotonic()
        for name, bot in served.items():
            if name in built or name not in names:
                bot.retire()
                if name in built:
                    bot.hand_over()
                until = now + bot.settings.answers.window_seconds + RETIRED_GRACE_SECONDS
                self.retired.append(Retired(bot, until))
        redact_also([secret for bot in wanted for secret in bot.secrets()])
        self.bots = {bot.name: built.get(bot.name) or served[bot.name] for bot in wanted}
        self._publish()
        if self.started:
            for bot in built.values():
                bot.start()
            if self.scheduler.bots:
                self.scheduler.start()
        added = sorted(built.keys() - served.keys())
        changed = sorted(built.keys() & served.keys())
        removed = sorted(served.keys() - names)
        said = (", ".join(group) or "none" for group in (added, changed, removed))
        logger.info("BOTS_FILE reloaded: added %s; changed %s; removed %s", *said)

    def close_retired(self) -> None:
        """Close the retired bots whose time is over (their answers ended long since)."""
        now = time.monotonic()
        over = [retired.bot for retired in self.retired if retired.until <= now]
        if not over:
            return
        self.retired = [retired for retired in self.retired if retired.until > now]
        self._publish()
        for bot in over:
            bot.close()
            logger.info("bot %s retired: closed", bot.name)

    def _publish(self) -> None:
        """Make what the routes see follow the bots served and retired: the callback paths (a retired bot's as long
        as no bot served takes it), the files' links, the push API's bots, the audit sweep's trails."""
        every = self._every_bot()
        latest = {bot.name: bot for bot in every}  # a retired bot's successor has its keys: one sweep of them
        self.paths = {
            bot.settings.wecom.callback_path: (bot.name, bot.callback)
            for bot in every  # the bots served last: a path they share with a retired bot is theirs
            if bot.delivery.mode == "callback"
        }
        self.files.bots = {
            name: BotFiles(bot.files.refs, bot.files.fetcher, bot.files.max_bytes) for name, bot in latest.items()
        }
        webhooks = {name: self._webhooks(bot) for name, bot in self.bots.items() if bot.settings.wecom.webhooks}
        apps = {name: self._app(bot) for name, bot in self.bots.items() if bot.settings.wecom.app_corp_id}
        if self.push is not None:
            self.push.serve(
                {name: bot.connection.pushes if bot.connection else None for name, bot in self.bots.items()},
                webhooks,
                apps,
            )
        self.scheduler.serve(
            {
                name: self._scheduled(bot, webhooks.get(name), apps.get(name))
                for name, bot in self.bots.items()
                if bot.settings.schedules
            }
        )
        if self.audit_sweeper is not None:
            self.audit_sweeper.trails = [bot.audit for bot in latest.values() if bot.audit is not None]

    def _webhooks(self, bot: Bot) -> WebhookPushes:
        """A bot's group robots for the push API (their URLs at WECOM_API_BASE when they are WeCom's)."""
        base = self.settings.wecom_api_base.rstrip("/")
        urls = {
            name: base + url.removeprefix(WECOM_API) if url.startswith(WECOM_API) else url
            for name, url in bot.settings.wecom.webhook_urls().items()
        }
        durable = bot.streams.store.durable
        return WebhookPushes(bot.name, durable, bot.keys, urls, self._audit_of(bot), self.owner, self.webhook_http)

    def _app(self, bot: Bot) -> AppPushes:
        """A bot's self-built app for the push API."""
        wecom = bot.settings.wecom
        app = (wecom.app_corp_id, wecom.app_agent_id, wecom.app_secret)
        base = self.settings.wecom_api_base
        durable = bot.streams.store.durable
        return AppPushes(bot.name, durable, bot.keys, app, base, self._audit_of(bot), self.owner, self.webhook_http)

    def _scheduled(self, bot: Bot, webhooks: WebhookPushes | None, app: AppPushes | None) -> ScheduledBot:
        """What a bot's schedules run with: their timetables, its ticks, answers and ways to push."""
        chats = bot.connection.pushes if bot.connection is not None else None
        return ScheduledBot(
            bot.name,
            {schedule.name: Timetable(schedule) for schedule in bot.settings.schedules},
            TickBook(self.redis, bot.keys, self.owner, bot.streams.store.durable),
            TickAnswers(bot.name, bot.streams),
            Pushers(webhooks, app, chats),
            self._audit_of(bot),
            self.settings.streams.lease_seconds,
        )

    def _audit_of(self, bot: Bot) -> AuditQueue | None:
        """Where a bot's pushes list their audit rows (sharing the rows its queue holds while Redis is away)."""
        return bot.audit.queue() if bot.audit is not None else None

    def _every_bot(self) -> list[Bot]:
        """The retired bots, oldest first, then the bots served."""
        return [retired.bot for retired in self.retired] + list(self.bots.values())

    def _named(self, name: str) -> Bot:
        """The bot of that name, served or retired (the streams of both are under the same keys)."""
        return self.bots.get(name) or next(r.bot for r in reversed(self.retired) if r.bot.name == name)


def build_gateway(
    settings: Settings, bots: tuple[BotSettings, ...], instance_path: Path, run_dir: Path | None = None
) -> Gateway:
    """Create the clients and services of the deployment (`settings`) and of each bot; `instance_path` holds the
    demo's embedded stores, `run_dir` (gunicorn's) the last good copy of BOTS_FILE."""
    redis_settings, database = settings.redis, settings.database
    client = connect_redis(
        redis_settings.url, redis_settings.socket_timeout, instance_path, redis_settings.sentinel_password
    )
    engine = _engine(settings, instance_path)
    users = None
    if engine is not None:
        read_engine = db.make_engine(database.read_url, database.timeout) if database.read_url else None
        users = UserDirectory(engine, read_engine)
    audit = AuditRecords(engine, settings.audit.content) if settings.audit_on and engine is not None else None
    shared = Shared(
        settings=settings,
        client=client,
        users=users,
        owner=settings.instance_id,
        runner=StreamRunner(settings.streams.max_active, settings.streams.lease_seconds),
        appender=AppendBatcher(redis_settings.socket_timeout),
        replica_wait_ms=redis_settings.claim_wait_ms if parse_redis_url(redis_settings.url).replicated else 0,
        signer=_link_signer(settings.files),
        audit=audit,
    )
    built = {bot.name: build_bot(bot, shared) for bot in bots}
    gateway = Gateway(
        settings=settings,
        owner=shared.owner,
        redis=client,
        engine=engine,
        users=users,
        runner=shared.runner,
        appender=shared.appender,
        bots=built,
        files=FileServer(shared.signer, {}),
        shared=shared,
        push=PushApi(settings.push_api_token) if settings.push_api_token else None,
        audit_records=audit,
        audit_sweeper=_audit_sweeper(settings, shared) if audit is not None else None,
        audit_api=AuditApi(settings.audit.api_token, audit) if audit is not None and settings.audit.api_token else None,
    )
    gateway._publish()
    if settings.bots_file:
        gateway.watch = BotsFileWatch(settings, bots, gateway.apply, gateway.close_retired, run_dir)
    return gateway


def _audit_sweeper(settings: Settings, shared: Shared) -> AuditSweeper:
    """The loop that writes every bot's audit rows (its trails are the bots', Gateway._publish), and purges the
    table on one replica at a time."""
    lock = Keys(settings.redis.key_prefix).audit_purge()
    return AuditSweeper(shared.client, [], shared.audit, settings.audit.retention_days, lock, shared.owner)


def _link_signer(files: FileSettings) -> LinkSigner | None:
    """Signs and checks the links to files (the deployment's secret), or None without PUBLIC_BASE_URL: no links."""
    if not files.public_base_url:
        return None
    return LinkSigner(files.link_secret, files.link_ttl_seconds, files.public_base_url)


def _engine(settings: Settings, instance_path: Path) -> Engine | None:
    """The user table's engine: DATABASE_URL, the demo's embedded SQLite file, or none where none is needed
    (settings require DATABASE_URL outside demo mode when AUTH_MODE=external)."""
    url = settings.database.url or (db.default_sqlite_url(instance_path) if settings.demo_mode else "")
    return db.make_engine(url, settings.database.timeout) if url else None
