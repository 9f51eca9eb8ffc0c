"""A form as WeCom template cards (docs/protocol.md, "Template cards"): the card first shown, and the cards a
click is answered with. Pure functions of the form and the task id.

The actions become the buttons of a `button_interaction` card, with the form's one select (if it has one) as its
`button_selection`; a form with several selects becomes a `multiple_interaction` card, its selects the selectors
and, when it has several actions, one more selector for the action. Each button's (or the submit button's) key
names the card's task and the action, `<task_id>#<action id>`; each option's id is `o<n>`, its place in the list
(an option's value may be any text, and WeCom takes ids of at most 128 bytes).
"""

from __future__ import annotations

import re

from services.forms.form import OPTION_PREFIX, Form, Input
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


def form_card(form: Form, task_id: str, texts: Texts, status: str = "", values: dict | None = None) -> dict:
    """The card a paused run's form is shown as (`status`: a line under its title; `values`: the options chosen so
    far, selected)."""
    head = _head(form, texts, status)
    selects, values = form.card_selects, values or {}
    if len(selects) <= 1:
        buttons = [
            {"text": cut_utf8(a.title, _BUTTON), "style": _STYLES.get(a.style, 2), "key": button_key(task_id, a.id)}
            for a in form.actions
        ]
        card = {"card_type": "button_interaction", **head, "button_list": buttons, "task_id": task_id}
        if selects:
            card["button_selection"] = _selector(selects[0], str(values.get(selects[0].name) or ""))
        return card
    select_list = [_selector(i, str(values.get(i.name) or "")) for i in selects]
    if len(form.actions) > 1:
        question = texts.say("form_action_question")
        options = tuple((a.id, a.title) for a in form.actions)
        select_list.append(_selector(Input(ACTION_QUESTION, "select", question, options), form.actions[0].id))
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


def _spent(form: Form, task_id: str, texts: Texts, status: str, values: dict) -> dict:
    head = _head(form, texts, status)
    selects = form.card_selects
    spent = [_disabled(_selector(i, str(values.get(i.name) or i.default))) for i in selects]
    if len(selects) <= 1:
        button = {"text": cut_utf8(status, _BUTTON), "style": 2, "key": button_key(task_id, DONE_KEY)}
        card = {"card_type": "button_interaction", **head, "button_list": [button], "task_id": task_id}
        return card | ({"button_selection": spent[0]} if spent else {})
    return {
        "card_type": "multiple_interaction",
        **head,
        "select_list": spent,
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


def _selector(item: Input, selected: str) -> dict:
    """A selector of the input's options (the action's selector: the actions by their ids); `selected`: the value
    (or, for the action, the id) chosen so far."""
    by_id = item.name == ACTION_QUESTION
    options = [(value if by_id else f"{OPTION_PREFIX}{n}", value, text) for n, (value, text) in enumerate(item.options)]
    selector = {
        "question_key": item.name,
        "title": cut_utf8(item.label, _TITLE),
        "option_list": [{"id": option_id, "text": cut_utf8(text, _OPTION)} for option_id, _, text in options],
    }
    chosen = next((option_id for option_id, value, _ in options if value == selected), "")
    if chosen:
        selector["selected_id"] = chosen
    return selector


def _disabled(selector: dict) -> dict:
    return {**selector, "disable": True}
