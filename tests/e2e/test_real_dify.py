"""The optional tier: the cases of tests/e2e/test_dify_runs_e2e.py against a running real Dify, of any version,
instead of the stand-in (docs/protocol.md, "Dify versions"). Import the apps of tests/fixtures/dify-1.14.2/apps into
any Dify ≥ 1.14.2 (console, "Import DSL"; publish each and make it an API key), and on Dify ≥ 1.15 also
tests/fixtures/dify-1.16.0/apps/hitl-select-file.yml, then set:

    DIFY_REAL_URL                  its Service API, e.g. http://127.0.0.1:5001/v1
    DIFY_REAL_KEY_PLAIN_CHATFLOW   the keys of plain-chatflow.yml, hitl-chatflow.yml, slow-chatflow.yml,
    DIFY_REAL_KEY_HITL_CHATFLOW    file-workflow.yml and picture-chatflow.yml
    DIFY_REAL_KEY_SLOW_CHATFLOW
    DIFY_REAL_KEY_FILE_WORKFLOW
    DIFY_REAL_KEY_PICTURE_CHATFLOW
    DIFY_REAL_KEY_HITL_WORKFLOW    optional: hitl-workflow.yml (a workflow app's form)
    DIFY_REAL_KEY_HITL_SELECT_FILE optional: hitl-select-file.yml (Dify ≥ 1.15: a select and a file in a form)
    DIFY_REAL_FILES_URL            optional: Dify's FILES_URL, when it is set (its links to its files are then
                                   absolute, and the picture's absolute case runs; else the relative one)
    DIFY_REAL_SLOW_PORT            where this tier answers slow-chatflow's HTTP node (default 18769: the DSL's
                                   SLOW_URL default is http://127.0.0.1:18769/slow, so Dify must reach this host)

The gateway's replicas talk to Dify through a recording proxy (demo/dify_recorder.py), so the cases read the same
records as on the stand-in: one chat call per message, one submission per answered form, one upload per file given,
how runs were followed. The Dify version is the one its replies name (`X-Version`): the cases' assertions that
belong to a measured version (1.14.2, 1.16.0) hold for it, and none for another. Without DIFY_REAL_URL the tier is
skipped with one line.
"""

from __future__ import annotations

import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

URL = os.environ.get("DIFY_REAL_URL", "")
APPS = ("plain-chatflow", "hitl-chatflow", "slow-chatflow", "file-workflow", "picture-chatflow")
OPTIONAL = {  # a case that needs an app the operator may not have imported: skipped without its key
    "test_a_workflow_apps_form_ends_whole": "hitl-workflow",
    "test_a_select_and_a_file_after_the_cards_replica_is_killed": "hitl-select-file",
}


def key_variable(app: str) -> str:
    return f"DIFY_REAL_KEY_{app.upper().replace('-', '_')}"


MISSING = [key_variable(app) for app in APPS if not os.environ.get(key_variable(app))]
if not URL or MISSING:
    pytest.skip(
        f"no real Dify to test against: set DIFY_REAL_URL and {', '.join(MISSING) or 'the app keys'} "
        "(docs/protocol.md, Dify versions)",
        allow_module_level=True,
    )

from demo.dify_recorder import DifyRecorder  # noqa: E402
from tests.e2e.test_dify_runs_e2e import (  # noqa: E402, F401 - the cases, run here against the real Dify
    SLOW_SECONDS,
    deployment,
    test_a_card_clicked_on_another_replica_goes_on_once,
    test_a_chatflow_answer_and_its_conversation_across_replicas,
    test_a_pdf_reaches_the_workflow_file_input_once,
    test_a_picture_an_answer_node_links_to_reaches_the_user,
    test_a_select_and_a_file_after_the_cards_replica_is_killed,
    test_a_workflow_apps_form_ends_whole,
    test_an_answer_whose_replica_stops_mid_run_is_finished_from_its_run,
    test_the_card_still_works_after_the_replica_waiting_for_it_is_killed,
)

pytestmark = pytest.mark.e2e


class RealDify(DifyRecorder):
    """The real Dify behind the recorder; a case's flows are its imported apps, found by name."""

    def serve_flow(self, flow, key: str) -> None:
        real = os.environ.get(key_variable(flow.name))
        if real:
            self.alias(key, real)

    def use_files_url(self, files_url: str) -> None:
        """A case written for a Dify whose FILES_URL is set (links absolute) or unset (relative) runs only on one."""
        if bool(files_url) != bool(os.environ.get("DIFY_REAL_FILES_URL")):
            pytest.skip("this case needs Dify's FILES_URL " + ("set" if files_url else "unset"))


class _Slow(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        threading.Event().wait(SLOW_SECONDS)
        body = b"SLEPT"
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        return None


@pytest.fixture(scope="module", autouse=True)
def slow_server():
    """What slow-chatflow's HTTP node calls: it answers 'SLEPT' after SLOW_SECONDS."""
    server = ThreadingHTTPServer(("127.0.0.1", int(os.environ.get("DIFY_REAL_SLOW_PORT", "18769"))), _Slow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


@pytest.fixture
def dify():
    recorder = RealDify(URL).start()
    yield recorder
    recorder.stop()


@pytest.fixture
def dify_version(dify) -> str:
    """The real Dify's version as the cases name the measured ones ("1.14", "1.16"), or "" for another."""
    reply = httpx.get(f"{URL}/info", headers={"Authorization": f"Bearer {os.environ[key_variable(APPS[0])]}"})
    version = ".".join(reply.headers.get("x-version", "").split(".")[:2])
    return version if version in ("1.14", "1.16") else ""


@pytest.fixture(autouse=True)
def needed_app(request):
    """Skip a case whose app was not imported (its key not given)."""
    app = OPTIONAL.get(request.function.__name__)
    if app and not os.environ.get(key_variable(app)):
        pytest.skip(f"set {key_variable(app)} (import {app}.yml) for this case")
