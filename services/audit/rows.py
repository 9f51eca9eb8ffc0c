"""What one audit row says (docs/audit.md), and how it is read from a finished stream's hash and text.

The stream in Redis is the one record every replica shares of how a message ended, whichever of them ended it (its
worker, a takeover's, a poll that gave it up, a user's /stop): so the row is read from there once the stream is
final, never from one replica's memory, and a message has one row whoever finished it.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

import orjson

from services.streams.life import ANSWERED, BUSY, ERROR, FORM_ACTION, MESSAGE, NOTE, PUSH, STOPPED
from services.streams.record import F
from services.wecom.messages import Inbound

FULL, METADATA = "full", "metadata"  # AUDIT_CONTENT: the texts, or their lengths and SHA-256 only
OUTAGE, ANY = "outage", "any"  # what a row supersedes (AuditRow.supersedes)
# An operator's sign-in or change on /admin (services/admin): `userid` the operator, `question` the action, `answer`
# what it acted on; kept whatever AUDIT_CONTENT says (none of it is a user's text).
ADMIN = "admin"

# The stream's `error` field, as an outcome (any other error: the answer ended with a failure note).
_OUTCOME_OF_ERROR = {
    "": ANSWERED,
    "stopped": STOPPED,
    "in_flight_limit": BUSY,
    "rate_limited": BUSY,
    "busy": BUSY,
    "internal_error": ERROR,
}


@dataclass(frozen=True)
class AuditRow:
    """One row of `wecom_audit`, with the texts in full (`values` keeps what AUDIT_CONTENT allows)."""

    bot: str
    msgid: str
    kind: str
    outcome: str
    received_at: float  # epoch seconds
    finished_at: float
    userid: str = ""
    chatid: str = ""
    chattype: str = ""
    msgtype: str = ""
    question: str = ""
    answer: str = ""
    masked: int = 0
    dify_conversation_id: str = ""
    dify_message_id: str = ""
    dify_run_id: str = ""
    backend: str = ""  # dify | openai: where the answer came from ("" where none was asked)
    route: str = ""  # the bot's route that took the message ("" the bot's own)
    model: str = ""
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    trace_id: str = ""  # the trace its backend calls carried
    replica: str = ""
    # Which row of the same message this one replaces if that one is in the table first (records.py): none, one made
    # without a stream while Redis was away (OUTAGE: a stream's row, the message's own account), or any (ANY: the
    # fuller account of an answer whose owner sent it after a poll had ended its bubble). Not a column.
    supersedes: str = ""

    def values(self, content: str) -> dict:
        """The row's columns; with `content` METADATA, the texts' lengths and SHA-256 instead of the texts."""
        values = asdict(self)
        del values["supersedes"]
        values["received_at"] = _utc(self.received_at)
        values["finished_at"] = _utc(self.finished_at)
        for name in ("question", "answer"):
            text = values[name]
            values[f"{name}_len"] = len(text)
            values[f"{name}_sha256"] = hashlib.sha256(text.encode()).hexdigest()
            if content == METADATA and self.kind != ADMIN:
                values[name] = None
        return values

    def dumps(self) -> str:
        """The row as JSON, texts in full: how it waits in Redis while the database is away."""
        return orjson.dumps(asdict(self)).decode()

    @classmethod
    def loads(cls, raw: str) -> AuditRow:
        return cls(**orjson.loads(raw))


def row_of_reply(bot: str, message: Inbound, reply: str, outcome: str, kind: str, replica: str) -> AuditRow:
    """The row of a message answered at once, without a stream (a command, a refusal)."""
    return _row_now(bot, message, kind, outcome, replica, question=message.text, answer=reply)


def row_of_event(bot: str, message: Inbound, kind: str, said: str, replica: str) -> AuditRow:
    """The row of a user's event: a rating (FEEDBACK) or a tap on a form's card (FORM_ACTION); `said` is what the
    user did, in words ("like", "dislike: wrong; too long", the card's key and choices)."""
    return _row_now(bot, message, kind, ANSWERED, replica, question=said)


def _row_now(bot: str, message: Inbound, kind: str, outcome: str, replica: str, question: str, answer: str = ""):
    """A row of a callback handled at once: received and finished now."""
    now = time.time()
    return AuditRow(
        bot=bot,
        msgid=message.msgid or _event_id(message),
        kind=kind,
        outcome=outcome,
        received_at=now,
        finished_at=now,
        userid=message.userid,
        chatid=message.chatid,
        chattype=message.chattype,
        msgtype=message.event_type or message.msgtype,
        question=question,
        answer=answer,
        replica=_replica(replica),
    )


def _event_id(message: Inbound) -> str:
    """An id for an event callback that carries no msgid (a tap on a card): the same for a resend of the same
    event, so the row is written once."""
    raw = orjson.dumps([message.userid, message.chatid, message.event], option=orjson.OPT_SORT_KEYS)
    return f"event:{hashlib.sha256(raw).hexdigest()[:32]}"


def is_active(meta: dict[str, str]) -> bool:
    """Whether a stream (its hash) is still being answered: pending or streaming, the stream store's active
    statuses (services/streams/store.py), read here without importing the layer above."""
    return meta.get(F.status) in ("pending", "streaming")


def row_of_stream(bot: str, meta: dict[str, str], chunks: list[str]) -> AuditRow | None:
    """The row of a finished stream: its hash (`meta`) and its text (`chunks`: the whole answer, also what went out
    as a message of its own after the bubble closed). The answer recorded is that text with its closing note. A
    push is a row of its own (kind push); the rest of an answer sent as a message of its own is not (`rest_of`: its
    message's row has the whole answer), nor is a schedule's tick's (services/schedules writes the tick's row):
    None. An answer whose bubble a poll gave up, and whose owner then sent it whole or its rest, is recorded whole,
    with both notes (`answer_given`), over the row written when the bubble ended (`supersedes`)."""
    if meta.get(F.rest_of) or meta.get(F.schedule):  # (a schedule's tick is one row of its own, kind schedule)
        return None
    # (the whole answer its owner sent after a poll gave it up, with the note it sent with it)
    text = meta.get(F.answer_given) or "".join(chunks)
    note = meta.get(F.note, "")
    answer = f"{text}\n\n{note}" if text and note else (text or note)
    status, error = meta.get(F.status, ""), meta.get(F.error, "")
    outcome = _OUTCOME_OF_ERROR.get(error, NOTE) if status == "done" else (ERROR if error == "internal_error" else NOTE)
    form_task = meta.get(F.form_task, "")
    return AuditRow(
        bot=bot,
        msgid=meta.get(F.msgid, ""),
        kind=PUSH if meta.get(F.push) else FORM_ACTION if form_task else MESSAGE,
        outcome=outcome,
        received_at=float(meta.get(F.created_at) or 0),
        finished_at=float(meta.get(F.finished_at) or meta.get(F.updated_at) or meta.get(F.created_at) or 0),
        userid=meta.get(F.userid, ""),
        chatid=meta.get(F.chatid, ""),
        chattype=meta.get(F.chattype, "") or ("group" if meta.get(F.chatid) else "single"),
        msgtype=meta.get(F.msgtype, "") or ("form" if form_task else "markdown" if meta.get(F.push) else ""),
        question=_question(meta),
        answer=answer,
        masked=int(meta.get(F.masked) or 0),
        dify_conversation_id=meta.get(F.conversation_id, ""),
        dify_message_id=meta.get(F.message_id, ""),
        dify_run_id=meta.get(F.workflow_run_id, ""),
        backend=meta.get(F.backend, ""),
        route=meta.get(F.route, ""),
        model=meta.get(F.model, ""),
        prompt_tokens=_count(meta.get(F.prompt_tokens)),
        completion_tokens=_count(meta.get(F.completion_tokens)),
        trace_id=meta.get(F.trace_id, ""),
        replica=_replica(meta.get(F.owner, "")),
        supersedes=ANY if meta.get(F.answer_given) else OUTAGE,
    )


def _question(meta: dict[str, str]) -> str:
    """What the user asked: the text, and a mark per file sent with it (`[image]`, `[document]`, `[video]`; WeCom
    names no file in a callback, and its download links are not kept)."""
    marks = []
    if meta.get(F.attachments):
        marks = [f"[{attachment[0]}]" for attachment in orjson.loads(meta[F.attachments]) if attachment]
    return "\n".join(part for part in (meta.get(F.query, ""), *marks) if part)


def _count(value: str | None) -> int | None:
    """A token count from the stream's hash (None: not known)."""
    return int(value) if value and value.isdigit() else None


def _replica(attempt: str) -> str:
    """The replica of an attempt (`<replica>:<pid>#<run>`), or '' for none (a stream its user stopped)."""
    process = attempt.partition("#")[0]
    return process.rpartition(":")[0] if ":" in process else process if attempt != "stopped" else ""


def _utc(epoch: float) -> datetime:
    """A naive UTC datetime (how the table keeps times: DATETIME has no zone)."""
    return datetime.fromtimestamp(epoch, UTC).replace(tzinfo=None)
