"""The long-connection stand-in behaves as PROTOCOLS.md says WeCom does (so the mode's tests mean something)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import tornado.websocket
from tornado.ioloop import IOLoop

from tests.harness import eventually
from tests.wsstub import AUTH_FAILED, DISPLACED, EXPIRED, INVALID_REQ_ID, WsStub

CLIENTS: list[Client] = []  # closed after each test


@pytest.fixture
def ws(io_loop: IOLoop) -> Iterator[WsStub]:
    stub = WsStub(expiry=0.5)
    io_loop.run_sync(stub.start)
    yield stub
    for client in CLIENTS:
        client.conn.close()
    CLIENTS.clear()
    io_loop.run_sync(stub.stop)


class Client:
    def __init__(self, conn: tornado.websocket.WebSocketClientConnection) -> None:
        self.conn = conn
        CLIENTS.append(self)

    async def call(self, cmd: str, req_id: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        frame: dict[str, Any] = {"cmd": cmd, "headers": {"req_id": req_id}}
        if body is not None:
            frame["body"] = body
        await self.conn.write_message(json.dumps(frame))
        return await self.read()

    async def read(self) -> dict[str, Any]:
        message = await self.conn.read_message()
        assert message is not None, "connection closed"
        frame: dict[str, Any] = json.loads(message)
        return frame


async def connect(stub: WsStub, secret: str = "SECRET") -> Client:
    client = Client(await tornado.websocket.websocket_connect(stub.url))
    ack = await client.call("aibot_subscribe", "s1", {"bot_id": "BOT", "secret": secret})
    assert ack["headers"]["req_id"] == "s1"
    assert ack["errcode"] == 0
    return client


@pytest.mark.gen_test(timeout=20)
async def test_subscribe_checks_the_secret_and_pings_are_acked(ws: WsStub) -> None:
    bad = Client(await tornado.websocket.websocket_connect(ws.url))
    ack = await bad.call("aibot_subscribe", "s0", {"bot_id": "BOT", "secret": "wrong"})
    assert ack["errcode"] == AUTH_FAILED
    good = await connect(ws)
    ping = await good.call("ping", "p1")
    assert ping == {"headers": {"req_id": "p1"}, "errcode": 0, "errmsg": "ok"}
    assert [s.ok for s in ws.subscribes] == [False, True]


@pytest.mark.gen_test(timeout=20)
async def test_a_second_subscribe_displaces_the_first(ws: WsStub) -> None:
    first = await connect(ws)
    await connect(ws)
    event = await first.read()
    assert event["cmd"] == "aibot_event_callback"
    assert event["body"]["event"]["eventtype"] == DISPLACED
    assert await first.conn.read_message() is None  # and it is closed
    assert ws.overlaps == 1
    await eventually(lambda: ws.connected() == 1, "one live connection")


@pytest.mark.gen_test(timeout=20)
async def test_reply_errcodes_follow_the_req_id(ws: WsStub) -> None:
    client = await connect(ws)
    req_id = await ws.push_message({"msgid": "m1", "msgtype": "text", "text": {"content": "hi"}})
    pushed = await client.read()
    assert pushed["cmd"] == "aibot_msg_callback" and pushed["headers"]["req_id"] == req_id
    stream = {"msgtype": "stream", "stream": {"id": "s", "finish": False, "content": "a"}}
    assert (await client.call("aibot_respond_msg", req_id, stream))["errcode"] == 0
    assert (await client.call("aibot_respond_msg", "unknown", stream))["errcode"] == INVALID_REQ_ID
    event_req = await ws.push_event({"msgtype": "event", "event": {"eventtype": "enter_chat"}})
    await client.read()
    assert (await client.call("aibot_respond_msg", event_req, stream))["errcode"] == INVALID_REQ_ID
    ws.expiry = 0.0  # the window has closed
    assert (await client.call("aibot_respond_msg", req_id, stream))["errcode"] == EXPIRED
    assert [r.cmd for r in ws.received].count("aibot_respond_msg") == 4
