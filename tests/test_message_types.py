"""Everything a WeCom user can send, and the extras of a reply: images and files in, enter_chat, feedback,
Dify's images out as msg_item, and the per-user in-flight limit."""

import base64
import hashlib
import io
import threading

import pytest
from PIL import Image

from demo import dify_apps as apps
from demo import dify_standin as d
from demo.dify_flows import file_variable as file_input
from services.texts import CATALOGUE
from services.wecom.crypto import media_cipher, pad32
from tests.conftest import JPEG, KEYS, PNG, WS_BOT_ID, make_simulator, wait_until

ZH = CATALOGUE["zh"]
PDF = b"%PDF-1.7\n" + b"1 0 obj << >> endobj\n" * 20


def accept_documents(dify, video=False):
    dify.parameters["file_upload"] = {
        "enabled": True,
        "allowed_file_types": ["document", "image"] + (["video"] if video else []),
        "image": {"enabled": True, "number_limits": 3},
    }


def follow_payload(sim, payload):
    return sim.follow(sim.send(payload))


# --- images -------------------------------------------------------------------------------------------------


def test_an_image_is_decrypted_uploaded_and_sent_as_a_file(simulator, dify):
    url = simulator.inbox.host(PNG)
    dify.script(d.answer("a nice chart"))
    conversation = follow_payload(simulator, simulator.message("image", {"url": url}))
    assert conversation.text == "a nice chart"
    [upload] = dify.uploads.values()
    assert upload["data"] == PNG
    assert upload["mime_type"] == "image/png"
    assert upload["user"] == "wecom:demo-bot:alice"
    [request] = dify.chat_requests()
    assert request["query"] == ZH["image_query"]
    [file_id] = dify.uploads
    assert request["files"] == [{"type": "image", "transfer_method": "local_file", "upload_file_id": file_id}]


def test_mixed_text_and_images(simulator, dify):
    urls = [simulator.inbox.host(PNG), simulator.inbox.host(JPEG)]
    items = [{"msgtype": "text", "text": {"content": "compare these two"}}]
    items += [{"msgtype": "image", "image": {"url": u}} for u in urls]
    dify.script(d.answer("the second is a photo"))
    conversation = follow_payload(simulator, simulator.message("mixed", {"msg_item": items}))
    assert conversation.text == "the second is a photo"
    request = dify.chat_requests()[0]
    assert request["query"] == "compare these two"
    assert len(request["files"]) == 2
    assert sorted(u["mime_type"] for u in dify.uploads.values()) == ["image/jpeg", "image/png"]


def test_images_when_the_app_takes_none(simulator, dify):
    dify.parameters["file_upload"] = {"image": {"enabled": False}}
    only_image = follow_payload(simulator, simulator.message("image", {"url": simulator.inbox.host(PNG)}))
    assert only_image.text == ZH["images_unsupported"]
    assert dify.chat_requests() == []

    dify.script(d.answer("text answered"))
    items = [
        {"msgtype": "text", "text": {"content": "what about this"}},
        {"msgtype": "image", "image": {"url": simulator.inbox.host(PNG)}},
    ]
    mixed = follow_payload(simulator, simulator.message("mixed", {"msg_item": items}, msgid="mixed-1"))
    assert mixed.text == f"text answered\n\n{ZH['images_ignored']}"
    assert "files" not in dify.chat_requests()[0]
    assert dify.uploads == {}


def test_an_expired_image_url(simulator, dify):
    dead = simulator.inbox.server.url + "/media/expired"
    conversation = follow_payload(simulator, simulator.message("image", {"url": dead}))
    assert conversation.text == ZH["media_failed"]
    dify.script(d.answer("answered anyway"))
    items = [{"msgtype": "text", "text": {"content": "and this"}}, {"msgtype": "image", "image": {"url": dead}}]
    mixed = follow_payload(simulator, simulator.message("mixed", {"msg_item": items}))
    assert mixed.text == f"answered anyway\n\n{ZH['media_partial']}"


def test_an_image_that_does_not_decrypt(simulator, dify):
    url = simulator.inbox.host(PNG, encrypt=False)
    assert follow_payload(simulator, simulator.message("image", {"url": url})).text == ZH["media_failed"]


def test_a_quoted_image_is_attached(simulator, dify):
    url = simulator.inbox.host(PNG)
    dify.script(d.answer("it is a PNG"))
    quote = {"msgtype": "image", "image": {"url": url}}
    follow_payload(simulator, simulator.text_message("what is in it?", quote=quote))
    request = dify.chat_requests()[0]
    assert len(request["files"]) == 1
    assert f"> {ZH['quoted_image']}" in request["query"]


