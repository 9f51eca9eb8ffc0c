"""Human-input forms between Dify and WeCom, the stream worker's side: when its run pauses, open the form, wait for
its answer while the bubble lasts, submit it once. What a click or a typed answer does on whichever replica WeCom
calls is in answers.py. docs/architecture.md, "Forms", tells the whole story.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from services import metrics
from services.dify.client import DifyClient
from services.forms.cards import ACTION_QUESTION, form_card
from services.forms.form import Form, Input, read_form
from services.forms.store import (
    CLAIMED,
    EXPIRED,
    FAILED,
    LISTS_DONE,
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
from services.transport.errors import BackendError, BackendHTTPError

logger = logging.getLogger(__name__)

WAIT_INTERVAL = 0.25  # how often a waiting worker looks at its form
WINDOW_MARGIN = 20.0  # a worker stops waiting in the bubble this long before WeCom stops polling it
SUBMIT_TRIES = 3
# What a wait came to, besides CLAIMED and EXPIRED.
BUBBLE_OVER, CANCELLED, DRAINING = "bubble_over", "cancelled", "draining"
REFUSED = "refused"  # what a submission came to when Dify refused its values (400): the form is open again
# The inputs Dify names when it refuses a submission's values ("Invalid value for select input 'env': moon",
# "Missing required inputs: doc, comment").
_NAMED_INPUT = re.compile(r"input '([^']+)'")
_MISSING_INPUTS = re.compile(r"Missing required inputs: (.+)$")
_FILE_KINDS = ("image", "document", "audio", "video")  # Dify's file types that have a name in words


@dataclass(frozen=True, slots=True)
class Asker:
    """Who a form is for: the stream whose run paused, and its user (only they may answer; Dify wants the run's
    own `dify_user`)."""

    stream_id: str
    userid: str
    chatid: str
    aibotid: str
    dify_user: str
    route: str = ""  # the bot's route whose Dify app ran it: the app its answer goes to


@dataclass(slots=True)
class Ticket:
    """A form the stream's worker has opened: what the bubble shows while it waits, and the card riding on it."""

    record: FormRecord
    prompt: str  # the bubble's note while the form waits: its content and what to do
    card: dict | None  # the card, if it rides on this stream (once per message)

    @property
    def task_id(self) -> str:
        return self.record.task_id


class FormNotHere(Exception):
    """A paused run's form that cannot be answered here: `note_key` names the note that says where it stands
    (`form_elsewhere`: Dify delivers it only through its own channels, e-mail or its web app, and the Service API
    does not reach it; `form_expired`: answered already, or expired)."""

    def __init__(self, note_key: str):
        super().__init__(note_key)
        self.note_key = note_key


def typed_choices(form: Form, texts: Texts) -> str:
    """The note that asks for the choice of an action to be typed: its numbered titles."""
    choices = " / ".join(f"{n}. {a.title}" for n, a in enumerate(form.actions, 1))
    return texts.say("form_choose_typed").format(choices=choices)


def ask_for(item: Input, texts: Texts) -> str:
    """What the chat asks of the user for one input: a file (or files) to send, an option to type, a text."""
    if item.is_file:
        if item.max_files == 1:
            return texts.say("form_send_file").format(label=item.label, kinds=file_kinds(item, texts))
        limit = texts.say("form_files_limit").format(count=item.max_files) if item.max_files else ""
        return texts.say("form_send_files").format(label=item.label, kinds=file_kinds(item, texts), limit=limit)
    if item.is_select:
        choices = " / ".join(f"{n}. {text}" for n, (_, text) in enumerate(item.options, 1))
        return texts.say("form_choose_option").format(label=item.label, choices=choices)
    return texts.say("form_type_value").format(label=item.label)


def file_kinds(item: Input, texts: Texts) -> str:
    """The files an input takes, in words: its types (documents, images…) and its own extensions."""
    kinds = [texts.say(f"file_kind_{kind}") for kind in item.file_types if kind in _FILE_KINDS]
    kinds += list(item.file_extensions)
    return ("、" if texts.language == "zh" else ", ").join(kinds) or texts.say("file_kind_any")


