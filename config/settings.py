"""Typed settings, read once at start-up from the environment and `.env` (the real environment wins).

`demo.env` belongs to the demo: only its entry points (`make demo`, `python -m demo`, `python -m demo.serve`) read
it, through `DEMO_ENV_FILES`. The production app (`app.py`, gunicorn, every `flask --app app` command) never does,
so a checkout's demo bots and credentials cannot reach a production process, and `DEMO_MODE` stays off unless
the environment or `.env` turns it on.

Every field maps to the environment variable of the same name in upper case (`dify_api_key` <- `DIFY_API_KEY`).
A secret (a field kept out of repr) may instead come from a file named by `<VARIABLE>_FILE`, e.g. a mounted Secret.
A bad or missing value raises `SettingsError`, which names every problem found, one line each, each naming its
variable. Outside demo mode nothing falls back to an embedded store: a Redis server is required, and with
`AUTH_MODE=external` the database and the auth API's key too (docs/configuration.md).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from dotenv import dotenv_values

from services.redis_url import EMBEDDED, RedisUrlError, parse_redis_url
from services.rules.rules import RulesError
from services.rules.rules import load as load_rules
from services.wecom.limits import BUBBLE_WINDOW_SECONDS, POLL_WINDOW_SECONDS

PROJECT_ROOT = Path(__file__).resolve().parent.parent
ENV_FILES = (PROJECT_ROOT / ".env",)  # the production app's
DEMO_ENV_FILES = (PROJECT_ROOT / ".env", PROJECT_ROOT / "demo.env")  # the demo's entry points only

_AES_KEY_ALPHABET = re.compile(r"[A-Za-z0-9]*")
EMBEDDED_REDIS = "memory://"
# Demo mode only: fixed local credentials so the simulator and the bot agree with no setup, the embedded store,
# and the local addresses where the demo (`python -m demo`) starts its Dify and auth API stand-ins.
DEMO_DEFAULTS = {
    "wecom_token": "demo-token",
    "wecom_encoding_aes_key": "DemoKeyForLocalRunsOnly0123456789abcdefghij",
    "dify_api_key": "app-demo",
    "auth_api_key": "demo-auth-key",
    "redis_url": EMBEDDED_REDIS,
    "dify_base_url": "http://127.0.0.1:18081/v1",
    "openai_base_url": "http://127.0.0.1:18084/v1",
    "openai_model": "demo-model",
    "auth_api_url": "http://127.0.0.1:18082/auth/token",
    "public_base_url": "http://127.0.0.1:8080",
    "file_link_secret": "demo-file-link-secret-for-local-runs-only",
}

# WeCom's HTTP APIs (the group robot's webhook; WECOM_API_BASE moves them, for tests), and a webhook's name.
WECOM_API = "https://qyapi.weixin.qq.com"
WEBHOOK_NAME = re.compile(r"[a-z0-9_-]{1,32}")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class SettingsError(ValueError):
    """Settings are missing or malformed: `problems` holds one line per problem, each naming its variable."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))


def _default_replica_id() -> str:
    return socket.gethostname()


# DIFY_APP_TYPE's values (docs/protocol.md, Dify): auto, then Dify's own names for its app modes.
DIFY_APP_TYPES = ("auto", "chat", "advanced-chat", "agent-chat", "agent", "workflow", "completion")
# Where a bot's answers come from (services/backends: one package each, tests/test_settings.py holds the two lists
# together; the settings cannot import the backends).
BACKEND_KINDS = ("dify", "openai")


def _var(variable: str, default=None, *, secret: bool = False, from_file: bool = False, factory=None):
    """A setting read from `variable` (or, for a secret and a `from_file` one, from the file `<variable>_FILE`
    names). A secret is kept out of repr() so settings can be logged without leaking it."""
    metadata = {"variable": variable, "secret": secret, "from_file": secret or from_file}
    if factory is not None:
        return field(default_factory=factory, repr=not secret, metadata=metadata)
    return field(default="" if default is None else default, repr=not secret, metadata=metadata)


# --- one bot's settings (a bots file's table may set these for its bot; config/bots.py) -------------------------


@dataclass(frozen=True)
class WecomSettings:
    """How WeCom reaches the bot (callback mode: the URL, Token and EncodingAESKey of its API settings)."""

    mode: str = _var("WECOM_MODE", "callback")  # callback, or long_connection (ConnectionSettings)
    token: str = _var("WECOM_TOKEN", secret=True)
    encoding_aes_key: str = _var("WECOM_ENCODING_AES_KEY", secret=True)
    callback_path: str = _var("WECOM_CALLBACK_PATH", "/wecom/callback")
    receive_id: str = _var("WECOM_RECEIVE_ID")
    timestamp_tolerance: int = _var("WECOM_TIMESTAMP_TOLERANCE", 300)
    name: str = _var("WECOM_BOT_NAME")  # the bot's name in WeCom, taken out of a group's @mention
    welcome_message: str = _var("WELCOME_MESSAGE")
    # The group robots the push API reaches for this bot: a JSON object of name -> webhook URL (its key is the whole
    # credential); a bots file gives them as its [bots.<name>.webhooks] table (config/bots.py).
    webhooks: str = _var("WECOM_WEBHOOKS", secret=True)
    # The self-built app (自建应用) the push API reaches users, departments and tags through (all three, or none).
    app_corp_id: str = _var("WECOM_APP_CORP_ID")
    app_agent_id: int = _var("WECOM_APP_AGENT_ID", 0)
    app_secret: str = _var("WECOM_APP_SECRET", secret=True)

    def webhook_urls(self) -> dict[str, str]:
        """The webhooks by name ({} for none, or for a value that is not an object of strings: a problem at start)."""
        try:
            found = json.loads(self.webhooks) if self.webhooks else {}
        except ValueError:
            return {}
        if not isinstance(found, dict) or not all(isinstance(v, str) for v in found.values()):
            return {}
        return found


