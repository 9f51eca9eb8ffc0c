"""What both fuzzers share: the gateway's settings under fuzzing, and what every answer to a fuzzed callback must
be: a clear 4xx with a short JSON error, or a 200 that is empty or a valid encrypted reply (right signature, the
request's nonce, decrypting to a stream or text reply). Never a 5xx, never a secret."""

from __future__ import annotations

import orjson

from config.settings import Settings
from services.wecom.crypto import WeComCrypto

SECRETS = ("test-token-Zq8", "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG", "app-test-key-0001")


def fuzz_settings(redis_url: str, dify_connect_timeout: float) -> Settings:
    """The gateway under fuzzing: Dify unreachable on purpose (opened streams end at once, so the fuzzing stays
    about the callback), no auth, no rate limit, quiet logs."""
    token, aes_key, dify_key = SECRETS
    return Settings.of(
        wecom_token=token,
        wecom_encoding_aes_key=aes_key,
        dify_base_url="http://127.0.0.1:9/v1",
        dify_api_key=dify_key,
        dify_connect_timeout=dify_connect_timeout,
        dify_max_retries=0,
        dify_retry_seconds=0,  # (not asked again while the bubble waits: a stream left running outlives its test)
        redis_url=redis_url,
        auth_mode="none",
        log_level="ERROR",
        rate_limit_per_minute=0,
    )


class Violation(AssertionError):
    pass


def check(status: int, body: bytes, nonce: str | None, crypto: WeComCrypto) -> str:
    """The outcome's category (for the report), or raise Violation."""
    if status >= 500:
        raise Violation(f"HTTP {status}: {body[:300]!r}")
    for secret in SECRETS:
        if secret.encode() in body:
            raise Violation("a secret appeared in a response")
    if 400 <= status < 500:
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise Violation(f"4xx without a JSON body: {body[:200]!r}") from None
        if set(data) != {"error", "message"} or not data["error"] or not data["message"]:
            raise Violation(f"4xx body is not {{error, message}}: {data!r}")
        return f"{status} {data['error']}"
    if status != 200:
        raise Violation(f"unexpected status {status}")
    if not body:
        return "200 empty"
    envelope = orjson.loads(body)
    if nonce is None or envelope.get("nonce") != nonce:
        raise Violation("reply nonce differs from the request's")
    crypto.check_signature(envelope["msgsignature"], str(envelope["timestamp"]), nonce, envelope["encrypt"])
    reply = orjson.loads(crypto.decrypt(envelope["encrypt"]))
    if reply.get("msgtype") not in ("stream", "text"):
        raise Violation(f"reply of an unexpected type: {reply!r}")
    return f"200 {reply['msgtype']}"
