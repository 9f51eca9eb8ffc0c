"""Two bots in one app instance, in process: each bot's keys, metrics label, log field, readiness entry and
operator commands (`flask bots list`, `streams ... --bot`, `users token --bot`). The gunicorn replicas with a
bots file are in tests/e2e/test_bots_e2e.py."""

import json

import pytest

from demo import dify_standin as d
from demo.wecom_simulator import WeComSimulator
from tests.conftest import AES_KEY, DIFY_KEY, OPENAI_KEY, OPENAI_MODEL, TOKEN

OTHER_TOKEN, OTHER_AES_KEY = "helpdesk-token", "HelpdeskKey0123456789abcdefghijklmnopqrstuv"


@pytest.fixture
def two_bots(tmp_path, make_app, serve, dify):
    """Bots `hr` (the test Dify app) and `helpdesk` (a key Dify refuses), served on a real port."""
    path = tmp_path / "bots.toml"
    path.write_text(
        f"""
[bots.hr]
token = "{TOKEN}"
encoding_aes_key = "{AES_KEY}"
dify_api_key = "{DIFY_KEY}"

[bots.helpdesk]
callback_path = "/wecom/helpdesk"
token = "{OTHER_TOKEN}"
encoding_aes_key = "{OTHER_AES_KEY}"
dify_api_key = "app-refused"
bot_language = "en"
"""
    )
    return serve(make_app(bots_file=str(path), bot_name=""))


@pytest.fixture
def sims(two_bots):
    hr = WeComSimulator(two_bots.url, TOKEN, AES_KEY, callback_path="/wecom/callback/hr", poll_interval=0.05)
    helpdesk = WeComSimulator(
        two_bots.url, OTHER_TOKEN, OTHER_AES_KEY, callback_path="/wecom/helpdesk", poll_interval=0.05
    )
    yield hr, helpdesk
    hr.close()
    helpdesk.close()


def cli(live, *args) -> str:
    result = live.app.test_cli_runner().invoke(args=list(args))
    assert result.exit_code == 0, result.output
    return result.output


def test_each_bots_keys_carry_its_name(two_bots, sims, dify, redis_client):
    hr, _ = sims
    dify.script(d.answer("kept apart"))
    conversation = hr.ask("where are my keys?")
    assert redis_client.exists(f"bot:hr:dify_stream:{{{conversation.stream_id}}}") == 1
    assert redis_client.exists(f"dify_stream:{{{conversation.stream_id}}}") == 0


def test_every_log_line_of_an_answer_names_its_bot(tmp_path, make_app, serve, dify, capsys):
    path = tmp_path / "bots.toml"
    path.write_text(f'[bots.hr]\ntoken = "{TOKEN}"\nencoding_aes_key = "{AES_KEY}"\ndify_api_key = "{DIFY_KEY}"\n')
    live = serve(make_app(bots_file=str(path), bot_name="", log_format="json"))
    hr = WeComSimulator(live.url, TOKEN, AES_KEY, callback_path="/wecom/callback/hr", poll_interval=0.05)
    dify.script(d.answer("logged"))
    conversation = hr.ask("log me")
    hr.close()
    live.gateway.runner.drain(5)
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    mine = [entry for entry in lines if entry.get("stream") == conversation.stream_id]
    assert len(mine) >= 3
    assert {entry.get("bot") for entry in mine} == {"hr"}


def test_bots_list_shows_each_bot_and_its_backends_health(two_bots):
    output = cli(two_bots, "bots", "list", "--timeout", "3").splitlines()
    assert output[0].split() == ["BOT", "MODE", "PATH", "BACKEND", "AT", "APP", "AUTH", "ROUTES", "HEALTH"]
    helpdesk, hr = (line.split() for line in output[1:])
    assert helpdesk[:4] == ["helpdesk", "callback", "/wecom/helpdesk", "dify"]
    assert helpdesk[5] == "auto"  # its app could not be asked
    assert helpdesk[7] == "0"
    assert " ".join(helpdesk[8:]).startswith("dify: the key was refused (HTTP 401)")
    assert hr[:4] == ["hr", "callback", "/wecom/callback/hr", "dify"]
    assert hr[5:7] == ["auto:", "chat"]
    assert hr[8:10] == ["0", "ok"]


