"""The files of an answer on a long connection (docs/protocol.md, "Files"): once the answer's bubble is finished,
the holder uploads each file to WeCom (`aibot_upload_media_init`, `_chunk` of at most 512 KB, `_finish` ->
`media_id`) and sends it as an image or file message (`aibot_send_msg`); a file that cannot be fetched or uploaded
is one markdown line. A marker per stream (`sending`, then `sent`) makes the sending happen once across processes.

The field names follow WeCom's official SDK (`uploadMedia`): init `{type, filename, total_size, total_chunks,
md5}` -> `{upload_id}`; chunk `{upload_id, chunk_index, base64_data}`; finish `{upload_id}` -> `{media_id}`.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import threading
from collections.abc import Callable

import orjson
import redis

from services import metrics
from services.files.delivery import UPLOAD_CAPS
from services.files.fetch import FetchError, FileFetcher
from services.files.store import FileRefs
from services.keys import FILE_UPLOAD_CLAIM_TTL_SECONDS, SENT_TTL_SECONDS, Keys
from services.longconn import frames
from services.longconn.session import Session
from services.redis_conn import REDIS_FAILURES
from services.streams.record import F
from services.texts import Texts

logger = logging.getLogger(__name__)

CHUNK_BYTES = 512 * 1024  # before base64
MAX_CHUNKS = 100
ACK_SECONDS = 15.0


class UploadFailed(Exception):
    """WeCom refused a step of the upload or the send (`errcode`), or did not answer."""


class FileSender:
    def __init__(
        self,
        bot: str,
        client: redis.Redis,
        keys: Keys,
        refs: FileRefs,
        fetcher: FileFetcher,
        texts: Texts,
        meta: Callable[[str], dict],
        session: Callable[[], Session | None],
    ):
        self.bot = bot
        self.client = client
        self.keys = keys
        self.refs = refs
        self.fetcher = fetcher
        self.texts = texts
        self._meta = meta  # a stream's hash
        self._session = session  # the connection this process holds now

    def after_answer(self, stream_id: str, files: str | None = None) -> None:
        """The answer's bubble is finished (or its rest was sent): send its files, in a thread of their own. `files`
        is what the final frame's poll read of them ("" for none: nothing to do); None when not known."""
        if files == "" or files == "[]":
            return
        threading.Thread(target=self._send_all, args=(stream_id,), name=f"wecom-files-{stream_id}", daemon=True).start()

    def _send_all(self, stream_id: str) -> None:
        try:
            meta = self._meta(stream_id)
            files = orjson.loads(meta.get(F.files) or "[]")
            if not files or not self.client.set(
                self.keys.ws_files(stream_id), "sending", nx=True, ex=FILE_UPLOAD_CLAIM_TTL_SECONDS
            ):
                return
        except REDIS_FAILURES as exc:
            logger.warning("could not read the answer's files (%s); the next delivery of the stream tries again", exc)
            return
        session = self._session()
        chat, single = meta.get(F.ws_chat, ""), bool(meta.get(F.ws_single))
        failed = []
        for file in files:
            try:
                self._send_one(session, chat, single, file)
                metrics.WS_FILES.labels(self.bot, "sent").inc()
            except (FetchError, UploadFailed, REDIS_FAILURES) as exc:
                metrics.WS_FILES.labels(self.bot, "failed").inc()
                logger.warning("a file of the answer could not be sent: %s", exc)
                failed.append(file["name"])
        if failed and session is not None:
            lines = "\n".join(self.texts.say("file_failed").format(name=name) for name in failed)
            req_id, text = frames.send_markdown(chat, single, lines)
            session.send(text, req_id)
        try:
            self.client.set(self.keys.ws_files(stream_id), "sent", ex=SENT_TTL_SECONDS)
        except REDIS_FAILURES as exc:
            logger.warning("could not record the files as sent: %s", exc)

    def _send_one(self, session: Session | None, chat: str, single: bool, file: dict) -> None:
        if session is None:
            raise UploadFailed("no connection")
        record = self.refs.get(file["ref"])
        if record is None:
            raise UploadFailed("its record expired")
        data, _ = self.fetcher.read(record["url"], UPLOAD_CAPS[file["type"]])
        media_id = self.upload(session, file["type"], file["name"], data)
        body = {
            "chatid": chat,
            "chat_type": 1 if single else 2,
            "msgtype": file["type"],
            file["type"]: {"media_id": media_id},
        }
        _request(session, frames.SEND, body)
        logger.info("sent a %s of %d bytes after the answer", file["type"], len(data))

    @staticmethod
    def upload(session: Session, kind: str, name: str, data: bytes) -> str:
        """Upload `data` to WeCom in chunks; its media_id (valid 3 days)."""
        chunks = [data[i : i + CHUNK_BYTES] for i in range(0, len(data), CHUNK_BYTES)] or [b""]
        if len(chunks) > MAX_CHUNKS:
            raise UploadFailed("too many chunks")
        init = {
            "type": kind,
            "filename": name,
            "total_size": len(data),
            "total_chunks": len(chunks),
            "md5": hashlib.md5(data).hexdigest(),
        }
        upload_id = (_request(session, frames.UPLOAD_INIT, init).get("body") or {}).get("upload_id")
        if not upload_id:
            raise UploadFailed("no upload_id")
        for index, chunk in enumerate(chunks):
            part = {"upload_id": upload_id, "chunk_index": index, "base64_data": base64.b64encode(chunk).decode()}
            _request(session, frames.UPLOAD_CHUNK, part)
        media_id = (_request(session, frames.UPLOAD_FINISH, {"upload_id": upload_id}).get("body") or {}).get("media_id")
        if not media_id:
            raise UploadFailed("no media_id")
        return media_id


def _request(session: Session, cmd: str, body: dict) -> dict:
    """Send one frame and wait for its ack.

    Raises:
        UploadFailed: an errcode, no ack in time, or the connection is gone.
    """
    req_id = frames.new_req_id(cmd)
    answered = threading.Event()
    acks: list[dict] = []

    def on_ack(ack: dict) -> None:
        acks.append(ack)
        answered.set()

    if not session.send(frames.frame(cmd, req_id, body), req_id, on_ack):
        raise UploadFailed("the connection is closed")
    if not answered.wait(ACK_SECONDS):
        raise UploadFailed(f"no answer to {cmd}")
    errcode = int(acks[0].get("errcode") or 0)
    if errcode:
        raise UploadFailed(f"{cmd}: errcode {errcode}")
    return acks[0]
