"""laibao against hostile inputs: URLs that point inward, slow and garbled clients, hostile upstreams.

Everything runs on real sockets: laibao in this process (or as a real `laibao serve`), stand-ins for
Dify, WeCom's media and response_url hosts and the auth service, and canary servers that record any
request that should never have been made.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import tornado.httpserver
import tornado.web
from tornado.httpclient import AsyncHTTPClient
from tornado.ioloop import IOLoop

from laibao import texts
from laibao.auth import AuthService
from laibao.config import Config
from laibao.delivery import post_markdown
from laibao.dify import DifyClient
from laibao.errors import (
    AuthUnavailable,
    DifyError,
    DifyStreamError,
    UpstreamRefused,
)
from laibao.outbound import HostAllowlist, Outbound, origin_entry
from stores.tokens import MemoryTokenCache, RedisTokenCache
from stores.users import MemoryUserStore, User
from tests.authstub import Answer, AuthStub, bot, make_config
from tests.conftest import make_outbound
from tests.difystub import Script
from tests.harness import (
    CRYPTO,
    LaibaoProcess,
    Service,
    WeCom,
    eventually,
    follow,
    message,
    running_service,
    service_config,
)
from tests.servers import free_port, serving

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
DEEP = b"[" * 100_000 + b"]" * 100_000  # JSON nested far deeper than Python's recursion limit


@dataclass
class Route:
    """How a Canary answers one path."""

    status: int = 200
    body: bytes = b"canary"
    headers: dict[str, str] = field(default_factory=dict)


class Canary:
    """An HTTP server on 127.0.0.1 that answers scripted routes and records every request it gets."""

    def __init__(self) -> None:
        self.port = free_port()
        self.routes: dict[str, Route] = {}
        self.hits: list[tuple[str, str, bytes]] = []  # (method, path, body)
        self._server: tornado.httpserver.HTTPServer | None = None

    def url(self, path: str) -> str:
        """An absolute URL on this server."""
        return f"http://127.0.0.1:{self.port}{path}"

    def paths(self) -> list[str]:
        """The paths requested so far."""
        return [path for _, path, _ in self.hits]

    async def start(self) -> None:
        """Listen on the current IOLoop."""
        self._server = tornado.httpserver.HTTPServer(
            tornado.web.Application([(r"/.*", _CanaryHandler, {"canary": self})]))
        self._server.listen(self.port, address="127.0.0.1")

    async def stop(self) -> None:
        """Stop listening and close connections."""
        if self._server is not None:
            self._server.stop()
            await self._server.close_all_connections()


class _CanaryHandler(tornado.web.RequestHandler):
    def initialize(self, canary: Canary) -> None:
        self.canary = canary

    def check_xsrf_cookie(self) -> None:
        """Plain posts, as upstreams take them."""

    def prepare(self) -> None:
        self.canary.hits.append((self.request.method or "", self.request.path, self.request.body))
        route = self.canary.routes.get(self.request.path, Route())
        self.set_status(route.status)
        for name, value in route.headers.items():
            self.set_header(name, value)
        self.finish(route.body)


@pytest.fixture
def canary(io_loop: IOLoop) -> Iterator[Canary]:
    with serving(io_loop, Canary()) as server:
        yield server


@pytest.fixture
def canary2(io_loop: IOLoop) -> Iterator[Canary]:
    with serving(io_loop, Canary()) as server:
        yield server


@pytest.fixture
def svc(request: pytest.FixtureRequest, io_loop: IOLoop, canary: Canary, canary2: Canary) -> Iterator[Service]:
    """laibao in this process with the test's ``settings``; "{canary}" in a value is that server's host:port.

    ``store="redis"`` runs it on the real Redis, ``store="dead"`` on a Redis URL nothing listens on.
    """
    marker = request.node.get_closest_marker("settings")
    settings = dict(marker.kwargs) if marker else {}
    store = settings.pop("store", "")
    redis_url = {"redis": lambda: request.getfixturevalue("redis_url"),
                 "dead": lambda: f"redis://127.0.0.1:{free_port()}/0"}.get(store, lambda: "")()
    places = {"canary": origin_entry(canary.url("/")), "canary2": origin_entry(canary2.url("/"))}
    settings = {k: v.format(**places) if isinstance(v, str) else v for k, v in settings.items()}
    with running_service(io_loop, redis_url, **settings) as service:
        yield service


def gzip_bomb(inflated: int) -> bytes:
    """A gzip body of a JSON string that inflates to about ``inflated`` bytes (about 1/1000 on the wire)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    zeros = b"0" * (1 << 20)
    parts = [packer.compress(b'{"opening_statement": "')]
    parts.extend(packer.compress(zeros) for _ in range(inflated >> 20))
    parts.append(packer.compress(b'"}') + packer.flush())
    return b"".join(parts)


