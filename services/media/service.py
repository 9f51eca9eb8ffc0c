"""Files from WeCom to Dify: a user's encrypted uploads (download, decrypt, hand to Dify). The files Dify makes go
the other way through services/files.

Downloads use their own HTTP client, without the Dify key, since the URLs point at WeCom's and Dify's storage.
"""

from __future__ import annotations

import io
import logging
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import Message
from urllib.parse import urlsplit

import httpx

from services import metrics
from services.dify.app_profile import DifyAppProfile, FileInput
from services.dify.client import DifyClient
from services.transport.errors import BackendError, Declined
from services.wecom.crypto import CryptoError, WeComCrypto, decrypt_media_with
from services.wecom.limits import MAX_INBOUND_FILE_BYTES
from utils.http import outgoing_client

logger = logging.getLogger(__name__)

IMAGE, DOCUMENT, VIDEO = "image", "document", "video"
_MB = 1024 * 1024
_DEFAULT_LIMITS_MB = {IMAGE: 10, DOCUMENT: 15, VIDEO: 100}
_LIMIT_FIELDS = {IMAGE: "image_file_size_limit", DOCUMENT: "file_size_limit", VIDEO: "video_file_size_limit"}


class MediaError(Exception):
    """A file could not be fetched or used."""


class FileRefused(Exception):
    """A file a form's input does not take (by Dify's file type and its extension); it was not uploaded. `name`:
    the file's name."""

    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


@dataclass(frozen=True, slots=True)
class _Received:
    """A file the user sent, read: its bytes, the name it goes to Dify under, its extension, MIME and Dify types."""

    data: bytes
    name: str
    extension: str
    mime: str
    dify_type: str

    def value(self, upload_file_id: str) -> dict:
        """The file, once uploaded, as Dify takes it in `files` or a file input."""
        return {"type": self.dify_type, "transfer_method": "local_file", "upload_file_id": upload_file_id}


@dataclass
class PreparedFiles:
    """What a message's files become for Dify: the `files` (sys.files), the `inputs` of the app's file variables
    (a file object, or a list of them), and whether some were refused by the app or failed to load."""

    files: list[dict] = field(default_factory=list)
    inputs: dict[str, dict | list[dict]] = field(default_factory=dict)
    refused: set[str] = field(default_factory=set)
    failed: int = 0

    @property
    def used(self) -> bool:
        return bool(self.files or self.inputs)


CUSTOM = "custom"
# Dify's file types by extension, as its api/constants lists them (what allowed_file_types speak of; documents: its
# default ETL's list and Unstructured's). A file whose extension is in none of them is of type `custom`, which only
# an input's (or the app's) own extension list admits.
_DIFY_TYPES = {
    **dict.fromkeys(("jpg", "jpeg", "png", "gif", "webp", "svg"), IMAGE),
    **dict.fromkeys(("mp3", "m4a", "wav", "amr", "mpga"), "audio"),
    **dict.fromkeys(("mp4", "mov", "mpeg", "webm"), VIDEO),
    **dict.fromkeys(
        ("txt", "markdown", "md", "mdx", "pdf", "html", "htm", "xlsx", "xls", "vtt", "properties", "doc", "docx",
         "csv", "eml", "msg", "pptx", "ppt", "xml", "epub"),
        DOCUMENT,
    ),
}  # fmt: skip


def dify_type(extension: str, kind: str) -> str:
    """The Dify file type of a file with `extension`: by Dify's lists, `custom` for an extension in none of them,
    the kind WeCom sent it as for a file with no extension."""
    if not extension:
        return kind
    return _DIFY_TYPES.get(extension.lower(), CUSTOM)


def _sized(kind: str) -> str:
    """The kind whose size limit Dify applies to a file WeCom sent as `kind`."""
    return kind if kind in _LIMIT_FIELDS else DOCUMENT


def sniff(data: bytes) -> tuple[str, str]:
    """(extension, MIME type) from the first bytes; ("bin", "application/octet-stream") when unknown."""
    if data.startswith(b"\xff\xd8\xff"):
        return "jpg", "image/jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png", "image/png"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "gif", "image/gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp", "image/webp"
    if data.startswith(b"%PDF"):
        return "pdf", "application/pdf"
    if data[4:8] == b"ftyp":
        return "mp4", "video/mp4"
    if data.startswith(b"PK\x03\x04"):
        return _office_type(data)
    try:
        data[:4096].decode("utf-8")
    except UnicodeDecodeError:
        return "bin", "application/octet-stream"
    return "txt", "text/plain"


