"""What the README promises and no other test pinned, each through the real HTTP path.

laibao runs in this process on the in-process store and on a real redis-server (real MariaDB and the
stand-ins where the promise touches them); every check is on what WeCom shows, what Dify, the
response_url endpoint or an operator (logs, /readyz, the CLI) sees.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import os
import subprocess
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from tornado.ioloop import IOLoop

from laibao import texts
from laibao.config import Config, load_config
from laibao.crypto import WeComCrypto, generate_aes_key, generate_token
from laibao.wecom import MAX_CONTENT_BYTES
from stores.keys import Keys, scope_of
from tests.difystub import DifyStub, Script
from tests.harness import (
    AES_KEY,
    CRYPTO,
    TOKEN,
    Service,
    WeCom,
    eventually,
    follow,
    marked_service,
    message,
    running_service,
)
from tests.servers import free_port
from tests.wecomstub import ResponseUrlStub


@pytest.fixture(params=["memory", "redis"])
def svc(request: pytest.FixtureRequest, io_loop: IOLoop) -> Iterator[Service]:
    """laibao with the settings of the test's ``settings`` marker."""
    with marked_service(request, io_loop, on_redis=request.param == "redis") as service:
        yield service


@pytest.fixture
def redis_svc(request: pytest.FixtureRequest, io_loop: IOLoop) -> Iterator[Service]:
    """laibao on real Redis only, for what only Redis lets a test read."""
    with marked_service(request, io_loop, on_redis=True) as service:
        yield service


async def answer(svc: Service, payload: dict[str, Any], wecom: WeCom | None = None) -> list[dict[str, Any]]:
    """Send a message callback and follow its polls; every stream reply, the first included."""
    wecom = wecom or svc.wecom
    first = await wecom.stream(payload)
    if first["finish"]:
        return [first]
    return [first, *await follow([wecom], str(first["id"]))]


async def shown(svc: Service, text: str, wecom: WeCom | None = None) -> str:
    """What WeCom finally shows for a text message."""
    return str((await answer(svc, message(text), wecom))[-1]["content"])


def png(seed: int, size: int = 0) -> bytes:
    """A distinct PNG (by its magic bytes) of at least ``size`` bytes."""
    body = b"\x89PNG\r\n\x1a\n" + seed.to_bytes(4, "big") + bytes(range(256))
    return body + b"\0" * max(0, size - len(body))


# ------------------------------------------------------------------------------------ command words

@pytest.mark.gen_test
async def test_every_default_command_word_works_in_any_case(svc: Service) -> None:
    for word in ("/new", "新对话", "新会话", "/NEW", " /New "):
        assert await shown(svc, word) == texts.NEW_CONVERSATION, word
    for word in ("/stop", "停止", "停", "/STOP", "/Stop"):
        assert await shown(svc, word) == texts.NOTHING_TO_STOP, word  # recognised: nothing is running
    for word in ("/help", "帮助", "/HELP"):
        assert "/new" in await shown(svc, word), word
    assert svc.dify.chat_calls == []  # no command word reached Dify
    await shown(svc, "/new please")  # not the whole message: a question
    assert [c.json["query"] for c in svc.dify.chat_calls] == ["/new please"]


@pytest.mark.settings(new_words="重来,Reset", stop_words="打住", help_words="怎么用", help_text="发问题就行。")
@pytest.mark.gen_test
async def test_configured_command_words_replace_the_defaults(svc: Service) -> None:
    assert await shown(svc, "重来") == texts.NEW_CONVERSATION
    assert await shown(svc, "RESET") == texts.NEW_CONVERSATION
    assert await shown(svc, "打住") == texts.NOTHING_TO_STOP
    assert await shown(svc, "怎么用") == "发问题就行。"
    assert svc.dify.chat_calls == []
    await shown(svc, "/new")  # no longer a command of this bot
    assert [c.json["query"] for c in svc.dify.chat_calls] == ["/new"]


