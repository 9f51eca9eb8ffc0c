"""The monitoring bundle (k8s/monitoring): its rules pass `promtool check rules`, and every alert fires when it
should and stays quiet when it should not, burn-rate windows included (`promtool test rules` on synthetic series);
every alert has its runbook; the dashboards load (valid JSON, unique panel ids, a datasource and a bot variable)
and use only metrics the gateway exports or rules the bundle records."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from config.settings import PROJECT_ROOT

BUNDLE = PROJECT_ROOT / "k8s" / "monitoring"
RUNBOOKS = PROJECT_ROOT / "docs" / "runbooks"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None and not os.environ.get("REQUIRE_DEPLOY_TOOLS"),
    reason="promtool is not installed (apt-get install prometheus)",
)


def rule_groups() -> list[dict]:
    return yaml.safe_load((BUNDLE / "prometheus-rules.yaml").read_text())["spec"]["groups"]


def alerts() -> dict[str, dict]:
    return {rule["alert"]: rule for group in rule_groups() for rule in group["rules"] if "alert" in rule}


def recorded() -> set[str]:
    return {rule["record"] for group in rule_groups() for rule in group["rules"] if "record" in rule}


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    assert PROMTOOL, "promtool is required here (REQUIRE_DEPLOY_TOOLS)"
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.fixture
def rules_file(tmp_path) -> Path:
    """The PrometheusRule's groups as a plain rules file, as Prometheus and promtool read them."""
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": rule_groups()}))
    return path


@needs_promtool
def test_the_rules_pass_promtool_check(rules_file):
    result = promtool("check", "rules", str(rules_file), cwd=rules_file.parent)
    assert result.returncode == 0, result.stdout + result.stderr


# --- every alert, firing and quiet, on synthetic series ------------------------------------------------------------


def series(name: str, values: str, **labels: str) -> dict:
    rendered = ",".join(f'{key}="{value}"' for key, value in labels.items())
    return {"series": f"{name}{{{rendered}}}", "values": values}


def expected(alertname: str, **labels: str) -> dict:
    """An alert as promtool must see it: its labels, and its annotations with the labels filled in."""
    rule = alerts()[alertname]
    annotations = dict(rule["annotations"])
    for name, value in labels.items():
        annotations = {key: text.replace(f"{{{{ $labels.{name} }}}}", value) for key, text in annotations.items()}
    return {"exp_labels": {**rule["labels"], **labels}, "exp_annotations": annotations}


def case(alertname: str, inputs: list[dict], firing: dict[str, dict | None]) -> dict:
    """A promtool test: `inputs`, and at each eval time (e.g. "70m") the alert `alertname` with its labels, or
    None for quiet."""
    return {
        "interval": "1m",
        "input_series": inputs,
        "alert_rule_test": [
            {
                "eval_time": at,
                "alertname": alertname,
                "exp_alerts": [expected(alertname, **labels)] if labels is not None else [],
            }
            for at, labels in firing.items()
        ],
    }


def opened_and_done(opened: str, done: str, bot: str = "b", **extra: str) -> list[dict]:
    return [
        series("wecom_messages_total", opened, bot=bot, outcome="opened"),
        series("stream_outcomes_total", done, bot=bot, outcome="done"),
        *[series(name, values, bot=bot) for name, values in extra.items()],
    ]


