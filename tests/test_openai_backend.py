"""A bot whose answers come from an OpenAI-compatible server (BACKEND=openai; services/backends/openai), against the
stand-in of such a server over real sockets (demo/openai_standin.py): the request's shape, the stream into the
bubble, history across turns and /new, reasoning, finish reasons, failures asked again or not, /stop, content rules
across deltas, images. Through gunicorn replicas and a real LiteLLM proxy: tests/e2e/test_openai_e2e.py."""

from __future__ import annotations

import logging
import time

import pytest

from demo import openai_standin as o
from services.rules.rules import MASK
from services.texts import CATALOGUE
from tests.conftest import KEYS, PNG, make_simulator, openai_settings, wait_until

ZH = CATALOGUE["zh"]


@pytest.fixture
def bot(make_app, serve, openai, tmp_path):
    """`bot(**settings)` -> a simulator of a fresh app answered by the OpenAI stand-in (its settings changed by
    `settings`)."""
    opened = []

    def build(**settings):
        live = serve(make_app(**openai_settings(openai, **settings)))
        sim = make_simulator(live.url)
        opened.append(sim)
        return sim

    yield build
    for sim in opened:
        sim.close()


def test_an_answer_streams_from_the_server_into_the_bubble(bot, openai):
    openai.script(o.answer("The server's answer, word by word.", delay=0.01))
    conversation = bot().ask("what do you say?", userid="alice")
    assert conversation.finished
    assert conversation.text == "The server's answer, word by word."
    [body] = openai.completions()
    assert body["model"] == "test-model" and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["messages"] == [{"role": "user", "content": "what do you say?"}]
    assert body["user"].startswith("wecom:") and body["user"].endswith(":alice")  # the id a Dify call carries


def test_the_conversation_goes_on_across_turns_and_starts_over_after_new(bot, openai):
    sim = bot(openai_system_prompt="You are terse.", openai_extra='{"temperature": 0.2}')
    openai.script(o.answer("First answer."))
    openai.script(o.answer("Second answer."))
    sim.ask("first question")
    sim.ask("second question")
    second = openai.completions()[1]
    assert second["messages"] == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "First answer."},
        {"role": "user", "content": "second question"},
    ]
    assert second["temperature"] == 0.2
    assert sim.ask("/new").finished
    openai.script(o.answer("Fresh."))
    sim.ask("third question")
    assert [m["role"] for m in openai.completions()[2]["messages"]] == ["system", "user"]


def test_history_keeps_only_the_latest_turns(bot, openai):
    sim = bot(openai_history_turns=2)
    for n in range(4):
        openai.script(o.answer(f"Answer {n}."))
        sim.ask(f"question {n}")
    last = openai.completions()[-1]["messages"]
    assert [m["content"] for m in last] == ["question 1", "Answer 1.", "question 2", "Answer 2.", "question 3"]


def test_reasoning_is_shown_before_the_answer_only_when_asked_for(bot, openai):
    steps = [o.reasoning("Let me think. "), o.reasoning("Done thinking."), *o.answer("The answer.")]
    openai.script(steps, times=2)
    assert bot().ask("think").text == "The answer."
    shown = bot(show_reasoning=True).ask("think").text
    assert shown.startswith("<think>\nLet me think. Done thinking.\n</think>") and shown.endswith("The answer.")


@pytest.mark.parametrize(("reason", "note"), [("length", "answer_cut_at_limit"), ("content_filter", "answer_filtered")])
def test_a_finish_short_of_the_answer_says_why(bot, openai, reason, note):
    openai.script(o.answer("Half of it", reason=reason))
    assert bot().ask("go on").text == f"Half of it\n\n{ZH[note]}"


def test_a_bad_key_says_the_bot_is_misconfigured_once(bot, openai, caplog):
    with caplog.at_level(logging.WARNING):
        conversation = bot(openai_api_key="sk-wrong").ask("hello")
    assert conversation.text == ZH["dify_rejected"]
    assert len(openai.requests) == 1  # never asked again
    assert "HTTP 401" in caplog.text and "sk-wrong" not in caplog.text


