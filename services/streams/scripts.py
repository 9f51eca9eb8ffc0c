"""The Lua scripts of the stream store (run through services/lua.py).

Every script touches only keys passed in KEYS, and the keys of one call share a hash tag, so one call is one
Redis Cluster slot: the same scripts run on one server, under Sentinel, on a Cluster and on managed cluster proxies
that refuse anything else (tests/test_scripts.py checks both). A script may read a key's *name* from a hash and
return it to the caller (the in-flight set of a stream's user), but never touches a key that is not in KEYS.
Work on many streams is a pipeline of one call per stream (StreamStore), one round trip per node.
"""

from __future__ import annotations

from services.lua import ScriptSpec
from services.streams.record import lua

# Fencing. A stream's `owner` is the attempt now answering it, `<process>#<run>`: `run` counts the stream's
# attempts (1 for the first; each take-over, resume or queued take adds one), so every attempt's token is new, and
# each writing script refuses a token that is not the current owner. A superseded attempt (its lease lost while it
# lived, its process stopped past the lease) can then never write again, even from the process now running the
# next attempt.

# KEYS: stream, lease. ARGV: attempt (the first: `<process>#1`), now, ttl, lease_ms, inflight key (a name kept for
# later), field/value pairs... A new pending stream, owned by its first attempt. Its msgid is claimed next, and its
# user's slot admitted after that.
OPEN = lua("""
redis.call('HSET', KEYS[1], F.status, 'pending', F.owner, ARGV[1], F.run, 1, F.created_at, ARGV[2],
           F.updated_at, ARGV[2], F.folded, 0, F.text, '', F.inflight_key, ARGV[5], unpack(ARGV, 6))
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[4])
return 1
""")

# KEYS: the user's in-flight set, the user's rate log. ARGV: stream_id, now, max_inflight, inflight_until,
# inflight_ttl, rate_limit (0 = none), rate_window (seconds).
# Returns 1 admitted, 2 when the user already has max_inflight open bubbles, 3 when the user was admitted rate_limit
# times in the last rate_window seconds (a sliding window: no burst of twice the limit across a minute's edge).
# A stream admitted before (a retried call whose reply was lost) is admitted again. The stream goes into the set
# first and is counted with it (ZADD NX answers whether it was there: a command fewer than asking ZSCORE), and comes
# out again when refused; a set this call created and left empty is gone with that, so no key is left without a TTL.
# The set's open bubbles are counted by score (a stale entry, a stream whose replica died before freeing its slot,
# counts no more once its polling window is over), so stale entries are not deleted first: they go with the set,
# INFLIGHT_TTL_SECONDS after the user's last message, or with their stream's finish.
ADMIT = lua("""
if redis.call('ZADD', KEYS[1], 'NX', ARGV[4], ARGV[1]) == 0 then return 1 end
local refused = 0
if redis.call('ZCOUNT', KEYS[1], '(' .. ARGV[2], '+inf') > tonumber(ARGV[3]) then
  refused = 2
elseif tonumber(ARGV[6]) > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', tonumber(ARGV[2]) - tonumber(ARGV[7]))
  if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[6]) then
    refused = 3
  else
    redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
    redis.call('EXPIRE', KEYS[2], ARGV[7])
  end
end
if refused > 0 then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return refused
end
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
""")

# Shared by the writing scripts, whose KEYS[1] is the stream: may the attempt `owner` write to it? 'ok' (with the
# status, and the values of up to two more fields the caller names, read in the same call); 'taken' when another
# attempt owns it now (whatever its status: the successor answers, or has answered, the user); 'closed' when it is
# gone, or final while still this attempt's (a poll gave its bubble up: the answer goes another way).
_OWNERSHIP = lua("""
local function ownership(owner, ...)
  local h = redis.call('HMGET', KEYS[1], F.status, F.owner, ...)
  if not h[1] then return 'closed' end
  if h[2] ~= owner then return 'taken' end
  if h[1] ~= 'pending' and h[1] ~= 'streaming' then return 'closed' end
  return 'ok', h[1], h[3], h[4]
end
""")

