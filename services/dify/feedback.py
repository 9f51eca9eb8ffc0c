"""Likes and dislikes from WeCom (feedback_event) forwarded to Dify's message feedback API.

Every stream reply carries `feedback.id` = its stream id. When an answer finishes, that id is mapped to the Dify
message and end-user with the final state (StreamStore.finish; kept for a week, long after the stream hash is gone),
so a later rating reaches the right message as the right user.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor

import orjson
import redis

from services.dify.client import DifyClient
from services.keys import Keys
from services.redis_conn import REDIS_FAILURES
from services.transport.errors import BackendError
from utils.logging import current_log_context, log_context

logger = logging.getLogger(__name__)

ACCURATE, INACCURATE, CANCELLED = 1, 2, 3
_RATINGS = {ACCURATE: "like", INACCURATE: "dislike", CANCELLED: None}
# WeCom's inaccurate_reason_list codes, written out for the Dify app's owners reading the feedback.
REASONS = {
    1: "内容不相关 (unrelated)",
    2: "内容不完整 (incomplete)",
    3: "内容有误 (wrong)",
    4: "数据分析有误 (analysis error)",
}


def feedback_content(event: dict) -> str:
    """The dislike's reasons and the user's own words, as one line for Dify."""
    reasons = [
        REASONS.get(code, str(code)) for code in event.get("inaccurate_reason_list") or [] if isinstance(code, int)
    ]
    words = str(event.get("content") or "").strip()
    return "; ".join([*reasons, words] if words else reasons)


def rating_in_words(event: dict) -> str:
    """A feedback_event as the audit trail keeps it: like, dislike (with its reasons and words), or cancelled."""
    kind = event.get("type")
    words = _RATINGS.get(kind, f"type {kind}") if kind != CANCELLED else "cancelled"
    content = feedback_content(event) if kind == INACCURATE else ""
    return f"{words}: {content}" if content else words


class FeedbackService:
    def __init__(self, client: redis.Redis, keys: Keys, apps: Mapping[str, DifyClient], workers: int = 4):
        self.redis = client
        self.keys = keys
        self.apps = apps  # the Dify app of each of the bot's routes ("": its own): a rating goes to its answer's
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="feedback")

    def close(self, wait: bool = False) -> None:
        """Take no more feedback; with `wait`, return once every forward already taken has finished."""
        self._pool.shutdown(wait=wait)

    def submit(self, event: dict) -> None:
        """Forward a feedback_event in the background (the callback answers at once with an empty body)."""
        context = current_log_context()
        self._pool.submit(self._forward_logged, event, context)

    def _forward_logged(self, event: dict, context: dict) -> None:
        with log_context(**context):
            try:
                self.forward(event)
            except (BackendError, *REDIS_FAILURES) as exc:
                logger.warning("feedback not forwarded: %s", exc)
            except Exception:
                logger.exception("feedback forwarding failed")

    def forward(self, event: dict) -> bool:
        """Send one rating to Dify; False when the event is unusable or its answer is unknown."""
        feedback_id, kind = event.get("id"), event.get("type")
        if not isinstance(feedback_id, str) or kind not in _RATINGS:
            logger.warning("ignored a malformed feedback event")
            return False
        raw = self.redis.get(self.keys.feedback(feedback_id))
        if raw is None:
            logger.info("feedback for an unknown or expired answer %s", feedback_id)
            return False
        target = orjson.loads(raw)
        app = self.apps.get(target.get("route", ""))
        if app is None:
            logger.info("feedback for an answer of a route no longer in BOTS_FILE: not forwarded")
            return False
        content = feedback_content(event) if kind == INACCURATE else ""
        app.feedback(target["message_id"], _RATINGS[kind], target["user"], content)
        logger.info("feedback %s forwarded to Dify", _RATINGS[kind] or "withdrawn")
        return True
