"""A WeCom long-connection stand-in for tests: a real Tornado WebSocket server speaking PROTOCOLS.md.

    stub = WsStub(bot_id="BOT", secret="SECRET", expiry=360.0)
    await stub.start()                         # point laibao's ws_url at stub.url
    req_id = await stub.push_message(body)     # an aibot_msg_callback to the live connection
    stub.frames("aibot_respond_msg", req_id)   # what laibao answered, in order
    await stub.stop()

It checks the subscribe (bot id and secret), acks pings, acks every frame with an errcode (0, or one
a test configures: ``errcodes[cmd]``, ``stream_errcode``), answers 846608 for a frame on a req_id
older than ``expiry`` and 846605 for an unknown req_id or a stream reply to an event, tells the older
connection ``disconnected_event`` and closes it when a second subscribe for the bot arrives, and
records everything it received. A client connecting with ``?who=NAME`` is recorded under that name
(laibao's connections are "laibao"): a test can play a foreign client beside the cluster.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import tornado.httpserver
import tornado.netutil
import tornado.web
import tornado.websocket

DISPLACED = "disconnected_event"
AUTH_FAILED = 853000
EXPIRED = 846608
INVALID_REQ_ID = 846605


@dataclass
class Received:
    """One frame a client sent, as the stub saw it."""

    who: str
    conn: int
    at: float
    frame: dict[str, Any]

    @property
    def cmd(self) -> str:
        """The frame's command ("" for an ack)."""
        return str(self.frame.get("cmd") or "")

    @property
    def req_id(self) -> str:
        """The frame's headers.req_id."""
        headers = self.frame.get("headers")
        return str(headers.get("req_id", "")) if isinstance(headers, dict) else ""

    @property
    def body(self) -> dict[str, Any]:
        """The frame's body ({} when absent)."""
        body = self.frame.get("body")
        return body if isinstance(body, dict) else {}


@dataclass
class _Pushed:
    """A callback the stub sent: its req_id decides what replies are valid."""

    kind: str  # "msg" | "event"
    at: float
    conn: int = 0  # the connection the callback went to
    busy: bool = False  # a reply frame on this req_id waits for its ack


@dataclass
class Subscribe:
    """One subscribe attempt."""

    who: str
    conn: int
    at: float
    ok: bool


@dataclass
class WsStub:
    """The stand-in server and everything it saw."""

    bot_id: str = "BOT"
    secret: str = "SECRET"
    expiry: float = 360.0  # seconds a message's req_id accepts stream frames (WeCom: 6 minutes)
    ack_delay: float = 0.0  # seconds before a reply frame is acked (exposes frames sent before the ack)
    silent_pings: bool = False  # a half-dead socket: pings are never acked
    bind_req_ids: bool = False  # a reply on another connection than the callback's gets 846605
    stream_errcode: int = 0  # errcode for every aibot_respond_msg stream frame (e.g. 846608)
    errcodes: dict[str, int] = field(default_factory=dict)  # errcode per cmd for other frames
    received: list[Received] = field(default_factory=list)
    subscribes: list[Subscribe] = field(default_factory=list)
    overlaps: int = 0  # laibao subscribes that arrived while another laibao connection was live
    unordered: int = 0  # reply frames sent on a req_id before the previous one was acked
    _live: dict[int, _Connection] = field(default_factory=dict)
    _pushed: dict[str, _Pushed] = field(default_factory=dict)
    _next_conn: int = 0
    _server: tornado.httpserver.HTTPServer | None = None
    port: int = 0

    async def start(self) -> None:
        """Listen on a free port on 127.0.0.1."""
        sockets = tornado.netutil.bind_sockets(0, "127.0.0.1")
        self.port = sockets[0].getsockname()[1]
        app = tornado.web.Application([(r"/", _Connection, {"stub": self})])
        self._server = tornado.httpserver.HTTPServer(app)
        self._server.add_sockets(sockets)

    async def stop(self) -> None:
        """Close every connection and stop listening."""
        for conn in list(self._live.values()):
            conn.close()
        if self._server is not None:
            self._server.stop()
            await self._server.close_all_connections()

    @property
    def url(self) -> str:
        """The ws:// URL laibao connects to."""
        return f"ws://127.0.0.1:{self.port}/"

    # --- what tests read ---

    def connected(self, who: str = "laibao") -> int:
        """How many subscribed connections of ``who`` are open now."""
        return sum(1 for conn in self._live.values() if conn.who == who)

    def frames(self, cmd: str, req_id: str | None = None) -> list[Received]:
        """Frames with ``cmd`` (and ``req_id``), in arrival order."""
        return [r for r in self.received if r.cmd == cmd and (req_id is None or r.req_id == req_id)]

    def subscribed(self, who: str = "laibao") -> list[Subscribe]:
        """Successful subscribes of ``who``."""
        return [s for s in self.subscribes if s.who == who and s.ok]

    # --- what tests make WeCom do ---

    async def push_message(self, body: dict[str, Any], req_id: str | None = None) -> str:
        """Send an aibot_msg_callback to laibao's live connection; its req_id."""
        return self._push("aibot_msg_callback", "msg", body, req_id)

    async def push_event(self, body: dict[str, Any], req_id: str | None = None) -> str:
        """Send an aibot_event_callback to laibao's live connection; its req_id."""
        return self._push("aibot_event_callback", "event", body, req_id)

    def _push(self, cmd: str, kind: str, body: dict[str, Any], req_id: str | None) -> str:
        conns = [c for c in self._live.values() if c.who == "laibao"]
        if not conns:
            raise AssertionError("no laibao connection is subscribed")
        req_id = req_id or uuid.uuid4().hex
        self._pushed[req_id] = _Pushed(kind, time.monotonic(), conns[-1].number)
        conns[-1].send({"cmd": cmd, "headers": {"req_id": req_id}, "body": body})
        return req_id

    # --- the protocol ---

    def _subscribe(self, conn: _Connection, received: Received) -> int:
        ok = received.body.get("bot_id") == self.bot_id and received.body.get("secret") == self.secret
        self.subscribes.append(Subscribe(conn.who, conn.number, received.at, ok))
        if not ok:
            return AUTH_FAILED
        older = [c for c in self._live.values() if c is not conn]
        if conn.who == "laibao" and any(c.who == "laibao" for c in older):
            self.overlaps += 1
        for old in older:
            # WeCom keeps one connection per bot: the older one is told and closed.
            old.send({"cmd": "aibot_event_callback", "headers": {"req_id": uuid.uuid4().hex},
                      "body": {"msgid": uuid.uuid4().hex, "create_time": int(time.time()), "aibotid": self.bot_id,
                               "msgtype": "event", "event": {"eventtype": DISPLACED}}})
            old.close()
            self._live.pop(old.number, None)
        self._live[conn.number] = conn
        conn.subscribed = True
        return 0

    def _reply_errcode(self, received: Received) -> int:
        """The errcode WeCom would give a reply frame on a callback's req_id."""
        pushed = self._pushed.get(received.req_id)
        if pushed is None:
            return INVALID_REQ_ID
        is_stream = received.cmd == "aibot_respond_msg" and received.body.get("msgtype") == "stream"
        if is_stream and pushed.kind != "msg":
            return INVALID_REQ_ID
        if self.bind_req_ids and received.conn != pushed.conn:
            return INVALID_REQ_ID
        if time.monotonic() - pushed.at > self.expiry:
            return EXPIRED
        if is_stream and self.stream_errcode:
            return self.stream_errcode
        return self.errcodes.get(received.cmd, 0)

    async def _on_frame(self, conn: _Connection, received: Received) -> None:
        cmd = received.cmd
        if cmd == "aibot_subscribe":
            conn.ack(received.req_id, self._subscribe(conn, received))
            return
        if not conn.subscribed:
            conn.ack(received.req_id, 40001)
            conn.close()
            return
        if cmd == "ping":
            if not self.silent_pings:
                conn.ack(received.req_id, 0)
            return
        if cmd in ("aibot_respond_msg", "aibot_respond_welcome_msg", "aibot_respond_update_msg"):
            pushed = self._pushed.get(received.req_id)
            if pushed is not None and pushed.busy:
                self.unordered += 1
            if pushed is not None:
                pushed.busy = True
            errcode = self._reply_errcode(received)
            if self.ack_delay:
                await asyncio.sleep(self.ack_delay)
            if pushed is not None:
                pushed.busy = False
            conn.ack(received.req_id, errcode)
            return
        conn.ack(received.req_id, self.errcodes.get(cmd, 0))


