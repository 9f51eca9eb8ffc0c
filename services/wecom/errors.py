"""Domain errors of the callback path and the one mapping from them to HTTP status + `{"error", "message"}`."""

from __future__ import annotations

from services.wecom import crypto


class CallbackError(Exception):
    """A callback WeCom (or someone else) sent that we refuse: answered with a 4xx and a short JSON body."""

    def __init__(self, error: str, message: str, status: int = 400):
        super().__init__(message)
        self.error = error
        self.message = message
        self.status = status

    def body(self) -> dict:
        return {"error": self.error, "message": self.message}


_CRYPTO_ERRORS = {
    crypto.VALIDATE_SIGNATURE_ERROR: ("invalid_signature", 401, "signature check failed"),
    crypto.PARSE_JSON_ERROR: ("invalid_body", 400, "body is not a JSON object with an 'encrypt' string"),
    crypto.VALIDATE_RECEIVE_ID_ERROR: ("invalid_receiveid", 400, "decrypted receiveid does not match"),
    crypto.DECRYPT_AES_ERROR: ("decrypt_failed", 400, "ciphertext could not be decrypted"),
    crypto.ILLEGAL_BUFFER: ("invalid_buffer", 400, "decrypted message is malformed (length or framing)"),
    crypto.DECODE_BASE64_ERROR: ("invalid_base64", 400, "encrypt is not valid base64"),
}


def from_crypto_error(exc: crypto.CryptoError) -> CallbackError:
    """The CallbackError for a crypto failure; the message names WeCom's official code."""
    if isinstance(exc, crypto.PaddingError):
        return CallbackError("invalid_padding", f"decrypted buffer has bad padding ({exc.code})")
    error, status, text = _CRYPTO_ERRORS.get(exc.code, ("crypto_error", 400, "crypto failure"))
    return CallbackError(error, f"{text} ({exc.code})", status)


def missing_parameter(name: str) -> CallbackError:
    return CallbackError("missing_parameter", f"query parameter '{name}' is required")


def invalid_timestamp() -> CallbackError:
    return CallbackError("invalid_timestamp", "timestamp must be whole seconds since the epoch")


def timestamp_out_of_window(tolerance: int) -> CallbackError:
    return CallbackError("timestamp_out_of_window", f"timestamp is more than {tolerance}s away from now", 403)


def invalid_body(detail: str) -> CallbackError:
    return CallbackError("invalid_body", detail)


def invalid_message(detail: str) -> CallbackError:
    return CallbackError("invalid_message", detail)


def body_too_large(limit: int) -> CallbackError:
    return CallbackError("body_too_large", f"body exceeds {limit} bytes", 413)


def bot_retired() -> CallbackError:
    return CallbackError("bot_retired", "this bot was removed from the deployment: it takes no new message", 404)
