"""What users give reaches Dify's inputs, and what Dify knows reaches users (CONTRACT §15), through two gunicorn
replicas (two workers each) in production settings, in callback and long-connection mode: a PDF into a workflow's
file input, a knowledge answer's picture and sources, a slow step's status line, an unknown message type."""

from __future__ import annotations

import base64
import os

import pytest

from demo import dify_apps as apps
from demo.replicas import GunicornReplica
from services.texts import CATALOGUE
from services.wecom.crypto import media_cipher, pad32
from tests.conftest import make_simulator, wait_until
from tests.e2e.conftest import replica_env
from tests.test_message_types import file_input

pytestmark = pytest.mark.e2e
ZH = CATALOGUE["zh"]
BOT_ID, SECRET = "give-bot", "give-secret"
PDF = b"%PDF-1.7\n" + os.urandom(2000) + b"\n%%EOF\n"
PUBLIC = "https://bot.example.com"


@pytest.fixture
def deployment(dify, wecom_ws, redis_url, tmp_path):
    """Two replicas serving the environment's callback bot, and a long-connection bot of the same Dify app."""
    wecom = wecom_ws({BOT_ID: SECRET})
    env = replica_env(dify.base_url, redis_url, PUBLIC_BASE_URL=PUBLIC, FILE_LINK_SECRET="e2e-file-link-secret-0123")
    callback = [GunicornReplica(env, tmp_path, f"replica-{n}", workers=2).start() for n in range(2)]
    ws_env = {**env, "WECOM_MODE": "long_connection", "WECOM_BOT_ID": BOT_ID, "WECOM_BOT_SECRET": SECRET}
    ws_env["WECOM_WS_URL"] = wecom.url
    holder = GunicornReplica(ws_env, tmp_path, "replica-ws", workers=2).start()
    assert wait_until(lambda: wecom.subscribed(BOT_ID) == 1, timeout=15)
    sim = make_simulator([r.url for r in callback], poll_interval=0.2)
    yield sim, wecom
    sim.close()
    for replica in [*callback, holder]:
        replica.kill()


def test_a_pdf_alone_runs_a_workflow_whose_input_takes_it(deployment, dify):
    sim, _ = deployment
    dify.mode = "workflow"
    dify.parameters["user_input_form"] = [file_input("contract", "document")]
    dify.script(apps.workflow_run("Two years, renewable."))
    conversation = sim.follow(sim.send(sim.message("file", {"url": sim.inbox.host(PDF, filename="contract.pdf")})))
    assert conversation.text == "Two years, renewable."
    [(file_id, upload)] = dify.uploads.items()
    [request] = dify.chat_requests()
    assert request["inputs"]["contract"]["upload_file_id"] == file_id and upload["user"] == request["user"]


@pytest.mark.parametrize("mode", ["callback", "long_connection"])
def test_a_knowledge_answer_shows_its_picture_and_sources_never_its_relative_link(deployment, dify, mode):
    sim, wecom = deployment
    dify.script(apps.knowledge_answer(english=False))
    if mode == "callback":
        conversation = sim.ask("员工手册怎么说？")
        shown, final = conversation.contents(), conversation.text
        assert len(conversation.last["msg_item"]) == 1
    else:
        req_id = wecom.deliver_text(BOT_ID, "员工手册怎么说？")
        final = wecom.final(req_id, timeout=20)["stream"]["content"]
        shown = [f["stream"]["content"] for f in wecom.frames(req_id)]
        assert wait_until(lambda: any(m.get("msgtype") == "image" for m in wecom.proactive), timeout=15)
    assert not any("/files/" in text for text in shown)
    assert final.endswith(f"{ZH['citations_title']}\n1. 员工手册.pdf\n2. 休假制度.docx")


def test_a_slow_step_shows_its_status_line_then_the_answer(deployment, dify):
    sim, _ = deployment
    dify.script(apps.slow_tool_answer(english=False))
    conversation = sim.ask("帮我搜索")
    assert any(ZH["progress_step"].format(step="联网搜索") in c for c in conversation.contents())
    assert conversation.text == "我来查一下。查到了：办公室早上 9 点开门。"


@pytest.mark.parametrize("mode", ["callback", "long_connection"])
def test_an_unknown_message_type_gets_a_finished_bubble(deployment, dify, mode):
    sim, wecom = deployment
    if mode == "callback":
        reply = sim.send(sim.message("location", {"latitude": 31.2, "longitude": 121.5}))
        content = reply["stream"]["content"] if reply["stream"]["finish"] else ""
    else:
        final = wecom.final(wecom.deliver_message(BOT_ID, "location", {"latitude": 31.2}), timeout=15)
        content = final["stream"]["content"]
    assert content == ZH["unsupported_message"]
    assert dify.chat_requests() == []


def test_a_long_connection_file_with_its_own_key_reaches_the_input(deployment, dify):
    _, wecom = deployment
    dify.mode = "workflow"
    dify.parameters["user_input_form"] = [file_input("contract", "document")]
    dify.script(apps.workflow_run("Read it."))
    aeskey = base64.b64encode(os.urandom(32)).decode().rstrip("=")
    encryptor = media_cipher(aeskey).encryptor()
    url = dify.server.url + dify.host_file(encryptor.update(pad32(PDF)) + encryptor.finalize(), "bin")
    final = wecom.final(wecom.deliver_message(BOT_ID, "file", {"url": url, "aeskey": aeskey}), timeout=20)
    assert final["stream"]["content"] == "Read it."
    assert dify.chat_requests()[0]["inputs"]["contract"]["type"] == "document"
