"""Every outbound HTTP call of laibao, on Tornado's simple_httpclient, and the rules they all follow.

- **Where**: a URL that comes from outside (WeCom media, Dify files, ``response_url``) must name a host
  on its :class:`HostAllowlist`; every address a host resolves to must be public unless the host is a
  configured upstream (a Dify, auth service or allowlist entry the operator wrote down), checked by
  :class:`GuardedResolver` on the addresses actually connected to, so DNS tricks cannot slip past.
- **Redirects**: never followed by Tornado. :meth:`Outbound.fetch` follows them itself only when told
  to (downloads), checking every hop against the same allowlist; a ``response_url`` gets none.
- **Size**: every body is collected by a bounded collector that closes the connection past its limit;
  short calls (Dify's /info and /parameters, the auth service, ``response_url``) get
  ``SHORT_BODY_BYTES``, on a client whose ``max_body_size`` is about that too.
- **No decompression**: laibao never asks for gzip, and a compressed answer stays compressed (and
  fails to parse), so a small body cannot inflate into a large one.
- **Errors**: Tornado's failures are mapped here, once, onto :class:`~laibao.errors.UpstreamError`;
  callers map those onto their own domain (Dify, media, sign-in).

Streaming answers (Dify's SSE) go through :class:`Exchange`, which also holds the one way to abort a
Tornado fetch early.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import json
import logging
import socket
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import SplitResult, urljoin, urlsplit

from tornado import httputil
from tornado.http1connection import HTTP1Connection
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest, HTTPResponse
from tornado.iostream import IOStream, StreamClosedError
from tornado.netutil import DefaultLoopResolver, Resolver
from tornado.simple_httpclient import HTTPTimeoutError

from laibao.errors import (
    UpstreamError,
    UpstreamRefused,
    UpstreamTimeout,
    UpstreamTooLarge,
    UpstreamUnreachable,
)
from stores.numbers import ascii_digits

if TYPE_CHECKING:
    from laibao.config import Config

log = logging.getLogger("laibao.outbound")

SHORT_BODY_BYTES = 1024 * 1024  # Dify's /info and /parameters, the auth service, response_url answers
MAX_REDIRECTS = 5
# WeCom's own hosts: AI-bot media come from one Tencent COS bucket, response_url is on the API host.
WECOM_MEDIA_HOSTS = ("ww-aibot-img-1258476243.cos.ap-guangzhou.myqcloud.com",)
RESPONSE_URL_HOSTS = ("qyapi.weixin.qq.com",)
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_BACKPRESSURE_BYTES = 1 << 20  # received but unconsumed stream bytes before the socket is no longer read
_ABORT_WAIT = 2.0  # how long closing a stream waits for Tornado to report the request finished
_DEFAULT_PORTS = {"http": 80, "https": 443}


# ------------------------------------------------------------------------------------------- where


def _host_port(entry: str) -> tuple[str, int | None]:
    """``host``, ``host:port``, ``[v6]:port`` or ``*.domain`` as (lower-case host, port or None)."""
    parts = urlsplit("//" + entry.strip())
    host = (parts.hostname or "").rstrip(".")
    if not host or parts.username is not None or parts.path or parts.query:
        raise ValueError(f"not a host or host:port: {entry!r}")
    return host, parts.port  # .port raises ValueError for a bad port


def _host_matches(pattern: str, host: str) -> bool:
    if pattern.startswith("*."):
        return host.endswith(pattern[1:])
    return host == pattern


@dataclass(frozen=True)
class HostAllowlist:
    """The hosts one kind of URL may point to: ``host`` (any port), ``host:port`` or ``*.domain``."""

    name: str  # what the URLs are, for messages ("WeCom media")
    entries: tuple[str, ...]

    def __post_init__(self) -> None:
        for entry in self.entries:
            _host_port(entry)  # refuses what could never match

    def allows(self, url: SplitResult) -> bool:
        """True if the URL's host (and port) is on the list."""
        host = (url.hostname or "").rstrip(".")
        port = url.port or _DEFAULT_PORTS.get(url.scheme)
        for entry in self.entries:
            pattern, wanted = _host_port(entry)
            if _host_matches(pattern, host) and (wanted is None or wanted == port):
                return True
        return False


