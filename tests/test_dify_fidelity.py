"""The Dify stand-in is faithful to a real Dify, in each version it plays (1.14.2 and 1.16.0): driven through the
cases whose streams and replies were captured (tests/fixtures/dify-1.14.2 and dify-1.16.0, from the apps in their
apps/ folders), it gives the same events, in the same order, with the fields the gateway reads
(tests/dify_captures.py says how they are compared), and cuts or keeps open the streams Dify cuts or keeps open.
Where they differ, the test fails and names the event and the field."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
import yaml

from demo import dify_flows as flows
from demo.dify_runs import NEW_LISTENER_LAG, RECORD_LAG
from demo.dify_standin import DifyStandIn
from tests.conftest import wait_until
from tests.dify_captures import FIXTURE_DIRS, capture, captured_replies, differences, form_reply, parse_sse

USER = "u-1"
KEYS = {
    "hitl": flows.hitl_chatflow(),
    "hitl-b": flows.hitl_chatflow_b(),
    "hitl-wait": flows.hitl_chatflow(wait_seconds=0.6),
    "hitl-wf": flows.hitl_workflow(),
    "slow": flows.slow_chatflow(seconds=1.2),
    "plain": flows.PLAIN_CHATFLOW,
    "plain-wf": flows.PLAIN_WORKFLOW,
    "select-file": flows.hitl_select_file(),
}


@pytest.fixture(scope="module", params=["1.14", "1.16"], ids=["dify-1.14.2", "dify-1.16.0"])
def standin(request):
    server = DifyStandIn(ping_interval=0.15, version=request.param).start()
    for key, flow in KEYS.items():
        server.serve_flow(flow, key=f"app-{key}")
    server.short_version = request.param
    yield server
    server.stop()


class Reader:
    """Reads one SSE response in a thread until it ends, or until `stop()` (a stream Dify never closes); `cut` when
    it ended without its last chunk (Dify dropped the connection)."""

    def __init__(self, standin: DifyStandIn, key: str, method: str, path: str, **request):
        self.raw = b""
        self.status = 0
        self.cut = False
        self.closed = threading.Event()
        self._stop = threading.Event()
        self._opened = threading.Event()
        self._client = httpx.Client(timeout=10)
        url = standin.base_url + path
        headers = {"Authorization": f"Bearer app-{key}"}
        self._thread = threading.Thread(target=self._read, args=(method, url, headers, request), daemon=True)
        self._thread.start()
        assert self._opened.wait(5), "the stream did not open"

    def _read(self, method, url, headers, request) -> None:
        try:
            with self._client.stream(method, url, headers=headers, **request) as response:
                self.status = response.status_code
                self._opened.set()
                for data in response.iter_raw():
                    self.raw += data
                    if self._stop.is_set():
                        break
        except (httpx.RemoteProtocolError, httpx.ReadError):
            self.cut = True
        finally:
            self.closed.set()

    def events(self, timeout: float = 10.0) -> list:
        """The events of a stream that closes by itself (whole)."""
        assert self.closed.wait(timeout), f"the stream did not close: {self.raw[-300:]!r}"
        assert not self.cut, f"the stream was cut: {self.raw[-300:]!r}"
        return parse_sse(self.raw)

    def events_until(self, kind: str = "", then: float = 0.6, timeout: float = 10.0) -> list:
        """The events of a stream Dify keeps open: up to `then` seconds after `kind` came (or after now)."""
        self.wait_for(kind, timeout)
        time.sleep(then)
        assert not self.closed.is_set(), f"Dify keeps this stream open; it closed: {self.raw[-300:]!r}"
        self.stop()
        return parse_sse(self.raw)

    def events_until_cut(self, timeout: float = 10.0) -> list:
        """The events of a stream Dify cuts (1.16.0: another subscriber of the run closed), which must end with no
        last chunk."""
        assert self.closed.wait(timeout), f"the stream was not cut: {self.raw[-300:]!r}"
        assert self.cut, f"the stream closed cleanly, Dify cuts it: {self.raw[-300:]!r}"
        return parse_sse(self.raw)

    def wait_for(self, kind: str, timeout: float = 10.0) -> None:
        """Wait until the stream brought `kind`: an event's name, or any text of a JSON string's end."""
        deadline = time.monotonic() + timeout
        while kind and f'{kind}"'.encode() not in self.raw:
            assert time.monotonic() < deadline, f"no {kind}: {self.raw[-300:]!r}"
            time.sleep(0.02)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._client.close()

    def drop(self) -> None:
        """Go away mid-stream, as a killed replica does: the connection closes at once."""
        self._client.close()
        self._stop.set()


def chat(standin, key: str, query: str) -> Reader:
    body = {"query": query, "inputs": {}, "user": USER, "response_mode": "streaming"}
    return Reader(standin, key, "POST", "/chat-messages", json=body)


def events_of(standin, key: str, run_id: str, **flags) -> Reader:
    params = {"user": USER, **{name: "true" for name, on in flags.items() if on}}
    return Reader(standin, key, "GET", f"/workflow/{run_id}/events", params=params)


def call(standin, key: str, method: str, path: str, **request) -> httpx.Response:
    return httpx.request(method, standin.base_url + path, headers={"Authorization": f"Bearer app-{key}"}, **request)


def assert_faithful(standin, name: str, got: list) -> None:
    found = differences(capture(name, standin.short_version), got)
    assert not found, f"the stand-in differs from {name} (Dify {standin.short_version}):\n" + "\n".join(found)


def captured(standin, name: str) -> bool:
    return (FIXTURE_DIRS[standin.short_version] / name).exists()


def plays_1_16(standin) -> bool:
    return standin.short_version == "1.16"


def run_id_of(events: list) -> str:
    return next(e["workflow_run_id"] for e in events if isinstance(e, dict) and "workflow_run_id" in e)


def form_token_of(events: list) -> str:
    return next(e["data"]["form_token"] for e in events if isinstance(e, dict) and e["event"] == "human_input_required")


def live_rest(standin, live: Reader) -> list:
    """The events a plain `continue_on_pause` listener got, to the run's end: Dify 1.14.2 keeps it open after
    `workflow_finished`; 1.16.0 cuts it there when another subscriber (the snapshot listener) closes."""
    if plays_1_16(standin):
        return live.events_until_cut()
    return live.events_until("workflow_finished")


def test_a_form_run_from_its_pause_to_its_end_is_as_captured(standin):
    """01-05: the chat stream ends at the pause; a plain re-attach only pings; a snapshot replays the past (with the
    raw template on 1.14.2, rendered on 1.16.0); the form GET; the POST's refusals; a reader attached live (and one
    with the snapshot) before the submission get the resumption, (1.14.2) its repeat of the answer, and the rest;
    on 1.16.0 the live one is cut when the snapshot one closes; a finished run gives its workflow_finished alone;
    another user gets 404."""
    started = chat(standin, "hitl", "deploy v2 to prod").events()
    assert_faithful(standin, "01-chat-messages.sse", started)
    run_id, token = run_id_of(started), form_token_of(started)

    plain = events_of(standin, "hitl", run_id)
    assert_faithful(standin, "02-events-paused-plain.sse", plain.events_until(then=0.4))
    snapshot = events_of(standin, "hitl", run_id, include_state_snapshot=True)
    assert_faithful(standin, "03-events-paused-snapshot.sse", snapshot.events())

    form = call(standin, "hitl", "GET", f"/form/human_input/{token}")
    captured_form = form_reply(version=standin.short_version)
    assert form.status_code == 200
    assert set(form.json()) == set(captured_form)
    for name in ("form_content", "inputs", "resolved_default_values", "user_actions"):
        assert form.json()[name] == captured_form[name], name

    live = events_of(standin, "hitl", run_id, continue_on_pause=True)
    replayed = events_of(standin, "hitl", run_id, include_state_snapshot=True, continue_on_pause=True)
    refusals = {heading: (status, body) for heading, status, body in captured_replies("05-submit-test.out")}
    path = f"/form/human_input/{token}"
    tries = {
        "POST without user": {"action": "approve", "inputs": {"comment": "x"}},
        "POST missing input": {"action": "approve", "inputs": {}, "user": USER},
        "POST bad action": {"action": "nope", "inputs": {"comment": "x"}, "user": USER},
    }
    for heading, body in tries.items():
        reply = call(standin, "hitl", "POST", path, json=body)
        status, expected = refusals[heading]
        got = (reply.status_code, reply.json()["code"], reply.json()["message"])
        assert got == (status, expected["code"], expected["message"]), heading
    ok = call(standin, "hitl", "POST", path, json={"action": "approve", "inputs": {"comment": "ship it"}, "user": USER})
    assert (ok.status_code, ok.json()) == (200, {})

    assert_faithful(standin, "05-events-snapshot-continue.sse", replayed.events())
    assert_faithful(standin, "05-events-live-continue.sse", live_rest(standin, live))
    again = call(standin, "hitl", "POST", path, json={"action": "approve", "inputs": {"comment": "x"}, "user": USER})
    assert (again.status_code, again.json()["code"]) == (412, "human_input_form_submitted")
    assert call(standin, "hitl", "GET", path).status_code == 412
    assert_faithful(standin, "05-events-after-finish.sse", events_of(standin, "hitl", run_id).events())
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
    assert_faithful(standin, "05a-events-live-continue-40s-no-submit.sse", live.events_until(then=0.5))


@pytest.mark.parametrize(
    ("key", "query", "comment", "capture_prefix"),
    [("hitl-wait", "bug 1", "c1", "09-wait"), ("hitl-b", "variant b", "ship it", "20")],
    ids=["answer-before-the-pause-and-a-wait-after", "nothing-answered-before-the-pause"],
)
def test_the_rest_after_a_form_is_as_captured(standin, key, query, comment, capture_prefix):
    """09: with an Answer before the pause, the rest is never streamed on 1.14.2 (Dify's bug), even across a slow
    node, and streams on 1.16.0; 20: without one, it streams as message chunks after the form's answer. Where the
    version's captures have it, a snapshot listener too (whose close, on 1.16.0, cuts the live one)."""
    started = chat(standin, key, query).events()
    if captured(standin, f"{capture_prefix}-chat-messages.sse"):
        assert_faithful(standin, f"{capture_prefix}-chat-messages.sse", started)
    run_id, token = run_id_of(started), form_token_of(started)
    live = events_of(standin, key, run_id, continue_on_pause=True)
    replayed = None
    if captured(standin, f"{capture_prefix}-events-snapshot-continue.sse"):
        replayed = events_of(standin, key, run_id, include_state_snapshot=True, continue_on_pause=True)
    if captured(standin, f"{capture_prefix}-form-get.json"):
        form = call(standin, key, "GET", f"/form/human_input/{token}").json()
        assert form == {
            **form_reply(f"{capture_prefix}-form-get.json", standin.short_version),
            "expiration_time": form["expiration_time"],
        }
    body = {"action": "approve", "inputs": {"comment": comment}, "user": USER}
    assert call(standin, key, "POST", f"/form/human_input/{token}", json=body).status_code == 200
    if replayed is None:
        assert_faithful(standin, f"{capture_prefix}-events-live-continue.sse", live.events_until("workflow_finished"))
        return
    assert_faithful(standin, f"{capture_prefix}-events-snapshot-continue.sse", replayed.events())
    assert_faithful(standin, f"{capture_prefix}-events-live-continue.sse", live_rest(standin, live))


def test_a_workflow_app_form_is_as_captured(standin):
    """40: a workflow app pauses at its form; after the answer its End's outputs stream as text chunks, and the run
    ends succeeded (1.14.2) or, with no End node events and no outputs, `stopped` (1.16.0's regression), while
    Dify's record and a later re-attach keep the outputs."""
    body = {"inputs": {"req": "rotate keys"}, "user": USER, "response_mode": "streaming"}
    started = Reader(standin, "hitl-wf", "POST", "/workflows/run", json=body).events()
    assert_faithful(standin, "40-workflows-run.sse", started)
    run_id, token = run_id_of(started), form_token_of(started)
    live = events_of(standin, "hitl-wf", run_id, continue_on_pause=True)
    replayed = events_of(standin, "hitl-wf", run_id, include_state_snapshot=True, continue_on_pause=True)
    replayed.wait_for("workflow_paused")
    assert wait_until(lambda: b"ping" in live.raw)  # both subscribed
    time.sleep(NEW_LISTENER_LAG)  # the capture's listeners subscribed seconds before the form's answer
    answer = {"action": "approve", "inputs": {"comment": "ship it"}, "user": USER}
    assert call(standin, "hitl-wf", "POST", f"/form/human_input/{token}", json=answer).status_code == 200
    assert_faithful(standin, "40-events-snapshot-continue.sse", replayed.events())
    assert_faithful(standin, "40-events-live-continue.sse", live_rest(standin, live))
    status = "stopped" if plays_1_16(standin) else "succeeded"
    if plays_1_16(standin):  # its record has the outputs a moment after the end only
        assert call(standin, "hitl-wf", "GET", f"/workflows/run/{run_id}").json()["outputs"] == {}
        time.sleep(RECORD_LAG)
    record = call(standin, "hitl-wf", "GET", f"/workflows/run/{run_id}").json()
    assert (record["status"], record["outputs"]) == (status, {"action": "approve", "comment": "ship it"})
    [finished] = events_of(standin, "hitl-wf", run_id).events()
    assert (finished["data"]["status"], finished["data"]["outputs"]) == (status, record["outputs"])


def test_a_run_re_attached_mid_run_is_as_captured(standin):
    """70-72: a reader that attaches while an HTTP node waits gets only what comes next; with the snapshot, one
    message_replace of "" first (nothing is saved mid-run)."""
    first = chat(standin, "slow", "mid-run")
    first.wait_for("slowhttp", timeout=5)
    run_id = run_id_of(parse_sse(first.raw))
    time.sleep(0.2)  # a ping goes out while the node waits
    live = events_of(standin, "slow", run_id)
    replayed = events_of(standin, "slow", run_id, include_state_snapshot=True)
    assert_faithful(standin, "70-slow-chat-messages.sse", first.events())
    assert_faithful(standin, "71-slow-events-live-midrun.sse", live.events())
    assert_faithful(standin, "72-slow-events-snapshot-midrun.sse", replayed.events())


def test_plain_apps_are_as_captured(standin):
    """80, 81: a chatflow's answer (message_end, then workflow_finished), a workflow's outputs as text chunks."""
    assert_faithful(standin, "80-plain-chatflow-chat-messages.sse", chat(standin, "plain", "kit test").events())
    body = {"inputs": {"query": "kit wf"}, "user": USER, "response_mode": "streaming"}
    run = Reader(standin, "plain-wf", "POST", "/workflows/run", json=body)
    assert_faithful(standin, "81-plain-workflow-workflows-run.sse", run.events())


def test_a_run_whose_first_reader_went_away_is_as_captured(standin):
    """90-92: the first reader goes away mid-run (its replica killed); a snapshot re-attach then gets the past and
    the rest's text, and on 1.16.0 only pings after it (no message_end, no workflow_finished), on 1.14.2 the run's
    end; a re-attach after the end gives workflow_finished alone, and Dify's record says the run succeeded."""
    first = chat(standin, "slow", "slowkill")
    first.wait_for("slowhttp", timeout=5)
    first.drop()
    time.sleep(0.5)  # the other replica re-attaches once the lease ran out (2 s later in the capture)
    if plays_1_16(standin):
        assert_faithful(standin, "90-killed-owner-chat.sse", parse_sse(first.raw))
    run_id = run_id_of(parse_sse(first.raw))
    again = events_of(standin, "slow", run_id, include_state_snapshot=True)
    whole = "part one (slowkill). SLEPT (part two)"
    if plays_1_16(standin):
        assert_faithful(standin, "91-snapshot-after-owner-gone.sse", again.events_until("(part two)", then=0.6))
    else:
        assert [e if e == "ping" else e["event"] for e in again.events()][-2:] == ["message_end", "workflow_finished"]
    record = call(standin, "slow", "GET", f"/workflows/run/{run_id}").json()
    assert (record["status"], record["outputs"]["answer"]) == ("succeeded", whole)
    finished = events_of(standin, "slow", run_id, include_state_snapshot=True).events()
    if plays_1_16(standin):
        assert_faithful(standin, "92-snapshot-after-finish.sse", finished)
    assert [e["data"]["outputs"]["answer"] for e in finished] == [whole]


def test_a_form_with_a_select_and_a_file_is_as_captured(standin):
    """60-64 (Dify 1.15+ forms; the stand-in serves them on either version): the pause names a select's constant
    options and a file's allowed types; the form GET gives them; an upload by the run's user; a submission with an
    option not offered, then without the file, refused as Dify refuses them; then taken, and the run goes on with
    the option's text and the file's name."""
    started = chat(standin, "select-file", "ship v3").events()
    assert_faithful(standin, "60-select-file-chat-messages.sse", started) if plays_1_16(standin) else None
    run_id, token = run_id_of(started), form_token_of(started)
    form = call(standin, "select-file", "GET", f"/form/human_input/{token}").json()
    captured_form = form_reply("61-select-file-form-get.json", "1.16")
    assert {**form, "expiration_time": 0} == {**captured_form, "expiration_time": 0}
    upload = call(
        standin,
        "select-file",
        "POST",
        "/files/upload",
        files={"file": ("notes.pdf", b"%PDF-1.4 stand-in notes", "application/pdf")},
        data={"user": USER},
    )
    assert upload.status_code == 201 and set(upload.json()) == set(form_reply("62-files-upload.json", "1.16"))
    replayed = events_of(standin, "select-file", run_id, include_state_snapshot=True, continue_on_pause=True)
    doc = {"type": "document", "transfer_method": "local_file", "upload_file_id": upload.json()["id"]}
    tries = [
        {"env": "moon", "doc": doc, "comment": "go"},
        {"env": "staging", "comment": "go"},
        {"env": "staging", "doc": doc, "comment": "go"},
    ]
    path = f"/form/human_input/{token}"
    for inputs, (_, status, expected) in zip(
        tries, captured_replies("63-select-file-form-post.out", "1.16"), strict=True
    ):
        reply = call(standin, "select-file", "POST", path, json={"action": "approve", "inputs": inputs, "user": USER})
        assert (reply.status_code, reply.json()) == (status, expected)
    if plays_1_16(standin):
        assert_faithful(standin, "64-select-file-events-snapshot-continue.sse", replayed.events())
    else:
        assert "AFTER-RESUME" in str(replayed.events())


def test_a_form_only_difys_own_channels_deliver_is_not_found(standin):
    """A form Dify delivers only through its own channels (e-mail, its web app): the Service API answers 404."""
    standin.serve_flow(flows.hitl_select_file(service_api=False), key="app-elsewhere")
    try:
        token = form_token_of(chat(standin, "elsewhere", "ship v4").events())
        reply = call(standin, "elsewhere", "GET", f"/form/human_input/{token}")
        assert (reply.status_code, reply.json()["code"]) == (404, "not_found")
    finally:
        standin.flows.pop("app-elsewhere", None)


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
    dsl = yaml.safe_load((FIXTURE_DIRS["1.14"] / "apps" / f"{flow.name}.yml").read_text())
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
