"""Bots changed live, as in production: two gunicorn replicas (two workers each) serve one BOTS_FILE, which the test
edits while they run. Every worker reads the file again within 5 seconds on its own: a bot added answers (a
long-connection bot takes its connection), a bot removed finishes the answer it was giving and takes no new message
(a callback is refused 404, a message over its connection gets a note), a changed key is the one used next, and a
file that does not load changes nothing, is said once by each worker, and leaves every replica ready. No worker is
restarted for any of it."""

import threading

import httpx
import pytest

from demo import dify_standin as d
from demo.replicas import GunicornReplica
from demo.wecom_simulator import ReplyError, WeComSimulator
from services.texts import CATALOGUE
from tests.conftest import AES_KEY, DIFY_KEY, TOKEN, wait_until
from tests.e2e.conftest import replica_env

pytestmark = pytest.mark.e2e
ZH = CATALOGUE["zh"]
WORKERS = 4  # two replicas of two workers: each worker reads the file on its own
RELOAD_SECONDS = 15  # each worker reads the file every 5 s: within that, and some to spare on a busy machine
IT_TOKEN, IT_AES_KEY = "it-token-live", "ITliveKey0123456789abcdefghijklmnopqrstuvwx"
DESK_ID, DESK_SECRET = "lc-desk", "lc-desk-secret"


def hr(token: str = TOKEN) -> str:
    return f'[bots.hr]\ntoken = "{token}"\nencoding_aes_key = "{AES_KEY}"\ndify_api_key = "{DIFY_KEY}"\n'


IT = f"""
[bots.it]
callback_path = "/wecom/it"
token = "{IT_TOKEN}"
encoding_aes_key = "{IT_AES_KEY}"
dify_api_key = "{DIFY_KEY}"
"""


def desk(ws_url: str, secret: str = DESK_SECRET) -> str:
    return f"""
[bots.desk]
mode = "long_connection"
bot_id = "{DESK_ID}"
secret = "{secret}"
wecom_ws_url = "{ws_url}"
wecom_ws_lease_seconds = 3
dify_api_key = "{DIFY_KEY}"
"""


@pytest.fixture
def deployment(tmp_path, dify, redis_url, redis_client):
    """Two replicas on a bots file of `hr` alone: (replicas, the file)."""
    path = tmp_path / "bots.toml"
    path.write_text(hr())
    env = replica_env(dify.base_url, redis_url, BOTS_FILE=str(path), GUNICORN_GRACEFUL_TIMEOUT="10")
    replicas = [GunicornReplica(env, tmp_path, f"replica-{i}", workers=2).start() for i in range(2)]
    # A replica is ready when one worker is: a test's change to the file must come after every worker read it first
    # (a worker still booting under load reads the changed file at its start, and has nothing to reload).
    assert wait_until(lambda: said(replicas, "gateway ready") >= WORKERS, timeout=60)
    yield replicas, path
    for replica in replicas:
        replica.stop()


@pytest.fixture
def sims():
    opened = []

    def make(replicas, token=TOKEN, aes_key=AES_KEY, path="/wecom/callback/hr") -> WeComSimulator:
        urls = [replica.url for replica in replicas]
        opened.append(WeComSimulator(urls, token, aes_key, callback_path=path, poll_interval=0.05))
        return opened[-1]

    yield make
    for sim in opened:
        sim.close()


def said(replicas, words: str) -> int:
    return sum(replica.logs().count(words) for replica in replicas)


def reloaded(replicas, times: int) -> bool:
    """Every worker applied the file `times` times since it started."""
    return wait_until(lambda: said(replicas, "BOTS_FILE reloaded") >= WORKERS * times, timeout=RELOAD_SECONDS)


