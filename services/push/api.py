"""POST /api/push and GET /api/push/<id>, apart from Flask: the bearer token, the request's checks, and the status
code and short JSON body of every answer (docs/operations.md, "Push API"). Nothing of a token is logged."""

from __future__ import annotations

import hmac
import logging
from dataclasses import dataclass, field

import orjson

from services.push.app import APP_MARKDOWN_BYTES, AppPushes, AppTargets
from services.push.pushes import BotPushes, OverQuota, Target
from services.push.webhooks import WEBHOOK_MARKDOWN_BYTES, WEBHOOK_TEXT_BYTES, WebhookMessage, WebhookPushes
from services.redis_conn import REDIS_FAILURES
from services.wecom.limits import MAX_CONTENT_BYTES
from utils.text import utf8_len

logger = logging.getLogger(__name__)

MAX_IDEMPOTENCY_KEY = 200
MAX_TARGET = 128
APP_TARGETS = ("touser", "toparty", "totag")
MAX_APP_TARGETS = 4000


@dataclass
class ApiReply:
    """A status code, its JSON body and headers."""

    status: int
    body: dict
    headers: dict[str, str] = field(default_factory=dict)


def _error(status: int, error: str, message: str, **headers: str) -> ApiReply:
    return ApiReply(status, {"error": error, "message": message}, headers)


class PushApi:
    def __init__(self, token: str, bots: dict[str, BotPushes | None] | None = None):
        self.token = token
        self.pushes: dict[str, BotPushes] = {}  # the long-connection bots'
        self.callback_bots: set[str] = set()  # WeCom offers no push to these (but through a webhook)
        self.webhooks: dict[str, WebhookPushes] = {}  # the bots' group robots, whatever their mode
        self.apps: dict[str, AppPushes] = {}  # the bots' self-built apps, whatever their mode
        self.serve(bots or {})

    def serve(
        self,
        bots: dict[str, BotPushes | None],
        webhooks: dict[str, WebhookPushes] | None = None,
        apps: dict[str, AppPushes] | None = None,
    ) -> None:
        """The bots pushed to from now on: each bot's pushes (None for a callback-mode bot), the webhooks of those
        that name group robots, and the apps of those that name a self-built app."""
        self.pushes = {name: pushes for name, pushes in bots.items() if pushes is not None}
        self.callback_bots = {name for name, pushes in bots.items() if pushes is None}
        self.webhooks = webhooks or {}
        self.apps = apps or {}

    def accept(self, authorization: str | None, idempotency_key: str | None, body: bytes) -> ApiReply:
        """POST /api/push."""
        if not self._authorized(authorization):
            return _error(401, "unauthorized", "a valid 'Authorization: Bearer <PUSH_API_TOKEN>' header is required")
        try:
            request = orjson.loads(body)
        except orjson.JSONDecodeError:
            return _error(400, "bad_request", "the body must be a JSON object")
        if not isinstance(request, dict):
            return _error(400, "bad_request", "the body must be a JSON object")
        bot = request.get("bot")
        if not isinstance(bot, str) or not bot:
            return _error(400, "bad_request", "'bot' must name a bot")
        key = idempotency_key or ""
        if len(key) > MAX_IDEMPOTENCY_KEY:
            return _error(400, "bad_request", f"the Idempotency-Key is longer than {MAX_IDEMPOTENCY_KEY} characters")
        if "webhook" in request:
            return self._to_webhook(bot, request, key)
        if any(field in request for field in APP_TARGETS):
            return self._to_app(bot, request, key)
        if bot in self.callback_bots:
            return _error(409, "not_long_connection", f"bot {bot!r} is in callback mode: WeCom offers no push there")
        pushes = self.pushes.get(bot)
        if pushes is None:
            return _error(404, "unknown_bot", f"no bot named {bot!r}")
        target, problem = _target(request)
        if problem:
            return _error(400, "bad_request", problem)
        markdown = request.get("markdown")
        if not isinstance(markdown, str) or not markdown.strip():
            return _error(400, "bad_request", "'markdown' must be a non-empty string")
        if utf8_len(markdown) > MAX_CONTENT_BYTES:
            return _error(400, "bad_request", f"'markdown' is longer than WeCom's {MAX_CONTENT_BYTES} bytes")
        try:
            push_id, new = pushes.push(target, markdown, key)
        except OverQuota as over:
            logger.info("push refused: the chat had WeCom's limit of messages")
            return _error(
                429,
                "quota_exceeded",
                "the chat had WeCom's limit of messages",
                **{"Retry-After": str(over.retry_after)},
            )
        except REDIS_FAILURES as exc:
            return _store_unavailable(exc)
        return ApiReply(202 if new else 200, {"id": push_id, "status": "queued" if new else "accepted"})

    def status(self, authorization: str | None, push_id: str) -> ApiReply:
        """GET /api/push/<id>."""
        if not self._authorized(authorization):
            return _error(401, "unauthorized", "a valid 'Authorization: Bearer <PUSH_API_TOKEN>' header is required")
        try:
            for pushes in [*self.webhooks.values(), *self.apps.values(), *self.pushes.values()]:
                found = pushes.status(push_id)
                if found is not None:
                    return ApiReply(200, {"id": push_id, **found})
        except REDIS_FAILURES:
            return _error(503, "store_unavailable", "state store unavailable, retry shortly")
        return _error(404, "not_found", "no push with that id (pushes are kept 24 hours)")

    def _to_webhook(self, bot: str, request: dict, key: str) -> ApiReply:
        """A push to one of the bot's group robots (`webhook`: its name), sent now, once."""
        webhooks = self.webhooks.get(bot)
        if webhooks is None:
            if bot in self.pushes or bot in self.callback_bots:
                return _error(409, "no_webhooks", f"bot {bot!r} names no group robot's webhook")
            return _error(404, "unknown_bot", f"no bot named {bot!r}")
        name = request.get("webhook")
        if not isinstance(name, str) or name not in webhooks.urls:
            return _error(404, "unknown_webhook", f"bot {bot!r} has no webhook named {name!r}")
        message, problem = _webhook_message(request)
        if problem:
            return _error(400, "bad_request", problem)
        try:
            push_id, status, new = webhooks.push(name, message, key)
        except OverQuota as over:
            logger.info("push refused: the webhook had WeCom's limit of messages a minute")
            retry = {"Retry-After": str(over.retry_after)}
            return _error(429, "quota_exceeded", "the webhook had WeCom's limit of 20 messages a minute", **retry)
        except REDIS_FAILURES as exc:
            return _store_unavailable(exc)
        return _sent_now(push_id, status, new)

    def _to_app(self, bot: str, request: dict, key: str) -> ApiReply:
        """A push to users, departments or tags through the bot's self-built app, sent now, once."""
        app = self.apps.get(bot)
        if app is None:
            if bot in self.pushes or bot in self.callback_bots or bot in self.webhooks:
                return _error(409, "no_app", f"bot {bot!r} names no self-built app (WECOM_APP_CORP_ID, ...)")
            return _error(404, "unknown_bot", f"no bot named {bot!r}")
        ids = {field: request.get(field, "") for field in APP_TARGETS}
        if not all(isinstance(value, str) and len(value) <= MAX_APP_TARGETS for value in ids.values()):
            return _error(400, "bad_request", "'touser', 'toparty' and 'totag' are |-separated ids, such as \"a|b\"")
        if not any(value.strip() for value in ids.values()):
            return _error(400, "bad_request", "name at least one of 'touser', 'toparty' and 'totag'")
        markdown = request.get("markdown")
        if not isinstance(markdown, str) or not markdown.strip():
            return _error(400, "bad_request", "'markdown' must be a non-empty string")
        if utf8_len(markdown) > APP_MARKDOWN_BYTES:
            return _error(400, "bad_request", f"'markdown' is longer than WeCom's {APP_MARKDOWN_BYTES} bytes")
        targets = AppTargets(ids["touser"].strip(), ids["toparty"].strip(), ids["totag"].strip())
        try:
            push_id, status, new = app.push(targets, markdown, key)
        except OverQuota as over:
            logger.info("push refused: a target had WeCom's limit of the app's messages")
            retry = {"Retry-After": str(over.retry_after)}
            limit = "a target had WeCom's limit of the app's messages (30 a minute, 1,000 an hour per member)"
            return _error(429, "quota_exceeded", limit, **retry)
        except REDIS_FAILURES as exc:
            return _store_unavailable(exc)
        return _sent_now(push_id, status, new)

    def _authorized(self, authorization: str | None) -> bool:
        scheme, _, given = (authorization or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self.token.encode())