# Shared by the writes that carry a deadline (epoch seconds; 0 for none): the moment their writer stops waiting for
# the reply. Redis refuses one it runs later (it was paused with the call in its socket, or a link held it), so a
# write its writer counts as not done never lands behind its back, after newer ones.
_DEADLINE = lua("""
local function late(deadline)
  deadline = tonumber(deadline)
  if deadline <= 0 then return false end
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000 > deadline
end
""")

# An append of deltas (and of field/value pairs) by the attempt `owner`. Arguments past the named ones: the
# `field_count` field/value pairs, then the `delta_count` deltas. Returns ok, closed, taken, conflict or late. The
# `expected` list length makes a retry safe: a call whose reply was lost may still have run (even after a later, longer
# retry was sent), so deltas already in the list are skipped and only the rest is pushed. The `deadline` (epoch
# seconds; 0 for none) is when its sender stops waiting for the reply: a call Redis runs later (it was paused, or the
# call sat in a partitioned link) is refused, so an append its writer counts as unwritten never lands behind the
# writer's back. With `lease_ms` (0: the lease is left alone), the append renews the attempt's lease as RENEW would
# (taking it back if it ran out while the stream stayed this attempt's): a writer appending anyway renews in one
# command what the runner's keeper renews in three.
APPEND = ScriptSpec(
    "APPEND",
    keys=("stream", "chunks", "lease"),
    args=("owner", "ttl", "now", "expected", "field_count", "delta_count", "deadline", "lease_ms"),
    shared=_OWNERSHIP + _DEADLINE,
    body=lua("""
local expected, nf, nd = tonumber(A.expected), tonumber(A.field_count), tonumber(A.delta_count)
if late(A.deadline) then return 'late' end
local first_delta = REST + 2 * nf
local state, status, first_token_at, lease_missing = ownership(A.owner, F.first_token_at, F.lease_missing_at)
if state ~= 'ok' then return state end
if tonumber(A.lease_ms) > 0 then
  redis.call('SET', K.lease, A.owner, 'PX', A.lease_ms)
  if lease_missing then redis.call('HDEL', K.stream, F.lease_missing_at) end
end
local writes = {F.status, 'streaming', F.updated_at, A.now}
for i = REST, first_delta - 1 do writes[#writes + 1] = ARGV[i] end
if nd > 0 then
  -- Pushed first, and checked by the length RPUSH answers (a command fewer than asking LLEN before); where the list
  -- did not hold the `expected` deltas (rare: a retry, a failover), the push is taken back and done right.
  local before = redis.call('RPUSH', K.chunks, unpack(ARGV, first_delta, first_delta + nd - 1)) - nd
  if before ~= expected then
    if before == 0 then redis.call('DEL', K.chunks) else redis.call('LTRIM', K.chunks, 0, before - 1) end
    local skip = before - expected
    if skip < 0 or skip > nd then return 'conflict' end
    if skip < nd then redis.call('RPUSH', K.chunks, unpack(ARGV, first_delta + skip, first_delta + nd - 1)) end
  end
  if before == 0 then
    redis.call('EXPIRE', K.chunks, A.ttl)
    if not first_token_at then
      writes[#writes + 1] = F.first_token_at
      writes[#writes + 1] = A.now
    end
  end
end
if status == 'pending' or #writes > 4 then redis.call('HSET', K.stream, unpack(writes)) end
return 'ok'
"""),
)

# KEYS: stream, chunks. ARGV: owner, ttl, now, answer. A long connection's record of what the bubble shows counts
# bytes of the text (POLL): when the new answer does not begin with what the bubble showed, the record says so
# (`ws_shows` -1: the bubble showed text the answer no longer has).
REPLACE = _OWNERSHIP + lua("""
local state = ownership(ARGV[1])
if state ~= 'ok' then return state end
local w = redis.call('HMGET', KEYS[1], F.ws_shows, F.text)
local shown = tonumber(w[1]) or 0
local record = {}
if shown > 0 and string.sub(ARGV[4], 1, shown) ~= string.sub(w[2] or '', 1, shown) then record = {F.ws_shows, -1} end
redis.call('DEL', KEYS[2])
if ARGV[4] ~= '' then
  redis.call('RPUSH', KEYS[2], ARGV[4])
  redis.call('EXPIRE', KEYS[2], ARGV[2])
end
redis.call('HSET', KEYS[1], F.status, 'streaming', F.folded, 0, F.text, '', F.replaced_at, ARGV[3],
           F.updated_at, ARGV[3], unpack(record))
return 'ok'
""")

