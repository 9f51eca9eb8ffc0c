"""Signed links to a file the gateway serves (`PUBLIC_BASE_URL/wecom/files/<token>`): the token names the bot and
the file's record in Redis and when it expires, signed with HMAC-SHA256 under FILE_LINK_SECRET. It carries no Dify
key or signature (those stay in the record, server side), so a link shows nothing worth stealing but the file."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import time

FILE_PATH = "/wecom/files/"  # where the gateway serves the files behind its links
_REF = re.compile(r"[A-Za-z0-9_-]{16,64}")
_BOT = re.compile(r"[a-z0-9_-]{1,32}")


class LinkRefused(Exception):
    """A token that is malformed, tampered with, or expired (`reason`)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class LinkSigner:
    """Signs links under `public_base_url` (where users reach the gateway) and checks their tokens."""

    def __init__(self, secret: str, ttl_seconds: int, public_base_url: str = ""):
        self._key = hashlib.sha256(b"wecom-file-link\0" + secret.encode()).digest()
        self.ttl_seconds = ttl_seconds
        self.public_base_url = public_base_url.rstrip("/")

    def link(self, bot: str, ref: str) -> str:
        """The signed link to the file record `ref` of `bot`, valid for `ttl_seconds`."""
        return f"{self.public_base_url}{FILE_PATH}{self.sign(bot, ref)}"

    def sign(self, bot: str, ref: str, now: float | None = None) -> str:
        expires = int((now or time.time()) + self.ttl_seconds)
        payload = f"{bot}.{ref}.{expires}"
        return f"{payload}.{self._mac(payload)}"

    def verify(self, token: str, now: float | None = None) -> tuple[str, str]:
        """(bot, ref) of a valid token.

        Raises:
            LinkRefused: malformed, a signature that does not match, or expired.
        """
        parts = token.split(".")
        if len(parts) != 4 or not _BOT.fullmatch(parts[0]) or not _REF.fullmatch(parts[1]) or not parts[2].isdigit():
            raise LinkRefused("malformed")
        payload = ".".join(parts[:3])
        if not hmac.compare_digest(self._mac(payload), parts[3]):
            raise LinkRefused("bad_signature")
        if int(parts[2]) < (now or time.time()):
            raise LinkRefused("expired")
        return parts[0], parts[1]

    def _mac(self, payload: str) -> str:
        digest = hmac.new(self._key, payload.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
