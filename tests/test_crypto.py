"""WeCom callback crypto: round trips, hand-computed vectors, and every failure's official code."""

from __future__ import annotations

import base64
import hashlib
import json
import string
import time
from typing import Any

import pytest
from Crypto.Cipher import AES
from hypothesis import given
from hypothesis import strategies as st

from laibao.crypto import WeComCrypto, generate_aes_key, generate_token
from laibao.errors import CryptoError

TOKEN = "QDG6eK"
KEY = "kWxPEV2UEDyxWpmPdKC3F4dgPDmOvfKX1HGnEUDS1aR"
RAW_KEY = base64.b64decode(KEY + "=")
RANDOM16 = bytes(range(16))
CORP = "wwcorp0123456789"

# A module-level instance, not a fixture: hypothesis refuses function-scoped fixtures.
CRYPTO = WeComCrypto(TOKEN, KEY)


# --- helpers that build WeCom's format by hand, independently of laibao.crypto ---


def hand_sign(*parts: str) -> str:
    return hashlib.sha1("".join(sorted(parts)).encode("utf-8")).hexdigest()


def hand_cbc_encrypt(padded: bytes) -> bytes:
    return AES.new(RAW_KEY, AES.MODE_CBC, RAW_KEY[:16]).encrypt(padded)


def hand_cbc_decrypt(ciphertext: bytes) -> bytes:
    return AES.new(RAW_KEY, AES.MODE_CBC, RAW_KEY[:16]).decrypt(ciphertext)


def hand_pad32(data: bytes) -> bytes:
    n = 32 - len(data) % 32
    return data + bytes([n] * n)


def hand_frame(msg: bytes, receive_id: bytes = b"", declared: int | None = None) -> bytes:
    length = len(msg) if declared is None else declared
    return RANDOM16 + length.to_bytes(4, "big") + msg + receive_id


def hand_encrypt(frame: bytes) -> str:
    return base64.b64encode(hand_cbc_encrypt(hand_pad32(frame))).decode("ascii")


def expect_code(code: int) -> Any:
    return pytest.raises(CryptoError, match=f"^{code} ")


def signed_body(encrypt: str, timestamp: str = "1700000000", nonce: str = "abc123") -> tuple[str, bytes]:
    """Return (signature, body) for a callback carrying ``encrypt``, signed by hand."""
    return hand_sign(TOKEN, timestamp, nonce, encrypt), json.dumps({"encrypt": encrypt}).encode()


# --- round trips ---


@pytest.mark.parametrize(
    "message",
    [
        b"",
        "你好，机器人！这是一条中文消息。".encode(),
        b'{"msgtype":"text","text":{"content":"hello"}}',
        bytes(range(256)) * 5,
    ],
    ids=["empty", "chinese", "json", "binary"],
)
@pytest.mark.parametrize("receive_id", ["", CORP])
def test_round_trip(message: bytes, receive_id: str) -> None:
    crypto = WeComCrypto(TOKEN, KEY, receive_id)
    encrypted = crypto.encrypt(message)
    assert base64.b64decode(encrypted, validate=True)
    assert crypto.decrypt(encrypted) == message


def test_round_trip_every_size_up_to_three_pad_blocks() -> None:
    padding_lengths = set()
    for size in range(0, 100):
        message = bytes([size % 251]) * size
        encrypted = CRYPTO.encrypt(message)
        raw = base64.b64decode(encrypted)
        assert len(raw) % 32 == 0
        padding_lengths.add(hand_cbc_decrypt(raw)[-1])
        assert CRYPTO.decrypt(encrypted) == message
    # Every padding length 1..32 occurred, including a whole extra block of 32.
    assert padding_lengths == set(range(1, 33))


def test_frame_of_exact_multiple_of_32_gets_a_full_pad_block() -> None:
    message = b"x" * 44  # 16 + 4 + 44 = 64 bytes of frame
    raw = base64.b64decode(CRYPTO.encrypt(message, random16=RANDOM16))
    assert len(raw) == 96
    assert hand_cbc_decrypt(raw)[-32:] == bytes([32]) * 32


def test_random_prefix_differs_between_calls() -> None:
    assert CRYPTO.encrypt(b"same") != CRYPTO.encrypt(b"same")


