"""The store's Lua scripts run unchanged on a Redis Cluster and on managed cluster proxies: every key a script
touches comes from KEYS (read statically from each script's source), and the keys of every call the store makes
hash to one slot (checked on the calls a whole set of store operations really makes)."""

from __future__ import annotations

import re
import threading

import pytest
import redis
from redis.crc import key_slot

from services.audit.trail import CLAIM_DUE
from services.callback.rest_posts import RestPosts
from services.chat.quotas import TAKE as QUOTA_TAKE
from services.keys import Keys
from services.longconn.outbox import SWAP as OUTBOX_SWAP
from services.lua import LuaScript, ScriptSpec
from services.streams import scripts
from services.streams.poll_path import PollPath
from services.streams.slots import TAKE as SLOT_TAKE
from services.streams.store import AppendRequest, StreamStore

CALL = re.compile(r"redis\.call\(\s*'([A-Z]+)'\s*,\s*([^,)]+)")
KEY_ARGUMENT = re.compile(r"KEYS\[[^\]]+\]")
# The commands the scripts use, each taking one key, in first position.
SINGLE_KEY_COMMANDS = {
    "GET", "SET", "DEL", "EXISTS", "EXPIRE", "PEXPIRE", "INCR",
    "HSET", "HSETNX", "HGET", "HMGET", "HSTRLEN", "HGETALL", "HINCRBY", "HDEL", "RPUSH", "LRANGE", "LLEN", "LTRIM",
    "ZADD", "ZREM", "ZSCORE", "ZCARD", "ZCOUNT", "ZREMRANGEBYSCORE", "ZRANGEBYSCORE", "ZRANK",
    "SADD", "SCARD", "SISMEMBER",
}  # fmt: skip


def keys_not_from_keys(source: str) -> list[str]:
    """Each `redis.call` of `source` whose key is not a KEYS entry (or whose command is not a known one-key one)."""
    found = []
    for command, first_argument in CALL.findall(source):
        if command not in SINGLE_KEY_COMMANDS or not KEY_ARGUMENT.fullmatch(first_argument.strip()):
            found.append(f"{command} {first_argument.strip()}")
    return found


@pytest.mark.parametrize("name", sorted(scripts.ALL))
def test_every_key_a_script_touches_comes_from_keys(name):
    source = scripts.ALL[name]
    assert CALL.findall(source), "a script that calls nothing"
    assert keys_not_from_keys(source) == []


@pytest.mark.parametrize(
    "bad",
    [
        "redis.call('GET', 'dify_stream:' .. ARGV[1])",  # a key built inside the script
        "local h = redis.call('HMGET', KEYS[1], 'inflight_key') redis.call('ZREM', h[1], ARGV[1])",  # read from data
        "redis.call('MGET', KEYS[1], KEYS[2])",  # a command of several keys
    ],
)
def test_the_check_finds_keys_that_do_not_come_from_keys(bad):
    assert keys_not_from_keys(bad)


@pytest.mark.parametrize("spec", [CLAIM_DUE, SLOT_TAKE, QUOTA_TAKE, OUTBOX_SWAP], ids=lambda spec: spec.name)
@pytest.mark.parametrize("prefix", ["", "tenant:bot:helpdesk:"])
def test_the_controls_scripts_touch_their_keys_only_and_in_one_slot(spec, prefix):
    """The audit's claim, the answer cap's take, a quota's take and the outbox's swap: KEYS only, and the keys of one
    call in one slot."""
    assert keys_not_from_keys(spec.source) == []
    keys = Keys(prefix)
    calls = {
        "CLAIM_DUE": [keys.audit_due()],
        "SLOT_TAKE": [keys.answer_slots(), keys.answer_line(), keys.answer_line_seen()],
        "QUOTA_TAKE": [keys.quota("user", "alice", "20261126")],
        "OUTBOX_SWAP": [keys.ws_outbox("s1")],
    }[spec.name]
    assert len(calls) == len(spec.keys)
    assert len({key_slot(key.encode()) for key in calls}) == 1


