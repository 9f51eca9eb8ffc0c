"""Bots answered by a real OpenAI-compatible server, as in production: LiteLLM's proxy (litellm[proxy] 1.79.3 from
PyPI, demo/litellm_proxy.py) in front of the model-server stand-in (demo/openai_standin.py: slow, failing,
reasoning and usage-bearing answers on demand), and two gunicorn replicas (two workers each) serving four bots of
one BOTS_FILE: `model` (callback mode, with content rules), `refused` (a key the proxy refuses), `misrouted` (a
model whose origin refuses the proxy's key) and `ws` (long-connection mode), with the audit trail on.

What LiteLLM was measured to do here, which the tests pin: a key it does not know, with no database of its own,
is a 400 ("No connected db."), a key its origin refuses a 401; an origin's 503 stays a 503; an origin's stream cut
mid-answer becomes a finish_reason "stop" and [DONE] (the proxy hides the cut: the gateway cannot tell it from a
whole answer; chunks the origin sent in the moment of the cut may be lost with it); the usage chunk carries an empty
delta in its choices.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path

import httpx
import pytest
import redis
from sqlalchemy import select

from config.bots import bot_keys
from demo import openai_standin as o
from demo.litellm_proxy import MISSING, LiteLLMProxy, Route, litellm_binary
from demo.redis_server import PrivateRedisServer
from demo.replicas import GunicornReplica
from demo.wecom_simulator import WeComSimulator
from demo.wecom_ws_standin import WeComWebSocketStandIn
from services.audit.table import wecom_audit
from services.auth import db
from services.keys import Keys
from services.rules.rules import MASK
from services.texts import CATALOGUE
from tests.conftest import OPENAI_KEY, OPENAI_MODEL, wait_until

pytestmark = pytest.mark.e2e
ZH = CATALOGUE["zh"]
MASTER_KEY = "sk-litellm-master-0123"
MODEL = "wecom-model"  # what the bots ask the proxy for; it asks the origin for OPENAI_MODEL
WS_BOT, WS_SECRET = "openai-ws-bot", "openai-ws-secret"
# (bot, callback path, token, EncodingAESKey, the key it sends, the model it asks for)
CALLBACK_BOTS = {
    "model": ("/wecom/callback/model", "model-token", "ModelKey" + "0123456789" * 3 + "abcde", MASTER_KEY, MODEL),
    "refused": ("/wecom/callback/refused", "refused-token", "RefusedKey" + "0123456789" * 3 + "abc", "sk-no", MODEL),
    "misrouted": ("/wecom/callback/misrouted", "misrouted-tok", "Misrouted" + "0123456789" * 3 + "abcd", MASTER_KEY,
                  "misrouted"),
}  # fmt: skip
LEASE_SECONDS = 3
RULE_WORD = "机密代号"


@pytest.fixture(scope="module")
def litellm(openai_server, tmp_path_factory):
    if litellm_binary() is None:
        pytest.exit(MISSING, returncode=3)
    routes = [
        Route(MODEL, openai_server.base_url, OPENAI_KEY, OPENAI_MODEL),
        Route("misrouted", openai_server.base_url, "sk-not-the-origins-key", OPENAI_MODEL),
    ]
    proxy = LiteLLMProxy(routes, MASTER_KEY, tmp_path_factory.mktemp("litellm")).start()
    yield proxy
    proxy.stop()


@pytest.fixture
def origin(openai_server):
    """The model server behind the proxy, with no scripts and no recorded requests."""
    openai_server.reset()
    openai_server.delay = 0.005
    yield openai_server
    openai_server.reset()


class Deployment:
    """Two replicas of the four bots, their Redis, WeCom's long-connection server and the audit table."""

    def __init__(self, directory: Path, litellm: LiteLLMProxy, database_url: str):
        self.directory = directory
        self.redis = PrivateRedisServer(directory / "redis").start()
        self.store = redis.Redis.from_url(self.redis.url, decode_responses=True)
        self.wecom = WeComWebSocketStandIn({WS_BOT: WS_SECRET}).start()
        self.database_url = database_url
        rules = directory / "rules.txt"
        rules.write_text(RULE_WORD + "\n", encoding="utf-8")
        env = {
            "DEMO_MODE": "false",
            "BOTS_FILE": str(self._bots_file(litellm, rules)),
            "REDIS_URL": self.redis.url,
            "DATABASE_URL": database_url,
            "AUTH_MODE": "none",
            "LOG_LEVEL": "INFO",
            "STREAM_LEASE_SECONDS": str(LEASE_SECONDS),
            "STREAM_TAKEOVER_GRACE_SECONDS": "1.5",
            "DIFY_RETRY_SECONDS": "20",
            "GUNICORN_GRACEFUL_TIMEOUT": "10",
            "WECOM_WS_LEASE_SECONDS": str(LEASE_SECONDS),
        }
        self.replicas = [GunicornReplica(env, directory, f"replica-{n}", workers=2) for n in range(2)]
        for replica in self.replicas:
            replica.start(timeout=60)
        urls = [replica.url for replica in self.replicas]
        self.sims = {
            name: WeComSimulator(urls, token, key, callback_path=path, poll_interval=0.2)
            for name, (path, token, key, _, _) in CALLBACK_BOTS.items()
        }

    def _bots_file(self, litellm: LiteLLMProxy, rules: Path) -> Path:
        tables = [
            f'[bots.{name}]\ncallback_path = "{path}"\ntoken = "{token}"\nencoding_aes_key = "{key}"\n'
            f'backend = "openai"\nopenai_base_url = "{litellm.base_url}"\nopenai_api_key = "{api_key}"\n'
            f'openai_model = "{model}"\n' + (f'content_rules_file = "{rules}"\n' if name == "model" else "")
            for name, (path, token, key, api_key, model) in CALLBACK_BOTS.items()
        ]
        tables.append(
            f'[bots.ws]\nmode = "long_connection"\nbot_id = "{WS_BOT}"\nsecret = "{WS_SECRET}"\n'
            f'wecom_ws_url = "{self.wecom.url}"\nbackend = "openai"\nopenai_base_url = "{litellm.base_url}"\n'
            f'openai_api_key = "{MASTER_KEY}"\nopenai_model = "{MODEL}"\n'
        )
        path = self.directory / "bots.toml"
        path.write_text("\n".join(tables))
        return path

    def revive(self) -> None:
        """Start again any replica a test killed, so that the next test has two."""
        for index, replica in enumerate(self.replicas):
            if replica.process is None or replica.process.poll() is not None:
                self.replicas[index] = GunicornReplica(replica.env, self.directory, replica.name, workers=2)
                self.replicas[index].port = replica.port  # the simulators know the replicas by their addresses
                self.replicas[index].env["PORT"] = str(replica.port)
                self.replicas[index].start(timeout=60)

    def owner(self, stream_id: str, bot: str = "model") -> GunicornReplica:
        owner = self.store.hget(Keys(bot_keys(bot)).stream(stream_id), "owner") or ""
        return next(replica for replica in self.replicas if replica.name == owner.split(":")[0])

    def audit_rows(self, msgid: str) -> list:
        engine = db.make_engine(self.database_url)
        try:
            with engine.connect() as connection:
                return list(connection.execute(select(wecom_audit).where(wecom_audit.c.msgid == msgid)))
        finally:
            engine.dispose()

    def stop(self) -> None:
        for sim in self.sims.values():
            sim.close()
        for replica in self.replicas:
            replica.stop()
        self.wecom.stop()
        self.store.close()
        self.redis.stop()