class _Connection(tornado.websocket.WebSocketHandler):
    """One client connection."""

    def initialize(self, stub: WsStub) -> None:
        self.stub = stub
        stub._next_conn += 1
        self.number = stub._next_conn
        self.who = self.get_query_argument("who", "laibao")
        self.subscribed = False

    def send(self, frame: dict[str, Any]) -> None:
        """Write one JSON text frame (dropped once the connection is gone)."""
        try:
            self.write_message(json.dumps(frame, ensure_ascii=False))
        except tornado.websocket.WebSocketClosedError:
            pass

    def ack(self, req_id: str, errcode: int) -> None:
        """Acknowledge a frame."""
        self.send({"headers": {"req_id": req_id}, "errcode": errcode, "errmsg": "ok" if errcode == 0 else "error"})

    async def on_message(self, message: str | bytes) -> None:
        """Record the frame and answer it as WeCom would."""
        try:
            frame = json.loads(message)
        except ValueError:
            self.close()
            return
        received = Received(self.who, self.number, time.monotonic(), frame if isinstance(frame, dict) else {})
        self.stub.received.append(received)
        await self.stub._on_frame(self, received)

    def on_close(self) -> None:
        """Forget the connection."""
        self.stub._live.pop(self.number, None)


class ForeignClient:
    """Another deployment's connection to the same bot: subscribes, and again whenever it is displaced."""

    def __init__(self, stub: WsStub, resubscribe: bool = True) -> None:
        self.stub = stub
        self.resubscribe = resubscribe
        self._task: asyncio.Task[None] | None = None
        self._conn: tornado.websocket.WebSocketClientConnection | None = None

    def start(self) -> None:
        """Connect in the background until stopped."""
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            self._conn = await tornado.websocket.websocket_connect(self.stub.url + "?who=foreign")
            self._conn.write_message(json.dumps({"cmd": "aibot_subscribe", "headers": {"req_id": "foreign"},
                                                 "body": {"bot_id": self.stub.bot_id, "secret": self.stub.secret}}))
            while await self._conn.read_message() is not None:
                pass
            self._conn.close()
            if not self.resubscribe:
                return
            await asyncio.sleep(0.2)

    async def stop(self) -> None:
        """Disconnect and stop resubscribing."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._conn is not None:
            self._conn.close()
