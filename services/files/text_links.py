"""Links Dify leaves relative inside an answer's text (CONTRACT §15): a knowledge base's images
(`![image](/files/<id>/file-preview?timestamp=…&sign=…)`) and file links (`[name](/files/…)`). Users can open
neither: they point at Dify, not at WeCom. A bubble never shows one (`hide_dify_links`, while the answer streams
and on any bubble); at the answer's end each is resolved against DIFY_FILES_URL and delivered as the files Dify
makes are (services/files/delivery.py): an image inline under the bubble, or uploaded on a long connection; any
other file as a signed link to the gateway. Absolute links, to Dify or anywhere else, are left as they are."""

from __future__ import annotations

import mimetypes
import re
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from services.files.model import IMAGE, DifyFile

DIFY_LINK = re.compile(r"(!?)\[([^\]\n]{0,200})\]\((/files/[^)\s]+)\)")
_MARK = "](/files/"


@dataclass(frozen=True, slots=True)
class TextLink:
    markup: str  # the link as it stands in the text
    file: DifyFile


def hide_dify_links(text: str) -> str:
    """What a bubble shows of the Dify-relative links in `text`: an image's markup goes (the image comes under the
    bubble at the end), a link keeps its words."""
    if _MARK not in text:
        return text
    return DIFY_LINK.sub(lambda m: "" if m.group(1) else m.group(2), text)


def dify_links(text: str) -> list[TextLink]:
    """Every Dify-relative link in `text`, in order (a link that stands twice, twice)."""
    if _MARK not in text:
        return []
    return [TextLink(m.group(0), _file_of(m.group(1) == "!", m.group(2), m.group(3))) for m in DIFY_LINK.finditer(text)]


def _file_of(image: bool, label: str, url: str) -> DifyFile:
    path = unquote(urlsplit(url).path)
    basename = path.rstrip("/").rsplit("/", 1)[-1]
    name = label.strip() or basename or "file"
    mime = mimetypes.guess_type(name)[0] or mimetypes.guess_type(basename)[0] or ""
    if image and not mime.startswith("image/"):
        mime = "image/png"  # a file-preview URL names no extension; the bytes say what it is
    kind = IMAGE if image or mime.startswith("image/") else "document"
    return DifyFile(url=url, name=name, mime=mime or "application/octet-stream", kind=kind)
