"""Several bots in one deployment, as in production: two gunicorn replicas (two workers each) read one BOTS_FILE,
share the test Redis and the real MariaDB with external auth, and each bot is answered by its own Dify app (a Dify
stand-in of its own, or, for `sales`, the same app as `hr`). Each bot's WeCom simulator signs with that bot's
Token and EncodingAESKey."""

import threading
import time

import httpx
import pytest

from demo import dify_standin as d
from demo.replicas import GunicornReplica
from demo.wecom_simulator import ReplyError, WeComSimulator
from services.texts import CATALOGUE
from tests.conftest import AES_KEY, AUTH_KEY, DIFY_KEY, TOKEN, wait_until
from tests.e2e.conftest import replica_env

pytestmark = pytest.mark.e2e
ZH, EN = CATALOGUE["zh"], CATALOGUE["en"]
IT_TOKEN, IT_AES_KEY, IT_DIFY_KEY = "it-token-9", "ITkeyForTheHelpdeskBot0123456789abcdefghijk", "app-it"
SALES_TOKEN, SALES_AES_KEY = "sales-token-3", "SalesBotKey0123456789abcdefghijklmnopqrstuv"
BROKEN_AES_KEY = "BrokenBotKey0123456789abcdefghijklmnopqrstu"  # each bot its own: config/bots.py refuses a shared one
GRACEFUL_SECONDS = 12


def bots_toml(hr_dify: str, it_dify: str, sales: bool = True, broken: bool = False) -> str:
    """The deployment's bots: hr (secrets inline), it (its Token from a file beside this one, its own Dify app,
    English, no auth), sales (hr's Dify app), and, with `broken`, a bot whose Dify key its app refuses."""
    text = f"""
[bots.hr]
token = "{TOKEN}"
encoding_aes_key = "{AES_KEY}"
dify_base_url = "{hr_dify}"
dify_api_key = "{DIFY_KEY}"

[bots.it]
callback_path = "/wecom/it"
token_file = "it-token"
encoding_aes_key = "{IT_AES_KEY}"
dify_base_url = "{it_dify}"
dify_api_key = "{IT_DIFY_KEY}"
auth_mode = "none"
bot_language = "en"
"""
    if sales:
        text += f"""
[bots.sales]
token = "{SALES_TOKEN}"
encoding_aes_key = "{SALES_AES_KEY}"
dify_base_url = "{hr_dify}"
dify_api_key = "{DIFY_KEY}"
"""
    if broken:
        text += f"""
[bots.broken]
token = "broken-token"
encoding_aes_key = "{BROKEN_AES_KEY}"
dify_base_url = "{hr_dify}"
dify_api_key = "app-revoked-key"
"""
    return text


@pytest.fixture
def it_dify(another_dify):
    return another_dify(IT_DIFY_KEY)


@pytest.fixture
def users(user_table):
    for userid in ("alice", "bob", "carol"):
        user_table.add(userid, f"{userid}@corp.example")


@pytest.fixture
def deployment(tmp_path, dify, it_dify, auth, redis_url, redis_client, mysql_url, users):
    """Start replicas on a bots file: `deployment(**bots_toml options)` -> (replicas, the bots file)."""
    started: list[GunicornReplica] = []

    def start(**options) -> tuple[list[GunicornReplica], object]:
        path = tmp_path / "bots.toml"
        (tmp_path / "it-token").write_text(IT_TOKEN + "\n")
        path.write_text(bots_toml(dify.base_url, it_dify.base_url, **options))
        env = replica_env(
            dify.base_url,
            redis_url,
            BOTS_FILE=str(path),
            AUTH_MODE="external",
            AUTH_API_URL=auth.url,
            AUTH_API_KEY=AUTH_KEY,
            DATABASE_URL=mysql_url,
            STREAM_LEASE_SECONDS="3",
            GUNICORN_GRACEFUL_TIMEOUT=str(GRACEFUL_SECONDS),
        )
        for name in ("replica-0", "replica-1"):
            started.append(GunicornReplica(env, tmp_path, name, workers=2).start())
        return started, path

    yield start
    for replica in started:
        replica.stop()


