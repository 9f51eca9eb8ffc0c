"""Builds and holds the services of one app instance: each external resource is created once, here; what the bots
of a deployment share once, and each bot's own once per bot.

Building starts no background work. Only a serving process (a gunicorn worker, `python app.py`, the demo) calls
`Gateway.start()`, which starts each long-connection bot's connection holder and answer consumer; a one-shot
process (every `flask` command, the db-init Job) never takes a bot's connection lease or a queued answer."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import redis
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from config.bots import DEFAULT_BOT, bot_keys
from config.settings import Settings
from services import metrics
from services.auth import db
from services.auth.api import AuthApiClient
from services.auth.authorizer import Authorizer
from services.auth.users import UserDirectory
from services.callback.envelope import Envelope
from services.callback.events import EventHandler
from services.callback.handler import CallbackHandler
from services.callback.replay_guard import ReplayGuard
from services.chat.intake import MessageIntake
from services.chat.welcome import Welcome
from services.dify.app_profile import DifyAppProfile
from services.dify.client import DifyClient
from services.dify.feedback import FeedbackService
from services.dify.health import DifyHealth
from services.files.delivery import FileDelivery
from services.files.fetch import FileFetcher
from services.files.links import LinkSigner
from services.files.server import BotFiles, FileServer
from services.files.store import FileRefs
from services.files.text_links import DifyLinks
from services.forms.answers import FormAnswers
from services.forms.service import FormService
from services.forms.store import FormStore
from services.keys import Keys
from services.longconn.delivery import ConnectionDelivery
from services.longconn.holder import ConnectionHolder
from services.longconn.jobs import JobConsumer, JobQueue
from services.longconn.lease import BotLease
from services.longconn.outbox import Outbox
from services.longconn.pacing import ChatWindow
from services.longconn.uploads import FileSender
from services.media.service import MediaService
from services.push.api import PushApi
from services.push.pushes import BotPushes
from services.redis_conn import REDIS_FAILURES, connect_redis, version_problem
from services.redis_url import parse_redis_url
from services.replication import Replication
from services.streams.bubble import BubbleRenderer
from services.streams.conversations import ConversationStore
from services.streams.delivery import CallbackDelivery, Delivery
from services.streams.finisher import Finisher
from services.streams.poll_path import PollPath
from services.streams.recorder import AnswerOptions
from services.streams.rest_posts import RestPosts
from services.streams.runner import StreamRunner
from services.streams.service import StreamService
from services.streams.stop import AnswerStopper
from services.streams.store import StreamStore
from services.streams.worker import StreamWorker, WorkerDeps
from services.streams.writer import AppendBatcher
from services.texts import Texts
from services.wecom.crypto import WeComCrypto
from services.wecom.response_url import ResponseUrlClient

logger = logging.getLogger(__name__)


@dataclass
class Bot:
    """One bot's services: its WeCom credentials, its Dify app, who may ask it, its keys, streams and callback."""

    name: str
    settings: Settings  # the bot's own (config/bots.py), the deployment's beside them
    keys: Keys
    store: StreamStore
    dify: DifyClient
    profile: DifyAppProfile
    authorizer: Authorizer | None
    conversations: ConversationStore
    media: MediaService
    feedback: FeedbackService
    delivery: Delivery  # how answers reach the user besides their bubbles: one per WeCom mode
    streams: StreamService
    callback: CallbackHandler
    texts: Texts
    health: DifyHealth
    files: FileDelivery  # the files Dify makes: inline, linked, or uploaded
    holder: ConnectionHolder | None = None  # long-connection mode: this process's holder (or stand-by)
    pushes: BotPushes | None = None  # long-connection mode: the push API's messages to this bot's chats
    consumer: JobConsumer | None = None  # long-connection mode: takes the bot's queued answers to run here

    def report(self) -> dict:
        """The bot's state for /readyz: its mode and callback path, its connection, its auth mode, its Dify."""
        return {
            "mode": self.delivery.mode,
            "path": self.settings.wecom_callback_path if self.delivery.mode == "callback" else "",
            **(self.holder.report() if self.holder is not None else {}),
            "auth": self.settings.auth_mode,
            **self.health.report(),
        }

    def close(self) -> None:
        self.delivery.close()
        if self.consumer is not None:
            self.consumer.stop()
        if self.holder is not None:
            self.holder.stop()
        if self.consumer is not None:
            self.consumer.join()  # its last Redis calls before the pool closes
        self.feedback.close()
        self.media.close()
        self.files.fetcher.close()
        self.dify.close()
        if self.authorizer is not None:
            self.authorizer.api.close()
        self.streams.poll_path.close()


