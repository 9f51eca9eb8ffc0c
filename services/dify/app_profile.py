"""What the Dify app declares about itself, fetched lazily and cached per process: its type (`/info`'s `mode`,
when DIFY_APP_TYPE=auto), and for a while its `/parameters`: the input variables to fill for each user, and (for
enter_chat) the opening statement."""

from __future__ import annotations

import logging
import threading
import time

from services.dify.client import DifyClient
from services.dify.errors import DifyError

logger = logging.getLogger(__name__)

_FORM_TYPES = ("text-input", "paragraph", "select", "number")


class DifyAppProfile:
    """A cached view of `/parameters`; a failed refresh keeps the last good copy (or empty) and retries later."""

    def __init__(
        self, dify: DifyClient, ttl_seconds: float = 300.0, retry_seconds: float = 30.0, app_type: str = "auto"
    ):
        self.dify = dify
        self.configured_type = app_type
        self._app_type = "" if app_type == "auto" else app_type
        self._next_info = 0.0
        self.ttl_seconds = ttl_seconds
        self.retry_seconds = retry_seconds
        self._parameters: dict = {}
        self._next_refresh = 0.0
        self._lock = threading.Lock()

    def parameters(self, timeout: float = 10.0) -> dict:
        """The cached parameters, refreshed when stale (waiting at most `timeout` seconds for Dify)."""
        now = time.monotonic()
        if now < self._next_refresh:
            return self._parameters
        with self._lock:
            if now < self._next_refresh:
                return self._parameters
            try:
                self._parameters = self.dify.parameters(timeout)
                self._next_refresh = now + self.ttl_seconds
            except DifyError as exc:
                logger.warning("could not read the Dify app's parameters: %s", exc.code)
                self._next_refresh = now + self.retry_seconds
            return self._parameters

    def app_type(self, timeout: float = 10.0) -> str:
        """The app's type: DIFY_APP_TYPE, or with `auto` the `mode` Dify's `/info` names, read once. Until /info
        answers (retried every `retry_seconds`), a chat app is assumed."""
        if self._app_type:
            return self._app_type
        now = time.monotonic()
        with self._lock:
            if self._app_type or now < self._next_info:
                return self._app_type or "chat"
            try:
                mode = self.dify.info(timeout).get("mode")
            except DifyError as exc:
                logger.warning("could not read the Dify app's type from /info (%s); assuming a chat app", exc.code)
                self._next_info = now + self.retry_seconds
                return "chat"
            if not isinstance(mode, str) or not mode:
                logger.warning("Dify's /info names no mode; assuming a chat app")
                mode = "chat"
            logger.info("the Dify app is of type %s", mode)
            self._app_type = mode
            return mode

    def suggests_after_answer(self) -> bool:
        """Whether the app offers follow-up questions after each answer (`suggested_questions_after_answer`)."""
        setting = self.parameters().get("suggested_questions_after_answer")
        return isinstance(setting, dict) and setting.get("enabled") is True

    def declared_inputs(self) -> dict[str, object]:
        """Variable name -> default for each input the app declares in its user input form."""
        declared: dict[str, object] = {}
        form = self.parameters().get("user_input_form")
        for item in form if isinstance(form, list) else []:
            if not isinstance(item, dict):
                continue
            for kind in _FORM_TYPES:
                spec = item.get(kind)
                if isinstance(spec, dict) and isinstance(spec.get("variable"), str):
                    declared[spec["variable"]] = spec.get("default")
        return declared
