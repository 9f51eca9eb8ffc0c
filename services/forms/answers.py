"""A form's answer, on whichever replica WeCom calls: a click on its card, or a typed value or choice. Either claims
the form once and answers at once (the click with the updated card within WeCom's 5 s); whoever claims it goes on
with the run: the worker waiting in the bubble, or, once the bubble is over, a new answer (`go_on_separately`).
The worker's side (open, wait, submit) is in service.py.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from services import metrics
from services.forms.cards import ACTION_QUESTION, DONE_KEY, answered_card, closed_card, form_card, split_key
from services.forms.service import typed_choices
from services.forms.store import EXPIRED, OPEN, SEPARATELY, FormRecord, FormStore
from services.redis_conn import REDIS_FAILURES
from services.texts import Texts
from services.wecom.messages import Inbound

logger = logging.getLogger(__name__)

# Goes on with a form's run as a new message (the bubble is gone): the form, and where the message goes.
GoOnSeparately = Callable[[FormRecord, str], None]


def update_reply(card: dict, only_for: str = "") -> dict:
    """The answer to a click: the card as it is now (`only_for`: change it for that user only)."""
    reply = {"response_type": "update_template_card", "template_card": card}
    if only_for:
        reply["userids"] = [only_for]
    return reply


class FormAnswers:
    def __init__(self, store: FormStore, texts: Texts, go_on_separately: GoOnSeparately, bot: str = "default"):
        self.store = store
        self.texts = texts
        self.go_on_separately = go_on_separately  # StreamService.continue_form
        self.bot = bot

    def click(self, message: Inbound) -> dict | None:
        """The reply to a `template_card_event`: the card updated (within WeCom's 5 s), after claiming the form
        once. A click on a card that is not one of ours changes nothing (None: an empty reply).

        Raises:
            redis.RedisError: Redis did not answer (the caller answers empty; WeCom does not resend clicks).
        """
        event = message.event
        task_id = str(event.get("task_id") or "")
        key_task, action_id = split_key(str(event.get("event_key") or ""))
        record = self.store.load(task_id) if key_task == task_id else None
        if record is None:
            self._count("unknown")
            logger.info("click on a card that is not one of ours: ignored")
            return None
        form = record.form
        if action_id == DONE_KEY or record.status != OPEN:
            return self._after_the_fact(record, message.userid)
        selections = _selections(event)
        action = form.action(selections.pop(ACTION_QUESTION, "") or action_id)
        if action is None:
            self._count("unknown")
            return None
        values = {**record.values, **{i.name: selections[i.name] for i in form.selects if i.name in selections}}
        if record.userid == message.userid and record.missing_texts:
            self._count("needs_text")
            card = form_card(form, task_id, self.texts)
            card["main_title"]["desc"] = self.texts.say("form_needs_values").format(label=record.missing_texts[0].label)
            return update_reply(card, only_for=message.userid)
        return self._claim(record, message, action.id, values)

    def _after_the_fact(self, record: FormRecord, who: str) -> dict:
        """A click on a card already answered (a double click, a spent button) or expired: show how it ended."""
        if record.status == EXPIRED or (record.status == OPEN and record.form.expired()):
            self._count("expired")
            return update_reply(closed_card(record.form, record.task_id, self.texts, self._expired_status()))
        self._count("already" if record.userid == who else "not_yours")
        return update_reply(self._answered(record, record.choice, record.values, "form_answered"))

    def _claim(self, record: FormRecord, message: Inbound, action: str, values: dict) -> dict:
        """Claim the form for a click, and the card that answers it."""
        outcome, choice = self._claim_form(record, message, action, values)
        form, task_id = record.form, record.task_id
        if outcome == "claimed":
            return update_reply(self._answered(record, action, values, "form_submitted"))
        if outcome == "not_yours":
            return update_reply(
                closed_card(form, task_id, self.texts, self.texts.say("form_not_yours")), message.userid
            )
        if outcome == "expired":
            return update_reply(closed_card(form, task_id, self.texts, self._expired_status()))
        return update_reply(self._answered(record, choice, record.values, "form_answered"))

    def _claim_form(self, record: FormRecord, message: Inbound, action: str, values: dict) -> tuple[str, str]:
        """Claim the form once, for `action` with `values`, by the message's user; whoever claims it first starts
        the rest of the run where the bubble no longer waits for it. Returns (outcome, the form's choice)."""
        outcome, detail, choice = self.store.claim(record, message.userid, action, values)
        self._count(outcome)
        task_id = record.task_id
        if outcome == "claimed":
            metrics.FORM_WAIT_SECONDS.labels(self.bot).observe(max(0.0, time.time() - record.opened_at))
            logger.info("form %s answered (%s); the run goes on in the %s", task_id, action, detail)
            self._stop_typing(record)
            record.choice, record.values = action, values
            if detail == SEPARATELY:
                self.go_on_separately(record, message.response_url)
        elif outcome == "not_yours":
            logger.info("form %s: a tap by someone other than the asker changes nothing", task_id)
        elif outcome == "expired":
            self._stop_typing(record)
        return outcome, choice

    def _answered(self, record: FormRecord, action_id: str, values: dict, note_key: str) -> dict:
        action = record.form.action(action_id)
        title = action.title if action is not None else action_id
        return answered_card(record.form, record.task_id, self.texts, title, values, note_key)

    def _expired_status(self) -> str:
        return self.texts.say("form_expired_card")

    def _count(self, outcome: str) -> None:
        metrics.FORM_CLICKS.labels(self.bot, outcome).inc()

    def _stop_typing(self, record: FormRecord) -> None:
        try:
            self.store.stop_typing(record)
        except REDIS_FAILURES as exc:
            logger.warning("could not clear the typed-answer pointer (%s); it expires with the form", exc)

    def waiting_for(self, message: Inbound) -> FormRecord | None:
        """The form whose values (or choice) this user types in this chat next, if one waits; None: the message is
        a question.

        Raises:
            redis.RedisError: Redis did not answer.
        """
        task_id = self.store.typing(message.aibotid, message.chatid or "single", message.userid)
        record = self.store.load(task_id) if task_id else None
        if record is None or record.status != OPEN or record.form.expired():
            if record is not None:
                self._stop_typing(record)
            return None
        return record

    def typed(self, record: FormRecord, message: Inbound, text: str) -> str:
        """Take a typed answer to `record` (the next missing value, else the choice of an action); the note to
        reply with.

        Raises:
            redis.RedisError: Redis did not answer.
        """
        form = record.form
        missing = record.missing_texts
        if missing:
            values = {**record.values, missing[0].name: text}
            self.store.set_values(record.task_id, values)
            record.values = values
            noted = self.texts.say("form_value_noted").format(label=missing[0].label)
            if len(missing) > 1:
                return f"{noted}\n\n{self.texts.say('form_type_value').format(label=missing[1].label)}"
            if len(form.actions) > 1 and record.card_rides:
                self._stop_typing(record)
                return f"{noted}\n\n{self.texts.say('form_then_choose')}"
            if len(form.actions) > 1:
                return f"{noted}\n\n{typed_choices(form, self.texts)}"
            return self._typed_claim(record, message, form.actions[0].id, noted)
        action = form.action(text)
        if action is None:
            return typed_choices(form, self.texts)
        return self._typed_claim(record, message, action.id, "")

    def _typed_claim(self, record: FormRecord, message: Inbound, action: str, noted: str) -> str:
        outcome, _ = self._claim_form(record, message, action, record.values)
        title = record.form.action(action).title
        done = self.texts.say("form_submitted").format(choice=title) if outcome == "claimed" else ""
        done = done or self.texts.say("form_expired")
        return f"{noted}\n\n{done}" if noted else done


def _selections(event: dict) -> dict[str, str]:
    """question_key -> the chosen option id, from a click's selected_items."""
    chosen: dict[str, str] = {}
    items = (
        (event.get("selected_items") or {}).get("selected_item")
        if isinstance(event.get("selected_items"), dict)
        else None
    )
    for item in items or []:
        if not isinstance(item, dict):
            continue
        options = item.get("option_ids") if isinstance(item.get("option_ids"), dict) else {}
        ids = options.get("option_id") or []
        if isinstance(item.get("question_key"), str) and ids:
            chosen[item["question_key"]] = str(ids[0])
    return chosen