# --- files and videos -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["file", "video"])
def test_files_and_videos_get_a_clear_reply_by_default(simulator, dify, kind):
    url = simulator.inbox.host(PDF)
    conversation = follow_payload(simulator, simulator.message(kind, {"url": url}))
    assert conversation.text == ZH["files_unsupported"]
    assert dify.chat_requests() == []
    assert dify.uploads == {}


def test_documents_go_to_an_app_that_takes_them(simulator, dify):
    accept_documents(dify)
    url = simulator.inbox.host(PDF, filename="季度报告.pdf")
    dify.script(d.answer("the report says..."))
    conversation = follow_payload(simulator, simulator.message("file", {"url": url}))
    assert conversation.text == "the report says..."
    [upload] = dify.uploads.values()
    assert upload["name"] == "季度报告.pdf"
    assert upload["data"] == PDF
    assert upload["mime_type"] == "application/pdf"
    request = dify.chat_requests()[0]
    assert request["query"] == ZH["file_query"]
    assert request["files"][0]["type"] == "document"


MP4 = b"\x00\x00\x00\x18ftypmp42" + bytes(200)


def test_a_video_is_unsupported_by_an_app_that_takes_only_documents(simulator, dify):
    accept_documents(dify, video=False)
    conversation = follow_payload(simulator, simulator.message("video", {"url": simulator.inbox.host(MP4)}))
    assert conversation.text == ZH["files_unsupported"]


def test_a_video_goes_to_an_app_that_takes_video(simulator, dify):
    accept_documents(dify, video=True)
    dify.script(d.answer("a short clip"))
    conversation = follow_payload(simulator, simulator.message("video", {"url": simulator.inbox.host(MP4)}))
    assert conversation.text == "a short clip"
    assert dify.chat_requests()[0]["files"][0]["type"] == "video"


# --- enter_chat ---------------------------------------------------------------------------------------------


def test_enter_chat_shows_the_opening_statement_with_its_questions_as_a_card(simulator, dify):
    dify.parameters["opening_statement"] = "你好，我是差旅助手。\n出差、报销的问题都可以问我。"
    dify.parameters["suggested_questions"] = ["怎么报销？", "出差标准是什么？", "住宿标准？", "第四个问题"]
    reply = simulator.send(simulator.event_message("enter_chat"))
    assert reply == {
        "msgtype": "template_card",
        "template_card": {
            "card_type": "text_notice",
            "main_title": {"title": "你好，我是差旅助手。"},
            "sub_title_text": "出差、报销的问题都可以问我。",
            "jump_list": [  # tapping one sends it as the user's question (WeCom takes three)
                {"type": 3, "title": q, "question": q} for q in ["怎么报销？", "出差标准是什么？", "住宿标准？"]
            ],
        },
    }


def test_enter_chat_without_suggested_questions_is_the_opening_statement_as_text(simulator, dify):
    dify.parameters["opening_statement"] = "你好，我是差旅助手。"
    reply = simulator.send(simulator.event_message("enter_chat"))
    assert reply == {"msgtype": "text", "text": {"content": "你好，我是差旅助手。"}}


def test_enter_chat_prefers_the_configured_welcome(make_app, serve, dify):
    sim = make_simulator(serve(make_app(welcome_message="欢迎使用 AI 助手！")).url)
    dify.parameters["opening_statement"] = "ignored"
    assert sim.send(sim.event_message("enter_chat"))["text"]["content"] == "欢迎使用 AI 助手！"
    sim.close()


def test_enter_chat_without_any_welcome_is_an_empty_reply(simulator, dify):
    assert simulator.send(simulator.event_message("enter_chat")) is None


# --- feedback -----------------------------------------------------------------------------------------------


def test_every_stream_reply_carries_the_feedback_id(simulator, dify):
    dify.script(d.answer("rate me", delay=0.02))
    conversation = simulator.ask("hello")
    assert all(f["stream"]["feedback"] == {"id": conversation.stream_id} for f in conversation.frames)


@pytest.mark.parametrize(
    ("event", "rating", "content"),
    [
        ({"type": 1}, "like", ""),
        (
            {"type": 2, "content": "数据过时了", "inaccurate_reason_list": [2, 3]},
            "dislike",
            "内容不完整 (incomplete); 内容有误 (wrong); 数据过时了",
        ),
        ({"type": 3}, None, ""),
    ],
)
def test_feedback_reaches_the_right_dify_message_as_the_right_user(simulator, dify, event, rating, content):
    dify.script(d.answer("an answer"))
    conversation = simulator.ask("question")
    message_id = next(iter(dify.messages))
    reply = simulator.send(simulator.event_message("feedback_event", {"id": conversation.stream_id, **event}))
    assert reply is None  # WeCom wants an empty body here
    assert wait_until(lambda: dify.feedbacks, timeout=5)
    assert dify.feedbacks == [(message_id, {"rating": rating, "user": "wecom:demo-bot:alice", "content": content})]


