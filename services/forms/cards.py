"""A form as WeCom template cards (docs/protocol.md, "Template cards"): the card first shown, and the cards a
click is answered with. Pure functions of the form and the task id.

The actions become the buttons of a `button_interaction` card; a form with select inputs becomes a
`multiple_interaction` card, its selects the selectors and, when it has several actions, one more selector for the
action. Each button's (or the submit button's) key names the card's task and the action, `<task_id>#<action id>`.
"""

from __future__ import annotations

import re

from services.forms.form import MAX_SELECTORS, Form
from services.texts import Texts
from utils.text import cut_utf8

_MARKUP = re.compile(r"\*\*|__|`|^#{1,6}\s*|^>\s?", re.MULTILINE)
ACTION_QUESTION = "__action__"  # the selector of the action, on a multiple_interaction card
DONE_KEY = "done"  # the one (spent) button of an answered card
_STYLES = {"primary": 1, "default": 2, "accent": 3, "ghost": 4}
# WeCom's limits on a card's texts, in bytes of UTF-8 (kept well inside the documented character counts).
_TITLE, _DESC, _SUBTITLE, _BUTTON, _OPTION = 78, 90, 336, 30, 60


def button_key(task_id: str, action_id: str) -> str:
    return f"{task_id}#{action_id}"


def split_key(key: str) -> tuple[str, str]:
    """(task id, action id) of a button's key ("" for a key that is not ours)."""
    task_id, sep, action_id = key.rpartition("#")
    return (task_id, action_id) if sep else ("", "")


def card_selects(form: Form) -> list:
    """The select inputs a card shows (the rest are asked for in the chat)."""
    room = MAX_SELECTORS - (1 if len(form.actions) > 1 else 0)
    return list(form.selects[:room])


def form_card(form: Form, task_id: str, texts: Texts) -> dict:
    """The card a paused run's form is shown as."""
    head = _head(form, texts, "")
    selects = card_selects(form)
    if not selects:
        buttons = [
            {"text": cut_utf8(a.title, _BUTTON), "style": _STYLES.get(a.style, 2), "key": button_key(task_id, a.id)}
            for a in form.actions
        ]
        return {"card_type": "button_interaction", **head, "button_list": buttons, "task_id": task_id}
    select_list = [_selector(i.name, i.label, i.options, i.default) for i in selects]
    if len(form.actions) > 1:
        options = tuple((a.id, a.title) for a in form.actions)
        select_list.append(_selector(ACTION_QUESTION, texts.say("form_action_question"), options, form.actions[0].id))
    submit = form.actions[0].title if len(form.actions) == 1 else texts.say("form_submit_button")
    return {
        "card_type": "multiple_interaction",
        **head,
        "select_list": select_list,
        "submit_button": {"text": cut_utf8(submit, _BUTTON), "key": button_key(task_id, form.actions[0].id)},
        "task_id": task_id,
    }


def answered_card(form: Form, task_id: str, texts: Texts, choice: str, values: dict, note_key: str) -> dict:
    """The card once answered (`note_key`: form_submitted, form_answered): the choice shown, nothing left to tap
    but one spent button."""
    status = texts.say(note_key).format(choice=choice)
    return _spent(form, task_id, texts, status, values)


def closed_card(form: Form, task_id: str, texts: Texts, status: str) -> dict:
    """The card of a form that can no longer be answered (expired, already answered elsewhere)."""
    return _spent(form, task_id, texts, status, {})


def notice_card(task_id: str, title: str, status: str) -> dict:
    """A plain card for a click that finds no form (unknown or forged task id)."""
    return {
        "card_type": "button_interaction",
        "main_title": {"title": cut_utf8(title, _TITLE), "desc": cut_utf8(status, _DESC)},
        "button_list": [{"text": cut_utf8(status, _BUTTON), "style": 2, "key": button_key(task_id, DONE_KEY)}],
        "task_id": task_id,
    }


def _spent(form: Form, task_id: str, texts: Texts, status: str, values: dict) -> dict:
    head = _head(form, texts, status)
    selects = card_selects(form)
    if not selects:
        button = {"text": cut_utf8(status, _BUTTON), "style": 2, "key": button_key(task_id, DONE_KEY)}
        return {"card_type": "button_interaction", **head, "button_list": [button], "task_id": task_id}
    select_list = [
        {**_selector(i.name, i.label, i.options, str(values.get(i.name) or i.default)), "disable": True}
        for i in selects
    ]
    return {
        "card_type": "multiple_interaction",
        **head,
        "select_list": select_list,
        "submit_button": {"text": cut_utf8(status, _BUTTON), "key": button_key(task_id, DONE_KEY)},
        "task_id": task_id,
    }


def _head(form: Form, texts: Texts, status: str) -> dict:
    head = {"main_title": {"title": cut_utf8(form.title or texts.say("form_title"), _TITLE)}}
    if status:
        head["main_title"]["desc"] = cut_utf8(status, _DESC)
    summary = " ".join(_MARKUP.sub("", form.content).split())  # a card shows plain text
    if summary:
        head["sub_title_text"] = cut_utf8(summary, _SUBTITLE)
    return head


def _selector(key: str, title: str, options: tuple[tuple[str, str], ...], selected: str) -> dict:
    selector = {
        "question_key": key,
        "title": cut_utf8(title, _TITLE),
        "option_list": [{"id": option_id, "text": cut_utf8(text, _OPTION)} for option_id, text in options],
    }
    if selected and any(option_id == selected for option_id, _ in options):
        selector["selected_id"] = selected
    return selector
