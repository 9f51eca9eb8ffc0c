"""Serving a signed link (`GET /wecom/files/<token>`) on any replica: the token checked, the file's record read from
Redis, and the file streamed from Dify to the user as it arrives (never held whole in memory), with its name and
type. A bad or expired token gets 403; a file Dify no longer has, 404; one over FILE_MAX_BYTES, 413; Dify
unreachable, 502; each with a short JSON body."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import quote

from services import metrics
from services.files.fetch import FetchError, FileFetcher
from services.files.links import LinkRefused, LinkSigner
from services.files.store import FileRefs
from services.redis_conn import REDIS_FAILURES

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class BotFiles:
    """Where one bot's files come from, and how large one may be."""

    refs: FileRefs
    fetcher: FileFetcher
    max_bytes: int


@dataclass(slots=True)
class Served:
    status: int
    headers: dict[str, str]
    body: Iterator[bytes] | None = None  # the file's bytes (status 200)
    error: dict | None = None  # the JSON body of a refusal


class FileServer:
    def __init__(self, signer: LinkSigner | None, bots: dict[str, BotFiles]):
        self.signer = signer
        self.bots = bots

    def serve(self, token: str) -> Served:
        if self.signer is None:
            return _refused(404, "no_links", "this deployment serves no file links (PUBLIC_BASE_URL is not set)")
        try:
            bot, ref = self.signer.verify(token)
        except LinkRefused as exc:
            metrics.FILE_DOWNLOADS.labels("refused").inc()
            logger.info("file link refused: %s", exc.reason)
            return _refused(403, "link_refused", "this link is not valid or has expired")
        files = self.bots.get(bot)
        try:
            record = files.refs.get(ref) if files is not None else None
        except REDIS_FAILURES:
            return _refused(503, "store_unavailable", "try again in a moment")
        if record is None:
            metrics.FILE_DOWNLOADS.labels("refused").inc()
            return _refused(403, "link_refused", "this link is not valid or has expired")
        return self._stream(files, record)

    def _stream(self, files: BotFiles, record: dict) -> Served:
        opened = files.fetcher.stream(record["url"], files.max_bytes)
        try:
            upstream, pieces = opened.__enter__()
        except FetchError as exc:
            metrics.FILE_DOWNLOADS.labels("gone" if exc.reason == "http_404" else "failed").inc()
            logger.warning("a linked file could not be fetched from Dify: %s", exc.reason)
            if exc.reason == "too_large":
                return _refused(413, "file_too_large", "the file is larger than this gateway serves")
            if exc.reason in ("http_404", "http_403"):
                return _refused(404, "file_gone", "Dify no longer has this file")
            return _refused(502, "dify_unavailable", "the file could not be fetched; try again later")
        headers = {
            "Content-Type": record.get("mime") or upstream.get("content-type") or "application/octet-stream",
            "Content-Disposition": _disposition(record.get("name") or "file"),
            "Cache-Control": "private, no-store",
            "X-Content-Type-Options": "nosniff",
        }
        if upstream.get("content-length"):
            headers["Content-Length"] = upstream["content-length"]
        metrics.FILE_DOWNLOADS.labels("ok").inc()
        return Served(200, headers, _relayed(opened, pieces))


def _relayed(opened, pieces: Iterator[bytes]) -> Iterator[bytes]:
    """The file's pieces, the upstream response closed at the end (or when the user goes away)."""
    try:
        yield from pieces
    except FetchError as exc:  # grew past the cap on the way: the download ends short
        logger.warning("a linked file was cut off: %s", exc.reason)
    finally:
        opened.__exit__(None, None, None)


def _disposition(name: str) -> str:
    """An attachment's name, for every browser: an ASCII fallback and the UTF-8 name (RFC 6266, RFC 5987)."""
    fallback = "".join(c if 32 <= ord(c) < 127 and c not in '"\\' else "_" for c in name) or "file"
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(name, safe='')}"


def _refused(status: int, error: str, message: str) -> Served:
    return Served(status, {}, error={"error": error, "message": message})
