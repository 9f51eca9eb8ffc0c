"""Daily quotas of questions: per user, and per group chat (QUOTA_USER_MESSAGES_PER_DAY, QUOTA_CHAT_MESSAGES_PER_DAY),
counted across every replica. A day ends at midnight in QUOTA_TIMEZONE.

Each day's count is the set of the msgids asked that day (Redis, one key per user or chat and day), so a message is
counted once however often WeCom delivers it, on whichever replica: a repeat of a counted message is let through
(to find its stream), a repeat of a refused one is refused again with the same reply. A question over a quota is
answered at once with when the quota renews, and never reaches Dify.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import redis

from services import metrics
from services.keys import QUOTA_TTL_SECONDS, Keys
from services.lua import LuaScript, ScriptSpec
from services.wecom.messages import Inbound

logger = logging.getLogger(__name__)

USER, CHAT = "user", "chat"

# KEYS: asked (the day's set of msgids). ARGV: msgid, limit, ttl. Counts the message once: 1 if it is counted (now
# or before), 0 if the day's limit was reached without it.
TAKE = ScriptSpec(
    "QUOTA_TAKE",
    keys=("asked",),
    args=("msgid", "limit", "ttl"),
    body="""
if redis.call('SISMEMBER', K.asked, A.msgid) == 1 then return 1 end
if redis.call('SCARD', K.asked) >= tonumber(A.limit) then return 0 end
redis.call('SADD', K.asked, A.msgid)
redis.call('EXPIRE', K.asked, A.ttl)
return 1
""",
)


@dataclass(frozen=True)
class OverQuota:
    """A question refused: whose quota (`scope`: user or chat), its limit, and when it renews (local time)."""

    scope: str
    limit: int
    renews_at: datetime


class Quotas:
    """One bot's daily quotas."""

    def __init__(self, client: redis.Redis, keys: Keys, per_user: int, per_chat: int, timezone: str, bot: str):
        self.client = client
        self.keys = keys
        self.limits = {USER: per_user, CHAT: per_chat}  # 0: no quota
        self.zone = ZoneInfo(timezone)
        self.bot = bot
        self._take = LuaScript(client, TAKE)

    def take(self, message: Inbound) -> OverQuota | None:
        """Count the question against its user's quota and, in a group chat, the chat's; None if both allow it.

        Raises:
            redis.RedisError (or a cluster error): Redis did not answer.
        """
        day, counted = self._today(), []
        for scope, who in ((USER, message.userid), (CHAT, message.chatid)):
            limit = self.limits[scope]
            if not limit or not who:
                continue
            asked = self.keys.quota(scope, who, day)
            args = {"msgid": message.msgid, "limit": limit, "ttl": QUOTA_TTL_SECONDS}
            if not int(self._take.run({"asked": asked}, args)):
                for key in counted:  # the user's count given back: the question was not asked after all
                    self.client.srem(key, message.msgid)
                metrics.QUOTA_REFUSALS.labels(self.bot, scope).inc()
                logger.info("question refused: the %s's daily quota of %d is used up", scope, limit)
                return OverQuota(scope, limit, self._next_midnight())
            counted.append(asked)
        return None

    def used(self, scope: str, who: str) -> int:
        """How many questions `who` (a user or a chat) asked today."""
        return int(self.client.scard(self.keys.quota(scope, who, self._today())))

    def reset(self, scope: str, who: str) -> bool:
        """Forget today's count of `who`; True if there was one."""
        return bool(self.client.delete(self.keys.quota(scope, who, self._today())))

    def _today(self) -> str:
        return datetime.now(self.zone).strftime("%Y%m%d")

    def _next_midnight(self) -> datetime:
        now = datetime.now(self.zone)
        return datetime.combine(now.date() + timedelta(days=1), datetime.min.time(), tzinfo=self.zone)
