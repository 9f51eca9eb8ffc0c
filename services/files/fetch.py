"""Fetching a file from the bot's Dify, safely: only from Dify's own origins (DIFY_BASE_URL's, and DIFY_FILES_URL's),
redirects followed only within them, a timeout, and a size cap checked as the bytes arrive. `stream` hands the body
on piece by piece, so a link serves a file of any allowed size without holding it in memory."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urljoin, urlsplit

import httpx

from utils.http import outgoing_client

CHUNK_BYTES = 64 * 1024
_MAX_REDIRECTS = 3


class FetchError(Exception):
    """The file could not be fetched (`reason`: not_allowed, http_<status>, too_large, unreachable)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


class FileFetcher:
    def __init__(self, dify_base_url: str, files_url: str = "", timeout: float = 20.0, also: tuple[str, ...] = ()):
        """Files are fetched from the Dify at `dify_base_url` (its `files_url`) only, and from the addresses in
        `also` (the Difys of the bot's routes, whose answers' files carry their full URLs)."""
        self.files_base = (files_url or origin(dify_base_url)).rstrip("/") + "/"
        self.allowed = {origin(dify_base_url), origin(self.files_base)} | {origin(url) for url in also if url}
        self._http = outgoing_client(httpx.Timeout(timeout, connect=5.0), follow_redirects=False)

    def close(self) -> None:
        self._http.close()

    def resolve(self, url: str) -> str:
        """A relative URL (Dify's `/files/tools/<id>.<ext>?timestamp=&nonce=&sign=`) against DIFY_FILES_URL."""
        return urljoin(self.files_base, url)

    @contextmanager
    def stream(self, url: str, max_bytes: int) -> Iterator[tuple[httpx.Headers, Iterator[bytes]]]:
        """(headers, pieces of the body) of the file at `url`; the pieces stop with FetchError("too_large") past
        `max_bytes`.

        Raises:
            FetchError: not one of Dify's origins, an error status, larger than `max_bytes` by its length, or
                unreachable.
        """
        try:
            with self._open(url) as response:
                length = int(response.headers.get("content-length") or 0)
                if length > max_bytes:
                    raise FetchError("too_large")
                yield response.headers, _capped(response.iter_bytes(CHUNK_BYTES), max_bytes)
        except httpx.HTTPError as exc:
            raise FetchError("unreachable") from exc

    def read(self, url: str, max_bytes: int) -> tuple[bytes, httpx.Headers]:
        """The whole file (for an image to shrink, or an upload to WeCom)."""
        with self.stream(url, max_bytes) as (headers, pieces):
            return b"".join(pieces), headers

    @contextmanager
    def _open(self, url: str):
        for _ in range(_MAX_REDIRECTS + 1):
            if urlsplit(url).scheme not in ("http", "https") or origin(url) not in self.allowed:
                raise FetchError("not_allowed")
            with self._http.stream("GET", url) as response:
                if response.is_redirect and response.headers.get("location"):
                    url = urljoin(url, response.headers["location"])
                    continue
                if response.status_code != 200:
                    raise FetchError(f"http_{response.status_code}")
                yield response
                return
        raise FetchError("too_many_redirects")


def _capped(pieces: Iterator[bytes], max_bytes: int) -> Iterator[bytes]:
    seen = 0
    for piece in pieces:
        seen += len(piece)
        if seen > max_bytes:
            raise FetchError("too_large")
        yield piece