# How often a Redis that did not say its version (a node down) is asked again (Gateway.redis_refuses).
VERSION_ASKED_EVERY_SECONDS = 60.0


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
    bots: dict[str, Bot]
    files: FileServer  # serves the signed links to the files Dify makes, for every bot
    push: PushApi | None = None  # POST /api/push (None without PUSH_API_TOKEN: the route answers 404)
    started: bool = False  # start() ran: this is a serving process
    redis_problem: str | None = None  # why Redis cannot serve us ('': nothing, for good; None: not known yet)
    redis_version_asked_at: float = -VERSION_ASKED_EVERY_SECONDS  # monotonic: when it was last asked (redis_refuses)

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
        """Start the background work of a serving process: each bot's delivery watch (a callback bot's sweep of the
        response_url posts whose poster died and of the bubbles closed before their answers ended); each
        long-connection bot's answer consumer (first: the holder queues into it) and connection holder. Once only."""
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
        for bot in self.bots.values():
            bot.delivery.start(bot.streams.look)
            if bot.holder is not None:
                bot.consumer.start()
                bot.holder.start()

    def drain(self, timeout: float) -> list[str]:
        """Graceful shutdown: hand each long-connection bot's WebSocket over at once, take no new streams, let
        running ones finish for up to `timeout` seconds, then hand what remains to the other replicas (a poll there
        resumes it, restarts it, or finishes its bubble with what it showed: docs/architecture.md). Returns the ids
        handed over."""
        for bot in self.bots.values():  # long-connection bots: another replica holds the connection at once
            if bot.holder is not None:
                bot.holder.stop()
                bot.consumer.stop()
        logger.info("draining %d running streams (up to %.0fs)", self.runner.active_count, timeout)
        remaining = self.runner.drain(timeout)
        if not remaining:
            logger.info("all streams finished; nothing to hand over")
            return []
        self.runner.cancel(remaining)
        released = 0
        for bot, attempts in self.runner.by_bot(remaining).items():
            try:
                handed = self.bots[bot].store.release_leases(attempts)
            except REDIS_FAILURES as exc:
                logger.warning("could not release leases (%s); they expire within STREAM_LEASE_SECONDS", exc)
                continue
            metrics.STREAM_OUTCOMES.labels(bot, "handed_over").inc(handed)
            released += handed
        logger.warning("handed %d unfinished streams over to other replicas", released)
        return remaining

    def close(self) -> None:
        """Release pooled connections (running stream threads are left to finish on their own)."""
        self.runner.stop()
        for bot in self.bots.values():
            bot.close()
        if self.users is not None:
            self.users.close()
        self.redis.close()


def build_gateway(settings: Settings, bots: tuple[Settings, ...], instance_path: Path) -> Gateway:
    """Create the clients and services of the deployment (`settings`) and of each bot; `instance_path` holds the
    demo's embedded stores."""
    client = connect_redis(
        settings.redis_url, settings.redis_socket_timeout, instance_path, settings.redis_sentinel_password
    )
    engine = _engine(settings, instance_path)
    users = None
    if engine is not None:
        read_engine = (
            db.make_engine(settings.database_read_url, settings.database_timeout)
            if settings.database_read_url
            else None
        )
        users = UserDirectory(engine, read_engine)
    owner = settings.instance_id
    shared = _Shared(
        client=client,
        users=users,
        owner=owner,
        runner=StreamRunner(settings.stream_max_active, settings.stream_lease_seconds),
        appender=AppendBatcher(settings.redis_socket_timeout),
        replica_wait_ms=settings.redis_claim_wait_ms if parse_redis_url(settings.redis_url).replicated else 0,
    )
    built = {bot.bot_name: _bot(bot, shared) for bot in bots}
    push = None
    if settings.push_api_token:
        pushes = {name: bot.pushes for name, bot in built.items() if bot.pushes is not None}
        push = PushApi(settings.push_api_token, pushes, {name for name, bot in built.items() if bot.pushes is None})
    return Gateway(
        settings=settings,
        owner=owner,
        redis=client,
        engine=engine,
        users=users,
        runner=shared.runner,
        appender=shared.appender,
        bots=built,
        files=FileServer(
            _link_signer(settings),
            {name: BotFiles(bot.files.refs, bot.files.fetcher, bot.files.max_bytes) for name, bot in built.items()},
        ),
        push=push,
    )


@dataclass
class _Shared:
    """What every bot's services are built on."""

    client: redis.Redis
    users: UserDirectory | None
    owner: str
    runner: StreamRunner
    appender: AppendBatcher
    replica_wait_ms: int  # how long a write that must outlive a failover waits for a replica (0: none to wait for)