@pytest.fixture
def two_bots(io_loop: IOLoop, redis_url: str, tmp_path: Path) -> Iterator[tuple[Service, dict[str, WeComCrypto]]]:
    """Bots "hr" (its own command words) and "it" (the defaults) from a TOML file, on one Redis."""
    keys = {name: (generate_token(), generate_aes_key()) for name in ("hr", "it")}

    def configure(dify_url: str) -> Config:
        toml = tmp_path / "laibao.toml"
        toml.write_text(f'redis_url = "{redis_url}"\nnode_id = "n1"\n' + "".join(
            f'[[bots]]\nname = "{name}"\ntoken = "{token}"\naes_key = "{key}"\ndify_url = "{dify_url}"\n'
            f'dify_key = "app-test-key"\n' + ('new_words = ["换个话题"]\n' if name == "hr" else "")
            for name, (token, key) in keys.items()))
        return load_config(config_file=str(toml), environ={}, dotenv=None)

    with running_service(io_loop, redis_url, configure=configure) as service:
        yield service, {name: WeComCrypto(token, key) for name, (token, key) in keys.items()}


@pytest.mark.gen_test
async def test_command_words_are_per_bot(two_bots: tuple[Service, dict[str, WeComCrypto]]) -> None:
    svc, cryptos = two_bots
    hr, it = (WeCom(svc.wecom.http, svc.wecom.base_url, path=f"/wecom/callback/{name}", crypto=cryptos[name])
              for name in ("hr", "it"))
    assert await shown(svc, "换个话题", hr) == texts.NEW_CONVERSATION
    assert await shown(svc, "/new", it) == texts.NEW_CONVERSATION
    assert svc.dify.chat_calls == []
    await shown(svc, "换个话题", it)  # only hr's word
    await shown(svc, "/new", hr)  # hr replaced the default words
    assert [c.json["query"] for c in svc.dify.chat_calls] == ["换个话题", "/new"]


# ------------------------------------------------------------------------------------------- media

MP4 = b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom" + bytes(range(256)) * 8


@pytest.mark.gen_test
async def test_a_video_alone_is_held_and_goes_with_the_next_text(svc: Service) -> None:
    url = svc.dify.serve("wecom-video", CRYPTO.encrypt_media(MP4))
    held = await answer(svc, message("", msgtype="video", video={"url": url}))
    assert (held[-1]["content"], held[-1]["finish"]) == (texts.MEDIA_HELD, True)
    assert svc.dify.chat_calls == []
    assert (await answer(svc, message("视频里说了什么？")))[-1]["content"] == Script().answer
    (upload,) = svc.dify.uploads
    assert (upload.data, upload.mime_type, upload.user) == (MP4, "video/mp4", "wecom:zhangsan")
    (call,) = svc.dify.chat_calls
    assert call.json["files"] == [{"type": "video", "transfer_method": "local_file", "upload_file_id": upload.id}]


@pytest.mark.settings(media_hold_seconds="600")
@pytest.mark.gen_test
async def test_media_are_held_290_s_at_most(redis_svc: Service) -> None:
    url = redis_svc.dify.serve("wecom-image", CRYPTO.encrypt_media(png(1)))
    await answer(redis_svc, message("", msgtype="image", image={"url": url}))
    client = aioredis.Redis.from_url(redis_svc.redis_url, decode_responses=True)
    try:
        # WeCom's media URLs die after 5 minutes: 600 s asked, 290 s held
        assert 280_000 < await client.pttl(Keys().media("default", scope_of("zhangsan", "", "user"))) <= 290_000
    finally:
        await client.aclose()


@pytest.mark.gen_test(timeout=60)
async def test_at_most_ten_generated_images_reach_wecom(svc: Service) -> None:
    images = [png(i) for i in range(12)]
    urls = [svc.dify.serve(f"gen-{i}.png", data, "image/png") for i, data in enumerate(images)]
    svc.dify.push(Script(answer="十二张图", files=urls))
    items = (await answer(svc, message("画十二张图")))[-1]["msg_item"]
    assert [base64.b64decode(i["image"]["base64"]) for i in items] == images[:10]
    assert [i["image"]["md5"] for i in items] == [hashlib.md5(data).hexdigest() for data in images[:10]]


