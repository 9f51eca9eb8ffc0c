"""The only place that knows Redis key names (docs/redis-keys.md) and the fixed TTLs; every key has a TTL and the
optional REDIS_KEY_PREFIX. Keys one script touches together share a hash tag (the part in braces: a stream's id, a
bot and user), so they hash to one Cluster slot; every other key is used alone.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

# WeCom may retry a message callback for a few minutes and polls a stream for 6 minutes; keep the msgid map
# well past both so a late retry still finds its stream.
MSGID_TTL_SECONDS = 15 * 60
# How long a refusal (unknown, disabled or refused user) is remembered, so a burst of messages asks once.
AUTH_DENIAL_TTL_SECONDS = 30
# How long "the auth API or database is down" is remembered for the other messages of that burst.
AUTH_OUTAGE_TTL_SECONDS = 3
# A user may rate an answer long after its stream hash expired; keep the Dify message it maps to this long.
FEEDBACK_TTL_SECONDS = 7 * 24 * 3600
# The in-flight set of a user outlives WeCom's 6-minute polling window of its newest member.
INFLIGHT_TTL_SECONDS = 420
# Per-user rate limits count the messages admitted in a sliding window of this length.
RATE_WINDOW_SECONDS = 60
# The long-connection outbox: a claim on sending a stream's rest is taken over after this (the sender died);
OUTBOX_CLAIM_TTL_SECONDS = 30
# after WeCom refused a send as a conflict (6000-6002) the outbox tries again this much later;
OUTBOX_CONFLICT_TTL_SECONDS = 5
# a stream it tracks is given up after this (its keys expire too).
OUTBOX_TRACKED_TTL_SECONDS = 2 * 3600
# A record that something went out (a rest, a push, an answer's files), or failed for good: kept long past any retry
# or take-over that could send it again.
SENT_TTL_SECONDS = 24 * 3600
# A claim on posting a message owed through a response_url: renewed before each try of the post (tries are at most
# 18 s apart: a 10 s timeout and an 8 s wait), taken over after it lapses (the poster died or froze).
REST_POST_CLAIM_TTL_SECONDS = 30
# A message owed through a response_url is kept, and tried, as long as its URL lives.
REST_POST_TTL_SECONDS = 3600
# A claim on uploading an answer's files over the long connection: long enough for a hundred chunks to be acked.
FILE_UPLOAD_CLAIM_TTL_SECONDS = 600
# The long connection's answer queue and a bot's lease generation (its fencing token, which must never go back).
ANSWER_QUEUE_TTL_SECONDS = 24 * 3600
WS_GENERATION_TTL_SECONDS = 30 * 24 * 3600
# The audit trail's lists in Redis (services/audit): the streams that owe a row, and the rows that wait for the
# database; each renewed with every entry, so a database outage of up to this long loses no row.
AUDIT_KEEP_SECONDS = 2 * 24 * 3600
# A day's quota count outlives its day (in any time zone) by a day.
QUOTA_TTL_SECONDS = 2 * 24 * 3600
# An answer in flight is listed for the operator's page this long at most past its opening (WeCom polls a bubble for
# 6 minutes; an answer whose end no process saw leaves the list then).
LIVE_ANSWER_SECONDS = 3600
# Failed sign-ins to the operator's page are counted per address and minute (a count outlives its minute).
ADMIN_FAILS_TTL_SECONDS = 120
# A schedule's tick is kept this long (a tick is run or skipped once: catch_up_seconds is at most a day), the time of
# the latest tick it ran this long (a schedule unseen for longer starts afresh: services/schedules/ticks.py).
SCHEDULE_TICK_TTL_SECONDS = 2 * 24 * 3600
SCHEDULE_LAST_TTL_SECONDS = 30 * 24 * 3600
# A claim on pushing a tick's answer: renewed before each target, taken over after it lapses.
SCHEDULE_PUSH_CLAIM_TTL_SECONDS = 30
# A form's card state outlives the form's own expiry by this much (a late click still gets "expired").
FORM_KEEP_AFTER_EXPIRY_SECONDS = 24 * 3600


@dataclass(frozen=True)
class Keys:
    """Builds every Redis key of the gateway under one prefix."""

    prefix: str = ""

    # --- long-connection mode: who holds a bot's WebSocket ------------------------------------------------------

    def ws_lease(self, bot_id: str) -> str:
        """String `<holder> <generation>` of the process holding the bot's WebSocket; expires if it dies."""
        return f"{self.prefix}wecom_ws:{{{bot_id}}}:lease"

    def ws_cooldown(self, bot_id: str) -> str:
        """Set while no process may connect the bot: a subscriber that is not ours took it (a cool-down)."""
        return f"{self.prefix}wecom_ws:{{{bot_id}}}:cooldown"

    def ws_backoff(self, bot_id: str) -> str:
        """Set while no process may try the bot's credentials again: WeCom refused them (bot-wide back-off)."""
        return f"{self.prefix}wecom_ws:{{{bot_id}}}:backoff"

    def ws_refusals(self, bot_id: str) -> str:
        """Counter of WeCom's refusals of the bot's credentials in a row (the back-off grows with it)."""
        return f"{self.prefix}wecom_ws:{{{bot_id}}}:refusals"

    def rest_posts(self) -> str:
        """Sorted set of the streams owing a message of their own through their response_url (score: when; entries
        older than REST_POST_TTL_SECONDS are dropped, and the set's TTL, renewed with each, is that)."""
        return f"{self.prefix}rest_posts"

    def closed_early(self) -> str:
        """Sorted set of the streams whose rest goes out on its own (score: when listed): a bubble a poll closed
        before its answer ended, or an answer about to end longer than its live bubble; watched until that rest has
        gone out (callback mode: services/callback/delivery.py); TTL as rest_posts'. (Named for its first use.)"""
        return f"{self.prefix}closed_early"

    def rest_post(self, stream_id: str) -> str:
        """Hash of a stream's message owed through its response_url: `url`, `message`."""
        return f"{self.prefix}rest_post:{{{stream_id}}}"

    def rest_post_claim(self, stream_id: str) -> str:
        """`sending <claimant>` while one process posts a stream's owed message, then `sent` or `failed`."""
        return f"{self.prefix}rest_post_claim:{{{stream_id}}}"

    def quota(self, scope: str, who: str, day: str) -> str:
        """Set of the msgids a user (`scope` user) or a group chat (`scope` chat) asked on `day` (YYYYMMDD in
        QUOTA_TIMEZONE): counted once per message whatever WeCom repeats; TTL QUOTA_TTL_SECONDS."""
        return f"{self.prefix}quota:{{{scope}:{who}}}:{day}"

    def answer_slots(self) -> str:
        """Sorted set of the bot's answers holding one of its MAX_ACTIVE_ANSWERS_PER_BOT slots (score: when the slot
        lapses unless renewed); shares its hash tag with the line (services/streams/slots.py); TTL a day, renewed."""
        return f"{self.prefix}answer_slots:{{slots}}"

    def answer_line(self) -> str:
        """Sorted set of the bot's answers waiting for a slot (score: when each joined the line); TTL as the slots'."""
        return f"{self.prefix}answer_line:{{slots}}"

    def answer_line_seen(self) -> str:
        """Sorted set: when each waiter last asked for its slot (one that stopped asking leaves the line)."""
        return f"{self.prefix}answer_line_seen:{{slots}}"

    def audit_due(self) -> str:
        """Sorted set of the streams whose audit row is owed (score: when a sweep looks at it: once it ended, or
        after its bubble's window); TTL AUDIT_KEEP_SECONDS, renewed with each entry."""
        return f"{self.prefix}audit_due"

    def audit_pending(self) -> str:
        """Sorted set of audit rows (JSON) that wait for the database (score: when they began to wait); TTL
        AUDIT_KEEP_SECONDS, renewed with each entry."""
        return f"{self.prefix}audit_pending"

    def live_answers(self) -> str:
        """Sorted set of the bot's streams in flight (score: when each opened), for the operator's page
        (services/admin/live.py); TTL LIVE_ANSWER_SECONDS, renewed with each entry."""
        return f"{self.prefix}live_answers"

    def admin_fails(self, address: str) -> str:
        """Sorted set of the failed sign-ins to /admin from `address` in the last minute (score: when): a
        deployment's, not a bot's; TTL ADMIN_FAILS_TTL_SECONDS, renewed with each."""
        return f"{self.prefix}admin_fails:{address}"

    def audit_purge(self) -> str:
        """`<process>` while one process deletes the audit rows past their term (a deployment's, not a bot's)."""
        return f"{self.prefix}audit_purge"

    def ws_open(self, bot_id: str) -> str:
        """Sorted set of the bot's streams answered over its WebSocket and not yet delivered whole (score: when)."""
        return f"{self.prefix}wecom_ws:{{{bot_id}}}:open"

    def ws_outbox(self, stream_id: str) -> str:
        """`sending`/`sent`: the rest of a stream whose req_id died goes out once through aibot_send_msg."""
        return f"{self.prefix}wecom_ws_outbox:{{{stream_id}}}"

    def ws_jobs(self, bot_id: str) -> str:
        """Redis Stream of the streams a holder opened, for any replica to answer (consumer group `answers`)."""
        return f"{self.prefix}wecom_ws_jobs:{{{bot_id}}}"

    def ws_status(self, bot_id: str) -> str:
        """The bot's connection as its holder last saw it (holding, bad_credentials, cooling_down), for /readyz."""
        return f"{self.prefix}wecom_ws:{{{bot_id}}}:status"

    def ws_generation(self, bot_id: str) -> str:
        """Counter bumped at every new holder: the fencing token a holder's frames are checked against."""
        return f"{self.prefix}wecom_ws:{{{bot_id}}}:generation"

    def ws_sends(self, chat: str) -> str:
        """Sorted set of the proactive messages sent to a chat in the last hour (score: when): WeCom's per-chat
        limits, kept across replicas (services/longconn/pacing.py)."""
        return f"{self.prefix}wecom_ws_sends:{chat}"

    # --- the push API (services/push) ---------------------------------------------------------------------------

    def push_quota(self, chat: str) -> str:
        """Sorted set of the pushes accepted for a chat in the last hour (score: when), against WeCom's limits."""
        return f"{self.prefix}push_quota:{chat}"

    def push_idempotency(self, idempotency_key: str) -> str:
        """String: the push id an Idempotency-Key was given (24 h). The name holds the key's SHA-256."""
        return f"{self.prefix}push_idempotency:{hashlib.sha256(idempotency_key.encode()).hexdigest()}"

    def direct_push(self, push_id: str) -> str:
        """Hash of a push sent over WeCom's HTTP APIs (a group robot's webhook, the self-built app; services/push/
        direct.py): `target` (`webhook:<name>`, `user:a|b party:2 tag:3`), `status` (sending, sent, partial, failed,
        unknown), `error`, `created_at`, `opener`, `sent_nothing` (a retry sends it); TTL SENT_TTL_SECONDS."""
        return f"{self.prefix}direct_push:{push_id}"

    def app_token(self, corp_id: str, agent_id: int) -> str:
        """String: the self-built app's access token, shared by every replica (services/push/app.py); TTL a little
        less than WeCom gives it."""
        return f"{self.prefix}app_token:{corp_id}:{agent_id}"

    def app_token_fetch(self, corp_id: str, agent_id: int) -> str:
        """`<process>` while one process fetches the app's access token (the others wait for it); TTL 10 s."""
        return f"{self.prefix}app_token_fetch:{corp_id}:{agent_id}"

    def app_sends(self, corp_id: str, agent_id: int, target: str) -> str:
        """Sorted set of the pushes the self-built app sent to `target` (`user:<id>`, `party:<id>`, `tag:<id>`) in the
        last hour (score: when), against WeCom's 30 a minute and 1,000 an hour per member, across replicas; an app's
        share one Cluster slot (a push to several targets takes its places in one script); TTL an hour."""
        return f"{self.prefix}app_sends:{{{corp_id}:{agent_id}}}:{target}"

    def webhook_sends(self, name: str) -> str:
        """Sorted set of the pushes sent to the bot's webhook `name` in the last minute (score: when), against WeCom's
        20 a minute per robot, across replicas; TTL a minute."""
        return f"{self.prefix}webhook_sends:{name}"

    # --- schedules (services/schedules): a bot's schedule keys share one Cluster slot --------------------------

    def _schedules(self) -> str:
        return f"{self.prefix}schedule:{{{self.prefix}schedules}}"

    def schedule_tick(self, name: str, tick: int) -> str:
        """Hash of one tick of the schedule `name` (`tick`: its epoch second): `status` (running, pushing, pushed,
        partial, failed, skipped), `tries`, `owner`, `stream` (the try's stream), `claimed_at`, `why`, and
        `to:<targets>` per push made (its status, and error); TTL SCHEDULE_TICK_TTL_SECONDS."""
        return f"{self._schedules()}:{name}:{tick}"

    def schedule_last(self, name: str) -> str:
        """String: the latest tick of the schedule run or skipped (epoch second); TTL SCHEDULE_LAST_TTL_SECONDS."""
        return f"{self._schedules()}:{name}:last"

    def schedule_open(self) -> str:
        """Sorted set of the bot's ticks not yet settled (`<schedule>:<tick>`, score the tick), which every serving
        process looks at; TTL SCHEDULE_TICK_TTL_SECONDS."""
        return f"{self._schedules()}:open"

    def schedule_push_claim(self, name: str, tick: int) -> str:
        """`<process>` while it pushes the tick's answer; TTL SCHEDULE_PUSH_CLAIM_TTL_SECONDS."""
        return f"{self._schedules()}:{name}:{tick}:pushing"

    # --- streams (hash + the Redis message list + the owner's lease) ----------------------------------------

    def stream(self, stream_id: str) -> str:
        """Hash with the stream's status, ids, owner and timestamps."""
        return f"{self.prefix}dify_stream:{{{stream_id}}}"

    def stream_chunks(self, stream_id: str) -> str:
        """List of answer deltas in arrival order."""
        return f"{self.prefix}dify_stream:{{{stream_id}}}:chunks"

    def stream_lease(self, stream_id: str) -> str:
        """String holding the owning replica's id while it consumes Dify; expires if that replica dies."""
        return f"{self.prefix}dify_stream:{{{stream_id}}}:lease"

    def stream_images(self, stream_id: str) -> str:
        """List of JSON {base64, md5} images Dify produced, sent as msg_item with the final reply."""
        return f"{self.prefix}dify_stream:{{{stream_id}}}:images"

    def stream_pattern(self) -> str:
        """Pattern matching the stream hashes (for SCAN in operator commands)."""
        return f"{self.prefix}dify_stream:{{*}}"

    def stream_id_from_key(self, key: str) -> str | None:
        """The stream id of a stream hash key, or None for its sub-keys (chunks, lease)."""
        head = f"{self.prefix}dify_stream:{{"
        if not key.startswith(head) or not key.endswith("}"):
            return None
        return key[len(head) : -1]

    # --- human-input forms (services/forms) ------------------------------------------------------------------

    def form(self, stream_id: str, form_digest: str) -> str:
        """Hash of one form of a stream's Dify run: the form, its card, who may answer it, and what became of it
        (TTL: the form's expiry and a day more). Tagged as the stream's keys: a click reads both at once."""
        return f"{self.prefix}dify_form:{{{stream_id}}}:{form_digest}"

    def form_typing(self, aibotid: str, chat: str, userid: str) -> str:
        """String: the task id of the form whose values (or action) this user types in this chat next."""
        return f"{self.prefix}dify_form_typing:{aibotid}:{chat}:{userid}"

    # --- files Dify makes, served by signed links (services/files) -------------------------------------------

    def file_ref(self, ref: str) -> str:
        """String (JSON): the URL, name, type and size of a file a link serves (TTL: the link's)."""
        return f"{self.prefix}dify_file:{ref}"

    def ws_files(self, stream_id: str) -> str:
        """`sending`/`sent`: a long-connection answer's files were uploaded and sent once."""
        return f"{self.prefix}wecom_ws_files:{{{stream_id}}}"

    # --- WeCom message dedup --------------------------------------------------------------------------------

    def wecom_msg(self, msgid: str) -> str:
        """String: the stream id created for a WeCom msgid."""
        return f"{self.prefix}wecom_msg:{msgid}"

    def inflight(self, aibotid: str, userid: str) -> str:
        """Sorted set of the user's streams whose bubble is still open (score: when it closes at the latest)."""
        return f"{self.prefix}inflight:{{{_tag(aibotid, userid)}}}"

    def rate(self, aibotid: str, userid: str) -> str:
        """Sorted set of the user's streams admitted in the last rate window (score: when), for the rate limit."""
        return f"{self.prefix}ratelimit:{{{_tag(aibotid, userid)}}}"

    def replay(self, signature: str) -> str:
        """Marker of an authentic callback already handled (events are not processed twice)."""
        return f"{self.prefix}replay:{signature}"

    # --- conversations and feedback -------------------------------------------------------------------------

    def conversation(self, aibotid: str, chat: str, userid: str) -> str:
        """String: the Dify conversation_id that continues this user's chat (1:1 chat = "single")."""
        return f"{self.prefix}conversation:{aibotid}:{chat}:{userid}"

    def conversation_turns(self, conversation_id: str) -> str:
        """List (JSON, oldest first): the turns of a conversation a bot keeps itself (an OpenAI-compatible backend's:
        services/backends/openai/history.py), each {"q": the question, "a": the answer its user was shown}; it
        lives as long as the conversation (CONVERSATION_TTL_SECONDS from its last turn)."""
        return f"{self.prefix}conversation_turns:{{{conversation_id}}}"

    def conversation_pattern(self, userid: str) -> str:
        """Pattern matching every conversation key of one user (for SCAN in operator commands)."""
        return f"{self.prefix}conversation:*:*:{userid}"

    def feedback(self, feedback_id: str) -> str:
        """String (JSON): the Dify message and end-user a WeCom feedback id (a stream id) refers to; tagged as the
        stream's keys, since it is written with the stream's final state."""
        return f"{self.prefix}feedback:{{{feedback_id}}}"

    # --- user authorization -----------------------------------------------------------------------------

    def user_token(self, userid: str) -> str:
        """String: the user's current auth token (TTL = token lifetime minus a margin)."""
        return f"{self.prefix}authorization:wechatid:{userid}"

    def token_info(self, token: str) -> str:
        """String (JSON): the user info the auth API returned for that token (same TTL). The name holds the token's
        SHA-256, not the token: key names are what SCAN, MONITOR and slow logs show."""
        return f"{self.prefix}authorization:token:{hashlib.sha256(token.encode()).hexdigest()}"

    def auth_flight(self, userid: str) -> str:
        """String: 'running' while one request exchanges the user's token, then briefly the refusal/outage code."""
        return f"{self.prefix}authorization:flight:{userid}"


def _tag(*parts: str) -> str:
    """A hash tag made of `parts`; one that would hold a brace (which ends a tag early) is replaced by a digest."""
    value = ":".join(parts)
    if "{" in value or "}" in value:
        return hashlib.sha1(value.encode()).hexdigest()[:16]
    return value
