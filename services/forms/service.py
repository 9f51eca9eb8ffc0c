"""Human-input forms between Dify and WeCom: what the stream's worker does when its run pauses (open the form,
wait for its answer while the bubble lasts, submit it once), and what a click or a typed answer does on whichever
replica WeCom calls (claim the form once, answer the click with the updated card within WeCom's 5 s; the slow work
happens behind it). docs/architecture.md, "Forms", tells the whole story.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from services import metrics
from services.dify.client import DifyClient
from services.dify.errors import DifyError, DifyHTTPError
from services.forms.cards import (
    ACTION_QUESTION,
    DONE_KEY,
    answered_card,
    closed_card,
    form_card,
    split_key,
)
from services.forms.form import Form, read_form
from services.forms.store import (
    CLAIMED,
    EXPIRED,
    FAILED,
    OPEN,
    SEPARATELY,
    SUBMITTED,
    SUBMITTING,
    FormRecord,
    FormStore,
    task_id_for,
)
from services.redis_conn import REDIS_FAILURES
from services.texts import Texts
from services.wecom.messages import Inbound

logger = logging.getLogger(__name__)

WAIT_INTERVAL = 0.25  # how often a waiting worker looks at its form
WINDOW_MARGIN = 20.0  # a worker stops waiting in the bubble this long before WeCom stops polling it
SUBMIT_TRIES = 3
# What a wait came to, besides CLAIMED and EXPIRED.
BUBBLE_OVER, CANCELLED, DRAINING = "bubble_over", "cancelled", "draining"

# Goes on with a form's run as a new message (the bubble is gone): the form, and where the message goes.
GoOnSeparately = Callable[[FormRecord, str], None]


@dataclass(frozen=True, slots=True)
class Asker:
    """Who a form is for: the stream whose run paused, and its user (only they may answer; Dify wants the run's
    own `dify_user`)."""

    stream_id: str
    userid: str
    chatid: str
    aibotid: str
    dify_user: str


@dataclass(slots=True)
class Ticket:
    """A form the stream's worker has opened: what the bubble shows while it waits, and the card riding on it."""

    record: FormRecord
    prompt: str  # the bubble's note while the form waits: its content and what to do
    card: dict | None  # the card, if it rides on this stream (once per message)

    @property
    def task_id(self) -> str:
        return self.record.task_id


def update_reply(card: dict, only_for: str = "") -> dict:
    """The answer to a click: the card as it is now (`only_for`: change it for that user only)."""
    reply = {"response_type": "update_template_card", "template_card": card}
    if only_for:
        reply["userids"] = [only_for]
    return reply