@given(message=st.binary(max_size=300), receive_id=st.text(max_size=20))
def test_round_trip_property(message: bytes, receive_id: str) -> None:
    crypto = WeComCrypto(TOKEN, KEY, receive_id)
    assert crypto.decrypt(crypto.encrypt(message)) == message


# --- known vectors, computed by hand ---


def test_encrypt_matches_hand_built_vector() -> None:
    message = '{"msgtype":"text","text":{"content":"你好"}}'.encode()
    expected = hand_encrypt(hand_frame(message))
    assert CRYPTO.encrypt(message, random16=RANDOM16) == expected
    # Fixed once from the same hand computation, so a drift in both would still be caught.
    assert expected == (
        "N7vKw2Od6MGfIdpGfed2lFCGblqTAhDJNAxJNZlGxqz3FudqeSY/l6+Lhwzn9eo00yV7Tk/7MLOZlqK14F3XE75ER0b+"
        "LO4b1Eu2JYOmXjV5+GIyedPjbtYh3nuUYLc/"
    )


def test_encrypt_with_receive_id_matches_hand_built_vector() -> None:
    crypto = WeComCrypto(TOKEN, KEY, CORP)
    message = "企业微信".encode()
    expected = hand_encrypt(hand_frame(message, CORP.encode()))
    assert crypto.encrypt(message, random16=RANDOM16) == expected


def test_decrypt_hand_built_ciphertext() -> None:
    message = "智能机器人 callback".encode()
    assert CRYPTO.decrypt(hand_encrypt(hand_frame(message))) == message


def test_sign_is_sha1_of_sorted_parts() -> None:
    signature = CRYPTO.sign("1409659813", "1372623149", "msg_encrypt_text")
    assert signature == hand_sign(TOKEN, "1409659813", "1372623149", "msg_encrypt_text")
    assert signature == "0c4814ffff0a84b384197ea21167125dd3a86eac"


def test_sign_depends_on_every_part() -> None:
    base = CRYPTO.sign("1", "2", "3")
    assert base != CRYPTO.sign("1", "2", "4")
    assert base != CRYPTO.sign("1", "9", "3")
    assert base != CRYPTO.sign("9", "2", "3")
    assert base != WeComCrypto("other", KEY).sign("1", "2", "3")


def test_encrypt_rejects_wrong_random_prefix_length() -> None:
    with expect_code(CryptoError.ENCRYPT):
        CRYPTO.encrypt(b"x", random16=b"short")


# --- signatures ---


def test_verify_accepts_the_right_signature() -> None:
    CRYPTO.verify(hand_sign(TOKEN, "t", "n", "e"), "t", "n", "e")


@pytest.mark.parametrize(
    "signature",
    [
        "0" * 40,
        "",
        "0c4814ffff0a84b384197ea21167125dd3a86ea",  # one char short
        "0C4814FFFF0A84B384197EA21167125DD3A86EAC",  # WeCom signs in lower case
        "0c4814ffff0a84b384197ea21167125dd3a86eacX",
        "签名" * 20,
        "\x00" * 40,
    ],
)
def test_verify_rejects_wrong_signatures(signature: str) -> None:
    assert CRYPTO.sign("1409659813", "1372623149", "msg_encrypt_text") != signature
    with expect_code(CryptoError.SIGNATURE_INVALID):
        CRYPTO.verify(signature, "1409659813", "1372623149", "msg_encrypt_text")


@given(signature=st.text(max_size=60))
def test_verify_raises_only_crypto_error(signature: str) -> None:
    with expect_code(CryptoError.SIGNATURE_INVALID):
        CRYPTO.verify(signature, "1", "2", "3")


# --- decrypt failures, each with its official code ---


def test_tampered_ciphertext_fails_the_signature() -> None:
    params, body = CRYPTO.seal_callback({"msgtype": "text"})
    encrypt = json.loads(body)["encrypt"]
    raw = bytearray(base64.b64decode(encrypt))
    raw[5] ^= 1
    tampered = json.dumps({"encrypt": base64.b64encode(bytes(raw)).decode()}).encode()
    with expect_code(CryptoError.SIGNATURE_INVALID):
        CRYPTO.open_callback(params["msg_signature"], params["timestamp"], params["nonce"], tampered)


