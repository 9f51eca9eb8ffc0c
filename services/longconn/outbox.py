"""The long connection's outbox: the rest of an answer whose req_id died (846605, 846608) goes out once as
`aibot_send_msg` when the answer is final, counted from what the last frame handed to the socket showed (`ws_shows`).
A marker per stream makes it once across processes: `sending` while claimed, `handed` from just before the frame
goes out, `sent` at its ack; a handed send whose ack never came is settled by orphans.py. Every record waits for a
replica (services/replication.py). docs/architecture.md, "Long-connection mode", tells the whole of it.
"""

from __future__ import annotations

import secrets
import time

import redis

from services.keys import (
    OUTBOX_CLAIM_TTL_SECONDS,
    OUTBOX_CONFLICT_TTL_SECONDS,
    OUTBOX_TRACKED_TTL_SECONDS,
    SENT_TTL_SECONDS,
    Keys,
)
from services.lua import LuaScript, ScriptSpec
from services.replication import OUTBOX, raise_first_error
from services.streams.reads import script_now as now
from services.streams.record import DONE, F
from services.streams.store import StreamStore, first_attempt
from services.wecom.limits import NOTE_SEPARATOR
from utils.text import cut_utf8, utf8_len

CONFLICT_ERRCODES = frozenset({6000, 6001, 6002})  # WeCom's command conflicts: tried again after a back-off
PAGE = 100  # tracked streams read per round trip
HANDED, SENDING, SENT = "handed ", "sending ", "sent"  # SENT alone (its ack came) or `sent <settling>`
# How old another process's handed marker must be before the next holder takes its send for made: past the ack's
# wait and the handing process's next outbox pass, so a process that lives has settled it by then.
HANDED_WAIT_SECONDS = 30

# Compare and set of a stream's outbox marker: set it to `value` (delete it when "") only if it still reads
# `expected`. Returns 1 when it did.
SWAP = ScriptSpec(
    "OUTBOX_SWAP",
    keys=("marker",),
    args=("expected", "value", "ttl"),
    body="""
if redis.call('GET', K.marker) ~= A.expected then
  return 0
end
if A.value == '' then
  redis.call('DEL', K.marker)
else
  redis.call('SET', K.marker, A.value, 'EX', A.ttl)
end
return 1
""",
)


def sending_record(shows: int, final: bool, token: str) -> dict[str, str]:
    """What a stream's record says of a frame about to go out: once it is sent, the bubble shows the first `shows`
    bytes of the stream's text (`ws_shows`), for a holder that dies before its ack comes; `token` names the record
    (`ws_sent_by`), so that it can be undone if the frame never goes out (AckLedger.unsent). The frame pump's polls
    write it themselves (scripts.POLL); this is for a frame made otherwise (a repeated message's first)."""
    return {
        "ws_shows": str(shows),
        "ws_sent_final": "1" if final else "",
        "ws_sent_by": token,
        F.ws_sent_at: now(),
        F.ws_confirmed: token,  # its frame goes out as soon as this is written
    }


