"""Forms across gunicorn replicas (docs/architecture.md, "Forms"): the replica whose worker waits for the form is
SIGKILLed before the click, and the click on another still goes on in the bubble; a storm of clicks on every
replica and worker submits the form exactly once."""

import signal
import threading
import time

import pytest

from demo import dify_apps as apps
from demo import dify_standin as d
from demo.redis_server import PrivateRedisServer
from demo.replicas import GunicornReplica
from services.texts import CATALOGUE
from tests.conftest import make_simulator, wait_until
from tests.e2e.conftest import replica_env

pytestmark = pytest.mark.e2e
ZH = CATALOGUE["zh"]
DONE = " The request was handled."


@pytest.fixture
def replicas(dify, tmp_path):
    redis = PrivateRedisServer(tmp_path / "redis").start()
    env = replica_env(dify.base_url, redis.url, STREAM_LEASE_SECONDS="2", STREAM_TAKEOVER_GRACE_SECONDS="1")
    started = [GunicornReplica(env, tmp_path, f"replica-{n}", workers=2) for n in range(2)]
    for replica in started:
        replica.start()
    yield started
    for replica in started:
        replica.kill()
    redis.stop()


def approval() -> list[tuple]:
    return [apps.workflow_started(), d.message("Need approval."), apps.form()]


def test_the_card_still_works_after_the_replica_that_showed_it_is_killed(replicas, dify):
    victim, survivor = replicas
    sim = make_simulator([r.url for r in replicas], poll_interval=0.2)
    dify.script(approval())
    first = sim.send(sim.text_message("buy laptops"), replica=0)  # its worker runs on replica 0
    stream_id = first["stream"]["id"]
    card = None
    while card is None:  # WeCom polls, here through the survivor
        reply = sim.send(sim.poll_message(stream_id), replica=1)
        card = reply.get("template_card")
        time.sleep(0.2)
    victim.signal(signal.SIGKILL)
    update = sim.send(sim.card_click(card, "approve"), replica=1)
    assert update["template_card"]["main_title"]["desc"] == ZH["form_submitted"].format(choice="Approve")
    contents, cards = [], []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        reply = sim.send(sim.poll_message(stream_id), replica=1)
        contents.append(reply["stream"]["content"])
        cards += [reply["template_card"]] if "template_card" in reply else []
        if reply["stream"]["finish"]:
            break
        time.sleep(0.2)
    assert contents[-1] == "Need approval." + DONE  # the survivor resumed the run and went on after the form
    assert cards == []  # the card came once: never again from the run the survivor resumed
    assert [s["body"]["action"] for s in dify.form_submissions] == ["approve"]
    assert len(dify.chat_requests()) == 1
    sim.close()


def test_a_storm_of_clicks_on_every_replica_submits_once(replicas, dify):
    sim = make_simulator([r.url for r in replicas], poll_interval=0.1)
    dify.script(approval())
    cards = []
    conversation_box = []

    def ask():
        conversation_box.append(sim.ask("buy laptops", on_frame=lambda f: cards.append(f.get("template_card"))))

    asker = threading.Thread(target=ask)
    asker.start()
    assert wait_until(lambda: any(cards), timeout=15)
    card = next(c for c in cards if c)
    replies = []
    barrier = threading.Barrier(12)

    def click(n):
        clicker = make_simulator([r.url for r in replicas])
        barrier.wait()
        replies.append(clicker.send(clicker.card_click(card, "approve" if n % 2 else "reject"), replica=n % 2))
        clicker.close()

    threads = [threading.Thread(target=click, args=(n,)) for n in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    asker.join(60)
    assert len(dify.form_submissions) == 1
    choice = {"approve": "Approve", "reject": "Reject"}[dify.form_submissions[0]["body"]["action"]]
    descs = [reply["template_card"]["main_title"]["desc"] for reply in replies]
    assert descs.count(ZH["form_submitted"].format(choice=choice)) == 1  # one click claimed it
    assert descs.count(ZH["form_answered"].format(choice=choice)) == 11  # the others were shown how it ended
    assert conversation_box[0].text == "Need approval." + DONE
    sim.close()