def test_feedback_for_an_unknown_answer_is_dropped(live, simulator, dify):
    reply = simulator.send(simulator.event_message("feedback_event", {"id": "NoSuchAnswer", "type": 1}))
    assert reply is None
    live.gateway.bot().callback.events.feedback.close(wait=True)  # the forward it started has finished
    assert dify.feedbacks == []


def test_feedback_outlives_the_stream_hash(simulator, dify, redis_client):
    dify.script(d.answer("an answer"))
    conversation = simulator.ask("question")
    redis_client.delete(KEYS.stream(conversation.stream_id))
    assert redis_client.ttl(KEYS.feedback(conversation.stream_id)) > 6 * 24 * 3600
    simulator.send(simulator.event_message("feedback_event", {"id": conversation.stream_id, "type": 1}))
    assert wait_until(lambda: dify.feedbacks, timeout=5)


# --- images from Dify -----------------------------------------------------------------------------------------


def test_images_dify_sends_arrive_as_msg_item_on_the_final_reply(simulator, dify):
    png_url, jpeg_url = dify.host_file(PNG), dify.host_file(JPEG, "jpg")
    gif = io.BytesIO()
    Image.new("RGB", (40, 30), "orange").save(gif, "GIF")
    gif_url = dify.host_file(gif.getvalue(), "gif")
    dify.script(
        [
            d.message("here is your chart"),
            d.message_file(png_url),
            d.message_file(gif_url),
            d.message_file(jpeg_url),
            d.message_file("/files/tools/missing.png"),
            d.end(),
        ]
    )
    conversation = simulator.ask("draw")
    failed = CATALOGUE["zh"]["file_failed"].format(name="missing.png")  # the missing one, said in one line
    assert conversation.text == "here is your chart\n\n" + failed
    assert all("msg_item" not in f["stream"] for f in conversation.frames[:-1])
    items = conversation.last["msg_item"]
    assert [i["msgtype"] for i in items] == ["image", "image", "image"]
    shown = [base64.b64decode(item["image"]["base64"]) for item in items]
    assert shown[0] == PNG  # small JPGs and PNGs go as they are
    assert shown[2] == JPEG
    assert Image.open(io.BytesIO(shown[1])).format == "JPEG"  # a GIF becomes a JPEG
    for item, raw in zip(items, shown, strict=True):
        assert item["image"]["md5"] == hashlib.md5(raw).hexdigest()


def test_at_most_ten_images(simulator, dify):
    urls = [dify.host_file(PNG) for _ in range(12)]
    dify.script([d.message("many"), *[d.message_file(u) for u in urls], d.end()])
    assert len(simulator.ask("lots").last["msg_item"]) == 10


def test_an_image_only_answer_is_not_called_empty(simulator, dify):
    dify.script([d.message_file(dify.host_file(PNG)), d.end()])
    conversation = simulator.ask("just draw")
    assert conversation.text == ZH["placeholder"]
    assert len(conversation.last["msg_item"]) == 1


# --- WeCom's in-flight limit ----------------------------------------------------------------------------------


def test_a_fourth_open_bubble_gets_a_polite_refusal(simulator, dify):
    gate = threading.Event()
    dify.script([d.message("slow"), d.sleep(1.0), d.end()], times=3)
    firsts = [simulator.send(simulator.text_message(f"q{i}")) for i in range(3)]
    assert all(not f["stream"]["finish"] for f in firsts)
    fourth = simulator.send(simulator.text_message("q4"))
    assert fourth["stream"]["finish"] is True
    assert fourth["stream"]["content"] == ZH["too_many_in_flight"]
    dify.script(d.answer("bob is fine"))
    assert simulator.ask("me too", userid="bob").text == "bob is fine"
    for first in firsts:
        simulator.follow(first)
    gate.set()
    dify.script(d.answer("room again"))
    assert simulator.ask("q5").text == "room again"
    assert len(dify.chat_requests()) == 5


def test_on_a_long_connection_an_unknown_message_type_gets_a_finished_bubble(ws_gateway, dify):
    _, wecom = ws_gateway()
    final = wecom.final(wecom.deliver_message(WS_BOT_ID, "location", {"latitude": 1.0, "longitude": 2.0}), timeout=10)
    assert final["stream"]["content"] == CATALOGUE["zh"]["unsupported_message"]
    assert dify.chat_requests() == []


