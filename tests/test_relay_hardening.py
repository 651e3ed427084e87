"""A relay that outlives WeCom's window: turns, admission, delivery after a crash, bounded answers and media."""

from __future__ import annotations

import asyncio
import base64
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio
from tornado.ioloop import IOLoop

from laibao import texts
from laibao.answer.budget import ByteBudget
from laibao.answer.job import CHECK_STEP, DELIVERABLE_BYTES, Transcript
from laibao.answer.render import think_blocks
from laibao.wecom import MAX_CONTENT_BYTES
from stores.keys import Keys
from tests.difystub import Script
from tests.harness import (
    Cluster,
    Service,
    eventually,
    follow,
    marked_service,
    message,
    refresh,
    running_cluster,
)
from tests.test_messages import PNG, media_message
from tests.wecomstub import ResponseUrlStub

WINDOW = {"stream_window": "3", "window_margin": "1"}  # the stream closes 2 s after the message


@pytest.fixture(params=["memory", "redis"])
def svc(request: pytest.FixtureRequest, io_loop: IOLoop) -> Iterator[Service]:
    """laibao with a short WeCom window (and the settings of the test's ``settings`` marker)."""
    with marked_service(request, io_loop, on_redis=request.param == "redis", **WINDOW) as service:
        yield service


@pytest.fixture
def redis_svc(request: pytest.FixtureRequest, io_loop: IOLoop) -> Iterator[Service]:
    """The same on Redis only."""
    with marked_service(request, io_loop, on_redis=True, **WINDOW) as service:
        yield service


async def to_the_end(svc: Service, payload: dict[str, Any]) -> list[dict[str, Any]]:
    """Send a message and poll it until WeCom's last reply; every stream reply."""
    first = await svc.wecom.stream(payload)
    if first["finish"]:
        return [first]
    return [first, *await follow([svc.wecom], str(first["id"]), limit=2000)]


def active(svc: Service) -> float:
    """Answers running on the in-process laibao."""
    return float(svc.runtime.metrics.active._value.get())


# ------------------------------------------------------------------------------- item 1: no hang


@pytest.mark.gen_test(timeout=60)
async def test_a_message_queued_behind_an_answer_that_outlives_the_window_is_answered(
    svc: Service, responses: ResponseUrlStub
) -> None:
    hold = asyncio.Event()
    svc.dify.push(Script(answer="第一条的回答", deltas=["第一条", "的回答"], hold=hold, ping_every=0.2),
                  Script(answer="第二条的回答"))
    first = await svc.wecom.stream(message("第一条", response_url=responses.url("one")))
    await asyncio.sleep(0.1)  # the repro: two messages 0.1 s apart (not a wait for a condition)
    second = await svc.wecom.stream(message("第二条", response_url=responses.url("two")))
    polls_one = await follow([svc.wecom], str(first["id"]), limit=2000)
    polls_two = await follow([svc.wecom], str(second["id"]), limit=2000)
    assert polls_one[-1]["content"].endswith(texts.WINDOW_NOTE)
    assert polls_two[-1]["content"] == texts.QUEUED_NOTE  # told, and not yet asked
    assert len(svc.dify.chat_calls) == 1
    hold.set()
    await eventually(lambda: len(responses.received) == 2, "both answers via response_url")
    assert sorted(responses.contents()) == sorted(["第一条的回答", "第二条的回答"])
    _, second_call = svc.dify.chat_calls
    assert second_call.json["query"] == "第二条"
    assert second_call.json["conversation_id"]  # the first's conversation, continued
    await eventually(lambda: active(svc) == 0, "both relays ended")


@pytest.mark.gen_test(timeout=60)
async def test_a_message_whose_state_vanished_while_it_waited_is_told_and_its_relay_ends(
    redis_svc: Service, redis_url: str, responses: ResponseUrlStub
) -> None:
    svc = redis_svc
    hold = asyncio.Event()
    svc.dify.push(Script(answer="第一条的回答", hold=hold, ping_every=0.2))
    await svc.wecom.stream(message("第一条", response_url=responses.url("one")))
    await eventually(lambda: len(svc.dify.chat_calls) == 1, "the first message at Dify")
    await svc.wecom.stream(message("第二条", response_url=responses.url("two")))
    await eventually(lambda: active(svc) == 2, "the second relay waiting")
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        await client.flushall()  # eviction, failover: the queue and the sessions are gone
    finally:
        await client.aclose()
    await eventually(lambda: responses.contents() == [texts.LOST], "the waiting message told")
    await eventually(lambda: active(svc) == 1, "the waiting relay ended")
    hold.set()
    await eventually(lambda: active(svc) == 0, "the first relay ended too")
    assert len(svc.dify.chat_calls) == 1


