"""Playing WeCom against laibao in tests: in-process apps and real `laibao serve` processes."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from tornado.httpclient import AsyncHTTPClient, HTTPResponse

from laibao.crypto import WeComCrypto, generate_aes_key, generate_token
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

    def __init__(self, workdir: Path, name: str, env: Mapping[str, str]) -> None:
        self.port = free_port()
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
