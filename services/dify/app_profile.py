"""What the Dify app declares about itself, fetched lazily and cached per process: its type (`/info`'s `mode`,
when DIFY_APP_TYPE=auto), and for a while its `/parameters`: the input variables to fill for each user, and (for
enter_chat) the opening statement."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

from services.dify.client import DifyClient
from services.transport.errors import BackendError

logger = logging.getLogger(__name__)

_FORM_TYPES = ("text-input", "paragraph", "select", "number")
_TEXT_TYPES = ("text-input", "paragraph")
_FILE_TYPES = ("file", "file-list")
_DEFAULT_FILE_LIST_LENGTH = 5


def file_allowed(types: Iterable[str], extensions: Iterable[str], kind: str, extension: str) -> bool:
    """Whether an input that takes Dify file `types` (none: any) and, for `custom`, the `extensions` (`.pdf`) takes a
    file of Dify type `kind` with `extension` (no dot), as Dify decides it."""
    types = frozenset(types)
    if not types:
        return True
    if kind in types and kind != "custom":
        return True
    return "custom" in types and f".{extension.lower()}" in frozenset(extensions)


@dataclass(frozen=True, slots=True)
class FileInput:
    """A Start variable that takes files (`file`: one; `file-list`: up to `count`), as `/parameters` declares it:
    Dify's file types (image, document, audio, video, custom) and, for custom, the extensions (`.pdf`)."""

    name: str
    count: int
    types: frozenset[str]
    extensions: frozenset[str]
    required: bool = False

    @property
    def is_list(self) -> bool:
        return self.count > 1

    def takes(self, kind: str, extension: str) -> bool:
        """Whether a file of Dify type `kind` with `extension` (no dot) may go into this input."""
        return file_allowed(self.types, self.extensions, kind, extension)


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
        self._question_input_told = ""  # the input the question went into, last said in the log
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
            except BackendError as exc:
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
            except BackendError as exc:
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

    def file_inputs(self) -> list[FileInput]:
        """The inputs the app takes files into (a workflow's or chatflow's Start variables of type file or
        file-list), in the form's order."""
        found: list[FileInput] = []
        form = self.parameters().get("user_input_form")
        for item in form if isinstance(form, list) else []:
            for kind in _FILE_TYPES:
                spec = item.get(kind) if isinstance(item, dict) else None
                if not isinstance(spec, dict) or not isinstance(spec.get("variable"), str):
                    continue
                length = spec.get("max_length")
                count = 1 if kind == "file" else length if isinstance(length, int) and length > 0 else 0
                extensions = {f".{str(e).lower().lstrip('.')}" for e in spec.get("allowed_file_extensions") or []}
                found.append(
                    FileInput(
                        spec["variable"],
                        count or _DEFAULT_FILE_LIST_LENGTH,
                        frozenset(str(t) for t in spec.get("allowed_file_types") or []),
                        frozenset(extensions),
                        bool(spec.get("required")),
                    )
                )
        return found

    def question_input(self, configured: str, filled: frozenset[str] = frozenset()) -> str:
        """The workflow input a question goes into: `configured` (DIFY_WORKFLOW_INPUT) when the app declares it or
        declares no inputs at all; else the app's only required text input not `filled` otherwise (the user's
        token, the asker's name), when it has exactly one (said once in the log); else `configured`, which Dify
        then refuses naming what it misses."""
        required, declared = [], set()
        form = self.parameters().get("user_input_form")
        for item in form if isinstance(form, list) else []:
            for kind, spec in item.items() if isinstance(item, dict) else ():
                if isinstance(spec, dict) and isinstance(spec.get("variable"), str):
                    declared.add(spec["variable"])
                    if kind in _TEXT_TYPES and spec.get("required") and spec["variable"] not in filled:
                        required.append(spec["variable"])
        if configured in declared or not declared or len(required) != 1:
            return configured
        if self._question_input_told != required[0]:
            self._question_input_told = required[0]
            logger.info(
                "the workflow has no input %r; the question goes into its only required text input, %r",
                configured,
                required[0],
            )
        return required[0]

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