@pytest.fixture(scope="module")
def deployment(litellm, mysql_databases, tmp_path_factory):
    started = Deployment(tmp_path_factory.mktemp("openai-e2e"), litellm, mysql_databases("openai_e2e"))
    yield started
    started.stop()


@pytest.fixture
def sim(deployment):
    deployment.revive()
    return deployment.sims["model"]


def ask(sim: WeComSimulator, text: str, userid: str):
    return sim.ask(text, userid=userid, window=60)


def test_an_answer_streams_through_litellm_polled_on_either_replica_and_is_audited(sim, deployment, origin):
    # nine words 0.3 s apart: the answer streams for about 3 s, so polls a second apart see it grow (at 0.08 s the
    # whole answer fit between two polls now and then: one fresh-clone CI saw one bubble text only)
    origin.script(o.answer("A real proxy streamed this answer to the bubble.", delay=0.3))
    payload = sim.text_message("stream it", userid="e2e-alice")
    conversation = sim.follow(sim.send(payload, replica=0), userid="e2e-alice", window=60)
    assert conversation.finished
    assert conversation.text == "A real proxy streamed this answer to the bubble."
    shown = [text for text in conversation.contents() if text != ZH["placeholder"]]
    assert len(shown) >= 2 and all(b.startswith(a) for a, b in zip(shown, shown[1:], strict=False))
    [body] = origin.completions()
    assert body["model"] == OPENAI_MODEL and body["stream"] is True
    assert body["messages"][-1] == {"role": "user", "content": "stream it"}
    assert wait_until(lambda: deployment.audit_rows(payload["msgid"]), timeout=20)
    [row] = deployment.audit_rows(payload["msgid"])
    assert (row.backend, row.model, row.outcome) == ("openai", MODEL, "answered")
    assert row.answer == conversation.text and row.completion_tokens == len(conversation.text.split(" "))
    assert row.prompt_tokens and len(row.trace_id) == 32