def _office_type(data: bytes) -> tuple[str, str]:
    try:
        names = zipfile.ZipFile(io.BytesIO(data)).namelist()
    except zipfile.BadZipFile:
        return "zip", "application/zip"
    prefixes = {
        "word/": ("docx", "application/vnd.openxmlformats-officedocument.wordprocessingml.document"),
        "xl/": ("xlsx", "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"),
        "ppt/": ("pptx", "application/vnd.openxmlformats-officedocument.presentationml.presentation"),
    }
    for prefix, kind in prefixes.items():
        if any(name.startswith(prefix) for name in names):
            return kind
    return "zip", "application/zip"


def accepts(parameters: dict, kind: str, extension: str | None = None) -> bool:
    """Whether the Dify app takes files of Dify type `kind` into `files` (old `file_upload.image` or newer
    `allowed_file_types`); a `custom` one only by its `extension` (None: not known yet, which may pass)."""
    upload = parameters.get("file_upload") if isinstance(parameters.get("file_upload"), dict) else {}
    if kind == IMAGE and isinstance(upload.get("image"), dict) and upload["image"].get("enabled"):
        return True
    types = upload.get("allowed_file_types") or []
    if not upload.get("enabled"):
        return False
    if kind in types and kind != CUSTOM:
        return True
    if CUSTOM not in types:
        return False
    allowed = {f".{str(e).lower().lstrip('.')}" for e in upload.get("allowed_file_extensions") or []}
    return extension is None or f".{extension.lower()}" in allowed


class _InputSlots:
    """The room left in an app's file inputs while a message's files are placed."""

    def __init__(self, inputs: list[FileInput]):
        self.inputs = inputs
        self.left = {each.name: each.count for each in inputs}

    def room(self) -> int:
        return sum(self.left.values())

    def may_take(self, kind: str) -> bool:
        """Whether some input could take a file WeCom sent as `kind` (custom types decide by extension, later)."""
        return any(each.takes(kind, "") or "custom" in each.types for each in self.inputs)

    def take(self, kind: str, extension: str) -> FileInput | None:
        """The first input with room that takes the file (its room taken), or None."""
        for each in self.inputs:
            if self.left[each.name] and each.takes(kind, extension):
                self.left[each.name] -= 1
                return each
        return None


