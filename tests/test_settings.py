"""Typed settings: sources and precedence, demo defaults, and one clear line for every bad value."""

import subprocess
import sys

import pytest

from config.settings import DEMO_DEFAULTS, PROJECT_ROOT, VARIABLES, Settings, SettingsError, load_settings

VALID = {
    "WECOM_TOKEN": "tok-Secret-1",
    "WECOM_ENCODING_AES_KEY": "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG",
    "DIFY_BASE_URL": "https://dify.example/v1",
    "DIFY_API_KEY": "app-xyz",
    "REDIS_URL": "redis://redis:6379/0",
    "AUTH_MODE": "none",
}
EXTERNAL_AUTH = {
    "AUTH_MODE": "external",
    "AUTH_API_URL": "https://auth.example/token",
    "AUTH_API_KEY": "svc-key",
    "DATABASE_URL": "mysql+pymysql://gw:pw@mysql/gw",
}


def load(env, files=()):
    return load_settings(env, env_files=files)


def test_valid_production_settings():
    settings = load(VALID)
    assert settings.demo_mode is False
    assert settings.bot.dify.base_url == "https://dify.example/v1"
    assert settings.bot.wecom.callback_path == "/wecom/callback"
    assert settings.redis.url == "redis://redis:6379/0"


def test_valid_production_settings_with_external_auth():
    settings = load({**VALID, **EXTERNAL_AUTH})
    assert settings.bot.auth.mode == "external"
    assert settings.database.url == EXTERNAL_AUTH["DATABASE_URL"]


def test_types_are_parsed():
    settings = load({**VALID, "DIFY_READ_TIMEOUT": "12.5", "STREAM_LEASE_SECONDS": "9", "DEMO_MODE": "no"})
    assert settings.bot.dify.read_timeout == 12.5
    assert settings.streams.lease_seconds == 9
    assert settings.demo_mode is False


def test_dotenv_then_demo_env_and_the_real_environment_wins(tmp_path):
    dotenv = tmp_path / ".env"
    demo = tmp_path / "demo.env"
    dotenv.write_text("DIFY_API_KEY=app-from-dotenv\nBOT_LANGUAGE=en\n")
    demo.write_text("DIFY_API_KEY=app-from-demo\nBOT_LANGUAGE=zh\nWECOM_CALLBACK_PATH=/from-demo\n")
    env = {k: v for k, v in VALID.items() if k != "DIFY_API_KEY"}
    settings = load({**env, "BOT_LANGUAGE": "zh"}, files=(dotenv, demo))
    assert settings.bot.dify.api_key == "app-from-dotenv"  # .env beats demo.env
    assert settings.bot.language == "zh"  # the real environment beats both
    assert settings.bot.wecom.callback_path == "/from-demo"  # demo.env fills what nothing else sets


def test_missing_files_are_fine(tmp_path):
    assert load(VALID, files=(tmp_path / "nope.env",)).bot.wecom.token == "tok-Secret-1"


def test_demo_mode_fills_credentials_the_embedded_stores_and_the_standins_addresses():
    settings = load({"DEMO_MODE": "true"})
    assert settings.bot.wecom.token == DEMO_DEFAULTS["wecom_token"]
    assert settings.redis.url == "memory://"
    assert settings.database.url == ""  # the gateway puts a SQLite file in its instance folder
    assert settings.bot.dify.base_url == DEMO_DEFAULTS["dify_base_url"]  # where `python -m demo` starts its stand-in
    assert settings.bot.auth.api_url == DEMO_DEFAULTS["auth_api_url"]


@pytest.mark.parametrize(
    ("change", "line"),
    [
        (
            {"REDIS_URL": ""},
            "REDIS_URL is required: the Redis every replica shares, e.g. redis://redis:6379/0",
        ),
        (
            {"REDIS_URL": "memory://"},
            "REDIS_URL=memory:// is the demo's embedded store and keeps state inside one process; outside demo "
            "mode set the Redis every replica shares, e.g. redis://redis:6379/0",
        ),
        (
            {**EXTERNAL_AUTH, "DATABASE_URL": ""},
            "DATABASE_URL is required with AUTH_MODE=external: the wecom_users table every replica reads, "
            "e.g. mysql+pymysql://user:pass@mysql/db",
        ),
        (
            {**EXTERNAL_AUTH, "AUTH_API_KEY": ""},
            "AUTH_API_KEY is required with AUTH_MODE=external (our credential for the auth API)",
        ),
    ],
)
def test_production_fails_closed_instead_of_falling_back_to_an_embedded_store(change, line):
    with pytest.raises(SettingsError) as caught:
        load({**VALID, **change})
    assert caught.value.problems == [line]