async def answer(svc: Service, payload: dict[str, Any]) -> list[dict[str, Any]]:
    """Send a message and follow its polls; every stream reply."""
    first = await svc.wecom.stream(payload)
    if first["finish"]:
        return [first]
    return [first, *await follow([svc.wecom], str(first["id"]))]


def mixed(text: str, *urls: str, **extra: Any) -> dict[str, Any]:
    """A mixed message callback: one text item and an image item per URL."""
    items = [{"msgtype": "text", "text": {"content": text}}]
    items += [{"msgtype": "image", "image": {"url": url}} for url in urls]
    return message("", msgtype="mixed", mixed={"msg_item": items}, **extra)


# ------------------------------------------------------------------------------------------ SSRF

@pytest.mark.settings(wecom_media_hosts="{canary}")
@pytest.mark.gen_test(timeout=60)
async def test_wecom_media_only_from_the_configured_media_hosts(svc: Service, canary: Canary,
                                                                 canary2: Canary) -> None:
    media = canary  # plays WeCom's media host
    media.routes["/media"] = Route(body=CRYPTO.encrypt_media(PNG))
    media.routes["/redirect"] = Route(status=302, headers={"Location": canary2.url("/internal-admin")})
    # The configured host works, although it is on 127.0.0.1 (configured upstreams may be private).
    polls = await answer(svc, mixed("图里是什么？", media.url("/media")))
    assert polls[-1]["content"] == Script().answer
    assert [u.data for u in svc.dify.uploads] == [PNG]
    # Another port of the same host, another name for it, a redirect from the allowed host.
    for url in (canary2.url("/internal-admin"), f"http://localhost:{media.port}/media",
                media.url("/redirect")):
        polls = await answer(svc, mixed("这张呢？", url))
        assert polls[-1]["content"] == texts.MEDIA_UNAVAILABLE
    assert canary2.hits == []  # nothing ever reached the internal host
    assert media.paths() == ["/media", "/redirect"]
    assert len(svc.dify.chat_calls) == 1  # Dify was only asked with the image it got


@pytest.mark.gen_test(timeout=60)
async def test_dify_files_only_from_difys_origin(svc: Service, canary: Canary) -> None:
    canary.routes["/secret.png"] = Route(body=PNG, headers={"Content-Type": "image/png"})
    own = svc.dify.serve("own.png", PNG)
    svc.dify.push(Script(answer="图来了", files=[canary.url("/secret.png"), own]))
    polls = await answer(svc, message("画一张图"))
    assert polls[-1]["finish"] and len(polls[-1]["msg_item"]) == 1  # Dify's own file only
    svc.dify.push(Script(answer=f"看这里 ![x]({canary.url('/secret.png')})"))
    polls = await answer(svc, message("再画一张"))
    assert "msg_item" not in polls[-1]
    assert canary.hits == []


@pytest.mark.settings(response_url_hosts="{canary}")
@pytest.mark.gen_test(timeout=60)
async def test_response_url_only_to_wecoms_api_host_and_no_redirects(
    svc: Service, canary: Canary, canary2: Canary, caplog: pytest.LogCaptureFixture
) -> None:
    api = canary  # plays qyapi.weixin.qq.com, but answers a redirect to an internal host
    api.routes["/cgi-bin/aibot/response"] = Route(status=307, headers={"Location": canary2.url("/internal-admin")})
    long_answer = "长" * 8000  # 24000 bytes: the rest must go through response_url
    for url in (canary2.url("/cgi-bin/aibot/response"), api.url("/cgi-bin/aibot/response")):
        svc.dify.push(Script(answer=long_answer, cut=(4096,)))
        polls = await answer(svc, message("写长一点", response_url=url))
        assert polls[-1]["finish"]
    # laibao.delivery gives each up: one for the host, one for the 307
    await eventually(lambda: sum(r.name == "laibao.delivery" and r.levelno == logging.ERROR
                                 for r in caplog.records) == 2, "both deliveries given up")
    assert canary2.hits == []  # neither directly nor through the 307 did the answer reach it
    assert [(method, path) for method, path, _ in api.hits] == [("POST", "/cgi-bin/aibot/response")]


