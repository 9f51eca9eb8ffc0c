"""What the bot says when a user opens its 1:1 chat (`enter_chat`)."""

from __future__ import annotations

from services.dify.app_profile import DifyAppProfile
from services.texts import Texts


class Welcome:
    def __init__(self, profile: DifyAppProfile, texts: Texts, welcome_message: str = ""):
        self.profile = profile
        self.texts = texts
        self.welcome_message = welcome_message

    def text(self) -> str:
        """WELCOME_MESSAGE, else the Dify app's opening statement with its suggested questions, else nothing."""
        if self.welcome_message:
            return self.welcome_message
        parameters = self.profile.parameters(timeout=2.0)
        opening = str(parameters.get("opening_statement") or "").strip()
        questions = [q for q in parameters.get("suggested_questions") or [] if isinstance(q, str) and q.strip()]
        if not opening:
            return ""
        if questions:
            opening += "\n\n" + self.texts.say("welcome_suggestions") + "\n" + "\n".join(f"- {q}" for q in questions)
        return opening
