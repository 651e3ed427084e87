"""GET|POST /wecom/callback[/{bot}]: WeCom's URL verification, message callbacks and refresh polls."""

from __future__ import annotations

import json
import logging
import time

import tornado.web

from handlers.base import BaseHandler
from laibao.errors import CallbackError, CryptoError
from laibao.runtime import BotRuntime
from laibao.wecom import parse_callback
from stores.numbers import ascii_digits

log = logging.getLogger("laibao.callback")



@tornado.web.stream_request_body
class CallbackHandler(BaseHandler):
    """Parse and verify the request, hand the callback to the bot's service, seal its reply."""

    def initialize(self) -> None:
        """Reset the per-request state."""
        self._body = bytearray()
        self._too_large = False
        self._bot_key = "-"
        self._kind = "invalid"  # until the callback is verified and parsed

    def on_finish(self) -> None:
        """Count the callback by kind and outcome."""
        status = self.get_status()
        outcome = "ok" if status < 400 else ("refused" if status < 500 else "error")
        self.runtime.metrics.callbacks.labels(self._bot_key, self._kind, outcome).inc()
        self.runtime.metrics.callback_seconds.labels(self._kind).observe(self.request.request_time())

    def prepare(self) -> None:
        """Refuse an oversized body before reading it."""
        limit = self.runtime.config.max_body_bytes
        length = self.request.headers.get("Content-Length")
        if self.request.method != "POST" or length is None:
            return
        if not ascii_digits(length, 20):  # "²" would be a 500 from int(), not a 400
            raise tornado.web.HTTPError(400, "Content-Length is not a number")
        if int(length) > limit:
            raise tornado.web.HTTPError(413, "callback body of %s bytes refused", length)

    def data_received(self, chunk: bytes) -> None:
        """Buffer the body up to the limit; a chunked body past it is dropped and refused later."""
        if len(self._body) + len(chunk) > self.runtime.config.max_body_bytes:
            self._too_large = True
            self._body.clear()
        elif not self._too_large:
            self._body.extend(chunk)

    def _bot(self, name: str) -> BotRuntime:
        bot = self.runtime.bots.get(name)
        if bot is None:
            raise tornado.web.HTTPError(404, "no bot named %r", name)
        if bot.config.websocket:
            # WeCom sends this bot's messages over the long connection; it has no callback URL.
            raise tornado.web.HTTPError(404, "bot %r runs in websocket mode", name)
        self._bot_key = bot.config.key
        return bot

    def _check_timestamp(self, timestamp: str) -> None:
        """Refuse callbacks stamped far from now: a captured request cannot be replayed days later."""
        if not ascii_digits(timestamp, 12):
            raise tornado.web.HTTPError(400, "timestamp is not a number of at most 12 digits")
        skew = abs(time.time() - int(timestamp))
        if skew > self.runtime.config.max_clock_skew:
            raise tornado.web.HTTPError(401, "timestamp %.0f s away from now", skew)

    def _params(self, *names: str) -> list[str]:
        values = [self.get_query_argument(name, "") for name in names]
        if not all(values):
            raise tornado.web.HTTPError(400, "missing query parameter among %s", ",".join(names))
        return values

    def _refuse(self, exc: CryptoError, bot: BotRuntime) -> tornado.web.HTTPError:
        status = 401 if exc.code == CryptoError.SIGNATURE_INVALID else 400
        return tornado.web.HTTPError(status, "bot %s: %s", bot.config.key, exc)

    def get(self, name: str = "") -> None:
        """URL verification: answer with the decrypted echostr in plain text, nothing else."""
        bot = self._bot(name)
        signature, timestamp, nonce, echostr = self._params("msg_signature", "timestamp", "nonce", "echostr")
        self._kind = "verify"
        self._check_timestamp(timestamp)
        try:
            plaintext = bot.crypto.verify_url(signature, timestamp, nonce, echostr)
        except CryptoError as exc:
            raise self._refuse(exc, bot) from exc
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.finish(plaintext.encode("utf-8"))

    async def post(self, name: str = "") -> None:
        """A message, event or refresh poll: reply with a sealed payload or an empty 200."""
        if self._too_large:
            raise tornado.web.HTTPError(413, "chunked callback body over the limit")
        bot = self._bot(name)
        signature, timestamp, nonce = self._params("msg_signature", "timestamp", "nonce")
        self._check_timestamp(timestamp)
        try:
            payload = bot.crypto.open_callback(signature, timestamp, nonce, bytes(self._body))
            callback = parse_callback(payload)
            self._kind = _metric_kind(callback.event_type if callback.msgtype == "event" else callback.msgtype)
        except CryptoError as exc:
            raise self._refuse(exc, bot) from exc
        except CallbackError as exc:
            raise tornado.web.HTTPError(400, "bot %s: %s", bot.config.key, exc) from exc
        reply = await bot.service.on_callback(callback)
        if reply is None:
            self.finish()
            return
        sealed = bot.crypto.seal_reply(reply, nonce)
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(json.dumps(sealed, separators=(",", ":")))


# The callback kinds counted by name; anything else is "other", so input cannot grow the label set.
_KINDS = frozenset({"text", "voice", "mixed", "image", "file", "video", "stream",
                    "enter_chat", "feedback_event", "template_card_event"})


def _metric_kind(kind: str) -> str:
    return kind if kind in _KINDS else "other"