CASES = {
    "answered: a fifth of the bubbles without an answer pages": case(
        "WecomGatewayAnsweredBudgetBurnFast", opened_and_done("0+10x90", "0+8x90"), {"70m": {"bot": "b"}}
    ),
    "answered: Dify's own errors and refused users do not count": case(
        "WecomGatewayAnsweredBudgetBurnFast",
        [
            *opened_and_done("0+10x90", "0+5x90"),
            series("dify_errors_total", "0+3x90", bot="b", code="timeout"),
            series("auth_outcomes_total", "0+2x90", bot="b", outcome="unknown_user"),
        ],
        {"70m": None},
    ),
    "answered: a five-minute burst does not page, an hour of it does": case(
        "WecomGatewayAnsweredBudgetBurnFast",
        opened_and_done("0+10x130", "0+10x60 605+5x69"),
        {"70m": None, "130m": {"bot": "b"}},
    ),
    "answered: the slow burn opens a ticket": case(
        "WecomGatewayAnsweredBudgetBurnSlow", opened_and_done("0+10x400", "0+9x400"), {"380m": {"bot": "b"}}
    ),
    "answered: one bad bubble in a hundred is within the budget": case(
        "WecomGatewayAnsweredBudgetBurnSlow", opened_and_done("0+100x400", "0+99x400"), {"380m": None}
    ),
    "first token: most answers slower than 8 s pages": case(
        "WecomGatewayFirstTokenBudgetBurnFast",
        [
            series("stream_first_token_seconds_bucket", "0+2x90", bot="b", le="8.0"),
            series("stream_first_token_seconds_count", "0+10x90", bot="b"),
        ],
        {"70m": {"bot": "b"}},
    ),
    "first token: fast answers are quiet": case(
        "WecomGatewayFirstTokenBudgetBurnFast",
        [
            series("stream_first_token_seconds_bucket", "0+10x90", bot="b", le="8.0"),
            series("stream_first_token_seconds_count", "0+10x90", bot="b"),
        ],
        {"70m": None},
    ),
    "first token: the slow burn": case(
        "WecomGatewayFirstTokenBudgetBurnSlow",
        [
            series("stream_first_token_seconds_bucket", "0+6x400", bot="b", le="8.0"),
            series("stream_first_token_seconds_count", "0+10x400", bot="b"),
        ],
        {"380m": {"bot": "b"}},
    ),
    "first token: within the budget over six hours": case(
        "WecomGatewayFirstTokenBudgetBurnSlow",
        [
            series("stream_first_token_seconds_bucket", "0+97x400", bot="b", le="8.0"),
            series("stream_first_token_seconds_count", "0+100x400", bot="b"),
        ],
        {"380m": None},
    ),
    "a second Dify call for one message": case(
        "WecomGatewayDuplicateDifyCall",
        [series("dify_calls_total", "0 0 0 1 1 1", bot="b", kind="duplicate")],
        {"2m": None, "4m": {"bot": "b"}},
    ),
    "bubbles ended by the window": case(
        "WecomGatewayBubblesEndedByWindow",
        [series("stream_outcomes_total", "0 0 1 1", bot="b", outcome="closed_window")],
        {"1m": None, "3m": {"bot": "b"}},
    ),
    "a long-connection bot with no holder for a minute": case(
        "WecomGatewayLongConnectionNoHolder",
        [
            series("wecom_ws_connected", "1 1 1 0 0 0 0", bot="ops", pod="a"),
            series("wecom_ws_connected", "0 0 0 0 0 0 0", bot="ops", pod="b"),
        ],
        {"2m": None, "3m": None, "5m": {"bot": "ops"}},
    ),
    "a foreign kick": case(
        "WecomGatewayForeignKick",
        [series("wecom_ws_foreign_kicks_total", "0 0 1 1", bot="ops")],
        {"1m": None, "2m": {"bot": "ops"}},
    ),
    "a push WeCom refused": case(
        "WecomGatewayPushesFailing",
        [series("wecom_pushes_total", "0 0 1 1", bot="ops", outcome="failed")],
        {"1m": None, "2m": {"bot": "ops"}},
    ),
    "pushes sent are quiet": case(
        "WecomGatewayPushesFailing",
        [series("wecom_pushes_total", "0 5 10 15", bot="ops", outcome="sent")],
        {"3m": None},
    ),
    "a schedule's tick that failed": case(
        "WecomGatewayScheduleNotPushed",
        [series("wecom_schedule_runs_total", "0 0 1 1", bot="b", schedule="daily", outcome="failed")],
        {"1m": None, "2m": {"bot": "b", "schedule": "daily", "outcome": "failed"}},
    ),
    "a schedule's tick skipped": case(
        "WecomGatewayScheduleNotPushed",
        [series("wecom_schedule_runs_total", "0 0 1 1", bot="b", schedule="daily", outcome="skipped")],
        {"2m": {"bot": "b", "schedule": "daily", "outcome": "skipped"}},
    ),
    "schedules pushed are quiet": case(
        "WecomGatewayScheduleNotPushed",
        [series("wecom_schedule_runs_total", "0 1 2 3", bot="b", schedule="daily", outcome="pushed")],
        {"3m": None},
    ),
    "audit rows waiting for the database for 15 minutes": case(
        "WecomGatewayAuditRowsWaiting",
        [series("wecom_audit_pending", "0 1+1x19", bot="b")],
        {"10m": None, "17m": {"bot": "b"}},
    ),
    "audit rows written at once are quiet": case(
        "WecomGatewayAuditRowsWaiting",
        [series("wecom_audit_pending", "0 3 0 2 0 1 0 4 0 1 0 2 0 3 0 1 0 0 0 0", bot="b")],
        {"19m": None},
    ),
    "audit rows lost or dropped": case(
        "WecomGatewayAuditRowsLost",
        [series("wecom_audit_rows_total", "0 0 1 1", bot="b", outcome="lost")],
        {"1m": None, "2m": {"bot": "b"}},
    ),
    "audit rows written are quiet": case(
        "WecomGatewayAuditRowsLost",
        [series("wecom_audit_rows_total", "0 5 10 15", bot="b", outcome="answered")],
        {"3m": None},
    ),
    "a content rules edit refused": case(
        "WecomGatewayContentRulesRejected",
        [series("wecom_content_rules_reloads_total", "0 0 1 1", bot="b", result="rejected")],
        {"1m": None, "2m": {"bot": "b"}},
    ),
    "content rules reloaded are quiet": case(
        "WecomGatewayContentRulesRejected",
        [series("wecom_content_rules_reloads_total", "0 1 2 3", bot="b", result="ok")],
        {"3m": None},
    ),
    "a bots file edit refused": case(
        "WecomGatewayBotsFileRejected",
        [series("wecom_bots_reloads_total", "0 0 4 4", result="rejected")],
        {"1m": None, "2m": {}},
    ),
    "bots file reloads applied are quiet": case(
        "WecomGatewayBotsFileRejected",
        [series("wecom_bots_reloads_total", "0 4 8 8", result="ok")],
        {"3m": None},
    ),
    "busy replies from the answer cap": case(
        "WecomGatewayAnswerCapReached",
        [series("wecom_answer_cap_refusals_total", "0 0 2 2", bot="b")],
        {"1m": None, "2m": {"bot": "b"}},
    ),
    "no busy replies are quiet": case(
        "WecomGatewayAnswerCapReached",
        [series("wecom_answer_cap_refusals_total", "0 0 0 0", bot="b")],
        {"3m": None},
    ),
    "writes a replica did not confirm": case(
        "WecomGatewayWritesNotReplicated",
        [series("redis_writes_unreplicated_total", "0 0 2 2", bot="b", write="msgid_claim")],
        {"1m": None, "3m": {"bot": "b", "write": "msgid_claim"}},
    ),
    "a replica that cannot reach Redis": case(
        "WecomGatewayRedisUnavailable",
        [
            series("gateway_dependency_up", "1x6", dependency="redis", pod="a"),
            series("gateway_dependency_up", "0x6", dependency="redis", pod="b"),
        ],
        {"3m": {}},
    ),
    "polls answered 503 for want of Redis": case(
        "WecomGatewayRedisUnavailable",
        [
            series("gateway_dependency_up", "1x6", dependency="redis", pod="a"),
            series("wecom_callbacks_total", "0+3x6", bot="b", type="stream", outcome="store_unavailable"),
        ],
        {"4m": {}},
    ),
    "Redis reachable everywhere is quiet": case(
        "WecomGatewayRedisUnavailable",
        [
            series("gateway_dependency_up", "1x6", dependency="redis", pod="a"),
            series("wecom_callbacks_total", "0x6", bot="b", type="stream", outcome="store_unavailable"),
        ],
        {"4m": None},
    ),
    "no replica ready for five minutes": case(
        "WecomGatewayNotReady",
        [series("gateway_ready", "0x10", pod="a"), series("gateway_ready", "0x10", pod="b")],
        {"3m": None, "7m": {}},
    ),
    "no replica reporting at all for five minutes": case(
        "WecomGatewayNotReady",
        [series("wecom_messages_total", "0x10", bot="b", outcome="opened")],
        {"3m": None, "7m": {}},
    ),
    "one replica ready is enough": case(
        "WecomGatewayNotReady",
        [series("gateway_ready", "0x10", pod="a"), series("gateway_ready", "1x10", pod="b")],
        {"7m": None},
    ),
    "a bot whose every Dify call fails": case(
        "WecomGatewayDifyFailing",
        [
            series("dify_errors_total", "0+5x12", bot="b", code="timeout"),
            series("stream_outcomes_total", "0x12", bot="b", outcome="done"),
        ],
        {"3m": None, "9m": {"bot": "b"}},
    ),
    "some Dify errors among answers are no outage": case(
        "WecomGatewayDifyFailing",
        [
            series("dify_errors_total", "0+5x12", bot="b", code="timeout"),
            series("stream_outcomes_total", "0+1x12", bot="b", outcome="done"),
        ],
        {"9m": None},
    ),
}


