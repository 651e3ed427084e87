"""WeCom AI-bot callback crypto: signatures, the AES-256-CBC frame, URL verification and replies.

Both sides of the exchange live here: the bot side (``verify_url``, ``open_callback``,
``seal_reply``, ``decrypt_media``) and the WeCom side (``seal_callback``, ``seal_echostr``,
``open_reply``, ``encrypt_media``), which the ``laibao chat`` CLI and the tests use to play WeCom.

Every failure is a :class:`~laibao.errors.CryptoError` carrying WeCom's official -400xx code, so
operators can search logs for the same numbers WeCom's documentation uses. Messages never contain
the key, the token or any plaintext.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import string
import struct
import time
from collections.abc import Mapping
from typing import Any

from Crypto.Cipher import AES

from laibao.errors import CryptoError

__all__ = ["WeComCrypto", "generate_aes_key", "generate_token"]

# WeCom pads to 32 bytes, not to the AES block size of 16: a frame padded with a standard
# 16-byte PKCS#7 routine fails to decrypt on WeCom's side.
_PAD_BLOCK = 32
_RANDOM_LEN = 16
_LENGTH_LEN = 4
_HEADER_LEN = _RANDOM_LEN + _LENGTH_LEN
_AES_KEY_LEN = 32
_ENCODING_AES_KEY_LEN = 43
# Only the standard alphabet, and no "=": the one pad character is appended before decoding.
_ENCODING_AES_KEY_RE = re.compile(r"[A-Za-z0-9+/]{43}")
# Canonical padded base64: b64decode(validate=True) alone still accepts excess "=" like "YWJj=".
_BASE64_RE = re.compile(r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?")
_ALNUM = string.ascii_letters + string.digits
_NONCE_LEN = 10


class WeComCrypto:
    """Signs, verifies, encrypts and decrypts WeCom AI-bot callbacks for one bot."""

    def __init__(self, token: str, encoding_aes_key: str, receive_id: str = "") -> None:
        """Check the bot's Token and EncodingAESKey once, so every later call can rely on them."""
        if not token:
            raise CryptoError(CryptoError.ILLEGAL_AES_KEY, "token is empty")
        if len(encoding_aes_key) != _ENCODING_AES_KEY_LEN:
            raise CryptoError(
                CryptoError.ILLEGAL_AES_KEY,
                f"EncodingAESKey must be {_ENCODING_AES_KEY_LEN} characters, got {len(encoding_aes_key)}",
            )
        if not _ENCODING_AES_KEY_RE.fullmatch(encoding_aes_key):
            raise CryptoError(CryptoError.ILLEGAL_AES_KEY, "EncodingAESKey is not base64")
        try:
            key = base64.b64decode(encoding_aes_key + "=", validate=True)
        except ValueError as exc:
            raise CryptoError(CryptoError.ILLEGAL_AES_KEY, "EncodingAESKey is not base64") from exc
        if len(key) != _AES_KEY_LEN:
            raise CryptoError(
                CryptoError.ILLEGAL_AES_KEY, f"EncodingAESKey decodes to {len(key)} bytes, not {_AES_KEY_LEN}"
            )
        self._token = token
        self._key = key
        self._iv = key[:16]
        self.receive_id = receive_id
        self._receive_id_bytes = receive_id.encode("utf-8")

    def __repr__(self) -> str:
        # Never show the token or the key, even in a debugger or a traceback.
        return f"WeComCrypto(receive_id={self.receive_id!r})"

    # --- signatures ---

    def sign(self, timestamp: str, nonce: str, encrypt: str) -> str:
        """Return WeCom's signature: sha1 hex of sorted, concatenated token, timestamp, nonce, encrypt."""
        try:
            joined = "".join(sorted([self._token, timestamp, nonce, encrypt])).encode("utf-8")
        except (TypeError, UnicodeEncodeError) as exc:
            raise CryptoError(CryptoError.COMPUTE_SIGNATURE, "cannot compute signature") from exc
        # SHA-1 is fixed by WeCom's protocol; it is not ours to choose.
        return hashlib.sha1(joined).hexdigest()  # noqa: S324

    def verify(self, signature: str, timestamp: str, nonce: str, encrypt: str) -> None:
        """Raise CryptoError(-40001) unless ``signature`` signs (timestamp, nonce, encrypt)."""
        expected = self.sign(timestamp, nonce, encrypt)
        # compare_digest rejects non-ASCII str with TypeError; such a signature is simply wrong.
        if not isinstance(signature, str) or not signature.isascii():
            raise CryptoError(CryptoError.SIGNATURE_INVALID, "signature is not ASCII")
        if not hmac.compare_digest(expected, signature):
            raise CryptoError(CryptoError.SIGNATURE_INVALID, "signature mismatch")

    # --- the encrypted frame ---

    def encrypt(self, plaintext: bytes, *, random16: bytes | None = None) -> str:
        """Return the base64 ciphertext of random16 + length + plaintext + receiveid."""
        prefix = secrets.token_bytes(_RANDOM_LEN) if random16 is None else random16
        if len(prefix) != _RANDOM_LEN:
            raise CryptoError(CryptoError.ENCRYPT, f"random prefix must be {_RANDOM_LEN} bytes")
        try:
            length = struct.pack(">I", len(plaintext))
        except struct.error as exc:
            raise CryptoError(CryptoError.ENCRYPT, "message too long for the 4-byte length") from exc
        frame = prefix + length + plaintext + self._receive_id_bytes
        ciphertext = self._aes_encrypt(frame)
        return base64.b64encode(ciphertext).decode("ascii")

    def decrypt(self, encrypt: str) -> bytes:
        """Return the message inside a base64 ciphertext, checking padding, length and receiveid."""
        if not _BASE64_RE.fullmatch(encrypt):
            raise CryptoError(CryptoError.BASE64_DECODE, "ciphertext is not base64")
        try:
            ciphertext = base64.b64decode(encrypt, validate=True)
        except ValueError as exc:  # binascii.Error, and non-ASCII str
            raise CryptoError(CryptoError.BASE64_DECODE, "ciphertext is not base64") from exc
        content = self._aes_decrypt(ciphertext)
        if len(content) < _HEADER_LEN:
            raise CryptoError(CryptoError.ILLEGAL_BUFFER, f"frame of {len(content)} bytes is too short")
        (length,) = struct.unpack(">I", content[_RANDOM_LEN:_HEADER_LEN])
        end = _HEADER_LEN + length
        if end > len(content):
            raise CryptoError(
                CryptoError.ILLEGAL_BUFFER,
                f"frame declares a {length}-byte message but holds {len(content) - _HEADER_LEN} bytes",
            )
        # The receiveid is not secret, so an ordinary comparison is fine here.
        if content[end:] != self._receive_id_bytes:
            raise CryptoError(CryptoError.RECEIVEID_MISMATCH, "receiveid mismatch")
        return content[_HEADER_LEN:end]

    # --- the bot side ---

    def verify_url(self, signature: str, timestamp: str, nonce: str, echostr: str) -> str:
        """Answer WeCom's GET URL verification: verify, decrypt echostr and return its plaintext."""
        self.verify(signature, timestamp, nonce, echostr)
        plaintext = self.decrypt(echostr)
        try:
            return plaintext.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CryptoError(CryptoError.DECRYPT, "echostr plaintext is not UTF-8") from exc

    def open_callback(self, signature: str, timestamp: str, nonce: str, body: bytes) -> dict[str, Any]:
        """Verify and decrypt a POSTed callback body ``{"encrypt": ...}`` into its JSON object."""
        envelope = _load_object(body, "callback body")
        encrypt = envelope.get("encrypt")
        if not isinstance(encrypt, str):
            raise CryptoError(CryptoError.PARSE_JSON, "callback body has no string 'encrypt'")
        self.verify(signature, timestamp, nonce, encrypt)
        return _load_object(self.decrypt(encrypt), "callback plaintext")

    def seal_reply(
        self, payload: Mapping[str, Any], nonce: str, timestamp: str | None = None
    ) -> dict[str, str]:
        """Encrypt and sign a passive reply; ``nonce`` must be the one from the request URL."""
        encrypt = self.encrypt(_dump_json(payload, "reply"))
        stamp = _now() if timestamp is None else timestamp
        return {
            "encrypt": encrypt,
            "msgsignature": self.sign(stamp, nonce, encrypt),
            "timestamp": stamp,
            "nonce": nonce,
        }

    def decrypt_media(self, data: bytes) -> bytes:
        """Decrypt a media file downloaded from WeCom (same key and IV, PKCS#7 to 32, no framing)."""
        return self._aes_decrypt(data)

    # --- the WeCom side ---

    def seal_callback(
        self, payload: Mapping[str, Any], timestamp: str | None = None, nonce: str | None = None
    ) -> tuple[dict[str, str], bytes]:
        """Build a callback as WeCom sends it: (query params, body ``{"encrypt": ...}``)."""
        encrypt = self.encrypt(_dump_json(payload, "callback"))
        params = self._signed_params(encrypt, timestamp, nonce)
        body = json.dumps({"encrypt": encrypt}, separators=(",", ":")).encode("ascii")
        return params, body

    def seal_echostr(
        self, echo: str, timestamp: str | None = None, nonce: str | None = None
    ) -> dict[str, str]:
        """Build the query params WeCom sends for a GET URL verification of ``echo``."""
        try:
            plaintext = echo.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise CryptoError(CryptoError.ENCRYPT, "echostr is not encodable as UTF-8") from exc
        encrypt = self.encrypt(plaintext)
        params = self._signed_params(encrypt, timestamp, nonce)
        params["echostr"] = encrypt
        return params

    def open_reply(
        self, reply: bytes | Mapping[str, Any], expected_nonce: str | None = None
    ) -> dict[str, Any]:
        """Verify and decrypt a passive reply as WeCom would, returning its JSON object."""
        envelope = _load_object(reply, "reply") if isinstance(reply, bytes) else reply
        encrypt = envelope.get("encrypt")
        signature = envelope.get("msgsignature")
        nonce = envelope.get("nonce")
        stamp = envelope.get("timestamp")
        if not isinstance(encrypt, str):
            raise CryptoError(CryptoError.PARSE_JSON, "reply has no string 'encrypt'")
        if not isinstance(signature, str) or not isinstance(nonce, str):
            raise CryptoError(CryptoError.SIGNATURE_INVALID, "reply lacks a string msgsignature or nonce")
        # WeCom's sample writes the timestamp as a string, its docs as a number; both sign as text.
        if isinstance(stamp, int) and not isinstance(stamp, bool):
            stamp = str(stamp)
        if not isinstance(stamp, str):
            raise CryptoError(CryptoError.SIGNATURE_INVALID, "reply lacks a timestamp")
        if expected_nonce is not None and nonce != expected_nonce:
            raise CryptoError(CryptoError.SIGNATURE_INVALID, "reply nonce is not the request's nonce")
        self.verify(signature, stamp, nonce, encrypt)
        return _load_object(self.decrypt(encrypt), "reply plaintext")

    def encrypt_media(self, data: bytes) -> bytes:
        """Encrypt bytes the way WeCom serves media files (the inverse of decrypt_media)."""
        return self._aes_encrypt(data)

    # --- internals ---

    def _signed_params(self, encrypt: str, timestamp: str | None, nonce: str | None) -> dict[str, str]:
        stamp = _now() if timestamp is None else timestamp
        once = _random_nonce() if nonce is None else nonce
        return {"msg_signature": self.sign(stamp, once, encrypt), "timestamp": stamp, "nonce": once}

    def _aes_encrypt(self, data: bytes) -> bytes:
        pad = _PAD_BLOCK - len(data) % _PAD_BLOCK
        try:
            # A CBC cipher object carries chaining state, so each message needs a fresh one.
            return AES.new(self._key, AES.MODE_CBC, iv=self._iv).encrypt(data + bytes([pad]) * pad)
        except (TypeError, ValueError) as exc:
            raise CryptoError(CryptoError.ENCRYPT, "AES encryption failed") from exc

    def _aes_decrypt(self, data: bytes) -> bytes:
        """Decrypt and strip the 32-byte PKCS#7 padding, raising -40007 on any inconsistency."""
        if not data or len(data) % AES.block_size:
            raise CryptoError(CryptoError.DECRYPT, f"ciphertext length {len(data)} is not a multiple of 16")
        try:
            plain = AES.new(self._key, AES.MODE_CBC, iv=self._iv).decrypt(data)
        except (TypeError, ValueError) as exc:
            raise CryptoError(CryptoError.DECRYPT, "AES decryption failed") from exc
        # Callers verify the signature before decrypting, so these distinct padding errors give an
        # attacker no padding oracle: a forged ciphertext is rejected before it gets here.
        pad = plain[-1]
        if not 1 <= pad <= _PAD_BLOCK or pad > len(plain):
            raise CryptoError(CryptoError.DECRYPT, f"bad padding byte {pad}")
        if plain[-pad:] != bytes([pad]) * pad:
            raise CryptoError(CryptoError.DECRYPT, "inconsistent padding")
        return plain[:-pad]


