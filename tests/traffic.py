"""A steady stream of WeCom conversations against a deployment, with a tally of what users saw."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from tornado.httpclient import AsyncHTTPClient, HTTPClientError

from laibao.errors import LaibaoError
from tests.difystub import Script
from tests.harness import CRYPTO, WeCom, message, refresh

PLACEHOLDER = "正在思考…"


def answer_to(query: str) -> str:
    """The answer the Dify stand-in gives to ``query``: each question has its own, so a mix-up shows."""
    return f"关于「{query}」：" + "这是一段逐字生成的回答，" * 4 + "完。"


def scripted(query: str, delay: float = 0.02) -> Script:
    """A streamed answer to ``query`` taking about a second (``delay`` between the stand-in's writes)."""
    return Script(answer=answer_to(query), cut=(64,), delay=delay)


class Unavailable(Exception):
    """No process answered (connection refused or reset): WeCom tries the request again."""


@dataclass
class Tally:
    """What the users saw over the whole run."""

    requests: int = 0
    failures: list[str] = field(default_factory=list)  # requests that got no good reply
    unavailable: int = 0  # requests nobody answered, retried (only where the test allows it)
    answers: int = 0  # conversations that finished with the right answer
    wrong: list[str] = field(default_factory=list)  # finished with another answer
    longest_stall: float = 0.0  # the longest a user waited for anything new on the screen

    def figures(self) -> str:
        """One line for the test log and the README."""
        return (f"requests={self.requests} failures={len(self.failures)} unavailable={self.unavailable} "
                f"answers={self.answers} wrong={len(self.wrong)} longest_stall={self.longest_stall:.2f}s")


class User:
    """One WeCom user talking to the bot through ``base_url``, as WeCom's servers would on their behalf."""

    def __init__(self, http: AsyncHTTPClient, base_url: str, name: str, tally: Tally, *,
                 interval: float = 0.2, retry_unavailable: bool = False) -> None:
        self.wecom = WeCom(http, base_url)
        self.name = name
        self.tally = tally
        self.interval = interval
        self.retry_unavailable = retry_unavailable
        self.finished = 0

    async def request(self, payload: dict[str, Any]) -> dict[str, Any]:
        """POST one callback; the reply's stream object (a failure is tallied and raised)."""
        while True:
            self.tally.requests += 1
            params, body = CRYPTO.seal_callback(payload)
            try:
                response = await self.wecom.raw(params, body)
            except (OSError, HTTPClientError) as exc:  # refused, reset, or closed without an answer (599)
                if not self.retry_unavailable:
                    self.tally.failures.append(f"{self.name}: {exc!r}")
                    raise
                self.tally.unavailable += 1
                await asyncio.sleep(self.interval)
                continue
            try:
                if response.code != 200 or not response.body:
                    raise LaibaoError(f"HTTP {response.code} {response.body[:100]!r}")
                reply = CRYPTO.open_reply(response.body, expected_nonce=params["nonce"])
                if reply.get("msgtype") != "stream":
                    raise LaibaoError(f"not a stream reply: {reply}")
            except LaibaoError as exc:
                self.tally.failures.append(f"{self.name}: {exc}")
                raise
            stream: dict[str, Any] = reply["stream"]
            return stream

    async def converse(self, query: str, window: float = 120.0) -> None:
        """Send ``query``, poll until finish, and tally the answer and the longest wait for progress."""
        last_progress = time.monotonic()
        stream = await self.request(message(query, user=self.name))
        sid, shown = stream["id"], PLACEHOLDER
        deadline = last_progress + window
        while True:
            content = str(stream.get("content", ""))
            now = time.monotonic()
            if content != shown or stream.get("finish"):
                self.tally.longest_stall = max(self.tally.longest_stall, now - last_progress)
                last_progress, shown = now, content
            if stream.get("finish"):
                break
            if now > deadline:
                self.tally.wrong.append(f"{self.name}: {query!r} did not finish within {window} s")
                return
            await asyncio.sleep(self.interval)
            stream = await self.request(refresh(sid, user=self.name))
            if stream.get("id") != sid:
                self.tally.wrong.append(f"{self.name}: a poll for {sid} was answered for {stream.get('id')}")
                return
        if shown == answer_to(query):
            self.tally.answers += 1
            self.finished += 1
        else:
            self.tally.wrong.append(f"{self.name}: {query!r} ended with {shown[:80]!r}")

    async def talk(self, stop: asyncio.Event) -> None:
        """Ask one question after the other until ``stop`` is set (the last conversation is finished)."""
        turn = 0
        while not stop.is_set():
            turn += 1
            await self.converse(f"{self.name} 的第 {turn} 个问题")