def test_every_call_of_the_store_stays_in_one_slot(redis_client, monkeypatch):
    calls: list[tuple[str, list[str]]] = []
    real_command = LuaScript.command
    this_test = threading.current_thread()

    def recording(self, keys, args):
        # Only this test's calls: a gateway an earlier test of this worker left running calls scripts of its own
        # (a card's CARD_BACK was once recorded here, in a fresh-clone CI).
        if threading.current_thread() is this_test:
            calls.append((self.source, list(keys)))
        return real_command(self, keys, args)

    monkeypatch.setattr(LuaScript, "command", recording)
    store = StreamStore(redis_client, Keys("tenant:"), 3600, lease_seconds=2, rate_limit=5)
    for n, user in enumerate(["alice", "b{o}b"]):  # a userid with braces gets a digest for a hash tag
        store.create(f"s{n}", f"m{n}", "A", "bot1", user, {"userid": user})
    store.append_many([AppendRequest("s0", "A", ["a"], 0, {"task_id": "t"}), AppendRequest("s1", "A", ["b"], 0, {})])
    store.replace("s0", "A", "replaced")
    poll_path = PollPath(store)
    poll_path.poll("s0", 330, 20000, "orphan", "A")
    # what a replica confirmed (Sentinel, Cluster), on the poll's own connection
    poll_path._vouch_on(lambda command: redis_client.execute_command(*command), store.keys.stream("s0"), 8)
    store.record("s0", {"rest_sent": "yes"})
    store.leases.renew({"s0": "A", "s1": "A"})
    store.leases.release({"s1": "A"})
    store.take("s1", "A", "B")
    store.count_dify_call("s1", "B#2")
    store.stop("s1", "stopped")
    store.claim_dify_stop("s1")
    store.finish("s0", "A", "done", images=[{"base64": "AA==", "md5": "x"}], feedback={"message_id": "m", "user": "u"})
    store.take_unpolled("s0")
    RestPosts(redis_client, Keys("tenant:"), store.durable, None, "A", "bot1").renew("s0", "sending A 1")
    names = {source: name for name, source in scripts.ALL.items()}
    assert {names[source] for source, _ in calls} == set(scripts.ALL)  # every script was called
    for source, keys in calls:
        assert len({key_slot(key.encode()) for key in keys}) == 1, f"{names[source]}: {keys}"


# --- named protocols (services/lua.py: ScriptSpec) ------------------------------------------------------------------

ECHO = ScriptSpec(
    "ECHO",
    keys=("hash",),
    args=("first", "second"),
    row=("first", "second", "stored"),
    hash_fields=("a", "missing"),
    body="""
redis.call('HSET', K.hash, 'a', A.first)
local h = redis.call('HMGET', K.hash, HASH_FIELDS)
if A.second == 'drop' then return row{first = A.first, stored = H.a} end
local out = row{first = A.first, second = A.second, stored = H.a}
for i = REST, #ARGV do out[#out + 1] = ARGV[i] end
return out
""",
)


def test_a_named_script_takes_and_returns_its_values_by_name(redis_client):
    script = LuaScript(redis_client, ECHO)
    reply = script.run({"hash": "spec:{t}"}, {"second": "2", "first": "1"}, ["x", "y"])
    assert ECHO.fields(reply) == ({"first": "1", "second": "2", "stored": "1"}, ["x", "y"])
    redis_client.delete("spec:{t}")


def test_a_named_script_refuses_a_wrong_name_on_either_side(redis_client):
    script = LuaScript(redis_client, ECHO)
    with pytest.raises(TypeError, match="ECHO: wrong arguments \\['secnd', 'second'\\]"):
        script.run({"hash": "spec:{t}"}, {"first": "1", "secnd": "2"})
    with pytest.raises(TypeError, match="wrong keys"):
        script.run({"hsh": "spec:{t}"}, {"first": "1", "second": "2"})
    with pytest.raises(redis.ResponseError, match="ECHO: its row has no second"):
        script.run({"hash": "spec:{t}"}, {"first": "1", "second": "drop"})
    redis_client.delete("spec:{t}")
    with pytest.raises(ValueError, match="'end' cannot be a Lua field name"):
        ScriptSpec("BAD", keys=("k",), args=("end",), body="return 1")
    with pytest.raises(ValueError, match="BAD: no argument named 'secnd'"):  # when the source is made: at import
        ScriptSpec("BAD", keys=("k",), args=("second",), body="return A.secnd")
