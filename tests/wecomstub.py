"""A stand-in for WeCom's response_url endpoint: records active replies, can fail on purpose."""

from __future__ import annotations

import json
from typing import Any

import tornado.httpserver
import tornado.web

from tests.servers import free_port


class ResponseUrlStub:
    """POST /cgi-bin/aibot/response?response_code=... records the JSON and answers {"errcode": 0}."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []  # every JSON body, in order
        self.fail_next: list[int] = []  # HTTP statuses to answer with before succeeding
        self.attempts = 0  # every POST, failed ones included
        self._port = free_port()
        self._server: tornado.httpserver.HTTPServer | None = None

    def url(self, code: str = "x") -> str:
        """A response_url as WeCom puts it in a callback."""
        return f"http://127.0.0.1:{self._port}/cgi-bin/aibot/response?response_code={code}"

    def contents(self) -> list[str]:
        """The markdown contents delivered."""
        return [body["markdown"]["content"] for body in self.received]

    async def start(self) -> None:
        """Listen on the current IOLoop."""
        app = tornado.web.Application([(r"/cgi-bin/aibot/response", _Handler, {"stub": self})])
        self._server = tornado.httpserver.HTTPServer(app)
        self._server.listen(self._port, address="127.0.0.1")

    async def stop(self) -> None:
        """Stop listening and close connections."""
        if self._server is not None:
            self._server.stop()
            await self._server.close_all_connections()


class _Handler(tornado.web.RequestHandler):
    def initialize(self, stub: ResponseUrlStub) -> None:
        self.stub = stub

    def check_xsrf_cookie(self) -> None:
        """WeCom's endpoint takes plain JSON posts."""

    def post(self) -> None:
        self.stub.attempts += 1
        if self.stub.fail_next:
            self.set_status(self.stub.fail_next.pop(0))
            self.finish("temporarily unavailable")
            return
        self.stub.received.append(json.loads(self.request.body))
        self.finish({"errcode": 0, "errmsg": "ok"})