def origin_entry(url: str) -> str:
    """The ``host:port`` allowlist entry of a URL's origin (``https://dify.lan/v1`` -> ``dify.lan:443``)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    shown = f"[{host}]" if ":" in host else host
    return f"{shown}:{parts.port or _DEFAULT_PORTS.get(parts.scheme, 80)}"


def check_url(url: str, allow: HostAllowlist | None) -> SplitResult:
    """The parts of ``url``; UpstreamRefused unless it is plain http(s) to a host ``allow`` lists."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a malformed port
    except ValueError as exc:
        raise UpstreamRefused("the URL is malformed") from exc
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
        raise UpstreamRefused("not an absolute http(s) URL")
    if parts.username is not None or parts.password is not None:
        raise UpstreamRefused(f"URL to {parts.hostname} carries credentials")
    if allow is not None and not allow.allows(parts):
        raise UpstreamRefused(f"{allow.name} URL to {parts.hostname}:{parts.port or parts.scheme} is not allowed")
    return parts


def is_public(address: str) -> bool:
    """True for a globally routable unicast address (not loopback, private, link-local, reserved ...)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


class GuardedResolver(Resolver):
    """Resolves like Tornado's default, but drops non-public addresses of hosts that are not trusted.

    ``trusted`` holds host patterns (``host`` or ``*.domain``) the operator configured as upstreams:
    a Dify or auth service on the LAN, a private WeCom deployment. Any other host resolving only to
    loopback, private or link-local addresses is refused before a connection is attempted.
    """

    def initialize(self, trusted: Iterable[str] = ()) -> None:
        """Tornado's Configurable calls this instead of __init__."""
        self._inner = DefaultLoopResolver()
        self.trusted = frozenset(pattern.lower().rstrip(".") for pattern in trusted)

    def close(self) -> None:
        """Close the wrapped resolver."""
        self._inner.close()

    def is_trusted(self, host: str) -> bool:
        """True if ``host`` is a configured upstream, which may live on a private address."""
        host = host.lower().rstrip(".")
        return any(_host_matches(pattern, host) for pattern in self.trusted)

    async def resolve(
        self, host: str, port: int, family: socket.AddressFamily = socket.AF_UNSPEC
    ) -> list[tuple[int, Any]]:
        """The addresses to connect to; UpstreamRefused when none is allowed."""
        addresses: list[tuple[int, Any]] = await self._inner.resolve(host, port, family)
        if self.is_trusted(host):
            return addresses
        public = [(af, address) for af, address in addresses if is_public(address[0])]
        if not public:
            log.warning("refused to connect to %s: it resolves to a non-public address", host)
            raise UpstreamRefused(f"{host} resolves to a loopback, private or link-local address")
        return public


# ------------------------------------------------------------------------------------------- JSON


def parse_json(body: bytes | str) -> Any:
    """JSON from outside; ValueError when it is not JSON, not UTF-8, or nested too deeply to parse."""
    try:
        return json.loads(body)
    except RecursionError as exc:  # json recurses per nesting level: deep input is malformed input
        raise ValueError("JSON nested too deeply") from exc


# ----------------------------------------------------------------------------------- short calls


@dataclass(frozen=True)
class Reply:
    """A complete, bounded HTTP answer."""

    status: int
    body: bytes
    content_type: str = ""
    location: str = ""


