"""GROUP_CONVERSATION=shared: one Dify conversation per group chat (a fixed Dify user for the group), so members
continue each other's thread, across replicas; each asker is still authorized on their own; `/new` in such a group
starts the group afresh, only for a member who may ask. Two replicas on the test Redis, the real MariaDB for the
user table, the auth and Dify stand-ins."""

from __future__ import annotations

import pytest

from demo import dify_standin as d
from services.texts import CATALOGUE
from tests.conftest import make_simulator
from tests.test_auth import external_auth

ZH = CATALOGUE["zh"]
GROUP_KEY = "conversation:demo-bot:group-1:#group"
GROUP_USER = "wecom:demo-bot:group:group-1"


@pytest.fixture
def sims(make_pair, request):
    changes = getattr(request, "param", {"group_conversation": "shared"})
    made = [make_simulator(server.url) for server in make_pair(**changes)]
    yield made
    for sim in made:
        sim.close()


def test_members_of_a_group_continue_one_conversation_across_replicas(sims, dify, redis_client):
    dify.script(d.answer("ok"), times=None)
    sims[0].ask("@bot what is the plan?", userid="alice", chatid="group-1")
    sims[1].ask("@bot and the budget for it?", userid="bob", chatid="group-1")
    first, second = dify.chat_requests()
    assert first["user"] == second["user"] == GROUP_USER
    assert "conversation_id" not in first
    assert second["conversation_id"] == redis_client.get(GROUP_KEY) == next(iter(dify.conversations))
    # Who asked still reaches the app (the inputs it declares): each message's own asker.
    assert redis_client.get("conversation:demo-bot:group-1:alice") is None


def test_a_members_one_to_one_chat_stays_their_own(sims, dify, redis_client):
    dify.script(d.answer("ok"), times=None)
    sims[0].ask("@bot group question", userid="alice", chatid="group-1")
    sims[1].ask("private question", userid="alice")
    group, private = dify.chat_requests()
    assert private["user"] == "wecom:demo-bot:alice" and "conversation_id" not in private
    assert redis_client.get("conversation:demo-bot:single:alice") not in (None, redis_client.get(GROUP_KEY))


@pytest.mark.parametrize("sims", [{}], indirect=True, ids=["per_user"])
def test_by_default_each_member_has_their_own_conversation(sims, dify, redis_client):
    dify.script(d.answer("ok"), times=None)
    sims[0].ask("@bot one", userid="alice", chatid="group-1")
    sims[1].ask("@bot two", userid="bob", chatid="group-1")
    first, second = dify.chat_requests()
    assert (first["user"], second["user"]) == ("wecom:demo-bot:alice", "wecom:demo-bot:bob")
    assert "conversation_id" not in second
    assert redis_client.get(GROUP_KEY) is None


def test_new_in_a_shared_group_starts_the_group_afresh(sims, dify, redis_client):
    dify.script(d.answer("ok"), times=None)
    sims[0].ask("@bot first", userid="alice", chatid="group-1")
    reply = sims[1].send(sims[1].text_message("@bot /new", userid="bob", chatid="group-1"))
    assert reply["stream"]["content"] == ZH["new_group_conversation"]
    assert redis_client.get(GROUP_KEY) is None
    sims[0].ask("@bot second", userid="alice", chatid="group-1")
    assert "conversation_id" not in dify.chat_requests()[1]


@pytest.fixture
def auth_sims(make_pair, mysql_url, auth, user_table):
    user_table.add("alice", "alice@corp.example", "Alice")
    user_table.add("dave", "dave@corp.example", "Dave", enabled=False)
    replicas = make_pair(group_conversation="shared", **external_auth(auth, mysql_url))
    made = [make_simulator(server.url) for server in replicas]
    yield made
    for sim in made:
        sim.close()


def test_each_asker_in_a_shared_group_is_authorized_on_their_own(auth_sims, dify, redis_client):
    dify.script(d.answer("ok"), times=None)
    assert auth_sims[0].ask("@bot first", userid="alice", chatid="group-1").text == "ok"
    refused = auth_sims[1].ask("@bot my turn", userid="dave", chatid="group-1")
    assert refused.text == ZH["user_disabled"]
    assert len(dify.chat_requests()) == 1
    # A member who may not ask cannot start the group's conversation afresh either.
    reply = auth_sims[1].send(auth_sims[1].text_message("@bot /new", userid="dave", chatid="group-1"))
    assert reply["stream"]["content"] == ZH["user_disabled"]
    assert redis_client.get(GROUP_KEY) == next(iter(dify.conversations))
    reply = auth_sims[0].send(auth_sims[0].text_message("@bot /reset", userid="alice", chatid="group-1"))
    assert reply["stream"]["content"] == ZH["new_group_conversation"]
    assert redis_client.get(GROUP_KEY) is None
