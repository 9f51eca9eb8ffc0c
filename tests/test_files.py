"""Files Dify makes reach the user (docs/architecture.md, "Files Dify makes"), over real sockets: two gateway
replicas on the test Redis, the Dify stand-in serving tool files at signed relative URLs, the WeCom simulator
(callback mode) and the WebSocket stand-in (long connection)."""

import base64
import gc
import io
import logging
import os
import re
import time
from urllib.parse import quote

import httpx
import psutil
import pytest
from PIL import Image

from demo import dify_apps as apps
from demo import dify_standin as d
from services.files.links import LinkSigner
from services.longconn.uploads import FileSender
from services.media.images import MAX_INLINE_IMAGE_BYTES
from services.texts import CATALOGUE
from tests.conftest import DIFY_KEY, WS_BOT_ID, files_sent, make_simulator, wait_until

ZH = CATALOGUE["zh"]
SECRET = "test-file-link-secret-0123456789"
PUBLIC = "https://bot.example.com"
PDF = b"%PDF-1.7\n" + os.urandom(300_000) + b"\n%%EOF\n"
LINK = re.compile(r"\[([^\]]+)\]\(https://bot\.example\.com(/wecom/files/[^)\s]+)\)")


@pytest.fixture
def linked(make_pair):
    """Two replicas that link files (PUBLIC_BASE_URL, FILE_LINK_SECRET): (replica a, replica b)."""
    return make_pair(public_base_url=PUBLIC, file_link_secret=SECRET)


def links(text: str) -> dict[str, str]:
    """File name -> the link's path, from an answer's markdown."""
    return {name: path for name, path in LINK.findall(text)}


def noise_png(width: int, height: int) -> bytes:
    encoded = io.BytesIO()
    Image.frombytes("RGB", (width, height), os.urandom(width * height * 3)).save(encoded, "PNG")
    return encoded.getvalue()


def test_a_tool_file_and_a_workflow_output_file_download_exactly_on_the_other_replica(linked, dify, caplog):
    a, b = linked
    report, sheet = PDF, b"name,total\nalice,3\n" * 1000
    report_url, sheet_url = dify.host_file(report, "pdf"), dify.host_file(sheet, "csv")
    outputs = {"answer": "Done.", "files": [d.file_object(sheet_url, "季度报表.csv", "text/csv", len(sheet))]}
    dify.script(
        [
            apps.workflow_started(),
            d.message("Here you are."),
            d.message_file(report_url, "document", filename="report.pdf", mime_type="application/pdf"),
            apps.workflow_done(outputs),
            d.end(),
        ]
    )
    sim = make_simulator(a.url)
    with caplog.at_level(logging.DEBUG):
        conversation = sim.ask("the quarterly report")
    found = links(conversation.text)
    assert conversation.text.startswith("Here you are.\n\n📎 [report.pdf]")
    assert set(found) == {"report.pdf", "季度报表.csv"}
    for name, body, mime in (("report.pdf", report, "application/pdf"), ("季度报表.csv", sheet, "text/csv")):
        response = httpx.get(b.url + found[name], timeout=10)  # any replica serves any link
        assert response.status_code == 200
        assert response.content == body
        assert response.headers["content-type"].startswith(mime)
        assert (
            "filename*=UTF-8''" + httpx.URL("/" + name).raw_path.decode()[1:] in response.headers["content-disposition"]
        )
    # The link holds no Dify key or signature; nothing secret reaches the answer or the logs.
    for secret in (SECRET, DIFY_KEY, "sign=", "nonce="):
        assert secret not in conversation.text
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert SECRET not in logged and DIFY_KEY not in logged
    sim.close()


def test_a_tampered_or_expired_link_gets_403_with_a_short_json_body(linked, dify):
    a, _ = linked
    dify.script([d.message("File:"), d.message_file(dify.host_file(PDF, "pdf"), "document"), d.end()])
    sim = make_simulator(a.url)
    path = next(iter(links(sim.ask("file please").text).values()))
    token = path.rsplit("/", 1)[1]
    bot, ref, _, mac = token.split(".")
    tampered = f"{bot}.{ref}.{int(time.time()) + 10**6}.{mac}"  # a later expiry, the old signature
    expired = LinkSigner(SECRET, 60).sign(bot, ref, now=time.time() - 3600)
    foreign = LinkSigner("another-secret-of-16+chars", 60).sign(bot, ref)
    for bad in (tampered, expired, foreign, "garbage", token[:-2]):
        response = httpx.get(f"{a.url}/wecom/files/{bad}", timeout=5)
        assert response.status_code == 403
        assert response.json() == {"error": "link_refused", "message": "this link is not valid or has expired"}
    assert httpx.get(a.url + path, timeout=5).status_code == 200
    sim.close()


