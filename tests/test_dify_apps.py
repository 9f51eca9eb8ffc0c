"""Every Dify app type and event (docs/protocol.md, Dify), over real sockets: the gateway against
the Dify stand-in playing each behaviour, the bubble read back through the WeCom simulator."""

import base64
import io
import os
import time

import pytest
from PIL import Image

from demo import dify_apps as apps
from demo import dify_flows as flows
from demo import dify_standin as d
from services.dify.run_records import STOPPED_RECORD_WAITS
from services.media.images import MAX_INLINE_IMAGE_BYTES
from services.texts import CATALOGUE
from tests.conftest import WS_BOT_ID, make_simulator, wait_until

ZH = CATALOGUE["zh"]


@pytest.fixture
def ask(make_app, serve):
    """`ask(question, **settings)` -> the finished Conversation, from a fresh app with those settings."""
    opened = []

    def run(question: str, **settings):
        live = serve(make_app(**settings))
        sim = make_simulator(live.url)
        opened.append(sim)
        return sim.ask(question)

    yield run
    for sim in opened:
        sim.close()


def test_the_agent_apps_closing_message_does_not_repeat_the_answer(ask, dify):
    dify.script(apps.agent_answer("The agent found three offices."))
    assert ask("where are the offices?").text == "The agent found three offices."


def test_text_chunks_labelled_message_file_are_answer_text(ask, dify):
    url = dify.host_file(b"\x89PNG\r\n\x1a\n" + bytes(64))
    dify.script(apps.file_then_text(url, "Here is the chart you asked for, with the totals."))
    conversation = ask("chart please")
    assert conversation.text == "Here is the chart you asked for, with the totals."
    assert [item["msgtype"] for item in conversation.last["msg_item"]] == ["image"]


def test_reasoning_never_mixes_into_the_answer(ask, dify):
    dify.script([apps.reasoning("Let me think. "), apps.reasoning("Two plus two.", final=True), *d.answer("4")])
    assert ask("2+2?").text == "4"


def test_with_show_reasoning_it_comes_first_in_a_think_block(ask, dify):
    dify.script([apps.reasoning("Let me think. "), apps.reasoning("Two plus two."), *d.answer("It is 4.")])
    conversation = ask("2+2?", show_reasoning=True)
    assert conversation.text == "<think>\nLet me think. Two plus two.\n</think>\n\nIt is 4."


def test_reasoning_alone_closes_its_block_and_says_the_answer_was_empty(ask, dify):
    dify.script([apps.reasoning("Hmm."), d.end()])
    conversation = ask("?", show_reasoning=True)
    assert conversation.text == "<think>\nHmm.\n</think>\n\n" + ZH["empty_answer"]


def test_an_annotation_reply_arrives_whole(ask, dify):
    dify.script(apps.annotation_answer("请使用 VPN 客户端 3.2 版本。"))
    assert ask("vpn?").text == "请使用 VPN 客户端 3.2 版本。"


def test_unknown_events_are_ignored_and_counted(make_app, serve, dify):
    live = serve(make_app())
    dify.script([d.event("brand_new_event", data={"x": 1}), *d.answer("still fine")])
    sim = make_simulator(live.url)
    assert sim.ask("new events?").text == "still fine"
    sim.close()
    metrics = live.app.test_client().get("/metrics").get_data(as_text=True)
    assert 'dify_unknown_events_total{bot="default",event="brand_new_event"}' in metrics


def test_a_workflow_app_answers_from_its_text_chunks(ask, dify):
    dify.mode = "workflow"
    dify.script(apps.workflow_run("Summary: revenue grew 12%.", chunks=True))
    conversation = ask("summarise Q3")
    assert conversation.text == "Summary: revenue grew 12%."
    (request,) = dify.chat_requests()
    assert request["inputs"] == {"query": "summarise Q3"}  # DIFY_WORKFLOW_INPUT
    assert "conversation_id" not in request


def test_a_workflow_without_text_chunks_answers_from_its_output(ask, dify):
    dify.mode = "workflow"
    dify.script(apps.workflow_run("From the output variable.", chunks=False, output="result"))
    assert ask("run it").text == "From the output variable."  # the first string output