@pytest.mark.gen_test(timeout=30)
async def test_private_addresses_are_refused_after_resolution_unless_configured(canary: Canary) -> None:
    anywhere = HostAllowlist("test", ("localhost", "127.0.0.1", "2130706433"))  # 2130706433 is 127.0.0.1
    strict = Outbound(trusted=[])
    lenient = Outbound(trusted=["localhost"])
    try:
        for url in (f"http://localhost:{canary.port}/a", canary.url("/b"), f"http://2130706433:{canary.port}/c"):
            with pytest.raises(UpstreamRefused, match="private"):
                await strict.fetch(url, allow=anywhere)
        assert canary.hits == []
        reply = await lenient.fetch(f"http://localhost:{canary.port}/d", allow=anywhere)
        assert (reply.status, reply.body, canary.paths()) == (200, b"canary", ["/d"])
        with pytest.raises(UpstreamRefused, match="not allowed"):  # the allowlist still applies
            await lenient.fetch(f"http://localhost:{canary.port}/e", allow=HostAllowlist("test", ("example.com",)))
    finally:
        strict.close()
        lenient.close()


# ---------------------------------------------------------------------------------- slow clients

@pytest.mark.settings(idle_connection_timeout=0.5, body_timeout=0.5)
@pytest.mark.gen_test(timeout=60)
async def test_slow_clients_are_disconnected(svc: Service) -> None:
    port = urlsplit(svc.wecom.base_url).port
    assert port is not None
    half_line = b"POST /wecom/callback?msg_signature=abc&time"
    half_body = (b"POST /wecom/callback?msg_signature=a&timestamp=1&nonce=n HTTP/1.1\r\nHost: x\r\n"
                 b"Content-Length: 1000\r\n\r\n" + b'{"encrypt": "' + b"A" * 100)
    for sent in (half_line, half_body):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(sent)
            await writer.drain()
            # laibao closes the connection (without the fix it waits an hour, or for ever)
            await asyncio.wait_for(reader.read(), 20)
            assert reader.at_eof()
        finally:
            writer.close()
    assert (await svc.wecom.http.fetch(svc.wecom.base_url + "/healthz")).code == 200


@pytest.mark.gen_test(timeout=60)
async def test_a_content_length_of_non_ascii_digits_is_a_client_error(svc: Service) -> None:
    port = urlsplit(svc.wecom.base_url).port
    assert port is not None
    # "\xb2" is "²" in latin-1, which str.isdigit() accepts and int() refuses
    for length in (b"\xb2", b"\xd9\xa3", b"-5", b"1e3"):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"POST /wecom/callback?msg_signature=a&timestamp=1&nonce=n HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Length: " + length + b"\r\n\r\n{}")
            await writer.drain()
            status_line = await asyncio.wait_for(reader.readline(), 20)
        finally:
            writer.close()
        status = int(status_line.split()[1]) if status_line else 0  # 0: closed without an answer
        assert status in (0, 400), (length, status_line)
    assert (await svc.wecom.http.fetch(svc.wecom.base_url + "/healthz")).code == 200


# -------------------------------------------------------------------------- oversized and deep JSON

@pytest.mark.gen_test(timeout=60)
async def test_short_dify_calls_refuse_bombs_big_and_deep_answers(canary: Canary, outbound: Outbound) -> None:
    dify = DifyClient(canary.url("/v1"), "app-key", http=outbound, connect_timeout=2)
    canary.routes["/v1/parameters"] = Route(body=gzip_bomb(60 << 20), headers={
        "Content-Encoding": "gzip", "Content-Type": "application/json"})
    with pytest.raises(DifyError, match="not JSON"):  # never inflated: 61 KB of gzip is no JSON
        await dify.parameters()
    canary.routes["/v1/parameters"] = Route(body=json.dumps({"opening_statement": "x" * (2 << 20)}).encode())
    with pytest.raises(DifyError, match="more than 1048576 bytes"):
        await dify.parameters()
    canary.routes["/v1/info"] = Route(body=DEEP)
    with pytest.raises(DifyError, match="not JSON"):
        await dify.info()
    canary.routes["/v1/chat-messages"] = Route(body=b"data: " + DEEP + b"\n\n",
                                               headers={"Content-Type": "text/event-stream"})
    with pytest.raises(DifyStreamError, match="not JSON"):
        async for _ in dify.chat_stream(query="q", user="u"):
            pass


