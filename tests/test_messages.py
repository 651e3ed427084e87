"""Everything a WeCom user can send and everything a Dify app can answer, through the real HTTP path.

Each test plays WeCom (sealed callbacks in, what WeCom would show out) against laibao in this process,
on the in-process store and on a real redis-server, and checks what the Dify stand-in received.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tornado.ioloop import IOLoop

from laibao import texts
from laibao.config import Config, load_config
from laibao.crypto import WeComCrypto, generate_aes_key, generate_token
from laibao.wecom import MAX_CONTENT_BYTES
from stores.base import StreamSession
from stores.keys import Keys, scope_of
from tests.difystub import Script
from tests.harness import (
    CRYPTO,
    Service,
    WeCom,
    eventually,
    follow,
    marked_service,
    message,
    refresh,
    running_service,
)
from tests.wecomstub import ResponseUrlStub

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
PDF = b"%PDF-1.4\n" + b"0" * 2000


@pytest.fixture(params=["memory", "redis"])
def svc(request: pytest.FixtureRequest, io_loop: IOLoop) -> Iterator[Service]:
    """laibao with the settings of the test's ``settings`` marker."""
    with marked_service(request, io_loop, on_redis=request.param == "redis") as service:
        yield service


async def answer(svc: Service, payload: dict[str, Any]) -> list[dict[str, Any]]:
    """Send a message callback and follow its polls; every stream reply, the first included."""
    first = await svc.wecom.stream(payload)
    if first["finish"]:
        return [first]
    return [first, *await follow([svc.wecom], str(first["id"]))]


def media_message(svc: Service, kind: str, data: bytes, **extra: Any) -> dict[str, Any]:
    """A WeCom media callback whose URL serves ``data`` encrypted as WeCom serves it."""
    url = svc.dify.serve(f"wecom-{kind}-{len(svc.dify.static)}", CRYPTO.encrypt_media(data))
    return message("", msgtype=kind, **{kind: {"url": url}}, **extra)


# ------------------------------------------------------------------------------------------ inbound

@pytest.mark.gen_test(timeout=30)
async def test_image_alone_is_held_for_the_next_text(svc: Service) -> None:
    held = await answer(svc, media_message(svc, "image", PNG))
    assert (held[-1]["content"], held[-1]["finish"]) == (texts.MEDIA_HELD, True)
    assert svc.dify.chat_calls == []
    polls = await answer(svc, message("这张图里是什么？"))
    assert polls[-1]["content"] == Script().answer
    (upload,) = svc.dify.uploads
    assert (upload.data, upload.mime_type, upload.user) == (PNG, "image/png", "wecom:zhangsan")
    (call,) = svc.dify.chat_calls
    assert call.json["files"] == [{"type": "image", "transfer_method": "local_file", "upload_file_id": upload.id}]
    await answer(svc, message("再问一句"))  # the held image went with one message only
    assert "files" not in svc.dify.chat_calls[-1].json


@pytest.mark.gen_test(timeout=30)
async def test_mixed_message_sends_text_and_images_together(svc: Service) -> None:
    url = svc.dify.serve("mixed-img", CRYPTO.encrypt_media(PNG))
    mixed = message("", msgtype="mixed", mixed={"msg_item": [
        {"msgtype": "text", "text": {"content": "看看这个"}}, {"msgtype": "image", "image": {"url": url}}]})
    await answer(svc, mixed)
    (call,) = svc.dify.chat_calls
    assert call.json["query"] == "看看这个"
    assert [f["type"] for f in call.json["files"]] == ["image"]


@pytest.mark.gen_test(timeout=30)
async def test_files_over_difys_limit_get_a_clear_reply(svc: Service) -> None:
    svc.dify.parameters["system_parameters"]["file_size_limit"] = 0.001  # 1 KB
    await answer(svc, media_message(svc, "file", PDF))
    polls = await answer(svc, message("总结这个文件"))
    assert polls[-1]["content"] == texts.MEDIA_TOO_LARGE
    assert svc.dify.chat_calls == [] and svc.dify.uploads == []


@pytest.mark.gen_test(timeout=30)
async def test_files_of_a_type_the_app_refuses_get_a_clear_reply(svc: Service) -> None:
    svc.dify.parameters["file_upload"]["allowed_file_types"] = ["image"]
    await answer(svc, media_message(svc, "file", PDF))
    polls = await answer(svc, message("再试一次"))
    assert polls[-1]["content"] == texts.MEDIA_UNSUPPORTED
    assert svc.dify.chat_calls == [] and svc.dify.uploads == []


