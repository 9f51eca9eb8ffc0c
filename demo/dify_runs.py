"""Chatflow and workflow runs in the Dify stand-in, as a real Dify 1.14.2 was measured to run them (the captures in
tests/fixtures/dify-1.14.2; docs/protocol.md, "Dify versions"):

- a run goes on without its first reader (it runs in Dify's worker, the API only relays its events);
- only workflow events carry `workflow_run_id`; `message` events carry the message's ids;
- `GET /workflow/{run}/events` relays only what the run publishes from then on (a ping at once, then every
  interval); with `include_state_snapshot=true` it first rebuilds the run's past from what Dify saved: one
  `message_replace` with the answer saved at the last pause or end (`""` mid-run), the nodes run, and a pause's
  form with its raw template; a finished run gives its `workflow_finished` alone;
- a run paused at a form goes on when the form is answered: `workflow_started` (reason `resumption`), the answer
  streamed before the pause once more, the form node again, `human_input_form_filled`, the rest;
- a chatflow's `message_end` comes before its `workflow_finished`, whose `outputs.answer` is the whole answer;
- Dify's bug #38432 / #38525 (an Answer streamed before a pause: the answers after the resumption are never
  streamed as `message` events) is reproduced while `answer_bug` is on, as 1.14.2 has it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid

import orjson

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
PING = b"event: ping\n\n"


def frame(data: dict) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"


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
    ):
        self.id = run_id
        self.task_id = task_id
        self.user = user
        self.mode = mode
        self.message_id = message_id
        self.conversation_id = conversation_id
        self.inputs = inputs or {}
        self.answer_bug = answer_bug
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
        self.readers: set[asyncio.Queue] = set()
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
        for reader in list(self.readers):
            reader.put_nowait(data)
        return encoded

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
        outputs = dict(body.get("outputs") or {})
        if self.chatflow:
            outputs["answer"] = self.answer
            outputs.setdefault("files", [])
        body = {
            "id": self.id,
            "workflow_id": "stand-in-workflow",
            "status": self.status,
            "outputs": outputs,
            "error": body.get("error"),
            "elapsed_time": body.get("elapsed_time", 0.1),
            "total_tokens": body.get("total_tokens", 0),
            "total_steps": len(self.nodes),
            "created_by": {"id": "end-user", "user": self.user},
            "created_at": self.created_at,
            "finished_at": int(time.time()),
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
        """The events of a resumption after `form` was answered (or timed out: `filled` names the event): the run
        starts again, streams its answer before the pause once more, and runs the form's node again."""
        self.pause = None
        repeat = [
            {"event": "message", "answer": text, "from_variable_selector": selector, "repeat": True}
            for text, selector in self.streamed
        ]
        self.muted = self.answer_bug and bool(self.streamed)
        started = {"event": "workflow_started", "data": self.started_data("resumption")}
        node = {"event": "node_started", "data": self._node_data(form["node"])}
        return [started, *repeat, node, filled]

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
        if saved and self.chatflow:
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
            required = {**form["event_data"], "form_content": form["template"]}
            events.append(self.tag({"event": "human_input_required", "data": required}))
            snapshot_form = {**form, "event_data": required}
            events.append(self.tag({"event": "workflow_paused", "data": self._pause_data(snapshot_form, saved=True)}))
        return events

    def finished_alone(self) -> dict:
        """A finished run's one event for a late reader: workflow_finished, its task_id the run's id."""
        return {
            "event": "workflow_finished",
            "task_id": self.id,
            "workflow_run_id": self.id,
            "data": self.finished["data"],
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
        await conn.start_stream(headers={"X-Accel-Buffering": "no", "X-Version": "1.14.2"})
        if self.ended and self.finished is not None:
            await conn.write_chunk(frame(self.finished_alone()))
            await conn.end_stream()
            return
        queue: asyncio.Queue = asyncio.Queue()
        self.readers.add(queue)  # subscribed before the snapshot is built: nothing falls between the two
        try:
            await conn.write_chunk(PING)
            if snapshot:
                for data in self.snapshot(form):
                    await conn.write_chunk(frame(data))
                    if data["event"] == "workflow_paused" and not continue_on_pause:
                        await conn.end_stream()
                        return
            await self._relay(conn, queue, snapshot, continue_on_pause, ping_interval, idle_timeout)
        finally:
            self.readers.discard(queue)

    async def _relay(self, conn, queue, snapshot, continue_on_pause, ping_interval, idle_timeout) -> None:
        """The live part: a ping after every quiet interval; closes at a terminal event (without
        continue_on_pause: workflow_finished or workflow_paused; with it and a snapshot: workflow_finished; with it
        alone: never), or after `idle_timeout` without an event."""
        quiet_since = time.monotonic()
        while True:
            try:
                data = await asyncio.wait_for(queue.get(), ping_interval)
            except TimeoutError:
                if time.monotonic() - quiet_since > idle_timeout:
                    break
                await conn.write_chunk(PING)
                continue
            quiet_since = time.monotonic()
            await conn.write_chunk(frame(data))
            kind = data["event"]
            if not continue_on_pause and kind in ("workflow_finished", "workflow_paused"):
                break
            if continue_on_pause and snapshot and kind == "workflow_finished":
                break
        with contextlib.suppress(ConnectionError, OSError):
            await conn.end_stream()
