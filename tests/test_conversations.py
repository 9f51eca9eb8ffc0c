"""Conversation continuity, commands, group chats and quotes, end to end through the simulator."""

import threading

import pytest

from demo import dify_standin as d
from services.texts import CATALOGUE
from tests.conftest import make_simulator

ZH = CATALOGUE["zh"]


def requests_for(dify, user="wecom:demo-bot:alice"):
    return [r for r in dify.chat_requests() if r["user"] == user]


def test_the_next_message_continues_the_conversation(simulator, dify, redis_client):
    dify.script(d.answer("first"))
    dify.script(d.answer("second"))
    simulator.ask("one", userid="alice")
    simulator.ask("two", userid="alice")
    first, second = dify.chat_requests()
    assert "conversation_id" not in first
    key = "conversation:demo-bot:single:alice"
    assert second["conversation_id"] == redis_client.get(key)
    assert 7 * 24 * 3600 - 10 < redis_client.ttl(key) <= 7 * 24 * 3600


def test_conversations_survive_a_restart_and_other_replicas(make_app, serve, dify):
    dify.script(d.answer("ok"), times=None)
    sim = make_simulator(serve(make_app(replica_id="before-restart")).url)
    sim.ask("remember me")
    sim.close()
    sim = make_simulator(serve(make_app(replica_id="after-restart")).url)
    sim.ask("still there?")
    first, second = dify.chat_requests()
    [created] = dify.conversations  # the one conversation Dify made for the first message
    assert "conversation_id" not in first
    assert second["conversation_id"] == created
    sim.close()


def test_the_ttl_is_a_setting(make_app, serve, dify, redis_client):
    sim = make_simulator(serve(make_app(conversation_ttl_seconds=120)).url)
    dify.script(d.answer("ok"))
    sim.ask("short memory")
    assert 100 < redis_client.ttl("conversation:demo-bot:single:alice") <= 120
    sim.close()


@pytest.mark.parametrize("how", ["deleted", "completed"])
def test_a_lost_conversation_is_dropped_and_the_question_retried_once(simulator, dify, redis_client, how):
    dify.script(d.answer("first"))
    simulator.ask("one")
    old = redis_client.get("conversation:demo-bot:single:alice")
    if how == "deleted":
        del dify.conversations[old]  # deleted in Dify, or the app was recreated
    else:
        dify.completed.add(old)
    dify.script(d.answer("fresh start"))
    assert simulator.ask("two").text == "fresh start"
    requests = dify.chat_requests()
    assert len(requests) == 3
    assert requests[1]["conversation_id"] == old
    assert "conversation_id" not in requests[2]
    new = redis_client.get("conversation:demo-bot:single:alice")
    assert new
    assert new != old


def test_the_conversation_is_remembered_even_if_the_answer_fails(simulator, dify, redis_client):
    dify.script([d.message("part"), d.cut()])
    simulator.ask("one")
    assert redis_client.get("conversation:demo-bot:single:alice")


@pytest.mark.parametrize("command", ["/new", "/reset", "/NEW"])
def test_new_starts_a_fresh_conversation_and_says_so(simulator, dify, redis_client, command):
    dify.script(d.answer("first"))
    simulator.ask("one")
    reply = simulator.send(simulator.text_message(command))
    assert reply["stream"]["finish"] is True
    assert reply["stream"]["content"] == ZH["new_conversation"]
    assert not redis_client.exists("conversation:demo-bot:single:alice")
    assert len(dify.chat_requests()) == 1
    dify.script(d.answer("second"))
    simulator.ask("two")
    assert "conversation_id" not in dify.chat_requests()[1]


def test_new_with_a_question_asks_it_in_a_fresh_conversation(simulator, dify):
    dify.script(d.answer("first"))
    simulator.ask("one")
    dify.script(d.answer("fresh answer"))
    assert simulator.ask("/new what is new?").text == "fresh answer"
    last = dify.chat_requests()[-1]
    assert last["query"] == "what is new?"
    assert "conversation_id" not in last


