"""The README's first command: `python -m demo` runs the bot on embedded defaults and chats in the terminal."""

import os
import subprocess
import sys

import pytest

from config.settings import PROJECT_ROOT
from demo.replicas import free_port

pytestmark = pytest.mark.e2e


def test_quickstart_chat_answers_in_the_terminal():
    env = {**os.environ, "PORT": str(free_port())}
    for name in ("REDIS_URL", "DIFY_BASE_URL", "WECOM_TOKEN", "WECOM_ENCODING_AES_KEY", "DEMO_MODE", "AUTH_MODE"):
        env.pop(name, None)
    result = subprocess.run(
        [sys.executable, "-m", "demo"],
        cwd=PROJECT_ROOT,
        env=env,
        input="hello there\nerror\n\n",
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "你刚才说：「hello there」" in out
    assert out.count("[finished after") == 2
    assert "抱歉，生成回答时出错了" in out
    # once the chat starts, the gateway's log goes to instance/demo.log instead of the terminal
    assert "Dify failed" not in out + result.stderr
