"""Dify's app types through gunicorn replicas (production mode, the test Redis): a workflow app's answer end to
end, and a chatflow answer whose replica is SIGKILLed mid-answer, finished on the other replica from the Dify
run, with the exact full text."""

import pytest

from demo import dify_apps as apps
from demo.replicas import GunicornReplica
from tests.conftest import make_simulator, wait_until
from tests.e2e.conftest import replica_env
from tests.test_dify_apps import FULL, follow_growing, slow_chatflow

pytestmark = pytest.mark.e2e


@pytest.fixture
def replicas(dify, redis_url, redis_client, tmp_path):
    started = []

    def start(**settings: str) -> list[GunicornReplica]:
        env = replica_env(dify.base_url, redis_url, STREAM_LEASE_SECONDS="3", **settings)
        for name in ("replica-0", "replica-1"):
            started.append(GunicornReplica(env, tmp_path, name, workers=2).start())
        return started

    yield start
    for replica in started:
        replica.stop()


def test_a_workflow_answer_end_to_end(replicas, dify):
    dify.mode = "workflow"
    started = replicas()  # DIFY_APP_TYPE=auto: the replicas read the app's type from /info
    dify.script(apps.workflow_run("The workflow's answer, in chunks.", delay=0.05))
    sim = make_simulator([r.url for r in started], poll_interval=0.1)
    conversation = sim.ask("run the workflow")
    sim.close()
    assert conversation.text == "The workflow's answer, in chunks."
    assert dify.chat_requests()[0]["inputs"] == {"query": "run the workflow"}


def test_a_chatflow_answer_survives_its_replica_being_killed(replicas, dify):
    dify.mode = "advanced-chat"
    owner, other = replicas(DIFY_APP_TYPE="advanced-chat")
    dify.script(slow_chatflow())
    to_owner, to_other = make_simulator(owner.url), make_simulator(other.url, poll_interval=0.2)
    first = to_owner.send(to_owner.text_message("a long chatflow answer"))
    stream_id = first["stream"]["id"]
    assert wait_until(lambda: "word5" in to_owner.send(to_owner.poll_message(stream_id))["stream"]["content"])

    owner.kill()  # SIGKILL, master and workers: the lease runs out after STREAM_LEASE_SECONDS

    assert follow_growing(to_other, first, stream_id) == FULL
    assert len(dify.reattaches) == 1
    assert len(dify.chat_requests()) == 1
    to_owner.close()
    to_other.close()
