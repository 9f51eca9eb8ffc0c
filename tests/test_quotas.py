"""Daily quotas of questions, per user and per group chat, across two replicas on the test Redis: a message is counted
once whatever WeCom repeats, a question over a quota is answered at once with when it renews and never reaches
Dify, and an operator sees and resets the counts (`flask --app app quota`)."""

from __future__ import annotations

import re

import pytest
from sqlalchemy import select

from demo import dify_standin as d
from services.audit.table import wecom_audit
from services.auth import db
from tests.conftest import make_simulator, wait_until

RENEWS = re.compile(r"\d{4}-\d\d-\d\d 00:00 \(Asia/Shanghai\)")


@pytest.fixture
def quota_pair(make_pair, tmp_path):
    audit = f"sqlite:///{tmp_path / 'audit.db'}"
    replicas = make_pair(quota_user_messages_per_day=2, quota_chat_messages_per_day=3, database_url=audit)
    sims = [make_simulator(replica.url) for replica in replicas]
    yield replicas, sims, audit
    for sim in sims:
        sim.close()


def test_a_users_quota_counts_each_message_once_across_replicas(quota_pair, dify):
    replicas, sims, audit = quota_pair
    dify.script(d.answer("answered"), times=None)
    assert sims[0].ask("one").text == "answered"
    second = sims[1].text_message("two")
    assert sims[1].follow(sims[1].send(second)).text == "answered"
    assert sims[0].send(second)["stream"]["content"] == "answered"  # WeCom's retry, elsewhere: not a third question
    third = sims[1].text_message("three")
    refused = sims[1].send(third)["stream"]
    assert refused["finish"] and RENEWS.search(refused["content"])
    assert refused["content"].startswith("你今天的 2 次提问已用完")
    assert sims[0].send(third)["stream"]["content"] == refused["content"]  # its retry: the same answer
    assert len(dify.chat_requests()) == 2  # the refused question never reached Dify
    assert sims[0].ask("from someone else", userid="bob").text == "answered"  # bob has his own quota

    engine = db.make_engine(audit)

    def outcomes() -> dict[str, str]:
        with engine.connect() as connection:
            return dict(connection.execute(select(wecom_audit.c.question, wecom_audit.c.outcome)).all())

    # Each replica sweeps its own rows, so they go in in no set order: wait for all four.
    expected = {"one": "answered", "two": "answered", "three": "over_quota", "from someone else": "answered"}
    assert wait_until(lambda: outcomes() == expected), outcomes()


def test_a_group_chats_quota_is_shared_by_its_members(quota_pair, dify):
    _, sims, _ = quota_pair
    dify.script(d.answer("answered"), times=None)
    for i, member in enumerate(("bob", "carol", "dave")):
        assert sims[i % 2].ask(f"@bot question {i}", userid=member, chatid="team").text == "answered"
    refused = sims[0].send(sims[0].text_message("@bot one more", userid="erin", chatid="team"))["stream"]
    assert refused["content"].startswith("本群今天的 3 次提问已用完")
    assert sims[1].ask("in my own chat", userid="erin").text == "answered"  # erin's own quota is untouched
    assert len(dify.chat_requests()) == 4


def test_an_operator_sees_and_resets_a_users_count(quota_pair, dify):
    replicas, sims, _ = quota_pair
    dify.script(d.answer("answered"), times=None)
    for question in ("one", "two"):
        assert sims[0].ask(question).text == "answered"
    assert "已用完" in sims[0].send(sims[0].text_message("three"))["stream"]["content"]
    cli = replicas[1].app.test_cli_runner()
    shown = cli.invoke(args=["quota", "show", "--user", "alice"])
    assert shown.exit_code == 0 and re.search(r"default\s+2\s+2", shown.output), shown.output
    assert "reset" in cli.invoke(args=["quota", "reset", "--user", "alice"]).output
    assert sims[1].ask("three again").text == "answered"
    assert cli.invoke(args=["quota", "show"]).exit_code != 0  # neither a user nor a chat named: a usage error