# --- files into the app's file inputs (a workflow's or chatflow's Start variables of type file) ---------------------


def test_a_pdf_alone_starts_a_workflow_whose_input_takes_it(make_app, serve, dify):
    """The most common document workflow ('analyse this contract'): the file goes into the Start variable, as the
    run's own user's upload, and the message needs no words."""
    dify.mode = "workflow"
    dify.parameters["user_input_form"] = [file_input("contract", "document")]
    dify.script(apps.workflow_run("The contract runs for two years."))
    sim = make_simulator(serve(make_app()).url)
    url = sim.inbox.host(PDF, filename="contract.pdf")
    conversation = follow_payload(sim, sim.message("file", {"url": url}))
    assert conversation.text == "The contract runs for two years."
    [(file_id, upload)] = dify.uploads.items()
    [request] = dify.chat_requests()
    assert request["inputs"]["contract"] == {
        "type": "document",
        "transfer_method": "local_file",
        "upload_file_id": file_id,
    }
    assert upload["user"] == request["user"] and upload["name"] == "contract.pdf"
    assert "files" not in request
    sim.close()


def test_the_files_of_a_mixed_message_fill_a_file_list_within_its_count(simulator, dify):
    dify.mode = "advanced-chat"
    dify.parameters["user_input_form"] = [file_input("photos", "image", count=2)]
    items = [{"msgtype": "text", "text": {"content": "which is sharper?"}}]
    items += [{"msgtype": "image", "image": {"url": simulator.inbox.host(data)}} for data in (PNG, JPEG, PNG)]
    dify.script(d.answer("the first"))
    conversation = follow_payload(simulator, simulator.message("mixed", {"msg_item": items}))
    request = dify.chat_requests()[0]
    assert [f["type"] for f in request["inputs"]["photos"]] == ["image", "image"]  # two: the input's count
    assert request["query"] == "which is sharper?"
    assert len(request["files"]) == 1  # the third went where the app takes images too
    assert conversation.text == "the first"


def test_a_file_the_apps_input_does_not_take_gets_one_clear_reply_and_no_dify_call(simulator, dify):
    dify.mode = "workflow"
    dify.parameters["user_input_form"] = [file_input("sheet", "custom", extensions=(".xlsx",))]
    dify.parameters["file_upload"] = {"enabled": False}
    conversation = follow_payload(simulator, simulator.message("file", {"url": simulator.inbox.host(PDF)}))
    assert conversation.text == ZH["files_unsupported"]
    assert dify.chat_requests() == [] and dify.uploads == {}


@pytest.mark.parametrize("files_too", [False, True], ids=["input-only", "files-of-documents-too"])
def test_a_file_of_a_type_in_none_of_difys_lists_is_refused_before_any_upload(simulator, dify, files_too):
    """A `.exe` is of Dify's type `custom` (its extension is in none of Dify's lists): a workflow input that takes
    documents does not take it, nor do the app's files where they take documents. One clear reply, no upload, no
    Dify call (before, it went into the input as a document, was uploaded and run, and Dify failed it)."""
    dify.mode = "workflow"
    dify.parameters["user_input_form"] = [file_input("contract", "document")]
    dify.parameters["file_upload"] = {"enabled": files_too, "allowed_file_types": ["document"]}
    url = simulator.inbox.host(b"MZ\x90\x00" + bytes(200), filename="setup.exe")
    conversation = follow_payload(simulator, simulator.message("file", {"url": url}))
    assert conversation.text == ZH["files_unsupported"]
    assert dify.chat_requests() == [] and dify.uploads == {}


def test_on_a_long_connection_a_file_goes_into_the_input_too(ws_gateway, dify):
    """The medium carries its own aeskey there; it is decrypted with it and goes into the input as above."""
    dify.mode = "workflow"
    dify.parameters["user_input_form"] = [file_input("contract", "document")]
    dify.script(apps.workflow_run("Read."))
    _, wecom = ws_gateway()
    aeskey = base64.b64encode(bytes(range(32))).decode().rstrip("=")
    encryptor = media_cipher(aeskey).encryptor()
    url = dify.server.url + dify.host_file(encryptor.update(pad32(PDF)) + encryptor.finalize(), "bin")
    final = wecom.final(wecom.deliver_message(WS_BOT_ID, "file", {"url": url, "aeskey": aeskey}), timeout=15)
    assert final["stream"]["content"] == "Read."
    assert dify.chat_requests()[0]["inputs"]["contract"]["type"] == "document"
