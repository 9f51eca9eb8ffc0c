"""The recording proxy the real-Dify tier puts in front of Dify (demo/dify_recorder.py), against the stand-in: a
stream goes through whole, an aliased key reaches Dify as the real one, and the records read as the stand-in's."""

from __future__ import annotations

import httpx

from demo import dify_flows as flows
from demo.dify_recorder import DifyRecorder
from demo.dify_standin import DifyStandIn
from tests.conftest import wait_until
from tests.dify_captures import parse_sse


def test_the_recorder_passes_streams_through_and_records_them():
    dify = DifyStandIn(api_key="real-key", ping_interval=0.1).start()
    dify.serve_flow(flows.hitl_chatflow())
    recorder = DifyRecorder(dify.base_url).start()
    recorder.alias("alias", "real-key")
    headers = {"Authorization": "Bearer alias"}
    try:
        body = {"query": "q", "inputs": {}, "user": "u", "response_mode": "streaming"}
        reply = httpx.post(f"{recorder.base_url}/chat-messages", json=body, headers=headers, timeout=10)
        events = [e for e in parse_sse(reply.text) if e != "ping"]
        assert [e["event"] for e in events][-2:] == ["human_input_required", "workflow_paused"]
        run_id, token = events[-1]["workflow_run_id"], events[-1]["data"]["reasons"][0]["form_token"]
        answer = {"action": "approve", "inputs": {"comment": "c"}, "user": "u"}
        assert httpx.post(f"{recorder.base_url}/form/human_input/{token}", json=answer, headers=headers).json() == {}
        assert wait_until(lambda: dify.runs[run_id].ended)
        params = {"user": "u", "include_state_snapshot": "true"}
        finished = httpx.get(f"{recorder.base_url}/workflow/{run_id}/events", params=params, headers=headers)
        assert parse_sse(finished.text)[-1]["event"] == "workflow_finished"
        assert recorder.chat_requests() == [body]
        assert [(s["token"], s["status"]) for s in recorder.form_submissions] == [(token, 200)]
        [reattach] = recorder.reattaches
        assert (reattach["run_id"], reattach["include_state_snapshot"], reattach["continue_on_pause"]) == (
            run_id,
            True,
            False,
        )
        assert len(dify.form_submissions) == 1  # it reached Dify once, with the real key
    finally:
        recorder.stop()
        dify.stop()
