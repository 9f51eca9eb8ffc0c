"""LiteLLM's proxy (litellm[proxy] from PyPI), a real OpenAI-compatible server, run as a process of its own in front
of an origin the caller names (the tests' stand-in of a model server, demo/openai_standin.py): what the end-to-end
tests of the OpenAI backend talk to (tests/e2e/test_openai_e2e.py). It runs from its own virtualenv
(`.venv-litellm`, made by `make setup` from requirements-litellm.txt; LITELLM_BIN names another `litellm`), and
answers with a master key and no database, as a small deployment of it runs.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from config.settings import PROJECT_ROOT
from demo.replicas import free_port

MISSING = "LiteLLM's proxy is not installed: run `make setup` (it makes .venv-litellm), or set LITELLM_BIN"


@dataclass(frozen=True)
class Route:
    """One model the proxy offers (`name`, as a client asks for it), served by `model` at the origin `base_url`
    with the origin's key `api_key`."""

    name: str
    base_url: str
    api_key: str
    model: str


def litellm_binary() -> Path | None:
    """Where the `litellm` command is: LITELLM_BIN, else the project's .venv-litellm; None if neither is there."""
    path = Path(os.environ.get("LITELLM_BIN") or PROJECT_ROOT / ".venv-litellm" / "bin" / "litellm")
    return path if path.exists() else None


class LiteLLMProxy:
    """`litellm --config` on a free loopback port, serving `routes` with `master_key`, asking each origin once
    (no retries of its own: the gateway's are under test)."""

    def __init__(self, routes: list[Route], master_key: str, directory: Path):
        self.routes = routes
        self.master_key = master_key
        self.port = free_port()
        self.config = directory / "litellm.yaml"
        self.log_path = directory / "litellm.log"
        self.process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self, timeout: float = 90.0) -> LiteLLMProxy:
        binary = litellm_binary()
        if binary is None:
            raise RuntimeError(MISSING)
        self.config.write_text(self._config())
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [str(binary), "--config", str(self.config), "--host", "127.0.0.1", "--port", str(self.port)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "LITELLM_LOG": "ERROR", "NO_DOCS": "True"},
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"litellm exited with {self.process.returncode}: {self.logs()[-2000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health/liveliness", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass  # not listening yet
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"litellm did not start within {timeout:.0f} s: {self.logs()[-2000:]}")

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
        self._log.close()
        self.process = None

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def _config(self) -> str:
        models = "".join(
            f"  - model_name: {route.name}\n"
            f"    litellm_params:\n"
            f"      model: openai/{route.model}\n"
            f"      api_base: {route.base_url}\n"
            f"      api_key: {route.api_key}\n"
            for route in self.routes
        )
        return (
            f"model_list:\n{models}"
            "litellm_settings:\n  num_retries: 0\n  request_timeout: 60\n"
            "router_settings:\n  num_retries: 0\n"
            f"general_settings:\n  master_key: {self.master_key}\n"
        )
