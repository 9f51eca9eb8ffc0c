"""An OpenAI-compatible server stand-in, over real HTTP: `POST /v1/chat/completions` streamed as OpenAI's API streams
it (chat.completion.chunk events, a finish reason, the usage chunk `stream_options.include_usage` asks for, then
`data: [DONE]`), `GET /v1/models`, and errors in OpenAI's shape. The demo's bot on the OpenAI backend talks to it,
and the tests use it directly and as the origin a LiteLLM proxy forwards to (tests/e2e/test_openai_e2e.py).

Unscripted, it answers as the demo's model: what was asked, and which turn of the conversation it is (it counts
the earlier turns the request carries); a few words show the rest: `think` (reasoning first), `slow` (a long
answer), `error` (an HTTP 500), `cut` (the stream breaks), `limit` (the model's length limit). A test scripts what
the next requests get: steps (below) played in order, for requests whose last message holds `match`.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time

import orjson

from demo.http_server import Conn, Request, StandInServer


def text(piece: str) -> tuple:
    return ("text", piece)


def reasoning(piece: str) -> tuple:
    return ("reasoning", piece)


def sleep(seconds: float) -> tuple:
    return ("sleep", seconds)


def finish(reason: str = "stop") -> tuple:
    return ("finish", reason)


def usage(prompt: int = 12, completion: int = 30) -> tuple:
    return ("usage", {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})


def http_error(status: int, message: str = "", kind: str = "api_error") -> tuple:
    return ("http_error", status, kind, message or f"HTTP {status}")


def stream_error(message: str = "the model failed", kind: str = "server_error") -> tuple:
    return ("stream_error", kind, message)


def cut() -> tuple:
    return ("cut",)


def answer(words: str, pieces: int | None = None, delay: float = 0.0, reason: str = "stop") -> list[tuple]:
    """An answer streamed in `pieces` (default: a word each), `delay` apart, then its finish and usage."""
    parts = _pieces(words, pieces)
    steps: list[tuple] = []
    for part in parts:
        steps.append(text(part))
        if delay:
            steps.append(sleep(delay))
    return [*steps, finish(reason), usage(completion=len(parts))]


def _pieces(words: str, count: int | None) -> list[str]:
    if count is None:
        tokens = words.split(" ")
        return [token + (" " if n < len(tokens) - 1 else "") for n, token in enumerate(tokens)]
    size = max(1, -(-len(words) // max(1, count)))
    return [words[i : i + size] for i in range(0, len(words), size)]


class OpenAIStandIn:
    """Serves the chat completions API under `/v1`; `requests` records every completion request it got."""

    def __init__(self, api_key: str | None = None, model: str = "demo-model", host: str = "127.0.0.1", port: int = 0):
        self.api_key = api_key  # None: any key (or none) is taken
        self.model = model
        self.delay = 0.03  # between the words of an unscripted answer
        self.requests: list[dict] = []
        self.open_streams = 0  # answers streaming now
        self.server = StandInServer(self.handle, host, port)
        self._scripts: list[dict] = []
        self._lock = threading.Lock()

    @property
    def base_url(self) -> str:
        return f"{self.server.url}/v1"

    def start(self) -> OpenAIStandIn:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop()

    def reset(self) -> None:
        with self._lock:
            self._scripts.clear()
            self.requests.clear()
            self.delay = 0.03

    def script(self, steps: list[tuple], match: str = "", times: int | None = 1) -> None:
        """The next `times` requests (None: every one) whose question holds `match` get `steps`."""
        with self._lock:
            self._scripts.append({"steps": steps, "match": match, "times": times})

    def completions(self) -> list[dict]:
        """The bodies of the completion requests so far."""
        with self._lock:
            return [request["body"] for request in self.requests]

    async def handle(self, request: Request, conn: Conn) -> None:
        if request.path == "/v1/models" and request.method == "GET":
            if not self._authorized(request):
                await conn.send(401, _error("Incorrect API key provided", "invalid_request_error", "invalid_api_key"))
                return
            await conn.send(200, {"object": "list", "data": [{"id": self.model, "object": "model"}]})
            return
        if request.path != "/v1/chat/completions" or request.method != "POST":
            await conn.send(404, _error(f"no route {request.path}", "invalid_request_error"))
            return
        try:
            body = request.json() or {}
        except orjson.JSONDecodeError:
            body = {}
        with self._lock:
            self.requests.append({"body": body, "headers": dict(request.headers), "at": time.time()})
        if not self._authorized(request):
            await conn.send(401, _error("Incorrect API key provided", "invalid_request_error", "invalid_api_key"))
            return
        messages = body.get("messages") if isinstance(body.get("messages"), list) else []
        if not messages or body.get("model") != self.model:
            message = f"model {body.get('model')!r} not found" if messages else "messages are required"
            await conn.send(404 if messages else 400, _error(message, "invalid_request_error", "model_not_found"))
            return
        question = _question(messages[-1])
        steps = self._steps_for(question) or _demo_answer(question, messages, self.delay)
        self.open_streams += 1  # (on the server's one event loop)
        try:
            await self._play(conn, steps, bool((body.get("stream_options") or {}).get("include_usage")))
        finally:
            self.open_streams -= 1

    def _authorized(self, request: Request) -> bool:
        return self.api_key is None or request.headers.get("authorization") == f"Bearer {self.api_key}"

    def _steps_for(self, question: str) -> list[tuple] | None:
        with self._lock:
            for scripted in self._scripts:
                if scripted["match"] in question and scripted["times"] != 0:
                    if scripted["times"] is not None:
                        scripted["times"] -= 1
                    return list(scripted["steps"])
        return None

    async def _play(self, conn: Conn, steps: list[tuple], include_usage: bool) -> None:
        if steps and steps[0][0] == "http_error":
            _, status, kind, message = steps[0]
            await conn.send(status, _error(message, kind))
            return
        await conn.start_stream()
        chunk_id = f"chatcmpl-{secrets.token_hex(6)}"
        first = True
        for step in steps:
            kind = step[0]
            if kind == "sleep":
                await asyncio.sleep(step[1])
                continue
            if kind == "cut":
                conn.abort()
                return
            if kind == "stream_error":
                await conn.write_chunk(_frame({"error": {"message": step[2], "type": step[1], "code": step[1]}}))
                await conn.end_stream()
                return
            if kind == "usage":
                if include_usage:
                    await conn.write_chunk(_frame(self._chunk(chunk_id, None, usage=step[1])))
                continue
            delta: dict = {"role": "assistant"} if first else {}
            first = False
            reason = None
            if kind == "text":
                delta["content"] = step[1]
            elif kind == "reasoning":
                delta["reasoning_content"] = step[1]
            elif kind == "finish":
                reason = step[1]
            await conn.write_chunk(_frame(self._chunk(chunk_id, delta, reason)))
        await conn.write_chunk(b"data: [DONE]\n\n")
        await conn.end_stream()

    def _chunk(self, chunk_id: str, delta: dict | None, reason: str | None = None, usage: dict | None = None) -> dict:
        chunk = {
            "id": chunk_id,
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": self.model,
            "choices": [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": reason}],
        }
        if usage is not None:
            chunk["usage"] = usage
        return chunk


def _frame(payload: dict) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def _error(message: str, kind: str, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def _question(message: dict) -> str:
    content = message.get("content") if isinstance(message, dict) else ""
    if isinstance(content, list):
        return " ".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content if isinstance(content, str) else ""


def _demo_answer(question: str, messages: list, delay: float) -> list[tuple]:
    """What the stand-in says unscripted (module docstring)."""
    turn = 1 + sum(1 for message in messages[:-1] if isinstance(message, dict) and message.get("role") == "user")
    images = sum(
        1
        for part in (messages[-1].get("content") if isinstance(messages[-1].get("content"), list) else [])
        if isinstance(part, dict) and part.get("type") == "image_url"
    )
    lowered = question.lower()
    if "error" in lowered:
        return [http_error(500, "the model is down (the stand-in was asked for an error)", "server_error")]
    intro = f"**本地演示回答**（OpenAI 兼容替身）\n\n你刚才说：「{question[:200]}」"
    if turn > 1:
        intro += f"\n\n这是本次对话的第 {turn} 轮。"
    if images:
        intro += f"\n\n我收到了 {images} 张图片。"
    steps: list[tuple] = []
    if "think" in lowered:
        steps += [reasoning("先想一想用户想看什么……"), sleep(0.2)]
    if "cut" in lowered:
        return [*steps, *answer(intro, delay=delay)[:-2], cut()]
    body = intro
    if "slow" in lowered:
        body += "\n\n" + "".join(f"{i}. 第 {i} 段较长的内容。\n" for i in range(1, 21))
    if "limit" in lowered:
        return [*steps, *answer(body, delay=delay, reason="length")]
    return [*steps, *answer(body, delay=delay)]


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Run the OpenAI-compatible stand-in on its own.")
    parser.add_argument("--port", type=int, default=18084)
    parser.add_argument("--api-key", default=None, help="require this key (default: accept any)")
    parser.add_argument("--model", default="demo-model")
    options = parser.parse_args()
    standin = OpenAIStandIn(api_key=options.api_key, model=options.model, port=options.port).start()
    print(f"OpenAI-compatible stand-in on {standin.base_url} (Ctrl-C to stop)")
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        standin.stop()