def _store_unavailable(exc: Exception) -> ApiReply:
    logger.warning("push not accepted: Redis did not answer (%s)", type(exc).__name__)
    return _error(503, "store_unavailable", "state store unavailable, retry shortly (with the same Idempotency-Key)")


def _sent_now(push_id: str, status: dict, new: bool) -> ApiReply:
    """A push sent in the request (a webhook's, the app's): its status, or the first one's for a repeated key."""
    return ApiReply(200, {"id": push_id, **status, **({} if new else {"repeated": True})})


def _target(request: dict) -> tuple[Target | None, str]:
    """The chat a push goes to: exactly one of `chatid` (a group) and `userid` (a user's 1:1 chat)."""
    chatid, userid = request.get("chatid"), request.get("userid")
    if (chatid is None) == (userid is None):
        return None, "give exactly one of 'chatid' (a group chat) and 'userid' (a user's 1:1 chat)"
    value = chatid if chatid is not None else userid
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_TARGET:
        return None, f"'{'chatid' if chatid is not None else 'userid'}' must be a non-empty string"
    return Target(value.strip(), single=userid is not None), ""


def _webhook_message(request: dict) -> tuple[WebhookMessage | None, str]:
    """A webhook push's message: exactly one of `markdown` and `text`; `mentioned_list` (userids, "@all") only with
    text, as WeCom allows; within WeCom's sizes."""
    given = [kind for kind in ("markdown", "text") if kind in request]
    if len(given) != 1:
        return None, "give exactly one of 'markdown' and 'text'"
    kind = given[0]
    content, markdown = request[kind], kind == "markdown"
    if not isinstance(content, str) or not content.strip():
        return None, f"'{kind}' must be a non-empty string"
    most = WEBHOOK_MARKDOWN_BYTES if markdown else WEBHOOK_TEXT_BYTES
    if utf8_len(content) > most:
        return None, f"the message is longer than WeCom's {most} bytes"
    mentions = request.get("mentioned_list", [])
    if mentions and markdown:
        return None, "'mentioned_list' goes with 'text' only (in markdown, write <@userid>)"
    if not isinstance(mentions, list) or not all(isinstance(m, str) and m for m in mentions):
        return None, "'mentioned_list' must be a list of userids (or \"@all\")"
    return WebhookMessage(content, markdown, tuple(mentions)), ""
