"""DifyClient against the Dify stand-in over real HTTP: answers of every app type, what Dify received, every
failure mapped, uploads, the small endpoints and file downloads."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable

import pytest

from laibao.dify import DifyClient
from laibao.errors import (
    DifyConnectionError,
    DifyError,
    DifyHTTPError,
    DifyStreamError,
    DifyTimeoutError,
    MediaTooLarge,
    MediaUnavailable,
)
from laibao.media import file_ref
from laibao.outbound import Outbound
from laibao.sse import DifyEvent, MessageDelta, MessageEnd, MessageFile, MessageReplace, Ping, WorkflowEvent
from tests.conftest import make_outbound
from tests.difystub import DEFAULT_ANSWER, DETAILS_OPEN, DifyStub, Script
from tests.servers import free_port

KEY = "app-test-key"


@pytest.fixture
def dify(stub: DifyStub, outbound: Outbound) -> DifyClient:
    return DifyClient(stub.base_url, KEY, http=outbound, connect_timeout=2, idle_timeout=3, total_timeout=20)


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
async def test_wrong_key_is_401_and_never_shown(stub: DifyStub, outbound: Outbound,
                                               caplog: pytest.LogCaptureFixture) -> None:
    secret = "app-WRONG-secret-key"
    client = DifyClient(stub.base_url, secret, http=outbound, connect_timeout=2, idle_timeout=3)
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
async def test_unreachable_port(outbound: Outbound) -> None:
    client = DifyClient(f"http://127.0.0.1:{free_port()}/v1", KEY, http=outbound, connect_timeout=2)
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
async def test_dropped_before_the_answer_is_a_connection_error(outbound: Outbound) -> None:
    async with raw_server(b"") as url:
        with pytest.raises(DifyConnectionError, match="cannot reach Dify"):
            await collect(DifyClient(url, KEY, http=outbound, connect_timeout=2, idle_timeout=3))


@pytest.mark.gen_test
async def test_dropped_mid_stream_is_a_stream_error(outbound: Outbound) -> None:
    frame = b'data: {"event": "message", "answer": "\xe5\x8d\x8a"}\n\n'
    reply = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
             + f"{len(frame):x}\r\n".encode() + frame + b"\r\n")
    seen: list[DifyEvent] = []
    got_delta = asyncio.Event()
    async with raw_server(reply, close_after=got_delta) as url:
        client = DifyClient(url, KEY, http=outbound, idle_timeout=3)
        with pytest.raises(DifyStreamError, match="broke off"):
            async for event in client.chat_stream(query="q", user="u"):
                seen.append(event)
                got_delta.set()
    assert answer_of(seen) == "半"


@pytest.mark.gen_test
async def test_idle_watchdog_ends_a_stalled_stream(stub: DifyStub, outbound: Outbound) -> None:
    client = DifyClient(stub.base_url, KEY, http=outbound, idle_timeout=0.3)
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
async def test_pings_keep_a_slow_stream_alive(stub: DifyStub, outbound: Outbound) -> None:
    client = DifyClient(stub.base_url, KEY, http=outbound, idle_timeout=0.3)
    hold = asyncio.Event()
    stub.push(Script(answer="想了很久", hold=hold, ping_every=0.05))
    asyncio.get_running_loop().call_later(0.8, hold.set)
    started = time.monotonic()
    events = await collect(client)
    assert time.monotonic() - started >= 0.8  # more than two idle timeouts, kept alive by pings only
    assert answer_of(events) == "想了很久"
    assert isinstance(events[-1], MessageEnd)


@pytest.mark.gen_test
async def test_total_timeout_is_the_ceiling(stub: DifyStub, outbound: Outbound) -> None:
    # 2 s, not less: on two busy cores connecting alone can take a few hundred milliseconds.
    client = DifyClient(stub.base_url, KEY, http=outbound, idle_timeout=5, total_timeout=2.0)
    stub.push(Script(hold=asyncio.Event(), ping_every=0.05))
    with pytest.raises(DifyTimeoutError) as info:
        await collect(client)
    assert (info.value.kind, info.value.seconds) == ("total", 2.0)


@pytest.mark.gen_test
async def test_no_connection_in_time_is_a_connect_timeout(stub: DifyStub) -> None:
    # One connection slot, held by a stalled stream: the next request never gets connected.
    outbound = make_outbound(max_clients=1)
    try:
        client = DifyClient(stub.base_url, KEY, http=outbound, connect_timeout=0.3, idle_timeout=5)
        stub.push(Script(stall_after=1))
        async with contextlib.aclosing(client.chat_stream(query="q", user="u")) as holder:
            await anext(holder)
            with pytest.raises(DifyTimeoutError) as info:
                await collect(client)
        assert (info.value.kind, info.value.seconds) == ("connect", 0.3)
    finally:
        outbound.close()


@pytest.mark.gen_test
async def test_leaving_before_connected_sends_nothing(stub: DifyStub) -> None:
    outbound = make_outbound(max_clients=1)
    try:
        client = DifyClient(stub.base_url, KEY, http=outbound, connect_timeout=5, idle_timeout=5)
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
        outbound.close()


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


# ------------------------------------------------------------------------------- every app type

@pytest.mark.parametrize("mode", ["chat", "agent-chat", "advanced-chat"])
@pytest.mark.gen_test
async def test_chat_modes_use_chat_messages(dify: DifyClient, stub: DifyStub, mode: str) -> None:
    stub.mode = mode
    assert (await dify.info())["mode"] == mode
    events = await collect(dify, mode=mode, conversation_id="")
    assert answer_of(events) == DEFAULT_ANSWER
    assert isinstance(events[-1], MessageEnd) and events[-1].conversation_id
    assert [c.path for c in stub.requests if c.method == "POST"] == ["/v1/chat-messages"]


@pytest.mark.gen_test
async def test_completion_mode_sends_the_query_as_an_input(dify: DifyClient, stub: DifyStub) -> None:
    stub.mode = "completion"
    stub.push(Script(answer="翻译结果"))
    events = await collect(dify, mode="completion", query="请翻译", inputs={"lang": "en"},
                           conversation_id="ignored-for-completion")
    assert answer_of(events) == "翻译结果"
    end = events[-1]
    assert isinstance(end, MessageEnd) and end.message_id and end.task_id
    assert end.conversation_id == ""
    (call,) = stub.completion_calls
    assert call.json == {"inputs": {"lang": "en", "query": "请翻译"}, "response_mode": "streaming",
                         "user": "wecom:zhangsan"}
    assert stub.chat_calls == []


@pytest.mark.gen_test
async def test_an_endpoint_of_another_app_type_is_refused(dify: DifyClient, stub: DifyStub) -> None:
    stub.mode = "workflow"
    with pytest.raises(DifyHTTPError) as info:
        await collect(dify)  # mode defaults to "chat"
    assert (info.value.status, info.value.code) == (400, "not_chat_app")
    with pytest.raises(DifyError, match="unsupported Dify app mode 'rag-pipeline'"):
        await collect(dify, mode="rag-pipeline")
    with pytest.raises(DifyError, match="unsupported Dify app mode"):
        await dify.stop("t", "u", mode="rag-pipeline")


@pytest.mark.gen_test
async def test_workflow_events_are_normalised(dify: DifyClient, stub: DifyStub) -> None:
    stub.mode = "workflow"
    image = stub.origin + "/files/tools/chart.png?timestamp=1&sign=abc"
    stub.push(Script(answer="工作流的回答，分几段到达。", files=[image]))
    events = await collect(dify, mode="workflow", query="总结一下", inputs={"style": "简短"})
    assert answer_of(events) == "工作流的回答，分几段到达。"
    content = [e for e in events if not isinstance(e, WorkflowEvent)]
    assert {type(e) for e in content} == {MessageDelta, MessageFile, MessageEnd}
    assert [e.event for e in events if isinstance(e, WorkflowEvent)] == ["workflow_started", "node_started",
                                                                         "node_finished"]
    file, end = content[-2:]
    assert isinstance(file, MessageFile) and (file.file_type, file.url) == ("image", image)
    assert isinstance(end, MessageEnd)
    run_id = end.data["workflow_run_id"]
    assert run_id and end.message_id == run_id and end.conversation_id == ""
    assert {e.task_id for e in events} == {end.task_id} and end.task_id
    assert {e.message_id for e in content} == {run_id}
    assert end.metadata["status"] == "succeeded"
    assert end.metadata["outputs"] == {"text": "工作流的回答，分几段到达。"}
    assert end.metadata["usage"]["total_tokens"] > 0
    (call,) = stub.workflow_calls
    assert call.json == {"inputs": {"style": "简短", "query": "总结一下"}, "response_mode": "streaming",
                         "user": "wecom:zhangsan"}


@pytest.mark.parametrize(
    ("outputs", "expected"),
    [
        (None, DEFAULT_ANSWER),  # the stub's default outputs: {"text": answer}
        ({"count": 3, "summary": "摘要", "detail": "细节"}, "摘要"),
        ({"count": 3, "items": ["甲", 2], "empty": ""}, '{"count":3,"items":["甲",2],"empty":""}'),
        ({"image": {"dify_model_identity": "__dify__file__", "type": "image", "url": "/files/x.png"}}, ""),
        ({}, ""),
    ],
    ids=["text", "first-string", "json", "only-files", "empty"],
)
@pytest.mark.gen_test
async def test_workflow_without_text_chunks_answers_from_its_outputs(
    dify: DifyClient, stub: DifyStub, outputs: dict[str, object] | None, expected: str
) -> None:
    stub.mode = "workflow"
    stub.push(Script(text_chunks=False, outputs=outputs))
    events = await collect(dify, mode="workflow")
    deltas = [e for e in events if isinstance(e, MessageDelta)]
    assert answer_of(events) == expected
    assert len(deltas) == (1 if expected else 0)
    assert isinstance(events[-1], MessageEnd)


@pytest.mark.gen_test
async def test_streamed_workflow_text_is_not_repeated_from_outputs(dify: DifyClient, stub: DifyStub) -> None:
    stub.mode = "workflow"
    stub.push(Script(answer="流式文本", outputs={"text": "输出里的另一份文本"}))
    assert answer_of(await collect(dify, mode="workflow")) == "流式文本"


@pytest.mark.gen_test
async def test_failed_workflow_raises_its_error(dify: DifyClient, stub: DifyStub) -> None:
    stub.mode = "workflow"
    stub.push(Script(answer="部分输出", workflow_error="Node LLM run failed: quota exceeded"))
    seen: list[DifyEvent] = []
    with pytest.raises(DifyStreamError) as info:
        async for event in dify.chat_stream(query="q", user="u", mode="workflow"):
            seen.append(event)
    assert str(info.value) == "Node LLM run failed: quota exceeded"
    assert info.value.code == "workflow_failed"
    assert answer_of(seen) == "部分输出"
    assert not any(isinstance(e, MessageEnd) for e in seen)


@pytest.mark.gen_test
async def test_workflow_text_replace_and_error_event(dify: DifyClient, stub: DifyStub) -> None:
    stub.mode = "workflow"
    stub.push(Script(answer="不合适", replace_with="已替换"),
              Script(answer="半截", error_event={"code": "invoke_error", "message": "model down"}),
              Script(answer="没有结尾", eof_without_end=True))
    events = await collect(dify, mode="workflow")
    replace = [e for e in events if isinstance(e, MessageReplace)]
    assert [r.answer for r in replace] == ["已替换"]
    with pytest.raises(DifyStreamError, match="model down"):
        await collect(dify, mode="workflow")
    with pytest.raises(DifyStreamError, match="without workflow_finished"):
        await collect(dify, mode="workflow")


@pytest.mark.gen_test
async def test_reasoning_and_generated_files_in_a_chat_answer(dify: DifyClient, stub: DifyStub) -> None:
    urls = ["/files/tools/a.png?sign=1", "/files/tools/b.jpg?sign=2"]
    stub.push(Script(answer="答案。", think="先想一想", files=urls),
              Script(answer="答案。", think="先想一想", think_format="details"))
    events = await collect(dify)
    assert answer_of(events) == "<think>先想一想</think>答案。"
    deltas = [e.answer for e in events if isinstance(e, MessageDelta)]
    assert "<think>" not in deltas  # the tag arrives split over deltas, as from a real model
    assert [(e.file_type, e.url) for e in events if isinstance(e, MessageFile)] == [("image", u) for u in urls]
    assert isinstance(events[-1], MessageEnd) and isinstance(events[-2], MessageFile)
    assert answer_of(await collect(dify)) == DETAILS_OPEN + "先想一想</details>答案。"


@pytest.mark.parametrize(
    ("mode", "route"),
    [("chat", "/v1/chat-messages/{}/stop"), ("advanced-chat", "/v1/chat-messages/{}/stop"),
     ("completion", "/v1/completion-messages/{}/stop"), ("workflow", "/v1/workflows/tasks/{}/stop")],
)
@pytest.mark.gen_test
async def test_stop_per_mode(dify: DifyClient, stub: DifyStub, mode: str, route: str) -> None:
    stub.mode = mode
    stub.push(Script(deltas=["停", "不下来", "的回答"], stall_after=1))
    events: list[DifyEvent] = []
    async for event in dify.chat_stream(query="q", user="u", mode=mode):
        events.append(event)
        if isinstance(event, MessageDelta) and len(stub.stops) == 0:
            await dify.stop(event.task_id, "u", mode=mode)
    task = events[-1].task_id
    assert stub.stops == [task]
    assert [r.path for r in stub.requests if r.path.endswith("/stop")] == [route.format(task)]
    assert answer_of(events) == "停"
    assert isinstance(events[-1], MessageEnd)
    assert stub.disconnects == 0


# ------------------------------------------------------------------------------- per-user bearer

@pytest.mark.gen_test
async def test_a_bearer_replaces_the_app_key(dify: DifyClient, stub: DifyStub,
                                             caplog: pytest.LogCaptureFixture) -> None:
    stub.user_tokens = {"user-token-zhangsan"}
    caplog.set_level(logging.DEBUG)
    await collect(dify, bearer="user-token-zhangsan")
    await dify.parameters(bearer="user-token-zhangsan")
    assert [r.headers["Authorization"] for r in stub.requests] == ["Bearer user-token-zhangsan"] * 2
    wrong = "user-token-WRONG-secret"
    failures: list[DifyHTTPError] = []
    for call in (lambda: collect(dify, bearer=wrong), lambda: dify.parameters(bearer=wrong),
                 lambda: dify.upload_file(b"x", "a.txt", "text/plain", "u", bearer=wrong),
                 lambda: dify.stop("t", "u", bearer=wrong)):
        with pytest.raises(DifyHTTPError) as info:
            await call()
        failures.append(info.value)
    assert {(f.status, f.code) for f in failures} == {(401, "unauthorized")}
    assert stub.requests[-1].headers["Authorization"] == f"Bearer {wrong}"
    for text in [*(str(f) for f in failures), *(repr(f) for f in failures), caplog.text]:
        assert wrong not in text and KEY not in text
    await collect(dify)  # without a bearer: the app key again
    assert stub.requests[-1].headers["Authorization"] == f"Bearer {KEY}"


# ------------------------------------------------------------------------------- uploads

PNG_BYTES = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40 + b"--not-a-boundary--\r\n"


@pytest.mark.gen_test
async def test_upload_round_trip_and_use_in_a_chat(dify: DifyClient, stub: DifyStub) -> None:
    answer = await dify.upload_file(PNG_BYTES, "截图 1.png", "image/png", "wecom:zhangsan")
    (upload,) = stub.uploads
    assert (upload.name, upload.size, upload.mime_type, upload.user) == ("截图 1.png", len(PNG_BYTES),
                                                                          "image/png", "wecom:zhangsan")
    assert upload.data == PNG_BYTES
    assert answer["id"] == upload.id
    assert (answer["name"], answer["size"], answer["extension"], answer["mime_type"]) == (
        "截图 1.png", len(PNG_BYTES), "png", "image/png")
    request = stub.requests[-1]
    assert request.path == "/v1/files/upload" and request.json is None
    assert request.form == {"user": "wecom:zhangsan",
                            "file": {"filename": "截图 1.png", "content_type": "image/png", "size": len(PNG_BYTES)}}
    assert request.headers["Content-Type"].startswith("multipart/form-data; boundary=")
    files = [file_ref("image", answer)]
    assert answer_of(await collect(dify, files=files)) == DEFAULT_ANSWER
    assert stub.chat_calls[-1].json["files"] == [{"type": "image", "transfer_method": "local_file",
                                                  "upload_file_id": upload.id}]
    with pytest.raises(DifyHTTPError) as info:
        await collect(dify, files=[file_ref("image", {"id": "00000000-0000-4000-8000-000000000000"})])
    assert (info.value.status, info.value.code) == (400, "invalid_param")


@pytest.mark.gen_test
async def test_upload_names_cannot_break_the_multipart_framing(dify: DifyClient, stub: DifyStub) -> None:
    await dify.upload_file(b"hello", 'a"b\r\nContent-Type: evil\\.txt', "text/plain\r\nX-Evil: 1", "u")
    (upload,) = stub.uploads
    assert upload.name == "a_b__Content-Type: evil_.txt"
    assert upload.mime_type == "application/octet-stream"
    assert upload.data == b"hello"


@pytest.mark.gen_test
async def test_upload_too_large_and_unsupported(dify: DifyClient, stub: DifyStub) -> None:
    stub.upload_limit = 100
    with pytest.raises(DifyHTTPError) as info:
        await dify.upload_file(b"x" * 101, "big.txt", "text/plain", "u")
    assert (info.value.status, info.value.code) == (413, "file_too_large")
    await dify.upload_file(b"x" * 100, "fits.txt", "text/plain", "u")
    stub.allowed_upload_types = {"png", "jpg"}
    with pytest.raises(DifyHTTPError) as info:
        await dify.upload_file(b"MZ\x90\x00", "tool.exe", "application/octet-stream", "u")
    assert (info.value.status, info.value.code) == (415, "unsupported_file_type")
    assert [u.name for u in stub.uploads] == ["fits.txt"]


@pytest.mark.gen_test
async def test_a_proxys_413_is_still_file_too_large(outbound: Outbound) -> None:
    page = b"<html><body><h1>413 Request Entity Too Large</h1>nginx</body></html>"
    reply = (b"HTTP/1.1 413 Request Entity Too Large\r\nContent-Type: text/html\r\n"
             + f"Content-Length: {len(page)}\r\nConnection: close\r\n\r\n".encode() + page)
    async with raw_server(reply) as url:
        client = DifyClient(url, KEY, http=outbound, connect_timeout=2)
        with pytest.raises(DifyHTTPError) as info:
            await client.upload_file(b"x" * 1000, "a.pdf", "application/pdf", "u")
    assert (info.value.status, info.value.code) == (413, "file_too_large")
    assert "<" not in info.value.message


@pytest.mark.gen_test
async def test_an_odd_content_length_from_dify_is_a_dify_error(outbound: Outbound) -> None:
    # "\xb2" is "²" in latin-1: str.isdigit() takes it, int() does not; 30 digits are over any limit
    for length in (b"\xb2", b"9" * 30):
        reply = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: " + length + b"\r\n\r\n{}"
        async with raw_server(reply) as url:
            with pytest.raises(DifyError):
                await DifyClient(url, KEY, http=outbound, connect_timeout=2).parameters()


# ------------------------------------------------------------------------------- small endpoints

@pytest.mark.gen_test
async def test_parameters(dify: DifyClient, stub: DifyStub) -> None:
    stub.parameters["opening_statement"] = "你好，我是 HR 助手。"
    stub.parameters["suggested_questions"] = ["怎么请假？"]
    answer = await dify.parameters()
    assert answer == stub.parameters
    assert answer["system_parameters"]["image_file_size_limit"] == 10
    assert stub.requests[-1].method == "GET" and stub.requests[-1].path == "/v1/parameters"


@pytest.mark.gen_test
async def test_feedback_reaches_the_message(dify: DifyClient, stub: DifyStub) -> None:
    message = (await collect(dify, user="wecom:zhangsan"))[-1].message_id
    await dify.feedback(message, "dislike", "wecom:zhangsan", "不准确：答非所问")
    await dify.feedback(message, None, "wecom:zhangsan")
    assert stub.feedbacks == [
        {"message_id": message, "rating": "dislike", "user": "wecom:zhangsan", "content": "不准确：答非所问"},
        {"message_id": message, "rating": None, "user": "wecom:zhangsan", "content": ""},
    ]
    assert stub.requests[-1].json == {"rating": None, "user": "wecom:zhangsan", "content": ""}
    with pytest.raises(DifyHTTPError) as info:
        await dify.feedback(message, "like", "wecom:lisi")
    assert (info.value.status, info.value.message) == (404, "Message Not Exists.")
    requests = len(stub.requests)
    with pytest.raises(ValueError, match="rating"):
        await dify.feedback(message, "meh", "wecom:zhangsan")
    assert len(stub.requests) == requests  # refused before asking Dify


@pytest.mark.parametrize("status", [204, 200])
@pytest.mark.gen_test
async def test_delete_conversation(dify: DifyClient, stub: DifyStub, status: int) -> None:
    stub.delete_status = status
    conversation = (await collect(dify, user="wecom:zhangsan"))[-1].conversation_id
    assert await dify.delete_conversation(conversation, "wecom:lisi") is False  # not lisi's
    assert await dify.delete_conversation(conversation, "wecom:zhangsan") is True
    assert stub.requests[-1].method == "DELETE"
    assert stub.requests[-1].json == {"user": "wecom:zhangsan"}
    with pytest.raises(DifyHTTPError) as info:
        await collect(dify, user="wecom:zhangsan", conversation_id=conversation)
    assert info.value.message == "Conversation Not Exists."
    assert await dify.delete_conversation(conversation, "wecom:zhangsan") is False


# ------------------------------------------------------------------------------- file downloads

@pytest.mark.gen_test
async def test_fetch_resolves_dify_file_paths_without_sending_the_key(dify: DifyClient, stub: DifyStub) -> None:
    stub.serve("tools/gen.png", PNG_BYTES, "image/png")
    body, content_type = await dify.fetch("/files/tools/gen.png?timestamp=1&nonce=n&sign=s", 1 << 20, 5)
    assert (body, content_type) == (PNG_BYTES, "image/png")
    request = stub.requests[-1]
    assert request.path == "/files/tools/gen.png" and request.query["sign"] == "s"
    assert "Authorization" not in request.headers
    assert await dify.fetch(stub.origin + "/files/tools/gen.png", len(PNG_BYTES), 5) == (PNG_BYTES, "image/png")


@pytest.mark.parametrize("chunked", [True, False], ids=["streamed", "content-length"])
@pytest.mark.gen_test
async def test_fetch_stops_past_the_size_limit(dify: DifyClient, stub: DifyStub, chunked: bool) -> None:
    stub.static_chunked = chunked
    stub.serve("big.bin", b"\0" * (2 << 20))
    with pytest.raises(MediaTooLarge) as info:
        await dify.fetch("/files/big.bin", 100_000, 5)
    assert info.value.limit == 100_000
    if chunked:
        await eventually(lambda: stub.static_aborts == 1)  # the download was cut, not read to the end


@pytest.mark.gen_test
async def test_fetch_failures_are_media_unavailable(dify: DifyClient, outbound: Outbound) -> None:
    with pytest.raises(MediaUnavailable) as info:
        await dify.fetch("/files/missing.png?sign=secret-signature", 1000, 5)
    assert info.value.status == 404
    assert "secret-signature" not in str(info.value)
    # Another port of Dify's host is another origin: never fetched (SSRF), so never even tried.
    with pytest.raises(MediaUnavailable, match=r"Dify files URL to 127\.0\.0\.1:\d+ is not allowed"):
        await dify.fetch(f"http://127.0.0.1:{free_port()}/files/x.png", 1000, 5)
    with pytest.raises(MediaUnavailable, match="not an absolute http"):
        await dify.fetch("file:///etc/passwd", 1000, 5)


def test_resolve_and_own_urls() -> None:
    client = DifyClient("https://dify.example.com/v1", KEY)
    assert client.resolve("/files/tools/x.png?sign=1") == "https://dify.example.com/files/tools/x.png?sign=1"
    assert client.resolve("https://cdn.example.net/a.png") == "https://cdn.example.net/a.png"
    assert client.is_own_url("/files/x.png")
    assert client.is_own_url("https://dify.example.com/files/x.png")
    assert not client.is_own_url("https://cdn.example.net/a.png")
    assert not client.is_own_url("http://dify.example.com/files/x.png")  # another scheme is another origin
    assert not client.is_own_url("//evil.example/x.png")
