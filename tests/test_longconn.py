"""Long-connection mode in one process: configuration, messages, pushing, fallbacks, events and /api/send."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio
from tornado.httpclient import HTTPResponse
from tornado.ioloop import IOLoop

from laibao import texts
from laibao.cli import main
from laibao.config import Config, load_config
from laibao.crypto import media_item_crypto
from laibao.errors import ConfigError
from laibao.outbound import origin_entry
from laibao.runtime import Runtime
from tests.difystub import DifyStub, Script
from tests.harness import Service, eventually, running_service
from tests.servers import serving
from tests.wsstub import EXPIRED, WsStub

ANSWER = "长连接模式的回答：一段一段地推送给企业微信。"
PIECES = ["长连接模式的回答：", "一段一段地", "推送给", "企业微信。"]
API_KEY = "api-key-for-tests"
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4


def ws_env(dify_url: str, ws_url: str, redis_url: str = "", **extra: str) -> dict[str, str]:
    env = {
        "LAIBAO_WECOM_MODE": "websocket",
        "LAIBAO_WECOM_BOT_ID": "BOT",
        "LAIBAO_WECOM_BOT_SECRET": "SECRET",
        "LAIBAO_WECOM_WS_URL": ws_url,
        "LAIBAO_DIFY_URL": dify_url,
        "LAIBAO_DIFY_KEY": "app-test-key",
        "LAIBAO_NODE_ID": "test-node",
        "LAIBAO_WS_PUSH_INTERVAL": "0.05",
        "LAIBAO_API_KEY": API_KEY,
        # The Dify stand-in plays WeCom's media host (SSRF allowlist, README Security).
        "LAIBAO_WECOM_MEDIA_HOSTS": origin_entry(dify_url),
    }
    if redis_url:
        env["LAIBAO_REDIS_URL"] = redis_url
    env.update(extra)
    return env


def ws_message(text: str, msgid: str = "msg-1", user: str = "zhangsan", **extra: Any) -> dict[str, Any]:
    """An aibot_msg_callback body (no response_url needed: replies use the req_id)."""
    body: dict[str, Any] = {"msgid": msgid, "aibotid": "BOT", "chattype": "single", "from": {"userid": user},
                            "msgtype": "text", "text": {"content": text}}
    body.update(extra)
    return body


# --- configuration ---


def test_a_websocket_bot_needs_id_and_secret_one_line_each() -> None:
    env = {"LAIBAO_WECOM_MODE": "websocket", "LAIBAO_DIFY_URL": "http://d/v1", "LAIBAO_DIFY_KEY": "k"}
    with pytest.raises(ConfigError) as info:
        load_config(environ=env, dotenv=None)
    assert info.value.problems == ["LAIBAO_WECOM_BOT_ID: required", "LAIBAO_WECOM_BOT_SECRET: required"]


def test_websocket_settings_are_read_and_checked() -> None:
    env = ws_env("http://d/v1", "ws://127.0.0.1:1/")
    config = load_config(environ=env, dotenv=None)
    (bot,) = config.bots
    assert (bot.mode, bot.bot_id, bot.ws_url, bot.token) == ("websocket", "BOT", "ws://127.0.0.1:1/", "")
    assert config.ws_push_interval == 0.05 and config.api_key == API_KEY
    assert "SECRET" not in repr(config) and API_KEY not in repr(config)
    default = load_config(environ={k: v for k, v in env.items() if k != "LAIBAO_WECOM_WS_URL"}, dotenv=None)
    assert default.bots[0].ws_url == "wss://openws.work.weixin.qq.com"
    with pytest.raises(ConfigError) as info:
        load_config(environ=dict(env, LAIBAO_WECOM_WS_URL="http://x", LAIBAO_WECOM_MODE="socket"), dotenv=None)
    assert "LAIBAO_WECOM_MODE: expected one of callback, websocket, got 'socket'" in info.value.problems
    with pytest.raises(ConfigError) as info:
        load_config(environ=dict(env, LAIBAO_WECOM_WS_URL="http://x"), dotenv=None)
    assert info.value.problems == ["LAIBAO_WECOM_WS_URL: must be a ws:// or wss:// URL, got 'http://x'"]


# --- one process, the in-process store ---


@pytest.fixture
def ws(io_loop: IOLoop) -> Iterator[WsStub]:
    with serving(io_loop, WsStub()) as stub:
        yield stub


@pytest.fixture
def svc(io_loop: IOLoop, ws: WsStub) -> Iterator[Service]:
    def configure(dify_url: str) -> Config:
        return load_config(environ=ws_env(dify_url, ws.url), dotenv=None)

    with running_service(io_loop, "", configure=configure) as service:
        io_loop.run_sync(lambda: eventually(lambda: ws.connected() == 1, "laibao subscribed"))
        yield service


def stream_frames(ws: WsStub, req_id: str) -> list[dict[str, Any]]:
    return [r.body["stream"] for r in ws.frames("aibot_respond_msg", req_id)]


async def finished(ws: WsStub, req_id: str) -> list[dict[str, Any]]:
    """Wait for the finishing frame of a message; every stream frame on its req_id."""
    await eventually(lambda: any(f["finish"] for f in stream_frames(ws, req_id)), "the finishing frame")
    return stream_frames(ws, req_id)


@pytest.mark.gen_test(timeout=30)
async def test_a_message_is_answered_with_cumulative_frames_and_a_finish(svc: Service, ws: WsStub) -> None:
    gate = asyncio.Event()
    svc.dify.push(Script(answer=ANSWER, hold=gate))
    req_id = await ws.push_message(ws_message("你好"))
    await eventually(lambda: len(stream_frames(ws, req_id)) >= 2, "the placeholder and some text")
    gate.set()
    frames = await finished(ws, req_id)
    assert frames[0]["content"] == "正在思考…" and frames[0]["feedback"]["id"] == frames[0]["id"]
    assert all("feedback" not in f for f in frames[1:])
    texts = [f["content"] for f in frames[1:]]
    assert all(b.startswith(a) for a, b in itertools.pairwise(texts)), texts  # cumulative
    assert len(set(texts[:-1])) == len(texts[:-1])  # only on change (the finish may repeat the last text)
    assert [f["finish"] for f in frames] == [False] * (len(frames) - 1) + [True]
    assert frames[-1]["content"] == ANSWER
    assert {f["id"] for f in frames} == {frames[0]["id"]}
    assert svc.dify.chat_calls[-1].json["query"] == "你好"
    assert ws.unordered == 0


@pytest.mark.gen_test(timeout=30)
async def test_a_blank_answer_never_gives_a_blank_finishing_frame(svc: Service, ws: WsStub) -> None:
    svc.dify.push(Script(answer=" \n ", deltas=[" ", "\n "]))
    frames = await finished(ws, await ws.push_message(ws_message("说点什么")))
    assert all(f["content"].strip() for f in frames)
    assert frames[-1]["content"] == texts.NO_ANSWER


@pytest.mark.gen_test(timeout=30)
async def test_frames_of_one_req_id_wait_for_the_previous_ack(svc: Service, ws: WsStub) -> None:
    ws.ack_delay = 0.2  # slower acks than the push interval
    svc.dify.push(Script(answer=ANSWER, deltas=PIECES, cut=(4096,), delay=0.05))
    req_id = await ws.push_message(ws_message("慢一点"))
    frames = await finished(ws, req_id)
    assert frames[-1]["content"] == ANSWER
    assert ws.unordered == 0


@pytest.mark.gen_test(timeout=30)
async def test_the_same_msgid_twice_calls_dify_once_and_answers_on_the_newest_req_id(svc: Service,
                                                                                     ws: WsStub) -> None:
    gate = asyncio.Event()
    svc.dify.push(Script(answer=ANSWER, hold=gate), Script(answer="第二次不该出现"))
    first = await ws.push_message(ws_message("重复", msgid="same"))
    await eventually(lambda: len(stream_frames(ws, first)) >= 2, "the placeholder and some text")
    second = await ws.push_message(ws_message("重复", msgid="same"))
    # The repeat is what WeCom waits on now: the text so far goes out on its req_id, with the feedback id.
    await eventually(lambda: stream_frames(ws, second), "a frame on the repeat's req_id")
    moved = stream_frames(ws, second)[0]
    assert moved["feedback"]["id"] == moved["id"]
    assert moved["content"] != "正在思考…" and ANSWER.startswith(moved["content"])
    live = await svc.runtime.ws.store.live("default")
    assert [entry.req_id for entry in live] == [second]  # a later holder pushes on it too
    gate.set()
    frames = await finished(ws, second)
    assert frames[-1]["content"] == ANSWER
    assert not any(f["finish"] for f in stream_frames(ws, first))
    assert {f["id"] for f in stream_frames(ws, first) + frames} == {moved["id"]}
    assert len(svc.dify.chat_calls) == 1
    assert ws.unordered == 0


@pytest.mark.gen_test(timeout=30)
async def test_a_command_is_answered_with_one_finished_frame(svc: Service, ws: WsStub) -> None:
    req_id = await ws.push_message(ws_message("/help"))
    frames = await finished(ws, req_id)
    assert len(frames) == 1 and frames[0]["content"].startswith("直接发送问题即可")
    assert svc.dify.chat_calls == []


@pytest.mark.gen_test(timeout=30)
async def test_an_expired_stream_falls_back_to_send_msg(svc: Service, ws: WsStub) -> None:
    ws.stream_errcode = EXPIRED
    svc.dify.push(Script(answer=ANSWER, deltas=PIECES, cut=(4096,), delay=0.05))
    req_id = await ws.push_message(ws_message("超时了", user="lisi"))
    await eventually(lambda: ws.frames("aibot_send_msg"), "the answer sent with aibot_send_msg")
    (sent,) = ws.frames("aibot_send_msg")
    assert sent.body == {"chatid": "lisi", "msgtype": "markdown", "markdown": {"content": ANSWER}}
    assert len(stream_frames(ws, req_id)) == 1  # the refused placeholder; no more stream frames after it
    metrics = svc.runtime.metrics.render().decode()
    assert 'laibao_ws_frames_total{bot="default",cmd="aibot_respond_msg",errcode="846608"} 1.0' in metrics
    assert 'laibao_ws_frames_total{bot="default",cmd="aibot_send_msg",errcode="0"} 1.0' in metrics


@pytest.fixture
def short_window(io_loop: IOLoop, ws: WsStub) -> Iterator[Service]:
    def configure(dify_url: str) -> Config:
        env = ws_env(dify_url, ws.url, LAIBAO_STREAM_WINDOW="3", LAIBAO_WINDOW_MARGIN="1")
        return load_config(environ=env, dotenv=None)

    with running_service(io_loop, "", configure=configure) as service:
        io_loop.run_sync(lambda: eventually(lambda: ws.connected() == 1, "laibao subscribed"))
        yield service


@pytest.mark.gen_test(timeout=30)
async def test_an_answer_past_the_window_follows_with_send_msg(short_window: Service, ws: WsStub) -> None:
    gate = asyncio.Event()
    short_window.dify.push(Script(answer=ANSWER, deltas=PIECES, hold=gate, ping_every=0.2))
    req_id = await ws.push_message(ws_message("很长的回答", user="zhaoliu"))
    frames = await finished(ws, req_id)  # closed before WeCom's (scaled) window, with a note
    assert frames[-1]["content"].startswith(ANSWER) and "稍后单独发送" in frames[-1]["content"]
    gate.set()
    await eventually(lambda: ws.frames("aibot_send_msg"), "the whole answer with aibot_send_msg")
    (sent,) = ws.frames("aibot_send_msg")
    assert sent.body == {"chatid": "zhaoliu", "msgtype": "markdown", "markdown": {"content": ANSWER}}


@pytest.mark.gen_test(timeout=30)
async def test_enter_chat_gets_the_welcome_on_its_req_id(svc: Service, ws: WsStub) -> None:
    req_id = await ws.push_event({"msgid": "e1", "aibotid": "BOT", "from": {"userid": "zhangsan"},
                                  "msgtype": "event", "event": {"eventtype": "enter_chat"}})
    await eventually(lambda: ws.frames("aibot_respond_welcome_msg", req_id), "the welcome")
    (welcome,) = ws.frames("aibot_respond_welcome_msg", req_id)
    assert welcome.body["msgtype"] == "text" and welcome.body["text"]["content"]


@pytest.mark.gen_test(timeout=30)
async def test_feedback_reaches_dify(svc: Service, ws: WsStub) -> None:
    svc.dify.push(Script(answer=ANSWER))
    req_id = await ws.push_message(ws_message("评价我"))
    sid = (await finished(ws, req_id))[0]["id"]
    await ws.push_event({"msgid": "e2", "aibotid": "BOT", "from": {"userid": "zhangsan"}, "msgtype": "event",
                         "event": {"eventtype": "feedback_event", "feedback_event": {"id": sid, "type": 1}}})
    await eventually(lambda: len(svc.dify.feedbacks) == 1, "the feedback at Dify")
    assert svc.dify.feedbacks[0]["rating"] == "like" and svc.dify.feedbacks[0]["user"] == "wecom:zhangsan"


async def api_send(svc: Service, body: Any, key: str = API_KEY) -> HTTPResponse:
    return await svc.wecom.http.fetch(svc.wecom.base_url + "/api/send", method="POST",
                                      body=json.dumps(body), headers={"Authorization": f"Bearer {key}"},
                                      raise_error=False)


@pytest.mark.gen_test(timeout=30)
async def test_api_send_and_the_callback_path(svc: Service, ws: WsStub) -> None:
    bad = await api_send(svc, {"bot": "", "chatid": "wangwu", "markdown": "通知"}, key="wrong")
    assert bad.code == 401
    assert (await api_send(svc, {"bot": "", "chatid": "wangwu"})).code == 400
    assert (await api_send(svc, {"bot": "nope", "chatid": "wangwu", "markdown": "x"})).code == 404
    ok = await api_send(svc, {"bot": "", "chatid": "wangwu", "markdown": "**通知**"})
    assert (ok.code, json.loads(ok.body)) == (200, {"errcode": 0, "errmsg": "ok"})
    (sent,) = ws.frames("aibot_send_msg")
    assert sent.body == {"chatid": "wangwu", "msgtype": "markdown", "markdown": {"content": "**通知**"}}
    ws.errcodes["aibot_send_msg"] = 45009
    refused = await api_send(svc, {"bot": "default", "chatid": "wangwu", "markdown": "再来"})
    assert refused.code == 502 and json.loads(refused.body)["errcode"] == 45009
    callback = await svc.wecom.http.fetch(svc.wecom.base_url + "/wecom/callback?msg_signature=a&timestamp=1&nonce=n",
                                          method="POST", body=b"{}", raise_error=False)
    assert callback.code == 404


@pytest.mark.gen_test(timeout=60)
async def test_check_reports_the_lease_holder_without_subscribing(ws: WsStub, stub: DifyStub, redis_url: str,
                                                                  tmp_path: Path) -> None:
    client = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
    try:
        await client.set("laibao:ws:{default}:leader", "node-x", px=60000)
        await client.set("laibao:ws:{default}:term", "7", px=60000)
    finally:
        await client.aclose()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAIBAO_")}
    env.update(ws_env(stub.base_url, ws.url, redis_url))
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "laibao.cli", "check", cwd=tmp_path, env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    text = out.decode()
    assert proc.returncode == 0, text
    assert "websocket (environment bot): held by node-x (lease token 7," in text
    assert ws.received == [] and ws.subscribes == []  # a check must never displace the production connection


@pytest.mark.gen_test(timeout=30)
async def test_media_is_decrypted_with_the_items_own_aeskey(svc: Service, ws: WsStub) -> None:
    aeskey = base64.b64encode(os.urandom(32)).decode()  # WeCom may send it with or without the "=" padding
    url = svc.dify.serve("ws-image", media_item_crypto(aeskey).encrypt_media(PNG))
    svc.dify.push(Script(answer=ANSWER))
    body = ws_message("", msgtype="mixed", mixed={"msg_item": [
        {"msgtype": "text", "text": {"content": "图里是什么？"}},
        {"msgtype": "image", "image": {"url": url, "aeskey": aeskey}}]})
    frames = await finished(ws, await ws.push_message(body))
    assert frames[-1]["content"] == ANSWER
    (upload,) = svc.dify.uploads
    assert (upload.data, upload.mime_type) == (PNG, "image/png")
    (call,) = svc.dify.chat_calls
    assert call.json["query"] == "图里是什么？"
    assert call.json["files"] == [{"type": "image", "transfer_method": "local_file", "upload_file_id": upload.id}]


@pytest.mark.gen_test(timeout=30)
async def test_two_unanswered_pings_mean_a_dead_socket_and_a_reconnect(io_loop: IOLoop, ws: WsStub) -> None:
    ws.silent_pings = True
    env = ws_env("http://127.0.0.1:9/v1", ws.url, LAIBAO_WS_PING_INTERVAL="0.2")
    runtime = Runtime.build(load_config(environ=env, dotenv=None))
    await runtime.start()
    try:
        await eventually(lambda: len(ws.subscribed()) == 1, "the first subscribe")
        first = ws.subscribed()[0].conn
        await eventually(lambda: len(ws.subscribed()) == 2, "a reconnect after two missed pings")
        pings = [r for r in ws.frames("ping") if r.conn == first]
        assert len(pings) == 2  # no more pings on the dead socket after the second miss
        assert b'laibao_ws_reconnects_total{bot="default"} 1.0' in runtime.metrics.render()
    finally:
        await runtime.close()


@pytest.mark.gen_test(timeout=30)
async def test_a_holder_that_loses_its_lease_closes_its_connection(ws: WsStub, redis_url: str) -> None:
    env = ws_env("http://127.0.0.1:9/v1", ws.url, redis_url, LAIBAO_WS_LEASE="1.5")
    runtime = Runtime.build(load_config(environ=env, dotenv=None))
    client = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
    await runtime.start()
    try:
        await eventually(lambda: ws.connected() == 1, "subscribed")
        assert await client.get("laibao:ws:{default}:leader") == "test-node"
        # Another process's lease (as after a long pause of this one): this holder must let go.
        await client.set("laibao:ws:{default}:leader", "node-elsewhere", px=60000)
        await eventually(lambda: ws.connected() == 0, "the connection closed")
        assert b'laibao_ws_connected{bot="default"} 0.0' in runtime.metrics.render()
        assert len(ws.subscribes) == 1 and await client.get("laibao:ws:{default}:leader") == "node-elsewhere"
    finally:
        await runtime.close()
        await client.aclose()


def test_chat_refuses_a_websocket_bot_in_one_line(capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.startswith("LAIBAO_"):
            monkeypatch.delenv(name)
    for name, value in ws_env("http://127.0.0.1:9/v1", "ws://127.0.0.1:9/").items():
        monkeypatch.setenv(name, value)
    assert main(["chat", "你好"]) == 2
    assert capsys.readouterr().err == (
        "laibao: chat: bot 'default' runs in websocket mode; chat plays WeCom's callbacks only\n")


def test_toml_bots_choose_their_mode_each(tmp_path: Path) -> None:
    toml = tmp_path / "laibao.toml"
    toml.write_text('''
[[bots]]
name = "hr"
token = "tok"
aes_key = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"
dify_url = "http://dify/v1"
dify_key = "k1"

[[bots]]
name = "it"
mode = "websocket"
bot_id = "aib-it"
secret = "s3cret"
dify_url = "http://dify/v1"
dify_key = "k2"

[[bots]]
name = "ops"
mode = "websocket"
secret = "s3cret"
dify_url = "http://dify/v1"
dify_key = "k3"
''', encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(config_file=str(toml), environ={}, dotenv=None)
    assert info.value.problems == [f"{toml}: bots[2].bot_id: required"]
    toml.write_text(toml.read_text(encoding="utf-8").replace('name = "ops"', 'name = "ops"\nbot_id = "aib-ops"'),
                    encoding="utf-8")
    config = load_config(config_file=str(toml), environ={}, dotenv=None)
    assert [(b.name, b.mode, b.websocket) for b in config.bots] == [
        ("hr", "callback", False), ("it", "websocket", True), ("ops", "websocket", True)]