def test_bots_added_to_the_file_answer_on_every_worker_without_a_restart(deployment, sims, dify, wecom_ws):
    replicas, path = deployment
    wecom = wecom_ws({DESK_ID: DESK_SECRET})
    booted = said(replicas, "Booting worker")
    path.write_text(hr() + IT + desk(wecom.url))
    assert reloaded(replicas, 1)

    assert said(replicas, "Booting worker") == booted  # no worker was restarted for it
    dify.script(d.answer("it answers"), times=None)
    for replica in replicas:
        it = sims([replica], IT_TOKEN, IT_AES_KEY, "/wecom/it")
        assert it.verify_url().status_code == 200
        assert it.ask("a question for it").text == "it answers"
        ready = httpx.get(f"{replica.url}/readyz", timeout=5).json()
        assert sorted(ready["bots"]) == ["desk", "hr", "it"]
    assert wait_until(lambda: wecom.subscribed(DESK_ID) == 1, timeout=10)  # one of the four workers holds it
    assert wecom.final(wecom.deliver_text(DESK_ID, "over the connection"))["stream"]["content"] == "it answers"

    wecom.bots[DESK_ID] = "lc-desk-secret-2"  # re-keyed in WeCom's admin, then in the file
    subscribed = len(wecom.subscribes)
    path.write_text(hr() + IT + desk(wecom.url, "lc-desk-secret-2"))
    assert reloaded(replicas, 2)
    assert wait_until(lambda: len(wecom.subscribes) > subscribed and wecom.subscribed(DESK_ID) == 1, timeout=15)
    assert wecom.final(wecom.deliver_text(DESK_ID, "after the new secret"))["stream"]["content"] == "it answers"

    path.write_text(hr() + IT)  # desk removed: it keeps its connection for its answers, and takes no new question
    assert reloaded(replicas, 3)
    assert wecom.final(wecom.deliver_text(DESK_ID, "still there?"))["stream"]["content"] == ZH["bot_retired"]
    assert said(replicas, "Booting worker") == booted


def test_a_removed_bot_finishes_its_answer_and_takes_no_new_message(deployment, sims, dify):
    replicas, path = deployment
    words = [f"w{i} " for i in range(60)]
    dify.script([step for word in words for step in (d.message(word), d.sleep(0.25))] + [d.end()])
    sim = sims(replicas)
    first = sim.send(sim.text_message("a long answer, please"))
    answered = {}
    following = threading.Thread(target=lambda: answered.setdefault("text", sim.follow(first).text))
    following.start()

    path.write_text(IT)  # hr leaves the file 15 s before its answer ends
    assert reloaded(replicas, 1)
    assert following.is_alive()  # every worker dropped hr while its answer was still streaming
    following.join(60)
    assert answered["text"] == "".join(words)  # its polls, on both replicas, were answered to the end

    for replica in replicas:
        late = sims([replica])
        with pytest.raises(ReplyError, match="HTTP 404.*bot_retired"):
            late.send(late.text_message("one more"))
    assert len(dify.chat_requests()) == 1


def test_a_changed_token_is_the_one_the_next_message_is_checked_with(deployment, sims, dify):
    replicas, path = deployment
    dify.script(d.answer("answered"), times=None)
    old, new = sims(replicas), sims(replicas, token="hr-token-2")
    assert old.ask("before").text == "answered"
    path.write_text(hr("hr-token-2"))
    assert reloaded(replicas, 1)
    for replica in replicas:
        with pytest.raises(ReplyError, match="invalid_signature"):
            sims([replica]).send(old.text_message("with the old token"))
        assert sims([replica], token="hr-token-2").ask("with the new token").text == "answered"
    assert new.verify_url().status_code == 200


def test_a_bots_file_that_does_not_load_changes_nothing_and_each_worker_says_so_once(deployment, sims, dify):
    replicas, path = deployment
    path.write_text(hr() + "[bots.it\n")
    assert wait_until(lambda: said(replicas, "BOTS_FILE not reloaded") >= WORKERS, timeout=RELOAD_SECONDS)
    assert not wait_until(lambda: said(replicas, "BOTS_FILE not reloaded") > WORKERS, timeout=11)  # two checks more
    for replica in replicas:
        assert httpx.get(f"{replica.url}/readyz", timeout=5).status_code == 200
    dify.script(d.answer("still served"), times=None)
    assert sims(replicas).ask("after a bad file").text == "still served"

    path.write_text(hr() + IT)  # mended
    assert reloaded(replicas, 1)
    assert sims(replicas, IT_TOKEN, IT_AES_KEY, "/wecom/it").ask("now it").text == "still served"
    metrics = httpx.get(f"{replicas[0].url}/metrics", timeout=5).text
    assert 'wecom_bots_reloads_total{result="rejected"} 2.0' in metrics  # one per worker of the replica