# The end of an active stream by its attempt `owner`, at `status`. Arguments past the named ones: the `image_count`
# reply images, then field/value pairs. Returns 0 if not ours or not active; 2 if a poll gave it up as orphaned while
# it was still ours (its lease was gone, e.g. lost in a Redis failover, though its owner lived); else its row: whether
# the bubble had closed early (`close_reason`, `closed_bytes`), and the in-flight set the caller takes the stream out
# of (`inflight_key`). The reply images and the feedback mapping (`feedback`, '' for none, kept `feedback_ttl`) are
# written with the final state, so a finished answer always has both or neither (`images` counts them: a poll reads
# the list only when there are some). A retry of one finish (the same `finish_id`) whose first try ran but whose
# reply was lost (a timeout while Redis was paused: it runs what it had buffered when it resumes) gets the same row
# again, so the caller still does what follows it (the rest of an answer whose bubble closed early) once. A stream past
# its bubble's `window_seconds` (0: not looked at) that no poll closed (Redis was away as the window ended, and the
# finisher waited for it) is closed at the window now, at what the last poll folded (`text`: what the bubble shows),
# as a poll would have closed it: the caller sends what follows that, never the whole answer over it. The lease is
# left to run out: nothing reads the lease of a final stream (a poll looks at it only while the stream is active), and
# deleting it cost two commands a message. The stream and its chunks were given a tenth more than the ttl when they
# began (StreamStore.open_ttl), so a finish within that tenth of the open leaves their TTLs as they are (at least the
# ttl still): two commands fewer for most answers. With `chunks` (-1: not looked at), the deltas the owner's writer
# had confirmed: a list that no longer holds that many (a failover lost appends no later append found wanting) is not
# finished (3): the owner writes the answer whole first.
# fmt: off
FINISH = ScriptSpec(
    "FINISH",
    keys=("stream", "chunks", "images", "feedback"),
    args=("owner", "status", "now", "ttl", "feedback", "feedback_ttl", "finish_id", "image_count", "window_seconds",
          "chunks"),
    hash_fields=("status", "owner", "inflight_key", "close_reason", "closed_bytes", "error", "finish_id", "created_at"),
    row=("close_reason", "closed_bytes", "inflight_key"),
    body=lua("""
local h = redis.call('HMGET', K.stream, HASH_FIELDS)
if H.owner ~= A.owner then return 0 end
if H.status == 'expired' and H.error == 'owner_lost' then return 2 end
local reason, closed_bytes = H.close_reason or '', H.closed_bytes or ''
if H.status ~= 'pending' and H.status ~= 'streaming' then
  if A.finish_id ~= '' and H.finish_id == A.finish_id then
    return row{close_reason = reason, closed_bytes = closed_bytes, inflight_key = H.inflight_key or ''}
  end
  return 0
end
if tonumber(A.chunks) >= 0 and redis.call('LLEN', K.chunks) ~= tonumber(A.chunks) then return 3 end
local window = tonumber(A.window_seconds)
if reason == '' and window > 0 and tonumber(A.now) - (tonumber(H.created_at) or 0) >= window then
  reason, closed_bytes = 'window', tostring(redis.call('HSTRLEN', K.stream, F.text))
  redis.call('HSET', K.stream, F.closed_at, A.now, F.close_reason, reason, F.closed_bytes, closed_bytes)
end
local images = tonumber(A.image_count)
redis.call('HSET', K.stream, F.status, A.status, F.finished_at, A.now, F.updated_at, A.now, F.finish_id, A.finish_id,
           F.images, images, unpack(ARGV, REST + images))
if images > 0 then
  redis.call('DEL', K.images)
  redis.call('RPUSH', K.images, unpack(ARGV, REST, REST + images - 1))
  redis.call('EXPIRE', K.images, A.ttl)
end
if tonumber(A.now) - (tonumber(H.created_at) or 0) > math.floor(tonumber(A.ttl) / 10) then
  redis.call('EXPIRE', K.stream, A.ttl)
  redis.call('EXPIRE', K.chunks, A.ttl)
end
if A.feedback ~= '' then redis.call('SET', K.feedback, A.feedback, 'EX', A.feedback_ttl) end
return row{close_reason = reason, closed_bytes = closed_bytes, inflight_key = H.inflight_key or ''}
"""),
)
# fmt: on

