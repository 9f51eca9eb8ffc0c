"""The README's first command: `python -m demo` runs the bot on embedded defaults and chats in the terminal."""

import os
import signal
import subprocess
import sys

import httpx
import pytest

from config.settings import DEMO_DEFAULTS, PROJECT_ROOT
from demo.dify_standin import DifyStandIn
from demo.replicas import free_port
from demo.wecom_simulator import WeComSimulator
from tests.conftest import wait_until

# The demo's stand-ins listen on fixed loopback ports: these tests must run one at a time. `make test` distributes
# whole modules over its workers (--dist loadfile), so they do. (xdist_group marks are not honoured with pytest 9.)
pytestmark = pytest.mark.e2e


def test_quickstart_chat_answers_in_the_terminal():
    result = chat_in_demo("hello there\nerror\nreport\n\n", demo_env())
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "你刚才说：「hello there」" in out
    assert out.count("[finished after") == 3
    assert "抱歉，生成回答时出错了" in out
    assert "[1 image in the bubble" in out  # the report's chart, which a terminal cannot draw
    # once the chat starts, the gateway's log goes to instance/demo.log instead of the terminal
    assert "Dify failed" not in out + result.stderr


def chat_in_demo(typed: str, env: dict[str, str], *arguments: str) -> subprocess.CompletedProcess:
    """`python -m demo` run as a newcomer runs it, `typed` its input: its exit status and what it printed."""
    return subprocess.run(
        [sys.executable, "-m", "demo", *arguments],
        cwd=PROJECT_ROOT,
        env=env,
        input=typed,
        capture_output=True,
        text=True,
        timeout=90,
    )


def demo_env(**changes: str) -> dict[str, str]:
    """The environment of a newcomer's shell: only demo.env's settings, a free port for the gateway."""
    env = {**os.environ, "PORT": str(free_port())}
    for name in ("REDIS_URL", "DIFY_BASE_URL", "WECOM_TOKEN", "WECOM_ENCODING_AES_KEY", "DEMO_MODE", "AUTH_MODE"):
        env.pop(name, None)
    return {**env, **changes}