def test_help(simulator, dify):
    reply = simulator.send(simulator.text_message("/help"))
    assert reply["stream"]["content"] == ZH["help"]
    assert reply["stream"]["finish"] is True
    assert dify.chat_requests() == []


def test_group_messages_lose_the_leading_mention_and_keep_one_conversation_per_user(simulator, dify, redis_client):
    dify.script(d.answer("ok"), times=None)
    simulator.ask("@AI助手 what is the plan?", userid="alice", chatid="group-1")
    simulator.ask("@AI助手\u2005and the budget?", userid="alice", chatid="group-1")
    simulator.ask("@AI助手 hi", userid="bob", chatid="group-1")
    simulator.ask("private question", userid="alice")
    queries = [r["query"] for r in dify.chat_requests()]
    assert queries == ["what is the plan?", "and the budget?", "hi", "private question"]
    alice_group = redis_client.get("conversation:demo-bot:group-1:alice")
    bob_group = redis_client.get("conversation:demo-bot:group-1:bob")
    alice_single = redis_client.get("conversation:demo-bot:single:alice")
    assert len({alice_group, bob_group, alice_single}) == 3
    assert dify.chat_requests()[1]["conversation_id"] == alice_group
    assert "conversation_id" not in dify.chat_requests()[2]


def test_a_configured_bot_name_with_spaces_is_stripped(make_app, serve, dify):
    sim = make_simulator(serve(make_app(wecom_bot_name="AI 助手")).url)
    dify.script(d.answer("ok"))
    sim.ask("@AI 助手 summarise this", chatid="group-2")
    assert dify.chat_requests()[0]["query"] == "summarise this"
    sim.close()


def test_two_users_writing_at_once_in_a_group_never_mix(simulator, dify):
    dify.script(d.answer("answer for ALICE only", delay=0.02), match="from alice", times=None)
    dify.script(d.answer("answer for BOB only", delay=0.02), match="from bob", times=None)
    results = {}
    barrier = threading.Barrier(4)

    def ask(userid, n):
        barrier.wait()
        results[(userid, n)] = simulator.ask(f"@bot question {n} from {userid}", userid=userid, chatid="team")

    threads = [threading.Thread(target=ask, args=(u, n)) for u in ("alice", "bob") for n in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (userid, _), conversation in results.items():
        expected = f"answer for {userid.upper()} only"
        assert conversation.text == expected
        # every frame the user saw was a piece of their own answer, never the other user's
        assert all(c == ZH["placeholder"] or expected.startswith(c) for c in conversation.contents())
    users = {r["user"] for r in dify.chat_requests()}
    assert users == {"wecom:demo-bot:alice", "wecom:demo-bot:bob"}


def test_a_quoted_message_is_given_as_context(simulator, dify):
    dify.script(d.answer("ok"))
    quote = {"msgtype": "text", "text": {"content": "The launch moves to May.\nBudget unchanged."}}
    first = simulator.send(simulator.text_message("is that final?", quote=quote))
    simulator.follow(first)
    query = dify.chat_requests()[0]["query"]
    assert query == "我引用了这条消息：\n> The launch moves to May.\n> Budget unchanged.\n\nis that final?"


@pytest.mark.parametrize(
    ("quote", "marker"),
    [
        ({"msgtype": "voice", "voice": {"content": "spoken words"}}, "spoken words"),
        ({"msgtype": "file", "file": {"url": "https://x/y"}}, ZH["quoted_file"]),
        ({"msgtype": "mixed", "mixed": {"msg_item": [{"msgtype": "text", "text": {"content": "look"}}]}}, "look"),
    ],
)
def test_other_quoted_kinds(simulator, dify, quote, marker):
    dify.script(d.answer("ok"))
    simulator.follow(simulator.send(simulator.text_message("and this?", quote=quote)))
    assert f"> {marker}" in dify.chat_requests()[0]["query"]