@dataclass(frozen=True)
class ConnectionSettings:
    """Long-connection mode: the bot's BotID and Secret, its WebSocket, and WeCom's limits on proactive sends."""

    bot_id: str = _var("WECOM_BOT_ID")
    bot_secret: str = _var("WECOM_BOT_SECRET", secret=True)
    ws_url: str = _var("WECOM_WS_URL", "wss://openws.work.weixin.qq.com")
    heartbeat_seconds: float = _var("WECOM_WS_HEARTBEAT_SECONDS", 30.0)
    lease_seconds: int = _var("WECOM_WS_LEASE_SECONDS", 10)  # the holder's lease: a dead holder is replaced in this
    kick_cooldown_seconds: int = _var("WECOM_WS_KICK_COOLDOWN_SECONDS", 300)  # after a foreign subscriber kicked us
    send_per_minute: int = _var("WECOM_SEND_PER_MINUTE", 30)  # WeCom's limits on the messages of one chat
    send_per_hour: int = _var("WECOM_SEND_PER_HOUR", 1000)


@dataclass(frozen=True)
class DifySettings:
    """The bot's Dify app: where it is, how it is called, and how its answers are shown."""

    base_url: str = _var("DIFY_BASE_URL")
    api_key: str = _var("DIFY_API_KEY", secret=True)
    connect_timeout: float = _var("DIFY_CONNECT_TIMEOUT", 5.0)
    read_timeout: float = _var("DIFY_READ_TIMEOUT", 60.0)
    max_stream_seconds: int = _var("DIFY_MAX_STREAM_SECONDS", 900)
    # A run's events that bring only pings this long are checked against Dify's record of the run (0 = never)
    quiet_run_seconds: float = _var("DIFY_QUIET_RUN_SECONDS", 20.0)
    max_retries: int = _var("DIFY_MAX_RETRIES", 2)
    retry_backoff: float = _var("DIFY_RETRY_BACKOFF", 1.0)
    # A question Dify never took (refused, unreachable) is asked again this long, the bubble waiting (0 = not again)
    retry_seconds: float = _var("DIFY_RETRY_SECONDS", 60.0)
    app_type: str = _var("DIFY_APP_TYPE", "auto")  # docs/protocol.md; auto reads the app's mode from GET /info
    workflow_input: str = _var("DIFY_WORKFLOW_INPUT", "query")  # workflow apps: the question's input variable
    workflow_output: str = _var("DIFY_WORKFLOW_OUTPUT")  # workflow apps: the answer's output ("" = the first string)
    show_reasoning: bool = _var("SHOW_REASONING", False)  # a model's reasoning before the answer, in a <think> block
    show_citations: bool = _var("SHOW_CITATIONS", True)  # the knowledge documents an answer drew on, at its end
    group_conversation: str = _var("GROUP_CONVERSATION", "per_user")  # per_user, or shared: one per group chat
    files_url: str = _var("DIFY_FILES_URL")  # where Dify's relative file URLs point ("" = DIFY_BASE_URL's host)


@dataclass(frozen=True)
class OpenAISettings:
    """The bot's OpenAI-compatible server (BACKEND=openai: LiteLLM, vLLM, Ollama, OpenAI itself...): where it is,
    the model each request names, and what a request carries besides the question. Its timeouts, patience,
    reasoning and group conversations are the answers' settings the Dify group holds (DIFY_*_TIMEOUT,
    DIFY_RETRY_SECONDS, DIFY_MAX_STREAM_SECONDS, SHOW_REASONING, GROUP_CONVERSATION)."""

    base_url: str = _var("OPENAI_BASE_URL")  # e.g. http://litellm.internal/v1
    api_key: str = _var("OPENAI_API_KEY", secret=True)  # sent as a bearer token ("" = no Authorization header)
    model: str = _var("OPENAI_MODEL")
    system_prompt: str = _var("OPENAI_SYSTEM_PROMPT", from_file=True)  # the first message ("" = none)
    history_turns: int = _var("OPENAI_HISTORY_TURNS", 10)  # earlier turns sent with a question (0 = none)
    vision: bool = _var("OPENAI_VISION", False)  # a user's image sent as an image_url part
    extra: str = _var("OPENAI_EXTRA", "{}")  # a JSON object merged into each request (temperature, ...)


@dataclass(frozen=True)
class AuthSettings:
    """Who may ask the bot: external (the user table, then the auth API) or none."""

    mode: str = _var("AUTH_MODE", "external")
    api_url: str = _var("AUTH_API_URL")
    api_key: str = _var("AUTH_API_KEY", secret=True)
    timeout: float = _var("AUTH_TIMEOUT", 5.0)
    token_margin: int = _var("AUTH_TOKEN_MARGIN", 60)
    # The user table or the auth API away is waited out this long before the user gets a note (0 = a note at once)
    retry_seconds: float = _var("AUTH_RETRY_SECONDS", 60.0)


@dataclass(frozen=True)
class AnswerSettings:
    """The bot's answers: how long a bubble streams, what it shows first, how long a conversation is kept, and how
    often one user may ask."""

    window_seconds: int = _var("STREAM_WINDOW_SECONDS", BUBBLE_WINDOW_SECONDS)
    placeholder: str = _var("STREAM_PLACEHOLDER")
    conversation_ttl_seconds: int = _var("CONVERSATION_TTL_SECONDS", 7 * 24 * 3600)
    rate_limit_per_minute: int = _var("RATE_LIMIT_PER_MINUTE", 20)
    max_active_per_bot: int = _var("MAX_ACTIVE_ANSWERS_PER_BOT", 0)  # Dify calls running at once, all replicas; 0 = any
    queue_wait_seconds: float = _var("QUEUE_WAIT_SECONDS", 30.0)  # how long a question over that cap waits in line
    content_rules_file: str = _var("CONTENT_RULES_FILE")  # words and patterns refused in questions, masked in answers


