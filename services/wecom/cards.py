"""WeCom's display cards that carry questions (docs/protocol.md, "Template cards"): a `text_notice` card whose
`jump_list` entries (type 3) send a question as the user when tapped. The welcome and the questions Dify suggests
after an answer use it; a form's interactive cards are services/forms/cards.py's."""

from __future__ import annotations

from utils.text import cut_utf8

MAX_QUESTIONS = 3  # a card's jump_list
# WeCom's recommended lengths (the official SDK's types), in bytes of UTF-8: 26 / 112 / 13 characters.
TITLE_BYTES, TEXT_BYTES, LINK_BYTES = 78, 336, 39
QUESTION_BYTES = 200  # jump_list.question: at most 200 bytes


def question_card(title: str, text: str, questions: list[str]) -> dict:
    """A text_notice card: `title`, `text` below it, and one tap-to-ask entry per question (at most three)."""
    card: dict = {"card_type": "text_notice", "main_title": {"title": cut_utf8(title, TITLE_BYTES)}}
    if text:
        card["sub_title_text"] = cut_utf8(text, TEXT_BYTES)
    card["jump_list"] = [
        {"type": 3, "title": cut_utf8(q, LINK_BYTES), "question": cut_utf8(q, QUESTION_BYTES)}
        for q in questions[:MAX_QUESTIONS]
    ]
    return card


def card_reply(card: dict) -> dict:
    """A `template_card` reply (enter_chat's welcome)."""
    return {"msgtype": "template_card", "template_card": card}
