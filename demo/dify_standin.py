"""A Dify stand-in: the Service API's streaming endpoints over real HTTP, with Dify's real SSE framing.

Each API key may be an app of its own type (`app_types`, else `mode`, default chat): `/info` names it, chat-like
apps answer `/chat-messages`, workflow apps `/workflows/run`, completion apps `/completion-messages`. The runs of
chatflow and workflow apps, their re-attaches (`/workflow/{run id}/events`), their records (`/workflows/run/{id}`) and
their forms behave as a real Dify 1.14.2 or 1.16.0 was measured to (`version`, from DIFY_STANDIN_VERSION by default:
demo/dify_versions.py; demo/dify_runs.py; tests/test_dify_fidelity.py holds each to its captured streams).

Events go out as `data: {json}\\n\\n`, keep-alives as the bare `event: ping\\n\\n` frame, each write flushed as
its own HTTP chunk. Tests script what the next request(s) get with `script([...steps])`: deltas, pings,
JSON split across network writes, raw garbage, stalls, HTTP errors, clean closes and cuts; or serve a whole app as
a graph (`serve_flow`, demo/dify_flows.py). Without either it answers like a friendly demo bot, so the local run has
something to talk to.
"""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
import mimetypes
import re
import secrets
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import orjson

from demo.dify_runs import CHATFLOW, CUT, PING, WORKFLOW, Run
from demo.dify_versions import DifyVersion, standin_version
from demo.http_server import Conn, Request, StandInServer

_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")

# --- scenario steps ----------------------------------------------------------------------------------------------


def event(kind: str, **fields) -> tuple:
    """Any Dify event; task/message/conversation ids are filled in per request."""
    return ("event", {"event": kind, **fields})


def message(text: str) -> tuple:
    return event("message", answer=text)


def agent_message(text: str) -> tuple:
    return event("agent_message", answer=text)


def replace(text: str) -> tuple:
    return event("message_replace", answer=text)


def thought(text: str, position: int = 1) -> tuple:
    return event("agent_thought", thought=text, position=position, observation="", tool="", tool_input="")


def message_file(url: str, file_type: str = "image", **fields) -> tuple:
    """An assistant's file (`fields`: e.g. filename, mime_type, as newer Dify versions send)."""
    return event("message_file", type=file_type, belongs_to="assistant", url=url, id=str(uuid.uuid4()), **fields)


def knowledge_text(text: str, data: bytes, mime: str = "image/png") -> tuple:
    """A `message` whose text holds a knowledge-base file's relative link (`{url}` in `text`), as Dify writes one:
    the stand-in serves the file at its signed preview URL."""
    return ("knowledge_text", text, data, mime)


def tool_file(data: bytes, extension: str, file_type: str = "document", filename: str = "") -> tuple:
    """A file a tool made: the stand-in serves it at a signed relative URL and sends its message_file event."""
    return ("tool_file", data, extension, file_type, filename)


def file_object(url: str, filename: str, mime_type: str, size: int, kind: str = "document") -> dict:
    """A file in a workflow's outputs, as Dify serialises one."""
    return {
        "dify_model_identity": "__dify__file__",
        "type": kind,
        "transfer_method": "tool_file",
        "url": url,
        "filename": filename,
        "extension": "." + filename.rsplit(".", 1)[-1],
        "mime_type": mime_type,
        "size": size,
    }


def workflow_finished(status: str = "succeeded", error: str | None = None) -> tuple:
    return event("workflow_finished", data={"status": status, "error": error, "outputs": {}})


def end(total_tokens: int = 42) -> tuple:
    return event("message_end", metadata={"usage": {"total_tokens": total_tokens, "latency": 0.5}})


def error(code: str = "internal_server_error", text: str = "Internal Server Error", status: int = 500) -> tuple:
    return event("error", code=code, message=text, status=status)


def clock_message(prefix: str = "") -> tuple:
    """A delta whose text is its own send time, `<prefix><unix seconds>;`, stamped as it is written (for
    measuring how long a delta takes to reach a poll reply)."""
    return ("clock", prefix)


def clocked_answer(deltas: int, per_second: float) -> list[tuple]:
    """`deltas` clock messages at `per_second`, then message_end. The k-th is due k / per_second after the body
    began, so a late write (a busy machine) is made up for, not carried into every later gap."""
    gap = 1 / per_second
    return [step for k in range(deltas) for step in (clock_message(), until((k + 1) * gap))] + [end()]


def ping() -> tuple:
    return ("ping",)


def raw(data: bytes) -> tuple:
    """Bytes written as one chunk, unframed (for garbage or hand-made frames)."""
    return ("raw", data)


def split(step: tuple, parts: int = 3, gap: float = 0.02) -> tuple:
    """Send an event step's frame in `parts` network writes, `gap` seconds apart (splits JSON and UTF-8)."""
    return ("split", step, parts, gap)


def sleep(seconds: float) -> tuple:
    """Wait, sending `event: ping` frames at the stand-in's ping interval meanwhile, like Dify does."""
    return ("sleep", seconds)


def until(seconds: float) -> tuple:
    """Like `sleep`, up to `seconds` after the body began (no wait once that is past)."""
    return ("until", seconds)


def stall(seconds: float) -> tuple:
    """Wait without sending anything at all (a stuck upstream)."""
    return ("stall", seconds)


def close() -> tuple:
    """End the HTTP body cleanly, whether or not message_end was sent."""
    return ("close",)


def cut() -> tuple:
    """Drop the TCP connection mid-body."""
    return ("cut",)


def drop() -> tuple:
    """Close the connection after reading the whole request, before any answer (it may have been taken)."""
    return ("drop",)


def http_error(status: int, code: str, text: str = "") -> tuple:
    """Answer the request itself with a Dify-shaped JSON error instead of a stream."""
    return ("http", status, {"code": code, "message": text or code, "status": status})


def first_byte_delay(seconds: float) -> tuple:
    """Wait before sending the response head (slow first byte)."""
    return ("delay_head", seconds)


def answer(text: str, pieces: int | None = None, delay: float = 0.0) -> list[tuple]:
    """Message deltas that spell `text` (one per word/character group), then message_end."""
    parts = _pieces(text, pieces)
    steps: list[tuple] = []
    for part in parts:
        steps.append(message(part))
        if delay:
            steps.append(sleep(delay))
    steps.append(end())
    return steps