def test_a_bad_group_conversation_mode_is_one_line():
    with pytest.raises(SettingsError) as caught:
        load({**VALID, "GROUP_CONVERSATION": "everyone"})
    assert caught.value.problems == ["GROUP_CONVERSATION must be 'per_user' or 'shared'"]


def test_every_problem_is_reported_at_once():
    env = {"REDIS_URL": "", "WECOM_TOKEN": "", "DIFY_API_KEY": "", "DIFY_READ_TIMEOUT": "soon", "PORT": "0"}
    with pytest.raises(SettingsError) as caught:
        load({**VALID, **env})
    named = [problem.split(" ", 1)[0] for problem in caught.value.problems]
    assert sorted(named) == ["DIFY_API_KEY", "DIFY_READ_TIMEOUT", "PORT", "REDIS_URL", "WECOM_TOKEN"]


def test_an_aes_key_of_the_right_length_with_other_characters_says_which_are_allowed():
    key = "abcdefghijklmnopqrstuvwxyz0123456789ABCD+/G"
    with pytest.raises(SettingsError) as caught:
        load({**VALID, "WECOM_ENCODING_AES_KEY": key})
    assert caught.value.problems == [
        "WECOM_ENCODING_AES_KEY may hold only the letters A-Z, a-z and the digits 0-9 (found '+/'); "
        "copy it again from the bot's API settings"
    ]


@pytest.mark.parametrize(
    ("change", "variable"),
    [
        ({"WECOM_TOKEN": ""}, "WECOM_TOKEN"),
        ({"WECOM_ENCODING_AES_KEY": "too-short"}, "WECOM_ENCODING_AES_KEY"),
        ({"WECOM_ENCODING_AES_KEY": "!" * 43}, "WECOM_ENCODING_AES_KEY"),
        ({"DIFY_BASE_URL": ""}, "DIFY_BASE_URL"),
        ({"DIFY_BASE_URL": "ftp://dify"}, "DIFY_BASE_URL"),
        ({"DIFY_API_KEY": ""}, "DIFY_API_KEY"),
        ({"DIFY_READ_TIMEOUT": "soon"}, "DIFY_READ_TIMEOUT"),
        ({"DIFY_READ_TIMEOUT": "0"}, "DIFY_READ_TIMEOUT"),
        ({"DIFY_QUIET_RUN_SECONDS": "-1"}, "DIFY_QUIET_RUN_SECONDS"),
        ({"DIFY_QUIET_RUN_SECONDS": "a while"}, "DIFY_QUIET_RUN_SECONDS"),
        ({"STREAM_LEASE_SECONDS": "1.5"}, "STREAM_LEASE_SECONDS"),
        ({"STREAM_WINDOW_SECONDS": "400"}, "STREAM_WINDOW_SECONDS"),
        ({"REDIS_URL": "http://redis"}, "REDIS_URL"),
        ({"REDIS_URL": "redis+sentinel://s1:26379,s2:26379"}, "REDIS_URL"),  # no service name
        ({"REDIS_URL": "redis+cluster://n1:7000,n2:x"}, "REDIS_URL"),
        ({"REDIS_URL": "redis+cluster://n1:7000/3"}, "REDIS_URL"),
        ({"REDIS_URL": "redis://127.0.0.1:63a79/0"}, "REDIS_URL"),  # else a traceback in every worker
        ({"REDIS_URL": "redis://:pw@redis:6379/abc"}, "REDIS_URL"),  # else silently database 0
        ({"REDIS_URL": "redis:///0"}, "REDIS_URL"),
        ({"REDIS_URL": "unix://?db=1"}, "REDIS_URL"),
        ({"REDIS_KEY_PREFIX": "{gw}:"}, "REDIS_KEY_PREFIX"),
        ({"REDIS_CLAIM_WAIT_MS": "-1"}, "REDIS_CLAIM_WAIT_MS"),
        (
            {
                "REDIS_URL": "redis+sentinel://s1:26379/mymaster",
                "REDIS_CLAIM_WAIT_MS": "2000",
                "REDIS_SOCKET_TIMEOUT": "1",
            },
            "REDIS_CLAIM_WAIT_MS",
        ),
        ({"DATABASE_READ_URL": "mysql+pymysql://ro@replica/gw"}, "DATABASE_READ_URL"),  # without DATABASE_URL
        ({"DATABASE_URL": "mysql+pymysql://gw@db/gw", "DATABASE_READ_URL": "postgres://r/gw"}, "DATABASE_READ_URL"),
        ({"DATABASE_URL": "postgres://db"}, "DATABASE_URL"),
        ({"AUTH_MODE": "maybe"}, "AUTH_MODE"),
        ({**EXTERNAL_AUTH, "AUTH_API_URL": ""}, "AUTH_API_URL"),
        ({"METRICS_PORT": "8080"}, "METRICS_PORT"),
        ({"DEMO_MODE": "perhaps"}, "DEMO_MODE"),
        ({"WECOM_CALLBACK_PATH": "wecom"}, "WECOM_CALLBACK_PATH"),
        ({"LOG_FORMAT": "xml"}, "LOG_FORMAT"),
        ({"BOT_LANGUAGE": "fr"}, "BOT_LANGUAGE"),
        ({"PORT": "70000"}, "PORT"),
        ({"QUOTA_USER_MESSAGES_PER_DAY": "ten"}, "QUOTA_USER_MESSAGES_PER_DAY"),
        ({"QUOTA_USER_MESSAGES_PER_DAY": "-1"}, "QUOTA_USER_MESSAGES_PER_DAY"),
        ({"QUOTA_CHAT_MESSAGES_PER_DAY": "2.5"}, "QUOTA_CHAT_MESSAGES_PER_DAY"),
        ({"QUOTA_TIMEZONE": "Mars/Olympus"}, "QUOTA_TIMEZONE"),
        ({"AUDIT": "maybe"}, "AUDIT"),
        ({"AUDIT": "on"}, "AUDIT"),  # with no database to write to
        ({"AUDIT_CONTENT": "some"}, "AUDIT_CONTENT"),
        ({"AUDIT_RETENTION_DAYS": "-3"}, "AUDIT_RETENTION_DAYS"),
        ({"AUDIT_API_TOKEN": "short"}, "AUDIT_API_TOKEN"),
    ],
)
def test_bad_values_name_the_variable_in_one_line(change, variable):
    with pytest.raises(SettingsError) as caught:
        load({**VALID, **change})
    [problem] = caught.value.problems
    assert problem.startswith(variable + " ")
    assert "\n" not in problem