def test_a_big_photo_is_inline_under_512_kb_and_its_original_linked(linked, dify):
    a, b = linked
    photo = noise_png(900, 800)
    assert len(photo) > 2_000_000
    dify.script([d.message("A photo."), d.message_file(dify.host_file(photo, "png")), d.end()])
    conversation = make_simulator(a.url).ask("photo")
    (item,) = conversation.last["msg_item"]
    assert len(base64.b64decode(item["image"]["base64"])) <= MAX_INLINE_IMAGE_BYTES
    (name, path), *_ = links(conversation.text).items()
    assert ZH["file_original"].split("]")[1].split(")")[1] in conversation.text  # "（原图）"
    assert httpx.get(b.url + path, timeout=10).content == photo


def test_a_file_dify_no_longer_has_is_one_line_and_the_rest_arrives(linked, dify):
    a, _ = linked
    good = dify.host_file(PDF, "pdf")
    missing = "/files/tools/gone.pdf?timestamp=1&nonce=2&sign=3"
    dify.script(
        [d.message("Two files."), d.message_file(missing, "document"), d.message_file(good, "document"), d.end()]
    )
    text = make_simulator(a.url).ask("files").text
    assert ZH["file_failed"].format(name="gone.pdf") in text
    assert set(links(text)) == {good.split("?")[0].rsplit("/", 1)[1]}
    assert text.startswith("Two files.")


def test_a_file_over_the_cap_is_refused_with_a_note(make_pair, dify):
    a, _ = make_pair(public_base_url=PUBLIC, file_link_secret=SECRET, file_max_bytes=100_000)
    big = d.message_file(dify.host_file(PDF, "pdf"), "document", filename="big.pdf")
    dify.script([d.message("Big:"), big, d.end()])
    text = make_simulator(a.url).ask("big").text
    assert text == "Big:\n\n" + ZH["file_too_large"].format(name="big.pdf", size="97 KB")


def test_without_public_base_url_files_are_named_not_linked(make_pair, dify):
    a, _ = make_pair()
    dify.script(
        [d.message("See"), d.message_file(dify.host_file(PDF, "pdf"), "document", filename="plan.pdf"), d.end()]
    )
    assert make_simulator(a.url).ask("plan").text == "See\n\n" + ZH["file_named"].format(name="plan.pdf")


def test_files_are_fetched_only_from_difys_own_hosts(linked, dify):
    a, _ = linked
    dify.script([d.message("x"), d.message_file("http://169.254.169.254/latest/meta-data", "document"), d.end()])
    text = make_simulator(a.url).ask("metadata").text
    assert ZH["file_failed"].format(name="meta-data") in text
    assert "bot.example.com" not in text


def test_a_redirect_is_followed_only_within_difys_own_hosts(linked, dify):
    a, b = linked
    here = dify.host_file(PDF, "pdf")
    elsewhere = f"{b.url}/healthz"  # another host (port): never fetched
    moved_here = "/files/redirect?to=" + quote(here, safe="")
    moved_away = "/files/redirect?to=" + quote(elsewhere, safe="")
    dify.script(
        [d.message("Two."), d.message_file(moved_here, "document", filename="here.pdf")]
        + [d.message_file(moved_away, "document", filename="away.pdf"), d.end()]
    )
    text = make_simulator(a.url).ask("redirects").text
    assert set(links(text)) == {"here.pdf"}
    assert ZH["file_failed"].format(name="away.pdf") in text
    assert httpx.get(b.url + links(text)["here.pdf"], timeout=5).content == PDF


def test_a_50_mb_download_streams_through_with_flat_memory(make_pair, dify):
    a, _ = make_pair(public_base_url=PUBLIC, file_link_secret=SECRET, file_max_bytes=64 * 2**20)
    big = os.urandom(50 * 2**20)
    dify.script([d.message("Archive:"), d.message_file(dify.host_file(big, "zip"), "document"), d.end()])
    path = next(iter(links(make_simulator(a.url).ask("archive").text).values()))
    process = psutil.Process()
    gc.collect()
    before = process.memory_info().rss
    received = 0
    with httpx.stream("GET", a.url + path, timeout=30) as response:
        assert response.status_code == 200
        for piece in response.iter_bytes(256 * 1024):
            received += len(piece)
    grown = process.memory_info().rss - before
    assert received == len(big)
    # Never the whole 50 MB: the server and this client share the process with the Dify stand-in (which serves the
    # file) and the other tests' threads, whose allocations moved RSS by up to 29 MB in a loaded CI run; a body held
    # whole would add 50 MB at least.
    assert grown < 40 * 2**20