def _delivery(settings: Settings, shared: _Shared, keys: Keys, store: StreamStore) -> Delivery:
    """How the bot's answers reach the user besides their bubbles, chosen here once for its WeCom mode: a long
    connection's answer queue and outbox, or a callback bot's response_url posts."""
    if settings.wecom_mode == "long_connection":
        outbox = Outbox(shared.client, keys, store, settings.wecom_bot_id)
        queue = JobQueue(store.durable, keys, settings.wecom_bot_id, outbox)
        return ConnectionDelivery(queue, outbox, shared.owner, settings.bot_name)
    posts = RestPosts(shared.client, keys, store.durable, ResponseUrlClient(), shared.owner, settings.bot_name)
    return CallbackDelivery(posts, store, settings.bot_name, draining=lambda: not shared.runner.accepting)


def _bot(settings: Settings, shared: _Shared) -> Bot:
    """One bot's services, on the shared resources, each built after what it uses."""
    name, client = settings.bot_name, shared.client
    long_connection = settings.wecom_mode == "long_connection"
    metrics.initialise(name, long_connection=long_connection)
    texts = Texts(settings.bot_language)
    keys = Keys(settings.redis_key_prefix + bot_keys(name))
    store = StreamStore(
        client,
        keys,
        settings.stream_key_ttl_seconds,
        settings.stream_lease_seconds,
        settings.rate_limit_per_minute,
        durable=Replication(client, shared.replica_wait_ms, name),
        takeover_grace_seconds=settings.stream_takeover_grace_seconds,
    )
    delivery = _delivery(settings, shared, keys, store)
    connection = delivery if isinstance(delivery, ConnectionDelivery) else None  # its holder, consumer and pushes
    dify = _dify(settings)
    profile = DifyAppProfile(dify, app_type=settings.dify_app_type)
    crypto = (
        None
        if long_connection
        else WeComCrypto(settings.wecom_token, settings.wecom_encoding_aes_key, settings.wecom_receive_id)
    )
    authorizer = _authorizer(settings, client, keys, shared.users, profile)
    conversations = ConversationStore(client, keys, settings.conversation_ttl_seconds)
    media = MediaService(crypto, dify, profile, bot=name)
    links = DifyLinks.of(settings.dify_base_url, settings.dify_files_url)
    files = _files(settings, client, keys, texts, long_connection, links)
    form_store = FormStore(client, keys)
    forms = FormService(form_store, dify, texts, name)
    bubble = BubbleRenderer(texts, settings.stream_placeholder, links)
    stopper = AnswerStopper(store, dify, profile, texts, name)
    finisher = Finisher(
        store,
        delivery,
        bubble,
        texts,
        name,
        settings.stream_window_seconds,
        draining=lambda: not shared.runner.accepting,
    )
    deps = WorkerDeps(
        store=store,
        dify=dify,
        conversations=conversations,
        media=media,
        appender=shared.appender,
        finisher=finisher,
        texts=texts,
        health=DifyHealth(),
        profile=profile,
        forms=forms,
        files=files,
        stopper=stopper,
        append_pace=delivery.append_pace,
        append_deadlines=delivery.append_deadlines,
    )
    streams = StreamService(
        store,
        PollPath(store),
        shared.runner,
        _worker(settings, deps, shared.owner, authorizer),
        texts,
        bubble,
        shared.owner,
        settings.stream_window_seconds,
        delivery,
        name,
        shared_groups=settings.group_conversation == "shared",
    )
    # A form's card is opened by the worker (forms), and its answer may start the rest of the run on a worker again
    # (form_answers, built once streams is).
    form_answers = FormAnswers(form_store, texts, streams.continue_form, name, media)
    feedback = FeedbackService(client, keys, dify)
    events = EventHandler(
        Welcome(profile, texts, settings.welcome_message, name),
        feedback,
        ReplayGuard(client, keys, 2 * settings.wecom_timestamp_tolerance),
        form_answers,
    )
    intake = MessageIntake(
        streams,
        conversations,
        texts,
        settings.wecom_bot_name,
        form_answers,
        stopper,
        authorize=authorizer.inputs_for if authorizer is not None else None,
    )
    callback = CallbackHandler(Envelope(crypto, settings.wecom_timestamp_tolerance), intake, streams, events, texts)
    return Bot(
        name=name,
        settings=settings,
        keys=keys,
        store=store,
        dify=dify,
        profile=profile,
        authorizer=authorizer,
        conversations=conversations,
        media=media,
        feedback=feedback,
        delivery=delivery,
        streams=streams,
        callback=callback,
        texts=texts,
        health=deps.health,
        files=files,
        consumer=_consumer(settings, shared, connection.queue, streams) if connection else None,
        holder=_holder(settings, shared, keys, connection.outbox, callback, files) if connection else None,
        pushes=_pushes(settings, shared, keys, store, connection.outbox) if connection else None,
    )


