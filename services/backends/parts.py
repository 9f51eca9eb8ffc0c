"""What a bot's backend is built with (services/backends/__init__.py, BACKENDS)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import redis

    from config.settings import BotSettings
    from services.backends.dify.answering import DifyParts
    from services.keys import Keys
    from services.media.service import MediaService
    from services.streams.conversations import ConversationStore
    from services.streams.finisher import Finisher
    from services.streams.health import BackendHealth
    from services.streams.store import StreamStore
    from services.texts import Texts


@dataclass(frozen=True)
class BackendParts:
    """The bot's settings (the groups its backend reads), its Redis keys and streams' store, its texts, finisher,
    conversations and health (how its last answer went, for /readyz), and the parts of a Dify app the bot's other
    features share (None for a bot whose answers come from elsewhere)."""

    settings: BotSettings
    client: redis.Redis
    keys: Keys
    store: StreamStore
    texts: Texts
    finisher: Finisher
    conversations: ConversationStore
    health: BackendHealth
    media: MediaService
    dify: DifyParts | None = None