@dataclass(frozen=True)
class QuotaSettings:
    """How many questions a user, and a group chat, may ask the bot a day (0 = no limit), counted across replicas;
    a day ends at midnight in `timezone`."""

    user_messages_per_day: int = _var("QUOTA_USER_MESSAGES_PER_DAY", 0)
    chat_messages_per_day: int = _var("QUOTA_CHAT_MESSAGES_PER_DAY", 0)
    timezone: str = _var("QUOTA_TIMEZONE", "Asia/Shanghai")


@dataclass(frozen=True)
class BotSettings:
    """Everything one bot has of its own. `name` is "default" without a bots file, the table's name with one, and
    "" for a bots file's deployment settings (no bot of their own); it is set by the loaders, never read from the
    environment."""

    name: str = "default"
    language: str = _var("BOT_LANGUAGE", "zh")
    backend: str = _var("BACKEND", "dify")  # where its answers come from: BACKEND_KINDS
    wecom: WecomSettings = field(default_factory=WecomSettings)
    connection: ConnectionSettings = field(default_factory=ConnectionSettings)
    dify: DifySettings = field(default_factory=DifySettings)
    openai: OpenAISettings = field(default_factory=OpenAISettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    answers: AnswerSettings = field(default_factory=AnswerSettings)
    quotas: QuotaSettings = field(default_factory=QuotaSettings)
    # Routes (a bots file's [[bots.<name>.routes]]; config/bots.py): the first that takes a message answers it;
    # none: the bot's own backend, or this reply when it is set.
    no_route_reply: str = _var("NO_ROUTE_REPLY")
    routes: tuple[RouteSettings, ...] = ()
    # Schedules (a bots file's [[bots.<name>.schedules]]; config/schedules.py): questions asked on a timetable,
    # their answers pushed (services/schedules).
    schedules: tuple[ScheduleSettings, ...] = ()

    @property
    def long_connection(self) -> bool:
        return self.wecom.mode == "long_connection"

    def secrets(self) -> list[str]:
        """Every secret of this bot (for the log redactor)."""
        found = [self.wecom.token, self.wecom.encoding_aes_key, self.connection.bot_secret, self.wecom.webhooks]
        found.append(self.wecom.app_secret)
        urls = self.wecom.webhook_urls().values()
        found += [*urls, *map(webhook_key, urls)]
        found += [self.dify.api_key, self.openai.api_key, self.auth.api_key]
        found += [secret for route in self.routes for secret in route.settings.secrets()]
        return [secret for secret in found if secret]


@dataclass(frozen=True)
class RouteSettings:
    """One route of a bot: the messages it takes (every condition it gives holds: the message begins with
    `command`, comes from one of `chats`, from one of `users`) and what answers them: `settings`, its bot's with the
    route's own backend keys (docs/configuration.md, "Routes")."""

    name: str
    settings: BotSettings
    command: str = ""
    chats: tuple[str, ...] = ()
    users: tuple[str, ...] = ()


@dataclass(frozen=True)
class ScheduleSettings:
    """One schedule of a bot: a question asked of its backend (`route`'s: "" the bot's own) at each tick of a
    five-field `cron` in `timezone`, with a workflow's `inputs`, its answer pushed to each of `targets`
    (`webhook:<name>`, `chat:<chatid>`, `user:<userid>`, `party:<id>`, `tag:<id>`); a tick found at most
    `catch_up_seconds` late runs, a later one is skipped (docs/configuration.md, "Schedules")."""

    name: str
    cron: str
    timezone: str
    question: str
    targets: tuple[str, ...]
    inputs: tuple[tuple[str, str], ...] = ()
    route: str = ""
    catch_up_seconds: int = 300


# --- what every bot of the deployment shares --------------------------------------------------------------------


@dataclass(frozen=True)
class RedisSettings:
    url: str = _var("REDIS_URL", secret=True)  # demo mode: memory://, the embedded store
    sentinel_password: str = _var("REDIS_SENTINEL_PASSWORD", secret=True)
    key_prefix: str = _var("REDIS_KEY_PREFIX")
    socket_timeout: float = _var("REDIS_SOCKET_TIMEOUT", 2.0)
    claim_wait_ms: int = _var("REDIS_CLAIM_WAIT_MS", 200)  # Sentinel/Cluster: the replicas hold a claim (0 = no wait)


@dataclass(frozen=True)
class DatabaseSettings:
    url: str = _var("DATABASE_URL", secret=True)  # demo mode: a SQLite file in the instance folder
    read_url: str = _var("DATABASE_READ_URL", secret=True)  # a read replica for the user table; "" = the primary
    timeout: float = _var("DATABASE_TIMEOUT", 5.0)


@dataclass(frozen=True)
class StreamSettings:
    """How long a stream's keys live, how an owner holds its streams, and how many one process runs."""

    key_ttl_seconds: int = _var("STREAM_KEY_TTL_SECONDS", 3600)
    lease_seconds: int = _var("STREAM_LEASE_SECONDS", 15)
    takeover_grace_seconds: float = _var("STREAM_TAKEOVER_GRACE_SECONDS", 3.0)
    max_active: int = _var("STREAM_MAX_ACTIVE", 1000)


@dataclass(frozen=True)
class FileSettings:
    """Files Dify makes, served by signed links (docs/configuration.md)."""

    public_base_url: str = _var("PUBLIC_BASE_URL")  # where users reach the gateway ("" = no links)
    link_secret: str = _var("FILE_LINK_SECRET", secret=True)  # signs the links; the same on every replica
    link_ttl_seconds: int = _var("FILE_LINK_TTL_SECONDS", 3600)
    max_bytes: int = _var("FILE_MAX_BYTES", 20 * 1024 * 1024)  # the largest file a link serves or a connection uploads


@dataclass(frozen=True)
class AuditSettings:
    """The audit trail: a row per message in the database (docs/audit.md)."""

    enabled: str = _var("AUDIT")  # on | off; "" = on whenever there is a database (the demo's SQLite too)
    content: str = _var("AUDIT_CONTENT", "full")  # full | metadata (lengths and SHA-256 of the texts only)
    retention_days: int = _var("AUDIT_RETENTION_DAYS", 180)  # 0 = rows are kept
    api_token: str = _var("AUDIT_API_TOKEN", secret=True)  # GET /api/audit's bearer token ("" = no audit API)


@dataclass(frozen=True)
class Settings:
    """The deployment's settings, grouped by concern, with the bot the environment defines (`bot`).

    Build it with `load_settings()` (the environment) or `Settings.of(**values)`, whose names are the variables'
    in lower case (`dify_api_key=...`), as a bots file's tables spell them.
    """

    demo_mode: bool = _var("DEMO_MODE", False)
    replica_id: str = _var("REPLICA_ID", factory=_default_replica_id)
    host: str = _var("HOST", "127.0.0.1")
    port: int = _var("PORT", 8080)
    max_body_bytes: int = _var("WECOM_MAX_BODY_BYTES", 256 * 1024)
    push_api_token: str = _var("PUSH_API_TOKEN", secret=True)  # POST /api/push's bearer token ("" = no push API)
    admin_token: str = _var("ADMIN_TOKEN", secret=True)  # signs operators in to /admin ("" = no operator's page)
    wecom_api_base: str = _var("WECOM_API_BASE", WECOM_API)  # where WeCom's HTTP APIs are (a stand-in's, in tests)
    bots_file: str = _var("BOTS_FILE")  # a TOML file of bots (config/bots.py); without it the environment's one bot
    log_level: str = _var("LOG_LEVEL", "INFO")
    log_format: str = _var("LOG_FORMAT")
    metrics_port: int = _var("METRICS_PORT", 0)  # 0: /metrics on the main port; else on this port only
    redis: RedisSettings = field(default_factory=RedisSettings)
    database: DatabaseSettings = field(default_factory=DatabaseSettings)
    streams: StreamSettings = field(default_factory=StreamSettings)
    files: FileSettings = field(default_factory=FileSettings)
    audit: AuditSettings = field(default_factory=AuditSettings)
    bot: BotSettings = field(default_factory=BotSettings)

    def __post_init__(self) -> None:
        _validate(self)

    @classmethod
    def of(cls, **values) -> Settings:
        """Settings from values named as the variables in lower case (`redis_url=...`), validated; in demo mode,
        what is left empty takes the demo's local defaults.

        Raises:
            SettingsError: every problem found, one line each.
            TypeError: a name that is no setting.
        """
        unknown = sorted(set(values) - set(VARIABLES))
        if unknown:
            raise TypeError(f"no such setting: {', '.join(unknown)}")
        if values.get("demo_mode"):
            values = {**values, **{name: value for name, value in DEMO_DEFAULTS.items() if not values.get(name)}}
        return _build(cls, values, ())

    def values(self) -> dict:
        """Every setting by its lower-case variable name (the inverse of `of`)."""
        return {name: setting_in(self, variable.path) for name, variable in VARIABLES.items()}

    def replace(self, **changes) -> Settings:
        """A copy with some settings changed, named as in `of` (validated again)."""
        return Settings.of(**{**self.values(), **changes})

    @property
    def audit_on(self) -> bool:
        """Whether messages are recorded: AUDIT=on, or by default whenever there is a database."""
        if self.audit.enabled:
            return self.audit.enabled == "on"
        return bool(self.database.url) or self.demo_mode

    @property
    def instance_id(self) -> str:
        """This process's identity as a stream owner: the replica (pod) name plus the worker's pid."""
        return f"{self.replica_id}:{os.getpid()}"

    def secrets(self) -> list[str]:
        """Every secret these settings hold, passwords inside URLs included (for the log redactor)."""
        found = [self.files.link_secret, self.push_api_token, self.admin_token, self.audit.api_token]
        found.append(self.redis.sentinel_password)
        for url in (self.redis.url, self.database.url, self.database.read_url):
            found.append(_url_password(url))
        return [secret for secret in found if secret] + self.bot.secrets()


@dataclass(frozen=True)
class Variable:
    """One setting: its name (the variable in lower case, as `Settings.of` and a bots file's table spell it), its
    environment variable ("" for `bot_name`, which no variable sets), where it sits in `Settings`, and its type."""

    name: str
    variable: str
    path: tuple[str, ...]
    kind: type
    secret: bool
    from_file: bool = False  # may be read from the file `<variable>_FILE` (a bots file's `<key>_file`) names

    @property
    def per_bot(self) -> bool:
        return self.path[0] == "bot"


_KINDS = {"bool": bool, "int": int, "float": float, "str": str}


def _variables(cls, path: tuple[str, ...]) -> dict[str, Variable]:
    found: dict[str, Variable] = {}
    for f in dataclasses.fields(cls):
        group = _GROUPS.get(str(f.type))
        if group is not None:
            found.update(_variables(group, (*path, f.name)))
        elif "variable" in f.metadata:
            variable = f.metadata["variable"]
            kind = _KINDS[str(f.type)]
            metadata = f.metadata
            found[variable.lower()] = Variable(
                variable.lower(), variable, (*path, f.name), kind, metadata["secret"], metadata["from_file"]
            )
        elif f.name == "name":  # BotSettings.name
            found["bot_name"] = Variable("bot_name", "", (*path, f.name), str, False)
    return found


_GROUPS = {
    cls.__name__: cls
    for cls in (
        WecomSettings,
        ConnectionSettings,
        DifySettings,
        OpenAISettings,
        AuthSettings,
        AnswerSettings,
        QuotaSettings,
        BotSettings,
        RedisSettings,
        DatabaseSettings,
        StreamSettings,
        FileSettings,
        AuditSettings,
    )
}
VARIABLES: dict[str, Variable] = _variables(Settings, ())
_NAME_AT = {variable.path: name for name, variable in VARIABLES.items()}


def _build(cls, values: dict, path: tuple[str, ...]):
    """`cls` (Settings or one of its groups) from the values of its settings; the others keep their defaults."""
    kwargs = {}
    for f in dataclasses.fields(cls):
        group = _GROUPS.get(str(f.type))
        if group is not None:
            kwargs[f.name] = _build(group, values, (*path, f.name))
        elif (name := _NAME_AT.get((*path, f.name))) in values:  # (a bot's routes: set by config/bots.py)
            kwargs[f.name] = values[name]
    return cls(**kwargs)


def setting_in(settings, path: tuple[str, ...]):
    """The setting at `path` (a Variable's, or the rest of one) in `settings` or one of its groups."""
    value = settings
    for step in path:
        value = getattr(value, step)
    return value


class _Problems(list):
    """The problems found so far, one line each."""

    def require(self, condition: bool, variable: str, problem: str) -> None:
        if not condition:
            self.append(f"{variable} {problem}")


def _validate(s: Settings) -> None:
    """Check every value: the deployment's, and (unless these are a bots file's deployment settings, which are no
    bot of their own) the bot's.

    Raises:
        SettingsError: every problem found, one line each.
    """
    problems = _Problems()
    _check_deployment(s, problems)
    if s.bot.name:
        _check_bot(s, problems)
    if problems:
        raise SettingsError(problems)


def _check_deployment(s: Settings, problems: _Problems) -> None:
    """What every bot of the deployment shares: the process, Redis, the database, streams, logging."""
    production = not s.demo_mode
    problems.require(bool(s.replica_id), "REPLICA_ID", "must not be empty")
    problems.require(0 < s.port < 65536, "PORT", "must be a TCP port number")
    problems.require(0 <= s.metrics_port < 65536, "METRICS_PORT", "must be a TCP port number (or 0: none)")
    problems.require(not s.metrics_port or s.metrics_port != s.port, "METRICS_PORT", "must differ from PORT (or be 0)")
    problems.require(s.max_body_bytes >= 1024, "WECOM_MAX_BODY_BYTES", "must be at least 1024")
    _check_redis(s, problems, production)
    for variable, url in (("DATABASE_URL", s.database.url), ("DATABASE_READ_URL", s.database.read_url)):
        if url:
            problems.require(
                urlsplit(url).scheme.startswith(("mysql", "sqlite")),
                variable,
                "must be mysql+pymysql://... or sqlite:///...",
            )
    problems.require(
        not s.database.read_url or bool(s.database.url), "DATABASE_READ_URL", "needs DATABASE_URL (the primary)"
    )
    problems.require(s.database.timeout > 0, "DATABASE_TIMEOUT", "must be positive")

    problems.require(s.streams.key_ttl_seconds >= 600, "STREAM_KEY_TTL_SECONDS", "must be at least 600")
    problems.require(2 <= s.streams.lease_seconds <= 300, "STREAM_LEASE_SECONDS", "must be between 2 and 300")
    problems.require(
        0 <= s.streams.takeover_grace_seconds <= 60, "STREAM_TAKEOVER_GRACE_SECONDS", "must be between 0 and 60"
    )
    problems.require(s.streams.max_active > 0, "STREAM_MAX_ACTIVE", "must be positive")
    problems.require(
        s.log_level.upper() in ("DEBUG", "INFO", "WARNING", "ERROR"),
        "LOG_LEVEL",
        "must be DEBUG, INFO, WARNING or ERROR",
    )
    problems.require(s.log_format in ("", "json", "text"), "LOG_FORMAT", "must be 'json' or 'text'")
    _check_file_links(s, problems)
    _check_audit(s, problems)


def _check_audit(s: Settings, problems: _Problems) -> None:
    audit = s.audit
    problems.require(audit.enabled in ("", "on", "off"), "AUDIT", "must be 'on' or 'off'")
    problems.require(
        audit.enabled != "on" or bool(s.database.url) or s.demo_mode,
        "AUDIT",
        "is 'on' but there is no database: set DATABASE_URL (the rows go to its wecom_audit table)",
    )
    problems.require(audit.content in ("full", "metadata"), "AUDIT_CONTENT", "must be 'full' or 'metadata'")
    problems.require(audit.retention_days >= 0, "AUDIT_RETENTION_DAYS", "must be 0 (keep every row) or more")
    problems.require(
        not audit.api_token or len(audit.api_token) >= 16,
        "AUDIT_API_TOKEN",
        "must be at least 16 characters (or empty: no audit API)",
    )


def _check_file_links(s: Settings, problems: _Problems) -> None:
    problems.require(
        not s.files.public_base_url or _is_http_url(s.files.public_base_url),
        "PUBLIC_BASE_URL",
        "must be an http(s) URL such as https://bot.example.com",
    )
    problems.require(
        not s.files.public_base_url or len(s.files.link_secret) >= 16,
        "FILE_LINK_SECRET",
        "is required with PUBLIC_BASE_URL: at least 16 characters, the same on every replica",
    )
    problems.require(
        60 <= s.files.link_ttl_seconds <= 7 * 24 * 3600, "FILE_LINK_TTL_SECONDS", "must be between 60 and 604800"
    )
    problems.require(s.files.max_bytes > 0, "FILE_MAX_BYTES", "must be positive")
    problems.require(
        not s.push_api_token or len(s.push_api_token) >= 16,
        "PUSH_API_TOKEN",
        "must be at least 16 characters (or empty: no push API)",
    )
    problems.require(_is_http_url(s.wecom_api_base), "WECOM_API_BASE", "must be an http(s) URL")
    problems.require(
        not s.admin_token or len(s.admin_token) >= 16,
        "ADMIN_TOKEN",
        "must be at least 16 characters (or empty: no operator's page)",
    )


def _check_bot(s: Settings, problems: _Problems) -> None:
    """What one bot has of its own: WeCom's credentials, its Dify app, who may ask it, its streams' limits."""
    problems.require(s.bot.language in ("zh", "en"), "BOT_LANGUAGE", "must be 'zh' or 'en'")
    problems.require(s.bot.backend in BACKEND_KINDS, "BACKEND", f"must be one of {', '.join(BACKEND_KINDS)}")
    _check_wecom(s, problems)
    _check_webhooks(s, problems)
    if s.bot.backend == "dify":
        _check_dify(s, problems)
    if s.bot.backend == "openai":
        _check_openai(s, problems)
    _check_auth(s, problems)
    longest = POLL_WINDOW_SECONDS - 5  # a bubble's last reply must reach WeCom before it stops polling
    problems.require(
        1 <= s.bot.answers.window_seconds <= longest,
        "STREAM_WINDOW_SECONDS",
        f"must be between 1 and {longest} (WeCom polls for {POLL_WINDOW_SECONDS} s)",
    )
    problems.require(s.bot.answers.conversation_ttl_seconds >= 60, "CONVERSATION_TTL_SECONDS", "must be at least 60")
    problems.require(s.bot.answers.rate_limit_per_minute >= 0, "RATE_LIMIT_PER_MINUTE", "must be 0 (no limit) or more")
    _check_quotas(s, problems)
    _check_content_rules(s, problems)
    problems.require(
        s.bot.answers.max_active_per_bot >= 0, "MAX_ACTIVE_ANSWERS_PER_BOT", "must be 0 (no cap) or a whole number"
    )
    problems.require(
        0 <= s.bot.answers.queue_wait_seconds <= 300, "QUEUE_WAIT_SECONDS", "must be between 0 and 300 seconds"
    )


def _check_content_rules(s: Settings, problems: _Problems) -> None:
    if not s.bot.answers.content_rules_file:
        return
    try:
        load_rules(s.bot.answers.content_rules_file)
    except RulesError as exc:
        problems.append(f"CONTENT_RULES_FILE {exc}")


def _check_quotas(s: Settings, problems: _Problems) -> None:
    quotas = s.bot.quotas
    for variable, value in (
        ("QUOTA_USER_MESSAGES_PER_DAY", quotas.user_messages_per_day),
        ("QUOTA_CHAT_MESSAGES_PER_DAY", quotas.chat_messages_per_day),
    ):
        problems.require(value >= 0, variable, "must be 0 (no quota) or a whole number of messages")
    try:
        ZoneInfo(quotas.timezone)
    except (ValueError, ZoneInfoNotFoundError):
        problems.append(f"QUOTA_TIMEZONE must be a time zone such as Asia/Shanghai (got {quotas.timezone!r})")


def _check_wecom(s: Settings, problems: _Problems) -> None:
    if s.bot.wecom.mode == "long_connection":
        _check_long_connection(s, problems)
        return
    problems.require(s.bot.wecom.mode == "callback", "WECOM_MODE", "must be 'callback' or 'long_connection'")
    problems.require(bool(s.bot.wecom.token), "WECOM_TOKEN", "is required (the Token from the bot's API settings)")
    key = s.bot.wecom.encoding_aes_key
    if len(key) != 43:
        problems.append(f"WECOM_ENCODING_AES_KEY must be 43 characters (got {len(key)} characters)")
    elif not _AES_KEY_ALPHABET.fullmatch(key):
        others = "".join(sorted({c for c in key if not _AES_KEY_ALPHABET.fullmatch(c)}))
        problems.append(
            f"WECOM_ENCODING_AES_KEY may hold only the letters A-Z, a-z and the digits 0-9 (found {others!r}); "
            "copy it again from the bot's API settings"
        )
    problems.require(s.bot.wecom.callback_path.startswith("/"), "WECOM_CALLBACK_PATH", "must start with '/'")
    problems.require(
        s.bot.wecom.timestamp_tolerance > 0, "WECOM_TIMESTAMP_TOLERANCE", "must be a positive number of seconds"
    )


def _check_webhooks(s: Settings, problems: _Problems) -> None:
    app = s.bot.wecom
    given = [bool(app.app_corp_id), bool(app.app_agent_id), bool(app.app_secret)]
    if any(given) and not all(given):
        problems.append(
            "WECOM_APP_CORP_ID, WECOM_APP_AGENT_ID and WECOM_APP_SECRET go together (the self-built app's corp id, "
            "agent id and secret)"
        )
    problems.require(app.app_agent_id >= 0, "WECOM_APP_AGENT_ID", "must be the app's AgentId, a positive number")
    raw = s.bot.wecom.webhooks
    if not raw:
        return
    try:
        found = json.loads(raw)
    except ValueError:
        found = None
    if not isinstance(found, dict):
        problems.append(
            'WECOM_WEBHOOKS must be a JSON object of names and webhook URLs, such as {"ops": "https://..."}'
        )
        return
    for name, url in found.items():
        if not WEBHOOK_NAME.fullmatch(name):
            problems.append(f"WECOM_WEBHOOKS names {name!r}: a webhook's name is 1 to 32 of a-z, 0-9, _ and -")
        elif not isinstance(url, str) or not _is_http_url(url) or not webhook_key(url):
            problems.append(f"WECOM_WEBHOOKS gives {name!r} no group robot's URL (one with its key=)")


def _check_long_connection(s: Settings, problems: _Problems) -> None:
    problems.require(bool(s.bot.connection.bot_id), "WECOM_BOT_ID", "is required with WECOM_MODE=long_connection")
    problems.require(
        bool(s.bot.connection.bot_secret), "WECOM_BOT_SECRET", "is required with WECOM_MODE=long_connection"
    )
    problems.require(
        urlsplit(s.bot.connection.ws_url).scheme in ("ws", "wss") and bool(urlsplit(s.bot.connection.ws_url).hostname),
        "WECOM_WS_URL",
        "must be a ws:// or wss:// URL",
    )
    problems.require(s.bot.connection.heartbeat_seconds > 0, "WECOM_WS_HEARTBEAT_SECONDS", "must be positive")
    problems.require(2 <= s.bot.connection.lease_seconds <= 60, "WECOM_WS_LEASE_SECONDS", "must be between 2 and 60")
    problems.require(s.bot.connection.kick_cooldown_seconds >= 0, "WECOM_WS_KICK_COOLDOWN_SECONDS", "must be 0 or more")
    problems.require(s.bot.connection.send_per_minute >= 1, "WECOM_SEND_PER_MINUTE", "must be at least 1")
    problems.require(
        s.bot.connection.send_per_hour >= s.bot.connection.send_per_minute,
        "WECOM_SEND_PER_HOUR",
        "must be >= WECOM_SEND_PER_MINUTE",
    )


def _check_dify(s: Settings, problems: _Problems) -> None:
    problems.require(
        s.bot.dify.app_type in DIFY_APP_TYPES, "DIFY_APP_TYPE", f"must be one of {', '.join(DIFY_APP_TYPES)}"
    )
    problems.require(bool(s.bot.dify.workflow_input), "DIFY_WORKFLOW_INPUT", "must name the workflow's input variable")
    problems.require(
        s.bot.dify.group_conversation in ("per_user", "shared"), "GROUP_CONVERSATION", "must be 'per_user' or 'shared'"
    )
    problems.require(
        _is_http_url(s.bot.dify.base_url), "DIFY_BASE_URL", "must be an http(s) URL such as https://api.dify.ai/v1"
    )
    problems.require(bool(s.bot.dify.api_key), "DIFY_API_KEY", "is required (the Dify app's API key, app-...)")
    problems.require(
        not s.bot.dify.files_url or _is_http_url(s.bot.dify.files_url), "DIFY_FILES_URL", "must be an http(s) URL"
    )
    problems.require(s.bot.dify.connect_timeout > 0, "DIFY_CONNECT_TIMEOUT", "must be positive")
    problems.require(s.bot.dify.read_timeout > 0, "DIFY_READ_TIMEOUT", "must be positive")
    problems.require(s.bot.dify.max_stream_seconds > 0, "DIFY_MAX_STREAM_SECONDS", "must be positive")
    problems.require(s.bot.dify.quiet_run_seconds >= 0, "DIFY_QUIET_RUN_SECONDS", "must be 0 (never) or more")
    problems.require(s.bot.dify.max_retries >= 0, "DIFY_MAX_RETRIES", "must be 0 or more")
    problems.require(s.bot.dify.retry_backoff >= 0, "DIFY_RETRY_BACKOFF", "must be 0 or more")
    problems.require(0 <= s.bot.dify.retry_seconds <= 300, "DIFY_RETRY_SECONDS", "must be between 0 and 300")


def _check_openai(s: Settings, problems: _Problems) -> None:
    openai = s.bot.openai
    problems.require(
        _is_http_url(openai.base_url), "OPENAI_BASE_URL", "must be an http(s) URL such as http://litellm.internal/v1"
    )
    problems.require(bool(openai.model), "OPENAI_MODEL", "is required with BACKEND=openai (each request names it)")
    problems.require(openai.history_turns >= 0, "OPENAI_HISTORY_TURNS", "must be 0 (no history) or more")
    try:
        extra = json.loads(openai.extra or "{}")
    except ValueError:
        extra = None
    problems.require(isinstance(extra, dict), "OPENAI_EXTRA", 'must be a JSON object, e.g. {"temperature": 0.2}')
    if isinstance(extra, dict):
        fixed = sorted(set(extra) & {"model", "messages", "stream", "stream_options", "user"})
        problems.require(not fixed, "OPENAI_EXTRA", f"may not set {', '.join(fixed)} (the gateway sets them)")


def _check_redis(s: Settings, problems: _Problems, production: bool) -> None:
    """Outside demo mode, nothing falls back to an embedded store."""
    if not s.redis.url:
        problems.append("REDIS_URL is required: the Redis every replica shares, e.g. redis://redis:6379/0")
    else:
        try:
            target = parse_redis_url(s.redis.url)
        except RedisUrlError as exc:
            problems.append(f"REDIS_URL {exc}")
        else:
            if target.kind == EMBEDDED and production:
                problems.append(
                    "REDIS_URL=memory:// is the demo's embedded store and keeps state inside one process; "
                    "outside demo mode set the Redis every replica shares, e.g. redis://redis:6379/0"
                )
            if target.replicated:  # the claim waits for a replica only on Sentinel and Cluster
                problems.require(
                    s.redis.claim_wait_ms < s.redis.socket_timeout * 1000,
                    "REDIS_CLAIM_WAIT_MS",
                    "must be below REDIS_SOCKET_TIMEOUT (a longer WAIT would time the connection out)",
                )
    problems.require(s.redis.socket_timeout > 0, "REDIS_SOCKET_TIMEOUT", "must be positive")
    problems.require(s.redis.claim_wait_ms >= 0, "REDIS_CLAIM_WAIT_MS", "must be 0 (do not wait) or more")
    problems.require(
        not {"{", "}"} & set(s.redis.key_prefix),
        "REDIS_KEY_PREFIX",
        "must not contain { or } (they would make one Redis Cluster hash slot of every key)",
    )


def _check_auth(s: Settings, problems: _Problems) -> None:
    """Who may ask the bot; with AUTH_MODE=external, outside demo mode, the user table must be a real one."""
    external = s.bot.auth.mode == "external"
    problems.require(s.bot.auth.mode in ("external", "none"), "AUTH_MODE", "must be 'external' or 'none'")
    if not s.database.url and not s.demo_mode and external:
        problems.append(
            "DATABASE_URL is required with AUTH_MODE=external: the wecom_users table every replica reads, "
            "e.g. mysql+pymysql://user:pass@mysql/db"
        )
    if external:
        problems.require(
            _is_http_url(s.bot.auth.api_url), "AUTH_API_URL", "must be an http(s) URL when AUTH_MODE=external"
        )
        problems.require(
            bool(s.bot.auth.api_key),
            "AUTH_API_KEY",
            "is required with AUTH_MODE=external (our credential for the auth API)",
        )
    problems.require(s.bot.auth.timeout > 0, "AUTH_TIMEOUT", "must be positive")
    problems.require(s.bot.auth.token_margin >= 0, "AUTH_TOKEN_MARGIN", "must be 0 or more")
    problems.require(0 <= s.bot.auth.retry_seconds <= 300, "AUTH_RETRY_SECONDS", "must be between 0 and 300")


def _url_password(url: str) -> str:
    """The password in a URL's user info ('' if none), also for the comma-separated hosts of Sentinel/Cluster."""
    userinfo, at, _ = url.partition("://")[2].partition("/")[0].rpartition("@")
    return unquote(userinfo.partition(":")[2]) if at else ""


def webhook_key(url: str) -> str:
    """The key of a group robot's webhook URL ("" for none): the whole credential, kept out of logs."""
    return dict(parse_qsl(urlsplit(url).query)).get("key", "")


def _is_http_url(value: str) -> bool:
    parts = urlsplit(value)
    return parts.scheme in ("http", "https") and bool(parts.netloc)


def _parse(variable: str, raw: str, kind: type):
    """Turn one raw string into the field's type, or raise SettingsError naming the variable."""
    raw = raw.strip()
    if kind is bool:
        if raw.lower() in _TRUE:
            return True
        if raw.lower() in _FALSE:
            return False
        raise SettingsError(f"{variable} must be true or false (got {raw!r})")
    if kind is int:
        try:
            return int(raw)
        except ValueError:
            raise SettingsError(f"{variable} must be a whole number (got {raw!r})") from None
    if kind is float:
        try:
            return float(raw)
        except ValueError:
            raise SettingsError(f"{variable} must be a number (got {raw!r})") from None
    return raw


def read_environment(environ: Mapping[str, str] | None = None, env_files=ENV_FILES) -> dict[str, str]:
    """Merge the env files (later files lose to earlier ones) under the real environment, which wins."""
    merged: dict[str, str] = {}
    for path in reversed(tuple(env_files)):
        if Path(path).is_file():
            merged.update({k: v for k, v in dotenv_values(path).items() if v is not None})
    merged.update(os.environ if environ is None else environ)
    return merged


def load_settings(environ: Mapping[str, str] | None = None, env_files=ENV_FILES) -> Settings:
    """Build `Settings` from the environment and env files.

    Raises:
        SettingsError: every bad or missing variable, one line each.
    """
    values = read_environment(environ, env_files)
    kwargs: dict = {"bot_name": "" if values.get("BOTS_FILE") else "default"}
    problems: list[str] = []
    for name, setting in VARIABLES.items():
        if not setting.variable:
            continue
        try:
            if setting.from_file:
                _read_secret_file(setting.variable, values)
            if setting.variable in values:
                kwargs[name] = _parse(setting.variable, values[setting.variable], setting.kind)
        except SettingsError as exc:
            problems += exc.problems
    try:
        settings = Settings.of(**kwargs)
    except SettingsError as exc:
        problems += exc.problems
    if problems:
        raise SettingsError(problems)
    return settings


def _read_secret_file(variable: str, values: dict[str, str]) -> None:
    """`DIFY_API_KEY_FILE=/run/secrets/dify-api-key` (a mounted Kubernetes Secret) stands for `DIFY_API_KEY`."""
    path = values.get(f"{variable}_FILE")
    if not path:
        return
    if values.get(variable):
        raise SettingsError(f"{variable}_FILE and {variable} are both set; keep one")
    try:
        values[variable] = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else "not UTF-8 text"
        raise SettingsError(f"{variable}_FILE cannot be read ({path}: {reason})") from None