def test_the_conversation_goes_on_across_turns_and_replicas_until_new(sim, origin):
    origin.script(o.answer("Paris."))
    origin.script(o.answer("About two million."))
    origin.script(o.answer("Fresh start."))
    assert ask(sim, "the capital of France?", "e2e-bob").text == "Paris."
    assert ask(sim, "how many live there?", "e2e-bob").text == "About two million."
    second = origin.completions()[1]["messages"]
    assert second == [
        {"role": "user", "content": "the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "how many live there?"},
    ]
    sim.send(sim.text_message("/new", userid="e2e-bob"))
    assert ask(sim, "hello again", "e2e-bob").text == "Fresh start."
    assert origin.completions()[2]["messages"] == [{"role": "user", "content": "hello again"}]


def test_a_stop_sent_to_the_other_replica_ends_the_answer(sim, origin, deployment):
    origin.script(o.answer(" ".join(f"word{n}" for n in range(200)), delay=0.1))
    first = sim.send(sim.text_message("a long one", userid="e2e-carol"), replica=0)
    stream_id = first["stream"]["id"]
    key = Keys(bot_keys("model")).stream_chunks(stream_id)
    assert wait_until(lambda: "word3" in "".join(deployment.store.lrange(key, 0, -1)), timeout=15)
    sim.send(sim.text_message("/stop", userid="e2e-carol"), replica=1)
    conversation = sim.follow(first, userid="e2e-carol", window=30)
    assert conversation.text.startswith("word0 word1 word2") and conversation.text.endswith(ZH["stopped_note"])
    assert "word199" not in conversation.text
    assert len(origin.completions()) == 1


def test_an_owner_killed_mid_answer_ends_honestly_and_the_server_is_asked_once(sim, origin, deployment):
    """Such a server keeps no run another replica could follow: the bubble keeps what it showed and says the answer
    was interrupted; nothing asks the server a second time."""
    origin.script(o.answer(" ".join(f"part{n}" for n in range(100)), delay=0.1))
    first = sim.send(sim.text_message("then die", userid="e2e-dave"))
    stream_id = first["stream"]["id"]
    key = Keys(bot_keys("model")).stream_chunks(stream_id)
    assert wait_until(lambda: "part5" in "".join(deployment.store.lrange(key, 0, -1)), timeout=15)
    deployment.owner(stream_id).kill()
    conversation = sim.follow(first, userid="e2e-dave", window=60)
    assert conversation.finished
    assert conversation.text.startswith("part0 part1") and conversation.text.endswith(ZH["orphaned"])
    assert len(origin.completions()) == 1


def test_a_key_the_proxy_refuses_says_so_once(deployment, origin, litellm):
    """LiteLLM with a master key and no database answers an unknown key with a 400: misconfigured, never asked
    again."""
    deployment.revive()
    conversation = ask(deployment.sims["refused"], "hello", "e2e-erin")
    assert conversation.finished and conversation.text == ZH["dify_rejected"]
    assert origin.completions() == []
    assert (
        "No connected db."
        in httpx.post(
            f"{litellm.base_url}/chat/completions",
            headers={"Authorization": "Bearer sk-no"},
            json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]},
            timeout=10,
        ).text
    )  # (what the gateway met: the proxy's own words)
    logs = "".join(replica.logs() for replica in deployment.replicas)
    assert re.search(r"sk-no(?!t-the)", logs) is None and MASTER_KEY not in logs  # no key in any log line