# A poll of a stream: returns false for an unknown stream, else its row (`images` come after it, only once the stream is
# done). `event` names what this call just did (taken_over, resumed, expired, closed_window, closed_overflow, or ''),
# `freed_inflight_key` is the user's in-flight set when the bubble just closed (the caller frees the user's slot),
# `attempt` is the new attempt's token when the `taker` must start one (taken_over, resumed), `prompt` is what a live
# bubble shows below its text (a form waiting for its answer), `card` a template card to send with this reply (a form's,
# or the questions suggested after a done answer: given once, as WeCom takes one card per message; marked with this
# poll's `token`, `card_by`, so that a reply that never went out gives it back, CARD_BACK, and a run of the same poll
# again, its reply lost with its connection, hands it out again; with `keep_card` '1' it is
# left for a later poll: the reply to a message delivered again), `recorded` says what became of the frame record
# ('yes', 'late', or '' when none was asked), `shows` what a recorded frame shows (bytes of the text: all of it, or what
# the bubble showed when it closed early), `files` the answer's files (JSON; only to a frame's poll once the stream is
# done: the holder sends them after the bubble, and knows without a read of its own when there are none).
#
# What a replica holds (`vouch` '1': Sentinel or Cluster, a bubble polled through its callback): `vouched` is how many
# bytes of the text a poll showed once a replica held them (VOUCH), and `ahead_for` how long the text has run ahead of
# that ('' when it has not, or when the bubble is not live): the caller waits for a replica before it shows more
# (services/streams/poll_path.py). The script notes when the text first ran ahead (`ahead_since`).
#
# Each poll is counted in `polls` (a bubble no poll showed goes out through response_url: UNPOLLED), but one whose
# reply WeCom surely waits for no more (`counted` '': a callback read long after it was sent, by a process frozen
# meanwhile) does not count for a live bubble: nobody may ever see it; and a look of our own (`counted` 'never': the
# watch over answers whose rest follows) counts for none, nor closes a bubble (what WeCom's polls show decides that).
# Such a poll notes `late_poll_at` instead, for every poll writes, so that a WAIT after it covers every append before
# it.
#
# An active stream whose lease is gone (its replica died or handed it over) is taken by the polling replica (`taker`,
# if not empty): resumed when its Dify run can be streamed again (a chatflow's or workflow's `workflow_run_id` is known;
# at most 3 times), else restarted when nothing was shown yet and it was never restarted; otherwise it becomes expired
# with the `orphan_note`. The lease is looked at only by a poll that found no new text (text came since the last poll:
# its writer lived a moment ago; the next poll looks). The owner's own process, still running it (`taker_runs_it` '1':
# its lease was lost while it lived: a failover rolled it back, Redis paused), takes its lease back for that attempt
# instead: never a second attempt beside the first. A lease found missing is only noted at first (`lease_missing_at`):
# the stream is taken, restarted or expired by a poll at least `grace_seconds` later if it is still missing, so that an
# owner that lived through a Redis pause or failover (its lease ran out while it could not renew it) takes its lease
# back first. A process that takes no stream now (draining, or at STREAM_MAX_ACTIVE) leaves one it could resume or
# restart to a poll on another, within the window. One past `window_seconds`, or longer than `overflow_bytes`, is closed
# early (the bubble finishes now, the worker goes on and sends the rest as a message of its own).
#
# The frame record: a long connection's holder records what a bubble will show before the frame that shows it goes out
# (services/longconn/outbox.py), and its poll does it in the same write as the fold: `ws_shows` (bytes of the text the
# frame shows), `ws_sent_final` ('1' when the frame finishes the bubble) and `ws_sent_by` (the `record_token`, so that
# a frame that did not go out has its record undone: UNRECORD_SENT), `ws_shows_before` (what the record it replaces
# said: its frame goes out only once its pass is confirmed, `ws_confirmed`, so a holder killed before that leaves the
# bubble showing this) and `ws_sent_at` (`now`: until an ack says that frame was shown, the next holder waits before it
# takes the record for shown, services/longconn/orphans.py). A poll Redis runs past the `record_deadline` (_DEADLINE)
# records nothing and hands out no card (its caller sends no frame).
# fmt: off
POLL = ScriptSpec(
    "POLL",
    keys=("stream", "chunks", "lease", "images"),
    args=("now", "window_seconds", "overflow_bytes", "orphan_note", "taker", "lease_ms", "taker_runs_it",
          "grace_seconds", "token", "keep_card", "record_token", "record_deadline", "record_confirmed", "vouch",
          "counted"),
    row=("status", "text", "note", "close_reason", "closed_bytes", "has_response_url", "event", "freed_inflight_key",
         "attempt", "prompt", "card", "recorded", "shows", "files", "vouched", "ahead_for"),
    hash_fields=("status", "folded", "text", "note", "created_at", "close_reason", "closed_bytes", "response_url",
                 "inflight_key", "restarts", "workflow_run_id", "resumes", "owner", "lease_missing_at", "prompt",
                 "card", "card_shown", "card_by", "polls", "images", "files", "vouched_bytes", "ahead_since",
                 "ws_shows", "ws_shows_before", "ws_sent_at", "ws_sent_by", "ws_confirmed", "ws_acked_by"),
    shared=_DEADLINE,
    body=lua("""
local h = redis.call('HMGET', K.stream, HASH_FIELDS)
local status = H.status
if not status then return false end
local now = tonumber(A.now)
local recorded = ''
if A.record_token ~= '' then recorded = late(A.record_deadline) and 'late' or 'yes' end
local text = H.text or ''
local folded = tonumber(H.folded) or 0
local fresh = redis.call('LRANGE', K.chunks, folded, -1)
local writes = {}  -- written once, at the end
if #fresh > 0 then
  text = text .. table.concat(fresh)
  for _, v in ipairs({F.text, text, F.folded, folded + #fresh}) do writes[#writes + 1] = v end
end
local note, reason, closed_bytes, event, attempt = H.note or '', H.close_reason or '', H.closed_bytes or '', '', ''
local function next_attempt()
  attempt = A.taker .. '#' .. redis.call('HINCRBY', K.stream, F.run, 1)
  redis.call('SET', K.lease, attempt, 'PX', A.lease_ms)
  redis.call('HDEL', K.stream, F.lease_missing_at)
  return attempt
end
if status == 'pending' or status == 'streaming' then
  if #fresh == 0 and redis.call('EXISTS', K.lease) == 0 then
    local resumes = tonumber(H.resumes) or 0
    local taker = A.taker ~= ''
    local resumable = (H.workflow_run_id or '') ~= '' and resumes < 3
    local restartable = text == '' and reason == '' and (tonumber(H.restarts) or 0) == 0
    local owner = H.owner or ''
    local ours = taker and (owner == A.taker or string.sub(owner, 1, #A.taker + 1) == A.taker .. '#')
    if A.taker_runs_it == '1' and ours then
      redis.call('SET', K.lease, owner, 'PX', A.lease_ms)
      redis.call('HDEL', K.stream, F.lease_missing_at)
    elseif not H.lease_missing_at and tonumber(A.grace_seconds) > 0 then
      redis.call('HSET', K.stream, F.lease_missing_at, A.now)
    elseif H.lease_missing_at and now - tonumber(H.lease_missing_at) < tonumber(A.grace_seconds) then
      -- noted already: its owner has until the grace is over to take its lease back
    elseif not taker and (resumable or restartable) and now - tonumber(H.created_at) < tonumber(A.window_seconds) then
      -- this process takes no stream now (it drains, or runs STREAM_MAX_ACTIVE): a poll on one that can will
    elseif taker and resumable then
      redis.call('HSET', K.stream, F.owner, next_attempt(), F.resumes, resumes + 1, F.resumed_at, A.now,
                 F.updated_at, A.now)
      event = 'resumed'
    elseif taker and restartable then
      redis.call('DEL', K.chunks)
      redis.call('HSET', K.stream, F.owner, next_attempt(), F.status, 'pending', F.restarts, 1, F.folded, 0,
                 F.taken_over_at, A.now, F.updated_at, A.now)
      status = 'pending'
      event = 'taken_over'
    else
      status = 'expired'
      event = 'expired'
      note = A.orphan_note
      redis.call('HSET', K.stream, F.status, status, F.note, note, F.error, 'owner_lost', F.finished_at, A.now)
    end
  elseif reason == '' and A.counted ~= 'never' then
    if now - tonumber(H.created_at) >= tonumber(A.window_seconds) then
      reason = 'window'
    elseif #text > tonumber(A.overflow_bytes) then
      reason = 'overflow'
    end
    if reason ~= '' then
      event = 'closed_' .. reason
      closed_bytes = tostring(#text)
      redis.call('HSET', K.stream, F.closed_at, A.now, F.close_reason, reason, F.closed_bytes, closed_bytes)
    end
  end
end
local freed = ''
if event ~= '' and event ~= 'taken_over' and event ~= 'resumed' then freed = H.inflight_key or '' end
local prompt, card = '', ''
local live = (status == 'pending' or status == 'streaming') and reason == ''
if live then prompt = H.prompt or '' end
-- (a card this poll's token holds is handed again: the client ran the script again, its first reply lost)
if A.keep_card ~= '1' and recorded ~= 'late' and (live or status == 'done') and H.card and H.card ~= ''
   and (not H.card_shown or (A.token ~= '' and H.card_by == A.token)) then
  card = H.card
  for _, v in ipairs({F.card_shown, A.now, F.card_by, A.token}) do writes[#writes + 1] = v end
end
local shows = ''
if recorded == 'yes' then
  shows = reason ~= '' and closed_bytes or tostring(#text)
  -- what the bubble surely shows before this frame: the last record's, unless its pass was never confirmed
  local before = H.ws_shows or ''
  if (H.ws_sent_at or '') ~= '' and H.ws_sent_by ~= H.ws_confirmed and H.ws_sent_by ~= H.ws_acked_by then
    before = H.ws_shows_before or ''
  end
  for _, v in ipairs({F.ws_shows, shows, F.ws_sent_final, live and '' or '1', F.ws_sent_by, A.record_token,
                      F.ws_sent_at, A.now, F.ws_shows_before, before}) do
    writes[#writes + 1] = v
  end
  if A.record_confirmed == '1' then
    for _, v in ipairs({F.ws_confirmed, A.record_token}) do writes[#writes + 1] = v end
  end
end
local vouched, ahead_for = H.vouched_bytes or '0', ''
if A.vouch == '1' and live and #text > tonumber(vouched) then
  if H.ahead_since then
    ahead_for = tostring(math.max(0, now - tonumber(H.ahead_since)))
  else
    ahead_for = '0'
    for _, v in ipairs({F.ahead_since, A.now}) do writes[#writes + 1] = v end
  end
end
if A.counted == '1' or (A.counted == '' and not live) then
  for _, v in ipairs({F.polls, (tonumber(H.polls) or 0) + 1}) do writes[#writes + 1] = v end
else
  for _, v in ipairs({F.late_poll_at, A.now}) do writes[#writes + 1] = v end
end
redis.call('HSET', K.stream, unpack(writes))
local files = ''
if recorded ~= '' and status == 'done' then files = H.files or '' end
local out = row{status = status, text = text, note = note, close_reason = reason, closed_bytes = closed_bytes,
                has_response_url = (H.response_url and H.response_url ~= '') and '1' or '', event = event,
                freed_inflight_key = freed, attempt = attempt, prompt = prompt, card = card, recorded = recorded,
                shows = shows, files = files, vouched = vouched, ahead_for = ahead_for}
if status == 'done' and H.images ~= '0' then  -- no count: finished by the release before, so the list is read
  for _, image in ipairs(redis.call('LRANGE', K.images, 0, -1)) do out[#out + 1] = image end
end
return out
"""),
)
# fmt: on