class Outbox:
    def __init__(self, client: redis.Redis, keys: Keys, store: StreamStore, bot_id: str):
        self.client = client
        self.keys = keys
        self.store = store
        self.durable = store.durable
        self.open_key = keys.ws_open(bot_id)
        self._swap = LuaScript(client, SWAP, replication=self.durable, write=OUTBOX)

    def track(self, stream_id: str, req_id: str, generation: int, chatid: str, single: bool) -> None:
        """A stream is answered on `req_id` of the connection of `generation`, from now on."""
        self.store.record(stream_id, tracking(req_id, generation, chatid, single), durable=True)
        self.follow(stream_id)

    def track_separate(self, stream_id: str, chatid: str, single: bool, as_is: bool = False) -> None:
        """A stream with no bubble (the rest of a run after a form's answer; with `as_is`, a message made whole
        already, such as an answer's rest): sent whole, once, when final."""
        fields = separate_tracking(chatid, single)
        if as_is:
            fields["ws_as_is"] = "1"
        self.store.record(stream_id, fields, durable=True)
        self.follow(stream_id)

    def post(
        self, message_id: str, owner: str, markdown: str, chat: str, single: bool, fields: dict, keep_seconds: int = 0
    ) -> None:
        """A message of its own (an answer's rest, a push) as a finished stream tracked to be sent once, whole, by
        the connection's holder; `keep_seconds` keeps it longer than a stream's keys. Each step may be done again,
        under the same id, by a caller whose earlier try died half-way (see `posted`)."""
        attempt = first_attempt(owner)
        self.store.open_stream(message_id, attempt, fields.get("aibotid", ""), fields.get("userid", ""), fields)
        self.store.replace(message_id, attempt, markdown)
        self.store.finish(message_id, attempt, DONE, {})
        if keep_seconds:
            pipe = self.client.pipeline(transaction=False)
            for key in (self.keys.stream(message_id), self.keys.stream_chunks(message_id)):
                pipe.expire(key, keep_seconds)
            pipe.execute()
        self.track_separate(message_id, chat, single, as_is=True)

    def posted(self, message_id: str) -> bool:
        """Whether a message was posted whole (tracked to be sent, being sent, or sent): not to be made again."""
        return bool(self.marker(message_id)) or self.tracked(message_id)

    def follow(self, stream_id: str) -> None:
        """Put the stream in the open set: its delivery is looked after until its bubble is finished."""
        self._write(self.open_key, self.following(stream_id))

    def following(self, stream_id: str) -> list[tuple]:
        """The commands of `follow`, for a write that carries them with its own (the answer queue's: its key shares
        the open set's hash tag, so both are one node's, and one wait for its replica covers both)."""
        return [("ZADD", self.open_key, time.time(), stream_id), ("EXPIRE", self.open_key, OUTBOX_TRACKED_TTL_SECONDS)]

    def delivered(self, stream_id: str) -> None:
        """The bubble got its final frame: nothing left to send."""
        self._write(self.open_key, [("ZREM", self.open_key, stream_id)])

    def orphans(self, generation: int, live: set[str], page: int = PAGE) -> list[str]:
        """Every tracked stream that no live reply of this connection covers. Read a page at a time (one round trip
        for a page's hashes), however many streams are open."""
        self.client.zremrangebyscore(self.open_key, "-inf", time.time() - OUTBOX_TRACKED_TTL_SECONDS)
        found, gone = [], []
        start = 0
        while True:
            ids = self.client.zrange(self.open_key, start, start + page - 1)
            waiting = [i for i in ids if i not in live]
            for stream_id, meta in zip(waiting, self.store.reads.metas(waiting), strict=True):
                if not meta:
                    gone.append(stream_id)
                elif meta.get(F.ws_generation) != str(generation) or meta.get(F.ws_dead):
                    found.append(stream_id)
                # else: being answered on this connection (its reply is registered a moment later)
            if len(ids) < page:
                break
            start += page
        if gone:
            self.client.zrem(self.open_key, *gone)
        return found

    def claim(self, stream_id: str, claimant: str) -> bool:
        """Take the sending of a stream's rest (False: sent, or being sent, by someone else). `claimant` names this
        claim alone (claimant_token) and is the same for each try of it: a try whose first attempt was applied but
        whose reply was lost (redis-py, or the caller, tries again) finds the marker its own, not someone else's.

        Raises:
            redis.RedisError: Redis did not answer (try again with the same `claimant`).
        """
        key = self.keys.ws_outbox(stream_id)
        token = SENDING + claimant
        [claimed] = self._write(key, [("SET", key, token, "NX", "EX", OUTBOX_CLAIM_TTL_SECONDS)])
        return bool(claimed) or self.client.get(key) == token

    def hand(self, stream_id: str, claimant: str) -> str:
        """Mark the claimed send of a stream's rest as handed to the socket, just before it goes: the marker it
        wrote ("" when the claim is no longer `claimant`'s: nothing is to be sent).

        Raises:
            redis.RedisError: Redis did not answer (nothing was sent; Redis may have made the mark all the same).
        """
        marker, key = HANDED + claimant, self.keys.ws_outbox(stream_id)
        swapped = self._swap.run({"marker": key}, _swapping(SENDING + claimant, marker))
        # A try whose mark was made but whose reply was lost (redis-py sends it again on a new connection) finds
        # its own mark: before, it took the claim for lost and sent nothing, and the mark, left saying `handed`,
        # was taken for made by the next holder (the one-server run of seed 53: the user never had the rest).
        return marker if swapped or self.client.get(key) == marker else ""

    def settle(self, stream_id: str, marker: str, sent: bool) -> bool:
        """Settle a handed send whose ack did not say: made (`sent`: marked sent by this settling, out of the open
        set) or to be made again (the marker cleared). False when the marker is no longer `marker` (another holder
        settled it).

        Raises:
            redis.RedisError: Redis did not answer.
        """
        key, value = self.keys.ws_outbox(stream_id), (f"{SENT} {secrets.token_hex(6)}" if sent else "")
        swapped = self._swap.run({"marker": key}, {"expected": marker, "value": value, "ttl": SENT_TTL_SECONDS})
        # A retry of a settling whose reply was lost finds its own mark: before, it took it for another holder's,
        # and the answer's files were never sent.
        if not (swapped or (sent and self.client.get(key) == value)):
            return False
        if sent:
            self.delivered(stream_id)
        return True

    def handed_elsewhere(self, stream_id: str, process: str) -> str:
        """The marker of a send another process handed to its socket at least HANDED_WAIT_SECONDS ago and never
        settled (that process is gone: it would have), or "".

        Raises:
            redis.RedisError: Redis did not answer.
        """
        key = self.keys.ws_outbox(stream_id)
        pipe = self.client.pipeline(transaction=False)
        pipe.get(key)
        pipe.ttl(key)
        marker, ttl = pipe.execute()
        if not marker or not marker.startswith(HANDED) or handing_process(marker) == process:
            return ""
        return marker if 0 <= ttl <= SENT_TTL_SECONDS - HANDED_WAIT_SECONDS else ""

    def sent(self, stream_id: str) -> None:
        key = self.keys.ws_outbox(stream_id)
        self._write(key, [("SET", key, SENT, "EX", SENT_TTL_SECONDS)])
        self.delivered(stream_id)

    def failed(self, stream_id: str) -> None:
        self.client.delete(self.keys.ws_outbox(stream_id))

    def refused(self, stream_id: str, errcode: int, give_up_after: int = 0) -> None:
        """WeCom refused the send with `errcode`. A command conflict (6000-6002: a stream still open in that chat)
        is tried again after a back-off (the marker is held that long); another refusal at the next pass, or, when
        `give_up_after` > 0 (a push), given up at that many refusals: marked `failed <errcode>` for a day and taken
        out of the open set."""
        key = self.keys.ws_outbox(stream_id)
        if errcode in CONFLICT_ERRCODES:
            self._write(key, [("SET", key, "conflict", "EX", OUTBOX_CONFLICT_TTL_SECONDS)])
            return
        refusals = self.client.hincrby(self.keys.stream(stream_id), F.send_refusals, 1)
        if give_up_after and refusals >= give_up_after:
            self._write(key, [("SET", key, f"failed {errcode}", "EX", SENT_TTL_SECONDS)])
            self.delivered(stream_id)
            return
        self.failed(stream_id)

    def tracked(self, stream_id: str) -> bool:
        """Whether the stream is in the open set (its delivery is still to come)."""
        return self.client.zscore(self.open_key, stream_id) is not None

    def marker(self, stream_id: str) -> str | None:
        """What became of a stream's send: `sending …`, `handed …`, `sent[ …]`, `conflict`, `failed <errcode>`, or
        None."""
        return self.client.get(self.keys.ws_outbox(stream_id))

    def _write(self, key: str, commands: list[tuple]) -> list:
        replies = self.durable.execute(key, commands, OUTBOX)
        raise_first_error(replies)
        return replies


