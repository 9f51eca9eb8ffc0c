"""One logging setup for the whole process: JSON or readable text, with a per-conversation context on every line.

`log_context(stream=..., msgid=...)` binds fields for the current request or stream thread; every record logged
inside it carries them, plus the replica id (bound too, as `replica`, by whoever handles the request or stream),
so one answer's life can be followed across replicas.
Configured secrets are masked in the output as a last line of defence; code must not log them in the first place.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import sys
import time

import orjson

_context: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar("log_context", default={})  # noqa: B039
_CONTEXT_ORDER = ("stream", "msgid", "task", "user", "chat")
_REDACTED = "***"


@contextlib.contextmanager
def log_context(**fields):
    """Bind `fields` (None values are skipped) to every log record made inside the block."""
    token = _context.set({**_context.get(), **{k: str(v) for k, v in fields.items() if v is not None}})
    try:
        yield
    finally:
        _context.reset(token)


def bind_log_context(**fields) -> None:
    """Add fields to the current context for the rest of it (e.g. the Dify task id once it is known)."""
    _context.set({**_context.get(), **{k: str(v) for k, v in fields.items() if v is not None}})


def current_log_context() -> dict[str, str]:
    """The fields bound right now (a copy)."""
    return dict(_context.get())


class _ContextFilter(logging.Filter):
    def __init__(self, replica_id: str):
        super().__init__()
        self.replica_id = replica_id

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = _context.get()
        # A request or stream binds the replica of the app handling it; the process's id covers the rest.
        record.replica = ctx.get("replica", self.replica_id)
        record.ctx = {k: v for k, v in ctx.items() if k != "replica"} if "replica" in ctx else ctx
        return True


class _Redactor:
    def __init__(self, secrets: list[str]):
        self.secrets = sorted({s for s in secrets if s and len(s) >= 6}, key=len, reverse=True)

    def add(self, secrets: list[str]) -> None:
        self.secrets = sorted({*self.secrets, *(s for s in secrets if s and len(s) >= 6)}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, _REDACTED)
        return text


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, replica, the context fields, and exc when present."""

    def __init__(self, redact: _Redactor):
        super().__init__()
        self.redact = redact

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            "replica": getattr(record, "replica", ""),
        }
        entry.update(getattr(record, "ctx", {}))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return self.redact(orjson.dumps(entry, default=str).decode())


class TextFormatter(logging.Formatter):
    """`time LEVEL logger [stream=.. msgid=..] message` for people reading a terminal."""

    def __init__(self, redact: _Redactor):
        super().__init__("%(asctime)s %(levelname)-7s %(name)s%(ctx_text)s %(message)s", "%H:%M:%S")
        self.redact = redact

    def format(self, record: logging.LogRecord) -> str:
        ctx = getattr(record, "ctx", {})
        ordered = [f"{k}={ctx[k]}" for k in _CONTEXT_ORDER if k in ctx]
        ordered += [f"{k}={v}" for k, v in ctx.items() if k not in _CONTEXT_ORDER]
        record.ctx_text = f" [{' '.join(ordered)}]" if ordered else ""
        return self.redact(super().format(record))


_HANDLER_NAME = "wecom-gateway"


def send_logs_to(stream) -> None:
    """Write the gateway's log lines to `stream` from now on (set up by `setup_logging`)."""
    for handler in logging.getLogger().handlers:
        if handler.get_name() == _HANDLER_NAME:
            handler.setStream(stream)


def redact_also(secrets: list[str]) -> None:
    """Mask these secrets too from now on (a bot added or re-keyed while the process runs: services/bots_watch.py)."""
    for handler in logging.getLogger().handlers:
        if handler.get_name() == _HANDLER_NAME and isinstance(handler.formatter, JsonFormatter | TextFormatter):
            handler.formatter.redact.add(secrets)


def setup_logging(level: str = "INFO", fmt: str = "text", replica_id: str = "", secrets: list[str] = ()) -> None:
    """Configure the root logger once for this process (called again, it replaces the previous setup)."""
    redact = _Redactor(list(secrets))
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(redact) if fmt == "json" else TextFormatter(redact))
    handler.addFilter(_ContextFilter(replica_id))
    handler.set_name(_HANDLER_NAME)
    root = logging.getLogger()
    for existing in list(root.handlers):
        if existing.get_name() == _HANDLER_NAME:
            root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for noisy in ("httpx", "httpcore", "urllib3", "werkzeug"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
