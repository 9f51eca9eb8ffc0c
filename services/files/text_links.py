"""Links to Dify's own files inside an answer's text (CONTRACT §15): a knowledge base's images
(`![image](/files/<id>/file-preview?timestamp=…&sign=…)`), file links (`[name](/files/…)`), and an Answer that shows a
file back (`![img]({{#start.img.url#}})`). Dify writes them relative, or, with its FILES_URL set (as its plugin
daemon needs), absolute on that address, which is often one only the cluster reaches (`http://api:5001/files/…`).
Users can open neither. A bubble never shows one (`DifyLinks.hide`, while the answer streams and on any bubble); at
the answer's end each is resolved against DIFY_FILES_URL and delivered as the files Dify makes are
(services/files/delivery.py): an image inline under the bubble, or uploaded on a long connection; any other file as
a signed link to the gateway.

A link is Dify's when it is relative (`/files/…`), when its host is one of the bot's Dify hosts (DIFY_BASE_URL's,
DIFY_FILES_URL's), or when it is a file link Dify signed (`/files/tools/…` or `/files/<id>/file-preview`, with
`sign=`) on any host. Only its path and query are kept, so the file is fetched from DIFY_FILES_URL, never from the
host the text names. Other absolute links are left as they are."""

from __future__ import annotations

import mimetypes
import re
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from services.files.model import IMAGE, DifyFile

_LINK = re.compile(r"(!?)\[([^\]\n]{0,200})\]\((https?://[^/\s)]+)?(/files/[^)\s]+)\)")
_SIGNED_PATH = re.compile(r"/files/(?:tools/[^/?]+|[^/?]+/(?:file|image)-preview)\?(?:[^)\s]*&)?sign=")
# A link still being written at the end of a live bubble's text: `[words](` and part of an address.
_UNFINISHED = re.compile(r"(!?)\[([^\]\n]{0,200})\]\([^)\s]*$")
_MARK = "/files/"
_TAIL = 1200  # how far back from a live text's end an unfinished link is looked for


@dataclass(frozen=True, slots=True)
class TextLink:
    markup: str  # the link as it stands in the text
    file: DifyFile


class DifyLinks:
    """The links to a bot's Dify files in answer text (module docstring): `hosts` are the bot's Dify hosts."""

    def __init__(self, hosts: Iterable[str] = ()):
        self.hosts = frozenset(host.lower() for host in hosts if host)

    @classmethod
    def of(cls, *urls: str) -> DifyLinks:
        """The links of the Dify at these addresses (DIFY_BASE_URL, DIFY_FILES_URL; empty ones left out)."""
        return cls(urlsplit(url).netloc for url in urls if url)

    def hide(self, text: str, live: bool = False) -> str:
        """What a bubble shows of the Dify links in `text`: an image's markup goes (the image comes under the bubble
        at the end), a link keeps its words; `live`: so does a link still being written at the text's end (its
        address may be one of Dify's)."""
        if live:
            text = _without_unfinished_link(text)
        if _MARK not in text:
            return text
        return _LINK.sub(lambda m: ("" if m.group(1) else m.group(2)) if self._ours(m) else m.group(0), text)

    def find(self, text: str) -> list[TextLink]:
        """Every Dify link in `text`, in order (a link that stands twice, twice), its file addressed relative to
        DIFY_FILES_URL."""
        if _MARK not in text:
            return []
        return [
            TextLink(m.group(0), _file_of(m.group(1) == "!", m.group(2), m.group(4)))
            for m in _LINK.finditer(text)
            if self._ours(m)
        ]

    def _ours(self, match: re.Match) -> bool:
        host, path = match.group(3), match.group(4)
        if not host:
            return True
        return host.split("://", 1)[1].lower() in self.hosts or bool(_SIGNED_PATH.match(path))


def _without_unfinished_link(text: str) -> str:
    """`text` without a link still being written at its end (only its words, none for an image)."""
    tail = text[-_TAIL:]
    if "](" not in tail:
        return text
    unfinished = _UNFINISHED.search(tail)
    if unfinished is None:
        return text
    kept = "" if unfinished.group(1) else unfinished.group(2)
    return text[: len(text) - len(tail) + unfinished.start()] + kept


def _file_of(image: bool, label: str, url: str) -> DifyFile:
    path = unquote(urlsplit(url).path)
    basename = path.rstrip("/").rsplit("/", 1)[-1]
    name = label.strip() or basename or "file"
    mime = mimetypes.guess_type(name)[0] or mimetypes.guess_type(basename)[0] or ""
    if image and not mime.startswith("image/"):
        mime = "image/png"  # a file-preview URL names no extension; the bytes say what it is
    kind = IMAGE if image or mime.startswith("image/") else "document"
    return DifyFile(url=url, name=name, mime=mime or "application/octet-stream", kind=kind)
