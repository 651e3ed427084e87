"""Playing WeCom against laibao in tests: in-process apps and real `laibao serve` processes."""

from __future__ import annotations

import asyncio
import inspect
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
import redis.asyncio
import tornado.httpserver
from tornado.httpclient import AsyncHTTPClient, HTTPResponse
from tornado.ioloop import IOLoop

from laibao.app import make_server
from laibao.config import Config, load_config
from laibao.crypto import WeComCrypto, generate_aes_key, generate_token
from laibao.outbound import origin_entry
from laibao.runtime import Runtime
from tests.difystub import DifyStub
from tests.servers import free_port

TOKEN = generate_token()
AES_KEY = generate_aes_key()
CRYPTO = WeComCrypto(TOKEN, AES_KEY)


def message(text: str, user: str = "zhangsan", msgid: str | None = None, **extra: Any) -> dict[str, Any]:
    """Decrypted JSON of a text message callback, as WeCom sends it."""
    payload: dict[str, Any] = {
        "msgid": msgid or os.urandom(8).hex(),
        "aibotid": "AIBOT",
        "chattype": "single",
        "from": {"userid": user},
        "response_url": "https://qyapi.weixin.qq.com/cgi-bin/aibot/response?response_code=x",
        "msgtype": "text",
        "text": {"content": text},
    }
    payload.update(extra)
    return payload


def refresh(stream_id: str, user: str = "zhangsan") -> dict[str, Any]:
    """Decrypted JSON of a stream refresh poll."""
    return {"msgid": os.urandom(8).hex(), "aibotid": "AIBOT", "chattype": "single",
            "from": {"userid": user}, "msgtype": "stream", "stream": {"id": stream_id}}


@dataclass
class WeCom:
    """Posts sealed callbacks to one laibao base URL and opens (and checks) the replies."""

    http: AsyncHTTPClient
    base_url: str
    path: str = "/wecom/callback"
    crypto: WeComCrypto = CRYPTO
    replies: list[dict[str, Any]] = field(default_factory=list)

    async def raw(self, params: Mapping[str, str], body: bytes | None, method: str = "POST",
                  headers: Mapping[str, str] | None = None) -> HTTPResponse:
        """One request exactly as given; HTTP errors come back as responses."""
        return await self.http.fetch(
            f"{self.base_url}{self.path}?{urlencode(params)}", method=method, body=body,
            headers=dict(headers or {}), raise_error=False, request_timeout=20,
        )

    async def post(self, payload: Mapping[str, Any]) -> dict[str, Any] | None:
        """Seal ``payload``, POST it, verify the reply's signature and nonce, return its plaintext."""
        params, body = self.crypto.seal_callback(payload)
        response = await self.raw(params, body)
        assert response.code == 200, (response.code, response.body)
        if not response.body:
            return None
        reply = self.crypto.open_reply(response.body, expected_nonce=params["nonce"])
        self.replies.append(reply)
        return reply

    async def stream(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        """POST and return the reply's ``stream`` object (asserting it is a stream reply)."""
        reply = await self.post(payload)
        assert reply is not None and reply["msgtype"] == "stream", reply
        stream: dict[str, Any] = reply["stream"]
        return stream


async def eventually(check: Callable[[], Awaitable[bool] | bool], what: str, tries: int = 400) -> None:
    """Re-check ``check`` every 50 ms until it holds; fail naming ``what`` after ``tries`` checks."""
    for _ in range(tries):
        result = check()
        if await result if inspect.isawaitable(result) else result:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"never happened: {what}")


async def follow(wecoms: list[WeCom], stream_id: str, limit: int = 400, pause: float = 0.02) -> list[dict[str, Any]]:
    """Poll ``stream_id`` round-robin over ``wecoms`` until finish; every stream reply seen, in order."""
    seen = []
    for i in range(limit):
        stream = await wecoms[i % len(wecoms)].stream(refresh(stream_id))
        assert stream["id"] == stream_id
        seen.append(stream)
        if stream["finish"]:
            return seen
        await asyncio.sleep(pause)
    raise AssertionError(f"no finish after {limit} polls; last: {seen[-1]}")


class LaibaoProcess:
    """A real `laibao serve` process on a free port, logging to a file."""

    def __init__(self, workdir: Path, name: str, env: Mapping[str, str], port: int | None = None) -> None:
        self.port = port or free_port()
        self.name = name
        self.log_path = workdir / f"{name}.log"
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("LAIBAO_")}
        full_env.update(env)
        full_env.update({"LAIBAO_NODE_ID": name, "LAIBAO_PORT": str(self.port), "LAIBAO_HOST": "127.0.0.1",
                         "LAIBAO_WECOM_TOKEN": TOKEN, "LAIBAO_WECOM_AES_KEY": AES_KEY,
                         "PYTHONWARNINGS": "error"})
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "laibao.cli", "serve"], cwd=workdir, env=full_env,
            stdout=self._log, stderr=subprocess.STDOUT,
        )

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def ready(self, http: AsyncHTTPClient, within: float = 30.0) -> None:
        """Wait until /healthz answers (or fail with the process's log)."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited {self.proc.returncode}:\n{self.log()}")
            try:
                response = await http.fetch(self.base_url + "/healthz", raise_error=False, request_timeout=2)
            except OSError:
                pass  # not listening yet
            else:
                if response.code == 200:
                    return
            await asyncio.sleep(0.1)
        raise AssertionError(f"{self.name} not ready:\n{self.log()}")

    def log(self) -> str:
        """What the process wrote so far."""
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the process."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def close(self) -> None:
        """Stop the process if still running."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        self._log.close()


