"""An OpenAI-compatible server as a bot's backend (answering.py): its chat completions streamed (client.py), and the
conversations it keeps none of kept in Redis (history.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from services.backends.openai.answering import OpenAIBackend
from services.backends.openai.client import OpenAIClient
from services.backends.openai.history import ConversationTurns

if TYPE_CHECKING:
    from services.backends.parts import BackendParts

__all__ = ["OpenAIBackend", "build"]


def build(parts: BackendParts) -> OpenAIBackend:
    """The bot's OpenAI-compatible server as its backend (OPENAI_*; the timeouts and SHOW_REASONING the bot's
    answers share with a Dify app's)."""
    bot = parts.settings
    client = OpenAIClient(bot.openai, bot.dify.connect_timeout, bot.dify.read_timeout)
    turns = ConversationTurns(parts.client, parts.keys, bot.answers.conversation_ttl_seconds, bot.openai.history_turns)
    return OpenAIBackend(client, turns, parts)
