"""DifyClient against the Dify stand-in over real HTTP: answers, what Dify received, every failure mapped."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
import tornado.ioloop
from tornado.httpclient import AsyncHTTPClient

from laibao.dify import DifyClient
from laibao.errors import (
    DifyConnectionError,
    DifyHTTPError,
    DifyStreamError,
    DifyTimeoutError,
)
from laibao.sse import DifyEvent, MessageDelta, MessageEnd, MessageReplace, Ping
from tests.difystub import DEFAULT_ANSWER, DifyStub, Script
from tests.servers import free_port

KEY = "app-test-key"


@pytest.fixture
def stub(io_loop: tornado.ioloop.IOLoop) -> Iterator[DifyStub]:
    server = DifyStub(KEY)
    io_loop.run_sync(server.start)
    yield server
    io_loop.run_sync(server.stop)


@pytest.fixture
def http(io_loop: tornado.ioloop.IOLoop) -> Iterator[AsyncHTTPClient]:
    async def make() -> AsyncHTTPClient:
        return AsyncHTTPClient(force_instance=True)

    client = io_loop.run_sync(make)
    yield client
    client.close()


@pytest.fixture
def dify(stub: DifyStub, http: AsyncHTTPClient) -> DifyClient:
    return DifyClient(stub.base_url, KEY, http=http, connect_timeout=2, idle_timeout=3, total_timeout=20)


async def collect(client: DifyClient, **kwargs: object) -> list[DifyEvent]:
    kwargs.setdefault("query", "你好")
    kwargs.setdefault("user", "wecom:zhangsan")
    return [event async for event in client.chat_stream(**kwargs)]  # type: ignore[arg-type]


def answer_of(events: list[DifyEvent]) -> str:
    return "".join(e.answer for e in events if isinstance(e, MessageDelta))


async def eventually(condition: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def no_other_tasks() -> None:
    """Every task but the test's own has finished (no fetch or handler left behind)."""
    current = asyncio.current_task()
    await eventually(lambda: not [t for t in asyncio.all_tasks() if t is not current and not t.done()])


@pytest.mark.gen_test
async def test_answer_streams_in_full_with_its_ids(dify: DifyClient, stub: DifyStub) -> None:
    events = await collect(dify, query="今天天气怎么样？")
    assert answer_of(events) == DEFAULT_ANSWER
    assert not any(isinstance(e, Ping) for e in events)  # pings are activity, not events
    *deltas, end = events
    assert isinstance(end, MessageEnd)
    assert len(deltas) > 5
    assert end.metadata["usage"]["total_tokens"] > 0
    ids = {(e.conversation_id, e.message_id, e.task_id) for e in events}
    assert len(ids) == 1
    conversation, message, task = ids.pop()
    assert conversation and message and task
    (call,) = stub.chat_calls
    assert call.json == {"inputs": {}, "query": "今天天气怎么样？", "response_mode": "streaming",
                         "conversation_id": "", "user": "wecom:zhangsan"}
    assert call.headers["Authorization"] == f"Bearer {KEY}"
    assert call.headers["Content-Type"] == "application/json"


@pytest.mark.gen_test
async def test_conversation_inputs_and_files_are_sent(dify: DifyClient, stub: DifyStub) -> None:
    first = await collect(dify)
    files = [{"type": "image", "transfer_method": "remote_url", "url": "https://example.invalid/a.png"}]
    conversation = first[-1].conversation_id
    second = await collect(dify, conversation_id=conversation, inputs={"lang": "zh"}, files=files)
    assert second[-1].conversation_id == first[-1].conversation_id
    assert second[-1].message_id != first[-1].message_id
    sent = stub.chat_calls[-1].json
    assert sent["conversation_id"] == first[-1].conversation_id
    assert sent["inputs"] == {"lang": "zh"}
    assert sent["files"] == files
    assert "files" not in stub.chat_calls[0].json


@pytest.mark.gen_test
async def test_agent_message_deltas(dify: DifyClient, stub: DifyStub) -> None:
    stub.push(Script(answer="代理的回答", event="agent_message"))
    events = await collect(dify)
    assert answer_of(events) == "代理的回答"
    assert {e.event for e in events[:-1]} == {"agent_message"}


@pytest.mark.gen_test
async def test_message_replace_is_passed_on(dify: DifyClient, stub: DifyStub) -> None:
    stub.push(Script(answer="不合适的内容", replace_with="该内容已被审核替换。"))
    events = await collect(dify)
    replace = events[-2]
    assert isinstance(replace, MessageReplace) and replace.answer == "该内容已被审核替换。"
    assert isinstance(events[-1], MessageEnd)