def test_tampered_ciphertext_breaks_the_padding() -> None:
    raw = bytearray(base64.b64decode(CRYPTO.encrypt(b"hello", random16=RANDOM16)))
    # In CBC, flipping a bit of the second-to-last block flips the same bit of the last plaintext
    # byte, which is the pad byte; XOR with itself turns it into 0.
    pad = hand_cbc_decrypt(bytes(raw))[-1]
    raw[-17] ^= pad
    with expect_code(CryptoError.DECRYPT):
        CRYPTO.decrypt(base64.b64encode(bytes(raw)).decode())


@pytest.mark.parametrize(("sender", "receiver"), [(CORP, "wwother"), ("", CORP), (CORP, "")])
def test_wrong_receive_id(sender: str, receiver: str) -> None:
    encrypted = WeComCrypto(TOKEN, KEY, sender).encrypt(b"message")
    with expect_code(CryptoError.RECEIVEID_MISMATCH):
        WeComCrypto(TOKEN, KEY, receiver).decrypt(encrypted)


def test_wrong_key_does_not_decrypt() -> None:
    encrypted = WeComCrypto(TOKEN, generate_aes_key()).encrypt(b"secret message" * 4)
    with pytest.raises(CryptoError) as info:
        CRYPTO.decrypt(encrypted)
    assert info.value.code in {
        CryptoError.DECRYPT,
        CryptoError.ILLEGAL_BUFFER,
        CryptoError.RECEIVEID_MISMATCH,
    }


@pytest.mark.parametrize(
    "padded",
    [
        hand_frame(b"hello") + bytes(7),  # pad byte 0
        hand_frame(b"hello") + bytes(6) + bytes([33]),  # pad byte above the block size of 32
        hand_frame(b"hello") + bytes(2) + bytes([5, 5, 5, 4, 5]),  # inconsistent
        hand_frame(b"hello") + bytes([3] * 2) + bytes([9] * 5),  # pad says 9, only 5 agree
        bytes([255]) * 32,  # pad byte 255
    ],
    ids=["zero", "thirty-three", "inconsistent", "short-run", "255"],
)
def test_bad_padding(padded: bytes) -> None:
    assert len(padded) % 32 == 0
    with expect_code(CryptoError.DECRYPT):
        CRYPTO.decrypt(base64.b64encode(hand_cbc_encrypt(padded)).decode())


def test_padding_of_16_on_a_16_byte_boundary_is_accepted() -> None:
    # Block-16 PKCS#7 is still valid PKCS#7 to the decryptor; only the encryptor must use 32.
    frame = hand_frame(b"hello" + b"." * 7)  # 32 bytes
    padded = frame + bytes([16]) * 16
    assert CRYPTO.decrypt(base64.b64encode(hand_cbc_encrypt(padded)).decode()) == b"hello......."


@pytest.mark.parametrize(
    "encrypt",
    ["not base64!", "abc", "YWJj=", "YWJj==", "YWJjZA=", "YWJjZA===", "加密文本", "YW Jj", "YWJj\n"],
)
def test_bad_base64(encrypt: str) -> None:
    with expect_code(CryptoError.BASE64_DECODE):
        CRYPTO.decrypt(encrypt)


@pytest.mark.parametrize("size", [0, 1, 15, 17, 20, 47])
def test_length_not_a_multiple_of_16(size: int) -> None:
    with expect_code(CryptoError.DECRYPT):
        CRYPTO.decrypt(base64.b64encode(b"\x01" * size).decode())


def test_frame_declaring_a_longer_message_than_it_holds() -> None:
    encrypt = hand_encrypt(hand_frame(b"hello", declared=6))
    with expect_code(CryptoError.ILLEGAL_BUFFER):
        CRYPTO.decrypt(encrypt)
    with expect_code(CryptoError.ILLEGAL_BUFFER):
        CRYPTO.decrypt(hand_encrypt(hand_frame(b"hello", declared=0xFFFFFFFF)))


def test_frame_shorter_than_its_header() -> None:
    with expect_code(CryptoError.ILLEGAL_BUFFER):
        CRYPTO.decrypt(hand_encrypt(RANDOM16 + b"\x00\x00"))


# --- keys and tokens ---