def test_a_named_workflow_output_and_input(ask, dify):
    dify.mode = "workflow"
    dify.script([apps.workflow_started(), apps.workflow_done({"first": "not this", "result": "this one"})])
    conversation = ask("run it", dify_workflow_input="question", dify_workflow_output="result")
    assert conversation.text == "this one"
    assert dify.chat_requests()[0]["inputs"] == {"question": "run it"}


def test_a_failed_workflow_ends_the_bubble_with_its_message(ask, dify):
    dify.mode = "workflow"
    dify.script(
        [apps.workflow_started(), apps.text_chunk("Half"), apps.workflow_done(status="failed", error="node x broke")]
    )
    conversation = ask("run it")
    assert conversation.text == "Half\n\n" + ZH["workflow_failed"].format(reason="node x broke")


def test_a_workflow_dify_stopped_keeps_what_it_streamed_and_never_says_the_user_stopped_it(ask, dify):
    """Dify's run ends `stopped` with no outputs ("Stopped by user." although nobody here stopped it: a user's /stop
    ends the answer before Dify's word comes): the text it streamed, and a note that the app stopped the run. Its
    record is asked for outputs it may have kept, again for a few seconds while it has none (STOPPED_RECORD_WAITS)."""
    dify.mode = "workflow"
    stopped = apps.workflow_done(status="stopped", error="Stopped by user.")
    dify.script([apps.workflow_started(), apps.text_chunk("Half"), stopped])
    conversation = ask("run it")
    assert conversation.text == "Half\n\n" + ZH["run_stopped"]
    assert "Stopped by user" not in conversation.text
    assert len(dify.record_reads) == len(STOPPED_RECORD_WAITS)


def test_a_completion_app_gets_the_question_in_its_inputs(ask, dify):
    dify.mode = "completion"
    dify.script(d.answer("Completed text."))
    assert ask("complete this").text == "Completed text."
    assert dify.chat_requests()[0]["inputs"] == {"query": "complete this"}


def test_a_configured_app_type_does_not_ask_info(ask, dify):
    dify.mode = "workflow"
    dify.script(apps.workflow_run("typed"))
    assert ask("go", dify_app_type="workflow").text == "typed"
    assert dify.info_requests == 0


def test_auto_reads_the_apps_type_once(make_app, serve, dify):
    dify.mode = "advanced-chat"
    live = serve(make_app())
    sim = make_simulator(live.url)
    dify.script(apps.chatflow_answer("one"))
    dify.script(apps.chatflow_answer("two"))
    assert [sim.ask(q).text for q in ("first", "second")] == ["one", "two"]
    sim.close()
    assert dify.info_requests == 1


def test_a_chatflow_keeps_its_run_id_in_the_stream_hash(make_app, serve, dify, redis_client):
    from tests.conftest import KEYS

    dify.mode = "advanced-chat"
    live = serve(make_app(dify_app_type="advanced-chat"))
    dify.script(apps.chatflow_answer("kept"))
    sim = make_simulator(live.url)
    conversation = sim.ask("keep it")
    sim.close()
    (run_id,) = dify.runs
    assert redis_client.hget(KEYS.stream(conversation.stream_id), "workflow_run_id") == run_id


def noise_png(width: int, height: int) -> bytes:
    """A PNG that does not compress: random pixels."""
    image = Image.frombytes("RGB", (width, height), os.urandom(width * height * 3))
    encoded = io.BytesIO()
    image.save(encoded, "PNG")
    return encoded.getvalue()


def test_a_big_image_arrives_under_the_inline_limit_and_still_an_image(ask, dify):
    big = noise_png(720, 720)
    assert len(big) > 1_500_000
    dify.script([d.message("a photo"), d.message_file(dify.host_file(big)), d.end()])
    conversation = ask("photo please")
    (item,) = conversation.last["msg_item"]
    data = base64.b64decode(item["image"]["base64"])
    assert len(data) <= MAX_INLINE_IMAGE_BYTES
    with Image.open(io.BytesIO(data)) as shown:
        assert shown.format == "JPEG"
        assert shown.width > 100
    assert conversation.text == "a photo"


