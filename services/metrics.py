"""Prometheus metrics, all defined here, each labelled with the `bot` it concerns (a deployment may have several);
`render()` answers GET /metrics, `serve()` serves them on METRICS_PORT. `initialise(bot)` creates every series a bot
will have, at zero, when the gateway is built, so that rates, ratios and absent() work from start-up (the alerts of
k8s/monitoring rely on it).

Under gunicorn, gunicorn.conf.py sets PROMETHEUS_MULTIPROC_DIR before the workers start: each worker then writes
its values to files there and /metrics, on any worker, adds them up (prometheus-client's multiprocess mode).
"""

from __future__ import annotations

import itertools
import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    start_http_server,
)

CALLBACKS = Counter(
    "wecom_callbacks_total", "WeCom callbacks by bot, message type and outcome", ["bot", "type", "outcome"]
)
POLL_SECONDS = Histogram(
    "wecom_poll_seconds",
    "Time to answer a stream poll (decrypt, one Redis call, encrypt)",
    labelnames=["bot"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
FIRST_TOKEN_SECONDS = Histogram(
    "stream_first_token_seconds",
    "From the user's message to the backend's first delta",
    labelnames=["bot", "backend", "route"],
    buckets=(0.25, 0.5, 1, 2, 3, 5, 8, 13, 21, 34, 60, 120),
)
STREAM_SECONDS = Histogram(
    "stream_duration_seconds",
    "From the user's message to the answer's final state",
    labelnames=["bot", "route"],
    buckets=(1, 2, 5, 10, 20, 30, 60, 120, 240, 330, 600, 1200),
)
ACTIVE_STREAMS = Gauge(
    "streams_active", "Answers being streamed from Dify right now", ["bot"], multiprocess_mode="livesum"
)
MESSAGES = Counter(
    "wecom_messages_total",
    "User messages by what the gateway did: opened (a stream), dedup (a WeCom retry), in_flight_limit, "
    "busy, shutting_down, command, empty",
    ["bot", "outcome"],
)
DEDUP_HITS = Counter(
    "wecom_msgid_dedup_hits_total",
    "Repeated message callbacks (WeCom retries) answered with their existing stream",
    ["bot"],
)
STREAM_OUTCOMES = Counter(
    "stream_outcomes_total",
    "Stream endings and hand-offs: done, error, expired (its replica died after showing text), taken_over "
    "(restarted here after its replica died), resumed (its Dify run streamed again here), taken_over_elsewhere "
    "(this worker stopped for another replica), "
    "handed_over (at shutdown), closed_elsewhere (answer sent through response_url), closed_window, "
    "closed_overflow (bubble finished early)",
    ["bot", "outcome"],
)
DIFY_ERRORS = Counter(
    "dify_errors_total",
    "Backend failures (Dify's, an OpenAI-compatible server's) by code",
    ["bot", "backend", "code", "route"],
)
DIFY_CALLS = Counter(
    "dify_calls_total",
    "Dify calls for users' messages: new (a message's first), restart (the one documented restart of an answer "
    "whose replica died before it showed anything), resume (a run streamed again), form (a run followed on after its "
    "form), reattach (a run followed again after its stream was cut), duplicate (a second new call for one "
    "message: never expected); by the bot's backend (dify, openai: the name stays for the dashboards) and route",
    ["bot", "backend", "kind", "route"],
)
WS_CONNECTED = Gauge(
    "wecom_ws_connected",
    "Long-connection mode: 1 while this process holds the bot's WebSocket (summed over processes: should be 1)",
    ["bot"],
    multiprocess_mode="livesum",
)
WS_HOLDING_SINCE = Gauge(
    "wecom_ws_holding_since_timestamp_seconds",
    "Long-connection mode: when this process became the bot's connection holder (Unix time; 0 while it is not)",
    ["bot"],
    multiprocess_mode="livemax",
)
WS_HOLDER_CHANGES = Counter(
    "wecom_ws_holder_changes_total",
    "Long-connection mode: times this process became the bot's connection holder",
    ["bot"],
)
WS_FOREIGN_KICKS = Counter(
    "wecom_ws_foreign_kicks_total",
    "Long-connection mode: connections taken by a subscriber that is not one of ours (then a cool-down)",
    ["bot"],
)
WS_OUTBOX = Counter(
    "wecom_ws_outbox_total",
    "Long-connection mode: rests of answers whose req_id died, sent through aibot_send_msg, by result",
    ["bot", "result"],
)
WS_FRAMES = Counter("wecom_ws_frames_total", "Long-connection mode: stream frames sent", ["bot"])
WS_ERRCODES = Counter(
    "wecom_ws_errcodes_total", "Long-connection mode: frames WeCom refused, by errcode", ["bot", "errcode"]
)
WS_ACK_SECONDS = Histogram(
    "wecom_ws_ack_seconds",
    "Long-connection mode: from sending a frame to its ack",
    labelnames=["bot"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5),
)
DIFY_UNKNOWN_EVENTS = Counter(
    "dify_unknown_events_total", "Dify stream events the gateway does not know (ignored), by name", ["bot", "event"]
)
FILES = Counter(
    "dify_files_total",
    "Files Dify made, by what became of them: inline, linked, named (no PUBLIC_BASE_URL), uploaded (long "
    "connection), too_large, failed",
    ["bot", "outcome"],
)
USER_FILES = Counter(
    "wecom_user_files_total",
    "Files, images and videos users sent, by where they went: input (one of the Dify app's file variables), files "
    "(Dify's sys.files), form (a file field of a paused run's form), refused (the app, or the form's field, takes "
    "none of the kind), failed (could not be read or uploaded)",
    ["bot", "destination"],
)
TEXT_LINKS = Counter(
    "dify_text_links_total",
    "Dify-relative links in answer text (a knowledge base's images, file links), by what became of them: inline "
    "(an image under the bubble, or uploaded), linked (a signed link, or the name alone), failed",
    ["bot", "outcome"],
)
WS_FILES = Counter(
    "wecom_ws_files_total",
    "Long-connection mode: files uploaded and sent after an answer, by result",
    ["bot", "result"],
)
FILE_DOWNLOADS = Counter(
    "wecom_file_downloads_total", "Signed file links served, by result: ok, refused, gone, failed", ["result"]
)
CARDS = Counter(
    "wecom_template_cards_total", "Template cards sent, by kind: form, suggestions, welcome", ["bot", "kind"]
)
FORM_CLICKS = Counter(
    "wecom_form_clicks_total",
    "Clicks on form cards (and typed answers) by outcome: claimed, already, not_yours, expired, unknown, "
    "needs_values, bad_option",
    ["bot", "outcome"],
)
FORM_SUBMISSIONS = Counter(
    "dify_form_submissions_total",
    "Form submissions to Dify by result: submitted, expired, refused (Dify's 400 on the values), failed",
    ["bot", "result"],
)
FORM_WAIT_SECONDS = Histogram(
    "wecom_form_wait_seconds",
    "From a form shown to its answer (click or typed)",
    ["bot"],
    buckets=(1, 2, 5, 10, 30, 60, 120, 300, 900, 3600, 4 * 3600, 24 * 3600),
)
AUTH_OUTCOMES = Counter("auth_outcomes_total", "User authorizations by outcome", ["bot", "outcome"])
TOKEN_CACHE = Counter("auth_token_cache_total", "Token cache lookups", ["bot", "result"])
RESPONSE_URL = Counter(
    "response_url_messages_total",
    "Callback mode: messages of an answer's own (its rest, the whole answer) sent through response_url, by result",
    ["bot", "kind", "result"],
)
WS_SEPARATE = Counter(
    "wecom_ws_separate_messages_total",
    "Long-connection mode: messages of an answer's own (its rest, the whole answer) handed to the outbox for "
    "aibot_send_msg, by result",
    ["bot", "kind", "result"],
)
UNREPLICATED_WRITES = Counter(
    "redis_writes_unreplicated_total",
    "Writes that must outlive a failover (services/replication.py) no replica confirmed within REDIS_CLAIM_WAIT_MS "
    "(Sentinel/Cluster), by write: a failover right then could lose them",
    ["bot", "write"],
)
POLL_TEXT_UNREPLICATED = Counter(
    "wecom_poll_text_unreplicated_total",
    "Polls of a live bubble whose new text no replica confirmed within REDIS_CLAIM_WAIT_MS (Sentinel/Cluster): "
    "held_back (the bubble showed what a replica held), shown (ahead of the replicas too long: shown all the same)",
    ["bot", "outcome"],
)
WS_SPOOL = Counter(
    "wecom_ws_spool_total",
    "Long-connection messages read while Redis was away: kept in the database (not_kept: it was away too), and "
    "those a process took after their reader was gone (already, answered, replied, malformed, given_up)",
    ["bot", "outcome"],
)
CALLBACK_SPOOL = Counter(
    "wecom_callback_spool_total",
    "Callback messages Redis could not take within CALLBACK_INTAKE_SECONDS: kept in the database under the bubble "
    "the reply opened (not_kept: it was away too, the message was ended with a note), and those a poll of that "
    "bubble took once Redis was back (taken; taken_elsewhere: a process had taken its msgid meanwhile)",
    ["bot", "outcome"],
)
BACKGROUND_ERRORS = Counter(
    "background_errors_total",
    "Unexpected exceptions in a background loop, which logged them and went on (services/loops.py)",
    ["loop"],
)
READY = Gauge(
    "gateway_ready",
    "1 while this replica's last readiness check (/readyz) passed, 0 while it fails",
    multiprocess_mode="livemostrecent",
)
DEPENDENCY_UP = Gauge(
    "gateway_dependency_up",
    "1 while the last readiness check reached the dependency (redis; database with AUTH_MODE=external), else 0",
    ["dependency"],
    multiprocess_mode="livemostrecent",
)
STOPS = Counter(
    "wecom_stops_total",
    "/stop commands by outcome: stopped (an answer ended), nothing (no answer was streaming in that chat)",
    ["bot", "outcome"],
)
DIFY_STOPS = Counter(
    "dify_stop_calls_total",
    "Stops asked of the backend by reason: user, timeout",
    ["bot", "backend", "reason", "route"],
)
SCHEDULE_RUNS = Counter(
    "wecom_schedule_runs_total",
    "Schedules' ticks by outcome: pushed (to every target), partial (some target not), failed (the answer failed or "
    "was empty, or its processes died: nothing pushed), skipped (found past catch_up_seconds)",
    ["bot", "schedule", "outcome"],
)
PUSHES = Counter(
    "wecom_pushes_total",
    "Push API messages by outcome: accepted, refused_quota (429), sent, failed (a WeCom refusal; given up after 3), "
    "unknown (a webhook push whose reply was lost: not sent again)",
    ["bot", "outcome"],
)
WS_MISSED_PONGS = Counter(
    "wecom_ws_missed_pongs_total",
    "Long-connection pings WeCom left unanswered; two in a row drop the connection, which is then made again",
    ["bot"],
)
WS_PACED = Counter(
    "wecom_ws_sends_paced_total",
    "Proactive sends that waited for their chat's window of WeCom's limits (30 a minute, 1,000 an hour)",
    ["bot"],
)
WS_SUBSCRIBE_REFUSALS = Counter(
    "wecom_ws_subscribe_refusals_total",
    "Long-connection mode: subscriptions WeCom refused (bad bot_id or secret); the deployment backs off",
    ["bot"],
)


QUOTA_REFUSALS = Counter(
    "wecom_quota_refusals_total", "Questions refused by a daily quota, by whose quota (user, chat)", ["bot", "scope"]
)
BLOCKED_QUESTIONS = Counter(
    "wecom_blocked_questions_total", "Questions refused because they match a content rule", ["bot"]
)
MASKED_MATCHES = Counter(
    "wecom_masked_matches_total", "Matches of content rules masked in answers before any poll showed them", ["bot"]
)
RULES_RELOADS = Counter(
    "wecom_content_rules_reloads_total", "Content rules files read again after a change, by result", ["bot", "result"]
)
BOTS_RELOADS = Counter(
    "wecom_bots_reloads_total",
    "BOTS_FILE read again after a change: ok (the new bots are served) or rejected (the file did not load; "
    "the bots served stay as they were)",
    ["result"],
)
CAP_REFUSALS = Counter(
    "wecom_answer_cap_refusals_total",
    "Questions given a busy reply after waiting QUEUE_WAIT_SECONDS for one of the bot's MAX_ACTIVE_ANSWERS_PER_BOT",
    ["bot"],
)
QUEUE_WAIT_SECONDS = Histogram(
    "wecom_answer_queue_wait_seconds",
    "How long a question waited in line for one of the bot's answer slots (MAX_ACTIVE_ANSWERS_PER_BOT)",
    labelnames=["bot"],
    buckets=(0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120),
)
AUDIT_ROWS = Counter(
    "wecom_audit_rows_total",
    "Audit rows written to the database by outcome (answered, note, stopped, blocked, over_quota, busy, error); "
    "lost (the stream expired first) and dropped (too many waited for the database) count rows never written",
    ["bot", "outcome"],
)
AUDIT_PENDING = Gauge(
    "wecom_audit_pending", "Audit rows waiting in Redis for the database", ["bot"], multiprocess_mode="max"
)


# Which bots a metric's series start for: every bot, a bot of one WeCom mode, a bot whose audit trail is on; or once
# for the deployment (no `bot` label).
EVERY, CALLBACK, CONNECTION, AUDIT, DEPLOYMENT = "every", "callback", "connection", "audit", "deployment"
ITS_BACKEND = ("<the bot's backend>",)  # stands for the kind of the bot's backend
OWN_ROUTE = ("",)  # the bot's own route (another route's series appear once it answers)
SENT = ("sent", "failed")
SEPARATE_KINDS = ("rest", "whole_answer", "form_rest")
# The writes that wait for a Redis replica (services/replication.py).
REPLICATED_WRITES = (
    "msgid_claim", "stream_open", "stream_end", "answer_queue", "outbox", "schedule_claim", "push_claim", "push_open",
    "form",
)  # fmt: skip
# Each metric whose series start at zero, for which bots, with the values the code counts of its labels after `bot`
# (codes of a backend's HTTP errors come on top when they happen).
_STARTS = (
    (CALLBACKS, EVERY, ("text", "stream"), ("ok", "store_unavailable")),
    (MESSAGES, EVERY, (
        "opened", "dedup", "in_flight_limit", "rate_limited", "busy", "shutting_down", "command", "empty",
        "form_value", "unsupported", "over_quota", "blocked", "bot_retired",
    )),
    (STREAM_OUTCOMES, EVERY, (
        "done", "error", "expired", "taken_over", "resumed", "closed_window", "closed_overflow", "handed_over",
        "taken_over_elsewhere", "closed_elsewhere",
    )),
    (DIFY_ERRORS, EVERY, ITS_BACKEND, ("backend_error", "connect_error", "timeout", "stream_cut"), OWN_ROUTE),
    (DIFY_CALLS, EVERY, ITS_BACKEND, ("new", "restart", "resume", "duplicate", "form", "reattach", "asked_again"),
     OWN_ROUTE),
    (DIFY_STOPS, EVERY, ITS_BACKEND, ("user", "timeout"), OWN_ROUTE),
    (FIRST_TOKEN_SECONDS, EVERY, ITS_BACKEND, OWN_ROUTE),
    (STREAM_SECONDS, EVERY, OWN_ROUTE),
    (AUTH_OUTCOMES, EVERY,
     ("ok", "unknown_user", "user_disabled", "auth_refused", "auth_unavailable", "database_unavailable")),
    (TOKEN_CACHE, EVERY, ("hit", "miss")),
    (UNREPLICATED_WRITES, EVERY, REPLICATED_WRITES),
    (POLL_TEXT_UNREPLICATED, EVERY, ("held_back", "shown")),
    (FILES, EVERY, ("inline", "linked", "named", "uploaded", "too_large", "failed")),
    (CARDS, EVERY, ("form", "suggestions", "welcome")),
    (FORM_CLICKS, EVERY, ("claimed", "already", "not_yours", "expired", "unknown", "needs_values", "bad_option")),
    (FORM_SUBMISSIONS, EVERY, ("submitted", "expired", "refused", "failed")),
    (STOPS, EVERY, ("stopped", "nothing")),
    (QUOTA_REFUSALS, EVERY, ("user", "chat")),
    (RULES_RELOADS, EVERY, ("ok", "rejected")),
    *((metric, EVERY) for metric in (
        POLL_SECONDS, ACTIVE_STREAMS, DEDUP_HITS, FORM_WAIT_SECONDS, CAP_REFUSALS, BLOCKED_QUESTIONS, MASKED_MATCHES,
        QUEUE_WAIT_SECONDS,
    )),
    (RESPONSE_URL, CALLBACK, SEPARATE_KINDS, SENT),
    (CALLBACK_SPOOL, CALLBACK, ("kept", "not_kept", "taken", "taken_elsewhere")),
    (WS_SEPARATE, CONNECTION, SEPARATE_KINDS, SENT),
    (WS_SPOOL, CONNECTION, ("kept", "not_kept", "already", "answered", "replied", "malformed", "given_up")),
    (PUSHES, CONNECTION, ("accepted", "refused_quota", "sent", "failed", "unknown")),
    (WS_OUTBOX, CONNECTION, SENT),
    (WS_FILES, CONNECTION, SENT),
    # a dead req_id, an expired stream, a socket no longer subscribed, a command conflict (longconn/frames.py)
    (WS_ERRCODES, CONNECTION, ("846605", "846608", "846609", "6000")),
    *((metric, CONNECTION) for metric in (
        WS_CONNECTED, WS_HOLDING_SINCE, WS_HOLDER_CHANGES, WS_FOREIGN_KICKS, WS_FRAMES, WS_ACK_SECONDS,
        WS_SUBSCRIBE_REFUSALS, WS_PACED, WS_MISSED_PONGS,
    )),
    (AUDIT_ROWS, AUDIT, ("answered", "note", "stopped", "blocked", "over_quota", "busy", "error", "lost", "dropped")),
    (AUDIT_PENDING, AUDIT),
    (BOTS_RELOADS, DEPLOYMENT, ("ok", "rejected")),
    (BACKGROUND_ERRORS, DEPLOYMENT, (
        "audit_sweeper", "bots_file_watch", "answer_slots", "append_batcher", "stream_lease_keeper",
        "wecom_ws_holder", "wecom_ws_jobs", "wecom_ws_keeper", "writes_again",
    )),
)  # fmt: skip


def initialise(bot: str, long_connection: bool = False, audit: bool = False, backend: str = "dify") -> None:
    """Create every series of `bot` (its own backend of kind `backend`) at zero (a labelled series otherwise appears
    only once it is first used): those `_STARTS` names, of the bot's WeCom mode, the audit trail's when it is on. A
    route's series appear once it answers: the alerts sum over routes, and a thousand routes' series at zero cost each
    worker 16 MB and every scrape their lines (BENCHMARKS.md, "Routes")."""
    skipped = {CALLBACK if long_connection else CONNECTION} | (set() if audit else {AUDIT})
    for metric, mode, *values in _STARTS:
        if mode in skipped:
            continue
        values = [(backend,) if each is ITS_BACKEND else each for each in values]
        for combination in itertools.product(*values):
            metric.labels(*(combination if mode == DEPLOYMENT else (bot, *combination)))


def initialise_schedule(bot: str, schedule: str) -> None:
    """Create a schedule's series at zero (its alert then sees its first failure as an increase)."""
    for outcome in ("pushed", "partial", "failed", "skipped"):
        SCHEDULE_RUNS.labels(bot, schedule, outcome)


def _registry() -> CollectorRegistry:
    """Every worker's values under gunicorn (multiprocess mode), this process's else."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return registry
    return REGISTRY


def render() -> tuple[bytes, str]:
    """The exposition text and its content type (GET /metrics on the main port)."""
    return generate_latest(_registry()), CONTENT_TYPE_LATEST


def serve(host: str, port: int) -> None:
    """Serve /metrics on a port of its own (METRICS_PORT), in a daemon thread: under gunicorn the master serves
    every worker's values there, so a scraper can reach the pod without the public port exposing them."""
    start_http_server(port, addr=host, registry=_registry())
