"""What the bot says when a user opens its 1:1 chat (`enter_chat`): WELCOME_MESSAGE as text; else the Dify app's
opening statement, as a card whose suggested questions the user taps to ask (services/wecom/cards.py) when the
app suggests some, as text when it does not."""

from __future__ import annotations

from services import metrics
from services.dify.app_profile import DifyAppProfile
from services.texts import Texts
from services.wecom.cards import TITLE_BYTES, card_reply, question_card
from services.wecom.messages import text_reply
from utils.text import utf8_len


class Welcome:
    """`profile`: the Dify app whose opening statement welcomes a user when WELCOME_MESSAGE is empty (None: a bot
    whose answers come from elsewhere, which says nothing then)."""

    def __init__(self, profile: DifyAppProfile | None, texts: Texts, welcome_message: str = "", bot: str = "default"):
        self.bot = bot
        self.profile = profile
        self.texts = texts
        self.welcome_message = welcome_message

    def reply(self) -> dict | None:
        """The enter_chat reply, or None for none."""
        if self.welcome_message:
            return text_reply(self.welcome_message)
        if self.profile is None:
            return None
        parameters = self.profile.parameters(timeout=2.0)
        opening = str(parameters.get("opening_statement") or "").strip()
        questions = [q.strip() for q in parameters.get("suggested_questions") or [] if isinstance(q, str) and q.strip()]
        if not opening:
            return None
        if questions:
            title, _, rest = opening.partition("\n")
            if utf8_len(title) > TITLE_BYTES:  # a long first line stays whole below a short title
                title, rest = self.texts.say("welcome_title"), opening
            metrics.CARDS.labels(self.bot, "welcome").inc()
            return card_reply(question_card(title.strip(), rest.strip(), questions))
        return text_reply(opening)