class _Collector:
    """Collects one answer's body, refusing more than ``max_bytes``; can close the connection.

    Refusing closes the connection: raising from Tornado's callbacks would work too, but Tornado logs
    such an exception as uncaught. The connection is reached through the ``write`` method
    simple_httpclient hands to ``body_producer`` once connected.
    """

    def __init__(self, max_bytes: int, body: bytes | None) -> None:
        self.max_bytes = max_bytes
        self.status = 0
        self.content_type = ""
        self.location = ""
        self.body = bytearray()
        self.too_large = False
        self.connected = False
        self._request_body = body
        self._stream: IOStream | None = None

    def produce_body(self, write: Callable[[bytes], None]) -> asyncio.Future[None]:
        """Tornado's body_producer: called once connected; sends the request body, if any."""
        connection = getattr(write, "__self__", None)
        if isinstance(connection, HTTP1Connection):
            self._stream = connection.stream
        self.connected = True
        if self._request_body:
            write(self._request_body)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    def on_header(self, line: str) -> None:
        """Tornado's header_callback: the status line, then each header."""
        if line.startswith("HTTP/"):
            self.status, self.content_type, self.location = 0, "", ""
            self.body.clear()
            try:
                self.status = httputil.parse_response_start_line(line.rstrip("\r\n")).code
            except httputil.HTTPInputError:
                pass  # Tornado fails the fetch itself
            return
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-type":
            self.content_type = value.strip()
        elif name == "location":
            self.location = value.strip()
        elif name == "content-length":
            length = value.strip()
            # Refused before a byte of the body is read: no point receiving what must be dropped.
            # More than 18 digits is over any limit (and more than int() takes).
            if ascii_digits(length) and (len(length) > 18 or int(length) > self.max_bytes):
                self._refuse()

    def on_chunk(self, chunk: bytes) -> None:
        """Tornado's streaming_callback."""
        if self.too_large:
            return
        if len(self.body) + len(chunk) > self.max_bytes:
            self._refuse()
            return
        self.body += chunk

    def _refuse(self) -> None:
        self.too_large = True
        self.body.clear()
        if self._stream is not None:
            self._stream.close()


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def map_failure(exc: BaseException, host: str, connect_timeout: float, timeout: float) -> UpstreamError:
    """Tornado's failure below HTTP as an UpstreamError (the one place that knows Tornado's errors)."""
    if isinstance(exc, UpstreamError):
        return exc  # the resolver's refusal
    if isinstance(exc, HTTPTimeoutError):
        # Tornado names the phase: "Timeout during request" is the ceiling, anything else connecting.
        if "during request" in str(exc):
            return UpstreamTimeout("total", timeout)
        return UpstreamTimeout("connect", min(connect_timeout, timeout))  # the ceiling bounds connecting too
    return UpstreamUnreachable(f"cannot reach {host}: {_describe(exc)}")


_FAILURES = (OSError, HTTPClientError, httputil.HTTPInputError, StreamClosedError, UpstreamError)


