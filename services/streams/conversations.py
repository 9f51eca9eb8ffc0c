"""Conversation continuity: which Dify conversation a user's next message in a chat continues.

One conversation per user per chat (a 1:1 chat is "single", a group its chatid), so two people in one group
never share a thread; or, for a bot with GROUP_CONVERSATION=shared, one per group chat (its member is GROUP), so
its members continue each other's thread. The id is remembered as soon as Dify names it, and refreshed on every use.
"""

from __future__ import annotations

import redis

from services.keys import Keys

SINGLE_CHAT = "single"
GROUP = "#group"  # the conversation member of a shared group chat: no WeCom userid holds "#"


def conversation_member(userid: str, shared_chat: bool) -> str:
    """Whose conversation in a chat a message continues: the user's, or the whole group's when it shares one."""
    return GROUP if shared_chat else userid


class ConversationStore:
    """The conversations of one bot's backend: `space` keeps another kind's apart ("" for Dify's, whose keys the
    contract names; a conversation id one backend made means nothing to another, and Dify refuses one that is not
    its own)."""

    def __init__(self, client: redis.Redis, keys: Keys, ttl_seconds: int, space: str = ""):
        self.redis = client
        self.keys = keys
        self.ttl_seconds = ttl_seconds
        self.space = space

    def _key(self, aibotid: str, chatid: str, userid: str) -> str:
        key = self.keys.conversation(aibotid or "bot", chatid or SINGLE_CHAT, userid)
        return f"{key}#{self.space}" if self.space else key

    def current(self, aibotid: str, chatid: str, userid: str) -> str:
        """The conversation to continue, or "" to start a new one."""
        return self.redis.get(self._key(aibotid, chatid, userid)) or ""

    def remember(self, aibotid: str, chatid: str, userid: str, conversation_id: str) -> None:
        """Continue `conversation_id` next time (Dify may change it: the latest one wins)."""
        self.redis.set(self._key(aibotid, chatid, userid), conversation_id, ex=self.ttl_seconds)

    def forget(self, aibotid: str, chatid: str, userid: str) -> bool:
        """Start afresh next time; True if there was a conversation to forget."""
        return bool(self.redis.delete(self._key(aibotid, chatid, userid)))