class FormService:
    def __init__(self, store: FormStore, apps: Mapping[str, DifyClient], texts: Texts, bot: str = "default"):
        self.store = store
        self.apps = apps  # the Dify app of each of the bot's routes ("": its own): a form's is its run's
        self.texts = texts
        self.bot = bot

    def open(self, asker: Asker, event: dict, run_id: str, card_allowed: bool, before: str = "") -> Ticket | None:
        """The form a run paused at (`event`: the human_input_required data), written once for every replica;
        `card_allowed`: whether a card may still ride on the stream (once per message); `before`: the answer the
        run gave before it. None when the record is gone meanwhile.

        Raises:
            FormNotHere: the form cannot be answered here (Dify delivers it elsewhere, or it is gone already).
            BackendError: the form could not be read.
            redis.RedisError: Redis did not answer.
        """
        token = event.get("form_token")
        if not isinstance(token, str) or not token:
            raise FormNotHere("form_elsewhere")
        task_id = task_id_for(asker.stream_id, token)
        known = self.store.load(task_id)
        if known is not None:  # a resumed attempt meets the form again: as it is now (claimed, even submitted)
            # Its card, if it was opened with one that never reached the stream (its attempt stopped first).
            card = form_card(known.form, task_id, self.texts) if card_allowed and known.card_rides else None
            return Ticket(known, self.prompt(known), card if known.status == OPEN else None)
        try:
            fetched = self.apps[asker.route].human_input_form(token)
        except BackendHTTPError as exc:
            if exc.status == 404:
                logger.info("the paused run's form is not reachable through the Service API: it is answered elsewhere")
                raise FormNotHere("form_elsewhere") from None
            if exc.status == 412:
                logger.info("the paused run's form is answered or expired already")
                raise FormNotHere("form_expired") from None
            raise
        form = read_form(event, fetched, run_id)
        if any(i.is_file and not i.uploadable for i in form.inputs):
            logger.info("the form asks for a file Dify takes only by URL: it is answered elsewhere")
            raise FormNotHere("form_elsewhere")
        card = form_card(form, task_id, self.texts) if card_allowed else None
        status, _ = self.store.open(task_id, form, _opening(asker, bool(card), before))
        record = self.store.load(task_id)
        if record is None:
            return None
        if status == OPEN and card is not None:
            logger.info("form %s shown as a card", task_id)
        if status == OPEN and (record.missing or not record.card_rides):
            self.store.expect_typing(record)
        return Ticket(record, self.prompt(record), card if record.card_rides and status == OPEN else None)

    def prompt(self, record: FormRecord) -> str:
        """What the bubble (or the message) says while the form waits: its content, why Dify refused the last
        submission (if it did), then what to do next."""
        form = record.form
        missing = record.missing
        refused = self.texts.say("form_refused").format(reason=record.refused[:200]) if record.refused else ""
        if missing:
            step = ask_for(missing[0], self.texts)
        elif record.card_rides:
            step = self.texts.say("form_choose")
        else:
            step = typed_choices(form, self.texts)
        return "\n\n".join(part for part in (form.content.strip(), refused, step) if part)

    def prompt_of(self, task_id: str) -> str:
        """The prompt of the form `task_id` as it stands ("" when it is gone)."""
        record = self.store.load(task_id)
        return self.prompt(record) if record is not None else ""

    def wait(
        self,
        ticket: Ticket,
        until: float,
        cancelled: threading.Event,
        draining: Callable[[], bool],
        reopened: Callable[[], object] = lambda: None,
    ) -> str:
        """Wait for the form's answer while the bubble lasts (`until`, epoch seconds): CLAIMED (this worker goes
        on: submit, then the rest of the run), EXPIRED, BUBBLE_OVER (a claim from now on goes on separately),
        CANCELLED (this attempt must stop: taken over), or DRAINING (this process stops: the wait is handed over).
        A form a failover took back is opened again, and `reopened()` then writes again what the stream showed of
        it (its prompt and card, which that failover may have taken back too), until it once went through."""
        task_id, expires_at = ticket.task_id, ticket.record.form.expires_at
        shown_again = True
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
                if not status:  # a failover took the form back before a replica held it: a tap would find none
                    logger.warning("form %s was gone from Redis (a failover?); it is open again", task_id)
                    record = ticket.record
                    self.store.open(task_id, record.form, _opening(record, record.card_rides, record.before))
                    shown_again = False
                if not shown_again:
                    reopened()
                    shown_again = True
                if time.time() >= until:
                    status = self.store.leave_bubble(task_id)
                    return CLAIMED if status in (CLAIMED, SUBMITTING, SUBMITTED) else BUBBLE_OVER
            except REDIS_FAILURES as exc:
                logger.warning("could not look at the form (%s); still waiting", exc)
            cancelled.wait(WAIT_INTERVAL)

    def submit(self, task_id: str) -> str:
        """Submit a claimed form to Dify, once: SUBMITTED (now, or by an earlier attempt), EXPIRED (Dify no longer
        takes it), REFUSED (Dify refused its values: the form is open again, without the values Dify named, for
        the user to give anew) or FAILED. Only the one who goes on after the claim calls it; an attempt that died
        while submitting is followed by one that submits again, and Dify's 412 then means our first try went
        through."""
        record = self.store.load(task_id)
        if record is None:
            return EXPIRED
        before = self.store.move(task_id, (CLAIMED, SUBMITTING), SUBMITTING)
        if before == SUBMITTED:
            return SUBMITTED
        if before not in (CLAIMED, SUBMITTING):
            return EXPIRED if before in (EXPIRED, OPEN) else FAILED
        result, why = self._submit_to_dify(record, retried=before == SUBMITTING)
        metrics.FORM_SUBMISSIONS.labels(self.bot, result).inc()
        if result == REFUSED:
            logger.warning("Dify refused the form's values (%s); the form is open again", why[:200])
            self.store.reopen(task_id, _without_named(record.values, why), why)
            reopened = self.store.load(task_id)
            if reopened is not None and reopened.status == OPEN:
                self.store.expect_typing(reopened)
            return REFUSED
        self.store.move(task_id, (SUBMITTING,), result, submitted_at=f"{time.time():.3f}")
        logger.info("form %s submitted to Dify: %s", task_id, result)
        return result

    def _submit_to_dify(self, record: FormRecord, retried: bool) -> tuple[str, str]:
        """(what became of the submission, Dify's words when it refused the values)."""
        form, app = record.form, self.apps.get(record.route)
        if app is None:
            logger.warning("the form's route is no longer in BOTS_FILE: its answer cannot reach the app")
            return FAILED, ""
        for attempt in range(SUBMIT_TRIES):
            try:
                app.submit_human_input(form.token, record.submission(), record.choice, record.dify_user)
                return SUBMITTED, ""
            except BackendHTTPError as exc:
                if exc.status == 412:
                    # Answered already (by our own earlier try, if one was cut off) or expired.
                    return (SUBMITTED if (retried or attempt) and not form.expired() else EXPIRED), ""
                if exc.status == 400 and exc.code == "invalid_form_data":
                    return REFUSED, exc.message
                if exc.status < 500 and exc.status != 429:
                    logger.warning("Dify refused the form's answer: %s %s", exc.status, exc.code)
                    return FAILED, ""
                failure = exc
            except BackendError as exc:
                failure = exc
            logger.warning("form submission failed (%s), try %d of %d", failure.code, attempt + 1, SUBMIT_TRIES)
            time.sleep(0.5 * (attempt + 1))
        return FAILED, ""


def _opening(asked: Asker | FormRecord, card_rides: bool, before: str) -> dict[str, str]:
    """The fields a form is opened with: who asked it (its Asker, or the record of the form opened before), whether
    its card rides on the stream, and the run's answer before the pause."""
    who = ("userid", "chatid", "aibotid", "dify_user", "stream_id", "route")
    return {**{name: getattr(asked, name) for name in who}, "card_rides": "1" if card_rides else "", "before": before}


def _without_named(values: dict, why: str) -> dict:
    """`values` without those of the inputs Dify's refusal names (the user gives them anew)."""
    named = set(_NAMED_INPUT.findall(why))
    missing = _MISSING_INPUTS.search(why)
    if missing:
        named |= {name.strip() for name in missing.group(1).split(",")}
    kept = {name: value for name, value in values.items() if name not in named and name != ACTION_QUESTION}
    if LISTS_DONE in kept:
        kept[LISTS_DONE] = [name for name in kept[LISTS_DONE] if name not in named]
    return kept
