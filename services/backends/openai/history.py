"""The conversations of an OpenAI-compatible backend, which keeps none itself: the turns of each conversation are
kept in Redis, so every replica continues it (docs/configuration.md, "Backends"). A conversation is what the
stream core names one (services/streams/conversations.py: per user or shared per group chat, `/new` starts over,
CONVERSATION_TTL_SECONDS); its id is made here, and its turns live under it. A turn is the question as asked and the
answer as its user was finally shown it (masks included); an answer that failed, was stopped or was cut off by a
fault is no turn (the model's answer cut at its length limit is)."""

from __future__ import annotations

import secrets

import orjson
import redis

from services.keys import Keys

# The most history characters sent with a question (questions and answers); the oldest turns go first.
MAX_HISTORY_CHARS = 32_000


def new_conversation_id() -> str:
    return f"oc-{secrets.token_urlsafe(12)}"


class ConversationTurns:
    """The turns of the conversations of one bot (its keys)."""

    def __init__(self, client: redis.Redis, keys: Keys, ttl_seconds: int, most: int):
        self.redis = client
        self.keys = keys
        self.ttl_seconds = ttl_seconds
        self.most = most  # OPENAI_HISTORY_TURNS: how many are kept, and sent

    def recent(self, conversation_id: str) -> list[tuple[str, str]]:
        """The latest turns (question, answer), oldest first, within MAX_HISTORY_CHARS (the oldest left out)."""
        if not self.most or not conversation_id:
            return []
        raw = self.redis.lrange(self.keys.conversation_turns(conversation_id), -self.most, -1)
        turns = []
        for item in raw:
            try:
                turn = orjson.loads(item)
            except orjson.JSONDecodeError:
                continue
            if isinstance(turn, dict) and isinstance(turn.get("q"), str) and isinstance(turn.get("a"), str):
                turns.append((turn["q"], turn["a"]))
        kept, size = [], 0
        for question, answer in reversed(turns):
            size += len(question) + len(answer)
            if size > MAX_HISTORY_CHARS:
                break
            kept.append((question, answer))
        return kept[::-1]

    def add(self, conversation_id: str, question: str, answer: str) -> None:
        """Keep one more turn (only the latest `most` stay), for the conversation's time."""
        if not self.most:
            return
        key = self.keys.conversation_turns(conversation_id)
        turn = orjson.dumps({"q": question, "a": answer})
        pipe = self.redis.pipeline(transaction=True)
        pipe.rpush(key, turn)
        pipe.ltrim(key, -self.most, -1)
        pipe.expire(key, self.ttl_seconds)
        pipe.execute()