def claimant_token(process: str) -> str:
    """A claimant of an outbox marker no other claim has, even in the same process."""
    return f"{process} {secrets.token_hex(6)}"


def handing_process(marker: str) -> str:
    """The process that wrote a handed marker (`handed <process> <token>`)."""
    return marker[len(HANDED) :].rsplit(" ", 1)[0]


def shown_of(meta: dict[str, str]) -> tuple[str, bool]:
    """What a tracked stream's bubble shows of its text (the last frame handed to the socket), and whether that
    frame finished it. Nothing before its first frame, or when the bubble showed text the answer no longer has
    (replaced since). A frame whose pass was never confirmed never went out (its holder died first, mid-pass): the
    bubble shows what the record before it said."""
    if record_sure(meta):
        shows, final = int(meta.get(F.ws_shows) or 0), bool(meta.get(F.ws_sent_final))
    else:
        shows, final = int(meta.get(F.ws_shows_before) or 0), False
    return cut_utf8(meta.get(F.text, ""), max(0, shows)), final


def record_sure(meta: dict[str, str]) -> bool:
    """Whether a stream's last frame record says what its bubble shows: its fate is known (shown, refused, undone),
    or its pass was confirmed (the frame went out then, unless its holder died in that instant), or WeCom acked it."""
    token = meta.get(F.ws_sent_by)
    return not meta.get(F.ws_sent_at) or token in (meta.get(F.ws_confirmed), meta.get(F.ws_acked_by))


def shows_of(content: str, text: str) -> int:
    """How many bytes of the stream's `text` a bubble of `content` surely shows: their common start (a bubble
    hides links Dify left relative, and may show a note below the text: what follows them is not counted)."""
    common = 0
    for ours, theirs in zip(content, text, strict=False):
        if ours != theirs:
            break
        common += 1
    return utf8_len(text[:common])


def rest_of(final: str, shown: str) -> str:
    """What the user has not seen of the final bubble `final`, given the bubble showed `shown`. A live bubble shows
    its text and, joined on with NOTE_SEPARATOR, a note (a form's prompt, say) that the final bubble no longer has:
    compared by text, `shown` loses its last part until `final` begins with what is left (an answer that ends in
    paragraphs may then repeat one, never lose one); `final` whole when nothing of it was shown."""
    seen = shown
    while seen:
        if final.startswith(seen):
            return final[len(seen) :]
        seen = seen[: max(0, seen.rfind(NOTE_SEPARATOR))]
    return final


def tracking(req_id: str, generation: int, chatid: str, single: bool) -> dict[str, str]:
    """The fields of a stream answered on `req_id` of the connection of `generation` (a new stream is opened
    with them, then followed; a stream answered again, on a repeat's req_id, is tracked)."""
    return {
        F.ws_req_id: req_id,
        F.ws_generation: str(generation),
        F.ws_chat: chatid,
        F.ws_single: "1" if single else "",
    }


def separate_tracking(chatid: str, single: bool) -> dict[str, str]:
    """The fields of a stream with no bubble: sent whole, once, when final (by aibot_send_msg)."""
    return {F.ws_dead: "1", F.ws_generation: "0", F.ws_chat: chatid, F.ws_single: "1" if single else ""}


def _swapping(expected: str, marker: str) -> dict[str, object]:
    return {"expected": expected, "value": marker, "ttl": SENT_TTL_SECONDS}
