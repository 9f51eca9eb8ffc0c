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
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

from dotenv import dotenv_values

from services.redis_url import EMBEDDED, RedisUrlError, parse_redis_url
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
    "auth_api_url": "http://127.0.0.1:18082/auth/token",
    "public_base_url": "http://127.0.0.1:8080",
    "file_link_secret": "demo-file-link-secret-for-local-runs-only",
}

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class SettingsError(ValueError):
    """Settings are missing or malformed: `problems` holds one line per problem, each naming its variable."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))


def _secret() -> str:
    """A string field kept out of repr() so settings can be logged without leaking it."""
    return field(default="", repr=False)


def _default_replica_id() -> str:
    return socket.gethostname()


# DIFY_APP_TYPE's values (docs/protocol.md, Dify): auto, then Dify's own names for its app modes.
DIFY_APP_TYPES = ("auto", "chat", "advanced-chat", "agent-chat", "agent", "workflow", "completion")


@dataclass(frozen=True)
class Settings:
    """All configuration of one app instance. Tests build it directly; production uses `load_settings()`."""

    # --- mode -----------------------------------------------------------------------------------------------
    demo_mode: bool = False
    bot_language: str = "zh"
    replica_id: str = field(default_factory=_default_replica_id)
    host: str = "127.0.0.1"
    port: int = 8080

    # --- WeCom ----------------------------------------------------------------------------------------------
    wecom_mode: str = "callback"  # how WeCom reaches the bot: callback, or long_connection (docs/configuration.md)
    wecom_bot_id: str = ""  # long_connection: the bot's BotID
    wecom_bot_secret: str = _secret()  # long_connection: the bot's Secret
    wecom_ws_url: str = "wss://openws.work.weixin.qq.com"
    wecom_ws_heartbeat_seconds: float = 30.0
    wecom_ws_lease_seconds: int = 10  # the connection holder's lease: a dead holder is replaced within this
    wecom_ws_kick_cooldown_seconds: int = 300  # after a foreign subscriber kicked us: no reconnect for this long
    # WeCom's limits on the messages of one chat (docs/configuration.md): proactive sends wait within them
    wecom_send_per_minute: int = 30
    wecom_send_per_hour: int = 1000
    wecom_token: str = _secret()
    wecom_encoding_aes_key: str = _secret()
    wecom_callback_path: str = "/wecom/callback"
    wecom_receive_id: str = ""
    wecom_timestamp_tolerance: int = 300
    wecom_max_body_bytes: int = 256 * 1024
    wecom_bot_name: str = ""
    welcome_message: str = ""

    # --- Dify -----------------------------------------------------------------------------------------------
    dify_base_url: str = ""
    dify_api_key: str = _secret()
    dify_connect_timeout: float = 5.0
    dify_read_timeout: float = 60.0
    dify_max_stream_seconds: int = 900
    # A run's events that bring only pings this long are checked against Dify's record of the run (0 = never)
    dify_quiet_run_seconds: float = 20.0
    dify_max_retries: int = 2
    dify_retry_backoff: float = 1.0
    dify_app_type: str = "auto"  # docs/protocol.md; auto reads the app's mode from GET /info
    dify_workflow_input: str = "query"  # workflow apps: the input variable the question goes into
    dify_workflow_output: str = ""  # workflow apps: the output holding the answer ("" = the first string output)
    show_reasoning: bool = False  # show a model's reasoning before the answer, in a <think> block
    show_citations: bool = True  # the knowledge documents an answer drew on, listed at its end
    group_conversation: str = "per_user"  # per_user: each member's own Dify conversation; shared: one per group
    dify_files_url: str = ""  # where Dify's relative file URLs point ("" = the scheme and host of DIFY_BASE_URL)

    # --- files Dify makes, served by signed links (docs/configuration.md) --------------------------------------
    public_base_url: str = ""  # where users reach the gateway, e.g. https://bot.example.com ("" = no links)
    file_link_secret: str = _secret()  # signs the links; the same on every replica
    push_api_token: str = _secret()  # the bearer token of POST /api/push ("" = no push API: it answers 404)
    file_link_ttl_seconds: int = 3600
    file_max_bytes: int = 20 * 1024 * 1024  # the largest file a link serves, or a long connection uploads

    # --- Redis ----------------------------------------------------------------------------------------------
    redis_url: str = field(default="", repr=False)  # demo mode: memory://, the embedded store
    redis_sentinel_password: str = _secret()
    redis_key_prefix: str = ""
    redis_socket_timeout: float = 2.0
    redis_claim_wait_ms: int = 200  # Sentinel/Cluster: wait for a replica to hold a durable write (0 = do not)

    # --- database and auth ----------------------------------------------------------------------------------
    database_url: str = field(default="", repr=False)  # demo mode: a SQLite file in the instance folder
    database_read_url: str = field(default="", repr=False)  # a read replica for the user table; "" = the primary
    auth_mode: str = "external"
    auth_api_url: str = ""
    auth_api_key: str = _secret()
    auth_timeout: float = 5.0
    auth_token_margin: int = 60
    database_timeout: float = 5.0

    # --- streams --------------------------------------------------------------------------------------------
    stream_window_seconds: int = BUBBLE_WINDOW_SECONDS
    stream_key_ttl_seconds: int = 3600
    stream_lease_seconds: int = 15
    stream_takeover_grace_seconds: float = 3.0
    stream_max_active: int = 1000
    stream_placeholder: str = ""
    conversation_ttl_seconds: int = 7 * 24 * 3600
    rate_limit_per_minute: int = 20

    # --- bots (docs/configuration.md) -----------------------------------------------------------------------
    bots_file: str = ""  # a TOML file of bots (config/bots.py); without it the environment defines one bot
    # Which bot these settings are ("default" without a bots file); "" for a bots file's deployment settings,
    # which are no bot of their own. Set by the loaders, never read from the environment.
    bot_name: str = "default"

    # --- logging and metrics --------------------------------------------------------------------------------
    log_level: str = "INFO"
    log_format: str = ""
    metrics_port: int = 0  # 0: /metrics on the main port; else on this port only

    def __post_init__(self) -> None:
        if self.demo_mode:
            for name, value in DEMO_DEFAULTS.items():
                if not getattr(self, name):
                    object.__setattr__(self, name, value)
        _validate(self)

    @property
    def instance_id(self) -> str:
        """This process's identity as a stream owner: the replica (pod) name plus the worker's pid."""
        return f"{self.replica_id}:{os.getpid()}"

    def secrets(self) -> list[str]:
        """Every secret these settings hold, passwords inside URLs included (for the log redactor)."""
        found = [self.wecom_token, self.wecom_encoding_aes_key, self.wecom_bot_secret, self.dify_api_key]
        found.append(self.auth_api_key)
        found.append(self.file_link_secret)
        found.append(self.push_api_token)
        found.append(self.redis_sentinel_password)
        for url in (self.redis_url, self.database_url, self.database_read_url):
            found.append(_url_password(url))
        return [secret for secret in found if secret]

    def replace(self, **changes) -> Settings:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


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
    if s.bot_name:
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
    problems.require(s.wecom_max_body_bytes >= 1024, "WECOM_MAX_BODY_BYTES", "must be at least 1024")
    _check_redis(s, problems, production)
    for variable, url in (("DATABASE_URL", s.database_url), ("DATABASE_READ_URL", s.database_read_url)):
        if url:
            problems.require(
                urlsplit(url).scheme.startswith(("mysql", "sqlite")),
                variable,
                "must be mysql+pymysql://... or sqlite:///...",
            )
    problems.require(
        not s.database_read_url or bool(s.database_url), "DATABASE_READ_URL", "needs DATABASE_URL (the primary)"
    )
    problems.require(s.database_timeout > 0, "DATABASE_TIMEOUT", "must be positive")

    problems.require(s.stream_key_ttl_seconds >= 600, "STREAM_KEY_TTL_SECONDS", "must be at least 600")
    problems.require(2 <= s.stream_lease_seconds <= 300, "STREAM_LEASE_SECONDS", "must be between 2 and 300")
    problems.require(
        0 <= s.stream_takeover_grace_seconds <= 60, "STREAM_TAKEOVER_GRACE_SECONDS", "must be between 0 and 60"
    )
    problems.require(s.stream_max_active > 0, "STREAM_MAX_ACTIVE", "must be positive")
    problems.require(
        s.log_level.upper() in ("DEBUG", "INFO", "WARNING", "ERROR"),
        "LOG_LEVEL",
        "must be DEBUG, INFO, WARNING or ERROR",
    )
    problems.require(s.log_format in ("", "json", "text"), "LOG_FORMAT", "must be 'json' or 'text'")
    _check_file_links(s, problems)


def _check_file_links(s: Settings, problems: _Problems) -> None:
    problems.require(
        not s.public_base_url or _is_http_url(s.public_base_url),
        "PUBLIC_BASE_URL",
        "must be an http(s) URL such as https://bot.example.com",
    )
    problems.require(
        not s.public_base_url or len(s.file_link_secret) >= 16,
        "FILE_LINK_SECRET",
        "is required with PUBLIC_BASE_URL: at least 16 characters, the same on every replica",
    )
    problems.require(
        60 <= s.file_link_ttl_seconds <= 7 * 24 * 3600, "FILE_LINK_TTL_SECONDS", "must be between 60 and 604800"
    )
    problems.require(s.file_max_bytes > 0, "FILE_MAX_BYTES", "must be positive")
    problems.require(
        not s.push_api_token or len(s.push_api_token) >= 16,
        "PUSH_API_TOKEN",
        "must be at least 16 characters (or empty: no push API)",
    )


def _check_bot(s: Settings, problems: _Problems) -> None:
    """What one bot has of its own: WeCom's credentials, its Dify app, who may ask it, its streams' limits."""
    problems.require(s.bot_language in ("zh", "en"), "BOT_LANGUAGE", "must be 'zh' or 'en'")
    _check_wecom(s, problems)
    _check_dify(s, problems)
    _check_auth(s, problems)
    longest = POLL_WINDOW_SECONDS - 5  # a bubble's last reply must reach WeCom before it stops polling
    problems.require(
        1 <= s.stream_window_seconds <= longest,
        "STREAM_WINDOW_SECONDS",
        f"must be between 1 and {longest} (WeCom polls for {POLL_WINDOW_SECONDS} s)",
    )
    problems.require(s.conversation_ttl_seconds >= 60, "CONVERSATION_TTL_SECONDS", "must be at least 60")
    problems.require(s.rate_limit_per_minute >= 0, "RATE_LIMIT_PER_MINUTE", "must be 0 (no limit) or more")


def _check_wecom(s: Settings, problems: _Problems) -> None:
    if s.wecom_mode == "long_connection":
        _check_long_connection(s, problems)
        return
    problems.require(s.wecom_mode == "callback", "WECOM_MODE", "must be 'callback' or 'long_connection'")
    problems.require(bool(s.wecom_token), "WECOM_TOKEN", "is required (the Token from the bot's API settings)")
    key = s.wecom_encoding_aes_key
    if len(key) != 43:
        problems.append(f"WECOM_ENCODING_AES_KEY must be 43 characters (got {len(key)} characters)")
    elif not _AES_KEY_ALPHABET.fullmatch(key):
        others = "".join(sorted({c for c in key if not _AES_KEY_ALPHABET.fullmatch(c)}))
        problems.append(
            f"WECOM_ENCODING_AES_KEY may hold only the letters A-Z, a-z and the digits 0-9 (found {others!r}); "
            "copy it again from the bot's API settings"
        )
    problems.require(s.wecom_callback_path.startswith("/"), "WECOM_CALLBACK_PATH", "must start with '/'")
    problems.require(
        s.wecom_timestamp_tolerance > 0, "WECOM_TIMESTAMP_TOLERANCE", "must be a positive number of seconds"
    )


def _check_long_connection(s: Settings, problems: _Problems) -> None:
    problems.require(bool(s.wecom_bot_id), "WECOM_BOT_ID", "is required with WECOM_MODE=long_connection")
    problems.require(bool(s.wecom_bot_secret), "WECOM_BOT_SECRET", "is required with WECOM_MODE=long_connection")
    problems.require(
        urlsplit(s.wecom_ws_url).scheme in ("ws", "wss") and bool(urlsplit(s.wecom_ws_url).hostname),
        "WECOM_WS_URL",
        "must be a ws:// or wss:// URL",
    )
    problems.require(s.wecom_ws_heartbeat_seconds > 0, "WECOM_WS_HEARTBEAT_SECONDS", "must be positive")
    problems.require(2 <= s.wecom_ws_lease_seconds <= 60, "WECOM_WS_LEASE_SECONDS", "must be between 2 and 60")
    problems.require(s.wecom_ws_kick_cooldown_seconds >= 0, "WECOM_WS_KICK_COOLDOWN_SECONDS", "must be 0 or more")
    problems.require(s.wecom_send_per_minute >= 1, "WECOM_SEND_PER_MINUTE", "must be at least 1")
    problems.require(
        s.wecom_send_per_hour >= s.wecom_send_per_minute, "WECOM_SEND_PER_HOUR", "must be >= WECOM_SEND_PER_MINUTE"
    )


def _check_dify(s: Settings, problems: _Problems) -> None:
    problems.require(s.dify_app_type in DIFY_APP_TYPES, "DIFY_APP_TYPE", f"must be one of {', '.join(DIFY_APP_TYPES)}")
    problems.require(bool(s.dify_workflow_input), "DIFY_WORKFLOW_INPUT", "must name the workflow's input variable")
    problems.require(
        s.group_conversation in ("per_user", "shared"), "GROUP_CONVERSATION", "must be 'per_user' or 'shared'"
    )
    problems.require(
        _is_http_url(s.dify_base_url), "DIFY_BASE_URL", "must be an http(s) URL such as https://api.dify.ai/v1"
    )
    problems.require(bool(s.dify_api_key), "DIFY_API_KEY", "is required (the Dify app's API key, app-...)")
    problems.require(not s.dify_files_url or _is_http_url(s.dify_files_url), "DIFY_FILES_URL", "must be an http(s) URL")
    problems.require(s.dify_connect_timeout > 0, "DIFY_CONNECT_TIMEOUT", "must be positive")
    problems.require(s.dify_read_timeout > 0, "DIFY_READ_TIMEOUT", "must be positive")
    problems.require(s.dify_max_stream_seconds > 0, "DIFY_MAX_STREAM_SECONDS", "must be positive")
    problems.require(s.dify_quiet_run_seconds >= 0, "DIFY_QUIET_RUN_SECONDS", "must be 0 (never) or more")
    problems.require(s.dify_max_retries >= 0, "DIFY_MAX_RETRIES", "must be 0 or more")
    problems.require(s.dify_retry_backoff >= 0, "DIFY_RETRY_BACKOFF", "must be 0 or more")


def _check_redis(s: Settings, problems: _Problems, production: bool) -> None:
    """Outside demo mode, nothing falls back to an embedded store."""
    if not s.redis_url:
        problems.append("REDIS_URL is required: the Redis every replica shares, e.g. redis://redis:6379/0")
    else:
        try:
            target = parse_redis_url(s.redis_url)
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
                    s.redis_claim_wait_ms < s.redis_socket_timeout * 1000,
                    "REDIS_CLAIM_WAIT_MS",
                    "must be below REDIS_SOCKET_TIMEOUT (a longer WAIT would time the connection out)",
                )
    problems.require(s.redis_socket_timeout > 0, "REDIS_SOCKET_TIMEOUT", "must be positive")
    problems.require(s.redis_claim_wait_ms >= 0, "REDIS_CLAIM_WAIT_MS", "must be 0 (do not wait) or more")
    problems.require(
        not {"{", "}"} & set(s.redis_key_prefix),
        "REDIS_KEY_PREFIX",
        "must not contain { or } (they would make one Redis Cluster hash slot of every key)",
    )


def _check_auth(s: Settings, problems: _Problems) -> None:
    """Who may ask the bot; with AUTH_MODE=external, outside demo mode, the user table must be a real one."""
    external = s.auth_mode == "external"
    problems.require(s.auth_mode in ("external", "none"), "AUTH_MODE", "must be 'external' or 'none'")
    if not s.database_url and not s.demo_mode and external:
        problems.append(
            "DATABASE_URL is required with AUTH_MODE=external: the wecom_users table every replica reads, "
            "e.g. mysql+pymysql://user:pass@mysql/db"
        )
    if external:
        problems.require(_is_http_url(s.auth_api_url), "AUTH_API_URL", "must be an http(s) URL when AUTH_MODE=external")
        problems.require(
            bool(s.auth_api_key),
            "AUTH_API_KEY",
            "is required with AUTH_MODE=external (our credential for the auth API)",
        )
    problems.require(s.auth_timeout > 0, "AUTH_TIMEOUT", "must be positive")
    problems.require(s.auth_token_margin >= 0, "AUTH_TOKEN_MARGIN", "must be 0 or more")


def _url_password(url: str) -> str:
    """The password in a URL's user info ('' if none), also for the comma-separated hosts of Sentinel/Cluster."""
    userinfo, at, _ = url.partition("://")[2].partition("/")[0].rpartition("@")
    return unquote(userinfo.partition(":")[2]) if at else ""


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


_FIELD_TYPES = {"bool": bool, "int": int, "float": float, "str": str}


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
    for f in dataclasses.fields(Settings):
        if f.name == "bot_name":
            continue
        variable = f.name.upper()
        try:
            if not f.repr:
                _read_secret_file(variable, values)
            if variable in values:
                kwargs[f.name] = _parse(variable, values[variable], _FIELD_TYPES[str(f.type)])
        except SettingsError as exc:
            problems += exc.problems
    try:
        settings = Settings(**kwargs)
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