@pytest.mark.gen_test(timeout=30)
async def test_expired_media_url_gets_a_clear_reply(svc: Service) -> None:
    gone = message("", msgtype="image", image={"url": svc.dify.origin + "/files/expired"})
    await answer(svc, gone)
    polls = await answer(svc, message("图呢"))
    assert polls[-1]["content"] == texts.MEDIA_UNAVAILABLE


@pytest.mark.gen_test(timeout=30)
async def test_voice_and_quote(svc: Service) -> None:
    await answer(svc, message("", msgtype="voice", voice={"content": "明天北京天气"}))
    assert svc.dify.chat_calls[-1].json["query"] == "明天北京天气"
    await answer(svc, message("这句话对吗？", quote={"msgtype": "text", "text": {"content": "地球是平的"}}))
    assert svc.dify.chat_calls[-1].json["query"] == "这句话对吗？\n\n（引用的消息：地球是平的）"


def group(text: str, user: str, chat: str = "CHAT1") -> dict[str, Any]:
    return message(text, user=user, chattype="group", chatid=chat)


@pytest.mark.gen_test(timeout=30)
async def test_group_mentions_are_stripped_and_users_keep_their_own_conversations(svc: Service) -> None:
    await answer(svc, group("@智能助手 第一个问题", "zhangsan"))
    await answer(svc, group("@智能助手 李四的问题", "lisi"))
    await answer(svc, group("@智能助手 第二个问题", "zhangsan"))
    first, other, second = (c.json for c in svc.dify.chat_calls)
    assert (first["query"], first["user"], first["conversation_id"]) == ("第一个问题", "wecom:zhangsan", "")
    assert (other["user"], other["conversation_id"]) == ("wecom:lisi", "")
    assert second["conversation_id"] != ""


@pytest.mark.settings(group_scope="chat")
@pytest.mark.gen_test(timeout=30)
async def test_group_scope_chat_shares_one_conversation(svc: Service) -> None:
    await answer(svc, group("@bot 群里第一问", "zhangsan"))
    await answer(svc, group("@bot 群里第二问", "lisi"))
    first, second = (c.json for c in svc.dify.chat_calls)
    assert first["user"] == second["user"] == "wecom:group:CHAT1"
    assert second["conversation_id"] != "" and first["conversation_id"] == ""


@pytest.mark.settings(group_scope="chat")
@pytest.mark.gen_test(timeout=30)
async def test_a_userid_equal_to_a_chatid_has_its_own_conversation(svc: Service) -> None:
    await answer(svc, message("我单聊的问题", user="CHAT1"))
    await answer(svc, group("@bot 群里的问题", "lisi"))  # group CHAT1, one conversation per group
    await answer(svc, message("单聊接着问", user="CHAT1"))
    single, in_group, single_again = (c.json for c in svc.dify.chat_calls)
    assert in_group["conversation_id"] == ""  # not the single chat's conversation
    assert single_again["conversation_id"] != "" and single["conversation_id"] == ""


@pytest.mark.gen_test(timeout=30)
async def test_a_userid_with_a_slash_has_its_own_conversation(svc: Service) -> None:
    await answer(svc, message("单聊", user="CHAT1/lisi"))  # the same characters as lisi in group CHAT1
    await answer(svc, group("@bot 群聊", "lisi"))
    assert [c.json["conversation_id"] for c in svc.dify.chat_calls] == ["", ""]


@pytest.mark.gen_test(timeout=30)
async def test_another_users_reused_msgid_gets_its_own_answer(svc: Service) -> None:
    svc.dify.push(Script(answer="给张三的回答"))
    mine = await answer(svc, message("张三的问题", msgid="same-msgid"))
    assert mine[-1]["content"] == "给张三的回答"
    svc.dify.push(Script(answer="给李四的回答"))
    theirs = await answer(svc, message("李四的问题", user="lisi", msgid="same-msgid"))
    assert theirs[0]["id"] != mine[0]["id"] and theirs[-1]["content"] == "给李四的回答"
    assert [c.json["query"] for c in svc.dify.chat_calls] == ["张三的问题", "李四的问题"]
    # the same sender's redelivery still finds its own stream
    again = await svc.wecom.stream(message("张三的问题", msgid="same-msgid"))
    assert again["id"] == mine[0]["id"] and len(svc.dify.chat_calls) == 2


