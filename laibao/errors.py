"""The one exception tree of laibao.

    LaibaoError
    ├── ConfigError            settings missing or malformed (one line per problem)
    ├── CryptoError            WeCom signature / AES / framing failure, with the official -400xx code
    ├── CallbackError          a decrypted callback that is not a usable WeCom message
    ├── DifyError              anything that went wrong talking to Dify
    │   ├── DifyHTTPError      Dify answered 4xx/5xx (status, Dify code, message)
    │   ├── DifyConnectionError  Dify could not be reached
    │   ├── DifyTimeoutError   connect timeout, idle watchdog or total ceiling
    │   └── DifyStreamError    malformed SSE, an `error` event, or EOF without a terminal event
    ├── StoreError             Redis / MySQL unavailable or misbehaving
    ├── AuthError              the user could not be authenticated
    │   ├── NotAuthorized      unknown or disabled user: they may not use the bot
    │   └── AuthUnavailable    sign-in could not be done now (timeout, unreachable, refused)
    ├── MediaError             a media file could not be downloaded or used (names the host, never the URL)
    │   ├── MediaTooLarge      more bytes than allowed (announced, or counted while streaming)
    │   ├── MediaUnavailable   unreachable, timed out, an HTTP error (an expired WeCom URL), undecryptable
    │   └── MediaUnsupported   a kind of file the Dify app does not accept
    ├── ChatError              `laibao chat`: the running laibao answered what WeCom would not accept
    ├── UpstreamError          an outbound HTTP call failed below the application (laibao.outbound)
    │   ├── UpstreamRefused    the URL's host is not allowed, or it resolves to a private address
    │   ├── UpstreamTimeout    no connection in time ("connect"), or no whole answer in time ("total")
    │   ├── UpstreamTooLarge   the answer is larger than the call allows
    │   └── UpstreamUnreachable  refused, reset, DNS, TLS, a malformed HTTP answer
    └── LongConnectionError    the WeCom long connection is gone, or WeCom refused a frame
        ├── FrameRefused       a frame's ack carried a non-zero errcode
        └── NoHolder           no process holds the bot's connection (or took the request in time)

    OwnershipLost              not an error but a signal: another process took the stream over, so
                               this answer stops writing (outside the tree, so that no handler of
                               LaibaoError swallows it)

Third-party exceptions are mapped onto this tree at the boundary with ``raise ... from exc``.
Messages are for operators and never contain secrets.
"""

from __future__ import annotations

# The root and the store error live at the bottom layer (stores never import laibao); same classes.
from stores.errors import LaibaoError, StoreError

__all__ = [
    "AuthError",
    "AuthUnavailable",
    "CallbackError",
    "ChatError",
    "ConfigError",
    "CryptoError",
    "DifyConnectionError",
    "DifyError",
    "DifyHTTPError",
    "DifyStreamError",
    "DifyTimeoutError",
    "FrameRefused",
    "LaibaoError",
    "LongConnectionError",
    "MediaError",
    "MediaTooLarge",
    "MediaUnavailable",
    "MediaUnsupported",
    "NoHolder",
    "NotAuthorized",
    "OwnershipLost",
    "StoreError",
    "UpstreamError",
    "UpstreamRefused",
    "UpstreamTimeout",
    "UpstreamTooLarge",
    "UpstreamUnreachable",
]


