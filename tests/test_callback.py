"""The callback path end to end, in process: real HTTP in, what WeCom would show out, what Dify received.

Every test runs twice: on the in-process store and on a real redis-server.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterator
from urllib.parse import urlencode

import pytest
import redis.asyncio
from tornado.ioloop import IOLoop

from laibao import texts
from tests.difystub import Script
from tests.harness import CRYPTO, Service, WeCom, assert_no_secrets, follow, message, refresh, running_service
from tests.servers import free_port

ANSWER = "你好！这是一个比较长的回答，🙂 包含多字节字符，" * 20 + "The end."


@pytest.fixture(params=["memory", "redis"])
def service(request: pytest.FixtureRequest, io_loop: IOLoop) -> Iterator[Service]:
    """laibao on the in-process store or on real Redis, with a fresh Dify stand-in."""
    redis_url = request.getfixturevalue("redis_url") if request.param == "redis" else ""
    with running_service(io_loop, redis_url) as svc:
        yield svc


async def ask(svc: Service, text: str = "你好", **extra: object) -> tuple[dict[str, object], list[dict[str, object]]]:
    """Send a message, follow the polls; (first stream reply, every poll reply)."""
    first = await svc.wecom.stream(message(text, **extra))  # type: ignore[arg-type]
    polls = await follow([svc.wecom], str(first["id"]))
    return first, polls


def assert_grows(polls: list[dict[str, object]]) -> None:
    shown = ""
    for stream in polls:
        content = str(stream["content"])
        if content != "正在思考…":
            assert content.startswith(shown), (shown, content)
            shown = content


@pytest.mark.gen_test(timeout=30)
async def test_url_verification_answers_plaintext_echostr(service: Service) -> None:
    params = CRYPTO.seal_echostr("1616140317555161061")
    response = await service.wecom.raw(params, None, method="GET")
    assert (response.code, response.body) == (200, b"1616140317555161061")
    bad = dict(params, msg_signature="0" * 40)
    assert (await service.wecom.raw(bad, None, method="GET")).code == 401
    assert (await service.wecom.raw({"echostr": "x"}, None, method="GET")).code == 400


@pytest.mark.gen_test(timeout=30)
async def test_text_message_streams_the_answer(service: Service) -> None:
    service.dify.default = Script(answer=ANSWER)
    first, polls = await ask(service, "今天天气怎么样？")
    assert first["finish"] is False
    assert first["content"] == "正在思考…"
    assert first["feedback"] == {"id": first["id"]}
    assert_grows(polls)
    assert polls[-1]["content"] == ANSWER
    assert [p["finish"] for p in polls].count(True) == 1
    (call,) = service.dify.chat_calls
    assert call.json == {"inputs": {}, "query": "今天天气怎么样？", "response_mode": "streaming",
                         "conversation_id": "", "user": "wecom:zhangsan"}
    assert call.headers["Authorization"] == "Bearer app-test-key"


@pytest.mark.gen_test(timeout=30)
async def test_reply_does_not_wait_for_dify(service: Service) -> None:
    hold = asyncio.Event()
    service.dify.push(Script(answer="稍后的回答", hold=hold, deltas=["稍后的", "回答"]))
    first = await service.wecom.stream(message("慢问题"))
    assert first["finish"] is False  # answered while Dify holds its message_end
    hold.set()
    polls = await follow([service.wecom], str(first["id"]))
    assert polls[-1]["content"] == "稍后的回答"


@pytest.mark.gen_test(timeout=30)
async def test_deltas_are_coalesced_not_one_write_per_token(service: Service) -> None:
    deltas = [f"第{i}段。" for i in range(600)]
    service.dify.push(Script(answer="".join(deltas), deltas=deltas, cut=(65536,)))
    first, polls = await ask(service)
    assert polls[-1]["content"] == "".join(deltas)
    if service.redis_url:
        client = redis.asyncio.Redis.from_url(service.redis_url, decode_responses=True)
        chunks = int(await client.hget(f"laibao:stream:{first['id']}", "n") or 0)
        await client.aclose()
        assert 1 <= chunks <= 60, chunks  # 600 deltas of ~20 bytes: flushed per ~1 KB / 100 ms


@pytest.mark.gen_test(timeout=30)
async def test_duplicate_msgid_gets_the_same_stream_and_one_dify_call(service: Service) -> None:
    hold = asyncio.Event()
    service.dify.push(Script(answer="一次就好", hold=hold))
    payload = message("重复投递", msgid="dup-1")
    first = await service.wecom.stream(payload)
    again = await service.wecom.stream(payload)
    assert again["id"] == first["id"]
    assert again["finish"] is False
    hold.set()
    polls = await follow([service.wecom], str(first["id"]))
    assert polls[-1]["content"] == "一次就好"
    late = await service.wecom.stream(payload)
    assert (late["id"], late["content"], late["finish"]) == (first["id"], "一次就好", True)
    assert len(service.dify.chat_calls) == 1


@pytest.mark.gen_test(timeout=30)
async def test_conversation_is_kept_and_reset_when_dify_forgot_it(service: Service) -> None:
    await ask(service, "第一句")
    await ask(service, "第二句")
    first_call, second_call = service.dify.chat_calls
    assert first_call.json is not None and second_call.json is not None
    conversation = second_call.json["conversation_id"]
    assert conversation and first_call.json["conversation_id"] == ""
    # Another user starts fresh.
    await ask(service, "别人的问题", user="lisi")
    assert service.dify.chat_calls[-1].json["conversation_id"] == ""  # type: ignore[index]
    # Dify loses the conversation (deleted, or another key): 404, then one retry with a new one.
    service.dify.forget_conversations()
    _, polls = await ask(service, "第三句")
    assert polls[-1]["content"] == Script().answer
    retried, fresh = service.dify.chat_calls[-2:]
    assert retried.json["conversation_id"] == conversation  # type: ignore[index]
    assert fresh.json["conversation_id"] == ""  # type: ignore[index]
    await ask(service, "第四句")
    assert service.dify.chat_calls[-1].json["conversation_id"] not in ("", conversation)  # type: ignore[index]


@pytest.mark.gen_test(timeout=30)
async def test_message_replace_replaces_the_answer(service: Service) -> None:
    service.dify.push(Script(answer="不合适的内容", replace_with="该内容已被审核替换。"))
    _, polls = await ask(service)
    assert polls[-1]["content"] == "该内容已被审核替换。"


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        (Script(http_status=400, error_body=json.dumps(
            {"code": "provider_quota_exceeded", "message": "quota", "status": 400}).encode()), texts.DIFY_QUOTA),
        (Script(http_status=429, error_body=b"Too Many Requests"), texts.DIFY_RATE_LIMIT),
        (Script(http_status=502, error_body=b"<html>bad gateway</html>"), texts.DIFY_SERVER_ERROR),
        (Script(http_status=401), texts.DIFY_BAD_KEY),
        (Script(eof_without_end=True, answer="半截"), "半截\n\n" + texts.DIFY_INTERRUPTED),
        (Script(answer="部分回答", error_event={"code": "completion_request_error", "status": 400,
                                              "message": "model failed"}),
         "部分回答\n\n" + texts.DIFY_MODEL_ERROR),
        (Script(answer="卡住了", deltas=["卡住", "了"], stall_after=1), "卡住\n\n" + texts.DIFY_TIMEOUT),
        (Script(first_byte_delay=4.0), texts.DIFY_TIMEOUT),
        (Script(answer="坏帧之前", deltas=["坏帧之前"], malformed=True), "坏帧之前\n\n" + texts.DIFY_INTERRUPTED),
        (Script(http_status=503, error_body=b""), texts.DIFY_SERVER_ERROR),
    ],
    ids=["quota", "429-not-json", "502-html", "401", "eof", "error-event", "idle-stall", "slow-first-byte",
         "malformed-sse", "503-empty"],
)
@pytest.mark.gen_test(timeout=30)
async def test_dify_failures_end_the_stream_with_a_short_explanation(
    service: Service, script: Script, expected: str
) -> None:
    service.dify.push(script)
    _, polls = await ask(service)
    assert polls[-1]["content"] == expected
    assert_grows(polls)


@pytest.mark.gen_test(timeout=30)
async def test_dify_unreachable(service: Service) -> None:
    for bot in service.runtime.bots.values():
        bot.service.dify.base_url = f"http://127.0.0.1:{free_port()}/v1"
    _, polls = await ask(service)
    assert polls[-1]["content"] == texts.DIFY_UNREACHABLE


@pytest.mark.gen_test(timeout=30)
async def test_unknown_stream_id_finishes_with_an_explanation(service: Service) -> None:
    stream = await service.wecom.stream(refresh("no-such-stream"))
    assert (stream["id"], stream["content"], stream["finish"]) == ("no-such-stream", texts.EXPIRED, True)


@pytest.mark.gen_test(timeout=30)
async def test_other_msgtypes_and_events(service: Service) -> None:
    odd = message("", msgtype="location", location={"latitude": 1})
    stream = await service.wecom.stream(odd)
    assert (stream["content"], stream["finish"]) == (texts.UNSUPPORTED, True)
    enter = {"msgid": "e1", "aibotid": "AIBOT", "from": {"userid": "zhangsan"}, "chattype": "single",
             "msgtype": "event", "event": {"eventtype": "enter_chat"}}
    reply = await service.wecom.post(enter)
    assert reply is not None and reply["msgtype"] == "text" and reply["text"]["content"]
    feedback = dict(enter, event={"eventtype": "feedback_event", "feedback_event": {"id": "f", "type": 1}})
    assert await service.wecom.post(feedback) is None
    assert service.dify.chat_calls == []


@pytest.mark.gen_test(timeout=30)
async def test_bad_requests_are_refused_without_state_change(service: Service) -> None:
    wecom = service.wecom
    params, body = CRYPTO.seal_callback(message("hi", msgid="m-bad"))
    forged = dict(params, msg_signature="f" * 40)
    assert (await wecom.raw(forged, body)).code == 401
    assert (await wecom.raw(dict(params, timestamp="1"), body)).code == 401  # signature covers the timestamp
    assert (await wecom.raw(params, b"not json")).code == 400
    bad_cipher = json.dumps({"encrypt": "!!!not base64!!!"}).encode()
    signed = dict(params, msg_signature=CRYPTO.sign(params["timestamp"], params["nonce"], "!!!not base64!!!"))
    assert (await wecom.raw(signed, bad_cipher)).code == 400
    assert (await wecom.raw({"timestamp": "1"}, body)).code == 400
    not_a_message = CRYPTO.seal_callback({"hello": "world"})
    assert (await wecom.raw(*not_a_message)).code == 400
    big = b"{" + b" " * (1024 * 1024) + b"}"
    assert (await wecom.raw(params, big)).code == 413
    unknown_bot = WeCom(wecom.http, wecom.base_url, path="/wecom/callback/nobody")
    assert (await unknown_bot.raw(params, body)).code == 404
    assert service.dify.requests == []
    assert await service.keys() == []
    # The genuine request still works afterwards: nothing was consumed by the refused ones.
    stream = await wecom.stream(message("hi", msgid="m-bad"))
    assert stream["finish"] is False


@pytest.mark.gen_test(timeout=30)
async def test_chunked_oversized_body_is_refused(service: Service) -> None:
    params, _ = CRYPTO.seal_callback(message("hi"))

    async def producer(write):  # type: ignore[no-untyped-def]
        for _ in range(20):
            await write(b" " * 65536)

    response = await service.wecom.http.fetch(
        f"{service.wecom.base_url}/wecom/callback?{urlencode(params)}", method="POST",
        body_producer=producer, raise_error=False, request_timeout=20,
    )
    assert response.code == 413


@pytest.mark.gen_test(timeout=30)
async def test_health_and_readiness(service: Service, request: pytest.FixtureRequest) -> None:
    http, base = service.wecom.http, service.wecom.base_url
    assert (await http.fetch(base + "/healthz")).body == b"ok\n"
    ready = await http.fetch(base + "/readyz", raise_error=False)
    assert (ready.code, ready.body) == (200, b"ready\n")
    if service.redis_url:
        server = request.getfixturevalue("redis_server")
        server.stop()
        try:
            down = await http.fetch(base + "/readyz", raise_error=False)
            assert down.code == 503 and down.body.startswith(b"redis: ")
            stream = await service.wecom.stream(message("Redis 挂了"))
            assert (stream["content"], stream["finish"]) == (texts.BUSY, True)
        finally:
            server.start()
        assert (await http.fetch(base + "/readyz", raise_error=False)).code == 200


@pytest.mark.gen_test(timeout=30)
async def test_stale_timestamps_are_refused(service: Service) -> None:
    stale = str(int(time.time()) - 3600)
    params, body = CRYPTO.seal_callback(message("一小时前的请求", msgid="old-1"), timestamp=stale)
    assert (await service.wecom.raw(params, body)).code == 401
    future = str(int(time.time()) + 3600)
    params, body = CRYPTO.seal_callback(message("来自未来", msgid="old-2"), timestamp=future)
    assert (await service.wecom.raw(params, body)).code == 401
    echo = CRYPTO.seal_echostr("123", timestamp=stale)
    assert (await service.wecom.raw(echo, None, method="GET")).code == 401
    for odd in ("¹", "١٧٠٠٠٠٠٠٠٠", "1.7e9", "-5"):  # signed, but not a number of seconds
        params, body = CRYPTO.seal_callback(message("奇怪的时间戳"), timestamp=odd)
        assert (await service.wecom.raw(params, body)).code == 400, odd
    assert service.dify.requests == [] and await service.keys() == []


@pytest.mark.gen_test(timeout=30)
async def test_metrics_count_what_happened(service: Service) -> None:
    await ask(service, "统计一下")
    await service.wecom.raw({"msg_signature": "x", "timestamp": str(int(time.time())), "nonce": "n"}, b"{}")
    service.dify.push(Script(http_status=400, error_body=json.dumps(
        {"code": "provider_quota_exceeded", "message": "quota", "status": 400}).encode()))
    await ask(service, "额度")
    await service.wecom.stream(message("", msgtype="made-up-kind-1"))
    await service.wecom.stream(message("", msgtype="made-up-kind-2"))
    body = (await service.wecom.http.fetch(service.wecom.base_url + "/metrics")).body.decode()
    samples = dict(line.rsplit(" ", 1) for line in body.splitlines() if line and not line.startswith("#"))
    assert samples['laibao_callbacks_total{bot="default",kind="text",outcome="ok"}'] == "2.0"
    assert float(samples['laibao_callbacks_total{bot="default",kind="stream",outcome="ok"}']) >= 2
    assert samples['laibao_callbacks_total{bot="default",kind="invalid",outcome="refused"}'] == "1.0"
    assert samples['laibao_dify_errors_total{bot="default",code="provider_quota_exceeded"}'] == "1.0"
    assert samples["laibao_answer_seconds_count"] == "1.0"
    assert samples["laibao_first_content_seconds_count"] == "1.0"
    assert samples["laibao_active_relays"] == "0.0"
    assert samples['laibao_callbacks_total{bot="default",kind="other",outcome="ok"}'] == "2.0"
    assert "made-up-kind" not in body  # callers cannot add label values


@pytest.mark.gen_test(timeout=30)
async def test_logs_carry_no_secrets_or_message_text(service: Service, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    await ask(service, "机密问题：工资是多少")
    service.dify.push(Script(http_status=401))
    await ask(service, "第二个机密问题")
    params, body = CRYPTO.seal_callback(message("伪造的请求"))
    await service.wecom.raw(dict(params, msg_signature="0" * 40), body)
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "stream" in logged  # the scenario did log
    assert_no_secrets(logged, "机密问题", "工资", "第二个机密问题", "伪造的请求", Script().answer)


@pytest.fixture
def redis_service(io_loop: IOLoop, redis_url: str) -> Iterator[Service]:
    """laibao on real Redis only (for what only Redis can show)."""
    with running_service(io_loop, redis_url) as svc:
        yield svc


@pytest.mark.gen_test(timeout=30)
async def test_a_refresh_poll_is_one_redis_round_trip(redis_service: Service) -> None:
    service = redis_service
    first, _ = await ask(service, "数一数")
    client = redis.asyncio.Redis.from_url(service.redis_url, decode_responses=True)
    marker = redis.asyncio.Redis.from_url(service.redis_url, decode_responses=True)
    sent: list[str] = []  # every command a client sent (commands run inside a script are not round trips)
    try:
        await marker.ping()  # connected before watching, so its handshake is not seen
        async with client.monitor() as monitor:
            for _ in range(5):
                stream = await service.wecom.stream(refresh(str(first["id"])))
                assert stream["finish"] is True
            await marker.echo("laibao-test-end")
            while True:
                command = await monitor.next_command()
                if command["command"] == "ECHO laibao-test-end":
                    break
                if command["client_type"] != "lua":
                    sent.append(str(command["command"]).split(" ", 1)[0].upper())
    finally:
        await client.aclose()
        await marker.aclose()
    assert sent == ["EVALSHA"] * 5, sent