@pytest.mark.parametrize(
    "key",
    [
        KEY[:-1],  # 42 characters
        KEY + "A",  # 44 characters
        KEY[:-1] + "=",  # padding inside the 43
        "!" * 43,
        KEY[:-1] + "-",  # URL-safe alphabet
        KEY[:-1] + "键",
        "",
        base64.b64encode(bytes(32)).decode(),  # 44 chars with its "=": must be given without it
    ],
)
def test_illegal_aes_key(key: str) -> None:
    with expect_code(CryptoError.ILLEGAL_AES_KEY):
        WeComCrypto(TOKEN, key)


def test_empty_token() -> None:
    with expect_code(CryptoError.ILLEGAL_AES_KEY):
        WeComCrypto("", KEY)


def test_error_messages_and_repr_hold_no_secrets() -> None:
    crypto = WeComCrypto("sekrit-token", KEY)
    texts = [repr(crypto)]
    for call in (
        lambda: crypto.decrypt(hand_encrypt(hand_frame(b"plain-secret", declared=99))),
        lambda: crypto.verify("x", "1", "2", "3"),
        lambda: WeComCrypto("sekrit-token", KEY[:-1] + "!"),
    ):
        with pytest.raises(CryptoError) as info:
            call()
        texts.append(str(info.value))
    for text in texts:
        assert "sekrit-token" not in text
        assert KEY[:10] not in text
        assert "plain-secret" not in text


def test_generate_token() -> None:
    tokens = {generate_token() for _ in range(20)}
    assert len(tokens) == 20
    for token in tokens:
        assert len(token) == 32
        assert set(token) <= set(string.ascii_letters + string.digits)
    assert len(generate_token(8)) == 8
    with pytest.raises(ValueError):
        generate_token(0)


def test_generate_aes_key() -> None:
    keys = {generate_aes_key() for _ in range(20)}
    assert len(keys) == 20
    for key in keys:
        assert len(key) == 43
        assert len(base64.b64decode(key + "=", validate=True)) == 32
        crypto = WeComCrypto(generate_token(), key)
        assert crypto.decrypt(crypto.encrypt("测试".encode())) == "测试".encode()


# --- URL verification ---


def test_verify_url_round_trip() -> None:
    params = CRYPTO.seal_echostr("1616140317555161061", timestamp="1700000000", nonce="n0nce")
    assert params["msg_signature"] == hand_sign(TOKEN, "1700000000", "n0nce", params["echostr"])
    echo = CRYPTO.verify_url(params["msg_signature"], params["timestamp"], params["nonce"], params["echostr"])
    assert echo == "1616140317555161061"


def test_verify_url_hand_built() -> None:
    echostr = hand_encrypt(hand_frame("回显".encode()))
    assert CRYPTO.verify_url(hand_sign(TOKEN, "1", "2", echostr), "1", "2", echostr) == "回显"


def test_verify_url_wrong_signature() -> None:
    params = CRYPTO.seal_echostr("hello")
    with expect_code(CryptoError.SIGNATURE_INVALID):
        CRYPTO.verify_url(
            hand_sign(TOKEN, "0", "0", "0"), params["timestamp"], params["nonce"], params["echostr"]
        )


def test_verify_url_plaintext_not_utf8() -> None:
    echostr = hand_encrypt(hand_frame(b"\xff\xfe"))
    with expect_code(CryptoError.DECRYPT):
        CRYPTO.verify_url(hand_sign(TOKEN, "1", "2", echostr), "1", "2", echostr)


def test_seal_echostr_defaults() -> None:
    before = int(time.time())
    params = CRYPTO.seal_echostr("x")
    assert set(params) == {"msg_signature", "timestamp", "nonce", "echostr"}
    assert before <= int(params["timestamp"]) <= int(time.time())
    assert len(params["nonce"]) == 10
    assert params["nonce"].isascii()
    assert params["nonce"].isalnum()


# --- callbacks ---

CALLBACK = {
    "msgid": "CAIQ16HMjQYY",
    "aibotid": "AIBOTID",
    "chattype": "single",
    "from": {"userid": "zhangsan"},
    "msgtype": "text",
    "text": {"content": "你好 robot"},
}


def test_callback_round_trip() -> None:
    params, body = CRYPTO.seal_callback(CALLBACK, timestamp="1700000000", nonce="abc")
    assert set(params) == {"msg_signature", "timestamp", "nonce"}
    assert body.startswith(b'{"encrypt":"')
    assert CRYPTO.open_callback(params["msg_signature"], "1700000000", "abc", body) == CALLBACK


