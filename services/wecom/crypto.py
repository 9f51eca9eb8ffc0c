"""WeCom AI-bot callback crypto: SHA-1 signatures, AES-256-CBC with 32-byte PKCS#7 padding, media decryption.

Ciphertext layout: base64(AES-CBC(pad32(random16 || len32be(msg) || msg || receiveid))), with
key = base64(EncodingAESKey + "=") and IV = key[:16]. For an AI bot the receiveid is the empty string.
Errors carry the official codes of WeCom's `ierror.py` (-40001 ... -40011).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import struct

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

OK = 0
VALIDATE_SIGNATURE_ERROR = -40001
PARSE_JSON_ERROR = -40002
COMPUTE_SIGNATURE_ERROR = -40003
ILLEGAL_AES_KEY = -40004
VALIDATE_RECEIVE_ID_ERROR = -40005
ENCRYPT_AES_ERROR = -40006
DECRYPT_AES_ERROR = -40007
ILLEGAL_BUFFER = -40008
ENCODE_BASE64_ERROR = -40009
DECODE_BASE64_ERROR = -40010
GEN_RETURN_JSON_ERROR = -40011

BLOCK_SIZE = 32
_RANDOM_PREFIX = 16
_LENGTH_FIELD = 4


class CryptoError(Exception):
    """A signature, decoding or decryption failure, with WeCom's official error code."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class PaddingError(CryptoError):
    """ILLEGAL_BUFFER because of the PKCS#7 padding itself (rather than the length or framing)."""

    def __init__(self, message: str):
        super().__init__(ILLEGAL_BUFFER, message)


def pad32(data: bytes) -> bytes:
    """PKCS#7 padding to a multiple of 32 bytes; a full block of 32 is added when already aligned."""
    amount = BLOCK_SIZE - len(data) % BLOCK_SIZE
    return data + bytes([amount]) * amount


def unpad32(data: bytes) -> bytes:
    """Strip PKCS#7 padding with pad values 1..32.

    Raises:
        CryptoError: ILLEGAL_BUFFER when the padding is malformed.
    """
    if not data:
        raise PaddingError("empty plaintext")
    amount = data[-1]
    if not 1 <= amount <= BLOCK_SIZE or amount > len(data) or data[-amount:] != bytes([amount]) * amount:
        raise PaddingError("bad padding")
    return data[:-amount]


def decode_aes_key(encoding_aes_key: str) -> bytes:
    """The 32-byte AES key behind a 43-character EncodingAESKey.

    Raises:
        CryptoError: ILLEGAL_AES_KEY when it does not decode to 32 bytes.
    """
    if len(encoding_aes_key) != 43:
        raise CryptoError(ILLEGAL_AES_KEY, "EncodingAESKey must be 43 characters")
    try:
        key = base64.b64decode(encoding_aes_key + "=", validate=True)
    except (binascii.Error, ValueError):
        raise CryptoError(ILLEGAL_AES_KEY, "EncodingAESKey is not base64") from None
    if len(key) != 32:
        raise CryptoError(ILLEGAL_AES_KEY, "EncodingAESKey does not decode to 32 bytes")
    return key


