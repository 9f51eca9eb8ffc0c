"""The form fields of Dify 1.15+ (`hitl-select-file.yml`: a `select` of constant options, a `file` for documents, a
paragraph with a default), answered in WeCom on the faithful stand-in, on both Dify versions it plays: the select on
the card, the file sent in the chat (checked against the field's types before any upload, uploaded as the run's
user), and every bad input with one clear line and nothing submitted twice: a click before the file, a file of a
type the field does not take, a second file, an option the card never offered, a form that expired meanwhile, and a
submission Dify refuses (the card still usable). Callback mode through two replicas, and a long connection; gunicorn
replicas killed under it: tests/e2e/test_dify_runs_e2e.py."""

from __future__ import annotations

import base64
import os
import time

import pytest

from demo import dify_flows as flows
from demo.dify_versions import standin_version
from services.texts import CATALOGUE
from services.wecom.crypto import media_cipher, pad32
from tests.conftest import WS_BOT_ID, wait_until

ZH = CATALOGUE["zh"]
PDF = b"%PDF-1.7\n" + os.urandom(3000) + b"\n%%EOF\n"
EXE = b"MZ\x90\x00" + os.urandom(500)
WHOLE = "AFTER-RESUME action={action} env={env} doc=notes.pdf comment=looks good"
VERSIONS = pytest.mark.parametrize("version", ["1.14", "1.16"], ids=["dify-1.14.2", "dify-1.16.0"])


@pytest.fixture(params=["1.14", "1.16"], ids=["dify-1.14.2", "dify-1.16.0"])
def deploy(request, dify):
    """The stand-in plays the version and serves hitl-select-file as the bot's app."""
    dify.version = standin_version(request.param)
    dify.serve_flow(flows.hitl_select_file())
    return dify


class Asker:
    """One user's conversation with a form-bearing answer, callback mode: the question on replica a, everything
    else (the file, the taps) on replica b, as WeCom spreads them."""

    def __init__(self, sims):
        self.ask_on, self.other = sims
        self.first = self.ask_on.send(self.ask_on.text_message("ship v3"))
        self.stream_id = self.first["stream"]["id"]
        self.card = None

    def wait_for_card(self) -> dict:
        def came() -> bool:
            reply = self.ask_on.send(self.ask_on.poll_message(self.stream_id))
            self.card = self.card or reply.get("template_card")
            return self.card is not None

        assert wait_until(came, timeout=15)
        return self.card

    def bubble(self) -> str:
        return self.ask_on.send(self.ask_on.poll_message(self.stream_id))["stream"]["content"]

    def send_file(self, data: bytes, name: str) -> str:
        url = self.other.inbox.host(data, filename=name)
        reply = self.other.send(self.other.message("file", {"url": url}))
        assert reply["stream"]["finish"] is True
        return reply["stream"]["content"]

    def tap(self, action: str, **selected) -> dict:
        return self.other.send(self.other.card_click(self.card, action, selected=selected))

    def finish(self):
        return self.ask_on.follow(self.first)


def test_the_select_rides_on_the_card_and_the_file_is_sent_in_the_chat(sims, deploy):
    dify = deploy
    asker = Asker(sims)
    card = asker.wait_for_card()
    assert card["card_type"] == "button_interaction"
    assert [o["text"] for o in card["button_selection"]["option_list"]] == ["staging", "production"]
    assert [b["text"] for b in card["button_list"]] == ["Approve", "Reject"]
    asking = ZH["form_send_file"].format(label="doc", kinds="文档")
    assert asking in asker.bubble()
    noted = asker.send_file(PDF, "notes.pdf")
    assert noted == ZH["form_file_noted"].format(label="doc", name="notes.pdf") + "\n\n" + ZH["form_then_choose"]
    reply = asker.tap("approve", env="production")
    assert reply["template_card"]["main_title"]["desc"] == ZH["form_submitted"].format(choice="Approve")
    assert asker.finish().text == WHOLE.format(action="approve", env="production")
    [(file_id, upload)] = dify.uploads.items()
    [submission] = dify.form_submissions
    assert submission["status"] == 200
    assert submission["body"]["inputs"] == {
        "env": "production",
        "doc": {"type": "document", "transfer_method": "local_file", "upload_file_id": file_id},
        "comment": "looks good",
    }
    assert upload["user"] == submission["body"]["user"] == dify.chat_requests()[0]["user"]  # the run's own user
    assert len(dify.chat_requests()) == 1