# KEYS: stream. ARGV: the token of a poll whose reply never went out (or came too late), the most times a card is
# given back. The card it took out is handed out again (by the next poll): 1; 2 if another poll's reply carried it;
# 0 if no poll has (yet: a paused Redis runs the poll's script when it resumes, maybe after this one); 3 if it was
# given back that many times already (a clock that tells every reply late must not keep the card from the user).
CARD_BACK = lua("""
local by = redis.call('HGET', KEYS[1], F.card_by)
if by == ARGV[1] then
  if (tonumber(redis.call('HGET', KEYS[1], F.card_backs)) or 0) >= tonumber(ARGV[2]) then return 3 end
  redis.call('HINCRBY', KEYS[1], F.card_backs, 1)
  redis.call('HDEL', KEYS[1], F.card_shown, F.card_by)
  return 1
end
if by then return 2 end
return 0
""")

# KEYS: stream. ARGV: the token of a pump pass that recorded the frames it was about to send, then did not send them
# (the record's reply was lost: a paused Redis may still run it when it resumes), then field/value pairs to restore.
# Restores them only if that pass's record is the last one (`ws_sent_by`): 1 restored, 0 not.
UNRECORD_SENT = lua("""
if redis.call('HGET', KEYS[1], F.ws_sent_by) ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
return 1
""")

