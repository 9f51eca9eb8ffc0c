"""One WeCom message, whichever way it came (a callback's POST, a long connection's frame), to the reply it gets: an
event is handled, a new message taken (through a Redis outage for as long as its mode makes that worth it); every
failure behind it becomes a finished reply with a short note, never an exception for the mode to answer.

The modes differ only in what they wrap around this: a callback opens and seals an envelope and answers its
bubble's polls (services/callback/handler.py); a long connection sends the reply on the frame's req_id
(services/longconn/inbound.py). How each waits out Redis is its `Patience`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from services.chat.events import EventHandler
from services.chat.intake import MessageIntake
from services.outage import through_outage
from services.redis_conn import REDIS_FAILURES
from services.streams.life import ERROR
from services.streams.service import StreamService, new_stream_id
from services.texts import Texts
from services.wecom.messages import Inbound, stream_reply

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Patience:
    """How a new message is taken through a Redis outage: the waits between tries and when to stop trying
    (`give_up`), what to do when the first try fails (`on_first_failure`: a long connection keeps its frame where
    another process finds it), and what to answer once the tries are over instead of the note (`kept`: a callback's
    message kept in the database with its bubble open; None when it could not be kept)."""

    delays: tuple[float, ...]
    give_up: Callable[[], bool] | None = None
    on_first_failure: Callable[[], object] | None = None
    kept: Callable[[], dict | None] | None = None


class Dispatch:
    """Answers an authentic message of either mode (a poll of a callback's bubble is the callback's own)."""

    def __init__(self, intake: MessageIntake, events: EventHandler, streams: StreamService, texts: Texts):
        self.intake = intake
        self.events = events
        self.streams = streams
        self.texts = texts

    def __call__(self, message: Inbound, patience: Patience) -> dict | None:
        """The plaintext reply to an event or a new message (None: an event that has none)."""
        try:
            if message.msgtype == "event":
                return self.events.handle(message)
            return self._take(message, patience)
        except REDIS_FAILURES as exc:
            logger.warning("Redis unavailable while taking a message: %s", exc)
            kept = patience.kept() if patience.kept is not None and message.msgtype != "event" else None
            if kept is not None:
                return kept
            note = self.texts.say("store_unavailable")
            return self.streams.finish_at_once(note, message, ERROR, redis_away=True)  # its audit row is held here
        except Exception:
            logger.exception("failed to handle a %s message", message.msgtype)
            if message.msgtype == "event":
                return None
            return stream_reply(message.stream_id or new_stream_id(), self.texts.say("internal_error"), finish=True)

    def _take(self, message: Inbound, patience: Patience) -> dict:
        """Take a new message, again through a Redis outage as `patience` says (a try may be made again: a message
        taken once is found taken).

        Raises:
            redis.RedisError (or a cluster error): Redis stayed away.
        """
        take = partial(self.intake.take, message)
        if patience.on_first_failure is not None:
            try:
                return take()
            except REDIS_FAILURES:
                patience.on_first_failure()
        return through_outage(take, "taking a message", patience.delays, patience.give_up)
