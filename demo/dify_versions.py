"""The Dify versions the stand-in can play (`DIFY_STANDIN_VERSION`, `1.14` or `1.16`): what changed between them in
the behaviour a gateway meets, each measured on a real server and kept as captures (tests/fixtures/dify-1.14.2 and
tests/fixtures/dify-1.16.0; docs/protocol.md, "Dify versions").

Each field names one difference. The stand-in's run (demo/dify_runs.py) and its form API (demo/dify_standin.py)
ask these instead of a version number, so a test can also switch one behaviour on its own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

ENV_VARIABLE = "DIFY_STANDIN_VERSION"


@dataclass(frozen=True)
class DifyVersion:
    name: str  # what Dify sends as X-Version
    # A run resumed after a form streams the answer it gave before the pause again (1.14.2).
    repeats_answer_on_resume: bool
    # Dify #38432/#38525: after a pause that followed streamed text, the answers after the resumption are never
    # streamed as `message` events, only held in the outputs (1.14.2; fixed in 1.16.0).
    answer_bug: bool
    # `human_input_form_filled` is sent when a form is answered (1.14.2; gone in 1.16.0).
    form_filled_event: bool
    # A snapshot's `human_input_required` carries the form's raw template (1.14.2); 1.16.0 renders it.
    raw_template_in_snapshot: bool
    # `human_input_required.data` and `workflow_paused.data.reasons[]` name `approval_channels` (1.16.0).
    approval_channels: bool
    # `message_end.metadata` has `reasoning` (1.16.0).
    reasoning_metadata: bool
    # Any subscriber of a run that closes cuts every plain (no snapshot) listener of that run: its chunked body
    # ends without the last chunk (1.16.0, Dify's `__closed__` signal on the run's shared channel).
    closing_cuts_plain_listeners: bool
    # Once a run's first reader went away mid-run, its later listeners get its text events but never its other
    # events: no node_finished, message_end or workflow_finished, although the run ends (1.16.0, captures 90-92).
    orphan_relays_only_text: bool
    # A resumed workflow app ends `stopped` (error "Stopped by user.", no outputs, no End node events) after it
    # streamed its End's outputs; Dify's record of the run keeps them (1.16.0, a regression).
    resumed_workflow_stops: bool
    # Such a run's events reach only listeners that subscribed a moment (NEW_LISTENER_LAG) before it resumed: a
    # listener attached just before the form's submission, as a gateway's is, gets pings alone; and its record keeps
    # the outputs only a moment (RECORD_LAG) after the end, `outputs: {}` before (1.16.0: a gateway run against a
    # real server showed the first output alone, or only the stop note, where the record then held the whole answer;
    # the mechanism on Dify's side was not traced).
    resumed_workflow_outruns_listeners: bool


V1_14 = DifyVersion(
    name="1.14.2",
    repeats_answer_on_resume=True,
    answer_bug=True,
    form_filled_event=True,
    raw_template_in_snapshot=True,
    approval_channels=False,
    reasoning_metadata=False,
    closing_cuts_plain_listeners=False,
    orphan_relays_only_text=False,
    resumed_workflow_stops=False,
    resumed_workflow_outruns_listeners=False,
)
V1_16 = DifyVersion(
    name="1.16.0",
    repeats_answer_on_resume=False,
    answer_bug=False,
    form_filled_event=False,
    raw_template_in_snapshot=False,
    approval_channels=True,
    reasoning_metadata=True,
    closing_cuts_plain_listeners=True,
    orphan_relays_only_text=True,
    resumed_workflow_stops=True,
    resumed_workflow_outruns_listeners=True,
)
VERSIONS = {"1.14": V1_14, "1.16": V1_16}


def standin_version(name: str | None = None) -> DifyVersion:
    """The version called `name` (`1.14`, `1.16`, or a full `1.16.0`), else the one `DIFY_STANDIN_VERSION` names,
    else 1.14.

    Raises:
        ValueError: a version the stand-in cannot play.
    """
    wanted = (name or os.environ.get(ENV_VARIABLE) or "1.14").strip()
    short = ".".join(wanted.split(".")[:2])
    if short not in VERSIONS:
        raise ValueError(f"{ENV_VARIABLE}={wanted!r}: the Dify stand-in plays {' or '.join(VERSIONS)}")
    return VERSIONS[short]
