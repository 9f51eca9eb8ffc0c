"""Forms in Redis, shared by every replica: one hash per form (keys.form), and a pointer to the form whose values a
user types (keys.form_typing). A form is claimed once, by a click or a typed answer on any replica, in one script
that also decides who goes on with the run: the stream's own worker, while the bubble still waits for it, or the
claimer (the bubble is gone: the rest goes out as a new message).

A form's task id (the card's `task_id`) is `<stream id>@<digest of the form token>`: unique per bot, never reused,
and it names the form's key, so a click needs nothing else.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass

import orjson
import redis

from services import replication
from services.forms.form import FILE_LIST, Form, Input
from services.keys import FORM_KEEP_AFTER_EXPIRY_SECONDS, Keys
from services.lua import LuaScript
from services.replication import Replication
from services.wecom.messages import STREAM_ID_PATTERN

OPEN, CLAIMED, SUBMITTING = "open", "claimed", "submitting"
SUBMITTED, EXPIRED, FAILED = "submitted", "expired", "failed"
IN_BUBBLE, SEPARATELY = "bubble", "separately"  # who goes on after the claim: the stream's worker, or the claimer
_DIGEST = re.compile(r"[0-9a-f]{12}")
LISTS_DONE = "__lists_done__"  # in a form's values: the file lists the user said are complete (never submitted)
SET, ADD, CLOSE = "set", "add", "close"  # how put_value changes a value
# How long after a form's expiry the user's next message still finds it (and hears that it expired, instead of
# becoming a question for Dify).
TYPING_GRACE_SECONDS = 600

# KEYS: form. ARGV: ttl, field/value pairs... A form is written once: a resumed attempt that meets it again gets
# what became of it. Returns {status, way}.
_OPEN = """
if redis.call('EXISTS', KEYS[1]) == 1 then return redis.call('HMGET', KEYS[1], 'status', 'way') end
redis.call('HSET', KEYS[1], 'status', 'open', unpack(ARGV, 2))
redis.call('EXPIRE', KEYS[1], ARGV[1])
return {'open', false}
"""

# KEYS: form, stream. ARGV: who, action, values (JSON), now. Returns {outcome, status or way, choice}: unknown; not
# yours (only the user who asked may answer); already (answered or being answered: its status and choice); expired
# (or its answer stopped by its user);
# claimed, with the way the run goes on: in the bubble while its stream is active and its worker has not given the
# bubble up, else separately (the claimer goes on).
_CLAIM = """
local f = redis.call('HMGET', KEYS[1], 'status', 'userid', 'expires_at', 'bubble_closed', 'choice')
if not f[1] then return {'unknown', '', ''} end
if f[2] ~= ARGV[1] then return {'not_yours', f[1], f[5] or ''} end
if f[1] ~= 'open' then return {'already', f[1], f[5] or ''} end
if tonumber(ARGV[4]) >= tonumber(f[3]) then
  redis.call('HSET', KEYS[1], 'status', 'expired')
  return {'expired', 'expired', ''}
end
local s = redis.call('HMGET', KEYS[2], 'status', 'error')
if s[2] == 'stopped' then  -- its user stopped the answer (/stop): the run is not taken up again
  redis.call('HSET', KEYS[1], 'status', 'expired')
  return {'expired', 'expired', ''}
end
s = s[1]
local way = 'bubble'
if f[4] or (s ~= 'pending' and s ~= 'streaming') then way = 'separately' end
redis.call('HSET', KEYS[1], 'status', 'claimed', 'choice', ARGV[2], 'values', ARGV[3], 'claimed_at', ARGV[4],
           'way', way)
return {'claimed', way, ARGV[2]}
"""

# KEYS: form. ARGV: name, value (JSON), how (set | add | close), limit. One value of an open form: set, or added to
# its list (`add`; at most `limit` items, 0 for no limit), or its list named complete (`close`). Returns the form's
# values (JSON), or false when the form is no longer open (claimed, expired).
_PUT_VALUE = """
local f = redis.call('HMGET', KEYS[1], 'status', 'values')
if f[1] ~= 'open' then return false end
local values = {}
if f[2] and f[2] ~= '' then values = cjson.decode(f[2]) end
if ARGV[3] == 'set' then
  values[ARGV[1]] = cjson.decode(ARGV[2])
elseif ARGV[3] == 'add' then
  local list = values[ARGV[1]]
  if type(list) ~= 'table' then list = {} end
  if tonumber(ARGV[4]) == 0 or #list < tonumber(ARGV[4]) then table.insert(list, cjson.decode(ARGV[2])) end
  values[ARGV[1]] = list