def test_bad_input_gets_one_clear_line_each_and_nothing_is_submitted_until_the_form_is_whole(sims, deploy):
    """A tap before the file (asked for first, only on the tapper's card); a file of a type `doc` does not take
    (never uploaded); an option the card never offered (a stale or forged card); the file; a second file (left
    aside: `doc` takes one). Then one submission, of the first file."""
    dify = deploy
    asker = Asker(sims)
    asker.wait_for_card()
    early = asker.tap("approve")
    assert early["template_card"]["main_title"]["desc"] == ZH["form_needs_values"].format(label="doc")
    assert early["userids"] == ["alice"] and "button_list" in early["template_card"]  # still usable
    refused = asker.send_file(EXE, "setup.exe")
    assert refused.startswith(ZH["form_file_refused"].format(name="setup.exe", label="doc", kinds="文档"))
    assert dify.uploads == {}
    assert asker.send_file(PDF, "notes.pdf").startswith(ZH["form_file_noted"].format(label="doc", name="notes.pdf"))
    again = asker.send_file(PDF, "notes-v2.pdf")
    assert again == ZH["form_file_not_needed"] + "\n\n" + ZH["form_then_choose"]
    forged = asker.tap("approve", env="moon")
    assert forged["template_card"]["main_title"]["desc"] == ZH["form_option_not_offered"]
    assert dify.form_submissions == []
    asker.tap("reject", env="staging")
    assert asker.finish().text == WHOLE.format(action="reject", env="staging")
    assert [s["status"] for s in dify.form_submissions] == [200]
    assert [u["name"] for u in dify.uploads.values()] == ["notes.pdf"]


def test_a_submission_dify_refuses_leaves_the_card_usable_and_asks_again(sims, deploy):
    """Dify answers the submission 400 invalid_form_data (naming `doc`): the tap's reply is the card, still usable,
    with Dify's words on it; the bubble asks for the file again; the file and a second tap go through, once."""
    dify = deploy
    dify.form_refusals.append("Invalid value for file input 'doc': File validation failed for file: notes.pdf")
    asker = Asker(sims)
    asker.wait_for_card()
    asker.send_file(PDF, "notes.pdf")
    refused = asker.tap("approve", env="staging")
    card = refused["template_card"]
    assert card["main_title"]["desc"].startswith(ZH["form_refused"].split("{")[0])
    assert [b["text"] for b in card["button_list"]] == ["Approve", "Reject"] and refused["userids"] == ["alice"]
    assert wait_until(lambda: "File validation failed" in asker.bubble(), timeout=10)
    assert ZH["form_send_file"].format(label="doc", kinds="文档") in asker.bubble()
    asker.send_file(PDF, "notes.pdf")
    asker.card = card
    asker.tap("approve", env="staging")
    assert asker.finish().text == WHOLE.format(action="approve", env="staging")
    assert [s["status"] for s in dify.form_submissions] == [400, 200]


def test_a_form_that_expires_while_the_user_chooses(sims, dify):
    """The form expires before the file and the tap: the file hears so in one line (nothing uploaded), the tap gets
    the expired card, nothing is submitted, and the bubble follows Dify's timeout (the run ends)."""
    dify.version = standin_version("1.16")
    dify.serve_flow(flows.hitl_select_file(expires_in=1.5))
    asker = Asker(sims)
    asker.wait_for_card()
    time.sleep(1.6)
    assert asker.send_file(PDF, "notes.pdf") == ZH["form_expired"]
    assert asker.tap("approve")["template_card"]["main_title"]["desc"] == ZH["form_expired_card"]
    asker.finish()
    assert dify.form_submissions == [] and dify.uploads == {}


def test_on_a_long_connection_the_file_comes_with_its_own_key(ws_gateway, deploy):
    dify = deploy
    _, wecom = ws_gateway()
    req_id = wecom.deliver_text(WS_BOT_ID, "ship v3")
    assert wait_until(lambda: wecom.cards(req_id), timeout=15)
    aeskey = base64.b64encode(os.urandom(32)).decode().rstrip("=")
    encryptor = media_cipher(aeskey).encryptor()
    url = dify.server.url + dify.host_file(encryptor.update(pad32(PDF)) + encryptor.finalize(), "bin")
    noted = wecom.final(wecom.deliver_message(WS_BOT_ID, "file", {"url": url, "aeskey": aeskey}), timeout=15)
    assert noted["stream"]["content"].startswith(ZH["form_file_noted"].split("「")[0])
    click = wecom.deliver_card_click(WS_BOT_ID, wecom.cards(req_id)[0], "approve", selected={"env": "staging"})
    assert wecom.updated(click)["template_card"]["main_title"]["desc"].endswith("Approve")
    final = wecom.final(req_id, timeout=20)["stream"]["content"]
    assert final.startswith("AFTER-RESUME action=approve env=staging doc=")
    [submission] = dify.form_submissions
    assert submission["body"]["inputs"]["doc"]["transfer_method"] == "local_file"
