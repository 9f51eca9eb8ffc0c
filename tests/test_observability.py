"""What operators see: /metrics after conversations, one conversation's JSON logs joined across two instances by
stream id, and the streams/users operator commands."""

import json
import threading

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from demo import dify_standin as d
from demo.replicas import free_port
from services import metrics
from tests.conftest import AES_KEY, DIFY_KEY, KEYS, TOKEN, make_simulator, wait_idle


def scrape(client) -> dict[tuple, float]:
    """{(sample name, sorted labels): value} from /metrics."""
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.mimetype == "text/plain"
    samples = {}
    for family in text_string_to_metric_families(response.get_data(as_text=True)):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def moved(before, after, name, **labels) -> float:
    """How far the samples called `name` whose labels include `labels` moved, summed (over bots, say)."""

    def total(samples):
        wanted = set(labels.items())
        return sum(
            value
            for (sample, sample_labels), value in samples.items()
            if sample == name and wanted <= set(sample_labels)
        )

    return total(after) - total(before)


def test_metrics_move_with_a_conversation(live, simulator, dify):
    client = live.app.test_client()
    before = scrape(client)
    dify.script(d.answer("counted", delay=0.02))
    payload = simulator.text_message("count me")
    first = simulator.send(payload)
    simulator.send(payload)  # a WeCom retry
    conversation = simulator.follow(first)
    dify.script([d.message("x"), d.cut()])
    simulator.ask("and fail")
    client.post("/wecom/callback", query_string={"msg_signature": "x", "timestamp": "1", "nonce": "n"}, data=b"{}")
    wait_idle(live)  # a bubble is final a moment before its worker thread ends and leaves streams_active
    after = scrape(client)

    assert moved(before, after, "wecom_callbacks_total", type="text", outcome="ok") == 3
    assert moved(before, after, "wecom_callbacks_total", type="stream", outcome="ok") >= conversation.polls + 1
    assert moved(before, after, "wecom_callbacks_total", type="invalid", outcome="timestamp_out_of_window") == 1
    assert moved(before, after, "wecom_messages_total", outcome="opened") == 2
    assert moved(before, after, "wecom_messages_total", outcome="dedup") == 1
    assert moved(before, after, "wecom_msgid_dedup_hits_total") == 1
    assert moved(before, after, "wecom_poll_seconds_count") >= conversation.polls
    assert moved(before, after, "stream_first_token_seconds_count") == 2
    assert moved(before, after, "stream_duration_seconds_count") == 2
    assert moved(before, after, "stream_outcomes_total", outcome="done") == 1
    assert moved(before, after, "stream_outcomes_total", outcome="error") == 1
    assert moved(before, after, "dify_errors_total", code="stream_cut") == 1
    # back down once its streams ended (a gauge of the process: a thread another test left, still reading a Dify it
    # stalled, may count on either side)
    assert moved(before, after, "streams_active", bot="default") <= 0


def test_orphan_and_window_events_are_counted_once(live, simulator, redis_client):
    client = live.app.test_client()
    before = scrape(client)
    store = live.gateway.bot().streams.store
    store.create("orphan02", "msg-orphan-2", "dead-replica", "demo-bot", "alice", {"userid": "alice"})
    store.append("orphan02", "dead-replica", ["shown"], 0)
    redis_client.delete(KEYS.stream_lease("orphan02"))
    for _ in range(3):
        simulator.send(simulator.poll_message("orphan02"))
    assert moved(before, scrape(client), "stream_outcomes_total", outcome="expired") == 1


def test_auth_metrics(make_app, serve, dify, auth, mysql_url, user_table, redis_client):
    from tests.conftest import AUTH_KEY

    user_table.add("metric-user", "metric@corp.example")
    live = serve(make_app(auth_mode="external", auth_api_url=auth.url, auth_api_key=AUTH_KEY, database_url=mysql_url))
    client = live.app.test_client()
    sim = make_simulator(live.url)
    before = scrape(client)
    dify.script(d.answer("ok"), times=None)
    sim.ask("one", userid="metric-user")
    sim.ask("two", userid="metric-user")
    sim.ask("who?", userid="nobody-here")
    after = scrape(client)
    assert moved(before, after, "auth_token_cache_total", result="miss") == 2
    assert moved(before, after, "auth_token_cache_total", result="hit") == 1
    assert moved(before, after, "auth_outcomes_total", outcome="ok") == 2
    assert moved(before, after, "auth_outcomes_total", outcome="unknown_user") == 1
    sim.close()


def test_one_conversations_logs_join_across_two_instances_by_stream_id(make_app, serve, dify, capsys):
    first = serve(make_app(replica_id="replica-a", log_format="json"))
    second = serve(make_app(replica_id="replica-b", log_format="json"))
    opener, poller = make_simulator(first.url), make_simulator(second.url)
    dify.script([d.message("logged "), d.sleep(0.3), d.message("everywhere"), d.end()])
    conversation = poller.follow(opener.send(opener.text_message("trace me")))  # opened on A, polled on B
    first.gateway.runner.drain(5)
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    mine = [entry for entry in lines if entry.get("stream") == conversation.stream_id]
    assert {entry["replica"].split(":")[0] for entry in mine} == {"replica-a", "replica-b"}
    messages = [entry["msg"] for entry in mine]
    assert any("opened" in m for m in messages)
    assert any("calling Dify" in m for m in messages)
    assert any(e["msg"] == "bubble finished: done" and e["replica"].startswith("replica-b") for e in mine)
    worker_lines = [
        e
        for e in mine
        if e["logger"]
        in ("services.streams.worker", "services.backends.dify.answering", "services.backends.dify.completion")
    ]
    assert worker_lines
    assert all(entry.get("msgid") and entry.get("user") == "alice" for entry in worker_lines)
    assert any(entry.get("task") for entry in worker_lines)
    assert all(
        TOKEN not in json.dumps(entry) and AES_KEY not in json.dumps(entry) and DIFY_KEY not in json.dumps(entry)
        for entry in lines
    )
    opener.close()
    poller.close()