else
  local done = values['__lists_done__']
  if type(done) ~= 'table' then done = {} end
  table.insert(done, ARGV[1])
  values['__lists_done__'] = done
end
local encoded = cjson.encode(values)
redis.call('HSET', KEYS[1], 'values', encoded)
return encoded
"""

# KEYS: form. ARGV: the values (JSON), why (Dify's words). A submission Dify refused as invalid (400): the form is open
# again, without the values Dify named, for the user to fill in anew. Returns the status it had.
_REOPEN = """
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'submitting' then return status or '' end
redis.call('HSET', KEYS[1], 'status', 'open', 'values', ARGV[1], 'refused', ARGV[2])
redis.call('HDEL', KEYS[1], 'choice', 'claimed_at', 'way')
return status
"""

# KEYS: form. The stream's worker stops waiting in the bubble (its window is ending): from now on a claim goes on
# separately. Returns the form's status (if it is no longer open, the claim came first and the bubble goes on).
_LEAVE_BUBBLE = """
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'open' then redis.call('HSET', KEYS[1], 'bubble_closed', '1') end
return status or ''
"""

# KEYS: form. ARGV: from statuses (space separated), to status, field/value pairs... Moves the form on if its status
# is one of `from`; returns the status it had.
_MOVE = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return '' end
if string.find(' ' .. ARGV[1] .. ' ', ' ' .. status .. ' ', 1, true) then
  redis.call('HSET', KEYS[1], 'status', ARGV[2], unpack(ARGV, 3))
end
return status
"""


def task_id_for(stream_id: str, form_token: str) -> str:
    return f"{stream_id}@{hashlib.sha256(form_token.encode()).hexdigest()[:12]}"


def parse_task_id(task_id: str) -> tuple[str, str] | None:
    """(stream id, form digest) of a task id of ours; None for anything else (a forged or foreign id)."""
    stream_id, sep, digest = task_id.rpartition("@")
    if not sep or not STREAM_ID_PATTERN.fullmatch(stream_id) or not _DIGEST.fullmatch(digest):
        return None
    return stream_id, digest


@dataclass(slots=True)
class FormRecord:
    """One form as Redis has it."""

    task_id: str
    form: Form
    status: str
    userid: str
    chatid: str
    chattype: str
    aibotid: str
    dify_user: str
    stream_id: str
    values: dict
    choice: str = ""
    way: str = ""
    card_rides: bool = False  # the card was put on the stream (a second form's cannot be: once per message)
    before: str = ""  # the run's answer before the pause: a message of its own after the form leaves it out
    opened_at: float = 0.0
    claimed_at: float = 0.0
    refused: str = ""  # Dify's words on the last submission it refused (the form is open again)
    route: str = ""  # the bot's route whose Dify app ran it ("": the bot's own)

    @property
    def missing(self) -> list[Input]:
        """The inputs the chat still asks for, in the form's order: a text without a value or a default, a select
        without a choice, a file not sent, a file list neither full nor said to be complete."""
        return [i for i in self.form.in_chat if not self.filled(i)]

    def filled(self, item: Input) -> bool:
        value = self.values.get(item.name)
        if item.kind == FILE_LIST:
            full = bool(item.max_files) and isinstance(value, list) and len(value) >= item.max_files
            return bool(value) and (full or item.name in self.values.get(LISTS_DONE, ()))
        return value not in (None, "", []) or bool(item.default and not item.is_select and not item.is_file)

    def submission(self) -> dict:
        """The inputs to submit: every input (Dify refuses a submission that leaves one out, even one with a
        default), with its value, else its default."""
        values = {i.name: i.default for i in self.form.inputs}
        return values | {k: v for k, v in self.values.items() if k in values}