class ConfigError(LaibaoError):
    """The configuration cannot be used; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


class CryptoError(LaibaoError):
    """A WeCom crypto failure carrying the official error code (-40001 ... -40011)."""

    SIGNATURE_INVALID = -40001
    PARSE_JSON = -40002
    COMPUTE_SIGNATURE = -40003
    ILLEGAL_AES_KEY = -40004
    RECEIVEID_MISMATCH = -40005
    ENCRYPT = -40006
    DECRYPT = -40007
    ILLEGAL_BUFFER = -40008
    BASE64_ENCODE = -40009
    BASE64_DECODE = -40010
    GENERATE_REPLY = -40011

    def __init__(self, code: int, message: str) -> None:
        self.code = code
        super().__init__(f"{code} {message}")


class CallbackError(LaibaoError):
    """A correctly encrypted callback whose content is not a usable WeCom message."""


class DifyError(LaibaoError):
    """Something went wrong talking to Dify."""


class DifyHTTPError(DifyError):
    """Dify answered with an HTTP error status."""

    def __init__(self, status: int, code: str, message: str) -> None:
        self.status = status
        self.code = code
        self.message = message
        super().__init__(f"Dify HTTP {status} {code}: {message}")


class DifyConnectionError(DifyError):
    """Dify could not be reached (DNS, refused, reset before an answer)."""


class DifyTimeoutError(DifyError):
    """Dify took too long: connect timeout, idle watchdog or total ceiling."""

    def __init__(self, kind: str, seconds: float) -> None:
        self.kind = kind
        self.seconds = seconds
        super().__init__(f"Dify {kind} timeout after {seconds:g} s")


class DifyStreamError(DifyError):
    """The SSE stream was malformed, carried an ``error`` event, or ended without a terminal event."""

    def __init__(self, message: str, code: str = "", status: int = 0) -> None:
        self.code = code
        self.status = status
        super().__init__(message)


class AuthError(LaibaoError):
    """The user could not be authenticated."""


class NotAuthorized(AuthError):
    """The user is unknown or disabled: they may not use this bot."""

    def __init__(self, userid: str) -> None:
        self.userid = userid
        super().__init__(f"user {userid!r} is not authorised")


class AuthUnavailable(AuthError):
    """Sign-in could not be done now; ``kind`` says why (timeout, unreachable, status 500, ...)."""

    def __init__(self, userid: str, kind: str) -> None:
        self.userid = userid
        self.kind = kind
        super().__init__(f"sign-in for user {userid!r} failed: {kind}")


class MediaError(LaibaoError):
    """A media file could not be downloaded or used."""


class MediaTooLarge(MediaError):
    """The file is larger than allowed; ``limit`` is the allowance in bytes."""

    def __init__(self, message: str, limit: int) -> None:
        self.limit = limit
        super().__init__(message)


class MediaUnavailable(MediaError):
    """The file could not be fetched (unreachable, timeout, HTTP error, expired URL) or decrypted."""

    def __init__(self, message: str, status: int = 0) -> None:
        self.status = status
        super().__init__(message)


class MediaUnsupported(MediaError):
    """The Dify app does not accept this kind of file."""


class ChatError(LaibaoError):
    """The running laibao answered something WeCom would not accept."""


class UpstreamError(LaibaoError):
    """An outbound HTTP call failed below the application; callers map it onto their own errors."""


class UpstreamRefused(UpstreamError):
    """The URL may not be fetched: scheme, host not on the allowlist, or a private address."""


class UpstreamTimeout(UpstreamError):
    """No connection within the connect timeout ("connect"), or no whole answer in time ("total")."""

    def __init__(self, phase: str, seconds: float) -> None:
        self.phase = phase
        self.seconds = seconds
        super().__init__(f"{phase} timeout after {seconds:g} s")


class UpstreamTooLarge(UpstreamError):
    """The answer is larger than ``limit`` bytes."""

    def __init__(self, message: str, limit: int) -> None:
        self.limit = limit
        super().__init__(message)


class UpstreamUnreachable(UpstreamError):
    """Connection refused or reset, DNS or TLS failure, or an answer that is not HTTP."""


class LongConnectionError(LaibaoError):
    """The WeCom long connection is closed, timed out, or refused a frame."""


class FrameRefused(LongConnectionError):
    """WeCom acknowledged a frame with a non-zero errcode."""

    def __init__(self, cmd: str, errcode: int, errmsg: str = "") -> None:
        self.cmd = cmd
        self.errcode = errcode
        super().__init__(f"WeCom refused {cmd}: errcode {errcode} {errmsg[:100]}".rstrip())


class NoHolder(LongConnectionError):
    """No process holds the bot's connection (or it did not take the request in time)."""


class OwnershipLost(Exception):
    """Another process took the session over; this answer must stop writing."""