@pytest.mark.gen_test(timeout=30)
async def test_new_conversation_and_help_commands(svc: Service) -> None:
    await answer(svc, message("记住我叫张三"))
    reply = await answer(svc, message("新对话"))
    assert (reply[-1]["content"], reply[-1]["finish"]) == (texts.NEW_CONVERSATION, True)
    await answer(svc, message("我叫什么？"))
    assert svc.dify.chat_calls[-1].json["conversation_id"] == ""
    assert len(svc.dify.chat_calls) == 2
    helped = await answer(svc, message("/help"))
    assert "/new" in helped[-1]["content"] and "/stop" in helped[-1]["content"]


@pytest.mark.gen_test(timeout=30)
async def test_stop_ends_the_answer_with_what_was_generated(svc: Service) -> None:
    never = asyncio.Event()
    svc.dify.push(Script(answer="已经生成的部分", deltas=["已经生成的", "部分"], hold=never, ping_every=0.2))
    first = await svc.wecom.stream(message("写一篇长文"))
    sid = str(first["id"])

    async def partial_shown() -> bool:
        return "部分" in str((await svc.wecom.stream(refresh(sid)))["content"])

    await eventually(partial_shown, "the partial answer is shown")
    stopped = await answer(svc, message("停止"))
    assert stopped[-1]["content"] == texts.STOPPED
    polls = await follow([svc.wecom], sid)
    assert polls[-1]["content"] == "已经生成的部分\n\n" + texts.STOPPED_NOTE
    assert len(svc.dify.stops) == 1
    nothing = await answer(svc, message("/stop"))
    assert nothing[-1]["content"] == texts.NOTHING_TO_STOP


@pytest.mark.gen_test(timeout=30)
async def test_messages_of_one_conversation_reach_dify_one_at_a_time_in_order(svc: Service) -> None:
    hold = asyncio.Event()
    svc.dify.push(Script(answer="第一个回答", hold=hold, ping_every=0.2), Script(answer="第二个回答"))
    first = await svc.wecom.stream(message("第一问"))
    second = await svc.wecom.stream(message("第二问"))
    await eventually(lambda: bool(svc.dify.chat_calls), "Dify is asked")
    await asyncio.sleep(0.5)  # time enough for a wrongly parallel second call to arrive
    assert [c.json["query"] for c in svc.dify.chat_calls] == ["第一问"]
    hold.set()
    assert (await follow([svc.wecom], str(first["id"])))[-1]["content"] == "第一个回答"
    assert (await follow([svc.wecom], str(second["id"])))[-1]["content"] == "第二个回答"
    queries = [c.json for c in svc.dify.chat_calls]
    assert [q["query"] for q in queries] == ["第一问", "第二问"]
    assert queries[1]["conversation_id"] != ""  # the second waited for the first's conversation


@pytest.mark.gen_test(timeout=30)
async def test_at_most_three_messages_of_a_user_in_flight(svc: Service) -> None:
    hold = asyncio.Event()
    svc.dify.default = Script(hold=hold, ping_every=0.2)
    first = [await svc.wecom.stream(message(f"问题{i}")) for i in range(3)]
    assert [stream["finish"] for stream in first] == [False] * 3
    fourth = await svc.wecom.stream(message("第四个"))
    assert (fourth["content"], fourth["finish"]) == (texts.TOO_MANY, True)
    polled = await svc.wecom.stream(refresh(str(fourth["id"])))  # WeCom's poll of it, should one come
    assert (polled["content"], polled["finish"]) == (texts.TOO_MANY, True)
    other = await svc.wecom.stream(message("别人的问题", user="lisi"))
    assert other["finish"] is False
    hold.set()
    for stream in [*first, other]:
        await follow([svc.wecom], str(stream["id"]))
    assert "第四个" not in [c.json["query"] for c in svc.dify.chat_calls]  # the refused one never reached Dify
    # the answers are done: the user's slots are free again
    svc.dify.default = Script()
    again = await answer(svc, message("第五个"))
    assert again[-1]["content"] == Script().answer
    assert [c.json["query"] for c in svc.dify.chat_calls].count("第五个") == 1


# ----------------------------------------------------------------------------------------- outbound

@pytest.mark.parametrize("mode", ["chat", "agent-chat", "advanced-chat", "completion", "workflow"])
@pytest.mark.gen_test(timeout=30)
async def test_every_app_type(svc: Service, mode: str) -> None:
    svc.dify.mode = mode
    svc.dify.default = Script(answer=f"{mode} 的回答", event="agent_message" if mode == "agent-chat" else "message")
    polls = await answer(svc, message("你好"))
    assert polls[-1]["content"] == f"{mode} 的回答"
    by_mode = {"completion": svc.dify.completion_calls, "workflow": svc.dify.workflow_calls}
    calls = by_mode.get(mode, svc.dify.chat_calls)
    (call,) = calls
    if mode in ("completion", "workflow"):
        assert call.json["inputs"]["query"] == "你好"