def _worker(settings: Settings, deps: WorkerDeps, owner: str, authorizer: Authorizer | None) -> StreamWorker:
    """The thread body that answers a stream: with the app's options and, with an auth API, the user's inputs."""
    prepare = (lambda job: authorizer.inputs_for(job.userid)) if authorizer is not None else None
    options = AnswerOptions(
        show_reasoning=settings.show_reasoning,
        show_citations=settings.show_citations,
        workflow_input=settings.dify_workflow_input,
        workflow_output=settings.dify_workflow_output,
    )
    return StreamWorker(deps, owner, settings.dify_max_stream_seconds, prepare, bot=settings.bot_name, options=options)


def _files(
    settings: Settings, client: redis.Redis, keys: Keys, texts: Texts, long_connection: bool, links: DifyLinks
) -> FileDelivery:
    """The files Dify makes, as the user gets them: inline, behind a signed link, or uploaded."""
    return FileDelivery(
        settings.bot_name,
        FileFetcher(settings.dify_base_url, settings.dify_files_url),
        FileRefs(client, keys),
        texts,
        signer=_link_signer(settings),
        public_base_url=settings.public_base_url,
        max_bytes=settings.file_max_bytes,
        long_connection=long_connection,
        links=links,
    )


def _holder(
    settings: Settings, shared: _Shared, keys: Keys, outbox: Outbox, callback: CallbackHandler, files: FileDelivery
) -> ConnectionHolder:
    """A long-connection bot's connection holder in this process (once started, it stands by until it has the
    lease)."""
    lease = BotLease(shared.client, keys, settings.wecom_bot_id, shared.owner, settings.wecom_ws_lease_seconds)
    store = outbox.store

    def sender(session) -> FileSender:
        return FileSender(
            settings.bot_name, shared.client, keys, files.refs, files.fetcher, callback.texts, store.meta, session
        )

    sends = ChatWindow(shared.client, keys.ws_sends, settings.wecom_send_per_minute, settings.wecom_send_per_hour)
    return ConnectionHolder(settings.bot_name, settings, lease, callback, outbox, shared.owner, sends, sender)


def _pushes(settings: Settings, shared: _Shared, keys: Keys, store: StreamStore, outbox: Outbox) -> BotPushes:
    """A long-connection bot's pushes, sent through the outbox its holder delivers."""
    quota = ChatWindow(shared.client, keys.push_quota, settings.wecom_send_per_minute, settings.wecom_send_per_hour)
    return BotPushes(settings.bot_name, shared.client, keys, store, outbox, quota, shared.owner)


def _consumer(settings: Settings, shared: _Shared, queue: JobQueue, streams: StreamService) -> JobConsumer:
    """A long-connection bot's answer queue: the holder queues, every serving process's consumer runs."""
    block_ms = max(100, min(1000, int(settings.redis_socket_timeout * 500)))  # well within the socket timeout
    return JobConsumer(queue, streams, shared.owner, block_ms)


def _link_signer(settings: Settings) -> LinkSigner | None:
    """Signs and checks the links to files (the deployment's secret), or None without PUBLIC_BASE_URL: no links."""
    if not settings.public_base_url:
        return None
    return LinkSigner(settings.file_link_secret, settings.file_link_ttl_seconds)


def _engine(settings: Settings, instance_path: Path) -> Engine | None:
    """The user table's engine: DATABASE_URL, the demo's embedded SQLite file, or none where none is needed
    (settings require DATABASE_URL outside demo mode when AUTH_MODE=external)."""
    url = settings.database_url or (db.default_sqlite_url(instance_path) if settings.demo_mode else "")
    return db.make_engine(url, settings.database_timeout) if url else None


def _dify(settings: Settings) -> DifyClient:
    return DifyClient(
        settings.dify_base_url,
        settings.dify_api_key,
        connect_timeout=settings.dify_connect_timeout,
        read_timeout=settings.dify_read_timeout,
        max_retries=settings.dify_max_retries,
        retry_backoff=settings.dify_retry_backoff,
        quiet_run_seconds=settings.dify_quiet_run_seconds,
    )


def _authorizer(
    settings: Settings, client: redis.Redis, keys: Keys, users: UserDirectory | None, profile: DifyAppProfile
) -> Authorizer | None:
    if settings.auth_mode != "external" or users is None:
        return None
    api = AuthApiClient(settings.auth_api_url, settings.auth_api_key, settings.auth_timeout)
    return Authorizer(
        client,
        keys,
        users,
        api,
        settings.auth_token_margin,
        exchange_timeout=settings.auth_timeout + settings.database_timeout,
        declared_inputs=profile.declared_inputs,
        bot=settings.bot_name,
    )
