"""A stand-in for a company's auth service: real HTTP on 127.0.0.1, scripted answers, recorded calls.

    stub = AuthStub(accounts={"c-zhangsan": "the-secret"})
    await stub.start()
    stub.answer = Answer(delay=2.0)             # how to answer from now on (default: a fresh token)
    ... point laibao at stub.url ...
    stub.calls[-1].json                         # what the service received
    stub.issued                                 # every token it handed out
    await stub.stop()                           # also "down": nothing listens on the port any more

By default it checks the code and secret against ``accounts`` (401 on a mismatch) and answers
``{"token": ..., "expires_in": ...}``; ``Answer`` changes the field paths (nested, e.g. "data.token"),
the lifetime, the status, a delay, or sends garbage instead of JSON.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import secrets
import socket
from dataclasses import dataclass, field
from typing import Any

import tornado.httpserver
import tornado.netutil
import tornado.web

from laibao.auth import lookup, nest
from laibao.config import BotConfig, Config
from laibao.crypto import generate_aes_key, generate_token

# base64 of 32 bytes, as LAIBAO_SECRET_KEY holds it
SECRET_KEY = base64.b64encode(bytes(range(32))).decode()


def make_config(**overrides: Any) -> Config:
    """A Config with three bots, one per auth mode ("open", "allowlist", "token"), and ``overrides``."""
    bots = tuple(
        BotConfig(name=mode, token=generate_token(), aes_key=generate_aes_key(), dify_url="http://127.0.0.1:9/v1",
                  dify_key="app-test-key", auth=mode)
        for mode in ("open", "allowlist", "token")
    )
    values: dict[str, Any] = {"auth_url": "http://127.0.0.1:9/api/sign-in", "auth_timeout": 2.0,
                              "secret_key": SECRET_KEY}
    values.update(overrides)
    return Config(bots=bots, **values)


def bot(config: Config, mode: str) -> BotConfig:
    """The bot of ``make_config`` using ``mode``."""
    return next(b for b in config.bots if b.auth == mode)


@dataclass
class Answer:
    """How the stub answers each sign-in."""

    status: int = 200
    token_field: str = "token"  # dotted paths nest: "data.token" -> {"data": {"token": ...}}
    ttl_field: str = "expires_in"
    ttl: Any = 3600  # None leaves the lifetime out
    delay: float = 0.0  # seconds before answering
    hold: asyncio.Event | None = None  # answer only once this is set (or the stub stops)
    token: str | None = None  # hand out exactly this token (still recorded in ``issued``)
    redirect: str | None = None  # a path on the stub: other paths answer 307 to it, it answers as usual
    garbage: bool = False  # an HTML error page with status 200 instead of JSON
    omit_token: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # more fields in the answer


@dataclass
class Call:
    """One request the stub received."""

    path: str
    headers: dict[str, str]
    body: bytes
    json: Any


class AuthStub:
    """The stand-in auth service on the current IOLoop."""

    def __init__(
        self,
        accounts: dict[str, str] | None = None,
        *,
        code_field: str = "code",
        secret_field: str = "secret",
    ) -> None:
        self.accounts = dict(accounts or {})  # code -> secret; an empty dict accepts anyone
        self.code_field = code_field
        self.secret_field = secret_field
        self.answer = Answer()
        self.calls: list[Call] = []
        self.issued: list[str] = []
        self._counter = itertools.count(1)
        self._server: tornado.httpserver.HTTPServer | None = None
        self._port = 0
        self._stopping = asyncio.Event()
        self._active = 0

    async def start(self) -> None:
        """Listen on a free port of 127.0.0.1 (the same one again after ``stop``)."""
        app = tornado.web.Application([(r"/.*", _SignInHandler, {"stub": self})])
        sockets = tornado.netutil.bind_sockets(self._port, "127.0.0.1", family=socket.AF_INET)
        self._port = int(sockets[0].getsockname()[1])
        self._server = tornado.httpserver.HTTPServer(app)
        self._server.add_sockets(sockets)
        self._stopping = asyncio.Event()

    async def stop(self) -> None:
        """Stop listening, end delayed answers at once and close every connection."""
        self._stopping.set()
        if self._server is not None:
            self._server.stop()
            await self._server.close_all_connections()
            self._server = None
        for _ in range(500):  # delayed handlers leave within a loop turn or two once released
            if not self._active:
                break
            await asyncio.sleep(0.01)

    @property
    def url(self) -> str:
        """The sign-in URL to configure as auth_url."""
        return f"http://127.0.0.1:{self._port}/api/sign-in"

    def token(self) -> str:
        """A fresh token, remembered in ``issued``."""
        token = f"tok-{next(self._counter)}-{secrets.token_urlsafe(12)}"
        self.issued.append(token)
        return token


class _SignInHandler(tornado.web.RequestHandler):
    def initialize(self, stub: AuthStub) -> None:
        self.stub = stub

    def check_xsrf_cookie(self) -> None:
        """An API: no XSRF check."""

    async def post(self) -> None:
        stub = self.stub
        try:
            parsed: Any = json.loads(self.request.body)
        except ValueError:
            parsed = None
        stub.calls.append(Call(self.request.path, dict(self.request.headers), self.request.body, parsed))
        stub._active += 1
        try:
            answer = stub.answer
            if answer.hold is not None:
                stopping = asyncio.ensure_future(stub._stopping.wait())
                released = asyncio.ensure_future(answer.hold.wait())
                await asyncio.wait({stopping, released}, return_when=asyncio.FIRST_COMPLETED)
                stopping.cancel()
                released.cancel()
                if stub._stopping.is_set():
                    return
            if answer.delay:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(answer.delay):
                        await stub._stopping.wait()
                if stub._stopping.is_set():
                    return
            self._answer(answer, parsed)
        finally:
            stub._active -= 1

    def _answer(self, answer: Answer, parsed: Any) -> None:
        stub = self.stub
        if stub.accounts:
            code = lookup(parsed, stub.code_field)
            if not isinstance(code, str) or stub.accounts.get(code) != lookup(parsed, stub.secret_field):
                self.set_status(401)
                self.finish({"error": "invalid code or secret"})
                return
        if answer.redirect is not None and self.request.path != answer.redirect:
            self.redirect(f"http://127.0.0.1:{stub._port}{answer.redirect}", status=307)
            return
        if answer.garbage:
            self.set_header("Content-Type", "text/html")
            self.finish("<html><body>502 Bad Gateway</body></html>")
            return
        self.set_status(answer.status)
        if answer.status >= 400:
            self.finish({"error": f"status {answer.status}"})
            return
        body: dict[str, Any] = dict(answer.extra)
        if not answer.omit_token:
            token = stub.token() if answer.token is None else answer.token
            if answer.token is not None:
                stub.issued.append(token)
            nest(body, answer.token_field, token)
        if answer.ttl is not None:
            nest(body, answer.ttl_field, answer.ttl)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(body))