@pytest.mark.gen_test(timeout=30)
async def test_workflow_without_text_chunks_falls_back_to_outputs(svc: Service) -> None:
    svc.dify.mode = "workflow"
    svc.dify.push(Script(answer="来自 outputs 的结果", text_chunks=False))
    polls = await answer(svc, message("跑一下"))
    assert polls[-1]["content"] == "来自 outputs 的结果"


@pytest.mark.gen_test(timeout=30)
async def test_reasoning_is_shown_through_wecom_think(svc: Service) -> None:
    svc.dify.push(Script(answer="结论", think="先想一想"),
                  Script(answer="结论", think="再想想", think_format="details"))
    polls = await answer(svc, message("为什么"))
    assert polls[-1]["content"].startswith("<think>") and "先想一想" in polls[-1]["content"]
    assert polls[-1]["content"].endswith("结论")
    polls = await answer(svc, message("为什么呢"))
    assert "<details" not in polls[-1]["content"] and "<think>" in polls[-1]["content"]


@pytest.mark.settings(think="hide")
@pytest.mark.gen_test(timeout=30)
async def test_reasoning_can_be_hidden(svc: Service) -> None:
    svc.dify.push(Script(answer="只有结论", think="不给你看"))
    polls = await answer(svc, message("为什么"))
    assert all("不给你看" not in str(p["content"]) and "<think" not in str(p["content"]) for p in polls)
    assert polls[-1]["content"].strip() == "只有结论"


@pytest.mark.gen_test(timeout=30)
async def test_generated_images_arrive_as_msg_item_on_the_finishing_reply(svc: Service) -> None:
    chart, linked_png = PNG, PNG + b"another picture"
    url = svc.dify.serve("chart.png", chart, "image/png")
    linked = svc.dify.serve("linked.png", linked_png, "image/png")
    svc.dify.push(Script(answer=f"这是图表 ![图]({linked})", files=[url]))
    polls = await answer(svc, message("画个图"))
    assert all("msg_item" not in p for p in polls[:-1])
    items = polls[-1]["msg_item"]
    assert [i["msgtype"] for i in items] == ["image", "image"]
    shown = [base64.b64decode(i["image"]["base64"]) for i in items]
    assert sorted(shown) == sorted([chart, linked_png])  # the message_file image and the linked one
    for item, data in zip(items, shown, strict=True):
        assert item["image"]["md5"] == hashlib.md5(data).hexdigest()


@pytest.mark.gen_test(timeout=60)
async def test_answers_over_20480_bytes_show_the_head_and_send_the_rest(
    svc: Service, responses: ResponseUrlStub
) -> None:
    long_answer = "".join(f"第{i}段：这是一段很长的回答内容，用来超过企业微信的长度上限。\n" for i in range(400))
    assert MAX_CONTENT_BYTES < len(long_answer.encode()) < 2 * MAX_CONTENT_BYTES
    svc.dify.push(Script(answer=long_answer, cut=(4096,)))
    polls = await answer(svc, message("写长一点", response_url=responses.url()))
    assert all(len(str(p["content"]).encode()) <= MAX_CONTENT_BYTES for p in polls)
    final = str(polls[-1]["content"])
    assert final.endswith(texts.OVERFLOW_NOTE)
    shown = final.removesuffix("\n\n" + texts.OVERFLOW_NOTE)
    await eventually(lambda: bool(responses.received), "the response_url delivery")
    (rest,) = responses.contents()
    assert shown + rest == long_answer


@pytest.mark.gen_test(timeout=60)
async def test_what_even_response_url_cannot_hold_is_cut_with_a_note(svc: Service, responses: ResponseUrlStub) -> None:
    huge = "".join(f"第{i}行：超长回答。\n" for i in range(5000))
    svc.dify.push(Script(answer=huge, cut=(65536,)))
    polls = await answer(svc, message("写个超长的", response_url=responses.url()))
    assert polls[-1]["content"].endswith(texts.OVERFLOW_NOTE)
    await eventually(lambda: bool(responses.received), "the response_url delivery")
    (rest,) = responses.contents()
    assert len(rest.encode()) <= MAX_CONTENT_BYTES and rest.endswith(texts.TRUNCATED_NOTE)


