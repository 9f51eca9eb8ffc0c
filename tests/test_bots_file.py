"""BOTS_FILE (config/bots.py): each bot a whole set of settings, the environment filling the gaps, and every
problem of the file one line naming the bot and the key; without the file, the environment's one bot."""

import subprocess
import sys

import pytest

from config.bots import LAST_GOOD_COPY, bot_keys, load_bots, load_bots_keeping_last_good
from config.settings import DEMO_DEFAULTS, DEMO_ENV_FILES, PROJECT_ROOT, SettingsError, load_settings

DEPLOYMENT = {
    "REDIS_URL": "redis://redis:6379/0",
    "DIFY_BASE_URL": "https://dify.example/v1",
    "AUTH_MODE": "none",
}
HR = """
[bots.hr]
token = "hr-token"
encoding_aes_key = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"
dify_api_key = "app-hr"
"""
IT = """
[bots.it]
callback_path = "/wecom/it"
token_file = "secrets/it-token"
encoding_aes_key = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789abcdefg"
dify_base_url = "https://it-dify.example/v1"
dify_api_key_file = "secrets/it-dify-key"
bot_language = "en"
rate_limit_per_minute = 5
welcome_message = "IT helpdesk"
"""


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "it-token").write_text("it-token\n")
    (tmp_path / "secrets" / "it-dify-key").write_text("app-it\n")
    return tmp_path


def bots_from(folder, text: str, **env: str):
    path = folder / "bots.toml"
    path.write_text(text)
    return load_bots(load_settings({**DEPLOYMENT, "BOTS_FILE": str(path), **env}, env_files=()))


def problems_of(folder, text: str, **env: str) -> list[str]:
    with pytest.raises(SettingsError) as error:
        bots_from(folder, text, **env)
    return error.value.problems


def test_without_a_bots_file_the_environment_is_the_one_bot_default():
    env = {**DEPLOYMENT, "WECOM_TOKEN": "t", "WECOM_ENCODING_AES_KEY": "a" * 43, "DIFY_API_KEY": "app-x"}
    settings = load_settings(env, env_files=())
    (bot,) = load_bots(settings)
    assert bot is settings.bot
    assert bot.name == "default"
    assert bot.wecom.callback_path == "/wecom/callback"
    assert bot_keys(bot.name) == ""  # the single bot keeps today's key names


def test_each_bot_gets_its_table_and_the_environment_fills_the_rest(folder):
    hr, it = bots_from(folder, HR + IT, BOT_LANGUAGE="zh", RATE_LIMIT_PER_MINUTE="20")
    assert (hr.name, it.name) == ("hr", "it")
    assert hr.wecom.callback_path == "/wecom/callback/hr"  # the default path names the bot
    assert it.wecom.callback_path == "/wecom/it"
    assert hr.dify.base_url == "https://dify.example/v1"  # from the environment
    assert it.dify.base_url == "https://it-dify.example/v1"
    assert (hr.language, it.language) == ("zh", "en")
    assert (hr.answers.rate_limit_per_minute, it.answers.rate_limit_per_minute) == (20, 5)
    assert it.wecom.welcome_message == "IT helpdesk"
    assert it.wecom.mode == "callback"
    assert bot_keys("it") == "bot:it:"


def test_secrets_come_from_files_beside_the_bots_file_and_stay_out_of_repr(folder):
    _, it = bots_from(folder, HR + IT)
    assert it.wecom.token == "it-token"  # the file's trailing newline is not part of it
    assert it.dify.api_key == "app-it"
    assert "app-it" not in repr(it)
    assert "it-token" in it.secrets()


def test_a_secret_missing_from_a_table_comes_from_the_environment(folder):
    table = HR.replace('dify_api_key = "app-hr"\n', "")
    (hr,) = bots_from(folder, table, DIFY_API_KEY="app-from-env")
    assert hr.dify.api_key == "app-from-env"


def test_two_bots_may_not_share_a_wecom_credential(folder):
    """A table without its own token takes the environment's: a second such table would silently share it, and
    each bot would then accept the other's callbacks."""
    tables = """
[bots.a]
encoding_aes_key = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"
dify_api_key = "app-a"

[bots.b]
encoding_aes_key = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789abcdefg"
dify_api_key = "app-b"
"""
    [problem] = problems_of(folder, tables, WECOM_TOKEN="env-token")
    assert problem.startswith("BOTS_FILE bots.b: token is bots.a's too")
    assert "env-token" not in problem


def test_two_bots_sharing_one_dify_app_are_named_in_one_warning(folder):
    from config.bots import shared_dify_keys

    bots = bots_from(folder, HR + IT.replace('dify_api_key_file = "secrets/it-dify-key"\n', ""), DIFY_API_KEY="app-hr")
    assert shared_dify_keys(bots) == []  # different Dify hosts: different apps
    same_host = IT.replace('dify_api_key_file = "secrets/it-dify-key"\n', "").replace("it-dify", "dify")
    [warning] = shared_dify_keys(bots_from(folder, HR + same_host, DIFY_API_KEY="app-hr"))
    assert warning.startswith("bots hr, it share one Dify app")
    assert "app-hr" not in warning