@pytest.mark.gen_test(timeout=90)
async def test_a_generated_image_over_10_mb_is_left_out(svc: Service) -> None:
    limit = 10 * 1024 * 1024
    fits, too_big = png(1, limit), png(2, limit + 1)
    urls = [svc.dify.serve("big.png", too_big, "image/png"), svc.dify.serve("fits.png", fits, "image/png")]
    svc.dify.push(Script(answer="两张大图", files=urls))
    final = (await answer(svc, message("画两张大图")))[-1]
    assert final["content"] == "两张大图"
    (item,) = final["msg_item"]
    data = base64.b64decode(item["image"]["base64"])
    assert len(data) == limit and zlib.crc32(data) == zlib.crc32(fits)


# ---------------------------------------------------------------------------------- response_url

@pytest.mark.settings(response_url_retries="2")
@pytest.mark.gen_test(timeout=60)
async def test_when_response_url_retries_run_out_the_stream_still_ends_and_operators_see_it(
    svc: Service, responses: ResponseUrlStub, caplog: pytest.LogCaptureFixture
) -> None:
    long_answer = "".join(f"第{i}段：很长的回答，超过企业微信的长度上限。\n" for i in range(600))
    assert len(long_answer.encode()) > MAX_CONTENT_BYTES
    responses.fail_next = [502, 503, 502, 502]
    svc.dify.push(Script(answer=long_answer, cut=(4096,)))
    polls = await answer(svc, message("写长一点", response_url=responses.url()))
    assert polls[-1]["content"].endswith(texts.OVERFLOW_NOTE)  # what fits is shown, the stream ends
    await eventually(lambda: "response_url delivery failed" in caplog.text, "the failed delivery is logged")
    assert responses.attempts == 2 and responses.received == []  # LAIBAO_RESPONSE_URL_RETRIES attempts, no more
    assert (await svc.wecom.http.fetch(svc.wecom.base_url + "/healthz")).code == 200


# ------------------------------------------------------------------------------------------- Dify

@pytest.mark.gen_test
async def test_a_second_404_after_the_conversation_retry_ends_the_answer(svc: Service) -> None:
    await shown(svc, "第一句")
    svc.dify.forget_conversations()  # the stored conversation now answers 404
    gone = b'{"code": "not_found", "message": "Conversation Not Exists.", "status": 404}'
    svc.dify.push(Script(http_status=404, error_body=gone))  # and so does the fresh one
    final = await answer(svc, message("第二句"))
    assert (final[-1]["content"], final[-1]["finish"]) == (texts.DIFY_BAD_REQUEST, True)
    # the 404 on the stored conversation is not recorded as a call the stub answered with a script,
    # but it is a request: the stored id, then one retry with a new conversation, and no more
    asked = [c.json["conversation_id"] for c in svc.dify.chat_calls]
    assert len(asked) == 3 and asked[0] == "" and asked[1] != "" and asked[2] == "", asked


# ------------------------------------------------------------------------------------------ events

@pytest.mark.gen_test
async def test_enter_chat_without_welcome_or_opening_statement_gets_the_default_greeting(svc: Service) -> None:
    enter = {"msgid": "e1", "aibotid": "AIBOT", "from": {"userid": "zhangsan"}, "chattype": "single",
             "msgtype": "event", "event": {"eventtype": "enter_chat"}}
    assert svc.dify.parameters["opening_statement"] == "" and not svc.dify.parameters["suggested_questions"]
    assert await svc.wecom.post(enter) == {"msgtype": "text", "text": {"content": texts.WELCOME}}
    await svc.dify.stop()  # Dify unreachable: still greeted
    assert await svc.wecom.post(dict(enter, msgid="e2")) == {"msgtype": "text", "text": {"content": texts.WELCOME}}


# ---------------------------------------------------------------------------------------- operators