@needs_promtool
def test_every_alert_fires_when_it_should_and_only_then(rules_file):
    tests = {"rule_files": [rules_file.name], "evaluation_interval": "1m", "tests": list(CASES.values())}
    (rules_file.parent / "tests.yaml").write_text(yaml.safe_dump(tests, sort_keys=False))
    result = promtool("test", "rules", "tests.yaml", cwd=rules_file.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert {c["alert_rule_test"][0]["alertname"] for c in CASES.values()} == set(alerts())  # every alert is tested
    quiet = {test["alertname"] for c in CASES.values() for test in c["alert_rule_test"] if not test["exp_alerts"]}
    assert quiet == set(alerts())  # and each seen quiet


# --- runbooks and dashboards -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(alerts()))
def test_every_alert_has_its_summary_description_and_runbook(name):
    rule = alerts()[name]
    assert {"summary", "description", "runbook_url"} <= set(rule["annotations"])
    assert rule["annotations"]["runbook_url"] == f"docs/runbooks/{name}.md"
    runbook = (RUNBOOKS / f"{name}.md").read_text()
    for heading in ("## What it means", "## How to confirm", "## What to do", "## When to escalate"):
        assert heading in runbook, f"{name}.md lacks {heading!r}"


METRIC = re.compile(r"\b(?:wecom|stream|streams|dify|auth|redis|gateway|response_url|background)_[a-z0-9_:]*")


def metric_names(expression: str) -> set[str]:
    """The metric (or recorded rule) names a PromQL expression selects: ours all begin with one of a few words."""
    return set(METRIC.findall(re.sub(r'"[^"]*"', '""', expression)))


def dashboards() -> dict[str, dict]:
    return {path.stem: json.loads(path.read_text()) for path in sorted((BUNDLE / "dashboards").glob("*.json"))}


def panels(dashboard: dict) -> list[dict]:
    return [panel for panel in dashboard["panels"] if panel["type"] != "row"]


def used_names() -> set[str]:
    """Every metric the bundle's rules and dashboards select, histograms by their base name."""
    expressions = [rule["expr"] for group in rule_groups() for rule in group["rules"]]
    expressions += [target["expr"] for d in dashboards().values() for panel in panels(d) for target in panel["targets"]]
    expressions += [v.get("definition", "") for d in dashboards().values() for v in d["templating"]["list"]]
    return {name for expression in expressions for name in metric_names(expression)}


@pytest.mark.parametrize("name", ["overview", "storage", "long-connection"])
def test_each_dashboard_loads(name):
    dashboard = dashboards()[name]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["bot"]["type"] == "query" and variables["bot"]["includeAll"]
    assert dashboard["uid"] == f"wecom-gateway-{name}" and dashboard["schemaVersion"] >= 36
    for panel in panels(dashboard):
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"] and all(target["expr"] for target in panel["targets"]), panel["title"]
        assert all(target["refId"] for target in panel["targets"])
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24
        if any("bot" in target["expr"] for target in panel["targets"]) and name != "storage":
            assert any("$bot" in target["expr"] for target in panel["targets"]), f"{panel['title']} ignores $bot"


def test_the_bundle_builds_with_the_dashboards_as_labelled_config_maps():
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        if os.environ.get("REQUIRE_DEPLOY_TOOLS"):
            pytest.fail("kubectl is required (REQUIRE_DEPLOY_TOOLS)")
        pytest.skip("kubectl is not installed")
    built = subprocess.run([kubectl, "kustomize", str(BUNDLE)], capture_output=True, text=True, timeout=60)
    assert built.returncode == 0, built.stderr
    objects = list(yaml.safe_load_all(built.stdout))
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == ["ConfigMap", "ConfigMap", "ConfigMap", "PrometheusRule", "Service", "ServiceMonitor"]
    for config_map in (o for o in objects if o["kind"] == "ConfigMap"):
        assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
        [(filename, content)] = config_map["data"].items()
        assert json.loads(content)["uid"] == f"wecom-gateway-{filename.removesuffix('.json')}"
    service = next(o for o in objects if o["kind"] == "Service")
    monitor = next(o for o in objects if o["kind"] == "ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]


def test_every_metric_the_bundle_uses_is_exported_after_a_conversation(make_pair, make_app, wecom_ws, dify, tmp_path):
    """Two callback replicas answer a message, with an audit trail; a long-connection bot is configured too (its
    series exist from start-up): every name the rules and dashboards select is in /metrics, or is a rule the bundle
    records."""
    from demo import dify_standin as d
    from tests.conftest import AES_KEY, DIFY_KEY, TOKEN, make_simulator

    wecom = wecom_ws({"monitoring-bot": "monitoring-secret"})
    make_app(
        bot_name="ws-bot",
        wecom_mode="long_connection",
        wecom_bot_id="monitoring-bot",
        wecom_bot_secret="monitoring-secret",
        wecom_ws_url=wecom.url,
    )
    scheduled = tmp_path / "bots.toml"  # a bot with a schedule (its series exist from start-up)
    scheduled.write_text(
        f'[bots.reports]\ntoken = "{TOKEN}"\nencoding_aes_key = "{AES_KEY}"\ndify_api_key = "{DIFY_KEY}"\n'
        '[bots.reports.webhooks]\nops = "https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key=k"\n'
        '[[bots.reports.schedules]]\nname = "daily"\ncron = "0 9 * * *"\nquestion = "q"\nto = ["webhook:ops"]\n'
    )
    make_app(bots_file=str(scheduled), bot_name="")
    first, second = make_pair(database_url=f"sqlite:///{tmp_path / 'audit.db'}")
    dify.script(d.answer("an answer"))
    sim = make_simulator([first.url, second.url])
    assert sim.ask("hello").text == "an answer"
    sim.close()
    assert second.app.test_client().get("/readyz").status_code == 200
    exported = {
        sample.name
        for family in text_string_to_metric_families(second.app.test_client().get("/metrics").get_data(as_text=True))
        for sample in family.samples
    }
    exported |= {name.removesuffix(suffix) for name in exported for suffix in ("_bucket", "_count", "_sum")}
    missing = used_names() - exported - recorded()
    assert not missing, f"used by the bundle but not exported: {sorted(missing)}"


# --- a real Prometheus over real replicas ---------------------------------------------------------------------------


@pytest.mark.e2e
def test_a_real_prometheus_sees_the_bot_lose_its_holder(tmp_path, rules_file, dify, redis_url, wecom_ws):
    """Prometheus (started here on loopback) scrapes two gunicorn replicas of a long-connection bot through the
    bundle's rules. One replica holds the bot; then a foreign subscriber takes the bot, the deployment cools down,
    and Prometheus' own API shows the no-holder alert pending (then firing) and the foreign-kick alert firing."""
    import httpx

    from demo.replicas import GunicornReplica, free_port
    from tests.conftest import wait_until
    from tests.e2e.conftest import replica_env

    prometheus = shutil.which("prometheus")
    if prometheus is None:
        if os.environ.get("REQUIRE_DEPLOY_TOOLS"):
            pytest.fail("prometheus is required (REQUIRE_DEPLOY_TOOLS)")
        pytest.skip("prometheus is not installed (apt-get install prometheus)")
    wecom = wecom_ws({"prom-bot": "prom-secret"})
    settings = {
        "WECOM_MODE": "long_connection",
        "WECOM_BOT_ID": "prom-bot",
        "WECOM_BOT_SECRET": "prom-secret",
        "WECOM_WS_URL": wecom.url,
        "WECOM_WS_LEASE_SECONDS": "3",
        "WECOM_WS_KICK_COOLDOWN_SECONDS": "120",
    }
    replicas = []
    for n in range(2):
        port = free_port()
        env = replica_env(dify.base_url, redis_url, METRICS_PORT=str(port), **settings)
        replicas.append((GunicornReplica(env, tmp_path, f"replica-{n}", workers=2).start(), port))
    web = free_port()
    # The bundle's rules, with the no-holder alert's 60 s `for` made 10 s: the wiring is what this test shows (the
    # alert's timing on its own, at 60 s, is promtool's: test_every_alert_fires_when_it_should_and_only_then).
    rules = rules_file.read_text().replace("for: 60s", "for: 10s")
    assert rules != rules_file.read_text()
    (tmp_path / "live-rules.yaml").write_text(rules)
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(tmp_path / "live-rules.yaml")],
        "scrape_configs": [
            {"job_name": "wecom-gateway", "static_configs": [{"targets": [f"127.0.0.1:{p}" for _, p in replicas]}]}
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    server = subprocess.Popen(
        [
            prometheus,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{web}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "prometheus.log").open("w"),
    )
    api = f"http://127.0.0.1:{web}/api/v1"

    def query(expression: str) -> list:
        try:
            return httpx.get(f"{api}/query", params={"query": expression}, timeout=2).json()["data"]["result"]
        except (httpx.HTTPError, KeyError, ValueError):
            return []

    def alert_states(name: str) -> set[str]:
        try:
            found = httpx.get(f"{api}/alerts", timeout=2).json()["data"]["alerts"]
        except (httpx.HTTPError, KeyError, ValueError):
            return set()
        return {a["state"] for a in found if a["labels"]["alertname"] == name and a["labels"].get("bot") == "default"}

    try:
        holders = 'sum by (bot) (wecom_ws_connected{bot="default"})'
        assert wait_until(lambda: [r["value"][1] for r in query(holders)] == ["1"], timeout=60)
        assert wait_until(lambda: query('dify_calls_total{kind="duplicate"}'), timeout=10)  # at zero, yet there
        # (pending for a moment at start-up, before a replica held the bot: the series exist from the start, at 0)
        assert wait_until(lambda: alert_states("WecomGatewayLongConnectionNoHolder") == set(), timeout=15)
        wecom.kick("prom-bot")  # someone else's subscriber: the deployment leaves the bot alone for 120 s
        assert wait_until(lambda: "pending" in alert_states("WecomGatewayLongConnectionNoHolder"), timeout=30)
        assert wait_until(lambda: alert_states("WecomGatewayForeignKick") == {"firing"}, timeout=30)
        assert wait_until(lambda: alert_states("WecomGatewayLongConnectionNoHolder") == {"firing"}, timeout=40)
    finally:
        server.terminate()
        server.wait(10)
        for replica, _ in replicas:
            replica.stop()