def _pieces(text: str, count: int | None) -> list[str]:
    if count is None:
        return re.findall(r"\S+\s*|\s+", text) or [text]
    size = max(1, -(-len(text) // max(1, count)))
    return [text[i : i + size] for i in range(0, len(text), size)]


# --- the server --------------------------------------------------------------------------------------------------


@dataclass
class _Script:
    steps: list[tuple]
    match: str | None
    times: int | None


class DifyStandIn:
    """Serves `/v1/chat-messages` (+ stop). Records every request it gets in `requests`."""

    def __init__(
        self,
        api_key: str | None = None,
        ping_interval: float = 10.0,
        demo_delay: float = 0.06,
        host: str = "127.0.0.1",
        port: int = 0,
        language: str = "zh",
        tls: ssl.SSLContext | None = None,
        personas: dict[str, tuple[str, str]] | None = None,
        app_types: dict[str, str] | None = None,
        version: str | DifyVersion | None = None,
    ):
        # The Dify version played (demo/dify_versions.py); a test may set another, which reset() takes back.
        self.started_version = version if isinstance(version, DifyVersion) else standin_version(version)
        self.version = self.started_version
        self.api_key = api_key
        self.app_types = app_types or {}  # API key -> the app's mode, for keys other than `api_key`'s
        self.mode = "chat"  # the mode of `api_key`'s app (and of any key, without `api_key`)
        self.runs: dict[str, Run] = {}
        self.reattaches: list[dict] = []  # every GET /workflow/{run}/events: run_id, user, at, and its two flags
        self.flows: dict = {}  # API key -> a graph app it runs (demo/dify_flows.py) when no script matches
        self.answer_bug = True  # Dify #38432: after a pause that followed streamed text, answers are not streamed
        self.resume_delay = 0.05  # from a form's answer to its run going on (Dify's worker takes the resumption)
        self.idle_timeout = 300.0  # a reader of a run's events is closed after this long without an event
        self.info_requests = 0
        self.language = language  # of the unscripted demo answers
        # API key -> (the bot's name, its language): whose Dify app the unscripted demo answer speaks as
        self.personas = personas or {}
        self.ping_interval = ping_interval
        self.demo_delay = demo_delay
        self.server = StandInServer(self.handle, host, port, tls)
        self.requests: list[dict] = []
        self.keyed: list[tuple[str, str, str]] = []  # (method, path, API key) of every request: which app each asked
        self.inputs_of: dict[str, list] = {}  # API key -> the inputs its app declares (others: `parameters`')
        self.stops: list[tuple[str, dict]] = []
        self.stop_paths: list[str] = []  # which stop endpoint each of `stops` called
        self.open_streams = 0
        self.answering = 0  # chat calls whose answer is streaming now, and the most at once (since reset)
        self.most_answering = 0
        self.parameters = default_parameters()
        self.conversations: dict[str, str] = {}  # conversation id -> the end-user it belongs to
        self.questions: dict[str, list[str]] = {}  # conversation id -> its questions so far
        self.completed: set[str] = set()  # conversations Dify reports as ended
        self.messages: dict[str, str] = {}  # message id -> end-user
        self.uploads: dict[str, dict] = {}  # file id -> {name, mime_type, data, user}
        self.blocked_extensions: set[str] = set()  # Dify's UPLOAD_FILE_EXTENSION_BLACKLIST (empty by default)
        self.files_url = ""  # Dify's FILES_URL: "" writes links to its files relative, else on this address
        self.record_reads: list[str] = []  # every GET /workflows/run/{id}: the run ids asked for
        self.feedbacks: list[tuple[str, dict]] = []
        self.files: dict[str, bytes] = {}  # served at /files/tools/<name> for message_file events
        self.previews: dict[str, tuple[bytes, str]] = {}  # served at /files/<id>/file-preview: knowledge-base files
        self.file_fetches: list[str] = []  # the names of the tool files fetched, in order
        self.forms: dict[str, dict] = {}  # form token -> a paused run's form (services/forms: the human-input API)
        self.form_submissions: list[dict] = []  # every POST /form/human_input/{token}: {token, body, status}
        self.form_refusals: list[str] = []  # tests: the next form POSTs Dify refuses as invalid_form_data, saying so
        self.reattach_refusals: list[int] = []  # tests: the next GET /workflow/{run}/events answer these statuses
        self.suggestions: list[str] = ["What else can you do?", "Tell me more", "Give an example"]
        self._scripts: list[_Script] = []
        self._lock = threading.Lock()

    @property
    def base_url(self) -> str:
        return f"{self.server.url}/v1"

    def start(self) -> DifyStandIn:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop()

    def script(self, steps: list[tuple], match: str | None = None, times: int | None = 1) -> None:
        """The next `times` chat requests (whose query contains `match`, if given) play `steps`."""
        with self._lock:
            self._scripts.append(_Script(list(steps), match, times))

    def reset(self) -> None:
        with self._lock:
            self._scripts.clear()
            self.requests.clear()
            self.keyed.clear()
            self.inputs_of.clear()
            self.stops.clear()
            self.stop_paths.clear()
            self.parameters = default_parameters()
            self.file_fetches.clear()
            registries = (self.conversations, self.questions, self.messages, self.uploads, self.files, self.previews)
            for registry in registries:
                registry.clear()
            self.completed.clear()
            self.feedbacks.clear()
            self.runs.clear()
            self.reattaches.clear()
            for key in self.flows:
                self.app_types.pop(key, None)
            self.flows.clear()
            self.answer_bug = True
            self.version = self.started_version
            self.blocked_extensions = set()
            self.files_url = ""
            self.record_reads.clear()
            self.most_answering = self.answering
            self.forms.clear()
            self.form_submissions.clear()
            self.form_refusals.clear()
            self.reattach_refusals.clear()
            self.suggestions = ["What else can you do?", "Tell me more", "Give an example"]
            self.info_requests = 0
            self.mode = "chat"

    def serve_flow(self, flow, key: str | None = None) -> None:
        """Requests with API key `key` (default: the stand-in's own) run `flow` (demo/dify_flows.py) when no
        script matches: the app is of the flow's mode."""
        key = key or self.api_key or ""
        with self._lock:
            self.flows[key] = flow
            if key == self.api_key:
                self.mode = flow.mode
            else:
                self.app_types[key] = flow.mode

    def host_file(self, data: bytes, extension: str = "png") -> str:
        """Serve a tool-made file and return the relative URL Dify would put in a message_file event."""
        name = f"{uuid.uuid4().hex}.{extension}"
        self.files[name] = data
        return f"/files/tools/{name}?timestamp={int(time.time())}&nonce={secrets.token_hex(4)}&sign=stand-in"

    def use_files_url(self, files_url: str) -> None:
        """Play a Dify whose FILES_URL is `files_url` ("" = unset: links to its files written relative)."""
        self.files_url = files_url

    def file_url(self, path: str, absolute: bool = False) -> str:
        """A link to one of Dify's files as Dify writes it: relative while its FILES_URL is unset (`files_url`),
        else on that address; `absolute`: on its own address when FILES_URL is unset (an upload's source_url)."""
        base = self.files_url or (self.server.url if absolute else "")
        return base.rstrip("/") + path

    def host_preview(self, data: bytes, mime: str = "image/png", file_id: str = "") -> str:
        """Serve a knowledge-base file (or an upload, under its own id) as Dify does and return the relative, signed
        URL Dify writes into answer text (`/files/<id>/file-preview?timestamp=&nonce=&sign=`)."""
        file_id = file_id or str(uuid.uuid4())
        self.previews[file_id] = (data, mime)
        return f"/files/{file_id}/file-preview?timestamp={int(time.time())}&nonce={secrets.token_hex(4)}&sign=stand-in"

    def cut_listeners(self, run_id: str) -> int:
        """Drop every plain (no snapshot) listener of a run, without its body's last chunk, as Dify 1.16.0 does when
        another subscriber of the run closes; how many there were."""
        run = self.runs[run_id]
        listeners = [reader for reader in list(run.readers) if not reader.snapshot]
        for reader in listeners:
            reader.queue.put_nowait(CUT)
        return len(listeners)

    def chat_requests(self) -> list[dict]:
        """Bodies of the chat requests received so far."""
        with self._lock:
            return [r["body"] for r in self.requests]

    def wait_for_requests(self, count: int, timeout: float = 5.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.requests) >= count:
                break
            time.sleep(0.01)
        return self.chat_requests()

    # --- request handling ---------------------------------------------------------------------------------

    async def handle(self, request: Request, conn: Conn) -> None:
        signed_file = request.method == "GET" and request.path.startswith("/files/")  # signed URLs need no key
        key = request.headers.get("authorization", "").removeprefix("Bearer ")
        if self.api_key is not None and not signed_file and key != self.api_key and key not in self.app_types:
            await conn.send(401, {"code": "unauthorized", "message": "Access token is invalid", "status": 401})
            return
        path = request.path
        with self._lock:
            self.keyed.append((request.method, path, key))
        mode = self.app_types.get(key, self.mode)
        if request.method == "POST" and path in _APP_PATHS:
            if _APP_PATHS[path] != _family(mode):
                await conn.send(400, {"code": "app_unavailable", "message": f"App mode {mode} mismatch", "status": 400})
            elif path == "/v1/chat-messages":
                await self._chat(request, conn, mode)
            else:
                await self._run(request, conn, mode)
        elif request.method == "GET" and path == "/v1/info":
            self.info_requests += 1
            await conn.send(200, {"name": "stand-in app", "description": "", "tags": [], "mode": mode})
        elif path.startswith("/v1/form/human_input/") and request.method in ("GET", "POST"):
            await self._form(path.rsplit("/", 1)[-1], request, conn)
        elif request.method == "GET" and path.startswith("/v1/workflow/") and path.endswith("/events"):
            await self._reattach(path.split("/")[3], request, conn)
        elif request.method == "GET" and path.startswith("/v1/workflows/run/") and path.count("/") == 4:
            await self._record(path.rsplit("/", 1)[-1], mode, conn)
        elif request.method == "GET" and path == "/v1/parameters":
            flow = self.flows.get(key)
            declared = {"user_input_form": list(flow.start_inputs)} if flow is not None and flow.start_inputs else {}
            if key in self.inputs_of:  # an app of its own inputs (tests: a route's app beside the bot's)
                declared = {"user_input_form": self.inputs_of[key]}
            await conn.send(200, self.parameters | self._persona_opening(key) | declared)
        elif request.method == "POST" and path == "/v1/files/upload":
            await self._upload(request, conn)
        elif request.method == "GET" and path.startswith("/v1/messages/") and path.endswith("/suggested"):
            await self._suggested(path.split("/")[3], request, conn)
        elif request.method == "POST" and path.startswith("/v1/messages/") and path.endswith("/feedbacks"):
            await self._feedback(path.split("/")[3], request, conn)
        elif request.method == "GET" and path == "/files/redirect":  # a file that moved (tests: where to)
            await conn.send(302, b"", headers={"Location": request.query.get("to", "/")})
        elif request.method == "GET" and path.startswith("/files/tools/") and path.rsplit("/", 1)[-1] in self.files:
            await self._tool_file(path.rsplit("/", 1)[-1], request, conn)
        elif request.method == "GET" and path.endswith(("/file-preview", "/image-preview")) and path.count("/") == 3:
            await self._preview(path.split("/")[2], request, conn)
        elif request.method == "POST" and path.endswith("/stop") and path.startswith(_STOP_PATHS):
            task_id = path.split("/")[-2]
            self.stops.append((task_id, request.json() or {}))
            self.stop_paths.append(path)
            await conn.send(200, {"result": "success"})
        else:
            await conn.send(404, {"code": "not_found", "message": "The requested URL was not found", "status": 404})

    async def _chat(self, request: Request, conn: Conn, mode: str = "chat") -> None:
        body = await _json_body(request, conn)
        if body is None:
            return
        with self._lock:
            self.requests.append({"body": body, "headers": dict(request.headers), "at": time.time()})
        problem = _validate_chat(body) or self._check_files(body)
        if problem:
            await conn.send(400, {"code": "invalid_param", "message": problem, "status": 400})
            return
        conversation_id = body.get("conversation_id")
        if conversation_id and self.conversations.get(conversation_id) != body["user"]:
            await conn.send(404, {"code": "not_found", "message": "Conversation Not Exists.", "status": 404})
            return
        if conversation_id in self.completed:
            await conn.send(
                400,
                {
                    "code": "conversation_completed",
                    "status": 400,
                    "message": "The conversation has ended. Please start a new conversation.",
                },
            )
            return
        ids = {
            "task_id": str(uuid.uuid4()),
            "message_id": str(uuid.uuid4()),
            "conversation_id": conversation_id or str(uuid.uuid4()),
        }
        query = body.get("query", "")
        with self._lock:
            self.conversations[ids["conversation_id"]] = body["user"]
            self.messages[ids["message_id"]] = body["user"]
            earlier = list(self.questions.get(ids["conversation_id"], []))
            self.questions.setdefault(ids["conversation_id"], []).append(query)
        key = request.headers.get("authorization", "").removeprefix("Bearer ")
        name, language = self.personas.get(key) or ("", self.language)
        from demo.dify_apps import demo_extra  # the steps module builds on this one's

        flow = self.flows.get(key)
        steps = (
            self._take_script(query)
            or (flow.steps(query, self._file_attributes(body.get("inputs"))) if flow is not None else None)
            or demo_extra(query, language)
            or demo_reply(query, self.demo_delay, language, earlier, name)
        )
        self._count_answering(1)
        ended = []

        def answer_ended() -> None:  # once: when its last event goes out (the caller may go on from there), or after
            if not ended:
                ended.append(True)
                self._count_answering(-1)

        try:
            if mode == CHATFLOW or any(step[0] == "form" for step in steps):  # a run with a Human Input node
                inputs = {
                    "sys.query": query,
                    "sys.user_id": body["user"],
                    "sys.conversation_id": ids["conversation_id"],
                }
                await self._play_run(steps, ids, conn, body["user"], CHATFLOW, inputs)
            else:
                await self._play(steps, _ConnSink(conn, ids, answer_ended))
        finally:
            answer_ended()

    def _count_answering(self, change: int) -> None:
        with self._lock:
            self.answering += change
            self.most_answering = max(self.most_answering, self.answering)

    async def _run(self, request: Request, conn: Conn, mode: str) -> None:
        """A workflow app's run (`/workflows/run`) or a completion app's answer (`/completion-messages`)."""
        body = await _json_body(request, conn)
        if body is None:
            return
        with self._lock:
            self.requests.append({"body": body, "headers": dict(request.headers), "at": time.time(), "mode": mode})
        inputs = body.get("inputs")
        problem = "" if isinstance(body.get("user"), str) and body["user"] else "Arg user must be provided."
        if not isinstance(inputs, dict) or not inputs:
            problem = problem or "inputs is required"
        flow = self.flows.get(request.headers.get("authorization", "").removeprefix("Bearer "))
        problem = problem or self._check_files(body) or _missing_start_input(flow, inputs)
        if problem:
            await conn.send(400, {"code": "invalid_param", "message": problem, "status": 400})
            return
        query_input = flow.query_input if flow is not None else "query"
        query = str(inputs.get(query_input) or next((v for v in inputs.values() if isinstance(v, str)), ""))
        ids = {"task_id": str(uuid.uuid4())}
        if mode == WORKFLOW:
            from demo.dify_apps import demo_workflow  # the steps module builds on this one's

            steps = (
                self._take_script(query)
                or (flow.steps(query, self._file_attributes(inputs)) if flow is not None else None)
                or demo_workflow(query, self.language)
            )
            await self._play_run(steps, ids, conn, body["user"], WORKFLOW, inputs)
        else:
            ids["message_id"] = str(uuid.uuid4())
            steps = self._take_script(query) or demo_reply(query, self.demo_delay, self.language)
            await self._play(steps, _ConnSink(conn, ids))

    async def _play_run(self, steps: list[tuple], ids: dict, conn: Conn, user: str, mode: str, inputs: dict) -> None:
        """Play a chatflow's or workflow's run: it is published by its Run (demo/dify_runs.py), goes on without
        its first reader, and can be followed again at `/workflow/{run id}/events`."""
        run_id = str(uuid.uuid4())
        run = Run(
            run_id,
            ids["task_id"],
            user,
            mode,
            ids.get("message_id", ""),
            ids.get("conversation_id", ""),
            inputs,
            self.answer_bug,
            self.version,
        )
        with self._lock:
            self.runs[run_id] = run
        self.open_streams += 1
        try:
            await self._play(steps, _RunSink(run, conn))
        finally:
            self.open_streams -= 1
            if not run.frames:  # refused before it began (an HTTP error): Dify has no such run
                with self._lock:
                    self.runs.pop(run_id, None)

    def _register_form(self, spec: dict, run: Run) -> dict:
        """A run pausing at a form: the form API serves it until it is answered or expires (the run then goes on
        with the node's timeout path, as Dify's Human Input node does). `spec`: content (rendered), template
        (raw; default the content), title, node_id, actions [(id, title, style)], inputs [Dify input objects],
        expires_in, then (action, inputs -> steps) or branches {action id (or "*"): steps}, timeout (steps),
        bare (the event's data holds the token alone, as in Dify 1.14.0-rc1), service_api (False: a form Dify delivers
        only through its own channels, e-mail or its web app, which the Service API answers 404 for)."""
        token = spec.get("token") or secrets.token_urlsafe(16)[:22]
        expires = time.time() + spec.get("expires_in", 3600)
        actions = [{"id": a, "title": t, "button_style": s} for a, t, s in spec.get("actions", [])]
        inputs = list(spec.get("inputs", []))
        content = spec.get("content", "")
        node = {"id": spec.get("node_id", "human"), "type": "human-input", "title": spec.get("title", "")}
        public = {
            "form_content": content,
            "inputs": inputs,
            "resolved_default_values": {},
            "user_actions": actions,
            "expiration_time": int(expires),
        }
        event_data = {"form_token": token, "node_id": node["id"], "node_title": node["title"]}
        if not spec.get("bare"):
            event_data = {
                "form_id": str(uuid.uuid4()),
                **event_data,
                "form_content": content,
                "inputs": inputs,
                "actions": actions,
                "display_in_ui": True,
                "resolved_default_values": {},
                "expiration_time": int(expires),
            }
            if self.version.approval_channels:
                event_data["approval_channels"] = ["console"]
        form = {
            "token": token,
            "run": run,
            "node": node,
            "event_data": event_data,
            "template": spec.get("template", content),
            "public": public,
            "actions": [a["id"] for a in actions],
            "titles": {a["id"]: a["title"] for a in actions},
            "input_names": [i.get("output_variable_name") for i in inputs if isinstance(i, dict)],
            "inputs": [i for i in inputs if isinstance(i, dict)],
            "service_api": spec.get("service_api", True),
            "expires": expires,
            "then": spec.get("then"),
            "branches": spec.get("branches", {}),
            "timeout": spec.get("timeout"),
            "status": "open",
            "user": run.user,
        }
        self.forms[token] = form
        delay = max(0.0, expires - time.time())
        asyncio.get_running_loop().call_later(delay, lambda: asyncio.ensure_future(self._form_timeout(token)))
        return form

    async def _pause(self, spec: dict, sink: _RunSink) -> None:
        """A run reaches a Human Input node: it pauses there, and the first reader's stream ends."""
        form = self._register_form(spec, sink.run)
        for payload in sink.run.paused(form):
            await sink.event(payload)
        await sink.close()

    async def _form_timeout(self, token: str) -> None:
        form = self.forms.get(token)
        if form is None or form["status"] != "open":
            return
        form["status"] = "expired"
        timed_out = {"event": "human_input_form_timeout", "data": {**_node_fields(form), "form_token": token}}
        steps = form["timeout"]
        steps = steps("", {}) if callable(steps) else steps or [workflow_finished()]
        await self._go_on(form, timed_out, steps)

    async def _form(self, token: str, request: Request, conn: Conn) -> None:
        """`GET /form/human_input/{token}` (the form) and `POST` (its answer: the run goes on a moment later).
        Errors as Dify gives them: 404 unknown (or not reachable through the Service API); 412 answered already (or
        expired); 400 without `user`, with an unknown action, an input left out (even one with a default), or
        (1.15+) a select's value not offered or a file that is not an upload of the right type."""
        form = self.forms.get(token)
        body = (request.json() or {}) if request.method == "POST" else {}
        status, code, message = _form_refusal(form, request.method, body, self._input_refusal)
        if status == 200 and request.method == "POST" and self.form_refusals:
            status, code, message = 400, "invalid_form_data", self.form_refusals.pop(0)
        if request.method == "POST":
            with self._lock:
                self.form_submissions.append({"token": token, "body": body, "status": status, "at": time.time()})
        if status != 200:
            await conn.send(status, {"code": code, "message": message, "status": status})
            return
        if request.method == "GET":
            await conn.send(200, form["public"])
            return
        form["status"] = "submitted"
        await conn.send(200, {})
        action, values = body["action"], dict(body.get("inputs") or {})
        values = {name: self._file_value(value) for name, value in values.items()}
        filled = {
            "event": "human_input_form_filled",
            "data": {
                **_node_fields(form),
                "rendered_content": form["public"]["form_content"],
                "action_id": action,
                "action_text": form["titles"].get(action, action),
                "submitted_data": values,
            },
        }
        if not self.version.form_filled_event:
            filled = None
        then = form["then"]
        steps = then(action, values) if callable(then) else form["branches"].get(action, form["branches"].get("*", []))
        loop = asyncio.get_running_loop()
        loop.call_later(self.resume_delay, lambda: asyncio.ensure_future(self._go_on(form, filled, steps)))

    async def _go_on(self, form: dict, filled: dict, steps: list[tuple]) -> None:
        """A paused run goes on (its worker takes the resumption): the resumption's events, then `steps`."""
        sink = _RunSink(form["run"])
        for payload in form["run"].resumption(form, filled):
            await sink.event(payload)
        await self._play(steps, sink)

    def _input_refusal(self, form: dict, inputs: dict) -> tuple[int, str, str]:
        """Dify 1.15+'s check of a submission's select and file values, in the form's order: (400, code, message),
        else (200, "", "")."""
        for spec in form["inputs"]:
            name, kind = spec.get("output_variable_name"), spec.get("type")
            if name not in inputs or kind not in ("select", "file", "file-list"):
                continue
            value = inputs[name]
            problem = ""
            if kind == "select":
                source = spec.get("option_source") or {}
                if not isinstance(value, str):
                    problem = f"Invalid value for select input '{name}': expected string"
                elif source.get("type") == "constant" and value not in (source.get("value") or []):
                    problem = f"Invalid value for select input '{name}': {value}"
            elif kind == "file":
                problem = self._file_problem(spec, value if isinstance(value, dict) else None)
                problem = problem and f"Invalid value for file input '{name}': {problem}"
            else:
                values = value if isinstance(value, list) else None
                problem = "expected list" if values is None else ""
                limit = spec.get("number_limits") or 0
                if values is not None and limit and len(values) > limit:
                    problem = f"Number of files exceeds the maximum limit {limit}"
                for each in values or []:
                    problem = problem or self._file_problem(spec, each if isinstance(each, dict) else None)
                problem = problem and f"Invalid value for file list input '{name}': {problem}"
            if problem:
                return 400, "invalid_form_data", problem
        return 200, "", ""

    def _file_problem(self, spec: dict, mapping: dict | None) -> str:
        """What Dify finds wrong with one file of a form's submission (an upload of this tenant, of an allowed type
        and transfer method), or ""."""
        if mapping is None:
            return "expected mapping"
        if mapping.get("transfer_method") not in (spec.get("allowed_file_upload_methods") or ["local_file"]):
            return "Invalid transfer method"
        upload = self.uploads.get(str(mapping.get("upload_file_id") or ""))
        if upload is None:
            return "Invalid upload file"
        extension = upload["name"].rsplit(".", 1)[-1].lower() if "." in upload["name"] else ""
        detected = _FILE_TYPES.get(extension, "custom")
        specified = mapping.get("type") or detected
        if specified != "custom" and specified != detected:
            return "Detected file type does not match the specified type. Please verify the file."
        allowed = spec.get("allowed_file_types") or []
        extensions = [e.lower().lstrip(".") for e in spec.get("allowed_file_extensions") or []]
        if allowed and specified not in allowed and not ("custom" in allowed and extension in extensions):
            return f"File validation failed for file: {upload['name']}"
        return ""

    def _file_value(self, value):
        """A submitted file (or list of files) as the run reads it: the upload's attributes (name, url, ...)."""
        if isinstance(value, list):
            return [self._file_value(each) for each in value]
        if isinstance(value, dict) and value.get("upload_file_id") in self.uploads:
            upload = self.uploads[value["upload_file_id"]]
            return {"name": upload["name"], "size": len(upload["data"]), "mime_type": upload["mime_type"]}
        return value

    def _persona_opening(self, key: str) -> dict:
        """A demo bot's app (its key among the personas, no flow served) greets a new chat; other apps say nothing."""
        if key not in self.personas or key in self.flows:
            return {}
        return persona_opening(self.personas[key][1])

    async def _record(self, run_id: str, mode: str, conn: Conn) -> None:
        """`GET /workflows/run/{id}`: Dify's record of a run of this app (any user's)."""
        with self._lock:
            self.record_reads.append(run_id)
        run = self.runs.get(run_id)
        if mode not in (CHATFLOW, WORKFLOW):
            message = "Please check if your app mode matches the right API route."
            await conn.send(400, {"code": "not_workflow_app", "message": message, "status": 400})
        elif run is None:
            await conn.send(404, {"code": "not_found", "message": "Workflow run not found.", "status": 404})
        else:
            await conn.send(200, run.record())

    async def _reattach(self, run_id: str, request: Request, conn: Conn) -> None:
        """`GET /workflow/{run id}/events?user=`: what the run publishes from now on; with
        `include_state_snapshot=true` its past first; a finished run's workflow_finished alone (dify_runs.py)."""
        run = self.runs.get(run_id)
        flags = {name: request.query.get(name, "false").lower() == "true" for name in _REATTACH_FLAGS}
        user = request.query.get("user", "")
        with self._lock:
            self.reattaches.append({"run_id": run_id, "user": user, "at": time.time(), **flags})
        if not request.query.get("user"):
            await conn.send(400, {"code": "invalid_param", "message": "Arg user must be provided.", "status": 400})
            return
        if self.reattach_refusals:
            status = self.reattach_refusals.pop(0)
            await conn.send(status, {"code": "not_found", "message": "Workflow run not found", "status": status})
            return
        if run is None or run.user != request.query.get("user"):
            await conn.send(404, {"code": "not_found", "message": "Workflow run not found", "status": 404})
            return
        paused_at = next((f for f in self.forms.values() if f["run"] is run and f["status"] == "open"), None)
        await run.follow(
            conn,
            snapshot=flags["include_state_snapshot"],
            continue_on_pause=flags["continue_on_pause"],
            form=paused_at,
            ping_interval=self.ping_interval,
            idle_timeout=self.idle_timeout,
        )

    def _check_files(self, body: dict) -> str:
        """Dify's check of the uploaded files a request names, in `files` and in `inputs` (a file variable's value:
        one file object, or a list): each must be the request's own user's upload."""
        named = list(body.get("files") or [])
        for value in (body.get("inputs") or {}).values() if isinstance(body.get("inputs"), dict) else []:
            values = value if isinstance(value, list) else [value]
            named += [v for v in values if isinstance(v, dict) and "upload_file_id" in v]
        for item in named:
            upload = self.uploads.get(item.get("upload_file_id", "")) if isinstance(item, dict) else None
            if upload is None or upload["user"] != body["user"] or item.get("transfer_method") != "local_file":
                return "files: unknown upload_file_id for this user"
        return ""

    def _file_attributes(self, inputs) -> dict:
        """A run's inputs as a graph reads them: a file variable's value (an upload) becomes the attributes Dify
        gives it: name, extension, mime_type, size, and url, its signed preview link, relative as a Dify whose
        FILES_URL is unset writes it."""
        seen = {}
        for name, value in (inputs or {}).items():
            upload = self.uploads.get(value.get("upload_file_id", "")) if isinstance(value, dict) else None
            if upload is None:
                seen[name] = value
                continue
            extension = "." + upload["name"].rsplit(".", 1)[-1] if "." in upload["name"] else ""
            seen[name] = {
                "name": upload["name"],
                "extension": extension,
                "mime_type": upload["mime_type"],
                "size": len(upload["data"]),
                "url": self.file_url(self.host_preview(upload["data"], upload["mime_type"], value["upload_file_id"])),
            }
        return seen

    async def _upload(self, request: Request, conn: Conn) -> None:
        fields, file_part = parse_multipart(request)
        if file_part is None:
            await conn.send(400, {"code": "no_file_uploaded", "message": "Please upload your file.", "status": 400})
            return
        if not fields.get("user"):
            await conn.send(400, {"code": "invalid_param", "message": "Arg user must be provided.", "status": 400})
            return
        name, mime_type, data = file_part
        extension = name.rsplit(".", 1)[-1].lower() if "." in name else ""
        if extension and extension in self.blocked_extensions:
            message = "The file extension is blocked for security reasons."
            await conn.send(400, {"code": "file_extension_blocked", "message": message, "status": 400})
            return
        file_id = str(uuid.uuid4())
        with self._lock:
            self.uploads[file_id] = {"name": name, "mime_type": mime_type, "data": data, "user": fields["user"]}
        source_url = self.file_url(self.host_preview(data, mime_type, file_id), absolute=True)
        reply = {"id": file_id, "reference": None, "name": name, "size": len(data), "extension": extension}
        reply |= {"mime_type": mime_type, "created_by": str(uuid.uuid5(uuid.NAMESPACE_URL, fields["user"]))}
        reply |= {"created_at": int(time.time()), "preview_url": None, "source_url": source_url}
        reply |= {"original_url": None, "user_id": None, "tenant_id": "stand-in-tenant", "conversation_id": None}
        await conn.send(201, reply | {"file_key": None})

    async def _tool_file(self, name: str, request: Request, conn: Conn) -> None:
        """A tool-made file at its signed URL (Dify answers 403 without the signature)."""
        with self._lock:
            self.file_fetches.append(name)
        if not all(request.query.get(part) for part in ("timestamp", "nonce", "sign")):
            await conn.send(403, {"code": "forbidden", "message": "Invalid request.", "status": 403})
            return
        mime = mimetypes.guess_type(name)[0] or "application/octet-stream"
        await conn.send(200, self.files[name], content_type=mime)

    async def _preview(self, file_id: str, request: Request, conn: Conn) -> None:
        """A knowledge-base file at its signed preview URL (403 without the signature, 404 unknown)."""
        with self._lock:
            self.file_fetches.append(file_id)
        if not all(request.query.get(part) for part in ("timestamp", "nonce", "sign")):
            await conn.send(403, {"code": "forbidden", "message": "Invalid request.", "status": 403})
        elif file_id not in self.previews:
            await conn.send(404, {"code": "not_found", "message": "File not found.", "status": 404})
        else:
            data, mime = self.previews[file_id]
            await conn.send(200, data, content_type=mime)

    async def _suggested(self, message_id: str, request: Request, conn: Conn) -> None:
        """`GET /messages/{id}/suggested?user=`: follow-up questions (400 where the app does not enable them)."""
        if self.messages.get(message_id) != request.query.get("user"):
            await conn.send(404, {"code": "not_found", "message": "Message Not Exists.", "status": 404})
        elif not self.parameters["suggested_questions_after_answer"].get("enabled"):
            await conn.send(400, {"code": "bad_request", "message": "Suggested Questions Is Disabled.", "status": 400})
        else:
            await conn.send(200, {"result": "success", "data": list(self.suggestions)})

    async def _feedback(self, message_id: str, request: Request, conn: Conn) -> None:
        body = request.json() or {}
        if self.messages.get(message_id) != body.get("user"):
            await conn.send(404, {"code": "not_found", "message": "Message Not Exists.", "status": 404})
            return
        with self._lock:
            self.feedbacks.append((message_id, body))
        await conn.send(200, {"result": "success"})

    def _take_script(self, query: str) -> list[tuple] | None:
        with self._lock:
            for script in self._scripts:
                if script.match is None or script.match in query:
                    if script.times is not None:
                        script.times -= 1
                        if script.times <= 0:
                            self._scripts.remove(script)
                    return script.steps
        return None

    async def _play(self, steps: list[tuple], sink: _ConnSink | _RunSink) -> None:
        """Play `steps` into `sink`: a plain answer's HTTP response, or a run (which relays to its readers)."""
        began: float | None = None  # when the body began (monotonic)
        for step in steps:
            kind = step[0]
            if kind == "delay_head":
                await asyncio.sleep(step[1])
                continue
            if kind == "http":
                await sink.send(step[1], step[2])
                return
            if kind == "drop":
                sink.abort()
                return
            if began is None:
                await sink.start()
                began = time.monotonic()
            if kind == "event":
                await sink.event(step[1])
            elif kind == "clock":
                await sink.event({"event": "message", "answer": f"{step[1]}{time.time():.6f};"})
            elif kind == "ping":
                await sink.write(PING)
            elif kind == "raw":
                await sink.write(step[1])
            elif kind == "split":
                await sink.event(step[1][1], parts=step[2], gap=step[3])
            elif kind == "sleep":
                await self._sleep_with_pings(sink, step[1])
            elif kind == "until":
                await self._sleep_with_pings(sink, began + step[1] - time.monotonic())
            elif kind == "stall":
                await asyncio.sleep(step[1])
            elif kind == "cut":
                sink.abort()
                if not sink.plays_on:
                    return
            elif kind == "close":
                await sink.close()
                return
            elif kind == "knowledge_text":
                _, text, data, mime = step
                await sink.event({"event": "message", "answer": text.replace("{url}", self.host_preview(data, mime))})
            elif kind == "tool_file":
                _, data, extension, file_type, filename = step
                fields = {"filename": filename} if filename else {}
                await sink.event(message_file(self.host_file(data, extension), file_type, **fields)[1])
            elif kind == "form":
                await self._pause(step[1], sink)
                return
        if began is None:
            await sink.start()
        await sink.finish()

    async def _sleep_with_pings(self, sink: _ConnSink | _RunSink, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            if left > self.ping_interval:
                await asyncio.sleep(self.ping_interval)
                await sink.write(PING)
            else:
                await asyncio.sleep(left)


class _ConnSink:
    """Where a plain chat or completion answer's steps go: straight into its HTTP response."""

    plays_on = False  # a cut connection ends the answer

    def __init__(self, conn: Conn, ids: dict, ended: Callable[[], None] = lambda: None):
        self.conn = conn
        self.ids = ids
        self.ended = ended  # called as the answer's last event goes out

    async def start(self) -> None:
        await self.conn.start_stream(headers={"X-Accel-Buffering": "no"})

    async def event(self, payload: dict, parts: int = 1, gap: float = 0.0) -> None:
        if payload.get("event") in ("message_end", "error"):
            self.ended()
        await _write_split(self.conn, _frame(payload, self.ids), parts, gap)

    async def write(self, data: bytes) -> None:
        await self.conn.write_chunk(data)

    async def send(self, status: int, body: dict) -> None:
        await self.conn.send(status, body)

    def abort(self) -> None:
        self.conn.abort()

    async def close(self) -> None:
        await self.conn.end_stream()

    finish = close


class _RunSink:
    """Where a chatflow's or workflow's steps go: its Run publishes them (and relays them to the readers that
    attached), and the first reader's HTTP response gets them while it is there; a reader that went away (its
    replica was killed, or a `cut` step dropped its connection) does not stop the run: Dify's worker runs it to its
    end. The order Dify keeps is kept whatever a script says: a run opens with workflow_started, and a chatflow's
    message_end comes before its workflow_finished."""

    plays_on = True  # a cut connection leaves the run going

    def __init__(self, run: Run, conn: Conn | None = None):
        self.run = run
        self.conn = conn
        self.gone = conn is None

    async def start(self) -> None:
        """The first reader's stream begins, with a ping at once (as Dify's does)."""
        await self._guard(lambda: self.conn.start_stream(headers={"X-Accel-Buffering": "no"}))
        await self.write(PING)

    async def event(self, payload: dict, parts: int = 1, gap: float = 0.0) -> None:
        run, kind = self.run, payload["event"]
        if not run.started and kind != "workflow_started":
            await self._publish({"event": "workflow_started"})
        if run.chatflow and kind == "workflow_finished" and not run.message_ended:
            await self._publish(end()[1])
        if kind == "message_end" and run.message_ended:
            return
        await self._publish(payload, parts, gap)

    async def _publish(self, payload: dict, parts: int = 1, gap: float = 0.0) -> None:
        encoded = self.run.publish(payload)
        if encoded is not None:
            await self._guard(lambda: _write_split(self.conn, encoded, parts, gap))

    async def write(self, data: bytes) -> None:
        await self._guard(lambda: self.conn.write_chunk(data))

    async def send(self, status: int, body: dict) -> None:
        await self._guard(lambda: self.conn.send(status, body))

    def abort(self) -> None:
        if self.conn is not None:
            self.conn.abort()
        self._leave()

    async def close(self) -> None:
        """The first reader's stream ends (a pause, or a script's clean close); the run does not."""
        await self._guard(lambda: self.conn.end_stream())
        self._leave()

    async def finish(self) -> None:
        """The steps ran out: a run that neither paused nor failed ends as Dify ends one (workflow_finished)."""
        if not self.run.ended and self.run.status == "running":
            await self.event(workflow_finished()[1])
        await self.close()

    async def _guard(self, write) -> None:
        if self.gone:
            return
        try:
            await write()
        except (ConnectionError, OSError):
            self._leave()

    def _leave(self) -> None:
        """The first reader is no longer there: once, the run notes it (gone mid-run, when it had not ended or
        paused) and its other subscribers hear that it closed."""
        if self.gone:
            return
        self.gone = True
        if self.run.status == "running" and not self.run.ended:
            self.run.first_reader_gone = True
        self.run.subscriber_closed()


def _node_fields(form: dict) -> dict:
    return {"node_id": form["node"]["id"], "node_title": form["node"]["title"]}


_REATTACH_FLAGS = ("include_state_snapshot", "continue_on_pause")


def _missing_start_input(flow, inputs) -> str:
    """Dify's refusal of a run without a required Start variable a graph app declares, or ""."""
    for item in flow.start_inputs if flow is not None else ():
        for spec in item.values():
            if spec.get("required") and spec.get("variable") not in (inputs or {}):
                return f"{spec['variable']} is required in input form"
    return ""


def _form_refusal(form: dict | None, method: str, body: dict, refuse_inputs) -> tuple[int, str, str]:
    """Dify's answer to a form request that it refuses, in the order Dify checks (`refuse_inputs(form, inputs)`:
    the select and file values), else (200, "", "")."""
    if method == "POST" and not body.get("user"):
        return 400, "invalid_param", "Arg user must be provided."
    if form is None or not form["service_api"]:
        return 404, "not_found", "Form not found"
    if form["status"] == "submitted":
        return 412, "human_input_form_submitted", "This form has already been submitted by another user"
    if form["status"] != "open" or time.time() >= form["expires"]:
        return 412, "human_input_form_expired", "This form has expired"
    if method == "GET":
        return 200, "", ""
    if body.get("user") != form["user"]:
        return 404, "not_found", "Form not found"
    inputs = body.get("inputs") if isinstance(body.get("inputs"), dict) else {}
    refused = refuse_inputs(form, inputs)
    if refused[0] != 200:
        return refused
    if body.get("action") not in form["actions"]:
        return 400, "invalid_form_data", f"Invalid action: {body.get('action')}"
    missing = [name for name in form["input_names"] if name not in inputs]
    if missing:
        return 400, "invalid_form_data", f"Missing required inputs: {', '.join(missing)}"
    return 200, "", ""


async def _json_body(request: Request, conn: Conn) -> dict | None:
    """The request's JSON object, or None after answering 400 as Dify does."""
    try:
        body = request.json()
    except orjson.JSONDecodeError:
        body = None
    if not isinstance(body, dict):
        await conn.send(400, {"code": "invalid_param", "message": "body must be JSON", "status": 400})
        return None
    return body


# Which app modes each endpoint serves.
_APP_PATHS = {"/v1/chat-messages": "chat", "/v1/workflows/run": "workflow", "/v1/completion-messages": "completion"}
_STOP_PATHS = ("/v1/chat-messages/", "/v1/workflows/tasks/", "/v1/completion-messages/")


def _family(mode: str) -> str:
    """The endpoint family of an app mode: chat, workflow or completion."""
    return mode if mode in ("workflow", "completion") else "chat"


# Dify's file types by extension, as its api/constants lists them (documents: the default ETL's and Unstructured's);
# any other extension is of type `custom`.
_FILE_TYPES = {
    **dict.fromkeys(("jpg", "jpeg", "png", "webp", "gif", "svg"), "image"),
    **dict.fromkeys(("mp4", "mov", "mpeg", "webm"), "video"),
    **dict.fromkeys(("mp3", "m4a", "wav", "amr", "mpga"), "audio"),
    **dict.fromkeys(
        ("txt", "markdown", "md", "mdx", "pdf", "html", "htm", "xlsx", "xls", "vtt", "properties", "doc", "docx",
         "csv", "eml", "msg", "pptx", "xml", "epub"),
        "document",
    ),
}  # fmt: skip


def parse_multipart(request: Request) -> tuple[dict[str, str], tuple[str, str, bytes] | None]:
    """(form fields, (filename, mime type, bytes) of the `file` part) of a multipart/form-data request."""
    head = f"Content-Type: {request.headers.get('content-type', '')}\r\n\r\n".encode()
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + request.body)
    fields: dict[str, str] = {}
    file_part = None
    for part in message.iter_parts() if message.is_multipart() else []:
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True) or b""
        if name == "file":
            file_part = (part.get_filename() or "", part.get_content_type(), payload)
        elif name:
            fields[name] = payload.decode()
    return fields, file_part


def default_parameters() -> dict:
    """A plain chat app's `/parameters`: no opening statement, no declared inputs, images allowed."""
    return {
        "opening_statement": "",
        "suggested_questions": [],
        "suggested_questions_after_answer": {"enabled": False},
        "user_input_form": [],
        "file_upload": {"image": {"enabled": True, "number_limits": 3, "transfer_methods": ["local_file"]}},
        "system_parameters": {"image_file_size_limit": 10, "file_size_limit": 15},
    }


def _frame(payload: dict, ids: dict) -> bytes:
    data = {**payload}
    for name, value in ids.items():
        data.setdefault(name, value)
    if "message_id" in ids:
        data.setdefault("id", ids["message_id"])
    data.setdefault("created_at", int(time.time()))
    return b"data: " + orjson.dumps(data) + b"\n\n"


async def _write_split(conn: Conn, frame: bytes, parts: int, gap: float) -> None:
    size = max(1, -(-len(frame) // max(1, parts)))
    for start in range(0, len(frame), size):
        await conn.write_chunk(frame[start : start + size])
        await asyncio.sleep(gap)


def _validate_chat(body: dict) -> str:
    """Dify's own checks on a chat request: the message it answers 400 invalid_param with, or ''."""
    if not isinstance(body.get("user"), str) or not body["user"]:
        return "Arg user must be provided."
    if not isinstance(body.get("query"), str):
        return "query is required"
    if not isinstance(body.get("inputs"), dict):
        return "inputs is required"
    if body.get("response_mode") not in ("streaming", "blocking"):
        return "response_mode must be streaming or blocking"
    conversation_id = body.get("conversation_id")
    if conversation_id and not (isinstance(conversation_id, str) and _UUID.fullmatch(conversation_id)):
        return "conversation_id must be a valid UUID"
    return ""


_DEMO_TEXTS = {
    "zh": {
        "intro": "**本地演示回答**（Dify 替身{app}）\n\n你刚才说：「{query}」\n\n",
        "turn": "这是本次对话的第 {turn} 轮，上一轮你问的是：「{previous}」。\n\n",
        "cut": "这段回答会在中途断开……",
        "body": "这是一个流式回答：每个词都是 Dify 的一个 `message` 事件，网关把它们写入 Redis，"
        "企业微信每秒轮询一次，看到的总是到目前为止的完整文本。\n\n"
        "- 发送 `error` 看看出错时的提示\n- 发送 `cut` 看看连接中断时的提示\n- 发送 `slow` 看一个较长的回答\n"
        "- 发送 `think`、`agent` 或 `form` 看看推理过程、智能体应用和需要填表的应用\n"
        "- 发送 `手册` 或 `搜索` 看看知识库回答（图片与参考资料）和慢工具的进度提示\n- 发送 `/new` 开始新的对话\n",
        "slow": "{i}. 第 {i} 段较长的内容，用来观察逐步增长的气泡。\n",
        "opening": "你好，我是本地演示的 AI 助手（由 Dify 替身回答）。\n点一个问题试试，或者直接输入。",
        "suggested": ("你能做什么？", "审批：采购一台笔记本电脑", "slow：一个较长的回答"),
    },
    "en": {
        "intro": "**Local demo answer** (Dify stand-in{app})\n\nYou said: “{query}”\n\n",
        "turn": "This is turn {turn} of our conversation; last time you asked: “{previous}”.\n\n",
        "cut": "This answer will break off halfway…",
        "body": "This answer streams: every word is one Dify `message` event, the gateway writes them to Redis, "
        "and WeCom polls once a second, always seeing the whole text so far.\n\n"
        "- send `error` to see how a failure looks\n- send `cut` to see a broken connection\n"
        "- send `slow` for a longer answer\n- send `think`, `agent` or `form` for reasoning, an agent app and an app "
        "that needs a form\n- send `handbook` or `search` for a knowledge answer (a picture and its sources) and a "
        "slow tool's status line\n- send `/new` to start a new conversation\n",
        "slow": "{i}. Paragraph {i} of a longer answer, to watch the bubble grow.\n",
        "opening": "Hello, I am the local demo's AI assistant (answered by the Dify stand-in).\nTap a question, "
        "or type your own.",
        "suggested": ("What can you do?", "form: approve buying a laptop", "slow: a longer answer"),
    },
}


def persona_opening(language: str) -> dict:
    """A demo bot's app opening a chat: a greeting, and questions the user taps to ask (the welcome card)."""
    texts = _DEMO_TEXTS.get(language, _DEMO_TEXTS["zh"])
    return {"opening_statement": texts["opening"], "suggested_questions": list(texts["suggested"])}


def demo_reply(
    query: str, delay: float, language: str = "zh", earlier: list[str] | None = None, app: str = ""
) -> list[tuple]:
    """What the stand-in says without a script: a short markdown answer streamed word by word, in the bot's
    language, as the Dify app `app` (a bot's name), saying which turn of the conversation it is (`earlier`: the
    questions before this one).

    A few words in the question show how failures look in the bubble: 'error', 'cut', 'slow'.
    """
    texts = _DEMO_TEXTS.get(language, _DEMO_TEXTS["zh"])
    lowered = query.lower()
    intro = texts["intro"].format(query=query[:200], app=f" · {app}" if app else "")
    if earlier:
        intro += texts["turn"].format(turn=len(earlier) + 1, previous=earlier[-1][:200])
    if "error" in lowered:
        return [ping(), *answer(intro, delay=delay)[:-1], error("completion_request_error", "model failed", 400)]
    if "cut" in lowered:
        return [ping(), *answer(intro + texts["cut"], delay=delay)[:-1], cut()]
    body = texts["body"]
    if "slow" in lowered:
        body += "\n" + "".join(texts["slow"].format(i=i) for i in range(1, 31))
    return [ping(), *answer(intro + body, delay=delay)]


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Run the Dify stand-in on its own.")
    parser.add_argument("--port", type=int, default=5001)
    parser.add_argument("--api-key", default=None, help="require this key (default: accept any)")
    options = parser.parse_args()
    standin = DifyStandIn(api_key=options.api_key, port=options.port).start()
    print(f"Dify stand-in listening on {standin.base_url} (Ctrl-C to stop)")
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        standin.stop()
