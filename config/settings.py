"""Typed settings, read once at start-up from the environment, `.env` and `demo.env` (the real environment wins).

Every field maps to the environment variable of the same name in upper case (`dify_api_key` <- `DIFY_API_KEY`).
A secret (a field kept out of repr) may instead come from a file named by `<VARIABLE>_FILE`, e.g. a mounted Secret.
A bad or missing value raises `SettingsError` whose message is one line naming the variable.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from dotenv import dotenv_values

PROJECT_ROOT = Path(__file__).resolve().parent.parent
ENV_FILES = (PROJECT_ROOT / ".env", PROJECT_ROOT / "demo.env")

_AES_KEY_PATTERN = re.compile(r"[A-Za-z0-9]{43}")
# Demo mode only: fixed local credentials so the simulator and the bot agree with no setup.
DEMO_DEFAULTS = {
    "wecom_token": "demo-token",
    "wecom_encoding_aes_key": "DemoKeyForLocalRunsOnly0123456789abcdefghij",
    "dify_api_key": "app-demo",
    "auth_api_key": "demo-auth-key",
}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class SettingsError(ValueError):
    """A setting is missing or malformed; the message is one line that names the variable."""


def _secret() -> str:
    """A string field kept out of repr() so settings can be logged without leaking it."""
    return field(default="", repr=False)


def _default_replica_id() -> str:
    return socket.gethostname()


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
    dify_max_retries: int = 2
    dify_retry_backoff: float = 1.0

    # --- Redis ----------------------------------------------------------------------------------------------
    redis_url: str = field(default="memory://", repr=False)
    redis_key_prefix: str = ""
    redis_socket_timeout: float = 2.0

    # --- database and auth ----------------------------------------------------------------------------------
    database_url: str = field(default="", repr=False)
    auth_mode: str = "external"
    auth_api_url: str = ""
    auth_api_key: str = _secret()
    auth_timeout: float = 5.0
    auth_token_margin: int = 60
    database_timeout: float = 5.0

    # --- streams --------------------------------------------------------------------------------------------
    stream_window_seconds: int = 330
    stream_key_ttl_seconds: int = 3600
    stream_lease_seconds: int = 15
    stream_max_active: int = 1000
    stream_placeholder: str = ""
    conversation_ttl_seconds: int = 7 * 24 * 3600
    rate_limit_per_minute: int = 20

    # --- logging --------------------------------------------------------------------------------------------
    log_level: str = "INFO"
    log_format: str = ""

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

    def replace(self, **changes) -> Settings:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def _require(condition: bool, variable: str, problem: str) -> None:
    if not condition:
        raise SettingsError(f"{variable} {problem}")


def _validate(s: Settings) -> None:
    """Check every value; the first problem found raises `SettingsError`."""
    production = not s.demo_mode
    _require(s.bot_language in ("zh", "en"), "BOT_LANGUAGE", "must be 'zh' or 'en'")
    _require(bool(s.replica_id), "REPLICA_ID", "must not be empty")
    _require(0 < s.port < 65536, "PORT", "must be a TCP port number")
    _require(bool(s.wecom_token), "WECOM_TOKEN", "is required (the Token from the bot's API settings)")
    _require(
        bool(_AES_KEY_PATTERN.fullmatch(s.wecom_encoding_aes_key)),
        "WECOM_ENCODING_AES_KEY",
        f"must be 43 characters from A-Z, a-z, 0-9 (got {len(s.wecom_encoding_aes_key)} characters)",
    )
    _require(s.wecom_callback_path.startswith("/"), "WECOM_CALLBACK_PATH", "must start with '/'")
    _require(s.wecom_timestamp_tolerance > 0, "WECOM_TIMESTAMP_TOLERANCE", "must be a positive number of seconds")
    _require(s.wecom_max_body_bytes >= 1024, "WECOM_MAX_BODY_BYTES", "must be at least 1024")

    if production or s.dify_base_url:
        _require(
            _is_http_url(s.dify_base_url), "DIFY_BASE_URL", "must be an http(s) URL such as https://api.dify.ai/v1"
        )
    _require(bool(s.dify_api_key), "DIFY_API_KEY", "is required (the Dify app's API key, app-...)")
    _require(s.dify_connect_timeout > 0, "DIFY_CONNECT_TIMEOUT", "must be positive")
    _require(s.dify_read_timeout > 0, "DIFY_READ_TIMEOUT", "must be positive")
    _require(s.dify_max_stream_seconds > 0, "DIFY_MAX_STREAM_SECONDS", "must be positive")
    _require(s.dify_max_retries >= 0, "DIFY_MAX_RETRIES", "must be 0 or more")
    _require(s.dify_retry_backoff >= 0, "DIFY_RETRY_BACKOFF", "must be 0 or more")

    scheme = urlsplit(s.redis_url).scheme
    _require(
        scheme in ("redis", "rediss", "unix", "memory"),
        "REDIS_URL",
        "must be redis://, rediss://, unix:// or memory://",
    )
    _require(s.redis_socket_timeout > 0, "REDIS_SOCKET_TIMEOUT", "must be positive")

    if s.database_url:
        db_scheme = urlsplit(s.database_url).scheme
        _require(
            db_scheme.startswith(("mysql", "sqlite")), "DATABASE_URL", "must be mysql+pymysql://... or sqlite:///..."
        )
    _require(s.auth_mode in ("external", "none"), "AUTH_MODE", "must be 'external' or 'none'")
    _require(s.auth_timeout > 0, "AUTH_TIMEOUT", "must be positive")
    _require(s.auth_token_margin >= 0, "AUTH_TOKEN_MARGIN", "must be 0 or more")
    _require(s.database_timeout > 0, "DATABASE_TIMEOUT", "must be positive")
    if s.auth_mode == "external" and (production or s.auth_api_url):
        _require(_is_http_url(s.auth_api_url), "AUTH_API_URL", "must be an http(s) URL when AUTH_MODE=external")

    _require(
        1 <= s.stream_window_seconds <= 355,
        "STREAM_WINDOW_SECONDS",
        "must be between 1 and 355 (WeCom polls for 360 s)",
    )
    _require(s.stream_key_ttl_seconds >= 600, "STREAM_KEY_TTL_SECONDS", "must be at least 600")
    _require(2 <= s.stream_lease_seconds <= 300, "STREAM_LEASE_SECONDS", "must be between 2 and 300")
    _require(s.stream_max_active > 0, "STREAM_MAX_ACTIVE", "must be positive")
    _require(s.conversation_ttl_seconds >= 60, "CONVERSATION_TTL_SECONDS", "must be at least 60")
    _require(s.rate_limit_per_minute >= 0, "RATE_LIMIT_PER_MINUTE", "must be 0 (no limit) or more")

    _require(
        s.log_level.upper() in ("DEBUG", "INFO", "WARNING", "ERROR"),
        "LOG_LEVEL",
        "must be DEBUG, INFO, WARNING or ERROR",
    )
    _require(s.log_format in ("", "json", "text"), "LOG_FORMAT", "must be 'json' or 'text'")


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
        SettingsError: one line naming the first bad or missing variable.
    """
    values = read_environment(environ, env_files)
    kwargs = {}
    for f in dataclasses.fields(Settings):
        variable = f.name.upper()
        if not f.repr:
            _read_secret_file(variable, values)
        if variable in values:
            kwargs[f.name] = _parse(variable, values[variable], _FIELD_TYPES[str(f.type)])
    return Settings(**kwargs)


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