@pytest.mark.settings(log_content="true")
@pytest.mark.gen_test
async def test_log_content_true_logs_the_question(svc: Service, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    await shown(svc, "调试用的问题文本")
    assert "调试用的问题文本" in caplog.text
    assert Script().answer not in caplog.text  # the question only, never the answer


@pytest.mark.gen_test
async def test_refused_callbacks_log_wecoms_error_code(svc: Service, caplog: pytest.LogCaptureFixture) -> None:
    params, body = CRYPTO.seal_callback(message("伪造"))
    assert (await svc.wecom.raw(dict(params, msg_signature="0" * 40), body)).code == 401
    garbage = base64.b64encode(os.urandom(64)).decode()  # signed, but not laibao's ciphertext
    signed = dict(params, msg_signature=CRYPTO.sign(params["timestamp"], params["nonce"], garbage))
    assert (await svc.wecom.raw(signed, b'{"encrypt": "' + garbage.encode() + b'"}')).code == 400
    not_base64 = dict(params, msg_signature=CRYPTO.sign(params["timestamp"], params["nonce"], "@@@"))
    assert (await svc.wecom.raw(not_base64, b'{"encrypt": "@@@"}')).code == 400
    refused = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("-40001" in line for line in refused), refused  # signature invalid
    assert any("-40007" in line or "-40008" in line for line in refused), refused  # AES / frame
    assert any("-40010" in line for line in refused), refused  # base64


@pytest.fixture(params=["up", "down"])
def allowlist_svc(request: pytest.FixtureRequest, io_loop: IOLoop, redis_url: str, mysql_url: str) -> Iterator[Service]:
    """An allowlist bot on a MySQL that answers, or on one that does not (nothing listens on the port)."""
    url = mysql_url if request.param == "up" else mysql_url.rsplit("@", 1)[0] + "@127.0.0.1:1/laibao"
    with running_service(io_loop, redis_url, auth_mode="allowlist", mysql_url=url) as service:
        yield service


@pytest.mark.gen_test
async def test_readyz_names_mysql_when_it_does_not_answer(allowlist_svc: Service, mysql_url: str) -> None:
    ready = await allowlist_svc.wecom.http.fetch(allowlist_svc.wecom.base_url + "/readyz", raise_error=False)
    if allowlist_svc.runtime.config.mysql_url == mysql_url:
        assert (ready.code, ready.body) == (200, b"ready\n")
        return
    assert ready.code == 503
    lines = ready.body.decode().splitlines()
    assert [line.split(":", 1)[0] for line in lines] == ["mysql"], lines  # Redis is fine: only MySQL is named
    assert "s3cret" not in ready.body.decode()  # no password in the reason


async def laibao_check(env: dict[str, str], cwd: Path) -> tuple[int, str, str]:
    """Run `laibao check` with exactly these LAIBAO_* settings; (status, stdout, stderr)."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("LAIBAO_")}
    full.update(env, PYTHONWARNINGS="error")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "laibao.cli", "check", cwd=cwd, env=full,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.slow
@pytest.mark.gen_test(timeout=120)
async def test_laibao_check_reaches_redis_and_dify(stub: DifyStub, redis_url: str, tmp_path: Path) -> None:
    env = {"LAIBAO_WECOM_TOKEN": TOKEN, "LAIBAO_WECOM_AES_KEY": AES_KEY, "LAIBAO_DIFY_URL": stub.base_url,
           "LAIBAO_DIFY_KEY": "app-test-key", "LAIBAO_REDIS_URL": redis_url}
    status, out, err = await laibao_check(env, tmp_path)
    assert status == 0, (out, err)
    redis_line, *rest = out.splitlines()
    assert redis_line.startswith("redis: ok, single server at 127.0.0.1:") and rest == [
        "dify (environment bot): ok, app mode chat"]
    assert [r.path for r in stub.requests] == ["/v1/info"]

    status, out, _ = await laibao_check(dict(env, LAIBAO_DIFY_KEY="app-wrong-key"), tmp_path)
    assert status == 1 and "dify (environment bot): FAILED" in out and "app-wrong-key" not in out

    status, out, _ = await laibao_check(dict(env, LAIBAO_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0"), tmp_path)
    assert status == 1 and out.startswith("redis: FAILED")

    status, out, err = await laibao_check({k: v for k, v in env.items() if k != "LAIBAO_DIFY_KEY"}, tmp_path)
    assert status == 2 and "LAIBAO_DIFY_KEY" in err and out == ""