BAD_FILES = [
    pytest.param(HR + 'colour = "blue"\n', "BOTS_FILE bots.hr: unknown key 'colour'", id="unknown-key"),
    pytest.param(HR + 'redis_url = "redis://x"\n', "BOTS_FILE bots.hr: unknown key 'redis_url'", id="deployment-key"),
    pytest.param(
        HR.replace('dify_api_key = "app-hr"\n', ""),
        "BOTS_FILE bots.hr: dify_api_key is required",
        id="missing-secret",
    ),
    pytest.param(
        HR.replace('token = "hr-token"', 'token_file = "secrets/nowhere"'),
        "BOTS_FILE bots.hr: token_file cannot be read (secrets/nowhere: No such file or directory)",
        id="unreadable-secret-file",
    ),
    pytest.param(
        HR + IT.replace("/wecom/it", "/wecom/callback/hr"),
        "BOTS_FILE bots.it: callback_path /wecom/callback/hr is bots.hr's already",
        id="duplicate-path",
    ),
    pytest.param(
        HR.replace("[bots.hr]", '[bots.hr]\ncallback_path = "/readyz"'),
        "BOTS_FILE bots.hr: callback_path /readyz is the gateway's own",
        id="reserved-path",
    ),
    pytest.param(
        HR.replace("abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG", "too-short"),
        "BOTS_FILE bots.hr: encoding_aes_key must be 43 characters (got 9 characters)",
        id="bad-aes-key",
    ),
    pytest.param(
        HR + "rate_limit_per_minute = 'many'\n",
        "BOTS_FILE bots.hr: rate_limit_per_minute must be a whole number",
        id="bad-type",
    ),
    pytest.param(HR + 'bot_language = "fr"\n', "BOTS_FILE bots.hr: bot_language must be 'zh' or 'en'", id="bad-value"),
    pytest.param(
        HR + 'mode = "carrier-pigeon"\n',
        "BOTS_FILE bots.hr: mode must be 'callback' or 'long_connection'",
        id="bad-mode",
    ),
    pytest.param(
        HR.replace("[bots.hr]", "[bots.HR]"),
        "BOTS_FILE bots.HR: the name must be 1 to 32 of a-z, 0-9, _ and -",
        id="bad-name",
    ),
    pytest.param("[bots.hr\ntoken = 1\n", "BOTS_FILE is not valid TOML (", id="bad-toml"),
    pytest.param("[server]\nport = 1\n", "BOTS_FILE has tables other than [bots.<name>]: server", id="other-table"),
    pytest.param("", "BOTS_FILE names no bot: add a table such as [bots.hr]", id="no-bot"),
]


@pytest.mark.parametrize(("text", "line"), BAD_FILES)
def test_a_bad_file_is_one_line_naming_the_bot_and_the_key(folder, text, line):
    problems = problems_of(folder, text)
    assert [problem for problem in problems if problem.startswith(line)] == [problems[0]]
    assert len(problems) == 1


def test_every_problem_of_the_file_is_reported_at_once(folder):
    text = HR + 'colour = "blue"\n' + IT.replace('bot_language = "en"', 'bot_language = "fr"')
    problems = problems_of(folder, text)
    assert problems == [
        "BOTS_FILE bots.hr: unknown key 'colour'",
        "BOTS_FILE bots.it: bot_language must be 'zh' or 'en'",
    ]


def test_no_problem_line_shows_a_secret(folder):
    text = HR.replace("abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG", "secret-but-too-short")
    problems = problems_of(folder, text.replace('dify_api_key = "app-hr"', "dify_api_key = 42"))
    assert not [problem for problem in problems if "secret-but-too-short" in problem]
    assert "BOTS_FILE bots.hr: dify_api_key must be a string" in problems


def test_a_missing_file_is_one_line(tmp_path):
    settings = load_settings({**DEPLOYMENT, "BOTS_FILE": str(tmp_path / "nowhere.toml")}, env_files=())
    with pytest.raises(SettingsError) as error:
        load_bots(settings)
    assert error.value.problems == [
        f"BOTS_FILE cannot be read ({tmp_path / 'nowhere.toml'}: No such file or directory)"
    ]


def test_a_bad_edit_keeps_the_last_good_copy_for_the_processes_of_a_replica(folder, tmp_path_factory):
    """gunicorn's master and workers share a folder: a file that loads is copied there, and a worker booted after
    a bad edit (a HUP, a restart) serves the copy's bots and logs the file's problems; before any good load there
    is no copy, and a bad file stops the start-up as without one. The copy's relative secret files are still read
    from the bots file's folder, and `load_bots` itself keeps nothing between calls."""
    run_dir = tmp_path_factory.mktemp("run")
    path = folder / "bots.toml"
    settings = load_settings({**DEPLOYMENT, "BOTS_FILE": str(path)}, env_files=())
    path.write_text(HR + 'colour = "blue"\n')
    with pytest.raises(SettingsError):  # nothing good yet: start-up fails, one line per problem
        load_bots_keeping_last_good(settings, run_dir)
    assert not (run_dir / LAST_GOOD_COPY).exists()

    path.write_text(HR + IT)
    bots, problems = load_bots_keeping_last_good(settings, run_dir)
    assert ([bot.name for bot in bots], problems) == (["hr", "it"], [])
    assert (run_dir / LAST_GOOD_COPY).read_text() == HR + IT

    path.write_text(HR + 'colour = "blue"\n')
    kept, problems = load_bots_keeping_last_good(settings, run_dir)
    assert kept == bots  # the it bot's token and key files read from the bots file's folder, as before
    assert problems == ["BOTS_FILE bots.hr: unknown key 'colour'"]
    with pytest.raises(SettingsError):
        load_bots(settings)  # no hidden state: the file alone says what load_bots returns