def test_a_key_the_origin_refuses_behind_the_proxy_says_so_once(deployment, origin):
    deployment.revive()
    conversation = ask(deployment.sims["misrouted"], "hello", "e2e-frank")
    assert conversation.finished and conversation.text == ZH["dify_rejected"]
    assert len(origin.completions()) == 1  # the proxy asked; the gateway did not ask again


def test_a_503_is_asked_again_and_the_answer_comes(sim, origin):
    origin.script([o.http_error(503, "overloaded", "server_error")], match="busy", times=1)
    origin.script(o.answer("Answered after a 503."), match="busy")
    conversation = ask(sim, "busy now?", "e2e-grace")
    assert conversation.text == "Answered after a 503."
    assert len(origin.completions()) == 2


def test_an_answer_cut_at_the_models_length_limit_says_so(sim, origin):
    origin.script(o.answer("It goes on and on", reason="length"))
    conversation = ask(sim, "tell me everything", "e2e-heidi")
    assert conversation.text == "It goes on and on\n\n" + ZH["answer_cut_at_limit"]


def test_a_ruled_word_split_across_chunks_is_masked(sim, origin):
    origin.script([o.text("代号是"), o.text(RULE_WORD[:2]), o.sleep(0.3), o.text(RULE_WORD[2:] + "。"), o.finish()])
    conversation = ask(sim, "what is the code name?", "e2e-ivan")
    assert conversation.text == "代号是" + MASK * len(RULE_WORD) + "。"
    assert all(RULE_WORD[:2] not in text for text in conversation.contents())  # never half shown


def test_a_stream_the_origin_cuts_reaches_the_bubble_as_litellm_ends_it(sim, origin):
    """LiteLLM ends an origin's cut stream with finish_reason "stop": the bubble shows what came, as a whole answer
    (the proxy leaves nothing to tell the cut by). A cut in the same moment as the chunks before it loses those at
    the proxy too (1 run in 5 here): the bubble then says the AI returned nothing, a clear ending all the same."""
    origin.script([o.text("The first half "), o.text("and no more"), o.sleep(0.3), o.cut()])
    conversation = ask(sim, "cut me", "e2e-judy")
    assert conversation.finished and conversation.text == "The first half and no more"


def test_one_msgid_posted_to_both_replicas_at_once_asks_the_server_once(sim, origin):
    origin.script(o.answer("Only once.", delay=0.05), times=None, match="twice")
    payload = sim.text_message("twice at once", userid="e2e-ken")
    replies: list = [None, None]
    start = threading.Barrier(2)

    def post(replica: int) -> None:
        start.wait()
        replies[replica] = sim.send(payload, replica=replica)

    threads = [threading.Thread(target=post, args=(n,)) for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(15)
    assert replies[0]["stream"]["id"] == replies[1]["stream"]["id"]
    assert sim.follow(replies[0], userid="e2e-ken", window=30).text == "Only once."
    assert len(origin.completions()) == 1


def test_the_long_connection_bot_streams_and_keeps_the_conversation(deployment, origin):
    deployment.revive()
    wecom = deployment.wecom
    assert wait_until(lambda: wecom.subscribed(WS_BOT) == 1, timeout=20)
    origin.script(o.answer("Over the WebSocket, through the proxy.", delay=0.05))
    origin.script(o.answer("And the second turn."))
    first = wecom.deliver_text(WS_BOT, "first over ws", userid="e2e-lee")
    assert wecom.final(first)["stream"]["content"] == "Over the WebSocket, through the proxy."
    second = wecom.deliver_text(WS_BOT, "second over ws", userid="e2e-lee")
    assert wecom.final(second)["stream"]["content"] == "And the second turn."
    assert origin.completions()[1]["messages"][:2] == [
        {"role": "user", "content": "first over ws"},
        {"role": "assistant", "content": "Over the WebSocket, through the proxy."},
    ]
