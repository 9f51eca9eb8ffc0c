"""WeCom crypto: official test vectors both ways, padding edge cases, multi-byte UTF-8, and every error code."""

import base64
import struct

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given
from hypothesis import strategies as st

from services.wecom import crypto
from services.wecom.crypto import CryptoError, WeComCrypto, pad32, unpad32

# Vector from Tencent's official C# sample (Sample.cs of the WXBizMsgCrypt download): a signed, encrypted callback
# and its plaintext; the receiveid is the corpid there.
OFFICIAL_TOKEN = "QDG6eK"
OFFICIAL_KEY = "jWmYm7qr5nMoAUwZRjGtBxmz3KA1tkAj3ykkR6q2B2C"
OFFICIAL_RECEIVE_ID = "wx5823bf96d3bd56c7"
OFFICIAL_SIGNATURE = "477715d11cdb4164915debcba66cb864d751f3e6"
OFFICIAL_TIMESTAMP = "1409659813"
OFFICIAL_NONCE = "1372623149"
OFFICIAL_ENCRYPT = (
    "RypEvHKD8QQKFhvQ6QleEB4J58tiPdvo+rtK1I9qca6aM/wvqnLSV5zEPeusUiX5L5X/0lWfrf0QADHHhGd3QczcdCUpj911L3vg3W/sYYvuJ"
    "Ts3TUUkSUXxaccAS0qhxchrRYt66wiSpGLYL42aM6A8dTT+6k4aSknmPj48kzJs8qLjvd4Xgpue06DOdnLxAUHzM6+kDZ+HMZfJYuR+LtwGc2h"
    "gf5gsijff0ekUNXZiqATP7PF5mZxZ3Izoun1s4zG4LUMnvw2r+KqCKIw+3IQH03v+BCA9nMELNqbSf6tiWSrXJB3LAVGUcallcrw8V2t9EL4Eh"
    "zJWrQUax5wLVMNS0+rUPA3k22Ncx4XXZS9o0MBH27Bo6BpNelZpS+/uh9KsNlY6bHCmJU9p8g7m3fVKn28H3KDYA5Pl/T8Z1ptDAVe0lXdQ2Yoy"
    "yH2uyPIGHBZZIs2pDBS8R07+qN+E7Q=="
)
# Vector from Tencent's official Java sample (WXBizMsgCryptTest): a fixed random prefix, multi-byte UTF-8 message.
JAVA_KEY = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"
JAVA_RECEIVE_ID = "wxb11529c136998cb6"
JAVA_RANDOM = b"aaaabbbbccccdddd"
JAVA_MESSAGE = "我是中文abcd123"
JAVA_ENCRYPTED = "jn1L23DB+6ELqJ+6bruv21Y6MD7KeIfP82D6gU39rmkgczbWwt5+3bnyg5K55bgVtVzd832WzZGMhkP72vVOfg=="

KEY = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"


@pytest.fixture
def bot() -> WeComCrypto:
    return WeComCrypto("token-1", KEY, "")


def raw_cbc_decrypt(encoding_key: str, data: bytes) -> bytes:
    """Independent AES-CBC decryption (no padding handling) to inspect what we produced."""
    key = base64.b64decode(encoding_key + "=")
    decryptor = Cipher(algorithms.AES(key), modes.CBC(key[:16])).decryptor()
    return decryptor.update(data) + decryptor.finalize()


def test_official_vector_signature_and_decrypt():
    official = WeComCrypto(OFFICIAL_TOKEN, OFFICIAL_KEY, OFFICIAL_RECEIVE_ID)
    assert official.sign(OFFICIAL_TIMESTAMP, OFFICIAL_NONCE, OFFICIAL_ENCRYPT) == OFFICIAL_SIGNATURE
    plain = official.open_envelope(OFFICIAL_SIGNATURE, OFFICIAL_TIMESTAMP, OFFICIAL_NONCE, OFFICIAL_ENCRYPT)
    assert "<Content><![CDATA[hello]]></Content>" in plain
    assert "<MsgId>4561255354251345929</MsgId>" in plain


def test_official_vector_encrypt_multibyte():
    official = WeComCrypto("pamtest", JAVA_KEY, JAVA_RECEIVE_ID)
    assert official.encrypt(JAVA_MESSAGE, JAVA_RANDOM) == JAVA_ENCRYPTED
    assert official.decrypt(JAVA_ENCRYPTED) == JAVA_MESSAGE


def test_ai_bot_receive_id_is_empty_and_other_ids_are_refused():
    official = WeComCrypto(OFFICIAL_TOKEN, OFFICIAL_KEY, "")
    with pytest.raises(CryptoError) as caught:
        official.decrypt(OFFICIAL_ENCRYPT)
    assert caught.value.code == crypto.VALIDATE_RECEIVE_ID_ERROR


@pytest.mark.parametrize("length", [0, 1, 11, 12, 13, 43, 44, 45, 76, 1000])
def test_round_trip_around_block_boundaries(bot, length):
    message = "x" * length
    encrypted = bot.encrypt(message)
    assert bot.decrypt(encrypted) == message
    # 16 random + 4 length + message: 12 and 44 make a multiple of 32, which must gain a whole block of padding.
    padded = raw_cbc_decrypt(KEY, base64.b64decode(encrypted))
    assert len(padded) % 32 == 0
    if (20 + length) % 32 == 0:
        assert padded[-32:] == bytes([32]) * 32


