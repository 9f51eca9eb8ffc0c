"""Whether a question may go to Dify, as the enterprise's controls say: the bot's content rules (a question naming
what a rule names is refused) and its daily quotas. A refusal is one finished reply, and no Dify call."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from services import metrics
from services.chat.quotas import Quotas
from services.rules.file import RulesFile
from services.streams.life import BLOCKED, OVER_QUOTA
from services.texts import Texts
from services.wecom.messages import Inbound

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Refusal:
    """What the user is told, and the audit row's outcome."""

    note: str
    outcome: str


class Admission:
    def __init__(self, texts: Texts, bot: str, rules: RulesFile | None = None, quotas: Quotas | None = None):
        self.texts = texts
        self.bot = bot
        self.rules = rules
        self.quotas = quotas

    def refusal(self, message: Inbound, question: str) -> Refusal | None:
        """Why the question may not be asked (None: it may). A blocked question is not counted against a quota.

        Raises:
            redis.RedisError (or a cluster error): Redis did not answer (for the quotas).
        """
        if self.rules is not None and self.rules.current().blocks(question):
            metrics.BLOCKED_QUESTIONS.labels(self.bot).inc()
            logger.info("question refused: it matches a content rule")
            return Refusal(self.texts.say("blocked_question"), BLOCKED)
        over = self.quotas.take(message) if self.quotas is not None else None
        if over is not None:
            renews = f"{over.renews_at:%Y-%m-%d %H:%M} ({over.renews_at.tzinfo})"
            note = self.texts.say(f"over_quota_{over.scope}").format(limit=over.limit, renews=renews)
            return Refusal(note, OVER_QUOTA)
        return None