def test_open_callback_hand_built() -> None:
    encrypt = hand_encrypt(hand_frame(json.dumps(CALLBACK).encode(), CORP.encode()))
    signature, body = signed_body(encrypt)
    crypto = WeComCrypto(TOKEN, KEY, CORP)
    assert crypto.open_callback(signature, "1700000000", "abc123", body) == CALLBACK


def test_open_callback_wrong_signature() -> None:
    params, body = CRYPTO.seal_callback(CALLBACK)
    with expect_code(CryptoError.SIGNATURE_INVALID):
        CRYPTO.open_callback(params["msg_signature"], params["timestamp"], "other-nonce", body)


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"",
        b"\xff\xfe{}",
        b'["encrypt"]',
        b'"encrypt"',
        b"{}",
        b'{"encrypt": 5}',
        b'{"encrypt": null}',
        b'{"Encrypt": "abc"}',
        b"[" * 100_000,
    ],
    ids=["text", "empty", "not-utf8", "array", "string", "no-encrypt", "number", "null", "case", "deep"],
)
def test_open_callback_bad_body(body: bytes) -> None:
    with expect_code(CryptoError.PARSE_JSON):
        CRYPTO.open_callback("sig", "1", "2", body)


@pytest.mark.parametrize("plaintext", [b"not json", b"[1, 2]", b'"text"', b"\xff{}", b""])
def test_open_callback_plaintext_not_a_json_object(plaintext: bytes) -> None:
    signature, body = signed_body(hand_encrypt(hand_frame(plaintext)))
    with expect_code(CryptoError.PARSE_JSON):
        CRYPTO.open_callback(signature, "1700000000", "abc123", body)


@given(body=st.binary(max_size=200), signature=st.text(max_size=50))
def test_open_callback_on_arbitrary_bytes_raises_only_crypto_error(body: bytes, signature: str) -> None:
    with pytest.raises(CryptoError):
        CRYPTO.open_callback(signature, "1", "2", body)


@given(encrypt=st.text(max_size=200))
def test_decrypt_on_arbitrary_text_raises_only_crypto_error(encrypt: str) -> None:
    # Random text is never a valid frame (padding, length and receiveid would all have to fit).
    with pytest.raises(CryptoError) as caught:
        CRYPTO.decrypt(encrypt)
    assert caught.value.code in range(CryptoError.GENERATE_REPLY, CryptoError.SIGNATURE_INVALID + 1)


@given(raw=st.integers(1, 8).flatmap(lambda n: st.binary(min_size=16 * n, max_size=16 * n)))
def test_open_callback_on_signed_random_ciphertext_raises_only_crypto_error(raw: bytes) -> None:
    # Signed by hand, so the random ciphertext gets past the signature into AES and the framing.
    signature, body = signed_body(base64.b64encode(raw).decode())
    with pytest.raises(CryptoError):
        CRYPTO.open_callback(signature, "1700000000", "abc123", body)


@given(content=st.binary(max_size=120))
def test_open_callback_on_arbitrary_frames_returns_an_object_or_raises_crypto_error(content: bytes) -> None:
    # Correctly padded and encrypted, so the frame parser and JSON parser see arbitrary input.
    signature, body = signed_body(hand_encrypt(content))
    try:
        result = CRYPTO.open_callback(signature, "1700000000", "abc123", body)
    except CryptoError:
        return
    assert isinstance(result, dict)


# --- passive replies ---

REPLY = {"msgtype": "stream", "stream": {"id": "STREAMID", "finish": False, "content": "思考中…"}}


def test_seal_reply_signs_with_the_request_nonce() -> None:
    reply = CRYPTO.seal_reply(REPLY, nonce="req-nonce", timestamp="1700000001")
    assert set(reply) == {"encrypt", "msgsignature", "timestamp", "nonce"}
    assert reply["nonce"] == "req-nonce"
    assert reply["timestamp"] == "1700000001"
    assert reply["msgsignature"] == hand_sign(TOKEN, "1700000001", "req-nonce", reply["encrypt"])


