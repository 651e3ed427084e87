"""A Dify stand-in for tests: real HTTP on 127.0.0.1, real SSE framing, scripted answers.

    stub = DifyStub()
    await stub.start()
    stub.push(Script(answer="你好", stall_after=1))   # how to answer the next /chat-messages
    ...                                               # point laibao (or DifyClient) at stub.base_url
    stub.chat_calls[-1].json                          # what Dify received
    await stub.stop()

A script is consumed by each /chat-messages request that passes the stub's own checks (bearer key,
required fields, conversation ownership); requests refused by those checks do not consume one.

Standalone, for manual tries and benchmarks: ``python -m tests.difystub --port 8089 [--answer TEXT]``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import json
import socket
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import tornado.httpserver
import tornado.netutil
import tornado.web
from tornado.iostream import StreamClosedError

DEFAULT_ANSWER = "你好！这是来自 Dify 的回答。Hello from the stand-in."
PING = b"event: ping\n\n"
# Character counts the default answer is split into, cycled: deltas of varying size, as an LLM gives.
_DELTA_SIZES = (3, 1, 4, 1, 5, 9, 2, 6)
_DEFAULT_ERRORS = {
    400: ("invalid_param", "Bad request."),
    401: ("unauthorized", "Access token is invalid"),
    403: ("forbidden", "App is disabled."),
    404: ("not_found", "Not found."),
    429: ("too_many_requests", "Too many requests, please try again later."),
    500: ("internal_server_error", "Internal Server Error."),
}


@dataclass
class Script:
    """How to answer ONE /chat-messages request; the defaults give a normal streamed answer."""

    answer: str = DEFAULT_ANSWER
    deltas: list[str] | None = None  # explicit answer pieces; default: ``answer`` split into varying sizes
    cut: Sequence[int] = (1, 7, 3, 13, 2, 29, 5)  # sizes of the raw writes (cycled), each flushed
    event: str = "message"  # "agent_message" for agent apps
    ping_first: bool = True  # send "event: ping\n\n" first
    delay: float = 0.0  # seconds between writes
    first_byte_delay: float = 0.0  # seconds before anything (headers included) is sent
    http_status: int = 200  # >= 400: answer with ``error_body`` instead of a stream
    error_body: bytes | None = None  # default: Dify-style JSON for ``http_status``
    error_event: dict[str, Any] | None = None  # an ``error`` frame after the deltas instead of message_end
    replace_with: str | None = None  # a message_replace with this text after the deltas
    eof_without_end: bool = False  # end the body after the deltas with no terminal event
    stall_after: int | None = None  # after this many deltas go silent (connection open) until released
    malformed: bool = False  # a frame whose data is not JSON, after the deltas
    hold: asyncio.Event | None = None  # wait for it before the terminal event (lets tests poll mid-answer)
    ping_every: float = 0.0  # while waiting on ``hold``, send a ping every this many seconds (0: never)

    def pieces(self) -> list[str]:
        """The answer deltas this script sends."""
        if self.deltas is not None:
            return list(self.deltas)
        pieces: list[str] = []
        rest = self.answer
        for size in itertools.cycle(_DELTA_SIZES):
            if not rest:
                return pieces
            pieces.append(rest[:size])
            rest = rest[size:]
        raise AssertionError("unreachable")


@dataclass
class RecordedRequest:
    """One request as the stub received it."""

    method: str
    path: str
    headers: dict[str, str]
    json: Any  # the parsed body, or None when it was empty or not JSON


@dataclass
class _Run:
    """One streaming answer in progress."""

    task_id: str
    user: str
    released: asyncio.Event = field(default_factory=asyncio.Event)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    ending: str = ""  # "stopped" (by /stop), "gone" (client left), "closing" (stub stops)
    finished: bool = False  # the terminal event has been (or is being) sent

    def end(self, why: str) -> None:
        if not self.ending:
            self.ending = why
            self.ended.set()


class _Gone(Exception):
    """The client went away (or the stub is stopping): stop writing."""


class DifyStub:
    """An in-process Dify stand-in on the current IOLoop."""

    def __init__(self, api_key: str = "app-test-key") -> None:
        self.api_key = api_key
        self.default = Script()
        self.requests: list[RecordedRequest] = []
        self.stops: list[str] = []
        self.disconnects = 0
        self._scripts: collections.deque[Script] = collections.deque()
        self._conversations: dict[str, str] = {}  # conversation id -> user
        self._runs: dict[str, _Run] = {}
        self._server: tornado.httpserver.HTTPServer | None = None
        self._port = 0
        self._closing = False

    async def start(self, port: int = 0) -> None:
        """Listen on 127.0.0.1 (a free port unless ``port`` is given) on the current IOLoop."""
        app = tornado.web.Application(
            [
                (r"/v1/chat-messages", _ChatHandler, {"stub": self}),
                (r"/v1/chat-messages/([^/]+)/stop", _StopHandler, {"stub": self}),
                (r"/v1/info", _InfoHandler, {"stub": self}),
            ],
            default_handler_class=_NotFoundHandler,
            default_handler_args={"stub": self},
        )
        sockets = tornado.netutil.bind_sockets(port, "127.0.0.1", family=socket.AF_INET)
        self._port = int(sockets[0].getsockname()[1])
        self._server = tornado.httpserver.HTTPServer(app)
        self._server.add_sockets(sockets)
        self._closing = False

    async def stop(self) -> None:
        """Stop listening, end every open stream (releasing stalls and holds) and close connections."""
        self._closing = True
        for run in list(self._runs.values()):
            run.end("closing")
        if self._server is not None:
            self._server.stop()
            await self._server.close_all_connections()
            self._server = None
        for _ in range(500):  # handlers leave within a few loop turns once their runs are ended
            if not self._runs:
                break
            await asyncio.sleep(0.01)

    @property
    def base_url(self) -> str:
        """The Dify base URL to configure, ending in /v1."""
        return f"http://127.0.0.1:{self._port}/v1"

    @property
    def chat_calls(self) -> list[RecordedRequest]:
        """The POST /chat-messages requests received, in order."""
        return [r for r in self.requests if r.method == "POST" and r.path == "/v1/chat-messages"]

    def push(self, *scripts: Script) -> None:
        """Queue scripts for the next chat requests, in order (``default`` answers once they are used)."""
        self._scripts.extend(scripts)

    def release(self) -> None:
        """Let every stalled (or about to stall) open stream go on."""
        for run in self._runs.values():
            run.released.set()

    def forget_conversations(self) -> None:
        """Forget every conversation, as if they were deleted: their ids now answer 404."""
        self._conversations.clear()

    def _next_script(self) -> Script:
        return self._scripts.popleft() if self._scripts else self.default


class _StubHandler(tornado.web.RequestHandler):
    """Records the request and checks the bearer key."""

    def initialize(self, stub: DifyStub) -> None:
        self.stub = stub
        self.body_json: Any = None

    def prepare(self) -> None:
        try:
            self.body_json = json.loads(self.request.body) if self.request.body else None
        except ValueError:
            self.body_json = None
        self.stub.requests.append(
            RecordedRequest(self.request.method or "", self.request.path, dict(self.request.headers),
                            self.body_json)
        )
        if self.request.headers.get("Authorization", "") != f"Bearer {self.stub.api_key}":
            self.fail(401, "unauthorized", "Access token is invalid")

    def fail(self, status: int, code: str, message: str) -> None:
        """Answer the way Dify answers errors."""
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"code": code, "message": message, "status": status}))

    def check_xsrf_cookie(self) -> None:
        """An API, not a form: no XSRF."""


class _NotFoundHandler(_StubHandler):
    def prepare(self) -> None:
        super().prepare()
        if not self._finished:
            self.fail(404, "not_found", "The requested URL was not found on the server.")


class _InfoHandler(_StubHandler):
    def get(self) -> None:
        self.finish({"name": "stub", "mode": "chat"})


class _StopHandler(_StubHandler):
    def post(self, task_id: str) -> None:
        body = self.body_json if isinstance(self.body_json, dict) else {}
        user = body.get("user")
        if not isinstance(user, str) or not user:
            self.fail(400, "invalid_param", "user is required")
            return
        self.stub.stops.append(task_id)
        run = self.stub._runs.get(task_id)
        if run is not None and run.user == user:
            run.end("stopped")
        self.finish({"result": "success"})


class _ChatHandler(_StubHandler):
    run: _Run | None = None

    async def post(self) -> None:
        body = self.body_json
        if not isinstance(body, dict):
            self.fail(400, "invalid_param", "The request body must be a JSON object.")
            return
        for name in ("inputs", "query", "user"):
            if name not in body:
                self.fail(400, "invalid_param", f"{name} is required")
                return
        user = str(body["user"])
        conversation = str(body.get("conversation_id") or "")
        if conversation and self.stub._conversations.get(conversation) != user:
            self.fail(404, "not_found", "Conversation Not Exists.")
            return
        script = self.stub._next_script()
        writer = _CutWriter(self, script)
        try:
            if script.http_status >= 400:
                await self._error_answer(script, writer)
                return
            if not conversation:
                conversation = str(uuid.uuid4())
                self.stub._conversations[conversation] = user
            self.run = _Run(task_id=str(uuid.uuid4()), user=user)
            self.stub._runs[self.run.task_id] = self.run
            try:
                await self._stream(script, writer, self.run, conversation)
            finally:
                del self.stub._runs[self.run.task_id]
        except _Gone:
            return

    def on_connection_close(self) -> None:
        super().on_connection_close()
        self.gone()

    def gone(self) -> None:
        """The client left: count it once if the answer was not finished, and wake any wait."""
        run = self.run
        if run is None or run.ending:
            return
        if not run.finished:
            self.stub.disconnects += 1
        run.end("gone")

    async def _error_answer(self, script: Script, writer: _CutWriter) -> None:
        status = script.http_status
        body = script.error_body
        if body is None:
            code, message = _DEFAULT_ERRORS.get(status, ("error", "Error."))
            body = json.dumps({"code": code, "message": message, "status": status}).encode()
        try:
            json.loads(body)
            content_type = "application/json"
        except ValueError:
            content_type = "text/html" if body.lstrip().startswith(b"<") else "text/plain"
        self.set_status(status, reason=_reason(status))
        self.set_header("Content-Type", content_type)
        self.set_header("Content-Length", str(len(body)))
        await writer.send(body)
        await writer.drain()

    async def _stream(self, script: Script, writer: _CutWriter, run: _Run, conversation: str) -> None:
        message_id = str(uuid.uuid4())
        content_ids = {"task_id": run.task_id, "id": message_id, "conversation_id": conversation,
                       "message_id": message_id, "created_at": int(time.time())}
        self.set_header("Content-Type", "text/event-stream; charset=utf-8")
        self.set_header("Cache-Control", "no-cache")
        if script.first_byte_delay:
            await _first_of(run.ended, seconds=script.first_byte_delay)
        if script.ping_first:
            await writer.send(PING)
        deltas = script.pieces()
        for index, delta in enumerate(deltas):
            if index == script.stall_after:
                await self._stall(writer, run)
            if run.ending:
                break
            await writer.send(_frame({"event": script.event, **content_ids, "answer": delta}))
        else:
            if script.stall_after is not None and script.stall_after >= len(deltas):
                await self._stall(writer, run)
        if script.hold is not None and not run.ending:
            await writer.drain()
            while not (script.hold.is_set() or run.ending):
                await _first_of(script.hold, run.ended, seconds=script.ping_every or None)
                if script.ping_every and not (script.hold.is_set() or run.ending):
                    await writer.send(PING)
                    await writer.drain()
        if run.ending in ("gone", "closing"):
            raise _Gone
        run.finished = True
        if script.malformed and run.ending != "stopped":
            await writer.send(b"data: {\"event\": \"message\", this is not JSON\n\n")
        if run.ending == "stopped":
            await writer.send(self._message_end(content_ids, deltas))
        elif script.error_event is not None:
            error = {"status": 500, "code": "internal_server_error", "message": "stub error"}
            await writer.send(_frame({**content_ids, **error, **script.error_event, "event": "error"}))
        elif not script.eof_without_end:
            if script.replace_with is not None:
                await writer.send(_frame({"event": "message_replace", **content_ids,
                                          "answer": script.replace_with}))
            await writer.send(self._message_end(content_ids, deltas))
        await writer.drain()

    async def _stall(self, writer: _CutWriter, run: _Run) -> None:
        await writer.drain()
        await _first_of(run.released, run.ended)

    @staticmethod
    def _message_end(content_ids: dict[str, Any], deltas: list[str]) -> bytes:
        completion = sum(len(d) for d in deltas)
        usage = {"prompt_tokens": 12, "completion_tokens": completion, "total_tokens": 12 + completion,
                 "currency": "USD", "total_price": "0", "latency": 0.01}
        metadata = {"usage": usage, "retriever_resources": []}
        return _frame({"event": "message_end", **content_ids, "metadata": metadata, "files": []})


class _CutWriter:
    """Writes the raw bytes in pieces of the script's ``cut`` sizes (cycled), flushing each one."""

    def __init__(self, handler: _ChatHandler, script: Script) -> None:
        if not script.cut or any(size < 1 for size in script.cut):
            raise ValueError(f"cut sizes must be positive: {script.cut!r}")
        self._handler = handler
        self._delay = script.delay
        self._sizes = itertools.cycle(script.cut)
        self._next = next(self._sizes)
        self._pending = bytearray()
        self._wrote = False

    async def send(self, data: bytes) -> None:
        """Queue ``data``; write every full piece (a piece may span two frames)."""
        self._pending += data
        while len(self._pending) >= self._next:
            piece = bytes(self._pending[: self._next])
            del self._pending[: self._next]
            self._next = next(self._sizes)
            await self._emit(piece)

    async def drain(self) -> None:
        """Write what is queued, even if shorter than the next piece size (before waiting, at the end)."""
        if self._pending:
            piece = bytes(self._pending)
            self._pending.clear()
            await self._emit(piece)

    async def _emit(self, piece: bytes) -> None:
        run = self._handler.run
        if self._wrote and self._delay:
            if run is None:
                await asyncio.sleep(self._delay)
            else:
                await _first_of(run.ended, seconds=self._delay)
        if run is not None and run.ending in ("gone", "closing"):
            raise _Gone
        self._handler.write(piece)
        try:
            await self._handler.flush()
        except StreamClosedError:
            self._handler.gone()
            raise _Gone from None
        self._wrote = True
        if not self._delay:
            # A flush to a local socket completes at once; yield so the client reads each piece separately.
            await asyncio.sleep(0)