@pytest.mark.settings(stream_window="3", window_margin="1")
@pytest.mark.gen_test(timeout=60)
async def test_before_the_window_closes_the_stream_finishes_and_the_full_answer_follows(
    svc: Service, responses: ResponseUrlStub
) -> None:
    hold = asyncio.Event()
    responses.fail_next = [502]  # one transient failure: retried
    svc.dify.push(Script(answer="开头部分，后面还有很多", deltas=["开头部分，", "后面还有很多"], hold=hold,
                         ping_every=0.2))
    polls = await answer(svc, message("慢慢回答", response_url=responses.url()))
    assert polls[-1]["content"] == "开头部分，后面还有很多\n\n" + texts.WINDOW_NOTE
    assert responses.received == []
    hold.set()
    await eventually(lambda: bool(responses.received), "the response_url delivery")
    assert responses.contents() == ["开头部分，后面还有很多"]


# ------------------------------------------------------------------------------------------- events

def event(kind: str, **body: Any) -> dict[str, Any]:
    return {"msgid": "e", "aibotid": "AIBOT", "chattype": "single", "from": {"userid": "zhangsan"},
            "msgtype": "event", "event": {"eventtype": kind, **body}}


@pytest.mark.gen_test(timeout=30)
async def test_enter_chat_uses_dify_opening_statement(svc: Service) -> None:
    svc.dify.parameters.update(opening_statement="欢迎使用人事助手", suggested_questions=["年假怎么算？", "怎么报销？"])
    reply = await svc.wecom.post(event("enter_chat"))
    welcome = "欢迎使用人事助手\n你可以这样问：\n- 年假怎么算？\n- 怎么报销？"
    assert reply == {"msgtype": "text", "text": {"content": welcome}}


@pytest.mark.settings(welcome="你好，我是 IT 助手")
@pytest.mark.gen_test(timeout=30)
async def test_enter_chat_configured_welcome(svc: Service) -> None:
    reply = await svc.wecom.post(event("enter_chat"))
    assert reply == {"msgtype": "text", "text": {"content": "你好，我是 IT 助手"}}


@pytest.mark.gen_test(timeout=30)
async def test_feedback_reaches_dify_for_the_right_message_and_user(svc: Service) -> None:
    polls = await answer(svc, message("评价我"))
    sid = polls[0]["id"]
    assert polls[0]["feedback"] == {"id": sid}
    assert await svc.wecom.post(event("feedback_event", feedback_event={"id": sid, "type": 1})) is None
    assert await svc.wecom.post(event("feedback_event", feedback_event={
        "id": sid, "type": 2, "content": "数字不对", "inaccurate_reason_list": [2, 3]})) is None
    assert await svc.wecom.post(event("feedback_event", feedback_event={"id": sid, "type": 3})) is None
    assert await svc.wecom.post(event("template_card_event", template_card_event={"task_id": "t"})) is None
    await eventually(lambda: len(svc.dify.feedbacks) == 3, "three feedbacks reach Dify")
    like, dislike, cancel = svc.dify.feedbacks
    message_id = like["message_id"]
    assert message_id and {f["message_id"] for f in svc.dify.feedbacks} == {message_id}
    assert (like["rating"], like["user"]) == ("like", "wecom:zhangsan")
    assert (dislike["rating"], dislike["content"]) == ("dislike", "回答不完整；回答有误；数字不对")
    assert cancel["rating"] is None


@pytest.mark.gen_test(timeout=30)
async def test_ratings_of_one_answer_reach_dify_in_the_order_the_user_gave_them(svc: Service) -> None:
    sid = (await answer(svc, message("评价我")))[0]["id"]
    svc.dify.hold_first_feedback = hold = asyncio.Event()
    for kind in (1, 2, 3):  # like, dislike, cancel: Dify must end with the cancel
        assert await svc.wecom.post(event("feedback_event", feedback_event={"id": sid, "type": kind})) is None
    await eventually(lambda: svc.dify.feedback_requests >= 1, "the like reaches Dify (and is held there)")
    # An observation window: while the like is held, nothing overtakes it (a slow machine can only make
    # this less strict). Without the per-stream order the dislike and the cancel arrive here.
    await asyncio.sleep(0.5)
    assert svc.dify.feedback_requests == 1
    hold.set()
    await eventually(lambda: len(svc.dify.feedbacks) == 3, "all three ratings reach Dify")
    assert [f["rating"] for f in svc.dify.feedbacks] == ["like", "dislike", None]