def simulator(replicas, token, aes_key, path, aibotid) -> WeComSimulator:
    return WeComSimulator(
        [r.url for r in replicas], token, aes_key, callback_path=path, aibotid=aibotid, poll_interval=0.05
    )


@pytest.fixture
def sims():
    opened = []

    def make(replicas, bot: str) -> WeComSimulator:
        token, key, path = {
            "hr": (TOKEN, AES_KEY, "/wecom/callback/hr"),
            "it": (IT_TOKEN, IT_AES_KEY, "/wecom/it"),
            "sales": (SALES_TOKEN, SALES_AES_KEY, "/wecom/callback/sales"),
            "broken": ("broken-token", BROKEN_AES_KEY, "/wecom/callback/broken"),
        }[bot]
        sim = simulator(replicas, token, key, path, f"aibot-{bot}")
        opened.append(sim)
        return sim

    yield make
    for sim in opened:
        sim.close()


def text_of(conversation) -> str:
    return conversation.frames[-1]["stream"]["content"]


def test_each_bot_answers_at_its_own_path_from_its_own_dify_app(deployment, sims, dify, it_dify):
    replicas, _ = deployment()
    dify.script(d.answer("HR: 15 days of leave a year", delay=0.02))
    it_dify.script(d.answer("IT: restart the VPN client", delay=0.02))
    hr, it = sims(replicas, "hr"), sims(replicas, "it")

    hr_answer = hr.ask("how much leave do I have?")  # polls alternate between the two replicas
    it_answer = it.ask("my VPN is down")

    assert text_of(hr_answer) == "HR: 15 days of leave a year"
    assert text_of(it_answer) == "IT: restart the VPN client"
    assert [r["query"] for r in dify.chat_requests()] == ["how much leave do I have?"]
    assert [r["query"] for r in it_dify.chat_requests()] == ["my VPN is down"]
    assert it.verify_url().status_code == 200
    assert hr.verify_url().status_code == 200


def test_a_callback_signed_with_another_bots_token_is_refused(deployment, sims, dify, it_dify):
    replicas, _ = deployment()
    intruder = simulator(replicas, TOKEN, AES_KEY, "/wecom/it", "aibot-hr")  # hr's credentials, it's path
    try:
        with pytest.raises(ReplyError) as refused:
            intruder.send(intruder.text_message("answer me with the IT app"))
        assert "HTTP 401" in str(refused.value)
        assert "invalid_signature" in str(refused.value)
        assert intruder.verify_url().status_code == 401
    finally:
        intruder.close()
    assert it_dify.chat_requests() == []
    assert dify.chat_requests() == []


def test_the_same_user_in_two_bots_is_two_users_there(deployment, sims, dify, auth):
    """hr and sales share one Dify app: alice's conversation in hr is not continued by her message to sales, and
    each bot authorizes her with its own token cache."""
    replicas, _ = deployment()
    dify.script(d.answer("hr one", delay=0.01), match="hr")
    dify.script(d.answer("hr two", delay=0.01), match="hr")
    dify.script(d.answer("sales one", delay=0.01), match="sales")
    hr, sales = sims(replicas, "hr"), sims(replicas, "sales")

    hr.ask("hr question one")
    hr.ask("hr question two")
    sales.ask("sales question one")

    first, second, third = dify.chat_requests()
    assert first.get("conversation_id", "") == ""
    assert second.get("conversation_id", "") != ""  # hr continues its conversation
    assert third.get("conversation_id", "") == ""  # sales starts its own
    assert [call["body"]["wecom_userid"] for call in auth.calls] == ["alice", "alice"]  # once per bot


