"""Active replies through a message's `response_url` (valid for an hour, usable once): plain JSON, no encryption."""

from __future__ import annotations

import logging

import httpx
import orjson

from utils.http import outgoing_client

logger = logging.getLogger(__name__)


class ResponseUrlClient:
    def __init__(self, timeout: float = 10.0):
        self._http = outgoing_client(httpx.Timeout(timeout), follow_redirects=False)

    def close(self) -> None:
        self._http.close()

    def send_markdown(self, url: str, content: str) -> bool:
        """Post one markdown message; True if WeCom accepted it. A connection that fails before the request is
        sent is retried once (the URL is single-use, so a request WeCom may have seen is not repeated)."""
        body = orjson.dumps({"msgtype": "markdown", "markdown": {"content": content}})
        for attempt in (1, 2):
            try:
                response = self._http.post(url, content=body, headers={"Content-Type": "application/json"})
            except httpx.ConnectError as exc:
                logger.warning("response_url unreachable (attempt %d): %s", attempt, type(exc).__name__)
                continue
            except httpx.HTTPError as exc:
                logger.warning("response_url call failed: %s", type(exc).__name__)
                return False
            return _accepted(response)
        return False


def _accepted(response: httpx.Response) -> bool:
    if response.status_code != 200:
        logger.warning("response_url answered HTTP %d", response.status_code)
        return False
    try:
        data = orjson.loads(response.content) if response.content else {}
    except orjson.JSONDecodeError:
        data = {}
    errcode = data.get("errcode", 0) if isinstance(data, dict) else 0
    if errcode:
        logger.warning("response_url refused the message: errcode %s", errcode)
        return False
    return True