@pytest.mark.settings(stream_window="60", window_margin="1", turn_wait="1")
@pytest.mark.gen_test(timeout=60)
async def test_a_message_that_waits_past_the_turn_deadline_is_told(svc: Service) -> None:
    hold = asyncio.Event()
    svc.dify.push(Script(answer="很长的回答", hold=hold, ping_every=0.2))
    first = await svc.wecom.stream(message("第一条"))
    await eventually(lambda: len(svc.dify.chat_calls) == 1, "the first message at Dify")
    polls = await to_the_end(svc, message("第二条"))
    assert (polls[-1]["content"], polls[-1]["finish"]) == (texts.TURN_TIMEOUT, True)
    assert len(svc.dify.chat_calls) == 1
    hold.set()
    await follow([svc.wecom], str(first["id"]), limit=2000)


# ------------------------------------------------------------------ item 2: relay over, not window


@pytest.mark.settings(lease="2")
@pytest.mark.gen_test(timeout=60)
async def test_the_next_message_waits_for_the_relay_not_the_window_and_continues_its_conversation(
    redis_svc: Service, responses: ResponseUrlStub
) -> None:
    svc = redis_svc  # one backend is enough: the job logic is shared, both turn stores are tested in test_turns_store
    hold = asyncio.Event()
    svc.dify.push(Script(answer="第一条的回答", hold=hold, ping_every=0.2), Script(answer="第二条的回答"))
    first = await to_the_end(svc, message("第一条", response_url=responses.url("one")))
    assert first[-1]["content"].endswith(texts.WINDOW_NOTE)  # closed for WeCom, still streaming
    second = await to_the_end(svc, message("第二条", response_url=responses.url("two")))
    assert second[-1]["content"] == texts.QUEUED_NOTE
    closed = await svc.runtime.stores.streams.get(str(first[-1]["id"]))
    assert closed is not None

    async def beating_long_after_the_window() -> bool:
        # past the lease several times over: the relay's own heartbeat, not the stream's, keeps its turn
        session = await svc.runtime.stores.streams.get(str(first[-1]["id"]))
        return session is not None and float(session.extra.get("beat", "0")) > closed.deadline + 6

    await eventually(beating_long_after_the_window, "the first relay alive well past its window and lease")
    assert len(svc.dify.chat_calls) == 1  # two windows closed, and still only the first at Dify
    hold.set()
    await eventually(lambda: len(responses.received) == 2, "both answers via response_url")
    first_call, second_call = svc.dify.chat_calls
    assert not first_call.json.get("conversation_id")
    assert second_call.json["conversation_id"]


@pytest.mark.gen_test(timeout=60)
async def test_a_user_never_holds_more_than_three_dify_streams(svc: Service) -> None:
    hold = asyncio.Event()
    svc.dify.push(*[Script(answer=f"群{i}的回答", hold=hold, ping_every=0.2) for i in range(3)])
    # three group chats: three conversations of one user, all past their window
    chats = await asyncio.gather(*(to_the_end(svc, message("问题", chattype="group", chatid=chat))
                                   for chat in ("c1", "c2", "c3")))
    assert all(polls[-1]["content"].endswith(texts.WINDOW_NOTE) for polls in chats)
    fourth = await svc.wecom.stream(message("第四个", chattype="group", chatid="c4"))
    assert (fourth["content"], fourth["finish"]) == (texts.TOO_MANY, True)
    assert len(svc.dify.chat_calls) == 3
    hold.set()
    await eventually(lambda: active(svc) == 0, "the three relays ended")
    fifth = await to_the_end(svc, message("第五个", chattype="group", chatid="c4"))
    assert fifth[-1]["content"] == Script().answer
    assert len(svc.dify.chat_calls) == 4


# ----------------------------------------------------------- item 3: delivery survives kill -9


@pytest.fixture
def short_window_cluster(io_loop: IOLoop, redis_url: str, tmp_path: Path) -> Iterator[Cluster]:
    """Two real processes with a 3 s window, a short lease, a fast sweep and many delivery attempts."""
    settings = {"LAIBAO_STREAM_WINDOW": "3", "LAIBAO_WINDOW_MARGIN": "1", "LAIBAO_LEASE": "2",
                "LAIBAO_DELIVERY_SWEEP": "0.5", "LAIBAO_RESPONSE_URL_RETRIES": "12"}
    with running_cluster(io_loop, redis_url, tmp_path, **settings) as cluster:
        yield cluster


