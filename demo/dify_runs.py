"""Chatflow and workflow runs in the Dify stand-in, as a real Dify 1.14.2 and 1.16.0 were measured to run them (the
captures in tests/fixtures/dify-1.14.2 and dify-1.16.0; docs/protocol.md, "Dify versions"; what differs between the
two is demo/dify_versions.py's):

- a run goes on without its first reader (it runs in Dify's worker, the API only relays its events);
- only workflow events carry `workflow_run_id`; `message` events carry the message's ids;
- `GET /workflow/{run}/events` relays only what the run publishes from then on (a ping at once, then every
  interval); with `include_state_snapshot=true` it first rebuilds the run's past from what Dify saved: one
  `message_replace` with the answer saved at the last pause or end (`""` mid-run), the nodes run, and a pause's
  form with its raw template; a finished run gives its `workflow_finished` alone;
- a run paused at a form goes on when the form is answered: `workflow_started` (reason `resumption`), (1.14.2) the
  answer streamed before the pause once more, the form node again, (1.14.2) `human_input_form_filled`, the rest;
- a chatflow's `message_end` comes before its `workflow_finished`, whose `outputs.answer` is the whole answer;
- Dify's bug #38432 / #38525 (an Answer streamed before a pause: the answers after the resumption are never
  streamed as `message` events) is reproduced while `answer_bug` is on, as 1.14.2 has it;
- `GET /workflows/run/{id}` answers Dify's record of the run (its status, and its outputs once it ended);
- 1.16.0 only: a subscriber that closes cuts the run's plain listeners; once the first reader went away mid-run, later
  listeners get only the run's text; a resumed workflow app ends `stopped` after streaming its outputs.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid

import orjson

from demo.dify_versions import V1_14, DifyVersion

CHATFLOW, WORKFLOW = "advanced-chat", "workflow"
# The events that carry workflow_run_id (and, in a workflow app, the only ones there are).
WORKFLOW_EVENTS = frozenset(
    {
        "workflow_started",
        "workflow_finished",
        "workflow_paused",
        "node_started",
        "node_finished",
        "node_retry",
        "iteration_started",
        "iteration_next",
        "iteration_completed",
        "loop_started",
        "loop_next",
        "loop_completed",
        "parallel_branch_started",
        "parallel_branch_finished",
        "human_input_required",
        "human_input_form_filled",
        "human_input_form_timeout",
        "text_chunk",
        "text_replace",
        "agent_log",
    }
)
# Message events that name their message in `id` too.
_WITH_ID = frozenset({"message", "message_end", "message_file", "agent_message", "agent_thought"})
_FAILED = frozenset({"failed", "stopped"})
_TEXT_EVENTS = frozenset({"message", "text_chunk"})
PING = b"event: ping\n\n"
CUT = object()  # put on a listener's queue: Dify drops its connection there (DifyVersion.closing_cuts_plain_listeners)
# What Dify 1.16.0 says of a resumed workflow app it ends `stopped` (DifyVersion.resumed_workflow_stops): in the
# stream, and in its record of the run.
_STOPPED_LIVE = "Stopped by user."
_STOPPED_RECORD = "Aborted: Client response stream closed before app execution completed"
# DifyVersion.resumed_workflow_outruns_listeners: how long before a resumption a listener must have subscribed to get
# the resumed run's events, and how long after its end its record holds no outputs.
NEW_LISTENER_LAG = 0.5
RECORD_LAG = 1.0


def frame(data: dict) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"


class Reader:
    """One listener of a run's events (`GET /workflow/{run}/events`): its queue, and whether it asked for the
    snapshot (Dify 1.16.0 cuts only the others when a subscriber closes)."""

    __slots__ = ("queue", "snapshot", "since")

    def __init__(self, snapshot: bool):
        self.queue: asyncio.Queue = asyncio.Queue()
        self.snapshot = snapshot
        self.since = time.monotonic()  # when it subscribed


class Run:
    """One chatflow or workflow run: what it published, what Dify saved of it, and the readers following it."""

    def __init__(
        self,
        run_id: str,
        task_id: str,
        user: str,
        mode: str,
        message_id: str = "",
        conversation_id: str = "",
        inputs: dict | None = None,
        answer_bug: bool = True,
        version: DifyVersion = V1_14,
    ):
        self.id = run_id
        self.task_id = task_id
        self.user = user
        self.mode = mode
        self.message_id = message_id
        self.conversation_id = conversation_id
        self.inputs = inputs or {}
        self.version = version
        self.answer_bug = answer_bug and version.answer_bug
        self.created_at = int(time.time())
        self.status = "running"  # running, paused, succeeded, failed, stopped
        self.started = False  # workflow_started was published
        self.message_ended = False  # message_end was published since the run (re)started
        self.answer = ""  # a chatflow's whole answer: every message's text, streamed or not
        self.saved = ""  # the answer as Dify saved it: at the last pause or the end ("" before)
        self.streamed: list[tuple[str, list]] = []  # the message chunks streamed (the resumption streams them again)
        self.muted = False  # resumed after text was streamed, with answer_bug: message events are not streamed
        self.nodes: list[dict] = []  # node executions, in order: the snapshot's node events
        self.pause: dict | None = None  # the paused form's human_input_required data, with its raw template
        self.paused_node: dict | None = None  # the node it waits in
        self.finished: dict | None = None  # the workflow_finished event
        self.kept_outputs: dict | None = None  # what Dify's record keeps of a run it streamed as stopped (1.16.0)
        self.finished_at = 0
        self.ended_at = 0.0  # time.monotonic() at workflow_finished
        self.resumed = False  # went on after a form
        self.resumed_at = 0.0  # time.monotonic() at the last resumption
        self.first_reader_gone = False  # the first reader went away before the run ended
        self.readers: set[Reader] = set()
        self.frames: list[bytes] = []  # everything published, for tests

    @property
    def chatflow(self) -> bool:
        return self.mode == CHATFLOW

    @property
    def ended(self) -> bool:
        return self.finished is not None or self.status in _FAILED

    # --- publishing -----------------------------------------------------------------------------------------

    def tag(self, payload: dict) -> dict:
        """The event as Dify sends it: its ids by kind (a step's own fields win)."""
        kind = payload["event"]
        data: dict = {"event": kind}
        if self.chatflow:
            data |= {"conversation_id": self.conversation_id, "message_id": self.message_id}
            data["created_at"] = self.created_at
        data["task_id"] = self.task_id
        if kind in WORKFLOW_EVENTS:
            data["workflow_run_id"] = self.id
        if self.chatflow and kind in _WITH_ID:
            data["id"] = self.message_id
        return data | payload

    def publish(self, payload: dict) -> bytes | None:
        """Record one event of the run and relay it to the readers following it; its frame, or None when Dify
        would not stream it (a message after the resumption, with answer_bug)."""
        kind = payload["event"]
        body = payload.get("data") if isinstance(payload.get("data"), dict) else {}
        if self._stops_when_resumed() and kind in ("node_started", "node_finished") and body.get("node_type") == "end":
            return None  # 1.16.0 ends a resumed workflow before its End node
        if kind == "workflow_started":
            self.started, self.message_ended, self.status = True, False, "running"
            payload = {**payload, "data": self.started_data("initial") | body}
        elif kind == "message" and self.chatflow and not payload.get("repeat"):
            text = str(payload.get("answer") or "")
            self.answer += text
            if self.muted:
                return None
            self.streamed.append((text, payload.get("from_variable_selector") or []))
        elif kind == "message_replace":
            self.answer = str(payload.get("answer") or "")
        elif kind == "message_end":
            self.message_ended = True
            if self.version.reasoning_metadata:
                payload = {**payload, "metadata": {**(payload.get("metadata") or {}), "reasoning": {}}}
        elif kind == "node_started":
            self._node_started(body)
        elif kind == "node_finished":
            self._node_finished(body)
        elif kind == "human_input_required":
            self.pause = body
        elif kind == "workflow_paused":
            self.status, self.saved = "paused", self.answer
            for node in self.nodes:  # the node it waits in is saved as paused
                if node["status"] == "running" and node["node_id"] in body.get("paused_nodes", ()):
                    node["status"] = "paused"
        elif kind == "workflow_finished":
            payload = self._finished(payload, body)
        elif kind == "error":
            self.status = "failed"
        payload = {k: v for k, v in payload.items() if k != "repeat"}
        data = self.tag(payload)
        if kind == "workflow_finished":
            self.finished = data
        encoded = frame(data)
        self.frames.append(encoded)
        if self.version.orphan_relays_only_text and self.first_reader_gone and kind not in _TEXT_EVENTS:
            return encoded  # 1.16.0: a run whose first reader went away relays only its text to later listeners
        for reader in list(self.readers):
            if not self._outruns(reader):
                reader.queue.put_nowait(data)
        return encoded

    def _outruns(self, reader: Reader) -> bool:
        """Whether the resumed run's events miss `reader`, which subscribed too shortly before the resumption
        (DifyVersion.resumed_workflow_outruns_listeners)."""
        return (
            self._stops_when_resumed()
            and self.version.resumed_workflow_outruns_listeners
            and reader.since > self.resumed_at - NEW_LISTENER_LAG
        )

    def subscriber_closed(self, closing: Reader | None = None) -> None:
        """A subscriber of the run closed (`closing`, or the first reader's stream: None): Dify 1.16.0 then cuts
        every other plain listener, after what it was sent already."""
        if not self.version.closing_cuts_plain_listeners:
            return
        for reader in list(self.readers):
            if reader is not closing and not reader.snapshot:
                reader.queue.put_nowait(CUT)

    def _stops_when_resumed(self) -> bool:
        return self.version.resumed_workflow_stops and self.resumed and self.mode == WORKFLOW

    def _node_started(self, body: dict) -> None:
        node = {
            "id": body.get("id") or str(uuid.uuid4()),
            "node_id": body.get("node_id", ""),
            "node_type": body.get("node_type", ""),
            "title": body.get("title", ""),
            "index": len(self.nodes) + 1,
            "status": "running",
        }
        body.setdefault("id", node["id"])
        body.setdefault("index", node["index"])
        self.nodes.append(node)

    def _node_finished(self, body: dict) -> None:
        for node in reversed(self.nodes):
            if node["node_id"] == body.get("node_id"):
                node["status"] = body.get("status", "succeeded")
                body.setdefault("id", node["id"])
                body.setdefault("index", node["index"])
                return

    def _finished(self, payload: dict, body: dict) -> dict:
        """A run's end: what Dify saves (a chatflow's outputs.answer is its whole answer, streamed or not)."""
        self.status = str(body.get("status") or "succeeded")
        self.saved = self.answer
        self.finished_at, self.ended_at = int(time.time()), time.monotonic()
        outputs = dict(body.get("outputs") or {})
        if self.chatflow:
            outputs["answer"] = self.answer
            outputs.setdefault("files", [])
        error = body.get("error")
        if self._stops_when_resumed() and self.status == "succeeded":
            self.status, self.kept_outputs, outputs, error = "stopped", outputs, {}, _STOPPED_LIVE
        body = {
            "id": self.id,
            "workflow_id": "stand-in-workflow",
            "status": self.status,
            "outputs": outputs,
            "error": error,
            "elapsed_time": body.get("elapsed_time", 0.1),
            "total_tokens": body.get("total_tokens", 0),
            "total_steps": len(self.nodes),
            "created_by": {"id": "end-user", "user": self.user},
            "created_at": self.created_at,
            "finished_at": self.finished_at,
            "exceptions_count": 0,
            "files": [],
        }
        return {**payload, "data": body}

    # --- pausing and going on -------------------------------------------------------------------------------

    def paused(self, form: dict) -> list[dict]:
        """The events of a pause at `form` (a registered form: its node, data and raw template)."""
        self.paused_node = form["node"]
        started = {"event": "node_started", "data": self._node_data(form["node"])}
        required = {"event": "human_input_required", "data": form["event_data"]}
        return [started, required, {"event": "workflow_paused", "data": self._pause_data(form, saved=False)}]

    def resumption(self, form: dict, filled: dict) -> list[dict]:
        """The events of a resumption after `form` was answered (or timed out: `filled` names the event, None when
        this version sends none): the run starts again, (1.14.2) streams its answer before the pause once more, and
        runs the form's node again."""
        self.pause, self.resumed, self.resumed_at = None, True, time.monotonic()
        repeat = [
            {"event": "message", "answer": text, "from_variable_selector": selector, "repeat": True}
            for text, selector in self.streamed
        ]
        if not self.version.repeats_answer_on_resume:
            repeat = []
        self.muted = self.answer_bug and bool(self.streamed)
        started = {"event": "workflow_started", "data": self.started_data("resumption")}
        node = {"event": "node_started", "data": self._node_data(form["node"])}
        return [started, *repeat, node, *([filled] if filled else [])]

    def _node_data(self, node: dict) -> dict:
        return {
            "id": str(uuid.uuid4()),
            "node_id": node["id"],
            "node_type": node["type"],
            "title": node["title"],
            "predecessor_node_id": None,
            "inputs": None,
            "created_at": int(time.time()),
            "extras": {},
            "iteration_id": None,
            "loop_id": None,
        }

    def started_data(self, reason: str) -> dict:
        return {
            "id": self.id,
            "workflow_id": "stand-in-workflow",
            "inputs": self.inputs,
            "created_at": self.created_at,
            "reason": reason,
        }

    def _pause_data(self, form: dict, saved: bool) -> dict:
        reason = {"TYPE": "human_input_required", **form["event_data"]}
        outputs: dict = {}
        if saved and self.chatflow and self.saved:  # an Answer ran before the pause
            outputs = {"answer": self.saved, "files": {"value_type": "array[file]", "value": []}}
        return {
            "workflow_run_id": self.id,
            "paused_nodes": [form["node"]["id"]],
            "outputs": outputs,
            "reasons": [reason],
            "status": "paused",
            "created_at": self.created_at,
            "elapsed_time": 0.1,
            "total_tokens": 0,
            "total_steps": len(self.nodes),
        }

    # --- readers that attach later (GET /workflow/{run}/events) -----------------------------------------------

    def snapshot(self, form: dict | None) -> list[dict]:
        """What Dify rebuilds from its database for `include_state_snapshot=true`: the run started, the answer
        saved so far in one message_replace (a chatflow's; "" mid-run), the nodes run, and a pause's form with its
        raw template (`form`: the paused form, if the run waits)."""
        events = [self.tag({"event": "workflow_started", "data": self.started_data("initial")})]
        if self.chatflow:  # what Dify saved: the answer at the last pause ("" if it never paused)
            events.append(self.tag({"event": "message_replace", "answer": self.saved, "reason": ""}))
        for node in self.nodes:
            data = {k: node[k] for k in ("id", "node_id", "node_type", "title", "index")}
            events.append(self.tag({"event": "node_started", "data": data}))
            if node["status"] != "running":
                events.append(self.tag({"event": "node_finished", "data": data | {"status": node["status"]}}))
        if self.status == "paused" and form is not None:
            required = dict(form["event_data"])
            if self.version.raw_template_in_snapshot:
                required["form_content"] = form["template"]
            events.append(self.tag({"event": "human_input_required", "data": required}))
            snapshot_form = {**form, "event_data": required}
            events.append(self.tag({"event": "workflow_paused", "data": self._pause_data(snapshot_form, saved=True)}))
        return events

    def finished_alone(self) -> dict:
        """A finished run's one event for a late reader: workflow_finished, its task_id the run's id (and a run
        streamed as stopped: the outputs its record keeps)."""
        data = self.finished["data"]
        if self.kept_outputs is not None:
            data = {**data, "outputs": self._recorded_outputs()}
        return {"event": "workflow_finished", "task_id": self.id, "workflow_run_id": self.id, "data": data}

    def _recorded_outputs(self) -> dict:
        """The outputs Dify's record keeps of a run it streamed as stopped: none yet for a moment after its end
        (DifyVersion.resumed_workflow_outruns_listeners)."""
        lags = self.version.resumed_workflow_outruns_listeners and time.monotonic() - self.ended_at < RECORD_LAG
        return {} if lags else dict(self.kept_outputs or {})

    def record(self) -> dict:
        """Dify's record of the run (`GET /workflows/run/{id}`): its status, and its outputs once it ended."""
        outputs: dict = {}
        error = None
        if self.finished is not None:
            outputs = self.finished["data"]["outputs"] if self.kept_outputs is None else self._recorded_outputs()
            error = self.finished["data"]["error"] if self.kept_outputs is None else _STOPPED_RECORD
        elif self.status == "failed":
            error = "run failed"
        return {
            "id": self.id,
            "workflow_id": "stand-in-workflow",
            "status": self.status,
            "inputs": self.inputs,
            "outputs": outputs,
            "error": error,
            "total_steps": len(self.nodes),
            "total_tokens": 0,
            "created_at": self.created_at,
            "finished_at": self.finished_at or None,
            "elapsed_time": max(0.0, (self.finished_at or time.time()) - self.created_at),
        }

    async def follow(
        self,
        conn,
        *,
        snapshot: bool,
        continue_on_pause: bool,
        form: dict | None,
        ping_interval: float,
        idle_timeout: float,
    ) -> None:
        """Serve one reader of the run's events, as Dify's relay does (module docstring)."""
        await conn.start_stream(headers={"X-Accel-Buffering": "no", "X-Version": self.version.name})
        if self.ended and self.finished is not None:
            await conn.write_chunk(frame(self.finished_alone()))
            await conn.end_stream()
            return
        reader = Reader(snapshot)
        self.readers.add(reader)  # subscribed before the snapshot is built: nothing falls between the two
        try:
            await conn.write_chunk(PING)
            if snapshot:
                for data in self.snapshot(form):
                    await conn.write_chunk(frame(data))
                    if data["event"] == "workflow_paused" and not continue_on_pause:
                        await conn.end_stream()
                        return
            await self._relay(conn, reader.queue, snapshot, continue_on_pause, ping_interval, idle_timeout)
        finally:
            self.readers.discard(reader)
            self.subscriber_closed(reader)

    async def _relay(self, conn, queue, snapshot, continue_on_pause, ping_interval, idle_timeout) -> None:
        """The live part: a ping after every quiet interval; closes at a terminal event (without
        continue_on_pause: workflow_finished or workflow_paused; with it and a snapshot: workflow_finished; with it
        alone: never), or after `idle_timeout` without an event; cut, with no last chunk, where Dify cuts it."""
        quiet_since = time.monotonic()
        while True:
            try:
                data = await asyncio.wait_for(queue.get(), ping_interval)
            except TimeoutError:
                if time.monotonic() - quiet_since > idle_timeout:
                    break
                await conn.write_chunk(PING)
                continue
            if data is CUT:
                conn.abort()
                return
            quiet_since = time.monotonic()
            await conn.write_chunk(frame(data))
            kind = data["event"]
            if not continue_on_pause and kind in ("workflow_finished", "workflow_paused"):
                break
            if continue_on_pause and snapshot and kind == "workflow_finished":
                break
        with contextlib.suppress(ConnectionError, OSError):
            await conn.end_stream()