def test_bots_check_asks_every_backend_and_fails_when_one_does_not_answer(make_app, tmp_path, dify, openai):
    """One line per bot, reachable or why not, for both kinds of backend; exit status 1 when any is not."""
    path = tmp_path / "bots.toml"
    path.write_text(
        f'[bots.hr]\ntoken = "{TOKEN}"\nencoding_aes_key = "{AES_KEY}"\ndify_api_key = "{DIFY_KEY}"\n\n'
        f'[bots.model]\ncallback_path = "/wecom/model"\ntoken = "model-token"\nencoding_aes_key = "{"M" * 43}"\n'
        f'backend = "openai"\nopenai_base_url = "{openai.base_url}"\nopenai_model = "{OPENAI_MODEL}"\n'
        f'openai_api_key = "{OPENAI_KEY}"\n'
    )
    app = make_app(bots_file=str(path), bot_name="")
    result = app.test_cli_runner().invoke(args=["bots", "check"])
    assert result.exit_code == 0, result.output
    host = openai.base_url.split("//")[1].split("/")[0]
    assert result.output.splitlines() == [
        f"hr: dify at {dify.base_url.split('//')[1].split('/')[0]}: reachable",
        f"model: openai at {host} ({OPENAI_MODEL}): reachable",
    ]
    path.write_text(path.read_text().replace(OPENAI_MODEL, "no-such-model"))
    wrong = make_app(bots_file=str(path), bot_name="")
    result = wrong.test_cli_runner().invoke(args=["bots", "check", "--bot", "model"])
    assert result.exit_code == 1
    assert result.output.startswith(f"model: openai at {host} (no-such-model): it offers no model 'no-such-model'")


def test_streams_and_users_commands_take_a_bot(two_bots, sims, dify):
    hr, helpdesk = sims
    dify.script(d.answer("hr's answer"))
    hr_stream = hr.ask("hr question").stream_id
    helpdesk_stream = helpdesk.ask("helpdesk question").stream_id  # refused by Dify: an error stream

    every = cli(two_bots, "streams", "list")
    only_hr = cli(two_bots, "streams", "list", "--bot", "hr")
    assert hr_stream in every
    assert helpdesk_stream in every
    assert hr_stream in only_hr
    assert helpdesk_stream not in only_hr
    assert "hr's answer" in cli(two_bots, "streams", "show", hr_stream)  # found in whichever bot it is
    assert (
        "no stream"
        in two_bots.app.test_cli_runner().invoke(args=["streams", "show", hr_stream, "--bot", "helpdesk"]).output
    )
    tokens = cli(two_bots, "users", "token", "alice").splitlines()
    assert [line.split()[0] for line in tokens if "token" in line] == ["[helpdesk]", "[hr]"]
    unknown = two_bots.app.test_cli_runner().invoke(args=["streams", "list", "--bot", "sales"])
    assert unknown.exit_code != 0
    assert "no bot 'sales' (bots: helpdesk, hr)" in unknown.output


def test_readiness_lists_each_bot_with_its_last_dify_outcome(two_bots, sims, dify):
    hr, helpdesk = sims
    client = two_bots.app.test_client()
    before = client.get("/readyz").get_json()
    dify.script(d.answer("fine"))
    hr.ask("hr question")
    helpdesk.ask("helpdesk question")
    after = client.get("/readyz")

    assert before["bots"]["hr"]["dify"] == "unknown"
    assert after.status_code == 200  # one bot's Dify refusing its key makes no replica unready
    assert after.get_json()["bots"]["hr"]["dify"] == "ok"
    assert after.get_json()["bots"]["helpdesk"]["dify"] == "unauthorized"
    assert after.get_json()["bots"]["helpdesk"]["path"] == "/wecom/helpdesk"


def test_metrics_carry_the_bot(two_bots, sims, dify):
    hr, helpdesk = sims
    dify.script(d.answer("counted"))
    hr.ask("count me")
    helpdesk.ask("and me")
    text = two_bots.app.test_client().get("/metrics").get_data(as_text=True)
    assert 'stream_outcomes_total{bot="hr",outcome="done"}' in text
    assert 'dify_errors_total{backend="dify",bot="helpdesk",code="unauthorized",route=""}' in text
