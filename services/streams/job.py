"""One answer to produce: what the user asked, and where the answer goes (kept in the stream hash, so another
replica can take the job over)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import orjson

from services.streams.conversations import conversation_member
from services.streams.record import F
from services.transport.trace import trace_id_of


@dataclass(slots=True)
class StreamJob:
    """Everything a worker needs to answer one message."""

    stream_id: str
    msgid: str
    userid: str
    aibotid: str = ""
    chatid: str = ""
    query: str = ""
    typed_query: bool = True
    response_url: str = ""
    attachments: list[tuple[str, ...]] = field(default_factory=list)
    created_at: float = field(default_factory=time.time)  # when the user's message arrived
    resume_run: str = ""  # a Dify run to stream again (its first reader's replica is gone), not a new call
    taken_over: bool = False  # an attempt after one whose replica is gone (a poll took the stream over)
    attempt: str = ""  # this attempt's fencing token, carried by every write it makes (scripts.py, "Fencing")
    form_task: str = ""  # the rest of a run after this form's answer, sent as a message of its own (no bubble)
    card_placed: bool = False  # a form's card went on this stream already (WeCom takes one per message)
    shared_chat: bool = False  # a group whose members share one Dify conversation (GROUP_CONVERSATION=shared)
    counted_call: str = ""  # the kind of its first new Dify call, counted already (a queued stream's take)
    route: str = ""  # the bot's route that takes it, whose backend answers ("": the bot's own)

    @property
    def separate(self) -> bool:
        """Whether the answer goes out as a message of its own, with no bubble polling it."""
        return bool(self.form_task)

    @property
    def dify_user(self) -> str:
        """The Dify end-user: the WeCom userid namespaced by bot, stable across messages and restarts; in a group
        whose members share a conversation, the group; a schedule's own user, `schedule:<bot>:<name>`, as it is (a
        WeCom userid has no ":", so none of these meet)."""
        if self.userid.startswith("schedule:"):
            return self.userid
        if self.shared_chat:
            return f"wecom:{self.aibotid or 'bot'}:group:{self.chatid}"
        return f"wecom:{self.aibotid or 'bot'}:{self.userid}"

    @property
    def trace_id(self) -> str:
        """The trace every backend call of this message carries (services/transport/trace.py), and its audit row."""
        return trace_id_of(self.stream_id)

    @property
    def conversation_member(self) -> str:
        """Whose Dify conversation in the chat the answer continues (services/streams/conversations.py)."""
        return conversation_member(self.userid, self.shared_chat)

    def context_inputs(self, bot: str) -> dict[str, str]:
        """Where the message came from, as the Dify inputs an app may declare to know it (docs/configuration.md)."""
        return {
            "wecom_userid": self.userid,
            "wecom_chatid": self.chatid,
            "wecom_chattype": "group" if self.chatid else "single",
            "wecom_bot": bot,
        }

    def request_fields(self) -> dict[str, str]:
        """What the stream hash keeps so that another replica can restart this job (see `from_meta`)."""
        return {
            "query": self.query,
            "typed_query": "1" if self.typed_query else "",
            "attachments": orjson.dumps(self.attachments).decode() if self.attachments else "",
            "shared_chat": "1" if self.shared_chat else "",
            "route": self.route,
        }

    @classmethod
    def from_meta(cls, stream_id: str, meta: dict[str, str], attempt: str) -> StreamJob:
        """Rebuild the job of a stream from its hash, for a new `attempt` (a takeover on another replica)."""
        return cls(
            stream_id=stream_id,
            attempt=attempt,
            msgid=meta.get(F.msgid, ""),
            userid=meta.get(F.userid, ""),
            aibotid=meta.get(F.aibotid, ""),
            chatid=meta.get(F.chatid, ""),
            query=meta.get(F.query, ""),
            typed_query=bool(meta.get(F.typed_query)),
            response_url=meta.get(F.response_url, ""),
            attachments=[tuple(a) for a in orjson.loads(meta[F.attachments])] if meta.get(F.attachments) else [],
            created_at=float(meta.get(F.created_at) or time.time()),
            form_task=meta.get(F.form_task, ""),
            card_placed=bool(meta.get(F.card)),
            shared_chat=bool(meta.get(F.shared_chat)),
            route=meta.get(F.route, ""),
        )

    @classmethod
    def resumed(cls, stream_id: str, meta: dict[str, str], attempt: str) -> StreamJob:
        """The job of a stream whose Dify run this replica streams again, from where the text stopped."""
        job = cls.from_meta(stream_id, meta, attempt)
        job.resume_run = meta.get(F.workflow_run_id, "")
        return job
