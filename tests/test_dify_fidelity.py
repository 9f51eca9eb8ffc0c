"""The Dify stand-in is faithful to a real Dify 1.14.2: driven through the cases whose streams and replies were
captured (tests/fixtures/dify-1.14.2, from the apps in its apps/ folder), it gives the same events, in the same
order, with the fields the gateway reads (tests/dify_captures.py says how they are compared). Where they differ,
the test fails and names the event and the field."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
import yaml

from demo import dify_flows as flows
from demo.dify_standin import DifyStandIn
from tests.dify_captures import FIXTURES, capture, differences, form_reply, parse_sse

USER = "u-1"
KEYS = {
    "hitl": flows.hitl_chatflow(),
    "hitl-b": flows.hitl_chatflow_b(),
    "hitl-wait": flows.hitl_chatflow(wait_seconds=0.6),
    "hitl-wf": flows.hitl_workflow(),
    "slow": flows.slow_chatflow(seconds=1.2),
    "plain": flows.PLAIN_CHATFLOW,
    "plain-wf": flows.PLAIN_WORKFLOW,
}


@pytest.fixture(scope="module")
def standin():
    server = DifyStandIn(ping_interval=0.15).start()
    for key, flow in KEYS.items():
        server.serve_flow(flow, key=f"app-{key}")
    yield server
    server.stop()


class Reader:
    """Reads one SSE response in a thread until it ends, or until `stop()` (a stream Dify never closes)."""

    def __init__(self, standin: DifyStandIn, key: str, method: str, path: str, **request):
        self.raw = b""
        self.status = 0
        self.closed = threading.Event()
        self._stop = threading.Event()
        self._opened = threading.Event()
        url = standin.base_url + path
        headers = {"Authorization": f"Bearer app-{key}"}
        self._thread = threading.Thread(target=self._read, args=(method, url, headers, request), daemon=True)
        self._thread.start()
        assert self._opened.wait(5), "the stream did not open"

    def _read(self, method, url, headers, request) -> None:
        with httpx.Client(timeout=10) as client, client.stream(method, url, headers=headers, **request) as response:
            self.status = response.status_code
            self._opened.set()
            for data in response.iter_raw():
                self.raw += data
                if self._stop.is_set():
                    break
        self.closed.set()

    def events(self, timeout: float = 10.0) -> list:
        """The events of a stream that closes by itself."""
        assert self.closed.wait(timeout), f"the stream did not close: {self.raw[-300:]!r}"
        return parse_sse(self.raw)

    def events_until(self, kind: str = "", then: float = 0.6, timeout: float = 10.0) -> list:
        """The events of a stream Dify keeps open: up to `then` seconds after `kind` came (or after now)."""
        deadline = time.monotonic() + timeout
        while kind and f'"{kind}"'.encode() not in self.raw:
            assert time.monotonic() < deadline, f"no {kind}: {self.raw[-300:]!r}"
            time.sleep(0.02)
        time.sleep(then)
        assert not self.closed.is_set(), f"Dify keeps this stream open; it closed: {self.raw[-300:]!r}"
        self.stop()
        return parse_sse(self.raw)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def chat(standin, key: str, query: str) -> Reader:
    body = {"query": query, "inputs": {}, "user": USER, "response_mode": "streaming"}
    return Reader(standin, key, "POST", "/chat-messages", json=body)


def events_of(standin, key: str, run_id: str, **flags) -> Reader:
    params = {"user": USER, **{name: "true" for name, on in flags.items() if on}}
    return Reader(standin, key, "GET", f"/workflow/{run_id}/events", params=params)


def call(standin, key: str, method: str, path: str, **request) -> httpx.Response:
    return httpx.request(method, standin.base_url + path, headers={"Authorization": f"Bearer app-{key}"}, **request)


def assert_faithful(name: str, got: list) -> None:
    found = differences(capture(name), got)
    assert not found, f"the stand-in differs from {name}:\n" + "\n".join(found)


def run_id_of(events: list) -> str:
    return next(e["workflow_run_id"] for e in events if isinstance(e, dict) and "workflow_run_id" in e)


def form_token_of(events: list) -> str:
    return next(e["data"]["form_token"] for e in events if isinstance(e, dict) and e["event"] == "human_input_required")


def submitted_replies() -> dict[str, tuple[int, dict]]:
    """05-submit-test.out: each refused POST (and the second one) as (status, body), by its heading."""
    replies, heading = {}, ""
    lines = (FIXTURES / "05-submit-test.out").read_text().splitlines()
    for number, line in enumerate(lines):
        if line.startswith("--- POST"):
            heading = line.strip("- ").rstrip(":")
        elif heading and line.startswith("{") and lines[number + 1].strip().startswith("HTTP"):
            replies[heading] = (int(lines[number + 1].split()[1]), json.loads(line))
            heading = ""
    return replies


def test_a_form_run_from_its_pause_to_its_end_is_as_captured(standin):
    """01-05: the chat stream ends at the pause; a plain re-attach only pings; a snapshot replays the past with
    the raw template; the form GET; the POST's refusals; a reader attached live (and one with the snapshot)
    before the submission get the resumption, its repeat of the answer and the rest; a finished run gives its
    workflow_finished alone; another user gets 404."""
    started = chat(standin, "hitl", "deploy v2 to prod").events()
    assert_faithful("01-chat-messages.sse", started)
    run_id, token = run_id_of(started), form_token_of(started)

    plain = events_of(standin, "hitl", run_id)
    assert_faithful("02-events-paused-plain.sse", plain.events_until(then=0.4))
    assert_faithful(
        "03-events-paused-snapshot.sse", events_of(standin, "hitl", run_id, include_state_snapshot=True).events()
    )

    form = call(standin, "hitl", "GET", f"/form/human_input/{token}")
    captured_form = form_reply()
    assert form.status_code == 200
    assert set(form.json()) == set(captured_form)
    for name in ("form_content", "inputs", "resolved_default_values", "user_actions"):
        assert form.json()[name] == captured_form[name], name

    live = events_of(standin, "hitl", run_id, continue_on_pause=True)
    replayed = events_of(standin, "hitl", run_id, include_state_snapshot=True, continue_on_pause=True)
    refusals = submitted_replies()
    path = f"/form/human_input/{token}"
    tries = {
        "POST without user": {"action": "approve", "inputs": {"comment": "x"}},
        "POST missing input": {"action": "approve", "inputs": {}, "user": USER},
        "POST bad action": {"action": "nope", "inputs": {"comment": "x"}, "user": USER},
    }
    for heading, body in tries.items():
        reply = call(standin, "hitl", "POST", path, json=body)
        status, expected = refusals[heading]
        assert (reply.status_code, reply.json()["code"], reply.json()["message"]) == (
            status,
            expected["code"],
            expected["message"],
        ), heading
    ok = call(standin, "hitl", "POST", path, json={"action": "approve", "inputs": {"comment": "ship it"}, "user": USER})
    assert (ok.status_code, ok.json()) == (200, {})

    assert_faithful("05-events-live-continue.sse", live.events_until("workflow_finished"))
    assert_faithful("05-events-snapshot-continue.sse", replayed.events())
    again = call(standin, "hitl", "POST", path, json={"action": "approve", "inputs": {"comment": "x"}, "user": USER})
    assert (again.status_code, again.json()["code"]) == (412, "human_input_form_submitted")
    assert call(standin, "hitl", "GET", path).status_code == 412
    assert_faithful("05-events-after-finish.sse", events_of(standin, "hitl", run_id).events())
    stranger = httpx.get(
        f"{standin.base_url}/workflow/{run_id}/events",
        params={"user": "someone-else"},
        headers={"Authorization": "Bearer app-hitl"},
    )
    assert (stranger.status_code, stranger.json()["message"]) == (404, "Workflow run not found")


def test_a_live_reader_of_a_paused_run_gets_only_pings_until_the_form_is_answered(standin):
    """05a: continue_on_pause without a snapshot, and nobody answers: pings, and the stream stays open."""
    run_id = run_id_of(chat(standin, "hitl", "deploy v2 to prod").events())
    live = events_of(standin, "hitl", run_id, continue_on_pause=True)
    assert_faithful("05a-events-live-continue-40s-no-submit.sse", live.events_until(then=0.5))


@pytest.mark.parametrize(
    ("key", "query", "comment", "chat_capture", "live_capture"),
    [
        ("hitl-wait", "bug 1", "c1", None, "09-wait-events-live-continue.sse"),
        ("hitl-b", "variant b", "ship it", "20-chat-messages.sse", "20-events-live-continue.sse"),
    ],
    ids=["answer-before-the-pause-and-a-wait-after", "nothing-answered-before-the-pause"],
)
def test_the_rest_after_a_form_is_as_captured(standin, key, query, comment, chat_capture, live_capture):
    """09: with an Answer before the pause, the rest is never streamed (Dify's bug), even across a slow node;
    20: without one, it streams as message chunks after the form's answer."""
    started = chat(standin, key, query).events()
    if chat_capture:
        assert_faithful(chat_capture, started)
    run_id, token = run_id_of(started), form_token_of(started)
    live = events_of(standin, key, run_id, continue_on_pause=True)
    body = {"action": "approve", "inputs": {"comment": comment}, "user": USER}
    assert call(standin, key, "POST", f"/form/human_input/{token}", json=body).status_code == 200
    assert_faithful(live_capture, live.events_until("workflow_finished"))


def test_a_workflow_app_form_is_as_captured(standin):
    """40: a workflow app pauses at its form; after the answer its End's outputs stream as text chunks."""
    body = {"inputs": {"req": "rotate keys"}, "user": USER, "response_mode": "streaming"}
    started = Reader(standin, "hitl-wf", "POST", "/workflows/run", json=body).events()
    assert_faithful("40-workflows-run.sse", started)
    run_id, token = run_id_of(started), form_token_of(started)
    live = events_of(standin, "hitl-wf", run_id, continue_on_pause=True)
    replayed = events_of(standin, "hitl-wf", run_id, include_state_snapshot=True, continue_on_pause=True)
    answer = {"action": "approve", "inputs": {"comment": "ship it"}, "user": USER}
    assert call(standin, "hitl-wf", "POST", f"/form/human_input/{token}", json=answer).status_code == 200
    assert_faithful("40-events-live-continue.sse", live.events_until("workflow_finished"))
    assert_faithful("40-events-snapshot-continue.sse", replayed.events())


def test_a_run_re_attached_mid_run_is_as_captured(standin):
    """70-72: a reader that attaches while an HTTP node waits gets only what comes next; with the snapshot, one
    message_replace of "" first (nothing is saved mid-run)."""
    first = chat(standin, "slow", "mid-run")
    deadline = time.monotonic() + 5
    while b'"slowhttp"' not in first.raw:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    run_id = run_id_of(parse_sse(first.raw))
    time.sleep(0.2)  # a ping goes out while the node waits
    live = events_of(standin, "slow", run_id)
    replayed = events_of(standin, "slow", run_id, include_state_snapshot=True)
    assert_faithful("70-slow-chat-messages.sse", first.events())
    assert_faithful("71-slow-events-live-midrun.sse", live.events())
    assert_faithful("72-slow-events-snapshot-midrun.sse", replayed.events())


def test_plain_apps_are_as_captured(standin):
    """80, 81: a chatflow's answer (message_end, then workflow_finished), a workflow's outputs as text chunks."""
    assert_faithful("80-plain-chatflow-chat-messages.sse", chat(standin, "plain", "kit test").events())
    body = {"inputs": {"query": "kit wf"}, "user": USER, "response_mode": "streaming"}
    run = Reader(standin, "plain-wf", "POST", "/workflows/run", json=body)
    assert_faithful("81-plain-workflow-workflows-run.sse", run.events())


def test_the_comparison_names_what_differs():
    """The checker itself: a stand-in that tagged message events with the run id, or stopped before
    workflow_finished, is caught and the field named."""
    captured = capture("80-plain-chatflow-chat-messages.sse")
    tagged = [dict(e, workflow_run_id="x") if isinstance(e, dict) and e["event"] == "message" else e for e in captured]
    assert any("extra ['workflow_run_id']" in line for line in differences(captured, tagged))
    assert differences(captured, captured[:-1])[0].startswith("event kinds differ")
    replaced = [dict(e, answer="") if isinstance(e, dict) and e["event"] == "message" else e for e in captured]
    assert any("answer is ''" in line for line in differences(captured, replaced))


@pytest.mark.parametrize("flow", [flows.FILE_WORKFLOW, flows.PICTURE_CHATFLOW], ids=lambda flow: flow.name)
def test_our_own_apps_are_the_graphs_their_dsl_files_describe(flow):
    """The apps of ours that no capture covers (files into inputs, a link in an Answer's text) are the same graph in
    the stand-in as in the DSL a real Dify imports: the Start variables `/parameters` lists, and each Answer's
    template or End output (an End names a variable by selector, the stand-in by template)."""
    dsl = yaml.safe_load((FIXTURES / "apps" / f"{flow.name}.yml").read_text())
    assert dsl["app"]["mode"] == flow.mode
    nodes = {node["id"]: node["data"] for node in dsl["workflow"]["graph"]["nodes"]}
    wanted = ("variable", "type", "required", "allowed_file_types", "max_length")
    declared = [{name: spec[name] for name in wanted} for spec in nodes["start"]["variables"]]
    assert declared == [{name: spec[name] for name in wanted} for item in flow.start_inputs for spec in item.values()]
    for node in flow.nodes:
        if isinstance(node, flows.Answer):
            assert nodes[node.id]["answer"] == node.text
        else:
            selected = [(o["variable"], ".".join(o["value_selector"])) for o in nodes[node.id]["outputs"]]
            assert [(name, "{{#" + selector + "#}}") for name, selector in selected] == list(node.outputs)
