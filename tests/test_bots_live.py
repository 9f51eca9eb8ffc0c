"""Bots changed live, in process: an app serving a bots file is given a new file and checks it at once
(`Gateway.watch.check()`, which a serving process's thread calls every 5 seconds): a bot added answers at its path,
a bot removed finishes its answer under way and takes no new message, a changed key is the one used next, and a file
that does not load changes nothing and is said once. The same through gunicorn replicas, with the thread's own
timing, is in tests/e2e/test_bots_live_e2e.py."""

import logging

import pytest

from demo import dify_standin as d
from demo.wecom_simulator import ReplyError, WeComSimulator
from services import metrics
from tests.conftest import AES_KEY, DIFY_KEY, TOKEN

IT_TOKEN, IT_AES_KEY = "it-token-live", "ITliveKey0123456789abcdefghijklmnopqrstuvwx"


def table(name: str, token: str = TOKEN, aes_key: str = AES_KEY, path: str = "") -> str:
    where = f'callback_path = "{path}"\n' if path else ""
    return f'[bots.{name}]\n{where}token = "{token}"\nencoding_aes_key = "{aes_key}"\ndify_api_key = "{DIFY_KEY}"\n'


HR = table("hr")
IT = table("it", IT_TOKEN, IT_AES_KEY, "/wecom/it")


@pytest.fixture
def live(tmp_path, make_app, serve, dify):
    """An app serving `hr` from a bots file, on a real port; `live.path` is the file."""
    path = tmp_path / "bots.toml"
    path.write_text(HR)
    server = serve(make_app(bots_file=str(path), bot_name=""))
    server.path = path
    return server


@pytest.fixture
def sim(live):
    opened = []

    def make(token=TOKEN, aes_key=AES_KEY, path="/wecom/callback/hr") -> WeComSimulator:
        opened.append(WeComSimulator(live.url, token, aes_key, callback_path=path, poll_interval=0.05))
        return opened[-1]

    yield make
    for each in opened:
        each.close()


def reload(live, text: str) -> str:
    live.path.write_text(text)
    return live.gateway.watch.check()


def reloads(result: str) -> float:
    return metrics.BOTS_RELOADS.labels(result)._value.get()


def test_a_bot_added_to_the_file_answers_at_its_path(live, sim, dify):
    it = sim(IT_TOKEN, IT_AES_KEY, "/wecom/it")
    with pytest.raises(ReplyError, match="HTTP 404"):
        it.send(it.text_message("before"))
    applied = reloads("ok")
    assert reload(live, HR + IT) == "ok"
    assert reloads("ok") == applied + 1
    assert live.gateway.watch.check() == "unchanged"
    dify.script(d.answer("it answers now"))
    assert it.verify_url().status_code == 200
    assert it.ask("after").text == "it answers now"
    assert sorted(live.gateway.readiness()[1]) == ["hr", "it"]


def test_a_removed_bot_finishes_its_answer_and_takes_no_new_message(live, sim, dify, monkeypatch):
    words = [f"w{i} " for i in range(20)]
    dify.script([step for word in words for step in (d.message(word), d.sleep(0.05))] + [d.end()])
    hr = sim()
    first = hr.send(hr.text_message("a long answer, please"))
    assert reload(live, IT) == "ok"  # hr is gone from the file while its answer streams

    assert hr.follow(first).text == "".join(words)  # its polls are answered until it finishes
    with pytest.raises(ReplyError, match="HTTP 404.*bot_retired"):
        hr.send(hr.text_message("one more"))
    assert len(dify.chat_requests()) == 1
    assert "hr" not in live.gateway.readiness()[1]

    gateway = live.gateway
    monkeypatch.setattr("services.gateway.time.monotonic", lambda: float("inf"))  # its window and grace are over
    gateway.close_retired()
    assert gateway.retired == []
    with pytest.raises(ReplyError, match="HTTP 404.*not_found"):
        hr.send(hr.text_message("and now"))


def test_a_key_changed_in_its_secret_file_is_the_one_the_next_message_is_checked_with(live, sim, dify):
    """A Kubernetes Secret's key changes under the bots file, which stays as it was: the file names it, and a change of
    a file it names is a change of the bots."""
    (live.path.parent / "hr-token").write_text("from-the-file-1")
    assert reload(live, HR.replace(f'token = "{TOKEN}"', 'token_file = "hr-token"')) == "ok"
    (live.path.parent / "hr-token").write_text("from-the-file-22")  # the Secret rotated
    assert live.gateway.watch.check() == "ok"
    dify.script(d.answer("with the rotated token"))
    assert sim("from-the-file-22").ask("after the rotation").text == "with the rotated token"
    assert live.gateway.watch.check() == "unchanged"


def test_a_changed_key_is_the_one_the_next_message_is_checked_with(live, sim, dify):
    old, new = sim(), sim("hr-token-2")
    dify.script(d.answer("with the old token"))
    assert old.ask("before").text == "with the old token"
    assert reload(live, table("hr", "hr-token-2")) == "ok"
    with pytest.raises(ReplyError, match="invalid_signature"):
        old.send(old.text_message("with the old token"))
    dify.script(d.answer("with the new token"))
    assert new.ask("after").text == "with the new token"
    assert new.verify_url().status_code == 200


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("[bots.hr\n", "BOTS_FILE is not valid TOML"),
        (HR + 'colour = "blue"\n', "BOTS_FILE bots.hr: unknown key 'colour'"),
        (table("hr", path="/wecom/x") + table("it", path="/wecom/x").replace(TOKEN, "t2"), "/wecom/x"),
        ("", "BOTS_FILE names no bot"),
        (HR.replace(f'token = "{TOKEN}"', 'token_file = "gone"'), "BOTS_FILE bots.hr: token_file cannot be read"),
    ],
    ids=["not-toml", "unknown-key", "two-bots-one-path", "no-bot", "a-key-lost"],
)
def test_a_file_that_does_not_load_changes_nothing_and_is_said_once(live, sim, dify, caplog, text, said):
    rejected = reloads("rejected")
    with caplog.at_level(logging.ERROR, logger="services.bots_watch"):
        assert reload(live, text) == "rejected"
        assert live.gateway.watch.check() == "unchanged"  # not read again, nor said again, until it changes
    lines = [r.getMessage() for r in caplog.records if r.name == "services.bots_watch"]
    assert len(lines) == 1 and said in lines[0] and "stay as they were" in lines[0]
    assert reloads("rejected") == rejected + 1
    dify.script(d.answer("still served"))
    assert sim().ask("after a bad file").text == "still served"
    assert not live.gateway.readiness()[0]  # ready
    assert reload(live, HR) == "unchanged"  # put back: nothing to change