# KEYS: stream. ARGV: deadline (_DEADLINE; 'late' past it, nothing written), field/value pairs. Writes only to an
# existing hash, so no key is ever left without a TTL. A long connection's frame records carry a deadline: one whose
# reply was lost in a Redis pause, run on resuming after the record of the next frame, must not overwrite it.
RECORD = _DEADLINE + lua("""
if late(ARGV[1]) then return 'late' end
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
return 1
""")

# KEYS: stream, lease. ARGV: attempt, lease_ms. Returns 1 if another attempt has taken the stream over, else 0. A
# lease that ran out (e.g. through a Redis outage) is taken back while the stream is still this attempt's; a stream
# that is gone or final needs no lease, and its worker learns that on its next write.
RENEW = _OWNERSHIP + lua("""
local holder = redis.call('GET', KEYS[2])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
  return 0
end
if holder then return 1 end
local state = ownership(ARGV[1])
if state == 'ok' then
  redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
  redis.call('HDEL', KEYS[1], F.lease_missing_at)
  return 0
end
if state == 'taken' then return 1 end
return 0
""")

# KEYS: stream, lease. ARGV: attempt, now. Drops this attempt's lease (graceful shutdown), so the next poll on
# another replica takes the stream over. Returns 1 if released.
RELEASE = lua("""
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[1], F.handed_over_at, ARGV[2])
return 1
""")