def test_a_deployment_with_a_bots_file_needs_no_single_bot_variables(folder):
    """WECOM_TOKEN, DIFY_API_KEY, ... are the bots' business then: the deployment's own settings pass without."""
    settings = load_settings({**DEPLOYMENT, "BOTS_FILE": str(folder / "bots.toml")}, env_files=())
    assert settings.bot.name == ""


def test_start_up_with_a_bad_file_prints_one_line_per_problem_and_exits_2(folder):
    path = folder / "bots.toml"
    path.write_text(HR + 'colour = "blue"\n')
    env = {"PATH": "/usr/bin:/bin", **DEPLOYMENT, "BOTS_FILE": str(path)}
    for command in (
        [sys.executable, "app.py"],
        [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "app:create_app()"],
    ):
        result = subprocess.run(command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=30)
        assert result.returncode == 2
        lines = [line for line in result.stderr.splitlines() if "gunicorn" not in line]  # gunicorn's own INFO lines
        assert lines == ["configuration error: BOTS_FILE bots.hr: unknown key 'colour'"]


LONG = """
[bots.ops]
mode = "long_connection"
bot_id = "aibot-ops"
secret = "ops-secret"
dify_api_key = "app-ops"
"""


def test_a_long_connection_bot_needs_its_bot_id_and_secret_not_a_token(folder):
    hr, ops = bots_from(folder, HR + LONG)
    assert (hr.wecom.mode, ops.wecom.mode) == ("callback", "long_connection")
    assert ops.connection.bot_id == "aibot-ops"
    assert ops.connection.bot_secret == "ops-secret"
    assert "ops-secret" not in repr(ops)


def test_long_connection_problems_name_the_bot_and_the_key(folder):
    assert problems_of(folder, LONG.replace('secret = "ops-secret"\n', "")) == [
        "BOTS_FILE bots.ops: secret is required with WECOM_MODE=long_connection"
    ]
    assert problems_of(folder, LONG + LONG.replace("[bots.ops]", "[bots.ops2]")) == [
        "BOTS_FILE bots.ops2: bot_id is bots.ops's already"
    ]


def test_the_demos_assistant_talks_to_the_dify_the_environment_names():
    """`DIFY_BASE_URL=… DIFY_API_KEY=app-mine make demo`: the assistant answers from that app (before, the demo's
    bots file fixed its key and the newcomer's was silently ignored); the helpdesk and ops bots stay on the
    stand-in, with their own demo keys. Without them, all three are the stand-in's."""
    own = {"DIFY_BASE_URL": "https://dify.example.com/v1", "DIFY_API_KEY": "app-mine"}
    for environ, assistant in ((own, ("https://dify.example.com/v1", "app-mine")), ({}, (STANDIN, "app-demo"))):
        bots = {bot.name: bot for bot in load_bots(load_settings(environ, env_files=DEMO_ENV_FILES))}
        assert (bots["assistant"].dify.base_url, bots["assistant"].dify.api_key) == assistant
        assert (bots["helpdesk"].dify.base_url, bots["helpdesk"].dify.api_key) == (STANDIN, "app-demo-helpdesk")
        assert (bots["ops"].dify.base_url, bots["ops"].dify.api_key) == (STANDIN, "app-demo-ops")


STANDIN = DEMO_DEFAULTS["dify_base_url"]


def test_a_bots_webhooks_are_a_table_of_their_own_secrets_from_files_too(folder):
    (folder / "secrets" / "sales-webhook").write_text("https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key=s3cr3t\n")
    text = HR + (
        "[bots.hr.webhooks]\n"
        'ops = "https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key=k0"\n'
        'sales_file = "secrets/sales-webhook"\n'
    )
    (hr,) = bots_from(folder, text)
    assert hr.wecom.webhook_urls() == {
        "ops": "https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key=k0",
        "sales": "https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key=s3cr3t",
    }
    assert "s3cr3t" in hr.secrets() and "s3cr3t" not in repr(hr)
    bad = HR + '[bots.hr.webhooks]\nOps = "https://x.example/send?key=k"\nsales = "https://x.example/send"\n'
    assert problems_of(folder, bad) == [
        "BOTS_FILE bots.hr: webhooks names 'Ops': a webhook's name is 1 to 32 of a-z, 0-9, _ and -",
        "BOTS_FILE bots.hr: webhooks gives 'sales' no group robot's URL (one with its key=)",
    ]
