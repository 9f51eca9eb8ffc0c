"""WeCom's signed and encrypted envelope around every callback: the query's checks (parameters, timestamp window),
the body's `encrypt` field, opening it, and sealing a reply. Anything wrong raises CallbackError (a 4xx)."""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from dataclasses import dataclass

import orjson

from services.wecom import errors
from services.wecom.crypto import CryptoError, WeComCrypto

_TIMESTAMP = re.compile(r"[0-9]{1,12}")  # ASCII digits: str.isdigit() also accepts the digit '²'


@dataclass(frozen=True, slots=True)
class Opened:
    """An authentic callback: its decrypted JSON, and what its reply must echo or be keyed by."""

    plaintext: str
    signature: str
    nonce: str


class Envelope:
    def __init__(self, crypto: WeComCrypto, timestamp_tolerance: int):
        self.crypto = crypto
        self.timestamp_tolerance = timestamp_tolerance

    def verify_url(self, query: Mapping[str, str]) -> str:
        """The plaintext echo for WeCom's URL check.

        Raises:
            CallbackError: missing parameters, bad signature or an undecryptable echostr.
        """
        signature, timestamp, nonce = self._params(query)
        echostr = query.get("echostr")
        if not echostr:
            raise errors.missing_parameter("echostr")
        try:
            return self.crypto.verify_url(signature, timestamp, nonce, echostr)
        except CryptoError as exc:
            raise errors.from_crypto_error(exc) from None

    def open(self, query: Mapping[str, str], body: bytes) -> Opened:
        """Check the signature and timestamp of a POST callback and decrypt its body.

        Raises:
            CallbackError: the request is malformed, unsigned, stale or undecryptable.
        """
        signature, timestamp, nonce = self._params(query)
        encrypted = _encrypt_field(body)
        try:
            plaintext = self.crypto.open_envelope(signature, timestamp, nonce, encrypted)
        except CryptoError as exc:
            raise errors.from_crypto_error(exc) from None
        return Opened(plaintext, signature, nonce)

    def seal(self, reply: dict | None, nonce: str) -> dict | None:
        """The encrypted, signed envelope of a reply (None stays None: an empty reply)."""
        if reply is None:
            return None
        return self.crypto.seal_reply(orjson.dumps(reply).decode(), nonce, int(time.time()))

    def _params(self, query: Mapping[str, str]) -> tuple[str, str, str]:
        values = []
        for name in ("msg_signature", "timestamp", "nonce"):
            value = query.get(name)
            if not value:
                raise errors.missing_parameter(name)
            values.append(value)
        signature, timestamp, nonce = values
        if not _TIMESTAMP.fullmatch(timestamp):
            raise errors.invalid_timestamp()
        if abs(time.time() - int(timestamp)) > self.timestamp_tolerance:
            raise errors.timestamp_out_of_window(self.timestamp_tolerance)
        return signature, timestamp, nonce


def _encrypt_field(body: bytes) -> str:
    """The `encrypt` string of a POST body, or CallbackError."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise errors.invalid_body("body is not JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("encrypt"), str) or not data["encrypt"]:
        raise errors.invalid_body("body must be a JSON object with an 'encrypt' string")
    return data["encrypt"]