# --- an answer survives its replica ----------------------------------------------------------------------------

WORDS = [f"word{i} " for i in range(30)]
FULL = "".join(WORDS)


def slow_chatflow() -> list[tuple]:
    steps = [apps.workflow_started()]
    for word in WORDS:
        steps += [d.message(word), d.sleep(0.1)]
    return [*steps, apps.workflow_done({"answer": FULL}), d.end()]


def follow_growing(sim, first, stream_id, window=30.0):
    """Poll until finished, checking that the bubble's answer only ever grows (no text lost, none repeated; a slow
    step's status line comes and goes)."""
    contents = [first["stream"]["content"]]
    reply = first
    deadline = time.monotonic() + window
    while not reply["stream"]["finish"]:
        assert time.monotonic() < deadline, contents[-1]
        time.sleep(sim.poll_interval)
        reply = sim.send(sim.poll_message(stream_id))
        contents.append(reply["stream"]["content"])
    status = "\n\n" + ZH["progress_step"].split("{")[0]  # a slow step's status line, which the answer replaces
    shown = [c.split(status)[0].rstrip() for c in contents if c != ZH["placeholder"]]
    assert all(later.startswith(earlier) for earlier, later in zip(shown, shown[1:], strict=False)), shown
    return reply["stream"]["content"]


@pytest.mark.parametrize("run_ends_first", [False, True], ids=["run-still-going", "run-ended-meanwhile"])
def test_a_chatflow_answer_goes_on_on_another_replica_after_its_owner_drains(make_pair, dify, run_ends_first):
    dify.mode = "advanced-chat"
    owner, other = make_pair(dify_app_type="advanced-chat")
    dify.script(slow_chatflow())
    to_owner, to_other = make_simulator(owner.url), make_simulator(other.url)
    first = to_owner.send(to_owner.text_message("a long chatflow answer"))
    stream_id = first["stream"]["id"]
    assert wait_until(lambda: "word5" in to_owner.send(to_owner.poll_message(stream_id))["stream"]["content"])

    owner.gateway.drain(0.01)  # hands the stream over: its lease is released
    (run,) = dify.runs.values()
    if run_ends_first:
        assert wait_until(lambda: run.ended, timeout=15)

    assert follow_growing(to_other, first, stream_id) == FULL
    assert [r["user"] for r in dify.reattaches] == [dify.chat_requests()[0]["user"]]
    assert len(dify.chat_requests()) == 1  # never asked twice
    to_owner.close()
    to_other.close()


def citing_end(*names: str) -> tuple:
    """message_end naming the knowledge documents the answer drew on (Dify's retriever_resources)."""
    resources = [
        {"position": n, "document_name": name, "dataset_name": "kb", "score": 0.9} for n, name in enumerate(names)
    ]
    return d.event("message_end", metadata={"usage": {"total_tokens": 3}, "retriever_resources": resources})


def test_the_documents_an_answer_drew_on_are_listed_at_its_end(ask, dify):
    names = ["员工手册.pdf", "报销制度.docx", "员工手册.pdf", "a.md", "b.md", "c.md", "d.md"]
    dify.script([d.message("Twelve days a year."), citing_end(*names)])
    text = ask("how many days off?").text
    sources = "\n".join(
        f"{n}. {name}" for n, name in enumerate(["员工手册.pdf", "报销制度.docx", "a.md", "b.md", "c.md"], 1)
    )
    assert text == f"Twelve days a year.\n\n{ZH['citations_title']}\n{sources}"  # distinct, at most five


def test_no_sources_no_list_and_show_citations_off(make_app, serve, dify):
    dify.script([d.message("Nothing cited."), citing_end()])
    dify.script([d.message("Cited, not shown."), citing_end("x.pdf")])
    on, off = make_simulator(serve(make_app()).url), make_simulator(serve(make_app(show_citations=False)).url)
    assert on.ask("first").text == "Nothing cited."
    assert off.ask("second").text == "Cited, not shown."
    on.close()
    off.close()


