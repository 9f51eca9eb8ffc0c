"""A recording proxy in front of a real Dify, for the test tier that runs the stand-in's cases against one
(tests/e2e/test_real_dify.py; docs/protocol.md, "Dify versions"). Every request goes through unchanged, streams
included, except that the API key may be named by an alias (the key a test's bot is configured with); the proxy
records what the gateway asked for as the stand-in records its own (`requests`, `form_submissions`,
`reattaches`, `uploads`, `record_reads`), so the same assertions read the same records, and the Dify version its
replies name (`version_name`, from `X-Version`)."""

from __future__ import annotations

import threading
import time

import httpx
import orjson

from demo.dify_standin import parse_multipart
from demo.http_server import Conn, Request, StandInServer

_HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length", "host"})


class DifyRecorder:
    """Forwards to `upstream` (a Dify Service API base URL, e.g. http://dify.example/v1)."""

    def __init__(self, upstream: str, host: str = "127.0.0.1", port: int = 0):
        self.upstream = upstream.rstrip("/")
        self._origin = "/".join(self.upstream.split("/")[:3])
        self.keys: dict[str, str] = {}  # alias -> the real API key
        self.requests: list[dict] = []
        self.form_submissions: list[dict] = []
        self.reattaches: list[dict] = []
        self.uploads: dict[str, dict] = {}  # file id (or the request's place, if refused) -> {user, name, status}
        self.record_reads: list[str] = []  # GET /workflows/run/{id}: the run ids
        self.version_name = ""  # X-Version of Dify's replies
        self.server = StandInServer(self.handle, host, port)
        self._lock = threading.Lock()
        self._client: httpx.AsyncClient | None = None

    @property
    def base_url(self) -> str:
        return f"{self.server.url}/v1"

    def start(self) -> DifyRecorder:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop()

    def alias(self, name: str, key: str) -> None:
        """Requests that carry the API key `name` go to Dify with `key`."""
        self.keys[name] = key

    def chat_requests(self) -> list[dict]:
        with self._lock:
            return [r["body"] for r in self.requests]

    async def handle(self, request: Request, conn: Conn) -> None:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=330.0), trust_env=False)
        headers = {k: v for k, v in request.headers.items() if k not in _HOP_BY_HOP}
        bearer = headers.get("authorization", "").removeprefix("Bearer ")
        if bearer in self.keys:
            headers["authorization"] = f"Bearer {self.keys[bearer]}"
        path = request.path.removeprefix("/v1")
        # The Service API lives under the upstream's path; Dify's signed file URLs (/files/...) at its origin.
        url = self.upstream + path if request.path.startswith("/v1/") else self._origin + request.path
        sent = time.time()
        async with self._client.stream(
            request.method, url, params=request.query, headers=headers, content=request.body
        ) as response:
            self._record(request, path, response.status_code, sent)
            self.version_name = response.headers.get("x-version", self.version_name)
            content_type = response.headers.get("content-type", "application/octet-stream")
            if content_type.startswith("text/event-stream"):
                await conn.start_stream(response.status_code, content_type)
                async for chunk in response.aiter_raw():
                    await conn.write_chunk(chunk)
                await conn.end_stream()
            else:
                body = await response.aread()
                if request.method == "POST" and path == "/files/upload":
                    self._record_upload(request, response.status_code, body)
                await conn.send(response.status_code, body, content_type)

    def _record_upload(self, request: Request, status: int, body: bytes) -> None:
        fields, file_part = parse_multipart(request)
        try:
            file_id = orjson.loads(body).get("id") if status in (200, 201) else None
        except (orjson.JSONDecodeError, AttributeError):
            file_id = None
        with self._lock:
            key = file_id or f"refused-{len(self.uploads)}"
            self.uploads[key] = {
                "user": fields.get("user", ""),
                "name": file_part[0] if file_part else "",
                "status": status,
            }

    def _record(self, request: Request, path: str, status: int, at: float) -> None:
        with self._lock:
            if request.method == "POST" and path in ("/chat-messages", "/workflows/run", "/completion-messages"):
                self.requests.append({"body": request.json(), "at": at, "status": status})
            elif request.method == "POST" and path.startswith("/form/human_input/"):
                token = path.rsplit("/", 1)[-1]
                self.form_submissions.append({"token": token, "body": request.json(), "status": status, "at": at})
            elif request.method == "GET" and path.startswith("/workflows/run/"):
                self.record_reads.append(path.rsplit("/", 1)[-1])
            elif request.method == "GET" and path.startswith("/workflow/") and path.endswith("/events"):
                flags = {
                    name: request.query.get(name, "false").lower() == "true"
                    for name in ("include_state_snapshot", "continue_on_pause")
                }
                self.reattaches.append(
                    {"run_id": path.split("/")[2], "user": request.query.get("user", ""), "at": at, **flags}
                )