@pytest.mark.parametrize(
    "url",
    [
        "redis+sentinel://s1:26379,s2:26379,s3:26379/mymaster",
        "rediss+sentinel://:pw@s1:26379/mymaster/2",
        "redis+cluster://n1:7000,n2:7001,n3:7002",
        "rediss+cluster://user:pw@n1",
        "redis://:pw@redis:6379/3",
        "rediss://redis",
        "unix:///run/redis.sock?db=2",
    ],
)
def test_sentinel_and_cluster_urls_are_settings(url):
    assert load({**VALID, "REDIS_URL": url}).redis.url == url


def test_a_bad_redis_url_never_shows_its_password():
    with pytest.raises(SettingsError) as caught:
        load({**VALID, "REDIS_URL": "redis+cluster://:hunter2@n1:notaport"})
    assert "hunter2" not in str(caught.value)


def test_secrets_stay_out_of_repr():
    settings = load(
        {
            **VALID,
            "REDIS_URL": "redis://:hunter2@redis:6379/0",
            "AUTH_API_KEY": "auth-secret",
            "REDIS_SENTINEL_PASSWORD": "sentinel-secret",
            "DATABASE_URL": "mysql+pymysql://gw:db-secret@db/gw",
            "DATABASE_READ_URL": "mysql+pymysql://ro:replica-secret@replica/gw",
        }
    )
    text = repr(settings)
    secrets = ("tok-Secret-1", VALID["WECOM_ENCODING_AES_KEY"], "app-xyz", "hunter2", "auth-secret")
    for secret in (*secrets, "sentinel-secret", "db-secret", "replica-secret"):
        assert secret not in text


def test_instance_id_is_replica_plus_pid():
    settings = Settings.of(**{k.lower(): v for k, v in VALID.items()}, replica_id="pod-7")
    assert settings.instance_id.startswith("pod-7:")
    assert settings.instance_id.split(":")[1].isdigit()


def test_start_up_with_a_bad_value_prints_one_line_and_exits_2():
    env = {"PATH": "/usr/bin:/bin", **VALID, "WECOM_ENCODING_AES_KEY": "abc", "BOTS_FILE": ""}
    result = subprocess.run(
        [sys.executable, "app.py"], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "configuration error: WECOM_ENCODING_AES_KEY must be 43 characters (got 3 characters)"
    ]