def media_cipher(aeskey: str) -> Cipher:
    """The cipher of one long-connection message's media: its own `aeskey` (base64 of 32 bytes), AES-256-CBC with
    the key's first 16 bytes as IV, as for callback media with the EncodingAESKey (docs/protocol.md).

    Raises:
        CryptoError: ILLEGAL_AES_KEY when it does not decode to 32 bytes.
    """
    try:
        key = base64.b64decode(aeskey + "=" * (-len(aeskey) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise CryptoError(ILLEGAL_AES_KEY, "the media aeskey is not base64") from None
    if len(key) != 32:
        raise CryptoError(ILLEGAL_AES_KEY, "the media aeskey is not 32 bytes")
    return Cipher(algorithms.AES(key), modes.CBC(key[:16]))


def decrypt_media_with(aeskey: str, data: bytes) -> bytes:
    """Decrypt a long-connection message's media with its own aeskey (PKCS#7-32, no framing).

    Raises:
        CryptoError: ILLEGAL_AES_KEY, DECRYPT_AES_ERROR or ILLEGAL_BUFFER.
    """
    if not data or len(data) % 16:
        raise CryptoError(DECRYPT_AES_ERROR, "ciphertext is not a whole number of AES blocks")
    decryptor = media_cipher(aeskey).decryptor()
    return unpad32(decryptor.update(data) + decryptor.finalize())


class WeComCrypto:
    """Signs, encrypts and decrypts WeCom callback payloads for one bot (Token + EncodingAESKey)."""

    def __init__(self, token: str, encoding_aes_key: str, receive_id: str = ""):
        self._token = token
        self._key = decode_aes_key(encoding_aes_key)
        self._cipher = Cipher(algorithms.AES(self._key), modes.CBC(self._key[:16]))
        self._receive_id = receive_id.encode()

    def __repr__(self) -> str:
        return "WeComCrypto(<secret>)"

    # --- signatures ---------------------------------------------------------------------------------------

    def sign(self, timestamp: str, nonce: str, encrypted: str) -> str:
        """sha1 hex of the four strings sorted and joined."""
        parts = sorted((self._token, str(timestamp), str(nonce), encrypted))
        return hashlib.sha1("".join(parts).encode()).hexdigest()

    def check_signature(self, signature: str, timestamp: str, nonce: str, encrypted: str) -> None:
        """Raises CryptoError(VALIDATE_SIGNATURE_ERROR) unless `signature` matches, compared in constant time."""
        expected = self.sign(timestamp, nonce, encrypted)
        if not hmac.compare_digest(expected.encode(), (signature or "").lower().encode()):
            raise CryptoError(VALIDATE_SIGNATURE_ERROR, "signature mismatch")

    # --- payload encryption -------------------------------------------------------------------------------

    def encrypt(self, message: str, random_prefix: bytes | None = None) -> str:
        """Encrypt one message (JSON text) into the base64 `encrypt` value."""
        prefix = random_prefix if random_prefix is not None else os.urandom(_RANDOM_PREFIX)
        if len(prefix) != _RANDOM_PREFIX:
            raise CryptoError(ENCRYPT_AES_ERROR, "random prefix must be 16 bytes")
        body = message.encode()
        plain = prefix + struct.pack(">I", len(body)) + body + self._receive_id
        encryptor = self._cipher.encryptor()
        return base64.b64encode(encryptor.update(pad32(plain)) + encryptor.finalize()).decode()

    def decrypt(self, encrypted: str) -> str:
        """Decrypt a base64 `encrypt` value back to the message text.

        Raises:
            CryptoError: DECODE_BASE64_ERROR, DECRYPT_AES_ERROR, ILLEGAL_BUFFER or VALIDATE_RECEIVE_ID_ERROR.
        """
        plain = unpad32(self._decrypt_blocks(_b64decode(encrypted)))
        if len(plain) < _RANDOM_PREFIX + _LENGTH_FIELD:
            raise CryptoError(ILLEGAL_BUFFER, "plaintext too short")
        (length,) = struct.unpack_from(">I", plain, _RANDOM_PREFIX)
        start = _RANDOM_PREFIX + _LENGTH_FIELD
        if start + length > len(plain):
            raise CryptoError(ILLEGAL_BUFFER, "message length exceeds plaintext")
        if plain[start + length :] != self._receive_id:
            raise CryptoError(VALIDATE_RECEIVE_ID_ERROR, "receiveid mismatch")
        try:
            return plain[start : start + length].decode()
        except UnicodeDecodeError:
            raise CryptoError(ILLEGAL_BUFFER, "message is not UTF-8") from None

    def decrypt_media(self, data: bytes) -> bytes:
        """Decrypt a downloaded image, file or video: AES-CBC with the bot key, PKCS#7-32, no framing.

        Raises:
            CryptoError: DECRYPT_AES_ERROR or ILLEGAL_BUFFER.
        """
        return unpad32(self._decrypt_blocks(data))

    def encrypt_media(self, data: bytes) -> bytes:
        """The inverse of decrypt_media (what WeCom does to uploads; used by the simulator and tests)."""
        encryptor = self._cipher.encryptor()
        return encryptor.update(pad32(data)) + encryptor.finalize()

    def _decrypt_blocks(self, data: bytes) -> bytes:
        if not data or len(data) % 16:
            raise CryptoError(DECRYPT_AES_ERROR, "ciphertext is not a whole number of AES blocks")
        decryptor = self._cipher.decryptor()
        return decryptor.update(data) + decryptor.finalize()

    # --- the callback envelope ----------------------------------------------------------------------------

    def verify_url(self, signature: str, timestamp: str, nonce: str, echostr: str) -> str:
        """The GET URL check: verify the signature over `echostr` and return its plaintext."""
        self.check_signature(signature, timestamp, nonce, echostr)
        return self.decrypt(echostr)

    def open_envelope(self, signature: str, timestamp: str, nonce: str, encrypted: str) -> str:
        """Verify and decrypt the `encrypt` field of a POST callback body."""
        self.check_signature(signature, timestamp, nonce, encrypted)
        return self.decrypt(encrypted)

    def seal_reply(self, message: str, nonce: str, timestamp: int) -> dict:
        """The encrypted reply body: encrypt, msgsignature, timestamp and the request's nonce."""
        encrypted = self.encrypt(message)
        return {
            "encrypt": encrypted,
            "msgsignature": self.sign(str(timestamp), nonce, encrypted),
            "timestamp": timestamp,
            "nonce": nonce,
        }


def _b64decode(value: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise CryptoError(DECODE_BASE64_ERROR, "encrypt is not valid base64") from None
