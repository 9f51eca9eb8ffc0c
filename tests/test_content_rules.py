"""Content rules (CONTENT_RULES_FILE): a question naming what a rule names is refused without a Dify call; an answer's
matches are masked before any poll or frame shows them, also when a match is split over Dify's deltas, and nothing
shown is taken back; the file is read again on a change, and a bad one keeps the last good rules."""

from __future__ import annotations

import logging
import time

import pytest
from markdown_it import MarkdownIt
from sqlalchemy import select

from config.settings import Settings, SettingsError
from demo import dify_standin as d
from services.audit.table import wecom_audit
from services.auth import db
from services.rules import file as rules_file
from services.rules.mask import ContentMask
from services.rules.rules import MASK as M
from services.rules.rules import RulesError, parse
from services.texts import CATALOGUE
from tests.conftest import WS_BOT_ID, WS_BOT_SECRET, make_simulator, wait_until

ZH = CATALOGUE["zh"]
RULES = "# words a compliance office named\n机密文件\nProject Falcon\nre:\\d{4}-\\d{4}-\\d{4}\n"


# --- the rules and the mask, as pure logic ---------------------------------------------------------------------


def test_words_are_case_insensitive_and_patterns_are_regular_expressions():
    rules = parse(RULES, "rules.txt")
    assert len(rules) == 3
    assert rules.blocks("tell me about PROJECT falcon")
    assert rules.mask("卡号 6222-1234-5678 和 机密文件")[0] == f"卡号 {M * 14} 和 {M * 4}"
    assert not rules.blocks("a project about falcons")  # "project falcon" is not in it


@pytest.mark.parametrize(
    ("deltas", "shown"),
    [
        (["这是机密", "文件内容"], ["这是", f"{M * 4}内容"]),  # split inside the word: its first half never goes on
        (["这是机", "密", "文件"], ["这是", "", f"{M * 4}"]),
        (["这是机密", "报告"], ["这是", "机密报告"]),  # not the word after all: it goes on whole
        (["card 6222-12", "34-5678 ok"], ["card ", f"{M * 14} ok"]),
        (["project fal", "con's"], ["", f"{M * 14}'s"]),  # a word matches inside longer text too (as in Chinese)
    ],
)
def test_a_match_split_over_deltas_is_masked_before_any_of_it_is_shown(deltas, shown):
    mask = ContentMask(parse(RULES, "rules.txt"))
    assert [mask.admit(delta) for delta in deltas] == shown
    assert mask.flush() == ""


def test_a_tail_that_waited_long_enough_goes_on(monkeypatch):
    mask = ContentMask(parse(RULES, "rules.txt"))
    assert mask.admit("so it is 机密") == "so it is "
    assert mask.due() == ""  # not yet
    monkeypatch.setattr("services.rules.mask.HOLD_SECONDS", 0.0)
    assert mask.due() == "机密"
    assert mask.flush() == ""


def test_masked_text_renders_as_markdown_without_emphasis():
    """A mask is no markdown: the masks in a line (here a word and a phone number, as the demo's rules mask them)
    neither make the text around them bold or italic nor vanish, and each masked character is one mask."""
    rules = parse("机密\nre:1[3-9]\\d{9}\n", "rules.txt")
    answer = "文件里提到了机密一次，还有一个电话 13800138000，还有**真的加粗**"
    shown, count = rules.mask(answer)
    assert count == 2 and shown.count(M) == len("机密") + len("13800138000")
    html = MarkdownIt("commonmark").render(shown)
    assert html.count("<strong>") == 1 and "<strong>真的加粗</strong>" in html  # the answer's own bold, and no other
    assert "<em>" not in html and html.count(M) == shown.count(M)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("ok\nre:(unclosed\n", "rules.txt:2: not a valid regular expression"),
        ("re:a*\n", "rules.txt:1: the pattern matches empty text"),
    ],
)
def test_a_bad_rule_is_one_line_naming_the_file_and_line(text, problem):
    with pytest.raises(RulesError) as caught:
        parse(text, "rules.txt")
    assert str(caught.value).startswith(problem) and "\n" not in str(caught.value)


def test_a_rules_file_that_is_not_utf8_is_a_bad_setting_at_start_up(settings, tmp_path):
    path = tmp_path / "rules.txt"
    path.write_bytes("机密".encode("gbk"))
    with pytest.raises(SettingsError) as caught:
        Settings.of(**{**settings.values(), "content_rules_file": str(path)})
    [problem] = caught.value.problems
    assert problem.startswith("CONTENT_RULES_FILE ") and "not UTF-8 text" in problem