def test_start_up_with_several_bad_values_prints_a_line_for_each():
    env = {"PATH": "/usr/bin:/bin", **VALID, "DEMO_MODE": "false", "REDIS_URL": "", "DIFY_API_KEY": "", "BOTS_FILE": ""}
    result = subprocess.run(
        [sys.executable, "app.py"], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    lines = sorted(result.stderr.strip().splitlines())
    assert len(lines) == 2
    assert lines[0].startswith("configuration error: DIFY_API_KEY is required")
    assert lines[1].startswith("configuration error: REDIS_URL is required")


def test_a_secret_can_come_from_a_mounted_file(tmp_path):
    secret = tmp_path / "dify-api-key"
    secret.write_text("app-from-a-secret-volume\n")
    env = {k: v for k, v in VALID.items() if k != "DIFY_API_KEY"}
    settings = load({**env, "DIFY_API_KEY_FILE": str(secret)})
    assert settings.bot.dify.api_key == "app-from-a-secret-volume"
    assert "app-from-a-secret-volume" not in repr(settings)


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"DIFY_API_KEY_FILE": "/nonexistent/dify-api-key"}, "DIFY_API_KEY_FILE cannot be read (/nonexistent/"),
        ({"DIFY_API_KEY_FILE": "{file}", "DIFY_API_KEY": "app-xyz"}, "DIFY_API_KEY_FILE and DIFY_API_KEY are both set"),
    ],
)
def test_a_bad_secret_file_is_one_clear_line(tmp_path, extra, expected):
    secret = tmp_path / "key"
    secret.write_text("app-file")
    env = {k: v for k, v in VALID.items() if k != "DIFY_API_KEY"}
    env.update({k: v.replace("{file}", str(secret)) for k, v in extra.items()})
    with pytest.raises(SettingsError) as error:
        load(env)
    assert expected in str(error.value)
    assert "app-file" not in str(error.value)


def test_only_secrets_can_come_from_files(tmp_path):
    path = tmp_path / "lang"
    path.write_text("en")
    assert load({**VALID, "BOT_LANGUAGE_FILE": str(path)}).bot.language == "zh"


def test_every_secret_field_is_handed_to_the_log_redactor():
    """Each setting kept out of repr() is a secret: set each to a value of its own, and secrets() has them all."""
    fixed = ("wecom_encoding_aes_key", "wecom_webhooks")  # their forms are fixed: a key, a JSON object
    values = {
        name: f"secret-of-{name}"
        for name, setting in VARIABLES.items()
        if setting.secret and not name.endswith("_url") and name not in fixed
    }
    values["wecom_webhooks"] = '{"ops": "https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key=secret-key"}'
    app = {"wecom_app_corp_id": "ww-corp", "wecom_app_agent_id": 1000002}  # the app's secret goes with them
    settings = Settings.of(**{k.lower(): v for k, v in VALID.items()}).replace(**values, **app)
    assert set(values.values()) | {VALID["WECOM_ENCODING_AES_KEY"], "secret-key"} <= set(settings.secrets())


def test_every_secret_is_known_to_the_log_redactor():
    settings = load(
        {
            **VALID,
            "REDIS_URL": "redis+sentinel://:redis-pw@s1:26379,s2:26379/mymaster",
            "REDIS_SENTINEL_PASSWORD": "sentinel-pw",
            "DATABASE_URL": "mysql+pymysql://gw:db-pw@db/gw",
            "DATABASE_READ_URL": "mysql+pymysql://ro:replica-pw@replica/gw",
        }
    )
    expected = {"tok-Secret-1", VALID["WECOM_ENCODING_AES_KEY"], "app-xyz", "redis-pw", "sentinel-pw", "db-pw"}
    assert set(settings.secrets()) == expected | {"replica-pw"}


def test_the_settings_name_every_kind_of_backend_there_is():
    """BACKEND is checked at start-up against the settings' own list (they cannot import the backends): the two lists
    are one."""
    from config.settings import BACKEND_KINDS
    from services.backends import BACKENDS

    assert set(BACKEND_KINDS) == set(BACKENDS)


def test_an_openai_backend_needs_its_address_and_model_and_no_dify(settings):
    with pytest.raises(SettingsError) as caught:
        settings.replace(backend="openai", dify_api_key="", openai_extra="[1]")
    problems = caught.value.problems
    assert any(p.startswith("OPENAI_BASE_URL must be") for p in problems)
    assert any(p.startswith("OPENAI_MODEL is required") for p in problems)
    assert any(p.startswith("OPENAI_EXTRA must be a JSON object") for p in problems)
    assert not any("DIFY_API_KEY" in p for p in problems)
    ok = settings.replace(backend="openai", openai_base_url="http://llm/v1", openai_model="m", dify_api_key="")
    assert ok.bot.backend == "openai"