@pytest.mark.slow
@pytest.mark.gen_test(timeout=90)
async def test_an_answer_finished_after_the_window_is_delivered_once_after_kill_9(
    short_window_cluster: Cluster, redis_url: str, responses: ResponseUrlStub
) -> None:
    cluster = short_window_cluster
    hold = asyncio.Event()
    cluster.dify.push(Script(answer="窗口关闭后才完成的回答", hold=hold, ping_every=0.2))
    to_a = cluster.wecom(cluster.a)
    first = await to_a.stream(message("慢慢回答", response_url=responses.url()))
    polls = await follow([to_a], str(first["id"]), limit=2000)
    assert polls[-1]["content"].endswith(texts.WINDOW_NOTE)
    responses.fail_next = [503] * 1000  # A's attempts fail (not accepted) until A is dead
    hold.set()
    await eventually(lambda: responses.attempts >= 1, "A trying to deliver")
    cluster.a.proc.kill()  # kill -9 after the answer finished, before it was delivered
    cluster.a.proc.wait(timeout=10)
    responses.fail_next = []
    await eventually(lambda: len(responses.received) == 1, "the answer delivered by B")
    assert responses.contents() == ["窗口关闭后才完成的回答"]
    client = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
    try:
        key = Keys().stream(first['id'])
        await eventually(lambda: _field_is(client, key, "x:relay", "delivered"), "the delivery recorded")
        assert await client.zcard(Keys().undelivered) == 0
    finally:
        await client.aclose()
    assert len(responses.received) == 1  # exactly once
    assert "response_url delivery done" in cluster.b.log()


# ------------------------------------------------------------------------- item 7: bounded answers