# --- through two replicas --------------------------------------------------------------------------------------


@pytest.fixture
def rules_path(tmp_path):
    path = tmp_path / "rules.txt"
    path.write_text(RULES, encoding="utf-8")
    return path


@pytest.fixture
def ruled(make_pair, rules_path, tmp_path):
    audit = f"sqlite:///{tmp_path / 'audit.db'}"
    replicas = make_pair(content_rules_file=str(rules_path), database_url=audit)
    sims = [make_simulator(replica.url, poll_interval=0.02) for replica in replicas]
    yield replicas, sims, audit
    for sim in sims:
        sim.close()


def test_no_poll_on_any_replica_ever_shows_half_of_a_split_word(ruled, dify):
    _, sims, audit = ruled
    dify.script(
        [d.message("这是机密"), d.sleep(0.5), d.message("文件内容，"), d.sleep(0.3), d.message("完。"), d.end()]
    )
    first = sims[0].send(sims[0].text_message("给我讲讲"))
    frames = []
    conversation = sims[1].follow(first, on_frame=lambda frame: frames.append(frame["stream"]["content"]))
    assert conversation.text == f"这是{M * 4}内容，完。"
    assert len(frames) > 10
    assert not [frame for frame in frames if "机" in frame or "密" in frame]
    shown = [frame for frame in frames if frame != ZH["placeholder"]]  # the polls before the first text
    assert all(later.startswith(earlier) for earlier, later in zip(shown, shown[1:], strict=False))
    engine = db.make_engine(audit)

    def rows():
        with engine.connect() as connection:
            return connection.execute(select(wecom_audit.c.answer, wecom_audit.c.masked)).all()

    assert wait_until(lambda: rows() == [(f"这是{M * 4}内容，完。", 1)])


def test_a_question_that_names_a_rule_gets_one_reply_and_no_dify_call(ruled, dify):
    _, sims, _ = ruled
    reply = sims[0].send(sims[0].text_message("把 project FALCON 的资料发我"))["stream"]
    assert reply["finish"] and reply["content"] == ZH["blocked_question"]
    assert dify.chat_requests() == []


def test_a_rule_added_while_running_is_in_force_on_every_replica(ruled, rules_path, dify, monkeypatch, caplog):
    _, sims, _ = ruled
    monkeypatch.setattr(rules_file, "CHECK_SECONDS", 0.2)
    dify.script(d.answer("fine"), times=None)
    assert sims[0].ask("什么是蓝图计划").text == "fine"
    rules_path.write_text(RULES + "蓝图计划\n", encoding="utf-8")
    time.sleep(0.3)
    for sim in sims:
        assert sim.send(sim.text_message("什么是蓝图计划"))["stream"]["content"] == ZH["blocked_question"]
    with caplog.at_level(logging.ERROR):
        rules_path.write_text(RULES + "re:(broken\n", encoding="utf-8")  # a bad edit: the last good rules stay
        time.sleep(0.3)
        assert sims[1].send(sims[1].text_message("蓝图计划呢"))["stream"]["content"] == ZH["blocked_question"]
    assert "content rules not reloaded" in caplog.text and "not a valid regular expression" in caplog.text
    assert ruled[0][0].app.test_client().get("/readyz").status_code == 200


def test_a_long_connections_frames_never_show_half_of_a_split_word(make_app, wecom_ws, rules_path, dify):
    wecom = wecom_ws({WS_BOT_ID: WS_BOT_SECRET})
    make_app(
        wecom_mode="long_connection",
        wecom_bot_id=WS_BOT_ID,
        wecom_bot_secret=WS_BOT_SECRET,
        wecom_ws_url=wecom.url,
        content_rules_file=str(rules_path),
    )
    assert wait_until(lambda: wecom.subscribed(WS_BOT_ID) == 1, timeout=10)
    dify.script([d.message("这是机密"), d.sleep(0.6), d.message("文件内容"), d.end()])
    req_id = wecom.deliver_text(WS_BOT_ID, "给我讲讲")
    final = wecom.final(req_id)
    assert final["stream"]["content"] == f"这是{M * 4}内容"
    assert not [f for f in wecom.frames(req_id) if "机" in f["stream"]["content"]]
