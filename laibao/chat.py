"""`laibao chat`: play WeCom against a running laibao and print the answer as it grows."""

from __future__ import annotations

import asyncio
import json
import secrets
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO
from urllib.parse import urlencode

from tornado.httpclient import AsyncHTTPClient, HTTPClientError

from laibao.crypto import WeComCrypto
from laibao.errors import ChatError


class WeComPlayer:
    """Sends what WeCom sends (encrypted callbacks) and opens what laibao replies."""

    def __init__(self, crypto: WeComCrypto, url: str, http: AsyncHTTPClient, timeout: float = 10.0) -> None:
        self.crypto = crypto
        self.url = url
        self.http = http
        self.timeout = timeout

    async def post(self, payload: dict[str, Any]) -> dict[str, Any] | None:
        """POST one encrypted callback; the decrypted reply, or None for an empty 200."""
        params, body = self.crypto.seal_callback(payload)
        try:
            response = await self.http.fetch(
                f"{self.url}?{urlencode(params)}", method="POST", body=body,
                headers={"Content-Type": "application/json"},
                connect_timeout=self.timeout, request_timeout=self.timeout,
            )
        except HTTPClientError as exc:
            raise ChatError(f"laibao answered HTTP {exc.code}") from exc
        except OSError as exc:
            raise ChatError(f"cannot reach {self.url}: {exc}") from exc
        if not response.body:
            return None
        return self.crypto.open_reply(response.body, expected_nonce=params["nonce"])

    @staticmethod
    def callback(msgtype: str, body: dict[str, Any], user: str, group: str | None = None) -> dict[str, Any]:
        """The decrypted JSON of a callback of ``msgtype`` carrying ``body``, as WeCom builds it."""
        payload: dict[str, Any] = {
            "msgid": secrets.token_hex(16),
            "aibotid": "laibao-chat",
            "chattype": "group" if group else "single",
            "from": {"userid": user},
            "msgtype": msgtype,
            msgtype: body,
        }
        if group:
            payload["chatid"] = group
        return payload

    @classmethod
    def message(cls, text: str, user: str, group: str | None = None) -> dict[str, Any]:
        """A text message callback (WeCom gives it a response_url; the CLI has none to offer)."""
        return cls.callback("text", {"content": text}, user, group) | {"response_url": ""}

    @classmethod
    def refresh(cls, stream_id: str, user: str, group: str | None = None) -> dict[str, Any]:
        """A stream refresh poll."""
        return cls.callback("stream", {"id": stream_id}, user, group)


async def converse(
    player: WeComPlayer,
    text: str,
    user: str,
    group: str | None = None,
    interval: float = 1.0,
    window: float = 360.0,
    on_update: Callable[[str, bool], None] | None = None,
) -> str:
    """Send ``text``, follow the refresh polls until finish, and return the final content."""
    reply = await player.post(WeComPlayer.message(text, user, group))
    stream = _stream_of(reply)
    stream_id = stream["id"]
    placeholder = stream.get("content", "")
    deadline = time.monotonic() + window
    while True:
        content, finished = stream.get("content", ""), bool(stream.get("finish"))
        # The placeholder ("正在思考…") is not part of the answer: show nothing until Dify's words arrive.
        if on_update is not None and (finished or content != placeholder):
            on_update(content, finished)
        if finished:
            return str(content)
        if time.monotonic() > deadline:
            raise ChatError("no finish within WeCom's 6-minute window")
        await asyncio.sleep(interval)
        stream = _stream_of(await player.post(WeComPlayer.refresh(stream_id, user, group)))
        if stream.get("id") != stream_id:
            raise ChatError("a refresh was answered for another stream id")


def _stream_of(reply: dict[str, Any] | None) -> dict[str, Any]:
    if reply is None or reply.get("msgtype") != "stream" or not isinstance(reply.get("stream"), dict):
        raise ChatError(f"expected a stream reply, got {json.dumps(reply, ensure_ascii=False)[:200]}")
    stream: dict[str, Any] = reply["stream"]
    return stream


class Printer:
    """Prints a growing answer: only the new tail when it grew, the whole text when it was replaced."""

    def __init__(self, out: TextIO = sys.stdout) -> None:
        self.out = out
        self.shown = ""

    def __call__(self, content: str, finished: bool) -> None:
        if content.startswith(self.shown):
            self.out.write(content[len(self.shown):])
        else:
            self.out.write("\n[replaced]\n" + content)
        self.shown = content
        if finished:
            self.out.write("\n")
        self.out.flush()