# --- operator commands ------------------------------------------------------------------------------------------


@pytest.fixture
def runner(app):
    return app.test_cli_runner()


def test_streams_list_show_and_purge(live, simulator, dify, runner, redis_client):
    dify.script(d.answer("the answer operators look at"))
    conversation = simulator.ask("inspect me", userid="carol")
    dify.script([d.message("half"), d.cut()])
    failed = simulator.ask("break", userid="dave")

    listing = runner.invoke(args=["streams", "list"]).output
    assert conversation.stream_id in listing
    assert failed.stream_id in listing
    assert "STATUS" in listing
    only_errors = runner.invoke(args=["streams", "list", "--status", "error"]).output
    assert failed.stream_id in only_errors
    assert conversation.stream_id not in only_errors
    by_user = runner.invoke(args=["streams", "list", "--user", "carol"]).output
    assert conversation.stream_id in by_user
    assert failed.stream_id not in by_user

    shown = runner.invoke(args=["streams", "show", conversation.stream_id])
    assert shown.exit_code == 0
    assert "the answer operators look at" in shown.output
    assert "status           done" in shown.output
    assert "first token" in shown.output
    assert "TTLs:" in shown.output
    assert "http" not in shown.output
    assert runner.invoke(args=["streams", "show", "nope"]).exit_code != 0

    purged = runner.invoke(args=["streams", "purge", "--yes", conversation.stream_id]).output
    assert "deleted" in purged
    assert not redis_client.exists(KEYS.stream(conversation.stream_id))
    assert not redis_client.exists(KEYS.stream_chunks(conversation.stream_id))


def test_streams_tail_follows_a_live_answer(live, simulator, dify, runner):
    dify.script([d.message("one "), d.sleep(0.4), d.message("two "), d.sleep(0.4), d.message("three"), d.end()])
    first = simulator.send(simulator.text_message("tail me"))
    result = {}
    tail = threading.Thread(
        target=lambda: result.update(
            out=runner.invoke(args=["streams", "tail", first["stream"]["id"], "--interval", "0.1"]).output
        )
    )
    tail.start()
    simulator.follow(first)
    tail.join(10)
    assert result["out"] == "one two three\n[done]\n"


def test_users_token_shows_status_never_the_token(make_app, dify, auth, mysql_url, user_table, redis_client):
    from tests.conftest import AUTH_KEY

    app = make_app(auth_mode="external", auth_api_url=auth.url, auth_api_key=AUTH_KEY, database_url=mysql_url)
    runner = app.test_cli_runner()
    redis_client.set("authorization:wechatid:erin", "tok_secret_value", ex=500)
    redis_client.set("conversation:demo-bot:single:erin", "c0ffee00-0000-0000-0000-000000000001", ex=600)
    out = runner.invoke(args=["users", "token", "erin"]).output
    assert "cached, expires in" in out
    assert "tok_secret_value" not in out
    assert "c0ffee00-0000-0000-0000-000000000001" in out
    assert "not cached" in runner.invoke(args=["users", "token", "frank"]).output


def test_with_a_metrics_port_the_public_port_has_no_metrics(make_app):
    port = free_port()
    client = make_app(metrics_port=port).test_client()
    assert client.get("/metrics").status_code == 404
    metrics.serve("127.0.0.1", port)
    scraped = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
    assert scraped.status_code == 200
    assert "wecom_callbacks_total" in scraped.text


def test_every_series_of_every_bot_exists_at_zero_from_start_up(make_app):
    """Before any traffic: rates, ratios and absent() in the alerts need the series to exist (k8s/monitoring)."""
    app = make_app(bot_name="fresh-bot")
    samples = scrape(app.test_client())
    bot, backend, own = ("bot", "fresh-bot"), ("backend", "dify"), ("route", "")
    assert samples[("stream_outcomes_total", (bot, ("outcome", "done")))] == 0
    assert samples[("stream_outcomes_total", (bot, ("outcome", "closed_window")))] == 0
    assert samples[("dify_calls_total", (backend, bot, ("kind", "duplicate"), own))] == 0
    assert samples[("wecom_messages_total", (bot, ("outcome", "opened")))] == 0
    assert samples[("dify_errors_total", (backend, bot, ("code", "timeout"), own))] == 0
    assert samples[("wecom_callbacks_total", (bot, ("outcome", "store_unavailable"), ("type", "text")))] == 0
    assert samples[("redis_writes_unreplicated_total", (bot, ("write", "msgid_claim")))] == 0
    assert samples[("redis_writes_unreplicated_total", (bot, ("write", "outbox")))] == 0
    assert samples[("stream_first_token_seconds_count", (backend, bot, own))] == 0


def test_dify_calls_are_counted_by_kind(live, dify):
    client = live.app.test_client()
    before = scrape(client)
    dify.script(d.answer("one answer"))
    sim = make_simulator(live.url)
    assert sim.ask("hello").text == "one answer"
    after = scrape(client)
    assert moved(before, after, "dify_calls_total", kind="new") == 1
    assert moved(before, after, "dify_calls_total", kind="duplicate") == 0
    sim.close()