def test_length_field_counts_bytes_not_characters(bot):
    message = '{"text":{"content":"你好，世界 👋"}}'
    plain = raw_cbc_decrypt(KEY, base64.b64decode(bot.encrypt(message)))
    (length,) = struct.unpack(">I", plain[16:20])
    assert length == len(message.encode()) != len(message)
    assert bot.decrypt(bot.encrypt(message)) == message


@given(st.text(max_size=300))
def test_round_trip_any_text(message):
    bot = WeComCrypto("t", KEY, "")
    assert bot.decrypt(bot.encrypt(message)) == message


def test_seal_reply_is_signed_with_the_request_nonce(bot):
    envelope = bot.seal_reply('{"msgtype":"stream"}', "nonce-123", 1700000000)
    assert envelope["nonce"] == "nonce-123"
    assert envelope["timestamp"] == 1700000000
    bot.check_signature(envelope["msgsignature"], "1700000000", "nonce-123", envelope["encrypt"])
    assert bot.decrypt(envelope["encrypt"]) == '{"msgtype":"stream"}'


def test_verify_url_returns_plain_echo(bot):
    echostr = bot.encrypt("echo-4711")
    assert bot.verify_url(bot.sign("1", "n", echostr), "1", "n", echostr) == "echo-4711"


def test_signature_mismatch(bot):
    encrypted = bot.encrypt("{}")
    with pytest.raises(CryptoError) as caught:
        bot.check_signature("0" * 40, "1", "n", encrypted)
    assert caught.value.code == crypto.VALIDATE_SIGNATURE_ERROR
    with pytest.raises(CryptoError):
        bot.check_signature("", "1", "n", encrypted)


def test_signature_is_case_insensitive_hex(bot):
    encrypted = bot.encrypt("{}")
    bot.check_signature(bot.sign("1", "n", encrypted).upper(), "1", "n", encrypted)


def test_bad_base64(bot):
    with pytest.raises(CryptoError) as caught:
        bot.decrypt("not base64 !!")
    assert caught.value.code == crypto.DECODE_BASE64_ERROR


def test_ciphertext_not_whole_blocks(bot):
    with pytest.raises(CryptoError) as caught:
        bot.decrypt(base64.b64encode(b"x" * 20).decode())
    assert caught.value.code == crypto.DECRYPT_AES_ERROR


def encrypt_raw(plain: bytes) -> str:
    key = base64.b64decode(KEY + "=")
    encryptor = Cipher(algorithms.AES(key), modes.CBC(key[:16])).encryptor()
    return base64.b64encode(encryptor.update(plain) + encryptor.finalize()).decode()


@pytest.mark.parametrize("tail", [b"\x00" * 32, b"\x21" * 32, b"A" * 31 + b"\x05"])
def test_bad_padding(bot, tail):
    with pytest.raises(CryptoError) as caught:
        bot.decrypt(encrypt_raw(b"r" * 32 + tail))
    assert caught.value.code == crypto.ILLEGAL_BUFFER


def test_length_field_larger_than_plaintext(bot):
    plain = b"r" * 16 + struct.pack(">I", 1000) + b"{}"
    with pytest.raises(CryptoError) as caught:
        bot.decrypt(encrypt_raw(pad32(plain)))
    assert caught.value.code == crypto.ILLEGAL_BUFFER


def test_plaintext_too_short(bot):
    with pytest.raises(CryptoError) as caught:
        bot.decrypt(encrypt_raw(pad32(b"short")))
    assert caught.value.code == crypto.ILLEGAL_BUFFER


def test_message_not_utf8(bot):
    plain = b"r" * 16 + struct.pack(">I", 2) + b"\xff\xfe"
    with pytest.raises(CryptoError) as caught:
        bot.decrypt(encrypt_raw(pad32(plain)))
    assert caught.value.code == crypto.ILLEGAL_BUFFER


@pytest.mark.parametrize("key", ["short", "a" * 44, "!" * 43])
def test_illegal_aes_key(key):
    with pytest.raises(CryptoError) as caught:
        WeComCrypto("t", key)
    assert caught.value.code == crypto.ILLEGAL_AES_KEY


def test_pad32_and_unpad32():
    for size in range(70):
        data = b"z" * size
        padded = pad32(data)
        assert len(padded) % 32 == 0
        assert len(padded) > len(data)
        assert unpad32(padded) == data
    with pytest.raises(CryptoError):
        unpad32(b"")


def test_media_decryption(bot):
    image = bytes(range(256)) * 40
    key = base64.b64decode(KEY + "=")
    encryptor = Cipher(algorithms.AES(key), modes.CBC(key[:16])).encryptor()
    encrypted = encryptor.update(pad32(image)) + encryptor.finalize()
    assert bot.decrypt_media(encrypted) == image
    with pytest.raises(CryptoError):
        bot.decrypt_media(encrypted[:-3])


def test_repr_hides_the_key(bot):
    assert KEY not in repr(bot)
    assert "token-1" not in repr(bot)
