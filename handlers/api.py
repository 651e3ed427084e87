"""POST /api/send: a markdown message through a websocket bot's connection, wherever in the cluster it is held."""

from __future__ import annotations

import hmac
import json
import logging

import tornado.web

from handlers.base import BaseHandler
from laibao.errors import LongConnectionError, StoreError
from laibao.wecom import MAX_CONTENT_BYTES

log = logging.getLogger("laibao.api")


class SendHandler(BaseHandler):
    """Check the bearer and the body, hand the message to the long connections, answer WeCom's errcode."""

    def _check_bearer(self) -> None:
        key = self.runtime.config.api_key
        if not key:
            raise tornado.web.HTTPError(404, "/api/send is off (no api_key)")
        header = self.request.headers.get("Authorization", "")
        given = header[7:].strip() if header[:7].lower() == "bearer " else ""
        # Constant time: the comparison must not tell how much of a guessed key was right.
        if not hmac.compare_digest(given.encode("utf-8"), key.encode("utf-8")):
            raise tornado.web.HTTPError(401, "bad or missing bearer")

    def _read_body(self) -> tuple[str, str, str]:
        if len(self.request.body) > self.runtime.config.max_body_bytes:
            raise tornado.web.HTTPError(413, "body too large")
        try:
            body = json.loads(self.request.body)
        except ValueError as exc:
            raise tornado.web.HTTPError(400, "body is not JSON") from exc
        if not isinstance(body, dict):
            raise tornado.web.HTTPError(400, "body is not a JSON object")
        bot, chatid, markdown = body.get("bot", ""), body.get("chatid"), body.get("markdown")
        if not isinstance(bot, str) or not isinstance(chatid, str) or not isinstance(markdown, str):
            raise tornado.web.HTTPError(400, "bot, chatid and markdown must be strings")
        if not chatid.strip() or not markdown.strip():
            raise tornado.web.HTTPError(400, "chatid and markdown must not be empty")
        if len(markdown.encode("utf-8")) > MAX_CONTENT_BYTES:
            raise tornado.web.HTTPError(400, "markdown over WeCom's 20480 bytes")
        config = next((b for b in self.runtime.config.bots if bot in (b.name, b.key)), None)
        if config is None or not config.websocket:
            raise tornado.web.HTTPError(404, "no websocket bot named %r", bot[:64])
        return config.key, chatid.strip(), markdown

    async def post(self) -> None:
        """Send and answer ``{"errcode", "errmsg"}``: 200 when WeCom accepted, 502 when it refused, 503 when
        no process holds the bot's connection."""
        self._check_bearer()
        bot, chatid, markdown = self._read_body()
        try:
            errcode, errmsg = await self.runtime.ws.send(bot, chatid, markdown)
        except (LongConnectionError, StoreError) as exc:
            log.warning("api send for bot %s failed: %s", bot, exc)
            raise tornado.web.HTTPError(503, "no connection to WeCom: %s", exc) from exc
        self.set_status(200 if errcode == 0 else 502)
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(json.dumps({"errcode": errcode, "errmsg": errmsg[:200]}, ensure_ascii=False))