def test_a_server_refusing_for_now_is_asked_again_and_answers(bot, openai):
    openai.script([o.http_error(503, "overloaded", "server_error")], times=1)
    openai.script(o.answer("After the wait."))
    conversation = bot(dify_retry_seconds=20).ask("please")
    assert conversation.text == "After the wait."
    assert len(openai.requests) == 2


def test_a_stream_cut_mid_answer_ends_with_what_was_shown_and_is_not_asked_again(bot, openai):
    openai.script([o.text("Half an answer"), o.sleep(0.2), o.cut()])
    conversation = bot(dify_retry_seconds=20).ask("cut me")
    assert conversation.text == f"Half an answer\n\n{ZH['stream_cut']}"
    assert len(openai.requests) == 1


def test_a_stop_ends_the_answer_at_once(bot, openai, redis_client):
    sim = bot()
    openai.script([o.text("part one"), o.sleep(8), o.text(" never"), *o.answer(" end")])
    first = sim.send(sim.text_message("tell me a long story"))
    stream_id = first["stream"]["id"]
    assert wait_until(lambda: "".join(redis_client.lrange(KEYS.stream_chunks(stream_id), 0, -1)) == "part one")
    stopped_at = time.monotonic()
    assert sim.send(sim.text_message("/stop"))["stream"]["content"] == ZH["stop_done"]
    conversation = sim.follow(first)
    assert time.monotonic() - stopped_at < 3
    assert conversation.text == f"part one\n\n{ZH['stopped_note']}"


def test_content_rules_mask_a_word_split_across_deltas(bot, openai, tmp_path):
    rules = tmp_path / "rules.txt"
    rules.write_text("机密文件\n", encoding="utf-8")
    openai.script([o.text("这是机密"), o.sleep(0.1), o.text("文件内容"), *o.answer("。")])
    assert bot(content_rules_file=str(rules)).ask("说说").text == f"这是{MASK * 4}内容。"


def test_an_image_goes_as_an_image_part_with_vision_and_is_left_out_without(bot, openai):
    sim = bot(openai_vision=True)
    openai.script(o.answer("I see it."))
    url = sim.inbox.host(PNG, filename="cat.png")
    conversation = sim.follow(sim.send(sim.message("image", {"url": url})))
    assert conversation.text == "I see it."
    text, image = openai.completions()[0]["messages"][-1]["content"]  # the words an image alone is asked with
    assert text == {"type": "text", "text": ZH["image_query"]}
    assert image["type"] == "image_url" and image["image_url"]["url"].startswith("data:image/png;base64,")
    blind = bot()
    refused = blind.follow(blind.send(blind.message("image", {"url": url})))
    assert refused.text == ZH["images_unsupported"]
    assert len(openai.requests) == 1


def test_a_bot_on_an_openai_server_asks_dify_nothing(bot, dify):
    """Its welcome is WELCOME_MESSAGE's (no app opening statement to read), and no Dify call is made for it."""
    greeted = bot(welcome_message="Hello from the model bot.")
    assert greeted.send(greeted.event_message("enter_chat"))["text"]["content"] == "Hello from the model bot."
    silent = bot()
    assert silent.send(silent.event_message("enter_chat")) is None
    assert dify.info_requests == 0 and dify.requests == []


def test_a_check_of_a_backends_address_and_key_says_why_in_the_settings_words():
    """The clients' access_problem, shared: which setting to fix, and never the key."""
    from services.transport.errors import (
        BackendConnectionError,
        BackendHTTPError,
        BackendStreamCut,
        BackendTimeout,
        access_problem_of,
    )

    def said(exc):
        return access_problem_of(exc, 5.0, "OPENAI_API_KEY", "OPENAI_BASE_URL should end in /v1", "the server")

    assert said(BackendHTTPError(401, "", "no")) == "the key was refused (HTTP 401): check OPENAI_API_KEY"
    assert said(BackendHTTPError(404, "", "no")) == "HTTP 404: OPENAI_BASE_URL should end in /v1"
    assert said(BackendHTTPError(500, "oops", "no")) == "it answered HTTP 500 (oops)"
    assert said(BackendTimeout("slow")) == "it did not answer within 5 s"
    assert said(BackendConnectionError("refused")) == "nothing answers there: is the server running at that address?"
    with pytest.raises(BackendStreamCut):
        said(BackendStreamCut("cut"))