@pytest.mark.gen_test(timeout=60)
async def test_sign_in_refuses_bombs_and_deep_json(canary: Canary) -> None:
    config = make_config(auth_url=canary.url("/sign-in"))
    users = MemoryUserStore()
    await users.add(User("zhangsan", code="E1001", secret="s3cret"))
    service = AuthService(config, users, MemoryTokenCache(), make_outbound())
    try:
        for route in (Route(body=gzip_bomb(60 << 20), headers={"Content-Encoding": "gzip"}), Route(body=DEEP),
                      Route(body=b'{"token": "' + b"t" * (2 << 20) + b'"}')):
            canary.routes["/sign-in"] = route
            with pytest.raises(AuthUnavailable):
                await service.resolve(bot(config, "token"), "zhangsan")
        assert service.stats["failed"] == 3
    finally:
        await service.close()
        service.http.close()


@pytest.mark.gen_test(timeout=60)
async def test_response_url_answers_that_are_deep_or_huge_are_no_crash(canary: Canary) -> None:
    outbound = Outbound(trusted=["127.0.0.1"], response_url=HostAllowlist("response_url", ("127.0.0.1",)))
    try:
        for body in (DEEP, b'{"errcode": 0, "x": "' + b"x" * (2 << 20) + b'"}'):
            canary.routes["/r"] = Route(body=body)
            assert await post_markdown(outbound, canary.url("/r"), "答案", retries=1) is False
    finally:
        outbound.close()


# ------------------------------------------------------------------------------- callback input

@pytest.mark.gen_test(timeout=30)
async def test_timestamps_are_ascii_digits_only(svc: Service) -> None:
    params, body = CRYPTO.seal_callback(message("你好"))
    for bad in ("²", "9" * 5000, "-1", "1e3", "٣"):
        response = await svc.wecom.raw(dict(params, timestamp=bad), body)
        assert response.code == 400, (bad, response.code)
    assert svc.dify.chat_calls == []


def sealed_raw(plaintext: bytes) -> tuple[dict[str, str], bytes]:
    """A correctly signed callback whose decrypted JSON is exactly ``plaintext``."""
    encrypt = CRYPTO.encrypt(plaintext)
    timestamp, nonce = str(int(time.time())), os.urandom(4).hex()
    params = {"msg_signature": CRYPTO.sign(timestamp, nonce, encrypt), "timestamp": timestamp, "nonce": nonce}
    return params, json.dumps({"encrypt": encrypt}).encode()


@pytest.mark.settings(store="redis")
@pytest.mark.gen_test(timeout=30)
async def test_signed_but_malformed_callbacks_are_refused_without_state(svc: Service) -> None:
    lone_surrogate = json.dumps(message("你好", user="\ud800")).encode()  # ensure_ascii escapes it: "\ud800"
    assert b"\\ud800" in lone_surrogate
    feedback = {"msgid": "m", "aibotid": "B", "chattype": "single", "from": {"userid": "zhangsan"},
                "msgtype": "event", "event": {"eventtype": "feedback_event",
                                              "feedback_event": {"id": "x", "type": 2,
                                                                 "inaccurate_reason_list": 7}}}
    for plaintext in (lone_surrogate, json.dumps(message("你好", user="u" * 65)).encode(),
                      json.dumps(message("你好", chattype="group\nx")).encode(),
                      json.dumps(message("", msgtype="mixed", mixed={"msg_item": {"a": 1}})).encode(),
                      json.dumps(message("", msgtype="image", image={"url": "https://x/y", "aeskey": 5})).encode(),
                      json.dumps(message("这个呢", quote={"msgtype": "text", "text": {"content": ["x"]}})).encode(),
                      json.dumps(feedback).encode()):
        response = await svc.wecom.raw(*sealed_raw(plaintext))
        assert response.code == 400, plaintext[:80]
    assert svc.dify.chat_calls == [] and await svc.keys() == []
    polls = await answer(svc, message("你好", user="u" * 64))  # the longest userid WeCom gives
    assert polls[-1]["content"] == Script().answer


@pytest.mark.gen_test(timeout=30)
async def test_welcome_survives_difys_odd_parameters(svc: Service) -> None:
    enter = {"msgid": "e1", "aibotid": "B", "chattype": "single", "from": {"userid": "zhangsan"},
             "msgtype": "event", "event": {"eventtype": "enter_chat"}}
    svc.dify.parameters = {"opening_statement": "欢迎！", "suggested_questions": 5}
    reply = await svc.wecom.post(enter)
    assert reply == {"msgtype": "text", "text": {"content": "欢迎！"}}


