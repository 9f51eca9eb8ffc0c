"""The files of an answer, as Dify names them: `message_file` events that belong to the assistant, and file objects
(`{type, transfer_method, url, filename, mime_type, size}`) in a workflow's or chatflow's outputs, alone or in
lists, at any depth."""

from __future__ import annotations

import mimetypes
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

IMAGE = "image"
_MAX_DEPTH = 4


@dataclass(frozen=True, slots=True)
class DifyFile:
    url: str  # as Dify gave it: absolute, or relative (resolved against DIFY_FILES_URL)
    name: str
    mime: str
    kind: str  # Dify's type: image, document, audio, video, custom
    size: int = 0  # as Dify says (0: unknown)
    file_id: str = ""

    @property
    def is_image(self) -> bool:
        return self.kind == IMAGE or self.mime.startswith("image/")


def file_of_event(data: dict) -> DifyFile | None:
    """The file a `message_file` event carries, if it is the assistant's (the user's own uploads come back too); the
    text chunks Dify labels message_file after a file carry no URL and are no file."""
    if data.get("belongs_to", "assistant") != "assistant" or not data.get("url"):
        return None
    return _file(data.get("url"), data.get("filename"), data.get("mime_type"), data.get("type"), data.get("id"))


def files_in_outputs(outputs, depth: int = 0) -> list[DifyFile]:
    """Every file object in a run's outputs (dict values and list items, nested a few levels)."""
    found: list[DifyFile] = []
    if depth > _MAX_DEPTH:
        return found
    if isinstance(outputs, dict):
        if _looks_like_a_file(outputs):
            file = _file(
                outputs.get("url") or outputs.get("remote_url"),
                outputs.get("filename"),
                outputs.get("mime_type"),
                outputs.get("type"),
                outputs.get("related_id") or outputs.get("id"),
                outputs.get("size"),
            )
            return [file] if file else []
        for value in outputs.values():
            found += files_in_outputs(value, depth + 1)
    elif isinstance(outputs, list):
        for item in outputs:
            found += files_in_outputs(item, depth + 1)
    return found


def _looks_like_a_file(value: dict) -> bool:
    return "transfer_method" in value and bool(value.get("url") or value.get("remote_url"))


def _file(url, name, mime, kind, file_id=None, size=None) -> DifyFile | None:
    url = url if isinstance(url, str) else ""
    file_id = file_id if isinstance(file_id, str) else ""
    if not url:
        return None
    name = name if isinstance(name, str) and name else _name_from(url) or "file"
    mime = mime if isinstance(mime, str) and mime else mimetypes.guess_type(name)[0] or "application/octet-stream"
    kind = kind if isinstance(kind, str) and kind else (IMAGE if mime.startswith("image/") else "document")
    return DifyFile(url, name, mime, kind, size if isinstance(size, int) and size > 0 else 0, file_id)


def _name_from(url: str) -> str:
    return unquote(urlsplit(url).path.rsplit("/", 1)[-1]) if url else ""
