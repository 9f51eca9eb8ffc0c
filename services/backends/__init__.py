"""The kinds of backend a bot's answers come from (docs/configuration.md, "Backends"): each one package here (Dify's,
an OpenAI-compatible server's), built by its entry in BACKENDS from the parts of the bot built before it
(parts.py). The stream core knows none of them: it asks a bot's backend for answers through its port
(services/streams/backend.py)."""

from __future__ import annotations

from collections.abc import Callable

from services.backends import dify, openai
from services.backends.parts import BackendParts
from services.streams.backend import Backend

__all__ = ["BACKENDS", "BackendParts", "build_backend"]

BACKENDS: dict[str, Callable[[BackendParts], Backend]] = {
    "dify": dify.build,
    "openai": openai.build,
}


def build_backend(kind: str, parts: BackendParts) -> Backend:
    """The bot's backend of `kind` (a bots file's `backend`, checked at start-up against BACKENDS)."""
    return BACKENDS[kind](parts)
