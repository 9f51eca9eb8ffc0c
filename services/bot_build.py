"""One bot's services, built by one small builder per feature on what every bot shares (`Shared`), so `build_bot`
reads as the order in which a bot comes together: core -> Dify -> files -> forms -> streams -> callback -> the long
connection's parts (that mode only). A new feature is one more builder.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from operator import attrgetter

import redis

from config.bots import bot_keys
from config.settings import AuthSettings, BotSettings, Settings
from services import metrics
from services.admin.live import LiveAnswers
from services.audit.queue import AuditQueue
from services.audit.records import AuditRecords
from services.audit.trail import AuditTrail
from services.auth.api import AuthApiClient
from services.auth.authorizer import Authorizer
from services.auth.users import UserDirectory
from services.backends import BackendParts, build_backend
from services.backends.dify import DifyParts
from services.callback.delivery import CallbackDelivery
from services.callback.envelope import Envelope
from services.callback.handler import CallbackHandler
from services.callback.kept_ends import KeptEnds
from services.callback.replay_guard import ReplayGuard
from services.callback.rest_posts import RestPosts
from services.callback.spool import CallbackSpool
from services.chat.admission import Admission
from services.chat.dispatch import Dispatch
from services.chat.events import EventHandler
from services.chat.intake import MessageIntake
from services.chat.quotas import Quotas
from services.chat.routes import OWN, RouteTable, Routing
from services.chat.welcome import Welcome
from services.dify.app_profile import DifyAppProfile
from services.dify.client import DifyClient
from services.dify.feedback import FeedbackService
from services.files.delivery import FileDelivery
from services.files.fetch import FileFetcher
from services.files.links import LinkSigner
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
from services.longconn.spool import Spool
from services.longconn.uploads import FileSender
from services.media.service import MediaService
from services.push.pushes import BotPushes
from services.replication import Replication
from services.rules.file import RulesFile
from services.streams.backend import Backend
from services.streams.bubble import BubbleRenderer
from services.streams.conversations import ConversationStore
from services.streams.delivery import Delivery
from services.streams.finisher import Finisher
from services.streams.health import BackendHealth
from services.streams.life import follow_outcomes
from services.streams.runner import StreamRunner
from services.streams.service import StreamPolicy, StreamService
from services.streams.slots import AnswerSlots
from services.streams.stop import AnswerStopper
from services.streams.store import StreamStore
from services.streams.turn import TurnDeps, TurnRules
from services.streams.worker import StreamWorker, WorkerDeps
from services.streams.writer import AppendBatcher
from services.texts import Texts
from services.wecom.crypto import WeComCrypto
from services.wecom.response_url import ResponseUrlClient
from utils.on_use import Mapped, OnUse


@dataclass(frozen=True)
class Shared:
    """What every bot's services are built on: the deployment's settings and clients, and this process."""

    settings: Settings  # the deployment's
    client: redis.Redis
    users: UserDirectory | None
    owner: str
    runner: StreamRunner
    appender: AppendBatcher
    replica_wait_ms: int  # how long a write that must outlive a failover waits for a replica (0: none to wait for)
    signer: LinkSigner | None  # the links to the files Dify makes (None without PUBLIC_BASE_URL)
    audit: AuditRecords | None = None  # the audit trail's table (None: AUDIT off)

    def draining(self) -> bool:
        return not self.runner.accepting

    def closed(self) -> bool:
        return self.runner.closed


@dataclass
class Bot:
    """One bot's services: its settings, who may ask it, its streams and callback, how its answers reach the user,
    the files its backend makes, its long connection's work, and the enterprise's controls on it."""

    settings: BotSettings
    profile: DifyAppProfile  # what its Dify app is (a bot on another backend: never asked)
    authorizer: Authorizer | None
    delivery: Delivery  # how answers reach the user besides their bubbles: one per WeCom mode
    streams: StreamService
    callback: CallbackHandler
    health: BackendHealth
    files: FileDelivery  # the files its backend makes: inline, linked, or uploaded
    connection: ConnectionPart | None = None  # long-connection mode: its holder, answer consumer and pushes here
    audit: AuditTrail | None = None  # the audit rows this bot owes (None: AUDIT off)
    quotas: Quotas | None = None  # its daily quotas of questions (None: none)
    closers: tuple[Callable[[], None], ...] = ()  # what `close` releases besides the above: clients, pools

    @property
    def name(self) -> str:
        return self.settings.name

    @property
    def keys(self) -> Keys:
        return self.streams.store.keys

    def report(self) -> dict:
        """The bot's state for /readyz: its mode and callback path, its connection, its auth mode, whether its
        messages are recorded (the audit trail), its backend."""
        return {
            "mode": self.delivery.mode,
            "path": self.settings.wecom.callback_path if self.delivery.mode == "callback" else "",
            **(self.connection.holder.report() if self.connection is not None else {}),
            "auth": self.settings.auth.mode,
            "audit": "on" if self.audit is not None else "off",
            **self.health.report(),
        }

    def start(self) -> None:
        """Start the bot's background work in a serving process: its delivery's watch and, with a long connection,
        its answer consumer (first: the holder queues into it) and connection holder."""
        self.delivery.start(self.streams.look)
        if self.connection is not None:
            self.connection.consumer.start()
            self.connection.holder.start()

    def retire(self) -> None:
        """The bot left BOTS_FILE (or a changed copy of it took its place): a new message is refused (a callback's
        404, a long connection's with a note); the answers under way go on, their polls answered, until the gateway
        closes the bot."""
        self.callback.intake.retired = True

    def hand_over(self) -> None:
        """A changed copy of the bot takes its place: stop the background work the copy does from now on (the
        delivery's watch, the answer consumer, the connection's holder, which hands the WebSocket over to the
        copy's). What the answers under way use stays open until `close`."""
        self.delivery.stop_watching()
        if self.connection is not None:
            self.connection.stop()

    def close(self) -> None:
        self.delivery.close()
        if self.connection is not None:
            self.connection.stop()
            self.connection.consumer.join()  # its last Redis calls before the pool closes
        for close in self.closers:
            close()
        self.streams.poll_path.close()
        self.streams.card_returns.close()


def build_bot(bot: BotSettings, shared: Shared) -> Bot:
    """One bot's services, each part built after the parts it uses."""
    metrics.initialise(
        bot.name, long_connection=bot.long_connection, audit=shared.audit is not None, backend=bot.backend
    )
    core = _core(bot, shared)
    # Each route's Dify app (its client, profile, media), built the first time one of its messages needs it.
    answering = _answering(bot)
    apps = OnUse(answering, lambda route: _dify(answering[route], core))
    dify = apps[OWN]
    declared = dify.profile.declared_inputs if bot.backend == "dify" else dict  # the inputs the app declares
    authorizer = _authorizer(bot.auth, shared, core, declared)
    files = _files(bot, shared, core, dify.links)
    clients = Mapped(apps, attrgetter("client"))
    forms = FormService(FormStore(shared.client, core.keys, core.store.durable), clients, core.texts, bot.name)
    rules = RulesFile(bot.answers.content_rules_file, bot.name) if bot.answers.content_rules_file else None
    streams = _streams(bot, shared, core, apps, files, forms, authorizer, rules)
    quotas = _quotas(bot, shared, core)
    admission = Admission(core.texts, bot.name, rules, quotas)
    callback = _callback(bot, shared, core, apps, streams, forms, authorizer, admission)
    connection = _connection(bot, shared, core, streams.service, callback.handler.dispatch, files)
    closers = [callback.feedback.close, files.fetcher.close, lambda: _close_apps(apps)]
    closers += [authorizer.api.close] if authorizer is not None else []
    closers += [streams.slots.stop] if streams.slots is not None else []
    return Bot(
        settings=bot,
        profile=dify.profile,
        authorizer=authorizer,
        delivery=core.delivery,
        streams=streams.service,
        callback=callback.handler,
        health=dify.health,
        files=files,
        connection=connection,
        audit=AuditTrail(shared.client, core.keys, shared.audit, bot.name, core.audit.held) if core.audit else None,
        quotas=quotas,
        closers=tuple(closers),
    )


@dataclass(frozen=True)
class Core:
    """What every feature of a bot is built on: its texts, its Redis keys, its streams' store, how its answers
    reach the user besides their bubbles (one Delivery per WeCom mode), its callbacks' crypto (callback mode), and
    the audit rows it owes (None: AUDIT off), listed as its streams' events say."""

    name: str
    texts: Texts
    keys: Keys
    store: StreamStore
    delivery: Delivery
    crypto: WeComCrypto | None
    audit: AuditQueue | None


def _core(bot: BotSettings, shared: Shared) -> Core:
    client, deployment = shared.client, shared.settings
    keys = Keys(deployment.redis.key_prefix + bot_keys(bot.name))
    store = StreamStore(
        client,
        keys,
        deployment.streams.key_ttl_seconds,
        deployment.streams.lease_seconds,
        bot.answers.rate_limit_per_minute,
        durable=Replication(client, shared.replica_wait_ms, bot.name),
        takeover_grace_seconds=deployment.streams.takeover_grace_seconds,
    )
    audit = AuditQueue(client, keys, bot.answers.window_seconds).follow(store.life) if shared.audit else None
    if deployment.admin_token:  # the operator's page lists the answers in flight
        LiveAnswers(client, keys, bot.name).follow(store.life)
    follow_outcomes(store.life, lambda event: metrics.STREAM_OUTCOMES.labels(bot.name, event).inc())
    wecom = bot.wecom
    crypto = None if bot.long_connection else WeComCrypto(wecom.token, wecom.encoding_aes_key, wecom.receive_id)
    return Core(bot.name, Texts(bot.language), keys, store, _delivery(bot, shared, keys, store), crypto, audit)


def _delivery(bot: BotSettings, shared: Shared, keys: Keys, store: StreamStore) -> Delivery:
    """Chosen here once for the bot's WeCom mode: a long connection's answer queue and outbox, or a callback bot's
    response_url posts."""
    if bot.long_connection:
        outbox = Outbox(shared.client, keys, store, bot.connection.bot_id)
        queue = JobQueue(store.durable, keys, bot.connection.bot_id, outbox)
        return ConnectionDelivery(queue, outbox, shared.owner, bot.name)
    posts = RestPosts(shared.client, keys, store.durable, ResponseUrlClient(), shared.owner, bot.name)
    ends = KeptEnds(shared.users.engine, bot.name) if shared.users is not None else None
    return CallbackDelivery(posts, store, bot.name, draining=shared.draining, ends=ends).follow(store.life)


@dataclass(frozen=True)
class DifyPart:
    """The bot's Dify app: its client, what the app is (its type, its inputs), how its links and files are read,
    and whether it answers."""

    client: DifyClient
    profile: DifyAppProfile
    links: DifyLinks
    media: MediaService  # the files the user sends, given to the app
    health: BackendHealth


def _answering(bot: BotSettings) -> dict[str, BotSettings]:
    """The settings each of the bot's routes answers with, by route ("": the bot's own)."""
    return {OWN: bot} | {route.name: route.settings for route in bot.routes}


def _route_difys(bot: BotSettings) -> tuple[str, ...]:
    """The addresses of the Difys the bot's routes answer from (and their files'), besides the bot's own."""
    return tuple(
        url
        for r in bot.routes
        if r.settings.backend == "dify"
        for url in (r.settings.dify.base_url, r.settings.dify.files_url)
    )


def _declared_inputs(answering: dict[str, BotSettings], apps: OnUse[DifyPart], route: str) -> Callable[[], dict]:
    """The inputs the Dify app of `route` declares (the user's details it is given); none for another backend's, or
    for a route no longer there (its answer says so)."""
    if route not in answering or answering[route].backend != "dify":
        return dict
    return apps[route].profile.declared_inputs


def _conversation_space(route: str, settings: BotSettings) -> str:
    """Where a route keeps its conversations, apart from the others' (a conversation one app made means nothing to
    another): the bot's own Dify app's under the keys the contract names, "openai" for a bot's own on that
    backend, "<route>.<backend>" for a route's."""
    if not route:
        return "" if settings.backend == "dify" else settings.backend
    return f"{route}.{settings.backend}"


def _close_apps(apps: OnUse[DifyPart]) -> None:
    for app in apps.built():
        app.media.close()
        app.client.close()


def _dify(bot: BotSettings, core: Core) -> DifyPart:
    client = DifyClient(bot.dify)
    profile = DifyAppProfile(client, app_type=bot.dify.app_type)
    links = DifyLinks.of(bot.dify.base_url, bot.dify.files_url)
    return DifyPart(client, profile, links, MediaService(core.crypto, client, profile, bot=bot.name), BackendHealth())


def _authorizer(
    auth: AuthSettings, shared: Shared, core: Core, declared_inputs: Callable[[], dict[str, object]]
) -> Authorizer | None:
    """Who may ask (AUTH_MODE=external): the token cache, the user table, then the auth API (with the user's info
    the bot's app declares inputs for)."""
    if auth.mode != "external" or shared.users is None:
        return None
    return Authorizer(
        shared.client,
        core.keys,
        shared.users,
        AuthApiClient(auth.api_url, auth.api_key, auth.timeout),
        auth.token_margin,
        exchange_timeout=auth.timeout + shared.settings.database.timeout,
        declared_inputs=declared_inputs,
        bot=core.name,
    )


def _files(bot: BotSettings, shared: Shared, core: Core, links: DifyLinks) -> FileDelivery:
    """The files Dify makes, as the user gets them: inline, behind a signed link, or uploaded."""
    files = shared.settings.files
    return FileDelivery(
        bot.name,
        FileFetcher(bot.dify.base_url, bot.dify.files_url, also=_route_difys(bot)),
        FileRefs(shared.client, core.keys),
        core.texts,
        signer=shared.signer,
        max_bytes=files.max_bytes,
        long_connection=bot.long_connection,
        links=links,
    )


@dataclass(frozen=True)
class StreamsPart:
    """The bot's answers: the service that starts, runs and polls them, its routes and the conversations each
    continues, and the stopper of `/stop`."""

    service: StreamService
    routing: Routing
    stopper: AnswerStopper
    slots: AnswerSlots | None  # MAX_ACTIVE_ANSWERS_PER_BOT (None: no cap)


def _streams(
    bot: BotSettings,
    shared: Shared,
    core: Core,
    apps: OnUse[DifyPart],
    files: FileDelivery,
    forms: FormService,
    authorizer: Authorizer | None,
    rules: RulesFile | None,
) -> StreamsPart:
    texts, store, window = core.texts, core.store, bot.answers.window_seconds
    dify, health, answering = apps[OWN], apps[OWN].health, _answering(bot)
    bubble = BubbleRenderer(texts, bot.answers.placeholder, dify.links)
    finisher = Finisher(
        store, core.delivery, bubble, texts, bot.name, window, draining=shared.draining, closed=shared.closed
    )
    ttl = bot.answers.conversation_ttl_seconds
    conversations = {
        route: ConversationStore(shared.client, core.keys, ttl, _conversation_space(route, settings))
        for route, settings in answering.items()
    }

    def backend_of(route: str) -> Backend:
        settings, app, talks = answering[route], apps[route], conversations[route]
        dify_parts = DifyParts(app.client, app.profile, talks, app.media, store, forms, files)
        parts = BackendParts(
            settings, shared.client, core.keys, store, texts, finisher, talks, health, app.media, dify_parts
        )
        return build_backend(settings.backend, parts)

    backends = OnUse(answering, backend_of)  # each route's, built the first time one of its messages needs it
    routing = Routing(RouteTable(bot.routes), tuple(conversations.values()), bot.no_route_reply)
    stopper = AnswerStopper(store, backends, texts, bot.name)
    turn = TurnDeps(store, finisher, texts, bot.name, _slots(bot, shared, core))
    if authorizer is not None:
        turn.prepare = lambda job: authorizer.inputs_for(job.userid, _declared_inputs(answering, apps, job.route))
    deps = WorkerDeps(
        turn=turn,
        appender=shared.appender,
        health=health,
        stopper=stopper,
        append_pace=core.delivery.append_pace,
        append_deadlines=core.delivery.append_deadlines,
        rules=rules,
    )
    limits = {  # a route's own DIFY_MAX_STREAM_SECONDS and DIFY_RETRY_SECONDS, if it gives them
        route: TurnRules(settings.dify.max_stream_seconds, settings.dify.retry_seconds, bot.auth.retry_seconds)
        for route, settings in answering.items()
    }
    worker = StreamWorker(deps, backends, shared.owner, limits)
    policy = StreamPolicy(bot.name, window, shared_groups=bot.dify.group_conversation == "shared")
    service = StreamService(store, shared.runner, worker, texts, bubble, shared.owner, core.delivery, policy)
    return StreamsPart(service, routing, stopper, turn.slots)


def _slots(bot: BotSettings, shared: Shared, core: Core) -> AnswerSlots | None:
    """The bot's cap on answers running in Dify at once across replicas, or None without one."""
    answers = bot.answers
    if not answers.max_active_per_bot:
        return None
    lease = shared.settings.streams.lease_seconds
    slots = AnswerSlots(
        shared.client, core.keys, answers.max_active_per_bot, answers.queue_wait_seconds, lease, bot.name
    )
    core.store.life.left.connect(lambda stream_id: slots.release(stream_id), weak=False)  # however its worker stopped
    return slots


@dataclass(frozen=True)
class CallbackPart:
    """What answers WeCom's callbacks (and a long connection's frames, which carry the same messages)."""

    handler: CallbackHandler
    feedback: FeedbackService


def _callback(
    bot: BotSettings,
    shared: Shared,
    core: Core,
    apps: OnUse[DifyPart],
    streams: StreamsPart,
    forms: FormService,
    authorizer: Authorizer | None,
    admission: Admission,
) -> CallbackPart:
    texts, wecom, dify = core.texts, bot.wecom, apps[OWN]
    # A form's answer may start the rest of its run on a worker again: built once the streams are.
    media = Mapped(apps, attrgetter("media"))
    form_answers = FormAnswers(forms.store, texts, streams.service.continue_form, bot.name, media)
    feedback = FeedbackService(shared.client, core.keys, Mapped(apps, attrgetter("client")))
    events = EventHandler(
        Welcome(dify.profile if bot.backend == "dify" else None, texts, wecom.welcome_message, bot.name),
        feedback,
        form_answers,
        audit=core.audit,
        bot=bot.name,
        owner=shared.owner,
    )
    intake = MessageIntake(
        streams.service,
        streams.routing,
        texts,
        wecom.name,
        form_answers,
        streams.stopper,
        admission,
        **({"authorize": authorizer.inputs_for} if authorizer is not None else {}),
    )
    envelope = Envelope(core.crypto, wecom.timestamp_tolerance)
    # a new message Redis cannot take waits in the database for its bubble's poll (callback/spool.py)
    spool = CallbackSpool(shared.users.engine, bot.name, shared.owner) if shared.users is not None else None
    dispatch = Dispatch(intake, events, streams.service, texts)  # both modes' messages
    replays = ReplayGuard(shared.client, core.keys, 2 * wecom.timestamp_tolerance)
    handler = CallbackHandler(envelope, dispatch, replays, spool)
    return CallbackPart(handler, feedback)


def _quotas(bot: BotSettings, shared: Shared, core: Core) -> Quotas | None:
    """The bot's daily quotas of questions, or None when it has none."""
    q = bot.quotas
    if not (q.user_messages_per_day or q.chat_messages_per_day):
        return None
    return Quotas(shared.client, core.keys, q.user_messages_per_day, q.chat_messages_per_day, q.timezone, bot.name)


@dataclass(frozen=True)
class ConnectionPart:
    """A long-connection bot's background work in this process: the holder of its WebSocket (or stand-by), the
    consumer of its queued answers, and its pushes (sent through the outbox the holder delivers)."""

    holder: ConnectionHolder
    consumer: JobConsumer
    pushes: BotPushes

    def stop(self) -> None:
        """Stop taking answers and hand the WebSocket over (the consumer first: the holder queues into it)."""
        self.consumer.stop()
        self.holder.stop()


def _connection(
    bot: BotSettings,
    shared: Shared,
    core: Core,
    streams: StreamService,
    dispatch: Dispatch,
    files: FileDelivery,
) -> ConnectionPart | None:
    if not isinstance(core.delivery, ConnectionDelivery):
        return None
    client, keys, outbox, connection = shared.client, core.keys, core.delivery.outbox, bot.connection
    lease = BotLease(client, keys, connection.bot_id, shared.owner, connection.lease_seconds)

    def sender(session) -> FileSender:
        return FileSender(bot.name, client, keys, files.refs, files.fetcher, core.texts, core.store.reads.meta, session)

    sends = ChatWindow(client, keys.ws_sends, connection.send_per_minute, connection.send_per_hour)
    redis_timeout = shared.settings.redis.socket_timeout
    # a message read while Redis is away is kept in the database, where any process finds it (longconn/spool.py)
    spool = Spool(shared.users.engine, bot.name, shared.owner) if shared.users is not None else None
    holder = ConnectionHolder(connection, redis_timeout, lease, dispatch, outbox, sends, sender, spool)
    block_ms = max(100, min(1000, int(redis_timeout * 500)))  # the consumer's wait: well within the socket timeout
    consumer = JobConsumer(core.delivery.queue, streams, shared.owner, block_ms)
    quota = ChatWindow(client, keys.push_quota, connection.send_per_minute, connection.send_per_hour)
    pushes = BotPushes(bot.name, client, keys, core.store, outbox, quota, shared.owner)
    return ConnectionPart(holder, consumer, pushes)
