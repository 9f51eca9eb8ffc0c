"""What becomes of each file of an answer: inline, linked, named, or uploaded by the connection holder; a file that
cannot be had becomes one line saying so, and the answer always completes (docs/architecture.md, "Files Dify
makes").
"""

from __future__ import annotations

import base64
import hashlib
import logging
from dataclasses import dataclass, field

from services import metrics
from services.files.fetch import FetchError, FileFetcher
from services.files.links import LinkSigner
from services.files.model import DifyFile
from services.files.store import FileRefs
from services.files.text_links import DifyLinks
from services.media.images import fit_inline_image
from services.redis_conn import REDIS_FAILURES
from services.texts import Texts
from services.wecom.limits import MAX_REPLY_IMAGE_BYTES, MAX_REPLY_IMAGES

logger = logging.getLogger(__name__)

# WeCom's caps on a long connection's uploads, by message type (the official plugin's).
UPLOAD_CAPS = {"image": 10 * 1024 * 1024, "file": 20 * 1024 * 1024}


@dataclass
class Delivered:
    images: list[dict] = field(default_factory=list)  # msg_item payloads for the final reply
    lines: list[str] = field(default_factory=list)  # markdown lines for the answer: links, names, failures
    uploads: list[dict] = field(default_factory=list)  # long connection: {ref, name, type, size} for the holder


class FileDelivery:
    def __init__(
        self,
        bot: str,
        fetcher: FileFetcher,
        refs: FileRefs,
        texts: Texts,
        *,
        signer: LinkSigner | None,
        max_bytes: int,
        long_connection: bool,
        links: DifyLinks | None = None,
    ):
        self.bot = bot
        self.links = links or DifyLinks()  # which links in answer text are to the bot's Dify files
        self.fetcher = fetcher
        self.refs = refs
        self.texts = texts
        self.signer = signer  # None without PUBLIC_BASE_URL: files are named, not linked
        self.max_bytes = max_bytes
        self.long_connection = long_connection

    def deliver(self, files: list[DifyFile], delivered: Delivered | None = None) -> Delivered:
        """Each file, once: onto `delivered` (a new one by default; the images of one reply share WeCom's cap)."""
        delivered = delivered or Delivered()
        seen: set[str] = set()
        for file in files:
            if (file.url or file.file_id) in seen:
                continue
            seen.add(file.url or file.file_id)
            self._try(file, delivered)
        return delivered

    def rewrite_links(self, text: str) -> tuple[str, Delivered]:
        """`text` with its links to Dify's files resolved (services/files/text_links.py): an image goes inline under
        the bubble (uploaded, on a long connection) and leaves the text; another file becomes its signed link; one
        that fails becomes the line saying so, the rest of the answer intact. Returns the text and what goes with
        the final reply."""
        delivered = Delivered()
        for markup, link in {link.markup: link for link in self.links.find(text)}.items():
            part = Delivered(images=delivered.images, uploads=delivered.uploads)
            before = len(part.images) + len(part.uploads)
            outcome = "placed" if self._try(link.file, part) else "failed"
            if outcome == "placed":
                outcome = "inline" if len(part.images) + len(part.uploads) > before else "linked"
            metrics.TEXT_LINKS.labels(self.bot, outcome).inc()
            text = text.replace(markup, "\n".join(part.lines))
        return text, delivered

    def _try(self, file: DifyFile, delivered: Delivered) -> bool:
        """Deliver one file onto `delivered`; a failure becomes the line saying so (False)."""
        try:
            self._one(file, delivered)
            return True
        except FetchError as exc:
            self._count("too_large" if exc.reason == "too_large" else "failed")
            logger.warning("a file Dify made could not be delivered: %s", exc.reason)
            key = "file_too_large" if exc.reason == "too_large" else "file_failed"
            delivered.lines.append(self.texts.say(key).format(name=file.name, size=size_text(self.max_bytes)))
        except REDIS_FAILURES as exc:
            self._count("failed")
            logger.warning("a file's link could not be recorded: %s", exc)
            delivered.lines.append(self.texts.say("file_failed").format(name=file.name))
        return False

    def _one(self, file: DifyFile, delivered: Delivered) -> None:
        url = self.fetcher.resolve(file.url)
        if self.long_connection:
            kind = "image" if file.is_image else "file"
            size = self._probe(url)
            if size <= UPLOAD_CAPS[kind]:
                ref = self.refs.put(file, url, self.signer.ttl_seconds if self.signer else 3600)
                delivered.uploads.append({"ref": ref, "name": file.name, "type": kind, "size": size})
                self._count("uploaded")
                return
            delivered.lines.append(self._link_line(file, url, "file_link"))
            return
        if file.is_image and len(delivered.images) < MAX_REPLY_IMAGES:
            data, _ = self.fetcher.read(url, min(self.max_bytes, MAX_REPLY_IMAGE_BYTES))
            fitted = fit_inline_image(data)
            if fitted is not None:
                encoded = base64.b64encode(fitted).decode()
                delivered.images.append({"base64": encoded, "md5": hashlib.md5(fitted).hexdigest()})
                self._count("inline")
                if fitted is not data and self.signer is not None:  # shrunk: the original is a tap away
                    delivered.lines.append(self._link_line(file, url, "file_original"))
                return
        self._probe(url)
        delivered.lines.append(self._link_line(file, url, "file_link"))

    def _probe(self, url: str) -> int:
        """The file's size, having checked that Dify serves it within FILE_MAX_BYTES (its headers only)."""
        with self.fetcher.stream(url, self.max_bytes) as (headers, _):
            return int(headers.get("content-length") or 0)

    def _link_line(self, file: DifyFile, url: str, key: str) -> str:
        if self.signer is None:
            self._count("named")
            return self.texts.say("file_named").format(name=file.name)
        ref = self.refs.put(file, url, self.signer.ttl_seconds)
        link = self.signer.link(self.bot, ref)
        self._count("linked")
        return self.texts.say(key).format(name=_markdown_text(file.name), url=link)

    def _count(self, outcome: str) -> None:
        metrics.FILES.labels(self.bot, outcome).inc()


def _markdown_text(name: str) -> str:
    """A file name safe inside a markdown link's text."""
    return name.replace("[", "(").replace("]", ")")


def size_text(size: int) -> str:
    """A size as people say it: 20 MB, 512 KB."""
    return f"{size / 2**20:.0f} MB" if size >= 2**20 else f"{max(1, size // 1024)} KB"
