"""An OpenAI-compatible server's chat completions, streamed (`POST {OPENAI_BASE_URL}/chat/completions` with
`stream: true`): LiteLLM, vLLM, Ollama, RAGFlow's `chats_openai`, DeepSeek, OpenAI itself. The stream is read by the
shared transport (services/transport), its events decoded into `Chunk`s: answer text (`choices[0].delta.content`),
reasoning (`delta.reasoning_content`, or `delta.reasoning`), the finish reason, and the usage a last chunk carries
(`stream_options.include_usage`). `data: [DONE]`, or a finish reason followed by the body's end, ends it; an error
object mid-stream is the call's failure; a body that ends before either was cut.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import httpx
import orjson

from services.transport import PROCESS_PUMP, open_backend_stream
from services.transport.errors import (
    BackendConnectionError,
    BackendHTTPError,
    BackendStreamCut,
    BackendStreamError,
    BackendTimeout,
    access_problem_of,
    http_error,
)
from services.transport.read_pump import ReadPump
from services.transport.sse import SSEEvent
from utils.http import outgoing_client
from utils.tls import default_tls_context

if TYPE_CHECKING:
    from config.settings import OpenAISettings

logger = logging.getLogger(__name__)

SERVER = "the OpenAI-compatible server"


@dataclass(slots=True)
class Chunk:
    """One event of the stream, as the answer needs it."""

    content: str = ""
    reasoning: str = ""
    finish_reason: str = ""
    usage: dict | None = None
    id: str = ""

    @property
    def plain(self) -> bool:
        """Only answer text (the common case, relayed in the read pump's thread)."""
        return not (self.reasoning or self.finish_reason or self.usage)


class ChunkReader:
    """Turns the SSE events of each read into Chunks; stops at `[DONE]` or an error."""

    __slots__ = ("ended", "finished", "failure")

    def __init__(self) -> None:
        self.ended = False  # [DONE] came
        self.finished = False  # a finish reason came (some servers end the body there, without [DONE])
        self.failure: BackendStreamError | None = None

    @property
    def stopped(self) -> bool:
        return self.ended or self.failure is not None

    def read(self, events: list[SSEEvent]) -> list[Chunk]:
        chunks = []
        for sse in events:
            if self.stopped:
                break
            data = sse.data.strip()
            if not data:
                continue
            if data == "[DONE]":
                self.ended = True
                break
            try:
                payload = orjson.loads(data)
            except orjson.JSONDecodeError:
                logger.warning("ignored a stream event whose data is not JSON (%d bytes)", len(data))
                continue
            if not isinstance(payload, dict):
                continue
            if isinstance(payload.get("error"), dict):
                error = payload["error"]
                code = str(error.get("code") or error.get("type") or "stream_error")
                message = str(error.get("message") or "the server reported an error")
                self.failure = BackendStreamError(message, code=code)
                break
            chunk = _chunk_of(payload)
            self.finished = self.finished or bool(chunk.finish_reason)
            chunks.append(chunk)
        return chunks


def _chunk_of(payload: dict) -> Chunk:
    choices = payload.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
    delta = choice.get("delta") if isinstance(choice.get("delta"), dict) else {}
    reasoning = delta.get("reasoning_content") or delta.get("reasoning") or ""
    usage = payload.get("usage")
    return Chunk(
        content=delta.get("content") if isinstance(delta.get("content"), str) else "",
        reasoning=reasoning if isinstance(reasoning, str) else "",
        finish_reason=str(choice.get("finish_reason") or ""),
        usage=usage if isinstance(usage, dict) and usage else None,
        id=str(payload.get("id") or ""),
    )


Relay = Callable[[list[Chunk]], bool]


class OpenAIClient:
    """One per bot and process; thread-safe."""

    def __init__(
        self,
        settings: OpenAISettings,
        connect_timeout: float,
        read_timeout: float,
        *,
        pump: ReadPump = PROCESS_PUMP,
        tls: ssl.SSLContext | None = None,
    ):
        self.base_url = settings.base_url.rstrip("/")
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.pump = pump
        self.tls = tls or default_tls_context()
        self._headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if settings.api_key:
            self._headers["Authorization"] = f"Bearer {settings.api_key}"
        timeout = httpx.Timeout(connect=connect_timeout, read=read_timeout, write=10.0, pool=connect_timeout)
        auth = {k: v for k, v in self._headers.items() if k == "Authorization"}
        self._http = outgoing_client(timeout, follow_redirects=False, headers=auth, tls=self.tls)

    def close(self) -> None:
        self._http.close()

    def stream_chat(
        self, body: dict, relay: Relay | None = None, headers: dict[str, str] | None = None
    ) -> Iterator[list[Chunk]]:
        """Stream one chat completion; yields the chunks of each read (possibly none). `relay(batch)`, if given,
        runs in the read pump's thread for each plain read before the last: when it returns True it has handled
        the batch. `headers` go with the request (trace context).

        Raises:
            BackendHTTPError (before any text), BackendConnectionError, BackendTimeout, BackendStreamError (an
            error object mid-stream), BackendStreamCut.
        """
        url = f"{self.base_url}/chat/completions"
        stream = open_backend_stream(
            url,
            orjson.dumps(body),
            {**self._headers, **(headers or {})},
            self.connect_timeout,
            self.read_timeout,
            self.tls,
            self.pump,
            SERVER,
        )
        reader = ChunkReader()

        def plain(batch: list[Chunk]) -> bool:
            return relay is not None and all(chunk.plain for chunk in batch) and relay(batch)

        with stream:
            try:
                while not reader.stopped and not stream.complete:
                    yield stream.next_batch(reader.read, lambda: reader.stopped, plain)
            except TimeoutError as exc:
                raise BackendTimeout(f"{SERVER} sent nothing within the read timeout") from exc
            except OSError as exc:
                raise BackendStreamCut(f"the connection to {SERVER} broke mid-stream: {type(exc).__name__}") from exc
            if reader.failure is not None:
                raise reader.failure
            if reader.ended or reader.finished:
                return
        raise BackendStreamCut(f"{SERVER} closed the stream before its end")

    def models(self, timeout: float = 5.0) -> list[str]:
        """The models the server offers (`GET /models`).

        Raises:
            BackendHTTPError, BackendConnectionError, BackendTimeout.
        """
        try:
            response = self._http.get(f"{self.base_url}/models", timeout=timeout)
        except httpx.TimeoutException as exc:
            raise BackendTimeout(f"{SERVER} did not answer GET /models in time") from exc
        except httpx.HTTPError as exc:
            raise BackendConnectionError(f"could not reach {SERVER}: {type(exc).__name__}") from exc
        if response.status_code != 200:
            raise http_error(response.status_code, response.content[:2048])
        try:
            data = orjson.loads(response.content).get("data") or []
        except (orjson.JSONDecodeError, AttributeError):
            raise BackendHTTPError(200, "malformed", f"{SERVER}'s /models is not a model list") from None
        return [str(model.get("id")) for model in data if isinstance(model, dict) and model.get("id")]

    def access_problem(self, model: str, timeout: float = 5.0) -> str:
        """Whether the server answers with this key and offers `model`: "" when it does, else one line saying why
        not, in the words of the setting to fix (never the key)."""
        try:
            models = self.models(timeout)
        except (BackendHTTPError, BackendTimeout, BackendConnectionError) as exc:
            address = "OPENAI_BASE_URL should be the API's address, ending in /v1"
            return access_problem_of(exc, timeout, "OPENAI_API_KEY", address, "the server")
        if models and model not in models:
            return f"it offers no model {model!r} (OPENAI_MODEL; it offers {', '.join(models[:5])})"
        return ""
