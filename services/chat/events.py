"""WeCom's event callbacks: `enter_chat` gets the welcome, `feedback_event` goes to Dify, a `template_card_event`
(a click on a form's card) to the forms, others are noted.

Events come in both WeCom modes. An event with side effects must not happen twice when WeCom resends a callback or
someone replays it: the callback's replay guard (services/callback/replay_guard.py) finds the repeat, which gets
the same reply without the side effect (`replayed`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import orjson

from services.audit.queue import AuditQueue
from services.audit.rows import row_of_event
from services.chat.welcome import Welcome
from services.dify.feedback import FeedbackService, rating_in_words
from services.forms.answers import FormAnswers
from services.redis_conn import REDIS_FAILURES
from services.streams.life import FEEDBACK, FORM_ACTION
from services.wecom.messages import Inbound

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class EventHandler:
    welcome: Welcome
    feedback: FeedbackService
    forms: FormAnswers
    audit: AuditQueue | None = None  # a rating and a tap on a form's card are rows of the audit trail (None: AUDIT off)
    bot: str = "default"
    owner: str = ""

    def handle(self, message: Inbound) -> dict | None:
        """The reply to an event (only enter_chat has one), after doing what it asks."""
        logger.info("event %s received", message.event_type)
        if message.event_type == "feedback_event":
            self.feedback.submit(message.event)
            self._record(message, FEEDBACK, rating_in_words(message.event))
        reply = self._reply(message)
        if message.event_type == "template_card_event":
            self._record(message, FORM_ACTION, _tap_in_words(message.event))
        return reply

    def _record(self, message: Inbound, kind: str, said: str) -> None:
        if self.audit is not None:
            self.audit.replied(row_of_event(self.bot, message, kind, said, self.owner))

    def replayed(self, message: Inbound) -> dict | None:
        """The reply to a repeated event, without its side effects (the welcome is the same; feedback is not
        forwarded twice; a click claims its form once, whatever the number of times it comes)."""
        return self._reply(message)

    def _reply(self, message: Inbound) -> dict | None:
        if message.event_type == "template_card_event":
            try:
                return self.forms.click(message)
            except REDIS_FAILURES as exc:
                logger.warning("Redis unavailable while answering a click: %s", exc)
                return None
        if message.event_type == "enter_chat":
            return self.welcome.reply()
        return None


def _tap_in_words(event: dict) -> str:
    """A tap on a form's card, as the audit row keeps it: the button's key and the options chosen."""
    chosen = {key: value for key, value in event.items() if key not in ("task_id", "event_key", "card_type")}
    words = str(event.get("event_key") or "")
    return f"{words} {orjson.dumps(chosen, option=orjson.OPT_SORT_KEYS).decode()}" if chosen else words