def _dump_json(payload: Mapping[str, Any], what: str) -> bytes:
    """Encode a payload compactly, keeping Chinese readable (WeCom counts content in UTF-8 bytes)."""
    try:
        text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        return text.encode("utf-8")
    except (TypeError, ValueError, RecursionError) as exc:  # ValueError covers UnicodeEncodeError
        raise CryptoError(CryptoError.GENERATE_REPLY, f"{what} payload is not JSON-serialisable") from exc


def _load_object(raw: bytes, what: str) -> dict[str, Any]:
    """Parse UTF-8 JSON that must be an object, raising -40002 otherwise."""
    try:
        # Deeply nested input makes json recurse until RecursionError; that is malformed input too.
        value = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # ValueError covers JSON and UTF-8 errors
        raise CryptoError(CryptoError.PARSE_JSON, f"{what} is not JSON") from exc
    if not isinstance(value, dict):
        raise CryptoError(CryptoError.PARSE_JSON, f"{what} is not a JSON object")
    return value


def _now() -> str:
    return str(int(time.time()))


def _random_nonce() -> str:
    return "".join(secrets.choice(_ALNUM) for _ in range(_NONCE_LEN))


def generate_token(length: int = 32) -> str:
    """Return a random Token of ASCII letters and digits, as WeCom's console accepts."""
    if length < 1:
        raise ValueError("token length must be positive")
    return "".join(secrets.choice(_ALNUM) for _ in range(length))


def generate_aes_key() -> str:
    """Return a random 43-character EncodingAESKey (base64 of 32 bytes without the trailing '=')."""
    return base64.b64encode(secrets.token_bytes(_AES_KEY_LEN)).decode("ascii")[:-1]


def media_item_crypto(aeskey: str) -> WeComCrypto:
    """The cipher for one long-connection media item, whose own ``aeskey`` (base64 of 32 bytes) encrypts it."""
    # Same AES-256-CBC with IV = key[:16] and PKCS#7 to 32 as callback media; the key may lack its "=".
    return WeComCrypto("media", aeskey.strip().rstrip("="))