class FormStore:
    def __init__(self, client: redis.Redis, keys: Keys, durable: Replication | None = None):
        self.client = client
        self.keys = keys
        # A form's opening waits for a replica (services/replication.py): a tap on its card must find it.
        self._open = LuaScript(client, _OPEN, replication=durable, write=replication.FORM)
        self._claim = LuaScript(client, _CLAIM)
        self._leave = LuaScript(client, _LEAVE_BUBBLE)
        self._move = LuaScript(client, _MOVE)
        self._put_value = LuaScript(client, _PUT_VALUE)
        self._reopen = LuaScript(client, _REOPEN)

    def key(self, task_id: str) -> str | None:
        parts = parse_task_id(task_id)
        return self.keys.form(*parts) if parts else None

    def open(self, task_id: str, form: Form, fields: dict[str, str]) -> tuple[str, str]:
        """Write the form once; returns (status, way): `open` for a new one, else what became of it."""
        ttl = max(60, int(form.expires_at - time.time()) + FORM_KEEP_AFTER_EXPIRY_SECONDS)
        pairs = [item for name, value in fields.items() for item in (name, value)]
        pairs += ["form", form.to_json(), "expires_at", f"{form.expires_at:.3f}", "opened_at", f"{time.time():.3f}"]
        status, way = self._open(keys=[self.key(task_id)], args=[ttl, *pairs])
        return status, way or ""

    def load(self, task_id: str) -> FormRecord | None:
        key = self.key(task_id)
        data = self.client.hgetall(key) if key else {}
        if not data or not data.get("form"):
            return None
        return FormRecord(
            task_id=task_id,
            form=Form.from_json(data["form"]),
            status=data.get("status", ""),
            userid=data.get("userid", ""),
            chatid=data.get("chatid", ""),
            chattype=data.get("chattype", ""),
            aibotid=data.get("aibotid", ""),
            dify_user=data.get("dify_user", ""),
            stream_id=data.get("stream_id", ""),
            route=data.get("route", ""),
            values=orjson.loads(data["values"]) if data.get("values") else {},
            choice=data.get("choice", ""),
            way=data.get("way", ""),
            card_rides=bool(data.get("card_rides")),
            before=data.get("before", ""),
            opened_at=float(data.get("opened_at") or 0),
            claimed_at=float(data.get("claimed_at") or 0),
            refused=data.get("refused", ""),
        )

    def status(self, task_id: str) -> tuple[str, str]:
        """(status, way) of a form."""
        status, way = self.client.hmget(self.key(task_id), ["status", "way"])
        return status or "", way or ""

    def claim(self, record: FormRecord, who: str, action: str, values: dict) -> tuple[str, str, str]:
        """Claim the form for `action` with `values`, by `who` (a WeCom userid); see _CLAIM."""
        keys = [self.key(record.task_id), self.keys.stream(record.stream_id)]
        args = [who, action, orjson.dumps(values).decode(), f"{time.time():.3f}"]
        outcome, detail, choice = self._claim(keys=keys, args=args)
        return outcome, detail or "", choice or ""

    def leave_bubble(self, task_id: str) -> str:
        return self._leave(keys=[self.key(task_id)], args=[]) or ""

    def move(self, task_id: str, from_statuses: tuple[str, ...], to: str, **fields: str) -> str:
        """Move the form to `to` if its status is one of `from_statuses`; returns the status it had."""
        pairs = [item for name, value in fields.items() for item in (name, value)]
        return self._move(keys=[self.key(task_id)], args=[" ".join(from_statuses), to, *pairs]) or ""

    def put_value(self, task_id: str, name: str, value, how: str = SET, limit: int = 0) -> dict | None:
        """Set one value of an open form (`how`: SET, ADD to its list of at most `limit`, CLOSE its list), in one
        step however many replicas take the user's messages at once; the form's values, or None when it is no
        longer open."""
        encoded = self._put_value(keys=[self.key(task_id)], args=[name, orjson.dumps(value).decode(), how, limit])
        return orjson.loads(encoded) if encoded else None

    def reopen(self, task_id: str, values: dict, why: str) -> str:
        """A submission Dify refused as invalid: the form open again with `values` (what Dify named left out) and
        Dify's words; returns the status it had (only `submitting` is reopened)."""
        return self._reopen(keys=[self.key(task_id)], args=[orjson.dumps(values).decode(), why]) or ""

    # --- the form whose values a user types next ----------------------------------------------------------------

    def typing(self, aibotid: str, chat: str, userid: str) -> str:
        return self.client.get(self.keys.form_typing(aibotid, chat, userid)) or ""

    def expect_typing(self, record: FormRecord) -> None:
        ttl = max(1, int(record.form.expires_at - time.time()) + TYPING_GRACE_SECONDS)
        self.client.set(self._typing_key(record), record.task_id, ex=ttl)

    def stop_typing(self, record: FormRecord) -> None:
        key = self._typing_key(record)
        if self.client.get(key) == record.task_id:
            self.client.delete(key)

    def _typing_key(self, record: FormRecord) -> str:
        return self.keys.form_typing(record.aibotid, record.chatid or "single", record.userid)