@pytest.mark.gen_test(timeout=30)
async def test_a_mixed_message_with_too_many_images_is_refused(svc: Service) -> None:
    urls = [svc.dify.serve(f"img-{i}", CRYPTO.encrypt_media(PNG)) for i in range(11)]
    polls = await answer(svc, mixed("这些图", *urls))
    assert polls[-1] == {**polls[-1], "content": texts.TOO_MANY_IMAGES, "finish": True}
    assert svc.dify.chat_calls == [] and svc.dify.uploads == []


# ----------------------------------------------------------------------------------- sign-in TTL

@pytest.mark.gen_test(timeout=30)
async def test_the_auth_services_token_lifetime_is_capped(redis_url: str) -> None:
    stub = AuthStub()
    await stub.start()
    stub.answer = Answer(ttl=1e300)
    config: Config = make_config(auth_url=stub.url, redis_url=redis_url, auth_max_ttl=7200.0)
    users = MemoryUserStore()
    await users.add(User("zhangsan", code="E1001", secret="s3cret"))
    tokens = RedisTokenCache(redis_url)
    service = AuthService(config, users, tokens, make_outbound())
    try:
        credential = await service.resolve(bot(config, "token"), "zhangsan")
        assert credential.token in stub.issued
        ttl = await tokens.client.pttl("authorization:wechatid:zhangsan")
        assert 0 < ttl <= 7200 * 1000
    finally:
        await service.close()
        service.http.close()
        await stub.stop()


# ----------------------------------------------------------------------------- what operators see

@pytest.mark.gen_test(timeout=30)
async def test_dify_error_codes_are_known_labels_only(svc: Service) -> None:
    evil = json.dumps({"code": "evil_code_" + os.urandom(4).hex(), "message": "no", "status": 400}).encode()
    svc.dify.push(Script(http_status=400, error_body=evil), Script(http_status=429))
    for _ in range(2):
        await answer(svc, message("你好"))
    metrics = (await svc.wecom.http.fetch(svc.wecom.base_url + "/metrics")).body.decode()
    assert 'laibao_dify_errors_total{bot="default",code="other"} 1.0' in metrics
    assert 'code="too_many_requests"} 1.0' in metrics
    assert "evil_code" not in metrics


@pytest.mark.settings(store="dead")
@pytest.mark.gen_test(timeout=30)
async def test_readyz_names_the_failing_part_without_details(svc: Service, caplog: pytest.LogCaptureFixture) -> None:
    port = str(urlsplit(svc.redis_url).port)  # nothing listens there
    response = await svc.wecom.http.fetch(svc.wecom.base_url + "/readyz", raise_error=False)
    assert (response.code, response.body) == (503, b"redis: unavailable\n")
    assert any(port in r.getMessage() for r in caplog.records if r.name == "laibao.health")


@pytest.mark.slow
@pytest.mark.gen_test(timeout=60)
async def test_text_from_upstream_cannot_forge_log_lines(io_loop: IOLoop, tmp_path: Path) -> None:
    dify = Canary()
    await dify.start()
    forged = "bad input\nCRITICAL laibao.app: forged \x1b[2K line"
    error = {"event": "error", "code": "completion_request_error", "status": 400, "message": forged}
    dify.routes["/v1/chat-messages"] = Route(body=b"data: " + json.dumps(error).encode() + b"\n\n",
                                             headers={"Content-Type": "text/event-stream"})
    proc = LaibaoProcess(tmp_path, "node-log", {"LAIBAO_DIFY_URL": dify.url("/v1"), "LAIBAO_DIFY_KEY": "app-k"})
    http = AsyncHTTPClient(force_instance=True)
    try:
        await proc.ready(http)
        wecom = WeCom(http, proc.base_url)
        first = await wecom.stream(message("你好"))
        await follow([wecom], str(first["id"]))
        await eventually(lambda: "forged" in proc.log(), "the Dify error in the log")
        lines = proc.log().splitlines()
        assert not any(line.startswith("CRITICAL") for line in lines)
        assert any("bad input\\nCRITICAL laibao.app: forged \\x1b[2K line" in line for line in lines)
    finally:
        proc.close()
        http.close()
        await dify.stop()


def test_allowlist_entries_are_checked_at_start() -> None:
    config = service_config("http://127.0.0.1:9/v1", "", wecom_media_hosts="media.example.com:443,*.corp.lan")
    assert config.wecom_media_hosts == ("media.example.com:443", "*.corp.lan")
    with pytest.raises(Exception, match="wecom_media_hosts: 'http://x/y' is not a host"):
        service_config("http://127.0.0.1:9/v1", "", wecom_media_hosts="http://x/y")