class Outbound:
    """The process's HTTP clients, built once: one for long answers and downloads, one for short calls."""

    def __init__(
        self,
        *,
        max_clients: int = 100,
        trusted: Iterable[str] = (),
        wecom_media: HostAllowlist | None = None,
        response_url: HostAllowlist | None = None,
        short_body_bytes: int = SHORT_BODY_BYTES,
    ) -> None:
        self.resolver = GuardedResolver(trusted=trusted)
        self.wecom_media = wecom_media or HostAllowlist("WeCom media", WECOM_MEDIA_HOSTS)
        self.response_url = response_url or HostAllowlist("response_url", RESPONSE_URL_HOSTS)
        self.short_body_bytes = short_body_bytes
        # Each live answer holds one connection of the long client: Tornado's default of 10 would queue them.
        self._long = AsyncHTTPClient(force_instance=True, max_clients=max_clients, resolver=self.resolver)
        # Short answers are collected up to short_body_bytes; Tornado's own limit sits just above, as a backstop.
        self._short = AsyncHTTPClient(force_instance=True, max_clients=max_clients, resolver=self.resolver,
                                      max_body_size=short_body_bytes + 64 * 1024)

    @classmethod
    def from_config(cls, config: Config) -> Outbound:
        """The clients for ``config``: its allowlists, and its upstreams trusted on private addresses."""
        trusted = [urlsplit(bot.dify_url).hostname or "" for bot in config.bots]
        if config.auth_url:
            trusted.append(urlsplit(config.auth_url).hostname or "")
        # What the operator wrote down is an upstream too (a private WeCom, a Dify file server).
        for entries in (config.wecom_media_hosts, config.response_url_hosts, config.dify_file_hosts):
            trusted.extend(_host_port(entry)[0] for entry in entries)
        return cls(
            max_clients=config.http_max_clients,
            trusted=[host for host in trusted if host],
            wecom_media=HostAllowlist("WeCom media", config.wecom_media_hosts or WECOM_MEDIA_HOSTS),
            response_url=HostAllowlist("response_url", config.response_url_hosts or RESPONSE_URL_HOSTS),
        )

    def close(self) -> None:
        """Close both clients and the resolver."""
        self._long.close()
        self._short.close()
        self.resolver.close()

    async def fetch(
        self,
        url: str,
        *,
        method: str = "GET",
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
        allow: HostAllowlist | None = None,
        max_bytes: int | None = None,
        redirects: int = 0,
        connect_timeout: float = 10.0,
        timeout: float = 30.0,  # noqa: ASYNC109 - Tornado's request_timeout, which also ends the connection
    ) -> Reply:
        """One bounded request; its answer (any status), or an UpstreamError.

        ``allow`` is checked for ``url`` and for every redirect, which are followed (up to
        ``redirects``, GET only) by this method, never by Tornado. ``max_bytes`` defaults to
        SHORT_BODY_BYTES; a larger allowance uses the client for long answers.
        """
        limit = self.short_body_bytes if max_bytes is None else max_bytes
        for _ in range(redirects + 1):
            reply = await self._once(url, method, headers, body, allow, limit, connect_timeout, timeout)
            if reply.status not in _REDIRECTS or not redirects or method != "GET" or not reply.location:
                return reply
            url = urljoin(url, reply.location)
        raise UpstreamUnreachable(f"more than {redirects} redirects")

    async def _once(
        self, url: str, method: str, headers: Mapping[str, str] | None, body: bytes | None,
        allow: HostAllowlist | None, limit: int, connect_timeout: float,
        timeout: float,  # noqa: ASYNC109 - Tornado's request_timeout
    ) -> Reply:
        parts = check_url(url, allow)
        host = parts.hostname or "?"
        collector = _Collector(limit, body)
        sent = dict(headers or {})
        if body is not None:
            # The body goes through body_producer, which hands the collector the connection to close;
            # Tornado only sets Content-Length itself for ``body``.
            sent["Content-Length"] = str(len(body))
        request = HTTPRequest(
            url,
            method=method,
            headers=sent,
            body_producer=collector.produce_body,
            allow_nonstandard_methods=True,  # a GET or DELETE with a body_producer
            header_callback=collector.on_header,
            streaming_callback=collector.on_chunk,
            connect_timeout=min(connect_timeout, timeout),
            request_timeout=timeout,
            follow_redirects=False,
            decompress_response=False,
        )
        client = self._short if limit <= self.short_body_bytes else self._long
        try:
            # Failures below HTTP are raised even with raise_error=False; HTTP errors come as a response.
            response = await client.fetch(request, raise_error=False)
        except _FAILURES as exc:
            if collector.too_large:  # the connection closed on purpose ends the fetch as "Stream closed"
                raise UpstreamTooLarge(f"the answer from {host} is larger than {limit} bytes", limit) from None
            raise map_failure(exc, host, connect_timeout, timeout) from exc
        if collector.too_large:
            raise UpstreamTooLarge(f"the answer from {host} is larger than {limit} bytes", limit)
        return Reply(collector.status or response.code, bytes(collector.body),
                     collector.content_type or response.headers.get("Content-Type", ""), collector.location)

    def open_stream(
        self,
        url: str,
        *,
        headers: Mapping[str, str],
        body: bytes,
        connect_timeout: float,
        timeout: float,  # Tornado's request_timeout: the ceiling of the whole answer
        idle_timeout: float,
    ) -> Exchange:
        """POST ``body`` and follow the streamed answer through an Exchange (no redirects, no gzip)."""
        exchange = Exchange(body, idle_timeout, connect_timeout, timeout)
        sent = dict(headers)
        sent["Content-Length"] = str(len(body))
        request = HTTPRequest(
            url,
            method="POST",
            headers=sent,
            body_producer=exchange.produce_body,
            header_callback=exchange.on_header_line,
            streaming_callback=exchange.on_chunk,
            connect_timeout=connect_timeout,
            request_timeout=timeout,
            follow_redirects=False,
            # No gzip: a compressing proxy would hold SSE frames back until its buffer fills.
            decompress_response=False,
        )
        exchange.start(self._long.fetch(request, raise_error=False), urlsplit(url).hostname or "?")
        return exchange


# -------------------------------------------------------------------------------------- streams


class _Abandoned(Exception):
    """The consumer left before the connection was made: the request body is never sent."""


