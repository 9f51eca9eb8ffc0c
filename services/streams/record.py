"""The stream record, the hash `dify_stream:{id}` (Keys.stream): its fields named once (`F`, below), for the Lua
scripts (`F.<field>` in a script, checked when the module loads) and for the Python that reads it. A field name
spelt elsewhere fails tests/test_stream_record.py.
"""

from __future__ import annotations

import re

# name: what it holds (who writes it)
FIELDS: dict[str, str] = {
    # the message, written once when the stream opens (StreamService, the long connection's outbox, pushes)
    "msgid": "WeCom's msgid of the message (push:<id> for a push)",
    "userid": "the asker",
    "aibotid": "the bot's id at WeCom",
    "chatid": "the group, '' in a single chat",
    "chattype": "single or group",
    "msgtype": "WeCom's message type",
    "query": "the question as asked (after a route's command)",
    "typed_query": "'1' when the user typed it (not a card's button)",
    "attachments": "JSON: the message's files and images",
    "shared_chat": "'1' when the group shares one conversation",
    "response_url": "WeCom's single-use URL for a message after the bubble",
    "push": "'1': a push, not an answer to a message",
    "rest_of": "the stream whose answer's rest this message carries",
    "schedule": "a schedule's tick the stream answers, <schedule>:<tick>: pushed, not shown (services/schedules)",
    "trace_id": "the W3C trace of the user's message",
    "backend": "the backend that answers (dify, openai)",
    "route": "the route that chose it",
    # the stream's life (scripts.py)
    "status": "pending, streaming, done, error, stopped or expired",
    "owner": "the attempt answering it, <process>#<run>; 'stopped' once the user stopped it",
    "run": "how many attempts it has had",
    "inflight_key": "the asker's in-flight set, freed when the bubble ends",
    "created_at": "when it opened",
    "updated_at": "its last write",
    "first_token_at": "its first text",
    "finished_at": "its end",
    "finish_id": "the finish that ended it (a retried finish is recognised)",
    "error": "why it failed, or stopped, or owner_lost",
    "note": "the failure note shown after the text",
    "lease_missing_at": "when a poll first found its owner's lease gone",
    "restarts": "restarts by a poll (nothing shown yet, its owner gone)",
    "resumes": "resumes of its backend's run by a poll",
    "resumed_at": "the last resume",
    "taken_over_at": "the last restart by a poll",
    "handed_over_at": "when a draining owner let it go",
    "replaced_at": "when its text was replaced whole",
    "dify_calls": "backend calls made for it",
    "dify_stopped": "when the stop call for its task was claimed (once across replicas)",
    "task_id": "the backend's task, for /stop",
    # the bubble (POLL)
    "text": "what the bubble shows: the chunks folded so far",
    "folded": "how many chunks are in text",
    "polls": "polls that showed the bubble",
    "late_poll_at": "the last poll WeCom no longer waited for",
    "close_reason": "why the bubble closed before the answer ended: window, overflow, separately",
    "closed_bytes": "how much of the text the bubble showed when it closed",
    "closed_at": "when it closed",
    "delivered": "response_url when the answer went out only that way",
    "vouched_bytes": "the text a poll showed once a replica held it",
    "ahead_since": "since when the text ran ahead of what a replica holds",
    "prompt": "a form's prompt shown below the text while it waits",
    "card": "a template card to hand out once (a form's, or suggested questions)",
    "card_shown": "when a poll handed the card out",
    "card_by": "the poll that did",
    "card_backs": "how often it was given back",
    "images": "reply images in its images list",
    "files": "JSON: the answer's files",
    # the answer (the backends, the finisher)
    "conversation_id": "the backend's conversation",
    "message_id": "the backend's message, for feedback",
    "workflow_run_id": "the backend's run, for a resume",
    "form_task": "the form this stream answers (a card's tap)",
    "model": "the model that answered",
    "prompt_tokens": "tokens of the request",
    "completion_tokens": "tokens of the answer",
    "tokens": "tokens in all",
    "dify_latency": "the backend's own time for the answer (Dify's usage.latency)",
    "masked": "how many spans content rules masked",
    "answer_given": "the whole answer the user got, when more than the bubble",
    "rest_sent": "yes or failed: the rest of the answer posted to response_url",
    # the long connection's frames (services/longconn)
    "ws_req_id": "the req_id of its bubble",
    "ws_generation": "the connection generation that sent its frames",
    "ws_chat": "where its rest is sent",
    "ws_single": "'1' in a single chat",
    "ws_dead": "'1' once its req_id can take no frame",
    "ws_as_is": "'1': a message made whole already, sent as it is",
    "ws_shows": "the bytes of text its last frame showed (-1: text the answer no longer has)",
    "ws_sent_final": "'1' when that frame finished the bubble",
    "ws_sent_by": "the pass that recorded that frame",
    "ws_sent_at": "when that frame was recorded ('' once its fate is known: shown, refused or never sent)",
    "ws_acked_by": "the pass whose frame WeCom last acknowledged as shown",
    "ws_shows_before": "what the record before said (the bubble shows it until this frame's pass is confirmed)",
    "ws_confirmed": "the last pass whose records were confirmed (its frames go out only then)",
    "send_refusals": "how often WeCom refused its aibot_send_msg as busy",
}

# The values of `status`.
PENDING, STREAMING, DONE, ERROR, EXPIRED = "pending", "streaming", "done", "error", "expired"
ACTIVE_STATUSES = frozenset({PENDING, STREAMING})
# The `error` of an answer a /stop ended (scripts.STOP writes it, as 'stopped').
STOPPED_BY_USER = "stopped"

_FIELD = re.compile(r"\bF\.([a-z_][a-z0-9_]*)")


def lua(source: str) -> str:
    """A stream script with each `F.<field>` made the field's quoted name; a name not in FIELDS is an error now."""

    def quoted(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in FIELDS:
            raise ValueError(f"stream script: {name!r} is not a field of the stream record (record.py)")
        return f"'{name}'"

    return _FIELD.sub(quoted, source)


class _FieldNames:
    """`F.<field>`: the field's name, for the Python that reads a record (`meta[F.status]`); a name FIELDS does not
    hold is an AttributeError (and tests/test_stream_record.py finds every `F.<field>` in services/ up front)."""

    def __init__(self) -> None:
        self.__dict__.update({name: name for name in FIELDS})  # a plain attribute read each

    def __getattr__(self, name: str) -> str:  # only for a name the schema lacks
        raise AttributeError(f"{name!r} is not a field of the stream record (record.py)")


F = _FieldNames()