def test_the_demo_never_puts_its_stand_in_on_your_dify_address():
    """`DIFY_BASE_URL=… make demo` with nothing listening there: the demo says so at start-up, starts no stand-in
    on that address, and the assistant's answer is the note that Dify is unreachable, not the stand-in's canned
    text; the other bots say they answer from the stand-in."""
    port = free_port()
    result = chat_in_demo(
        "hello there\n",
        demo_env(DIFY_BASE_URL=f"http://127.0.0.1:{port}/v1", DIFY_API_KEY="app-your-own", DIFY_RETRY_SECONDS="0"),
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    said = f"Bot 'assistant' at http://127.0.0.1:{demo_port(out)}/wecom/callback, answered by your Dify at "
    assert f"{said}http://127.0.0.1:{port}/v1: nothing answers there" in out
    assert "Bot 'helpdesk' at" in out and "answered by the built-in Dify stand-in" in out
    assert "你刚才说" not in out and "AI 服务暂时不可用" in out


def test_the_demo_says_at_start_up_when_your_dify_refuses_the_key():
    dify = DifyStandIn(api_key="app-the-right-one").start()
    try:
        result = chat_in_demo("", demo_env(DIFY_BASE_URL=dify.base_url, DIFY_API_KEY="app-a-wrong-one"))
    finally:
        dify.stop()
    assert result.returncode == 0, result.stderr
    assert f"answered by your Dify at {dify.base_url}: the key was refused (HTTP 401): check DIFY_API_KEY" in (
        result.stdout
    )
    assert "app-a-wrong-one" not in result.stdout + result.stderr


def test_the_demo_has_a_bot_answered_by_an_openai_compatible_server():
    """`model` is answered by the built-in stand-in of an OpenAI-compatible server: said at start-up, and the
    conversation goes on across turns (the history the gateway keeps for it)."""
    result = chat_in_demo("hello model\nand again\n", demo_env(), "--bot", "model")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "Bot 'model' at http://127.0.0.1:" in out and "answered by the built-in OpenAI-compatible stand-in" in out
    first, second = out.split("you> ")[1:3]
    assert "OpenAI 兼容替身" in first and "你刚才说：「hello model」" in first
    assert "这是本次对话的第 2 轮" in second


def demo_port(out: str) -> str:
    return out.split("Open the console in a browser to chat there too: http://127.0.0.1:")[1].split("/")[0]


def test_the_demo_answers_in_the_bots_language_and_shows_that_the_conversation_goes_on():
    result = chat_in_demo("hello there\nand then?\n\n", demo_env(BOT_LANGUAGE="en"))
    assert result.returncode == 0, result.stderr
    first, second = result.stdout.split("you> ")[1:3]
    assert "You said: “hello there”" in first
    assert "turn" not in first
    assert "You said: “and then?”" in second
    assert "This is turn 2 of our conversation; last time you asked: “hello there”." in second


def test_operator_commands_reach_the_running_demos_streams(tmp_path):
    env = demo_env()
    log = (tmp_path / "demo.log").open("wb")
    demo = subprocess.Popen([sys.executable, "-m", "demo.serve"], cwd=PROJECT_ROOT, env=env, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{env['PORT']}"
    try:
        assert wait_until(lambda: _answers(f"{url}/readyz"), timeout=30), (tmp_path / "demo.log").read_text()
        simulator = WeComSimulator(url, DEMO_DEFAULTS["wecom_token"], DEMO_DEFAULTS["wecom_encoding_aes_key"])
        simulator.poll_interval = 0.1
        conversation = simulator.ask("what do operators see?")
        simulator.close()
        listed = subprocess.run(
            [sys.executable, "-m", "flask", "--app", "demo.app", "streams", "list"],
            cwd=PROJECT_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert listed.returncode == 0, listed.stderr
        assert conversation.stream_id in listed.stdout
        assert "XGROUP" not in listed.stderr  # the long-connection bot's queue works on the embedded store

        ran = subprocess.run(  # the demo's schedule, now: its report reaches the group robot, the console shows it
            [sys.executable, "-m", "flask", "--app", "demo.app", "schedules", "run", "daily-report"],
            cwd=PROJECT_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=90,
        )
        assert ran.returncode == 0, ran.stdout + ran.stderr
        assert "webhook:team: sent" in ran.stdout and ran.stdout.strip().endswith(": pushed")
        said = httpx.get(f"{url}/console/api/robots", timeout=5).json()["messages"]
        assert [m["robot"] for m in said] == ["assistant · team"]
        assert "今天的工作日报" in said[0]["body"]["markdown"]["content"]

        second = subprocess.run(  # a second demo next to this one says what to do instead
            [sys.executable, "-m", "demo", "--bot", "helpdesk"],
            cwd=PROJECT_ROOT,
            env=env,
            input="",
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode == 2
        assert f"Port {env['PORT']} is in use" in second.stderr
        assert "python -m demo.wecom_simulator --bot helpdesk" in second.stderr
        assert "gateway ready" not in second.stdout + second.stderr
    finally:
        demo.terminate()
        demo.wait(10)
        log.close()
    assert "XGROUP" not in (tmp_path / "demo.log").read_text()  # no warning flood in the demo's log


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_an_empty_line_asks_nothing_and_ctrl_c_stops_the_answer_not_the_demo():
    """A newcomer's Enter on an empty prompt keeps the chat going; Ctrl-C while a long answer streams sends /stop
    (the answer ends with the note that it was stopped) and the demo goes on to the next question."""
    demo = subprocess.Popen(
        [sys.executable, "-m", "demo"],
        cwd=PROJECT_ROOT,
        env=demo_env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        bufsize=1,
    )
    seen: list[str] = []

    def read_until(text: str) -> bool:
        while not any(text in line for line in seen):
            line = demo.stdout.readline()
            if not line:
                return False
            seen.append(line)
        return True

    try:
        demo.stdin.write("\n\nslow\n")
        demo.stdin.flush()
        # The bubble's placeholder: the long answer (30 paragraphs, seconds of them) has just begun. Ctrl-C now, not
        # at its first paragraph: a busy machine let this reader see that one only once the answer had ended.
        assert read_until("bot> "), "".join(seen)
        demo.send_signal(signal.SIGINT)
        assert read_until("[finished after"), "".join(seen)
        demo.stdin.write("hello again\n/quit\n")
        demo.stdin.flush()
        out, err = demo.communicate(timeout=60)
    finally:
        demo.kill()
    whole = "".join(seen) + out
    assert "[/stop: " in whole and "已停止回答" in whole, whole
    assert "你刚才说：「hello again」" in whole
    assert demo.returncode == 0, err


def test_the_demos_assistant_routes_hr_and_model_questions_to_their_own_apps():
    """The assistant's `/hr` route is a second Dify app (the stand-in speaks as it), `/model` the OpenAI-compatible
    stand-in; `/routes` lists them, and a question without a command stays with the assistant's own app."""
    result = chat_in_demo("/routes\n/hr how many days off?\n/model hello model\nplain question\n", demo_env())
    assert result.returncode == 0, result.stderr
    assert "Its routes: /hr (dify), /model (openai); /routes in the chat lists them." in result.stdout
    listed, hr, model, plain = result.stdout.split("you> ")[1:5]
    assert "/hr <问题>：由「hr」回答" in listed and "/model <问题>：由「model」回答" in listed
    assert "（Dify 替身 · assistant hr）" in hr and "你刚才说：「how many days off?」" in hr
    assert "OpenAI 兼容替身" in model and "你刚才说：「hello model」" in model
    assert "（Dify 替身 · assistant）" in plain