# KEYS: stream, lease. ARGV: opener (its first attempt), taker (a process), lease_ms, now. A stream opened by one
# process and queued for any (long-connection mode: the connection holder queues its messages' answers) is taken by
# `taker` while it is still pending and its opener's. Returns false (taken already, or restarted by a poll after the
# opener's lease ran out), else {the taker's attempt, its Dify calls so far, restarts, the hash's field/value
# pairs as they were before the take}: the taker answers from what it reads here, and the new Dify call it makes
# next is counted here (as CALLED would; not for a form's task, which follows a run), three commands fewer a message.
TAKE = lua("""
local h = redis.call('HGETALL', KEYS[1])
local f = {}
for i = 1, #h, 2 do f[h[i]] = h[i + 1] end
if f[F.status] ~= 'pending' or f[F.owner] ~= ARGV[1] then return false end
local run = (tonumber(f[F.run]) or 0) + 1
local attempt = ARGV[2] .. '#' .. run
local calls = tonumber(f[F.dify_calls]) or 0
local writes = {F.owner, attempt, F.run, run, F.updated_at, ARGV[4]}
if (f[F.form_task] or '') == '' then
  calls = calls + 1
  writes[#writes + 1] = F.dify_calls
  writes[#writes + 1] = calls
end
redis.call('HSET', KEYS[1], unpack(writes))
redis.call('SET', KEYS[2], attempt, 'PX', ARGV[3])
return {attempt, calls, tonumber(f[F.restarts]) or 0, unpack(h)}
""")

# KEYS: stream. ARGV: attempt. A new Dify call (not a resume) for the stream, about to be made by `attempt`: counts
# it; returns {calls so far, restarts}, {0, 0} for a stream that is gone, or {-1, 0} when another attempt owns the
# stream (or its user stopped it), so that a process woken after its stream was restarted elsewhere calls nothing.
CALLED = lua("""
local h = redis.call('HMGET', KEYS[1], F.status, F.dify_calls, F.restarts, F.owner)
if not h[1] then return {0, 0} end
if h[4] ~= ARGV[1] then return {-1, 0} end
local calls = (tonumber(h[2]) or 0) + 1
redis.call('HSET', KEYS[1], F.dify_calls, calls)
return {calls, tonumber(h[3]) or 0}
""")

