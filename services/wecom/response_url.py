"""Active replies through a message's `response_url` (valid for an hour, usable once): plain JSON, no encryption.

A post that WeCom did not answer, or answered busy (HTTP 429 or 5xx), is tried again, a few times over about 15 s:
WeCom busy or unreachable for a moment must not lose the rest of an answer whose bubble promised it. Being usable
once makes that safe: a try WeCom took whose reply was lost only gets the next one refused, never a second message.
A refusal (an errcode) is final."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import httpx
import orjson

from utils.http import outgoing_client

logger = logging.getLogger(__name__)


POST_RETRY_DELAYS = (1.0, 2.0, 4.0, 8.0)  # between the tries of one post


class ResponseUrlClient:
    def __init__(self, timeout: float = 10.0, retry_delays: tuple[float, ...] = POST_RETRY_DELAYS):
        self._http = outgoing_client(httpx.Timeout(timeout), follow_redirects=False)
        self.retry_delays = retry_delays

    def close(self) -> None:
        self._http.close()

    def send_markdown(self, url: str, content: str, still_ours: Callable[[], bool] | None = None) -> bool:
        """Post one markdown message; True if WeCom accepted it (on any try). With `still_ours`, each try asks it
        first, and none is made once it says no (another process took the post over)."""
        body = orjson.dumps({"msgtype": "markdown", "markdown": {"content": content}})
        for attempt, delay in enumerate((0.0, *self.retry_delays), start=1):
            time.sleep(delay)
            if still_ours is not None and not still_ours():
                logger.warning("another process took this response_url post over; not trying again here")
                return False
            try:
                response = self._http.post(url, content=body, headers={"Content-Type": "application/json"})
            except httpx.HTTPError as exc:
                logger.warning("response_url call failed (try %d): %s", attempt, type(exc).__name__)
                continue
            outcome = _outcome(response)
            if outcome != RETRY:
                return outcome == ACCEPTED
        return False


ACCEPTED, REFUSED, RETRY = "accepted", "refused", "retry"


def _outcome(response: httpx.Response) -> str:
    """ACCEPTED; REFUSED (WeCom said no: trying again changes nothing); RETRY (busy or failing for now)."""
    if response.status_code == 429 or response.status_code >= 500:
        logger.warning("response_url answered HTTP %d; trying again", response.status_code)
        return RETRY
    if response.status_code != 200:
        logger.warning("response_url answered HTTP %d", response.status_code)
        return REFUSED
    try:
        data = orjson.loads(response.content) if response.content else {}
    except orjson.JSONDecodeError:
        data = {}
    errcode = data.get("errcode", 0) if isinstance(data, dict) else 0
    if errcode:
        logger.warning("response_url refused the message: errcode %s", errcode)
        return REFUSED
    return ACCEPTED
