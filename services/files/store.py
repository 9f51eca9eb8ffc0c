"""Where a link's file lives, kept server side for as long as the link is good (keys.file_ref): the URL to fetch it
from (a signed Dify URL stays here, never in the link), its name, type and size. Any replica serves any link."""

from __future__ import annotations

import secrets

import orjson
import redis

from services.files.model import DifyFile
from services.keys import Keys


class FileRefs:
    def __init__(self, client: redis.Redis, keys: Keys):
        self.client = client
        self.keys = keys

    def put(self, file: DifyFile, url: str, ttl_seconds: int) -> str:
        """Record a file to serve (`url`: resolved, absolute); returns its ref."""
        ref = secrets.token_urlsafe(18)
        record = {"url": url, "name": file.name, "mime": file.mime, "size": file.size, "kind": file.kind}
        self.client.set(self.keys.file_ref(ref), orjson.dumps(record), ex=ttl_seconds)
        return ref

    def get(self, ref: str) -> dict | None:
        raw = self.client.get(self.keys.file_ref(ref))
        return orjson.loads(raw) if raw else None