def test_seal_reply_payload_is_compact_utf8_json() -> None:
    reply = CRYPTO.seal_reply(REPLY, nonce="n")
    plain = hand_cbc_decrypt(base64.b64decode(reply["encrypt"]))
    length = int.from_bytes(plain[16:20], "big")
    expected = '{"msgtype":"stream","stream":{"id":"STREAMID","finish":false,"content":"思考中…"}}'
    assert plain[20 : 20 + length] == expected.encode("utf-8")


def test_seal_reply_default_timestamp_is_now() -> None:
    before = int(time.time())
    reply = CRYPTO.seal_reply(REPLY, nonce="n")
    assert before <= int(reply["timestamp"]) <= int(time.time())


def test_seal_reply_unserialisable_payload() -> None:
    with expect_code(CryptoError.GENERATE_REPLY):
        CRYPTO.seal_reply({"when": object()}, nonce="n")
    with expect_code(CryptoError.GENERATE_REPLY):
        CRYPTO.seal_reply({"value": float("nan")}, nonce="n")


def test_open_reply_round_trip() -> None:
    reply = CRYPTO.seal_reply(REPLY, nonce="req-nonce")
    assert CRYPTO.open_reply(reply, expected_nonce="req-nonce") == REPLY
    assert CRYPTO.open_reply(json.dumps(reply, ensure_ascii=False).encode()) == REPLY


def test_open_reply_accepts_a_numeric_timestamp() -> None:
    reply: dict[str, Any] = dict(CRYPTO.seal_reply(REPLY, nonce="n", timestamp="1700000002"))
    reply["timestamp"] = 1700000002
    assert CRYPTO.open_reply(json.dumps(reply).encode(), expected_nonce="n") == REPLY


def test_open_reply_wrong_nonce() -> None:
    reply = CRYPTO.seal_reply(REPLY, nonce="req-nonce")
    with expect_code(CryptoError.SIGNATURE_INVALID):
        CRYPTO.open_reply(reply, expected_nonce="another-nonce")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("msgsignature", "0" * 40),
        ("timestamp", "1"),
        ("nonce", "x"),
        ("msgsignature", None),
        ("timestamp", True),
    ],
)
def test_open_reply_tampered(field: str, value: object) -> None:
    reply: dict[str, Any] = dict(CRYPTO.seal_reply(REPLY, nonce="n", timestamp="1700000000"))
    reply[field] = value
    with expect_code(CryptoError.SIGNATURE_INVALID):
        CRYPTO.open_reply(reply)


@pytest.mark.parametrize("reply", [b"not json", b"[]", b'{"msgsignature":"x","timestamp":"1","nonce":"n"}'])
def test_open_reply_not_a_reply(reply: bytes) -> None:
    with expect_code(CryptoError.PARSE_JSON):
        CRYPTO.open_reply(reply)


def test_open_reply_plaintext_not_an_object() -> None:
    encrypt = CRYPTO.encrypt(b"[1]")
    reply = {
        "encrypt": encrypt,
        "msgsignature": hand_sign(TOKEN, "1", "n", encrypt),
        "timestamp": "1",
        "nonce": "n",
    }
    with expect_code(CryptoError.PARSE_JSON):
        CRYPTO.open_reply(reply)


# --- media ---


@pytest.mark.parametrize("size", [0, 1, 31, 32, 33, 1000])
def test_media_round_trip(size: int) -> None:
    data = bytes(i % 256 for i in range(size))
    encrypted = CRYPTO.encrypt_media(data)
    assert len(encrypted) % 32 == 0
    assert len(encrypted) > size
    assert CRYPTO.decrypt_media(encrypted) == data


def test_media_matches_hand_built_vector() -> None:
    data = b"\x89PNG\r\n\x1a\n" + bytes(100)
    encrypted = hand_cbc_encrypt(hand_pad32(data))
    assert CRYPTO.encrypt_media(data) == encrypted
    assert CRYPTO.decrypt_media(encrypted) == data


@pytest.mark.parametrize("data", [b"", b"x" * 15, b"x" * 33])
def test_media_bad_length(data: bytes) -> None:
    with expect_code(CryptoError.DECRYPT):
        CRYPTO.decrypt_media(data)


def test_media_bad_padding() -> None:
    with expect_code(CryptoError.DECRYPT):
        CRYPTO.decrypt_media(hand_cbc_encrypt(bytes(31) + bytes([33])))