async def _first_of(*events: asyncio.Event, seconds: float | None = None) -> None:
    """Wait until one of ``events`` is set, or ``seconds`` passed."""
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)


def _frame(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


async def _serve(port: int, api_key: str, answer: str | None, cut: tuple[int, ...]) -> None:
    stub = DifyStub(api_key)
    stub.default = Script(answer=DEFAULT_ANSWER if answer is None else answer, cut=cut)
    await stub.start(port)
    print(f"Dify stand-in at {stub.base_url} (key {api_key}); Ctrl-C stops it", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await stub.stop()


def main(argv: list[str] | None = None) -> None:
    """Run the stand-in until interrupted."""
    parser = argparse.ArgumentParser(prog="python -m tests.difystub", description="A Dify stand-in.")
    parser.add_argument("--port", type=int, default=8089)
    parser.add_argument("--answer", help="the default answer text")
    parser.add_argument("--key", default="app-test-key", help="the API key to accept")
    parser.add_argument("--cut", default="1,7,3,13,2,29,5",
                        help="comma-separated write sizes in bytes (e.g. 65536 for benchmarks)")
    args = parser.parse_args(argv)
    cut = tuple(int(size) for size in args.cut.split(","))
    try:
        asyncio.run(_serve(args.port, args.key, args.answer, cut))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