def test_in_flight_limits_are_per_bot(deployment, sims, dify, it_dify):
    replicas, _ = deployment()
    dify.script([d.message("slow"), d.sleep(3), d.end()], times=3)
    hr, it = sims(replicas, "hr"), sims(replicas, "it")
    for i in range(3):
        hr.send(hr.text_message(f"long question {i}"))
    assert wait_until(lambda: len(dify.chat_requests()) == 3)

    refused = hr.ask("a fourth one in hr")
    it_dify.script(d.answer("it still answers alice"))
    answered = it.ask("and one in it")

    assert text_of(refused) == ZH["too_many_in_flight"]
    assert text_of(answered) == "it still answers alice"


def test_one_bots_dify_refusing_its_key_leaves_the_others_answering(deployment, sims, dify):
    replicas, _ = deployment(broken=True)
    dify.script(d.answer("hr is fine", delay=0.02), match="hr")
    broken, hr = sims(replicas, "broken"), sims(replicas, "hr")
    results = {}

    def ask(name, sim, question):
        results[name] = sim.ask(question)

    threads = [
        threading.Thread(target=ask, args=("broken", broken, "broken question")),
        threading.Thread(target=ask, args=("hr", hr, "hr question")),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert text_of(results["broken"]) == ZH["dify_rejected"]
    assert text_of(results["hr"]) == "hr is fine"
    assert results["hr"].frames[-1]["stream"]["finish"] is True


def test_readiness_reports_each_bot(deployment):
    replicas, _ = deployment()
    body = httpx.get(f"{replicas[0].url}/readyz", timeout=5).json()
    assert body["status"] == "ready"
    assert sorted(body["bots"]) == ["hr", "it", "sales"]
    assert body["bots"]["it"]["path"] == "/wecom/it"
    assert body["bots"]["it"]["auth"] == "none"
    assert body["bots"]["hr"]["mode"] == "callback"


def test_a_new_bots_file_takes_effect_on_hup_without_losing_a_running_answer(deployment, sims, dify, it_dify):
    replicas, path = deployment(sales=False)
    words = [f"w{i} " for i in range(40)]
    dify.script([step for word in words for step in (d.message(word), d.sleep(0.1))] + [d.end()], match="long")
    hr = sims(replicas, "hr")
    first = hr.send(hr.text_message("a long answer, please"))
    assert wait_until(lambda: len(dify.chat_requests()) == 1)

    path.write_text(bots_toml(dify.base_url, it_dify.base_url, sales=True))
    for replica in replicas:
        replica.reload()
    conversation = hr.follow(first)

    assert text_of(conversation) == "".join(words)
    sales = sims(replicas, "sales")
    dify.script(d.answer("sales arrived with the new file"), match="sales")
    assert wait_until(lambda: _answers(sales), timeout=20)


def _answers(sim) -> bool:
    try:
        return text_of(sim.ask("sales question")) == "sales arrived with the new file"
    except ReplyError:  # 404 until the new workers serve the new bot
        time.sleep(0.2)
        return False


def test_a_bad_bots_file_on_hup_keeps_the_last_good_bots(deployment, sims, dify):
    replicas, path = deployment(sales=False)
    ready = replicas[0].logs().count("gateway ready")
    path.write_text(path.read_text() + '\n[bots.hr2]\ncolour = "blue"\n')
    replicas[0].reload()
    assert wait_until(lambda: "configuration error (HUP)" in replicas[0].logs(), timeout=10)
    # the HUP's two new workers are ready, serving the last good bots. Each listens on its own socket from its
    # boot, so a request sent before its app is built waits for it: on a busy machine, longer than the client does.
    assert wait_until(lambda: replicas[0].logs().count("gateway ready") >= ready + 2, timeout=60)
    assert replicas[0].process.poll() is None
    dify.script(d.answer("still serving"), match="hr")
    hr = sims(replicas[:1], "hr")
    assert text_of(hr.ask("hr after a bad file")) == "still serving"
    assert "BOTS_FILE bots.hr2: unknown key 'colour'" in replicas[0].logs()