def test_on_a_long_connection_the_sources_end_the_answer_too(ws_gateway, dify):
    _, wecom = ws_gateway()
    dify.script([d.message("From the handbook."), citing_end("员工手册.pdf")])
    final = wecom.final(wecom.deliver_text(WS_BOT_ID, "days off?"), timeout=10)
    assert final["stream"]["content"] == f"From the handbook.\n\n{ZH['citations_title']}\n1. 员工手册.pdf"


def slow_step(node_type: str, title: str, seconds: float) -> list[tuple]:
    """A workflow node that runs `seconds` without text (Dify's node events around it)."""
    node = {"id": f"exec-{title}", "node_id": title.lower(), "node_type": node_type, "title": title}
    return [
        d.event("node_started", data=node),
        d.sleep(seconds),
        d.event("node_finished", data={**node, "status": "succeeded"}),
    ]


def test_a_slow_step_shows_a_status_line_that_the_answer_then_replaces(ask, dify):
    dify.script([d.message("Looking it up. "), *slow_step("tool", "Web search", 4.5), d.message("Found it."), d.end()])
    conversation = ask("search for it")
    status = ZH["progress_step"].format(step="Web search")
    during = [c for c in conversation.contents() if status in c]
    assert during and all(c.startswith("Looking it up.") for c in during)  # one line, below the text so far
    assert conversation.text == "Looking it up. Found it."  # the final answer holds no status line


def test_a_quick_step_or_a_step_of_no_interest_shows_none(ask, dify):
    steps = [*slow_step("tool", "Quick", 1.0), *slow_step("template-transform", "Format", 4.0), d.message("Done.")]
    dify.script([d.message("Start. "), *steps, d.end()])
    conversation = ask("go")
    assert not any("⏳" in c for c in conversation.contents())
    assert conversation.text == "Start. Done."


def test_on_a_long_connection_the_status_line_rides_on_the_frames(ws_gateway, dify):
    _, wecom = ws_gateway()
    dify.script(
        [d.message("Checking. "), *slow_step("knowledge-retrieval", "Handbook", 4.5), d.message("Yes."), d.end()]
    )
    req_id = wecom.deliver_text(WS_BOT_ID, "is it allowed?")
    final = wecom.final(req_id, timeout=20)
    assert final["stream"]["content"] == "Checking. Yes."
    status = ZH["progress_step"].format(step="Handbook")
    assert any(status in f["stream"]["content"] for f in wecom.frames(req_id) if not f["stream"].get("finish"))


def test_the_demo_shows_a_knowledge_answer_and_a_slow_tool(ask, dify):
    """The stand-in's unscripted answers for 手册 and 搜索 (`make demo`): a picture under the bubble and the
    sources; the status line while the tool runs."""
    handbook = ask("员工手册怎么说年假？")
    assert handbook.text.startswith("根据员工手册，年假为每年 12 天。")
    assert "1. 员工手册.pdf\n2. 休假制度.docx" in handbook.text and "/files/" not in handbook.text
    assert len(handbook.last["msg_item"]) == 1
    search = ask("帮我搜索一下开门时间")
    assert any(ZH["progress_step"].format(step="联网搜索") in c for c in search.contents())
    assert search.text == "我来查一下。查到了：办公室早上 9 点开门。"


def test_a_workflow_whose_only_required_text_input_is_not_query_takes_the_question_there(ask, dify):
    """DIFY_WORKFLOW_INPUT left at `query`, and the workflow's Start asks for one required text `request`: the
    question goes into `request` (said once in the log), not into an input Dify would refuse the run without."""
    dify.serve_flow(
        flows.Flow(
            "request-workflow",
            "workflow",
            (flows.End((("answer", "handled: {{#start.request#}}"),)),),
            query_input="request",
            start_inputs=({"text-input": {"variable": "request", "label": "Request", "required": True}},),
        )
    )
    assert ask("reset my password").text == "handled: reset my password"
    assert dify.chat_requests()[0]["inputs"] == {"request": "reset my password"}