SECRETS = (TOKEN, AES_KEY, "app-test-key")


def assert_no_secrets(text: str, *also: str) -> None:
    """Fail if a log holds the bot's Token, EncodingAESKey, the Dify key or any of ``also``."""
    for secret in (*SECRETS, *also):
        assert secret not in text, f"a secret or message text leaked into the log: {secret[:4]}..."


@dataclass
class Cluster:
    """A Dify stand-in in the test process and two `laibao serve` processes sharing one Redis."""

    dify: DifyStub
    a: LaibaoProcess
    b: LaibaoProcess
    http: AsyncHTTPClient

    def wecom(self, proc: LaibaoProcess) -> WeCom:
        """A WeCom player aimed at one of the processes."""
        return WeCom(self.http, proc.base_url)


@contextmanager
def running_cluster(io_loop: IOLoop, redis_url: str, workdir: Path, **env: str) -> Iterator[Cluster]:
    """Start the stand-in and two processes (extra ``LAIBAO_*`` settings in ``env``); stop them after."""
    dify = DifyStub()
    io_loop.run_sync(dify.start)
    settings = {"LAIBAO_REDIS_URL": redis_url, "LAIBAO_DIFY_URL": dify.base_url, "LAIBAO_DIFY_KEY": "app-test-key",
                "LAIBAO_WECOM_MEDIA_HOSTS": origin_entry(dify.base_url), "LAIBAO_RESPONSE_URL_HOSTS": "127.0.0.1",
                **env}
    http = AsyncHTTPClient(force_instance=True)
    cluster = Cluster(dify, LaibaoProcess(workdir, "node-a", settings), LaibaoProcess(workdir, "node-b", settings),
                      http)
    try:
        io_loop.run_sync(lambda: asyncio.gather(cluster.a.ready(http), cluster.b.ready(http)))
        yield cluster
    finally:
        for proc in (cluster.a, cluster.b):
            proc.close()
        http.close()
        io_loop.run_sync(dify.stop)


@dataclass
class Service:
    """One in-process laibao with its Dify stand-in."""

    dify: DifyStub
    runtime: Runtime
    wecom: WeCom
    redis_url: str

    async def keys(self) -> list[str]:
        """Every Redis key laibao wrote (empty for the in-process store)."""
        if not self.redis_url:
            return []
        client = redis.asyncio.Redis.from_url(self.redis_url, decode_responses=True)
        try:
            return sorted(await client.keys("*"))
        finally:
            await client.aclose()


def service_config(dify_url: str, redis_url: str, **overrides: object) -> Config:
    env = {
        "LAIBAO_WECOM_TOKEN": TOKEN,
        "LAIBAO_WECOM_AES_KEY": AES_KEY,
        "LAIBAO_DIFY_URL": dify_url,
        "LAIBAO_DIFY_KEY": "app-test-key",
        "LAIBAO_REDIS_URL": redis_url,
        "LAIBAO_NODE_ID": "test-node",
        "LAIBAO_DIFY_IDLE_TIMEOUT": "1.5",
        "LAIBAO_DIFY_CONNECT_TIMEOUT": "2",
        # The stand-ins play WeCom's hosts: media come from the Dify stand-in, response_url stand-ins
        # listen on 127.0.0.1 ports of their own.
        "LAIBAO_WECOM_MEDIA_HOSTS": origin_entry(dify_url),
        "LAIBAO_RESPONSE_URL_HOSTS": "127.0.0.1",
    }
    env.update({f"LAIBAO_{k.upper()}": str(v) for k, v in overrides.items()})
    return load_config(environ=env, dotenv=None)


@contextmanager
def marked_service(request: pytest.FixtureRequest, io_loop: IOLoop, on_redis: bool,
                   **defaults: object) -> Iterator[Service]:
    """``running_service`` on Redis or the in-process store: ``defaults`` overridden by the test's
    ``settings`` marker, e.g. ``@pytest.mark.settings(max_relays=1)``."""
    redis_url = str(request.getfixturevalue("redis_url")) if on_redis else ""
    marker = request.node.get_closest_marker("settings")
    with running_service(io_loop, redis_url, **{**defaults, **(marker.kwargs if marker else {})}) as service:
        yield service


@contextmanager
def running_service(
    io_loop: IOLoop, redis_url: str, configure: Callable[[str], Config] | None = None, **overrides: object
) -> Iterator[Service]:
    """laibao in this process (in-process store when ``redis_url`` is empty) with a fresh Dify stand-in.

    ``configure(dify_base_url)`` builds the whole configuration instead of the single environment bot.
    """
    port = free_port()

    async def start() -> tuple[Service, tornado.httpserver.HTTPServer]:
        dify = DifyStub()
        await dify.start()
        config = configure(dify.base_url) if configure else service_config(dify.base_url, redis_url, **overrides)
        runtime = Runtime.build(config)
        await runtime.start()
        server = make_server(runtime)
        server.listen(port, address="127.0.0.1")
        http = AsyncHTTPClient(force_instance=True)
        return Service(dify, runtime, WeCom(http, f"http://127.0.0.1:{port}"), redis_url), server

    svc, server = io_loop.run_sync(start)

    async def stop() -> None:
        svc.wecom.http.close()
        server.stop()
        await svc.runtime.close(grace=5)
        await server.close_all_connections()
        await svc.dify.stop()

    try:
        yield svc
    finally:
        io_loop.run_sync(stop)