@pytest.mark.gen_test
async def test_error_event_raises_with_its_code(dify: DifyClient, stub: DifyStub) -> None:
    stub.push(Script(answer="部分回答", error_event={"code": "completion_request_error", "status": 400,
                                                  "message": "model failed"}))
    seen: list[DifyEvent] = []
    with pytest.raises(DifyStreamError) as info:
        async for event in dify.chat_stream(query="q", user="u"):
            seen.append(event)
    assert (info.value.code, info.value.status) == ("completion_request_error", 400)
    assert str(info.value) == "model failed"
    assert answer_of(seen) == "部分回答"


@pytest.mark.gen_test
async def test_http_400_quota(dify: DifyClient, stub: DifyStub) -> None:
    body = {"code": "provider_quota_exceeded", "message": "Your quota has been exceeded.", "status": 400}
    stub.push(Script(http_status=400, error_body=json.dumps(body).encode()))
    with pytest.raises(DifyHTTPError) as info:
        await collect(dify)
    error = info.value
    assert (error.status, error.code, error.message) == (400, "provider_quota_exceeded",
                                                         "Your quota has been exceeded.")


@pytest.mark.gen_test
async def test_unknown_or_foreign_conversation_is_404(dify: DifyClient, stub: DifyStub) -> None:
    with pytest.raises(DifyHTTPError) as info:
        await collect(dify, conversation_id="2b2b2b2b-0000-4000-8000-000000000000")
    assert (info.value.status, info.value.code) == (404, "not_found")
    assert info.value.message == "Conversation Not Exists."
    mine = (await collect(dify, user="wecom:zhangsan"))[-1].conversation_id
    with pytest.raises(DifyHTTPError) as info:
        await collect(dify, user="wecom:lisi", conversation_id=mine)
    assert info.value.status == 404
    assert answer_of(await collect(dify, user="wecom:zhangsan", conversation_id=mine)) == DEFAULT_ANSWER


@pytest.mark.gen_test
async def test_wrong_key_is_401_and_never_shown(stub: DifyStub, http: AsyncHTTPClient,
                                               caplog: pytest.LogCaptureFixture) -> None:
    secret = "app-WRONG-secret-key"
    client = DifyClient(stub.base_url, secret, http=http, connect_timeout=2, idle_timeout=3)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(DifyHTTPError) as info:
        await collect(client)
    assert (info.value.status, info.value.code) == (401, "unauthorized")
    with pytest.raises(DifyHTTPError) as stop_info:
        await client.stop("some-task", "u")
    assert stop_info.value.status == 401
    for text in (str(info.value), repr(info.value), str(stop_info.value), repr(client), caplog.text):
        assert secret not in text


@pytest.mark.gen_test
async def test_plain_text_429(dify: DifyClient, stub: DifyStub) -> None:
    stub.push(Script(http_status=429, error_body=b"Too Many Requests"))
    with pytest.raises(DifyHTTPError) as info:
        await collect(dify)
    assert (info.value.status, info.value.code, info.value.message) == (429, "too_many_requests",
                                                                        "Too Many Requests")


@pytest.mark.gen_test
async def test_html_500_gives_a_short_message(dify: DifyClient, stub: DifyStub) -> None:
    page = b"<html><head><title>500 Internal Server Error</title></head><body>" + b"<p>trace</p>" * 2000 + \
        b"</body></html>"
    stub.push(Script(http_status=500, error_body=page, cut=(4096,)))
    with pytest.raises(DifyHTTPError) as info:
        await collect(dify)
    error = info.value
    assert (error.status, error.code) == (500, "internal_server_error")
    assert error.message.startswith("500 Internal Server Error trace")
    assert "<" not in error.message
    assert len(error.message) <= 200


@pytest.mark.gen_test
async def test_eof_without_message_end(dify: DifyClient, stub: DifyStub) -> None:
    stub.push(Script(answer="半截", eof_without_end=True))
    seen: list[DifyEvent] = []
    with pytest.raises(DifyStreamError, match="without message_end"):
        async for event in dify.chat_stream(query="q", user="u"):
            seen.append(event)
    assert answer_of(seen) == "半截"


@pytest.mark.gen_test
async def test_malformed_frame(dify: DifyClient, stub: DifyStub) -> None:
    stub.push(Script(malformed=True))
    with pytest.raises(DifyStreamError, match="malformed SSE frame"):
        await collect(dify)