class FormService:
    def __init__(self, store: FormStore, dify: DifyClient, texts: Texts, bot: str = "default"):
        self.store = store
        self.dify = dify
        self.texts = texts
        self.bot = bot
        self.go_on_separately: GoOnSeparately | None = None  # set by the gateway: StreamService.continue_form

    # --- the stream's worker ------------------------------------------------------------------------------------

    def open(self, asker: Asker, event: dict, run_id: str, card_allowed: bool, before: str = "") -> Ticket | None:
        """The form a run paused at (`event`: the human_input_required data), written once for every replica.
        None when there is nothing to answer here (delivered by e-mail, or gone already); `card_allowed`: whether
        a card may still ride on the stream (once per message); `before`: the answer the run gave before it.

        Raises:
            DifyError: the form could not be read.
            redis.RedisError: Redis did not answer.
        """
        token = event.get("form_token")
        if not isinstance(token, str) or not token:
            return None
        task_id = task_id_for(asker.stream_id, token)
        known = self.store.load(task_id)
        if known is not None:  # a resumed attempt meets the form again: as it is now (claimed, even submitted)
            return Ticket(known, self.prompt(known), None)
        try:
            fetched = self.dify.human_input_form(token)
        except DifyHTTPError as exc:
            if exc.status in (404, 412):
                logger.info("the paused run's form is gone already (%s)", exc.status)
                return None
            raise
        form = read_form(event, fetched, run_id)
        card = form_card(form, task_id, self.texts) if card_allowed else None
        fields = {
            "userid": asker.userid,
            "chatid": asker.chatid,
            "aibotid": asker.aibotid,
            "dify_user": asker.dify_user,
            "stream_id": asker.stream_id,
            "card_rides": "1" if card else "",
            "before": before,
        }
        status, _ = self.store.open(task_id, form, fields)
        record = self.store.load(task_id)
        if record is None:
            return None
        if status == OPEN and card is not None:
            logger.info("form %s shown as a card", task_id)
        if status == OPEN and (record.missing_texts or not record.card_rides):
            self.store.expect_typing(record)
        return Ticket(record, self.prompt(record), card if record.card_rides and status == OPEN else None)

    def prompt(self, record: FormRecord) -> str:
        """What the bubble (or the message) says while the form waits: its content, then what to do next."""
        form = record.form
        missing = record.missing_texts
        if missing:
            step = self.texts.say("form_type_value").format(label=missing[0].label)
        elif record.card_rides:
            step = self.texts.say("form_choose")
        else:
            step = self._choose_typed(form)
        return "\n\n".join(part for part in (form.content.strip(), step) if part)

    def _choose_typed(self, form: Form) -> str:
        choices = " / ".join(f"{n}. {a.title}" for n, a in enumerate(form.actions, 1))
        return self.texts.say("form_choose_typed").format(choices=choices)

    def wait(self, ticket: Ticket, until: float, cancelled: threading.Event, draining: Callable[[], bool]) -> str:
        """Wait for the form's answer while the bubble lasts (`until`, epoch seconds): CLAIMED (this worker goes
        on: submit, then the rest of the run), EXPIRED, BUBBLE_OVER (a claim from now on goes on separately),
        CANCELLED (this attempt must stop: taken over), or DRAINING (this process stops: the wait is handed over)."""
        task_id, expires_at = ticket.task_id, ticket.record.form.expires_at
        while True:
            if cancelled.is_set():
                return CANCELLED
            if draining():
                return DRAINING
            try:
                status, way = self.store.status(task_id)
                if status in (CLAIMED, SUBMITTING, SUBMITTED):
                    return BUBBLE_OVER if way == SEPARATELY else CLAIMED
                if status == EXPIRED or time.time() >= expires_at:
                    return EXPIRED
                if time.time() >= until:
                    status = self.store.leave_bubble(task_id)
                    return CLAIMED if status in (CLAIMED, SUBMITTING, SUBMITTED) else BUBBLE_OVER
            except REDIS_FAILURES as exc:
                logger.warning("could not look at the form (%s); still waiting", exc)
            cancelled.wait(WAIT_INTERVAL)

    def submit(self, task_id: str) -> str:
        """Submit a claimed form to Dify, once: SUBMITTED (now, or by an earlier attempt), EXPIRED (Dify no longer
        takes it) or FAILED. Only the one who goes on after the claim calls it; an attempt that died while
        submitting is followed by one that submits again, and Dify's 412 then means our first try went through."""
        record = self.store.load(task_id)
        if record is None:
            return EXPIRED
        before = self.store.move(task_id, (CLAIMED, SUBMITTING), SUBMITTING)
        if before == SUBMITTED:
            return SUBMITTED
        if before not in (CLAIMED, SUBMITTING):
            return EXPIRED if before in (EXPIRED, OPEN) else FAILED
        result = self._submit_to_dify(record, retried=before == SUBMITTING)
        self.store.move(task_id, (SUBMITTING,), result, submitted_at=f"{time.time():.3f}")
        metrics.FORM_SUBMISSIONS.labels(self.bot, result).inc()
        logger.info("form %s submitted to Dify: %s", task_id, result)
        return result

    def _submit_to_dify(self, record: FormRecord, retried: bool) -> str:
        form = record.form
        # Dify refuses a submission that leaves out any input (even one with a default): every one is sent.
        inputs = {i.name: i.default for i in form.inputs}
        inputs |= {name: value for name, value in record.values.items() if name != ACTION_QUESTION}
        for attempt in range(SUBMIT_TRIES):
            try:
                self.dify.submit_human_input(form.token, inputs, record.choice, record.dify_user)
                return SUBMITTED
            except DifyHTTPError as exc:
                if exc.status == 412:
                    # Answered already (by our own earlier try, if one was cut off) or expired.
                    return SUBMITTED if (retried or attempt) and not form.expired() else EXPIRED
                if exc.status < 500 and exc.status != 429:
                    logger.warning("Dify refused the form's answer: %s %s", exc.status, exc.code)
                    return FAILED
                failure = exc
            except DifyError as exc:
                failure = exc
            logger.warning("form submission failed (%s), try %d of %d", failure.code, attempt + 1, SUBMIT_TRIES)
            time.sleep(0.5 * (attempt + 1))
        return FAILED

    # --- a click, on any replica ----------------------------------------------------------------------------------

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
            if detail == SEPARATELY and self.go_on_separately is not None:
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

    # --- a typed answer -----------------------------------------------------------------------------------------

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
                return f"{noted}\n\n{self._choose_typed(form)}"
            return self._typed_claim(record, message, form.actions[0].id, noted)
        action = form.action(text)
        if action is None:
            return self._choose_typed(form)
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
