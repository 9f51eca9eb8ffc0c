"""The streams and replies of a real Dify 1.14.2 and 1.16.0, as captured (tests/fixtures/dify-1.14.2 and
dify-1.16.0), and the comparison of a stream with one of them: the same events in the same order, with the fields
the gateway reads. Used by the fidelity test (the stand-in against the captures, per version) and by the tier
against a running real Dify."""

from __future__ import annotations

import json
import re
from pathlib import Path

FIXTURE_DIRS = {
    "1.14": Path(__file__).parent / "fixtures" / "dify-1.14.2",
    "1.16": Path(__file__).parent / "fixtures" / "dify-1.16.0",
}
FIXTURES = FIXTURE_DIRS["1.14"]
PING = "ping"
_STAMP = re.compile(r"^\d+\.\d+ ", re.MULTILINE)

# The body fields compared event by event (their values, or for the *_KEYS events the set of names).
_DATA_VALUES = {
    "workflow_started": ("reason",),
    "node_started": ("node_id", "node_type", "title"),
    "node_finished": ("node_id", "node_type", "title", "status"),
    "human_input_required": ("form_content", "inputs", "actions", "node_id", "node_title", "resolved_default_values"),
    "human_input_form_filled": ("node_id", "action_id", "submitted_data", "rendered_content"),
    "workflow_paused": ("paused_nodes", "outputs", "status"),
    "workflow_finished": ("status", "outputs"),
    "text_chunk": ("text",),
}
_DATA_KEYS = frozenset(
    {"workflow_started", "human_input_required", "human_input_form_filled", "workflow_paused", "workflow_finished"}
)
_TOP_VALUES = ("answer", "reason")


def parse_sse(raw: bytes | str) -> list[dict | str]:
    """A stream's events: `PING` for each keep-alive, the JSON object of each data frame. A capture that stamps each
    line with its arrival time (90-92) holds one event a line, without the blank line between them."""
    text = raw.decode() if isinstance(raw, bytes) else raw
    if _STAMP.match(text):
        text = "\n\n".join(_STAMP.sub("", text).splitlines())
    events: list[dict | str] = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        lines = [line for line in block.split("\n") if line]
        if not lines:
            continue
        if lines[0].startswith("event: ping"):
            events.append(PING)
            continue
        data = "".join(line[5:].lstrip() for line in lines if line.startswith("data:"))
        if data:
            events.append(json.loads(data))
    return events


def capture(name: str, version: str = "1.14") -> list[dict | str]:
    return parse_sse((FIXTURE_DIRS[version] / name).read_bytes())


def form_reply(name: str = "04-form-get.json", version: str = "1.14") -> dict:
    """A captured JSON reply (the file ends with the status line after the body)."""
    return json.loads((FIXTURE_DIRS[version] / name).read_text().split("\nHTTP ", 1)[0])


def captured_replies(name: str, version: str = "1.14") -> list[tuple[str, int, dict]]:
    """The replies a `.out` capture holds, in order: (the heading before it, or "", the status, the JSON body)."""
    replies, heading = [], ""
    lines = (FIXTURE_DIRS[version] / name).read_text().splitlines()
    for number, line in enumerate(lines):
        if line.startswith("---"):
            heading = line.strip("- ").rstrip(":")
        elif line.startswith("{"):
            status = next((rest for rest in lines[number + 1 :] if rest.strip()), "").split()
            if status and status[0] == "HTTP":
                replies.append((heading, int(status[1]), json.loads(line)))
                heading = ""
    return replies


def _without_clocked_pings(events: list[dict | str]) -> list[dict | str]:
    """Pings after the first event come by the clock (every 10 s on Dify, much faster on the stand-in in tests),
    so where they fall says nothing; a ping at once, before anything else, does (a reader is subscribed)."""
    return events[:1] + [item for item in events[1:] if item != PING]


def _kind(item: dict | str) -> str:
    return PING if item == PING else str(item.get("event"))


def differences(captured: list[dict | str], got: list[dict | str]) -> list[str]:
    """How `got` differs from the captured stream, each difference naming the event and the field; [] when it
    has the same events in the same order with the fields the gateway reads. Ids are compared by where they are
    (workflow_run_id on the same events), never by value."""
    captured, got = _without_clocked_pings(captured), _without_clocked_pings(got)
    kinds = [_kind(e) for e in captured], [_kind(e) for e in got]
    if kinds[0] != kinds[1]:
        return [f"event kinds differ:\n  captured: {kinds[0]}\n  got:      {kinds[1]}"]
    found: list[str] = []
    for index, (want, have) in enumerate(zip(captured, got, strict=True)):
        if want == PING:
            continue
        where = f"event {index} ({want['event']})"
        missing, extra = set(want) - set(have), set(have) - set(want)
        if missing or extra:
            found.append(f"{where}: fields missing {sorted(missing)}, extra {sorted(extra)}")
        for name in _TOP_VALUES:
            if want.get(name) != have.get(name):
                found.append(f"{where}: {name} is {have.get(name)!r}, captured {want.get(name)!r}")
        found += _data_differences(where, want, have)
    return found


def _data_differences(where: str, want: dict, have: dict) -> list[str]:
    kind = want["event"]
    want_data, have_data = want.get("data") or {}, have.get("data") or {}
    if not isinstance(want_data, dict):
        return []
    found = []
    if kind in _DATA_KEYS and set(want_data) != set(have_data):
        missing, extra = sorted(set(want_data) - set(have_data)), sorted(set(have_data) - set(want_data))
        found.append(f"{where}: data fields missing {missing}, extra {extra}")
    for name in _DATA_VALUES.get(kind, ()):
        if want_data.get(name) != have_data.get(name):
            found.append(f"{where}: data.{name} is {have_data.get(name)!r}, captured {want_data.get(name)!r}")
    return found