@pytest.mark.gen_test
async def test_unreachable_port(http: AsyncHTTPClient) -> None:
    client = DifyClient(f"http://127.0.0.1:{free_port()}/v1", KEY, http=http, connect_timeout=2)
    with pytest.raises(DifyConnectionError, match=r"cannot reach Dify at 127\.0\.0\.1"):
        await collect(client)
    with pytest.raises(DifyConnectionError):
        await client.info()


@contextlib.asynccontextmanager
async def raw_server(reply: bytes, close_after: asyncio.Event | None = None) -> AsyncIterator[str]:
    """A server that reads the request head, sends ``reply`` and drops the connection; yields its base URL."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(reply)
        await writer.drain()
        if close_after is not None:
            async with asyncio.timeout(5):
                await close_after.wait()
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.gen_test
async def test_dropped_before_the_answer_is_a_connection_error(http: AsyncHTTPClient) -> None:
    async with raw_server(b"") as url:
        with pytest.raises(DifyConnectionError, match="cannot reach Dify"):
            await collect(DifyClient(url, KEY, http=http, connect_timeout=2, idle_timeout=3))


@pytest.mark.gen_test
async def test_dropped_mid_stream_is_a_stream_error(http: AsyncHTTPClient) -> None:
    frame = b'data: {"event": "message", "answer": "\xe5\x8d\x8a"}\n\n'
    reply = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
             + f"{len(frame):x}\r\n".encode() + frame + b"\r\n")
    seen: list[DifyEvent] = []
    got_delta = asyncio.Event()
    async with raw_server(reply, close_after=got_delta) as url:
        client = DifyClient(url, KEY, http=http, idle_timeout=3)
        with pytest.raises(DifyStreamError, match="broke off"):
            async for event in client.chat_stream(query="q", user="u"):
                seen.append(event)
                got_delta.set()
    assert answer_of(seen) == "半"


@pytest.mark.gen_test
async def test_idle_watchdog_ends_a_stalled_stream(stub: DifyStub, http: AsyncHTTPClient) -> None:
    client = DifyClient(stub.base_url, KEY, http=http, idle_timeout=0.3)
    stub.push(Script(deltas=["卡住", "了", "再也不来"], stall_after=2))
    seen: list[DifyEvent] = []
    started = time.monotonic()
    with pytest.raises(DifyTimeoutError) as info:
        async for event in client.chat_stream(query="q", user="u"):
            seen.append(event)
    assert (info.value.kind, info.value.seconds) == ("idle", 0.3)
    assert 0.3 <= time.monotonic() - started < 3
    assert answer_of(seen) == "卡住了"
    await eventually(lambda: stub.disconnects == 1)  # the stalled connection was closed, not left open


@pytest.mark.gen_test
async def test_pings_keep_a_slow_stream_alive(stub: DifyStub, http: AsyncHTTPClient) -> None:
    client = DifyClient(stub.base_url, KEY, http=http, idle_timeout=0.3)
    hold = asyncio.Event()
    stub.push(Script(answer="想了很久", hold=hold, ping_every=0.05))
    asyncio.get_running_loop().call_later(0.8, hold.set)
    started = time.monotonic()
    events = await collect(client)
    assert time.monotonic() - started >= 0.8  # more than two idle timeouts, kept alive by pings only
    assert answer_of(events) == "想了很久"
    assert isinstance(events[-1], MessageEnd)


@pytest.mark.gen_test
async def test_total_timeout_is_the_ceiling(stub: DifyStub, http: AsyncHTTPClient) -> None:
    client = DifyClient(stub.base_url, KEY, http=http, idle_timeout=5, total_timeout=0.5)
    stub.push(Script(hold=asyncio.Event(), ping_every=0.05))
    with pytest.raises(DifyTimeoutError) as info:
        await collect(client)
    assert (info.value.kind, info.value.seconds) == ("total", 0.5)


@pytest.mark.gen_test
async def test_no_connection_in_time_is_a_connect_timeout(stub: DifyStub) -> None:
    # One connection slot, held by a stalled stream: the next request never gets connected.
    http = AsyncHTTPClient(force_instance=True, max_clients=1)
    try:
        client = DifyClient(stub.base_url, KEY, http=http, connect_timeout=0.3, idle_timeout=5)
        stub.push(Script(stall_after=1))
        async with contextlib.aclosing(client.chat_stream(query="q", user="u")) as holder:
            await anext(holder)
            with pytest.raises(DifyTimeoutError) as info:
                await collect(client)
        assert (info.value.kind, info.value.seconds) == ("connect", 0.3)
    finally:
        http.close()


@pytest.mark.gen_test
async def test_leaving_before_connected_sends_nothing(stub: DifyStub) -> None:
    http = AsyncHTTPClient(force_instance=True, max_clients=1)
    try:
        client = DifyClient(stub.base_url, KEY, http=http, connect_timeout=5, idle_timeout=5)
        hold = asyncio.Event()
        stub.push(Script(answer="占位", hold=hold))
        async with contextlib.aclosing(client.chat_stream(query="first", user="u")) as holder:
            await anext(holder)
            queued = asyncio.create_task(collect(client, query="queued"))
            await asyncio.sleep(0.1)  # the second request waits for the only connection slot
            queued.cancel()
            with pytest.raises(asyncio.CancelledError):
                await queued
            hold.set()
            assert isinstance([e async for e in holder][-1], MessageEnd)
        await no_other_tasks()  # the queued fetch got its slot, refused to send, and ended
        assert [c.json["query"] for c in stub.chat_calls] == ["first"]
    finally:
        http.close()


@pytest.mark.gen_test
async def test_leaving_early_closes_the_connection(dify: DifyClient, stub: DifyStub) -> None:
    stub.push(Script(deltas=["第一段", "第二段"], stall_after=1))
    stream = dify.chat_stream(query="q", user="u")
    first = await anext(stream)
    assert isinstance(first, MessageDelta) and first.answer == "第一段"
    assert stub.disconnects == 0
    await stream.aclose()
    await eventually(lambda: stub.disconnects == 1)
    await no_other_tasks()


@pytest.mark.gen_test
async def test_break_closes_the_connection(dify: DifyClient, stub: DifyStub) -> None:
    stub.push(Script(deltas=["一", "二", "三"], hold=asyncio.Event()))
    async with contextlib.aclosing(dify.chat_stream(query="q", user="u")) as stream:
        async for _ in stream:
            break
    await eventually(lambda: stub.disconnects == 1)
    await no_other_tasks()


@pytest.mark.gen_test
async def test_cancelling_the_consumer_closes_the_connection(dify: DifyClient, stub: DifyStub) -> None:
    stub.push(Script(stall_after=1))
    got_first = asyncio.Event()

    async def consume() -> None:
        async for _ in dify.chat_stream(query="q", user="u"):
            got_first.set()

    task = asyncio.create_task(consume())
    await got_first.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await eventually(lambda: stub.disconnects == 1)
    await no_other_tasks()


@pytest.mark.gen_test
async def test_finished_answers_are_not_disconnects(dify: DifyClient, stub: DifyStub) -> None:
    for _ in range(3):
        await collect(dify)
    await no_other_tasks()
    assert stub.disconnects == 0


@pytest.mark.gen_test
async def test_stop_reaches_dify_and_ends_the_stream(dify: DifyClient, stub: DifyStub) -> None:
    stub.push(Script(deltas=["停", "不下来", "的回答"], stall_after=1))
    events: list[DifyEvent] = []
    async for event in dify.chat_stream(query="q", user="u"):
        events.append(event)
        if len(events) == 1:
            await dify.stop(event.task_id, "u")
    assert stub.stops == [events[0].task_id]
    assert answer_of(events) == "停"
    assert isinstance(events[-1], MessageEnd)
    assert stub.disconnects == 0


@pytest.mark.gen_test
async def test_info_with_the_default_http_client(stub: DifyStub) -> None:
    client = DifyClient(stub.base_url + "/", KEY)
    assert await client.info() == {"name": "stub", "mode": "chat"}
    assert stub.requests[-1].path == "/v1/info"


@pytest.mark.gen_test(timeout=20)
async def test_a_large_answer_read_slowly_arrives_intact(dify: DifyClient, stub: DifyStub) -> None:
    # Far more than the client buffers before it stops reading the socket: back-pressure, not memory.
    deltas = [f"{i:04d}" + "数据" * 50_000 for i in range(30)]
    stub.push(Script(deltas=deltas, cut=(65536,)))
    received: list[str] = []
    async for event in dify.chat_stream(query="q", user="u"):
        if isinstance(event, MessageDelta):
            received.append(event.answer)
            await asyncio.sleep(0.01)
    assert received == deltas
