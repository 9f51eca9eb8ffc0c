"""A form's answer, on whichever replica WeCom calls: a click on its card, or a value, a choice or a file the user
sends in the chat. Each value is stored at once, in one step (services/forms/store.py); a click, or the last value
of a form with one action, claims the form once, and whoever claims it goes on with the run: the worker waiting in
the bubble, or, once the bubble is over, a new answer (`go_on_separately`). A click is answered within WeCom's 5 s
with the card as Dify left it: submitted, refused (the card still usable, Dify's words on it), or expired. The
worker's side (open, wait, submit) is in service.py.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from services import metrics
from services.forms.cards import ACTION_QUESTION, DONE_KEY, answered_card, closed_card, form_card, split_key
from services.forms.form import FILE_LIST, Input
from services.forms.service import ask_for, file_kinds, typed_choices
from services.forms.store import ADD, CLAIMED, CLOSE, EXPIRED, OPEN, SEPARATELY, SET, SUBMITTING, FormRecord, FormStore
from services.media.service import FileRefused, MediaError, MediaService
from services.redis_conn import REDIS_FAILURES
from services.texts import Texts
from services.transport.errors import BackendError
from services.wecom.messages import Inbound

logger = logging.getLogger(__name__)

# Goes on with a form's run as a new message (the bubble is gone): the form, and where the message goes.
GoOnSeparately = Callable[[FormRecord, str], None]
# How long a claim's reply waits for Dify's verdict on the submission (the bubble's worker submits it within a
# moment), well inside the 5 s WeCom waits for a click's answer; past it the reply says "submitted".
VERDICT_SECONDS = 2.5
_VERDICT_POLL = 0.1
# What ends a file list in the chat (besides its being full).
FILES_DONE = frozenset({"完成", "好了", "好", "done", "ok", "that's all"})


def update_reply(card: dict, only_for: str = "") -> dict:
    """The answer to a click: the card as it is now (`only_for`: change it for that user only)."""
    reply = {"response_type": "update_template_card", "template_card": card}
    if only_for:
        reply["userids"] = [only_for]
    return reply


@dataclass(eq=False)
class FormAnswers:
    store: FormStore
    texts: Texts
    go_on_separately: GoOnSeparately  # StreamService.continue_form
    bot: str
    media: Mapping[str, MediaService]  # by route: fetches a file the user sends for a form, uploads it to its Dify app

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
        if action_id == DONE_KEY or record.status != OPEN or form.expired():
            return self._after_the_fact(record, message.userid)
        selections = _selections(event)
        action = form.action(selections.pop(ACTION_QUESTION, "") or action_id)
        if action is None:
            self._count("unknown")
            return None
        chosen = {i.name: i.option(selections[i.name]) for i in form.card_selects if i.name in selections}
        if None in chosen.values():  # an option the form does not offer (a stale or forged card): nothing taken
            self._count("bad_option")
            status = self.texts.say("form_option_not_offered")
            return update_reply(form_card(form, task_id, self.texts, status, record.values), message.userid)
        values = {**record.values, **chosen}
        if record.userid == message.userid and record.missing:
            self._count("needs_values")
            status = self.texts.say("form_needs_values").format(label=record.missing[0].label)
            return update_reply(form_card(form, task_id, self.texts, status, values), only_for=message.userid)
        return self._claim(record, message, action.id, values)

    def _after_the_fact(self, record: FormRecord, who: str) -> dict:
        """A click on a card already answered (a double click, a spent button) or expired: show how it ended."""
        if record.status == EXPIRED or (record.status == OPEN and record.form.expired()):
            self._count("expired")
            return update_reply(closed_card(record.form, record.task_id, self.texts, self._expired_status()))
        self._count("already" if record.userid == who else "not_yours")
        return update_reply(self._answered(record, record.choice, record.values, "form_answered"))

    def _claim(self, record: FormRecord, message: Inbound, action: str, values: dict) -> dict:
        """Claim the form for a click, and the card that answers it: as Dify's verdict on the submission leaves it,
        when it comes in time."""
        outcome, choice = self._claim_form(record, message, action, values)
        form, task_id = record.form, record.task_id
        if outcome == "claimed":
            verdict = self._verdict(task_id)
            if verdict is not None and verdict.status == OPEN:  # Dify refused the values: choose again
                status = self.texts.say("form_refused").format(reason=verdict.refused[:80])
                return update_reply(form_card(form, task_id, self.texts, status, verdict.values), message.userid)
            if verdict is not None and verdict.status == EXPIRED:
                return update_reply(closed_card(form, task_id, self.texts, self._expired_status()))
            return update_reply(self._answered(record, action, values, "form_submitted"))
        if outcome == "not_yours":
            return update_reply(
                closed_card(form, task_id, self.texts, self.texts.say("form_not_yours")), message.userid
            )
        if outcome == "expired":
            return update_reply(closed_card(form, task_id, self.texts, self._expired_status()))
        return update_reply(self._answered(record, choice, record.values, "form_answered"))

    def _verdict(self, task_id: str) -> FormRecord | None:
        """The form once its submission was decided (submitted, refused and open again, expired), waiting up to
        VERDICT_SECONDS; None when it is still being submitted (or Redis is away)."""
        deadline = time.monotonic() + VERDICT_SECONDS
        try:
            while time.monotonic() < deadline:
                time.sleep(_VERDICT_POLL)
                status, _ = self.store.status(task_id)
                if status not in (CLAIMED, SUBMITTING):
                    return self.store.load(task_id)
        except REDIS_FAILURES as exc:
            logger.info("could not read the form's verdict (%s); answering as submitted", exc)
        return None

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

    # --- the chat: values, choices and files the user sends ---------------------------------------------------

    def waiting_for(self, message: Inbound) -> FormRecord | None:
        """The form whose values (or choice) this user gives in this chat next, if one waits (or expired a moment
        ago: the message then hears so); None: the message is a question.

        Raises:
            redis.RedisError: Redis did not answer.
        """
        task_id = self.store.typing(message.aibotid, message.chatid or "single", message.userid)
        record = self.store.load(task_id) if task_id else None
        if record is None or record.status != OPEN:
            if record is not None:
                self._stop_typing(record)
            return None
        return record

    def typed(self, record: FormRecord, message: Inbound, text: str) -> str:
        """Take a typed answer to `record` (the next missing value or choice, else the choice of an action); the
        note to reply with.

        Raises:
            redis.RedisError: Redis did not answer.
        """
        if (expired := self._if_expired(record)) is not None:
            return expired
        form = record.form
        missing = record.missing
        if missing:
            item = missing[0]
            if item.is_file:
                if item.kind == FILE_LIST and record.values.get(item.name) and text.casefold() in FILES_DONE:
                    return self._put(record, message, item, None, CLOSE, "")
                return ask_for(item, self.texts)  # a file is wanted, not words
            value = text
            if item.is_select:
                value = item.option(text)
                if value is None:
                    unknown = self.texts.say("form_option_unknown").format(choice=text[:40], label=item.label)
                    return f"{unknown}\n\n{ask_for(item, self.texts)}"
            noted = self.texts.say("form_value_noted").format(label=item.label)
            return self._put(record, message, item, value, SET, noted)
        action = form.action(text)
        if action is None:
            return typed_choices(form, self.texts)
        return self._typed_claim(record, message, action.id, "")

    def given(self, record: FormRecord, message: Inbound, attachments: list[tuple[str, ...]]) -> str:
        """Take the file(s) a message brings for `record`'s next missing file input: checked against the input's
        types before any upload, uploaded as the run's user; the note to reply with (one line for a file the
        input does not take, one that fails, or a file the form does not wait for).

        Raises:
            redis.RedisError: Redis did not answer.
        """
        if (expired := self._if_expired(record)) is not None:
            return expired
        missing = record.missing
        item = missing[0] if missing else None
        media = self.media.get(record.route)
        if item is None or not item.is_file or media is None:
            step = ask_for(item, self.texts) if item is not None else self._next_step(record)
            return "\n\n".join(filter(None, (self.texts.say("form_file_not_needed"), step)))
        notes, took = [], False
        for kind, url, *aeskey in attachments:
            if record.filled(item):
                break
            try:
                given, name = media.file_for(kind, url, aeskey[0] if aeskey else "", record.dify_user,
                                                  item.takes_file)  # fmt: skip
            except FileRefused as refused:
                kinds = file_kinds(item, self.texts)
                notes.append(self.texts.say("form_file_refused").format(name=refused.name, label=item.label,
                                                                        kinds=kinds))  # fmt: skip
                continue
            except (MediaError, BackendError) as exc:
                logger.warning("a file for form %s could not be passed on: %s", record.task_id, exc)
                notes.append(self.texts.say("form_file_failed"))
                continue
            how = ADD if item.kind == FILE_LIST else SET
            values = self.store.put_value(record.task_id, item.name, given, how, item.max_files)
            if values is None:  # claimed or expired meanwhile
                return self.texts.say("form_expired")
            record.values, took = values, True
            notes.append(self.texts.say("form_file_noted").format(label=item.label, name=name))
        if took:
            return self._after_value(record, message, "\n".join(notes))
        return "\n".join([*notes, ask_for(item, self.texts)])

    def _put(self, record: FormRecord, message: Inbound, item: Input, value, how: str, noted: str) -> str:
        """Store one value of the form (atomically: replicas taking the user's messages at once lose none), then
        the next step."""
        values = self.store.put_value(record.task_id, item.name, value, how)
        if values is None:  # claimed or expired meanwhile
            return self.texts.say("form_expired")
        record.values = values
        return self._after_value(record, message, noted)

    def _after_value(self, record: FormRecord, message: Inbound, noted: str) -> str:
        """After a value: ask for the next one, or for the choice, or (one action, nothing left) claim the form."""
        form = record.form
        missing = record.missing
        if missing:
            step = ask_for(missing[0], self.texts)
        elif len(form.actions) > 1 and record.card_rides:
            if not any(i.is_file for i in form.in_chat):  # a form of files keeps listening: a late file hears why
                self._stop_typing(record)
            step = self.texts.say("form_then_choose")
        elif len(form.actions) > 1:
            step = typed_choices(form, self.texts)
        else:
            return self._typed_claim(record, message, form.actions[0].id, noted)
        return "\n\n".join(filter(None, (noted, step)))

    def _next_step(self, record: FormRecord) -> str:
        if record.card_rides:
            return self.texts.say("form_then_choose")
        return typed_choices(record.form, self.texts)

    def _if_expired(self, record: FormRecord) -> str | None:
        """The note for a value sent after the form expired (the user hears it once; nothing is submitted)."""
        if not record.form.expired():
            return None
        self._stop_typing(record)
        self._count("expired")
        return self.texts.say("form_expired")

    def _typed_claim(self, record: FormRecord, message: Inbound, action: str, noted: str) -> str:
        outcome, _ = self._claim_form(record, message, action, record.values)
        title = record.form.action(action).title
        if outcome != "claimed":
            done = self.texts.say("form_expired")
        elif (verdict := self._verdict(record.task_id)) is not None and verdict.status == OPEN:
            refused = self.texts.say("form_refused").format(reason=verdict.refused[:200])
            step = ask_for(verdict.missing[0], self.texts) if verdict.missing else self._next_step(verdict)
            done = f"{refused}\n\n{step}"
        else:
            done = self.texts.say("form_submitted").format(choice=title)
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