class Exchange:
    """One streaming request: buffers what Tornado's callbacks deliver, watches idleness, can abort.

    Tornado has no public way to abort a fetch (tornadoweb/tornado#157). simple_httpclient calls
    ``body_producer`` with the ``write`` method of the request's ``HTTP1Connection`` once connected;
    the exchange keeps that connection's IOStream, and closing it ends the fetch at once (Tornado then
    reports a closed stream, which is discarded).
    """

    def __init__(self, body: bytes, idle_timeout: float, connect_timeout: float, timeout: float) -> None:
        self._body = body
        self.idle_timeout = idle_timeout
        self._connect_timeout = connect_timeout
        self._timeout = timeout
        self._host = "?"
        self._loop = asyncio.get_running_loop()
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._wake = asyncio.Event()
        self._drained: asyncio.Future[None] | None = None
        self._outcome: asyncio.Future[HTTPResponse] | None = None
        self._stream: IOStream | None = None
        self._last_activity = self._loop.time()
        self._idle_timer: asyncio.TimerHandle | None = None
        self._aborted = False
        self.connected = False
        self.status = 0

    def start(self, outcome: asyncio.Future[HTTPResponse], host: str) -> None:
        """Follow the fetch started for this exchange."""
        self._outcome = outcome
        self._host = host
        outcome.add_done_callback(self._on_outcome)

    def produce_body(self, write: Callable[[bytes], None]) -> asyncio.Future[None]:
        """Tornado's body_producer: called once the connection is made."""
        if self._aborted:
            raise _Abandoned("the consumer left while connecting")
        connection = getattr(write, "__self__", None)
        if isinstance(connection, HTTP1Connection):
            self._stream = connection.stream
        self.connected = True
        self._touch()
        write(self._body)
        done: asyncio.Future[None] = self._loop.create_future()
        done.set_result(None)
        return done

    def on_header_line(self, line: str) -> None:
        """Tornado's header_callback: the status line tells whether the body is the stream or an error."""
        self._touch()
        if self.status == 0 and line.startswith("HTTP/"):
            try:
                self.status = httputil.parse_response_start_line(line.rstrip("\r\n")).code
            except httputil.HTTPInputError:
                pass  # the final HTTPResponse still carries the code

    def on_chunk(self, chunk: bytes) -> asyncio.Future[None] | None:
        """Tornado's streaming_callback; returns a future (back-pressure) while the consumer lags."""
        self._touch()
        if self._aborted:
            return None
        self._chunks.append(chunk)
        self._buffered += len(chunk)
        if self._buffered >= _BACKPRESSURE_BYTES:
            self._drained = self._loop.create_future()
            return self._drained
        return None

    async def receive(self) -> bytes:
        """The bytes received since the last call; ``b""`` once the body is complete.

        Raises UpstreamTimeout("idle") when nothing arrived for ``idle_timeout`` seconds, and the
        mapped UpstreamError when the fetch failed.
        """
        while not self._chunks:
            assert self._outcome is not None
            if self._outcome.done():
                return self._finish()
            self._wake.clear()
            if not self.connected:
                # Connecting (or queued behind max_clients): Tornado's connect_timeout bounds this.
                await self._wake.wait()
                continue
            deadline = self._last_activity + self.idle_timeout
            if deadline <= self._loop.time():
                raise UpstreamTimeout("idle", self.idle_timeout)
            if self._idle_timer is None:
                # One timer per idle period, not one per wait (a stream waits once per delta): when it
                # fires, the check above runs again and re-arms it from the latest activity.
                self._idle_timer = self._loop.call_at(deadline, self._idle_check)
            await self._wake.wait()
        chunk = b"".join(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        if self._drained is not None:
            self._resume()
        return chunk

    async def abort(self) -> None:
        """Close the connection unless the response is complete; wait briefly for Tornado to let go."""
        self._aborted = True
        self._chunks.clear()
        if self._drained is not None:
            self._resume()
        outcome = self._outcome
        if outcome is None or outcome.done():
            return
        if self._stream is None:
            # Still connecting: produce_body refuses to send once connected, which ends the fetch.
            if self.connected:
                log.warning("cannot close the connection to %s early with this HTTP client", self._host)
            return
        log.debug("closing the connection to %s before the response ended", self._host)
        self._stream.close()
        await asyncio.wait([outcome], timeout=_ABORT_WAIT)

    def _finish(self) -> bytes:
        assert self._outcome is not None
        exc = self._outcome.exception()
        if exc is not None:
            raise map_failure(exc, self._host, self._connect_timeout, self._timeout) from exc
        if self.status == 0:
            self.status = self._outcome.result().code
        return b""

    def _touch(self) -> None:
        self._last_activity = self._loop.time()
        self._wake.set()

    def _resume(self) -> None:
        """Let Tornado read the socket again; the pause was ours, so the idle clock restarts."""
        assert self._drained is not None
        if not self._drained.done():
            self._drained.set_result(None)
        self._drained = None
        self._last_activity = self._loop.time()

    def _idle_check(self) -> None:
        self._idle_timer = None
        self._wake.set()

    def _on_outcome(self, outcome: asyncio.Future[HTTPResponse]) -> None:
        if not outcome.cancelled():
            outcome.exception()  # retrieved here, so an abandoned fetch never logs "never retrieved"
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        self._wake.set()