# --------------------------------------------------------------------------------------- several bots

@pytest.fixture
def two_bots(io_loop: IOLoop, redis_url: str, tmp_path: Path) -> Iterator[Service]:
    """Bots "hr" and "it" from a TOML file, each with its own Token and key, on one Redis."""
    keys = {name: (generate_token(), generate_aes_key()) for name in ("hr", "it")}

    def configure(dify_url: str) -> Config:
        toml = tmp_path / "laibao.toml"
        toml.write_text(f'redis_url = "{redis_url}"\nnode_id = "n1"\n' + "".join(
            f'[[bots]]\nname = "{name}"\ntoken = "{token}"\naes_key = "{key}"\ndify_url = "{dify_url}"\n'
            f'dify_key = "app-test-key"\nplaceholder = "{name} 思考中"\n'
            for name, (token, key) in keys.items()))
        return load_config(config_file=str(toml), environ={}, dotenv=None)

    with running_service(io_loop, redis_url, configure=configure) as service:
        service.extra = {name: WeComCrypto(token, key) for name, (token, key) in keys.items()}  # type: ignore[attr-defined]
        yield service


@pytest.mark.gen_test(timeout=30)
async def test_several_bots_keep_their_state_apart(two_bots: Service) -> None:
    cryptos: dict[str, WeComCrypto] = two_bots.extra  # type: ignore[attr-defined]
    hr = WeCom(two_bots.wecom.http, two_bots.wecom.base_url, path="/wecom/callback/hr", crypto=cryptos["hr"])
    it = WeCom(two_bots.wecom.http, two_bots.wecom.base_url, path="/wecom/callback/it", crypto=cryptos["it"])
    first = await hr.stream(message("请假流程？", msgid="same-msgid"))
    assert first["content"] == "hr 思考中"
    await follow([hr], str(first["id"]))
    other = await it.stream(message("电脑坏了", msgid="same-msgid"))  # same msgid, other bot: no dedupe
    assert other["id"] != first["id"] and other["content"] == "it 思考中"
    await follow([it], str(other["id"]))
    await follow([hr], str((await hr.stream(message("还有呢？")))["id"]))
    _, it_call, hr_second = (c.json for c in two_bots.dify.chat_calls)
    assert it_call["conversation_id"] == "" and hr_second["conversation_id"] != ""
    # A callback sealed for one bot is refused by the other, and polls never cross bots.
    params, body = cryptos["hr"].seal_callback(message("串台"))
    assert (await it.raw(params, body)).code == 401
    crossed = await it.stream(refresh(str(first["id"])))
    assert (crossed["content"], crossed["finish"]) == (texts.EXPIRED, True)
    keys = await two_bots.keys()
    names = Keys()
    for bot in ("hr", "it"):
        assert names.msgid(bot, "zhangsan", "", "same-msgid") in keys
        assert names.conversation(bot, scope_of("zhangsan", "", "user")) in keys


@pytest.mark.gen_test(timeout=30)
async def test_a_conversation_is_not_blocked_by_a_head_abandoned_after_the_window(svc: Service) -> None:
    streams, turns = svc.runtime.stores.streams, svc.runtime.turns.turns
    long_ago = time.time() - 3600
    scope = scope_of("zhangsan", "", "user")
    dead = StreamSession(sid="dead", bot="default", user="zhangsan", scope=scope, owner="gone-node",
                         created=long_ago, deadline=long_ago + 360, heartbeat=long_ago + 10, status="streaming")
    await streams.create(dead, 1800)
    await turns.join("default", scope, "dead", 1800)
    polls = await answer(svc, message("前面那条早就没人管了"))
    assert polls[-1]["content"] == Script().answer
    assert await turns.head("default", scope) != "dead"  # dropped, not merely skipped


@pytest.mark.gen_test(timeout=30)
async def test_a_redelivered_command_gets_the_same_reply_and_runs_once(svc: Service) -> None:
    await answer(svc, message("记住这个"))
    first = await svc.wecom.stream(message("/new", msgid="cmd-1"))
    again = await svc.wecom.stream(message("/new", msgid="cmd-1"))
    assert (again["id"], again["content"], again["finish"]) == (first["id"], texts.NEW_CONVERSATION, True)
    polled = await svc.wecom.stream(refresh(str(first["id"])))
    assert (polled["content"], polled["finish"]) == (texts.NEW_CONVERSATION, True)