# --- long-connection mode --------------------------------------------------------------------------------------

WS_BOT = WS_BOT_ID


@pytest.fixture
def linking_ws_gateway(ws_gateway):
    """A long-connection gateway that links files too: (gateway, the stand-in)."""
    return ws_gateway(public_base_url=PUBLIC, file_link_secret=SECRET)


def test_on_a_long_connection_a_photo_is_uploaded_in_chunks_and_sent_after_the_answer(
    linking_ws_gateway, dify, redis_client
):
    _, wecom = linking_ws_gateway
    photo = noise_png(900, 800)  # over 2 MB: four chunks of at most 512 KB
    report = dify.host_file(PDF, "pdf")
    dify.script(
        [
            d.message("Photo and report."),
            d.message_file(dify.host_file(photo, "png")),
            d.message_file(report, "document", filename="report.pdf"),
            d.end(),
        ]
    )
    message = wecom.deliver_text(WS_BOT, "photo and report")
    final = wecom.final(message, timeout=20)
    assert final["stream"]["content"] == "Photo and report."
    assert "msg_item" not in final["stream"]  # the photo goes whole, uploaded, not shrunk inline
    assert wait_until(lambda: len(wecom.proactive) == 2, timeout=20)
    sent = {body["msgtype"]: body for body in wecom.proactive}
    image, document = wecom.media[sent["image"]["image"]["media_id"]], wecom.media[sent["file"]["file"]["media_id"]]
    assert image["data"] == photo and image["chunks"] == -(-len(photo) // (512 * 1024)) >= 4
    assert document["data"] == PDF and document["filename"] == "report.pdf"
    assert all(body["chatid"] == "alice" and body["chat_type"] == 1 for body in wecom.proactive)
    assert files_sent(redis_client, final["stream"]["id"])
    assert len(wecom.proactive) == 2  # once


def test_on_a_long_connection_an_answer_without_files_is_not_read_again_for_them(linking_ws_gateway, dify, monkeypatch):
    _, wecom = linking_ws_gateway
    looked: list[str] = []
    monkeypatch.setattr(FileSender, "_send_all", lambda self, stream_id: looked.append(stream_id))
    dify.script(d.answer("Just words."))
    final = wecom.final(wecom.deliver_text(WS_BOT, "words only"), timeout=20)
    assert final["stream"]["content"] == "Just words."
    dify.script([d.message("A report."), d.message_file(dify.host_file(PDF, "pdf"), "document"), d.end()])
    with_file = wecom.final(wecom.deliver_text(WS_BOT, "a report"), timeout=20)
    assert wait_until(lambda: looked == [with_file["stream"]["id"]], timeout=10)  # the final poll said which has some


def test_on_a_long_connection_a_file_that_fails_is_one_line(linking_ws_gateway, dify):
    _, wecom = linking_ws_gateway
    dify.script(
        [d.message("Here."), d.message_file("/files/tools/gone.pdf?timestamp=1&nonce=2&sign=3", "document")] + [d.end()]
    )
    final = wecom.final(wecom.deliver_text(WS_BOT, "gone"), timeout=20)
    assert final["stream"]["content"] == "Here.\n\n" + ZH["file_failed"].format(name="gone.pdf")


# --- Dify-relative links inside answer text (a knowledge base's images and files) --------------------------------


def test_a_knowledge_answers_image_goes_inline_and_its_file_link_is_signed(linked, dify):
    a, b = linked
    chart, manual = dify.host_preview(noise_png(40, 40)), dify.host_preview(PDF, "application/pdf")
    text = f"See the chart: ![image]({chart}) and the [manual.pdf]({manual}). Or [the site](https://example.com/x)."
    dify.script([*d.answer(text, pieces=6)[:-1], d.end()])
    sim = make_simulator(b.url)
    conversation = sim.ask("what does the handbook say?")
    assert not any("/files/" in c and "wecom/files" not in c for c in conversation.contents())  # never the raw path
    final = conversation.text
    assert final.startswith("See the chart:  and the 📎 [manual.pdf](https://bot.example.com/wecom/files/")
    assert final.endswith("Or [the site](https://example.com/x).")  # other hosts' links stay as they are
    [item] = conversation.last["msg_item"]  # the image, under the bubble
    assert base64.b64decode(item["image"]["base64"])[:4] == b"\x89PNG"
    path = links(final)["manual.pdf"]
    assert httpx.get(f"{a.url}{path}").content == PDF  # any replica serves the link
    sim.close()


def test_a_link_whose_file_cannot_be_fetched_becomes_a_line_and_the_answer_stays_whole(linked, dify):
    _, b = linked
    gone = "/files/00000000-0000-0000-0000-000000000000/file-preview?timestamp=1&nonce=n&sign=s"
    dify.script([d.message(f"Before [old.pdf]({gone}) after."), d.end()])
    sim = make_simulator(b.url)
    assert sim.ask("the old file").text == f"Before {ZH['file_failed'].format(name='old.pdf')} after."
    sim.close()


def test_on_a_long_connection_a_knowledge_answers_image_is_uploaded(ws_gateway, dify):
    _, wecom = ws_gateway(public_base_url=PUBLIC, file_link_secret=SECRET)
    chart = dify.host_preview(noise_png(40, 40))
    dify.script([d.message(f"The chart: ![chart.png]({chart})"), d.end()])
    req_id = wecom.deliver_text(WS_BOT_ID, "show the chart")
    final = wecom.final(req_id, timeout=15)
    assert final["stream"]["content"] == "The chart: "
    assert not any("/files/" in f["stream"]["content"] for f in wecom.frames(req_id))
    assert wait_until(lambda: any(m.get("msgtype") == "image" for m in wecom.proactive), timeout=15)


@pytest.mark.parametrize(
    "files_url", ["http://api:5001", "dify-base"], ids=["signed-on-a-cluster-address", "on-the-bots-dify-host"]
)
def test_links_to_difys_files_written_absolute_are_delivered_as_the_relative_ones(linked, dify, files_url):
    """Dify with its FILES_URL set writes its own files' links absolute: on an address only its cluster reaches
    (`http://api:5001/files/…`, signed), or on the host the bot reaches it at. Neither reaches the user: no poll and
    no final text shows the address; the picture comes under the bubble, fetched from DIFY_FILES_URL (the path
    only, never the host the text names); the document gets its signed gateway link. An unsigned link to another
    host's /files/ stays as it is."""
    _, b = linked
    dify.files_url = dify.server.url if files_url == "dify-base" else files_url
    chart = dify.file_url(dify.host_preview(noise_png(40, 40)))
    manual = dify.file_url(dify.host_preview(PDF, "application/pdf"))
    other = "https://cdn.example.com/files/brochure.pdf"
    text = f"The chart: ![chart]({chart}), the [manual.pdf]({manual}), and [a brochure]({other})."
    dify.script([*d.answer(text, pieces=9)[:-1], d.end()])
    sim = make_simulator(b.url)
    conversation = sim.ask("the chart please")
    shown = " ".join(conversation.contents())
    assert dify.files_url not in shown and "file-preview" not in shown
    final = conversation.text
    assert final.startswith("The chart: , the 📎 [manual.pdf](https://bot.example.com/wecom/files/")
    assert final.endswith(f"and [a brochure]({other}).")
    [item] = conversation.last["msg_item"]
    assert base64.b64decode(item["image"]["base64"])[:4] == b"\x89PNG"
    sim.close()


def test_on_a_long_connection_an_absolute_dify_link_is_never_shown_and_its_image_is_uploaded(ws_gateway, dify):
    _, wecom = ws_gateway(public_base_url=PUBLIC, file_link_secret=SECRET)
    dify.files_url = "http://api:5001"
    chart = dify.file_url(dify.host_preview(noise_png(40, 40)))
    half = f"![chart.png]({chart[:30]}"  # the link's address split over two deltas
    dify.script([d.message("The chart: "), d.message(half), d.sleep(1.5), d.message(chart[30:] + ")"), d.end()])
    req_id = wecom.deliver_text(WS_BOT_ID, "show the chart")
    final = wecom.final(req_id, timeout=15)
    assert final["stream"]["content"] == "The chart: "
    assert not any("api:5001" in f["stream"]["content"] for f in wecom.frames(req_id))  # not even half of it
    assert wait_until(lambda: any(m.get("msgtype") == "image" for m in wecom.proactive), timeout=15)