# KEYS: stream, lease. ARGV: now, note. The user stopped the stream's answer: an active stream becomes final at
# once (`done`, the note after the text so far), owned by no attempt any more, so its worker's next write (and its
# lease renewal) is refused wherever it runs, and no poll resumes or restarts it. The Dify task is claimed for its
# stop call here when its id is known already (else its worker claims it when it learns the id: STOP_DIFY).
# Returns false if the stream was not active; else {the user's in-flight set, the Dify task id to stop or ''}.
STOP = lua("""
local h = redis.call('HMGET', KEYS[1], F.status, F.inflight_key, F.task_id)
if h[1] ~= 'pending' and h[1] ~= 'streaming' then return false end
redis.call('HSET', KEYS[1], F.status, 'done', F.note, ARGV[2], F.error, 'stopped', F.owner, 'stopped',
           F.finished_at, ARGV[1], F.updated_at, ARGV[1])
redis.call('DEL', KEYS[2])
local task = ''
if h[3] and h[3] ~= '' and redis.call('HSETNX', KEYS[1], F.dify_stopped, ARGV[1]) == 1 then task = h[3] end
return {h[2] or '', task}
""")

# KEYS: stream. ARGV: now. A worker learnt that its stream was stopped by the user: it calls Dify's stop for the
# task if nobody has (1), once across every replica.
STOP_DIFY = lua("""
if redis.call('HGET', KEYS[1], F.error) ~= 'stopped' then return 0 end
return redis.call('HSETNX', KEYS[1], F.dify_stopped, ARGV[1])
""")

# KEYS: stream. A finished answer whose bubble no poll ever showed (WeCom never got the reply that opened it: every
# try of its callback timed out, so it has nothing to poll) is taken to go out through response_url, and its bubble,
# should a poll come after all, says the answer was sent separately. 1 when taken; 0 when a poll came first (or the
# stream is gone).
UNPOLLED = lua("""
local h = redis.call('HMGET', KEYS[1], F.status, F.polls)
if not h[1] or (tonumber(h[2]) or 0) > 0 then return 0 end
redis.call('HSET', KEYS[1], F.close_reason, 'separately', F.closed_bytes, 0, F.delivered, 'response_url')
return 1
""")

# KEYS: the claim on a message owed through a response_url (services/callback/rest_posts.py). ARGV: the claimant's
# token, the claim's TTL. Renews the claim if it is still the claimant's: 1; 0 when it lapsed and another took it (the
# claimant must not post: the other does).
RENEW_CLAIM = lua("""
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
""")

# KEYS: stream. ARGV: how many bytes of its text a poll is about to show, now that a replica holds them (POLL's
# `vouch`). Raises the stream's `vouched_bytes` to that (never lowers it: two polls of one bubble may cross), and
# forgets since when the text ran ahead. Writes only to an existing hash, so no key is ever left without a TTL.
VOUCH = lua("""
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if tonumber(ARGV[1]) > (tonumber(redis.call('HGET', KEYS[1], F.vouched_bytes)) or 0) then
  redis.call('HSET', KEYS[1], F.vouched_bytes, ARGV[1])
end
redis.call('HDEL', KEYS[1], F.ahead_since)
return 1
""")

ALL = {
    "OPEN": OPEN,
    "ADMIT": ADMIT,
    "APPEND": APPEND.source,
    "REPLACE": REPLACE,
    "FINISH": FINISH.source,
    "POLL": POLL.source,
    "VOUCH": VOUCH,
    "RECORD": RECORD,
    "RENEW": RENEW,
    "RELEASE": RELEASE,
    "TAKE": TAKE,
    "CALLED": CALLED,
    "STOP": STOP,
    "STOP_DIFY": STOP_DIFY,
    "UNPOLLED": UNPOLLED,
    "RENEW_CLAIM": RENEW_CLAIM,
}
