"""Identical callbacks handled once: WeCom may resend one, and an attacker may replay a captured one.

A callback's msg_signature covers the Token, timestamp, nonce and ciphertext, so the same signature means the same
request. It is remembered for twice the timestamp tolerance, after which the request is refused as stale anyway.
Message callbacks need no marker (the msgid dedup already makes them idempotent) and polls are reads; events with
side effects (feedback) use this.
"""

from __future__ import annotations

import redis

from services.keys import Keys


class ReplayGuard:
    def __init__(self, client: redis.Redis, keys: Keys, ttl_seconds: int):
        self.redis = client
        self.keys = keys
        self.ttl_seconds = ttl_seconds

    def first_time(self, signature: str) -> bool:
        """True the first time this signed request is seen (across all replicas), False for a repeat."""
        key = self.keys.replay(signature.lower())  # the signature is hex, checked case-insensitively
        return bool(self.redis.set(key, "1", nx=True, ex=self.ttl_seconds))
