"""A few seconds of each benchmark, so the scripts in bench/ keep working (the real runs are by hand)."""

import shutil

import pytest

from bench import failover, gunicorn_matrix, new_message, poll_load, profile_poll, streams_load, topologies

pytestmark = pytest.mark.e2e
needs_wrk = pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed (apt-get install wrk)")


@needs_wrk
def test_poll_load(tmp_path):
    result = poll_load.main(
        [
            "--seconds",
            "1",
            "--rounds",
            "1",
            "--live",
            "2",
            "--finished",
            "2",
            "--rate",
            "50",
            "--json",
            str(tmp_path / "poll.json"),
        ]
    )
    assert result["polls_per_s"] > 0
    assert result["ceiling_per_s"] > 0
    assert result["errors"] == 0
    assert result["floor_per_s"] > 0
    assert result["ratio_to_floor"] > 0
    assert result["protocol_floor_per_s"] > 0
    assert result["ratio_to_protocol_floor"] > 0
    assert (tmp_path / "poll.json").exists()


@needs_wrk
def test_gunicorn_matrix_runs_a_configuration(monkeypatch):
    monkeypatch.setattr(gunicorn_matrix, "CONFIGS", [("gthread", 1, 2)])
    [row] = gunicorn_matrix.main(["--seconds", "1", "--rounds", "1", "--live", "1", "--finished", "1"])
    assert row["polls_per_s"] > 0


def test_streams_load():
    result = streams_load.main(["--streams", "4", "--rate", "5", "--seconds", "2"])
    assert result["errors"] == 0
    assert result["streams_complete"] == 4
    assert result["delay_p99_ms"] is not None
    assert result["rss_peak_mb"] > 0
    assert result["poll_reply_p99_ms"] is not None
    assert result["sent_deltas_per_s_each_p50"] > 2.5  # the stand-in keeps (roughly) to the asked 5/s


def test_new_message():
    result = new_message.main(["--rate", "10", "--seconds", "1"])
    assert result["errors"] == 0
    assert result["requests"] == 10
    assert result["auth_api_calls"] == 0


def test_profile_poll(capsys):
    profile_poll.main(["--polls", "100", "--rounds", "1"])
    assert "gateway poll:" in capsys.readouterr().out


@needs_wrk
def test_topologies():
    arguments = ["--rounds", "1", "--seconds", "1", "--finished", "4", "--streams", "4", "--stream-seconds", "1"]
    result = topologies.main([*arguments, "--rate", "50", "--message-rate", "10"])
    for name in ("standalone", "sentinel", "cluster"):
        assert result[name]["errors"] == 0, name
        assert result[name]["polls_per_s"] > 0, name
        assert result[name]["commands_per_delta"] > 0, name
    assert result["cluster"]["polls_ratio_to_standalone"] > 0


def test_failover():
    result = failover.main(["--failovers", "1", "--answers", "2", "--deltas", "10", "--answer-seconds", "4"])
    for name in ("sentinel", "cluster"):
        assert result[name]["answers_lost"] == 0, name
        assert result[name]["seconds_to_first_good_poll_max"] is not None, name


@needs_wrk
def test_bots():
    from bench import bots

    arguments = ["--rounds", "1", "--seconds", "1", "--finished", "4", "--bots", "3", "--startup-bots", "5"]
    result = bots.main([*arguments, "--rate", "50"])
    assert result["many_bots_file"]["errors"] == 0
    assert result["many_bots_file"]["polls_per_s"] > 0
    assert result["startup_5_bots"]["ready_s"] > 0


def test_resume():
    from bench import resume

    result = resume.main(["--kills", "1", "--lease", "2", "--poll-interval", "0.5", "--answer-seconds", "6"])
    assert result["exact_answers"] == 1
    assert result["taken_over_after_s"][0] is not None
    assert result["new_text_after_s"]


def test_longconn():
    from bench import longconn

    arguments = ["--replicas", "2", "--kills", "1", "--drains", "1", "--streams", "4", "--deltas", "5"]
    result = longconn.main([*arguments, "--stream-seconds", "1", "--lease", "3"])
    assert result["frames"]["complete"] == 4
    assert result["kill_to_new_holder_s"]["max"] < 10


def test_forms():
    from bench import forms

    result = forms.main(["--forms", "4", "--rate", "10", "--poll-interval", "0.2"])
    assert result["forms_open"] == 4 and result["submissions"] == 4 and result["failures"] == 0
    assert result["click_to_card_update"]["p99_ms"] < 1000


def test_file_links():
    from bench import file_links

    result = file_links.main(["--megabytes", "1", "--downloaders", "2", "--rounds", "1"])
    assert result["downloads"] == 2 and result["throughput_mb_per_s"] > 0


def test_push():
    from bench import push

    result = push.main(["--pushes", "20", "--chats", "4", "--clients", "2", "--deliver-timeout", "20"])
    assert result["delivered_once"] == 20 and result["missing"] == 0 and result["duplicates"] == 0


def test_longconn_waits():
    from bench import longconn_waits

    result = longconn_waits.main(["--messages", "3", "--streams", "2", "--deltas", "4", "--stream-seconds", "1"])
    assert result["healthy"]["answered"] == 3 and result["no_replica"]["answered"] == 3
    assert result["healthy"]["complete"] == 2 and result["no_replica"]["complete"] == 2


@needs_wrk
def test_audit():
    from bench import audit

    arguments = ["--seconds", "1", "--rounds", "1", "--message-rate", "10", "--rate", "20", "--answers", "20"]
    result = audit.main([*arguments, "--export-rows", "200", "--sweep-streams", "300"])
    assert result["sweep"]["rows"] == 300 and result["sweep"]["twice"] == 0
    assert result["cost"]["polls_per_s_on"] > 0 and result["cost"]["polls_per_s_off"] > 0
    assert result["rows_under_load"]["missing"] == 0 and result["rows_under_load"]["twice"] == 0
    assert [e["rows"] for e in result["export"]] == [20, 200]
    assert all(e["peak_rss_mb"] > 0 for e in result["export"])


def test_answer_cap():
    from bench import answer_cap

    result = answer_cap.main(["--questions", "6", "--cap", "2", "--answer-seconds", "0.5"])
    assert result["answered"] == 6 and result["dify_calls"] == 6
    assert result["most_dify_calls_at_once"] <= 2


@needs_wrk
def test_content_rules():
    from bench import content_rules

    arguments = ["--rules", "200", "--patterns", "2", "--answer-chars", "500", "--seconds", "1", "--rounds", "1"]
    result = content_rules.main([*arguments, "--live", "2"])
    assert result["per_delta"]["rules"] == 200 and result["per_delta"]["us_per_delta_with_rules"] > 0
    assert result["polls"]["polls_per_s_on"] > 0 and result["polls"]["polls_per_s_off"] > 0


@needs_wrk
def test_backends():
    from bench import backends

    result = backends.main(
        ["--seconds", "1", "--rounds", "1", "--live", "2", "--messages", "3", "--first-token-ms", "20"]
    )
    for backend in ("dify", "openai"):
        assert result["first_text"][backend]["measured"] == 3 and result["first_text"][backend]["direct_p50_ms"] >= 20
    assert result["polls"]["polls_per_s_openai"] > 0 and result["polls"]["polls_per_s_dify"] > 0