class MediaService:
    def __init__(
        self,
        crypto: WeComCrypto | None,
        dify: DifyClient,
        profile: DifyAppProfile,
        timeout: float = 20.0,
        bot: str = "default",
    ):
        self.crypto = crypto
        self.dify = dify
        self.profile = profile
        self.bot = bot
        self._http = outgoing_client(httpx.Timeout(timeout, connect=5.0), follow_redirects=True)

    def close(self) -> None:
        self._http.close()

    # --- WeCom -> Dify ----------------------------------------------------------------------------------------

    def prepare(self, attachments: list[tuple[str, ...]], dify_user: str) -> PreparedFiles:
        """Download, decrypt and upload (as the run's `dify_user`) each (kind, url[, aeskey]) the app takes: into the
        first of its file inputs that takes the file's type and has room, else into `files` where the app accepts
        them there; count refusals and failures."""
        result = PreparedFiles()
        if not attachments:
            return result
        parameters = self.profile.parameters()
        slots = _InputSlots(self.profile.file_inputs())
        for kind, url, *aeskey in attachments[: self._count_limit(parameters) + slots.room()]:
            if not accepts(parameters, kind) and not slots.may_take(kind):
                self._refuse(result, kind)
                continue
            try:
                file = self._receive(kind, url, self._size_limit(parameters, kind), *aeskey)
                target = slots.take(file.dify_type, file.extension)
                if target is None and not accepts(parameters, file.dify_type, file.extension):
                    logger.info(
                        "a file of type %s (.%s) the app takes nowhere: not uploaded", file.dify_type, file.extension
                    )
                    self._refuse(result, kind)
                    continue
                given = file.value(self.dify.upload_file(file.data, file.name, file.mime, dify_user))
            except (MediaError, BackendError) as exc:
                logger.warning("could not pass a %s to Dify: %s", kind, exc)
                metrics.USER_FILES.labels(self.bot, "failed").inc()
                result.failed += 1
                continue
            if target is None:
                result.files.append(given)
            elif target.is_list:
                result.inputs.setdefault(target.name, []).append(given)
            else:
                result.inputs[target.name] = given
            metrics.USER_FILES.labels(self.bot, "files" if target is None else "input").inc()
        return result

    def _refuse(self, result: PreparedFiles, kind: str) -> None:
        result.refused.add(kind)
        metrics.USER_FILES.labels(self.bot, "refused").inc()

    def files_for_question(
        self, attachments: list[tuple[str, ...]], typed_query: bool, dify_user: str
    ) -> tuple[PreparedFiles, str]:
        """What a question's attachments become for Dify (PreparedFiles), and the key of a note on what had to be
        left out ("").

        Raises:
            Declined: nothing usable is left and the user typed no words to ask with (a file alone that went into
                one of the app's file inputs is a question of its own).
        """
        if not attachments:
            return PreparedFiles(), ""
        prepared = self.prepare(attachments, dify_user)
        if not prepared.used and not typed_query:
            if prepared.failed:
                raise Declined("media_failed", failed=True)
            raise Declined("images_unsupported" if IMAGE in prepared.refused else "files_unsupported")
        if prepared.refused:
            return prepared, "images_ignored" if IMAGE in prepared.refused else "media_partial"
        return prepared, "media_partial" if prepared.failed else ""

    def file_for(
        self, kind: str, url: str, aeskey: str, dify_user: str, takes: Callable[[str, str], bool]
    ) -> tuple[dict, str]:
        """A file the user sent for a form's input: downloaded and decrypted, checked with `takes(Dify type,
        extension)` before any upload, uploaded as the run's `dify_user`. Returns its value for the form
        (`{type, transfer_method, upload_file_id}`) and its name.

        Raises:
            FileRefused: the input does not take it.
            MediaError, BackendError: it could not be read or uploaded.
        """
        file = self._receive(kind, url, self._size_limit(self.profile.parameters(), _sized(kind)), aeskey)
        if not takes(file.dify_type, file.extension):
            metrics.USER_FILES.labels(self.bot, "refused").inc()
            raise FileRefused(file.name)
        given = file.value(self.dify.upload_file(file.data, file.name, file.mime, dify_user))
        metrics.USER_FILES.labels(self.bot, "form").inc()
        return given, file.name

    def _receive(self, kind: str, url: str, max_bytes: int, aeskey: str = "") -> _Received:
        """A file the user sent as `kind`, downloaded, decrypted and identified: by its name's extension, else by
        its bytes."""
        data, name = self.fetch_inbound(url, max_bytes, aeskey)
        extension, mime = sniff(data)
        extension = (name.rsplit(".", 1)[-1] if name and "." in name else "") or extension
        return _Received(data, name or f"{kind}.{extension}", extension, mime, dify_type(extension, kind))

    def fetch_inbound(self, url: str, max_bytes: int, aeskey: str = "") -> tuple[bytes, str | None]:
        """Download a WeCom media URL and decrypt it (with its own `aeskey` in long-connection mode, else with the
        bot's EncodingAESKey); returns (bytes, filename if given).

        Raises:
            MediaError: not http(s), too large, unreachable, non-200 or undecryptable.
        """
        if not aeskey and self.crypto is None:
            raise MediaError("the medium carries no aeskey")
        encrypted, headers = self._download(url, max_bytes + 32)
        try:
            data = decrypt_media_with(aeskey, encrypted) if aeskey else self.crypto.decrypt_media(encrypted)
        except CryptoError as exc:
            raise MediaError(f"media does not decrypt ({exc.code})") from None
        disposition = Message()
        disposition["content-disposition"] = headers.get("content-disposition", "")
        return data, disposition.get_filename()

    # --- Dify -> WeCom ----------------------------------------------------------------------------------------

    # --- helpers ----------------------------------------------------------------------------------------------

    def _download(self, url: str, max_bytes: int) -> tuple[bytes, httpx.Headers]:
        if urlsplit(url).scheme not in ("http", "https"):
            raise MediaError("not an http(s) URL")
        try:
            with self._http.stream("GET", url) as response:
                if response.status_code != 200:
                    raise MediaError(f"download answered HTTP {response.status_code}")
                body = bytearray()
                for piece in response.iter_bytes():
                    body += piece
                    if len(body) > max_bytes:
                        raise MediaError(f"larger than {max_bytes} bytes")
                return bytes(body), response.headers
        except httpx.HTTPError as exc:
            raise MediaError(f"download failed: {type(exc).__name__}") from exc

    @staticmethod
    def _size_limit(parameters: dict, kind: str) -> int:
        system = parameters.get("system_parameters") if isinstance(parameters.get("system_parameters"), dict) else {}
        megabytes = system.get(_LIMIT_FIELDS[kind]) or _DEFAULT_LIMITS_MB[kind]
        return min(int(megabytes * _MB), MAX_INBOUND_FILE_BYTES)

    @staticmethod
    def _count_limit(parameters: dict) -> int:
        upload = parameters.get("file_upload") if isinstance(parameters.get("file_upload"), dict) else {}
        image = upload.get("image") if isinstance(upload.get("image"), dict) else {}
        return int(image.get("number_limits") or upload.get("number_limits") or 3)