@pytest.mark.settings(stream_window="360", window_margin="20")
@pytest.mark.gen_test(timeout=60)
async def test_a_hostile_answer_of_megabytes_keeps_only_what_can_be_delivered(
    redis_svc: Service, redis_url: str, responses: ResponseUrlStub
) -> None:
    svc = redis_svc
    line = "这是一行很长很长的回答，用来把内存和 Redis 塞满。\n"
    huge = line * (4 * 1024 * 1024 // len(line.encode()))  # about 4 MB, in a few giant deltas
    svc.dify.push(Script(answer=huge, deltas=[huge[: len(huge) // 2], huge[len(huge) // 2:]], cut=(1 << 16,)))
    first = await svc.wecom.stream(message("写一本书", response_url=responses.url()))
    sid = str(first["id"])
    client = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
    try:
        await eventually(lambda: _status(client, sid), "the answer stored")
        fields = await client.hgetall(Keys().stream(sid))
    finally:
        await client.aclose()
    stored = sum(len(value.encode()) for name, value in fields.items() if name.startswith(("c:", "x:outbox")))
    # the stream's part (measured every few KB, so a little over) and one response_url message
    assert stored <= MAX_CONTENT_BYTES + 16 * 4096 + MAX_CONTENT_BYTES
    polls = await follow([svc.wecom], sid, limit=2000)
    assert polls[-1]["content"].endswith(texts.OVERFLOW_NOTE)
    await eventually(lambda: len(responses.received) == 1, "the rest via response_url")
    (rest,) = responses.contents()
    assert rest.endswith(texts.TRUNCATED_NOTE) and len(rest.encode()) <= MAX_CONTENT_BYTES


async def _status(client: redis.asyncio.Redis, sid: str) -> bool:
    return await _field_is(client, Keys().stream(sid), "status", "done")


async def _field_is(client: redis.asyncio.Redis, key: str, name: str, value: str) -> bool:
    return bool(await client.hget(key, name) == value)


def test_a_transcript_keeps_only_what_can_be_delivered() -> None:
    transcript = Transcript("show", 512 * 1024)
    for_stream = transcript.add("答" * 3_000_000)  # 9 MB in one delta
    assert transcript.full and transcript.stream_full
    assert len(transcript.text.encode()) <= DELIVERABLE_BYTES + 4 * CHECK_STEP
    assert len(for_stream.encode()) <= MAX_CONTENT_BYTES + 4 * CHECK_STEP
    assert transcript.add("还有更多") == "" and len(transcript.text.encode()) <= DELIVERABLE_BYTES + 4 * CHECK_STEP
    # hidden reasoning shows nothing, so only the raw cap ends it; measured a bounded number of times
    hidden = Transcript("hide", 512 * 1024)
    for_stream = hidden.add("<think>" + "想" * 3_000_000)
    assert hidden.full and not hidden.stream_full and for_stream == hidden.text  # the raw cap bounds both
    assert len(hidden.text.encode()) <= 512 * 1024 + 4 * CHECK_STEP
    assert hidden.measured <= 512 * 1024 // CHECK_STEP


def test_hiding_reasoning_is_linear_in_the_answer() -> None:
    # The quadratic case: many reasoning blocks with text between them, think = "hide". Every
    # str.join over the whole output is counted: the work must not grow with the number of blocks.
    joins = 0

    def count(frame: Any, event: str, arg: Any) -> None:
        nonlocal joins
        if event == "c_call" and getattr(arg, "__name__", "") == "join":
            joins += 1

    small = "<think>想一想</think>答案的一部分。" * 100
    large = small * 10
    sys.setprofile(count)
    try:
        out_small = think_blocks(small, "hide", final=True)
        small_joins, joins = joins, 0
        out_large = think_blocks(large, "hide", final=True)
        large_joins = joins
    finally:
        sys.setprofile(None)
    assert out_large == out_small * 10 == "答案的一部分。" * 1000
    assert large_joins == small_joins <= 2  # one join at the end, not one per block


# --------------------------------------------------------------------------- item 17: media bounds


@pytest.mark.settings(stream_window="360", window_margin="20")
@pytest.mark.gen_test(timeout=30)
async def test_generated_images_go_with_the_first_finishing_reply_only(svc: Service) -> None:
    url = svc.dify.serve("chart.png", PNG, "image/png")
    svc.dify.push(Script(answer="这是图表", files=[url]))
    polls = await to_the_end(svc, message("画个图"))
    assert base64.b64decode(polls[-1]["msg_item"][0]["image"]["base64"]) == PNG
    again = await svc.wecom.stream(refresh(str(polls[-1]["id"])))
    assert again["finish"] and "msg_item" not in again  # not re-sent on every later poll
    session = await svc.runtime.stores.streams.get(str(polls[-1]["id"]))
    assert session is not None and "items" not in session.extra  # nor kept in the store


@pytest.mark.settings(stream_window="360", window_margin="20", media_deadline="1", wecom_media_hosts="127.0.0.1")
@pytest.mark.gen_test(timeout=20)
async def test_the_media_step_of_an_answer_has_a_deadline(svc: Service) -> None:
    # A WeCom media host that accepts the connection and never answers (the download's own timeout is 30 s).
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        port = silent.getsockname()[1]
        held = await svc.wecom.stream(message("", msgtype="image", image={"url": f"http://127.0.0.1:{port}/m"}))
        assert held["content"] == texts.MEDIA_HELD
        polls = await to_the_end(svc, message("看看这张图"))
        assert polls[-1]["content"] == texts.MEDIA_UNAVAILABLE
        assert svc.dify.chat_calls == []
    finally:
        silent.close()


@pytest.mark.settings(stream_window="360", window_margin="20", media_memory_bytes=str(3 * 20 * 1024 * 1024))
@pytest.mark.gen_test(timeout=60)
async def test_media_bytes_in_memory_are_bounded_per_process(svc: Service) -> None:
    budget = next(iter(svc.runtime.bots.values())).service.answers.files.budget
    for i in range(3):  # three users, each with a file, all at once
        payload = media_message(svc, "file", b"%PDF-1.4\n" + b"0" * 5000)
        payload["from"] = {"userid": f"user{i}"}
        await svc.wecom.stream(payload)
    replies = await asyncio.gather(*(to_the_end(svc, message("总结一下这个文件", user=f"user{i}")) for i in range(3)))
    assert all(polls[-1]["content"] == Script().answer for polls in replies)
    assert len(svc.dify.uploads) == 3
    assert budget.peak <= budget.limit  # one file (three times the size limit) in memory at a time


@pytest.mark.gen_test(timeout=10)
async def test_a_byte_budget_lets_reservations_through_only_while_they_fit() -> None:
    budget = ByteBudget(100)
    inside: list[int] = []
    most = 0
    release = asyncio.Event()

    async def use(size: int) -> None:
        nonlocal most
        async with budget.hold(size):
            inside.append(size)
            most = max(most, sum(inside))
            await release.wait()
            inside.remove(size)

    tasks = [asyncio.ensure_future(use(size)) for size in (60, 30, 50, 500)]
    await eventually(lambda: sum(inside) == 90, "the first two inside")
    assert budget.used == 90
    release.set()
    await asyncio.gather(*tasks)
    assert most <= 500 and budget.peak <= 500 and budget.used == 0
    assert budget.peak == max(90, 500)  # the oversized one ran alone
