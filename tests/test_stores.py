"""One contract suite for the stores, run against the memory and the Redis implementation alike.

The Redis-only tests at the end pin what other processes and operators rely on: the key layout,
one round trip per poll, expiry re-armed by writes, and StoreError when Redis is down.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
import tracemalloc
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
import tornado.ioloop

from laibao.errors import StoreError
from stores import (
    DONE,
    ERROR,
    QUEUED,
    STREAMING,
    ChunkWrite,
    MemoryStores,
    RedisStores,
    Snapshot,
    StreamSession,
    open_stores,
)
from stores.keys import Keys
from stores.memory_store import ExpiringMap
from stores.relay_store import MemoryRelayState, RedisRelayState, RelayState
from tests.clock import FakeClock
from tests.conftest import REDIS_MODES, redis_url_for
from tests.harness import eventually
from tests.servers import RedisServer

AnyStores = MemoryStores | RedisStores

T0 = 1_732_500_000.25  # a fixed "now" for heartbeats and leases (the callers pass their own clock)
TTL = 1800.0
LEASE = 15.0


def session(sid: str = "s1", owner: str = "node-a", **fields: Any) -> StreamSession:
    """A freshly received message's session, owned by ``owner``."""
    values: dict[str, Any] = {
        "sid": sid, "bot": "helpdesk", "user": "zhangsan", "owner": owner,
        "created": T0, "deadline": T0 + 360, "heartbeat": T0,
    }
    values.update(fields)
    return StreamSession(**values)


@pytest.fixture
def clock() -> FakeClock:
    """The memory stores' clock (Redis keeps its own time)."""
    return FakeClock(T0)


@pytest.fixture(params=["memory", *REDIS_MODES])
def stores(request: pytest.FixtureRequest, io_loop: tornado.ioloop.IOLoop) -> Iterator[AnyStores]:
    """Each implementation in turn; Redis in each mode (one server, cluster, sentinel), flushed."""
    built: AnyStores
    if request.param == "memory":
        built = MemoryStores(clock=request.getfixturevalue("clock"))
    else:
        built = RedisStores(redis_url_for(request, request.param))
    yield built
    io_loop.run_sync(built.close)


@pytest.fixture
def redis_stores(redis_url: str, io_loop: tornado.ioloop.IOLoop) -> Iterator[RedisStores]:
    """The Redis implementation only, for what is specific to it."""
    built = RedisStores(redis_url)
    yield built
    io_loop.run_sync(built.close)


# --------------------------------------------------------------------------------------- sessions

@pytest.mark.gen_test
async def test_create_get_round_trips_every_field(stores: AnyStores) -> None:
    original = StreamSession(
        sid="s-全字段", bot="helpdesk", user="张三", chat="wrkSFfCgAAtMQKg4xqDatM5C9IPAqTlA",
        query="报销流程是什么？😀", scope="wrkSFfCgAAtMQKg4xqDatM5C9IPAqTlA:张三",
        response_url="https://qyapi.weixin.qq.com/cgi-bin/aibot/response?response_code=abc",
        owner="10.0.0.7:8001", created=T0, deadline=T0 + 360.5, status=STREAMING,
        heartbeat=T0 + 0.123456789, conversation_id="conv-1", message_id="msg-1", task_id="task-1",
        extra={"msgtype": "mixed", "备注": "中文值", "empty": ""},
    )
    await stores.streams.create(original, TTL)
    assert await stores.streams.get("s-全字段") == original
    assert await stores.streams.get("unknown") is None


@pytest.mark.gen_test
async def test_defaults_round_trip(stores: AnyStores) -> None:
    plain = StreamSession(sid="s1", bot="b", user="u")
    await stores.streams.create(plain, TTL)
    assert await stores.streams.get("s1") == plain


@pytest.mark.gen_test
async def test_any_text_round_trips(stores: AnyStores) -> None:
    # JSON from Dify may carry a lone surrogate ("\ud800" escape) or NUL; neither may break a poll
    odd = "a\x00b\ud800c\U0001f600\r\n"
    await stores.streams.create(session(query=odd), TTL)
    assert await stores.streams.append("s1", "node-a", odd, T0)
    got = await stores.streams.get("s1")
    snap = await stores.streams.poll("s1")
    assert got is not None and got.query == odd
    assert snap is not None and snap.content == odd


@pytest.mark.gen_test
async def test_append_keeps_order_and_marks_streaming(stores: AnyStores) -> None:
    await stores.streams.create(session(), TTL)
    for i, part in enumerate(["你好", "，", "世界", "!"]):
        assert await stores.streams.append("s1", "node-a", part, T0 + i)
    got = await stores.streams.get("s1")
    assert got is not None
    assert (got.status, got.n, got.heartbeat) == (STREAMING, 4, T0 + 3)
    snap = await stores.streams.poll("s1")
    assert snap == Snapshot(status=STREAMING, content="你好，世界!", n=4, unread=4, owner="node-a",
                            heartbeat=T0 + 3, deadline=T0 + 360, final_delivered=False)
    assert not snap.finished


@pytest.mark.gen_test
async def test_poll_marks_chunks_read(stores: AnyStores) -> None:
    await stores.streams.create(session(), TTL)
    empty = await stores.streams.poll("s1")
    assert empty is not None and (empty.content, empty.n, empty.unread, empty.status) == ("", 0, 0, QUEUED)
    for part in ["一", "二", "三"]:
        await stores.streams.append("s1", "node-a", part, T0)
    first = await stores.streams.poll("s1")
    second = await stores.streams.poll("s1")
    await stores.streams.append("s1", "node-a", "四", T0)
    third = await stores.streams.poll("s1")
    assert first is not None and second is not None and third is not None
    assert (first.content, first.n, first.unread) == ("一二三", 3, 3)
    assert (second.content, second.n, second.unread) == ("一二三", 3, 0)
    assert (third.content, third.n, third.unread) == ("一二三四", 4, 1)
    assert await stores.streams.poll("unknown") is None


@pytest.mark.gen_test
async def test_replace_makes_one_unread_chunk(stores: AnyStores) -> None:
    await stores.streams.create(session(), TTL)
    for part in ["旧", "的", "回答"]:
        await stores.streams.append("s1", "node-a", part, T0)
    await stores.streams.poll("s1")
    assert await stores.streams.replace("s1", "node-a", "新的回答", T0 + 5)
    snap = await stores.streams.poll("s1")
    assert snap is not None
    assert (snap.content, snap.n, snap.unread, snap.status, snap.heartbeat) == (
        "新的回答", 1, 1, STREAMING, T0 + 5)
    await stores.streams.append("s1", "node-a", "，续", T0 + 6)
    snap = await stores.streams.poll("s1")
    assert snap is not None and (snap.content, snap.n, snap.unread) == ("新的回答，续", 2, 1)


@pytest.mark.gen_test(timeout=30)
async def test_long_answers_poll_and_replace_whole(stores: AnyStores) -> None:
    # more chunks than one Lua unpack() can take, so the scripts must batch
    await stores.streams.create(session(), TTL)
    parts = [f"{i}," for i in range(4500)]
    for part in parts:
        await stores.streams.append("s1", "node-a", part, T0)
    snap = await stores.streams.poll("s1")
    assert snap is not None and (snap.content, snap.n, snap.unread) == ("".join(parts), 4500, 4500)
    await stores.streams.append("s1", "node-a", "x", T0)
    snap = await stores.streams.poll("s1")
    assert snap is not None and (snap.n, snap.unread) == (4501, 1)
    assert await stores.streams.replace("s1", "node-a", "短", T0)
    snap = await stores.streams.poll("s1")
    assert snap is not None and (snap.content, snap.n, snap.unread) == ("短", 1, 1)


@pytest.mark.gen_test
async def test_finish_appends_text_and_sets_fields(stores: AnyStores) -> None:
    await stores.streams.create(session(), TTL)
    await stores.streams.append("s1", "node-a", "答案", T0)
    fields = {"conversation_id": "c-9", "message_id": "m-9", "task_id": "t-9", "latency": "1.5"}
    assert await stores.streams.finish("s1", "node-a", DONE, "。", fields, T0 + 9)
    got = await stores.streams.get("s1")
    assert got is not None
    assert (got.status, got.conversation_id, got.message_id, got.task_id, got.n, got.heartbeat) == (
        DONE, "c-9", "m-9", "t-9", 2, T0 + 9)
    assert got.extra == {"latency": "1.5"}
    snap = await stores.streams.poll("s1")
    assert snap is not None and snap.finished and (snap.content, snap.unread) == ("答案。", 2)
    assert snap.items == ""


@pytest.mark.gen_test
async def test_the_finishing_poll_carries_the_images(stores: AnyStores) -> None:
    await stores.streams.create(session(), TTL)
    await stores.streams.annotate("s1", {"items": "early"})  # not shown while running
    running = await stores.streams.poll("s1")
    assert running is not None and running.items == ""
    assert await stores.streams.finish("s1", "node-a", DONE, "图", {"items": '[{"msgtype":"image"}]'}, T0)
    snap = await stores.streams.poll("s1")
    assert snap is not None and snap.items == '[{"msgtype":"image"}]'


@pytest.mark.gen_test
async def test_poll_for_another_bot_sees_nothing_and_changes_nothing(stores: AnyStores) -> None:
    await stores.streams.create(session(bot="hr"), TTL)
    await stores.streams.append("s1", "node-a", "人事的回答", T0)
    assert await stores.streams.poll("s1", "it") is None
    own = await stores.streams.poll("s1", "hr")
    assert own is not None and (own.content, own.unread) == ("人事的回答", 1)


@pytest.mark.gen_test
async def test_annotate_sets_fields_whoever_owns_it(stores: AnyStores) -> None:
    await stores.streams.create(session(), TTL)
    await stores.streams.append("s1", "node-a", "答", T0)
    assert await stores.streams.annotate("s1", {"task_id": "t-1", "stop": "1"})
    got = await stores.streams.get("s1")
    assert got is not None and (got.task_id, got.extra.get("stop"), got.owner, got.n) == ("t-1", "1", "node-a", 1)
    assert not await stores.streams.annotate("missing", {"task_id": "t-2"})
    assert await stores.streams.get("missing") is None


@pytest.mark.gen_test
async def test_finish_without_text_adds_no_chunk(stores: AnyStores) -> None:
    await stores.streams.create(session(), TTL)
    await stores.streams.append("s1", "node-a", "部分答案", T0)
    assert await stores.streams.finish("s1", "node-a", ERROR, "", {}, T0)
    snap = await stores.streams.poll("s1")
    assert snap is not None and (snap.status, snap.content, snap.n) == (ERROR, "部分答案", 1)


@pytest.mark.gen_test
async def test_finish_refuses_a_running_status(stores: AnyStores) -> None:
    await stores.streams.create(session(), TTL)
    with pytest.raises(ValueError):
        await stores.streams.finish("s1", "node-a", STREAMING, "x", {}, T0)
    got = await stores.streams.get("s1")
    assert got is not None and (got.status, got.n) == (QUEUED, 0)


@pytest.mark.gen_test
async def test_final_delivered_only_after_a_terminal_poll(stores: AnyStores) -> None:
    await stores.streams.create(session(), TTL)
    await stores.streams.append("s1", "node-a", "答", T0)
    running = await stores.streams.poll("s1")
    await stores.streams.finish("s1", "node-a", DONE, "完", {}, T0)
    first_final = await stores.streams.poll("s1")
    second_final = await stores.streams.poll("s1")
    assert running is not None and first_final is not None and second_final is not None
    assert not running.final_delivered
    assert first_final.finished and not first_final.final_delivered and first_final.content == "答完"
    assert second_final.finished and second_final.final_delivered and second_final.content == "答完"


@pytest.mark.gen_test
async def test_other_owner_changes_nothing(stores: AnyStores) -> None:
    await stores.streams.create(session(), TTL)
    await stores.streams.append("s1", "node-a", "原文", T0)
    before = await stores.streams.get("s1")
    for intruder in ["node-b", ""]:
        assert not await stores.streams.append("s1", intruder, "x", T0 + 1)
        assert not await stores.streams.replace("s1", intruder, "x", T0 + 1)
        assert not await stores.streams.finish("s1", intruder, DONE, "x", {"task_id": "t"}, T0 + 1)
        assert not await stores.streams.heartbeat("s1", intruder, T0 + 1)
        assert not await stores.streams.release("s1", intruder)
    assert await stores.streams.get("s1") == before
    snap = await stores.streams.poll("s1")
    assert snap is not None and (snap.content, snap.status, snap.owner) == ("原文", STREAMING, "node-a")


@pytest.mark.gen_test
async def test_terminal_session_changes_no_more(stores: AnyStores) -> None:
    await stores.streams.create(session(), TTL)
    await stores.streams.finish("s1", "node-a", DONE, "完", {"conversation_id": "c1"}, T0)
    before = await stores.streams.get("s1")
    assert not await stores.streams.append("s1", "node-a", "x", T0 + 99)
    assert not await stores.streams.replace("s1", "node-a", "x", T0 + 99)
    assert not await stores.streams.finish("s1", "node-a", ERROR, "x", {"conversation_id": "c2"}, T0 + 99)
    assert not await stores.streams.heartbeat("s1", "node-a", T0 + 99)
    assert not await stores.streams.release("s1", "node-a")
    assert not await stores.streams.take_over("s1", "node-b", T0 + 999, LEASE)
    assert await stores.streams.get("s1") == before


@pytest.mark.gen_test
async def test_missing_session_writes_nothing(stores: AnyStores) -> None:
    assert not await stores.streams.append("nope", "node-a", "x", T0)
    assert not await stores.streams.replace("nope", "node-a", "x", T0)
    assert not await stores.streams.finish("nope", "node-a", DONE, "x", {}, T0)
    assert not await stores.streams.heartbeat("nope", "node-a", T0)
    assert not await stores.streams.take_over("nope", "node-b", T0, LEASE)
    assert not await stores.streams.release("nope", "node-a")
    assert await stores.streams.get("nope") is None
    assert await stores.streams.poll("nope") is None


@pytest.mark.gen_test
async def test_heartbeat_updates_only_the_heartbeat(stores: AnyStores) -> None:
    await stores.streams.create(session(), TTL)
    assert await stores.streams.heartbeat("s1", "node-a", T0 + 7.5)
    got = await stores.streams.get("s1")
    assert got == session(heartbeat=T0 + 7.5)


@pytest.mark.gen_test
async def test_take_over_needs_a_stale_heartbeat(stores: AnyStores) -> None:
    await stores.streams.create(session(), TTL)
    await stores.streams.append("s1", "node-a", "半个答案", T0)
    assert not await stores.streams.take_over("s1", "node-b", T0 + LEASE, LEASE)  # exactly at the lease
    got = await stores.streams.get("s1")
    assert got is not None and (got.owner, got.status) == ("node-a", STREAMING)
    assert await stores.streams.take_over("s1", "node-b", T0 + LEASE + 0.5, LEASE)
    got = await stores.streams.get("s1")
    assert got is not None
    assert (got.owner, got.status, got.heartbeat) == ("node-b", QUEUED, T0 + LEASE + 0.5)
    # the old owner, back from a pause, can no longer write
    assert not await stores.streams.append("s1", "node-a", "迟到", T0 + 20)
    assert await stores.streams.append("s1", "node-b", "新", T0 + 20)


@pytest.mark.gen_test
async def test_take_over_race_has_one_winner(stores: AnyStores) -> None:
    for i in range(5):
        await stores.streams.create(session(f"s{i}"), TTL)
    now = T0 + 60
    for i in range(5):
        results = await asyncio.gather(
            *(stores.streams.take_over(f"s{i}", f"node-{j}", now, LEASE) for j in range(4))
        )
        assert sorted(results) == [False, False, False, True]
        got = await stores.streams.get(f"s{i}")
        assert got is not None and got.owner == f"node-{results.index(True)}"


@pytest.mark.gen_test
async def test_released_session_is_taken_at_once(stores: AnyStores) -> None:
    await stores.streams.create(session(), TTL)
    await stores.streams.append("s1", "node-a", "部分", T0)
    assert await stores.streams.release("s1", "node-a")
    got = await stores.streams.get("s1")
    assert got is not None and (got.owner, got.heartbeat) == ("", 0.0)
    assert not await stores.streams.append("s1", "node-a", "x", T0)
    assert await stores.streams.take_over("s1", "node-b", T0 + 0.1, LEASE)
    got = await stores.streams.get("s1")
    assert got is not None and (got.owner, got.status) == ("node-b", QUEUED)


@pytest.mark.gen_test
async def test_unowned_new_session_is_taken_at_once(stores: AnyStores) -> None:
    await stores.streams.create(session(owner="", heartbeat=0.0), TTL)
    assert await stores.streams.take_over("s1", "node-b", T0, LEASE)
    assert not await stores.streams.take_over("s1", "node-c", T0, LEASE)


@pytest.mark.gen_test
async def test_create_replaces_a_session_entirely(stores: AnyStores) -> None:
    await stores.streams.create(session(extra={"old": "1"}), TTL)
    await stores.streams.append("s1", "node-a", "旧", T0)
    await stores.streams.create(session(), TTL)
    assert await stores.streams.get("s1") == session()
    snap = await stores.streams.poll("s1")
    assert snap is not None and (snap.content, snap.n) == ("", 0)


@pytest.mark.gen_test
async def test_a_poll_reports_how_long_each_new_chunk_waited(stores: AnyStores) -> None:
    await stores.streams.create(session(), TTL)
    await stores.streams.append("s1", "node-a", "一", T0 + 1)
    await stores.streams.commit([ChunkWrite("s1", "node-a", "二", 1)], T0 + 2)
    snap = await stores.streams.poll("s1", now=T0 + 5)
    assert snap is not None and snap.lags == (4.0, 3.0) and snap.unread == 2
    await stores.streams.finish("s1", "node-a", DONE, "三", {}, T0 + 6)
    snap = await stores.streams.poll("s1", now=T0 + 6.5)
    assert snap is not None and snap.lags == (0.5,) and snap.unread == 1  # the earlier chunks were seen
    snap = await stores.streams.poll("s1", now=T0 + 9)
    assert snap is not None and snap.lags == () and snap.content == "一二三"


# ---------------------------------------------------------------------------- dedupe, conversations

@pytest.mark.gen_test
async def test_dedupe_first_claim_wins(stores: AnyStores) -> None:
    assert await stores.dedupe.claim("helpdesk", "u1", "", "msg-1", "s1", 3600) == "s1"
    assert await stores.dedupe.claim("helpdesk", "u1", "", "msg-1", "s2", 3600) == "s1"
    assert await stores.dedupe.claim("sales", "u1", "", "msg-1", "s3", 3600) == "s3"
    assert await stores.dedupe.claim("helpdesk", "u1", "", "msg-2", "s4", 3600) == "s4"


@pytest.mark.gen_test
async def test_dedupe_claim_is_the_senders(stores: AnyStores) -> None:
    # another user, or the same user in another chat, reusing a msgid never finds the first claim
    assert await stores.dedupe.claim("b", "alice", "", "m", "s1", 60) == "s1"
    assert await stores.dedupe.claim("b", "bob", "", "m", "s2", 60) == "s2"
    assert await stores.dedupe.claim("b", "alice", "g1", "m", "s3", 60) == "s3"
    # parts are typed: the same characters split differently are another sender
    assert await stores.dedupe.claim("b", "ali", "ce", "m", "s4", 60) == "s4"
    assert await stores.dedupe.claim("b", "alice", "", "m", "s5", 60) == "s1"


@pytest.mark.gen_test
async def test_dedupe_race_has_one_winner(stores: AnyStores) -> None:
    results = await asyncio.gather(*(stores.dedupe.claim("b", "u", "", "m", f"s{i}", 60) for i in range(5)))
    assert len(set(results)) == 1 and results[0] in {f"s{i}" for i in range(5)}


@pytest.mark.gen_test
async def test_conversations_get_set_delete(stores: AnyStores) -> None:
    convs = stores.conversations
    assert await convs.get("helpdesk", "张三") is None
    await convs.set("helpdesk", "张三", "conv-1", 600)
    await convs.set("helpdesk", "chat1:李四", "conv-2", 600)
    await convs.set("sales", "张三", "conv-3", 600)
    assert await convs.get("helpdesk", "张三") == "conv-1"
    await convs.set("helpdesk", "张三", "conv-4", 600)
    assert await convs.get("helpdesk", "张三") == "conv-4"
    await convs.delete("helpdesk", "张三")
    await convs.delete("helpdesk", "never-set")
    assert await convs.get("helpdesk", "张三") is None
    assert await convs.get("helpdesk", "chat1:李四") == "conv-2"
    assert await convs.get("sales", "张三") == "conv-3"


@pytest.mark.gen_test
async def test_non_positive_ttl_is_refused(stores: AnyStores) -> None:
    with pytest.raises(ValueError):
        await stores.streams.create(session(), 0)
    with pytest.raises(ValueError):
        await stores.dedupe.claim("b", "u", "", "m", "s", -1)
    with pytest.raises(ValueError):
        await stores.conversations.set("b", "u", "c", 0)
    assert await stores.streams.get("s1") is None


# ------------------------------------------------------------------------------ response_url outbox

def relay_state(stores: AnyStores) -> RelayState:
    """The relay state that goes with ``stores``."""
    if isinstance(stores, MemoryStores):
        return MemoryRelayState(stores.streams)
    return RedisRelayState(stores.client, stores.keys)


@pytest.mark.gen_test
async def test_relay_outbox_is_claimed_once_delivered_once_and_unlisted(stores: AnyStores) -> None:
    relay = relay_state(stores)
    for sid in ("s1", "s2"):
        await stores.streams.create(session(sid), TTL)
        # WeCom's window closed the stream while the relay goes on
        assert await stores.streams.finish(sid, "node-a", DONE, "（回答较长）", {"relay": "on", "beat": repr(T0)}, T0)
        await relay.track(sid, T0)
    assert await relay.beat("s1", "node-a", T0 + 1)
    assert not await relay.beat("s1", "node-b", T0 + 1)  # only its owner beats
    assert await relay.claim("s1", "node-b", T0 + 5, LEASE, "中断") is None  # the relay is alive
    assert await relay.finished("s1", "完整回答", T0 + 6)
    assert await relay.claim("s1", "node-b", T0 + 7, LEASE, "中断") == "完整回答"
    assert await relay.claim("s1", "node-c", T0 + 8, LEASE, "中断") is None  # node-b's claim is fresh
    assert await relay.claim("s1", "node-c", T0 + 8 + LEASE, LEASE, "中断") == "完整回答"  # node-b died
    # s2's relay stopped beating: it died mid-answer, the caller gets the interruption note
    assert await relay.claim("s2", "node-c", T0 + LEASE + 1, LEASE, "中断") == "中断"
    assert await relay.pending(T0 + 20) == ["s1", "s2"]
    await relay.delivered("s1", True)
    await relay.delivered("s2", False)
    assert await relay.pending(T0 + 20) == []
    s1, s2 = await stores.streams.get("s1"), await stores.streams.get("s2")
    assert s1 is not None and s1.extra["relay"] == "delivered"
    assert s2 is not None and s2.extra["relay"] == "failed"
    assert await relay.claim("s1", "node-c", T0 + 60, LEASE, "中断") is None  # delivered once


@pytest.mark.gen_test
async def test_relay_listing_without_an_outbox_is_swept_away(stores: AnyStores) -> None:
    relay = relay_state(stores)
    assert not await relay.finished("gone", "回答", T0)  # no session: nothing listed
    await relay.track("gone", T0)  # as if the outbox write never happened
    await stores.streams.create(session("s1"), TTL)
    await relay.track("s1", T0 + 1)
    assert await relay.pending(T0 + 2) == ["gone", "s1"]
    assert await relay.claim("gone", "node-b", T0 + 2, LEASE, "中断") is None
    assert await relay.claim("s1", "node-b", T0 + 2, LEASE, "中断") is None  # a plain session: nothing to send
    assert await relay.pending(T0 + 2) == []
    await relay.track("s1", T0 + 3)
    assert await relay.pending(T0 + 3 + 3601) == []  # past a response_url's validity


# ------------------------------------------------------------------------------------------- expiry

async def expire(stores: AnyStores, clock: FakeClock, ttl: float, *keys: str) -> None:
    """Let entries stored with ``ttl`` expire: move the memory stores' clock, or wait for Redis to drop ``keys``."""
    if isinstance(stores, MemoryStores):
        clock.advance(ttl + 0.001)
        return
    for key in keys:
        async def gone(key: str = key) -> bool:
            return not await stores.client.exists(key)

        await eventually(gone, f"{key} expires")


@pytest.mark.gen_test
async def test_everything_expires(stores: AnyStores, clock: FakeClock) -> None:
    await stores.streams.create(session(), 1)
    await stores.dedupe.claim("b", "u", "", "m", "s1", 1)
    await stores.conversations.set("b", "u", "conv", 1)
    assert await stores.streams.get("s1") is not None
    assert await stores.conversations.get("b", "u") == "conv"
    await expire(stores, clock, 1, Keys().stream("s1"), Keys().msgid("b", "u", "", "m"), Keys().conversation("b", "u"))
    assert await stores.streams.get("s1") is None
    assert await stores.streams.poll("s1") is None
    assert not await stores.streams.append("s1", "node-a", "x", T0)
    assert await stores.dedupe.claim("b", "u", "", "m", "s2", 60) == "s2"
    assert await stores.conversations.get("b", "u") is None


@pytest.mark.gen_test
async def test_writes_extend_a_sessions_life(stores: AnyStores, clock: FakeClock) -> None:
    await stores.streams.create(session(), 10)
    if isinstance(stores, MemoryStores):
        clock.advance(8)
    else:
        await stores.client.pexpire(Keys().stream("s1"), 2000)  # as if 8 of its 10 s had passed
    assert await stores.streams.append("s1", "node-a", "仍在写", T0)
    if isinstance(stores, RedisStores):
        assert 9000 < await stores.client.pttl(Keys().stream("s1")) <= 10_000
    clock.advance(8)  # 16 s after create, 8 s after the append
    snap = await stores.streams.poll("s1")
    assert snap is not None and snap.content == "仍在写"
    if isinstance(stores, MemoryStores):  # (test_everything_expires lets Redis expire a session for real)
        clock.advance(10)
        assert await stores.streams.get("s1") is None


# ------------------------------------------------------------------------ both behave the same way

@pytest.mark.gen_test(timeout=90)
async def test_memory_and_redis_agree_on_random_operations(
    redis_url: str, io_loop: tornado.ioloop.IOLoop
) -> None:
    memory, shared = MemoryStores(), RedisStores(redis_url)
    rng = random.Random(20241125)
    sids, owners = ["a", "b", "c"], ["n1", "n2", ""]
    succeeded: set[str] = set()
    try:
        for sid in sids:
            first = session(sid, owner=rng.choice(owners))
            for impl in (memory, shared):
                await impl.streams.create(first, TTL)
        for step in range(600):
            sid, owner = rng.choice(sids), rng.choice(owners)
            now = T0 + rng.uniform(0, 40)
            op = rng.choice(["append", "replace", "finish", "heartbeat", "take_over", "release",
                             "poll", "get", "create"])
            results: list[object] = []
            for impl in (memory, shared):
                streams = impl.streams
                if op == "append":
                    results.append(await streams.append(sid, owner, f"块{step}", now))
                elif op == "replace":
                    results.append(await streams.replace(sid, owner, f"替换{step}", now))
                elif op == "finish":
                    status = DONE if step % 2 else ERROR
                    text = "" if step % 3 else f"终{step}"
                    fields = {"conversation_id": f"c{step}", "note": str(step)}
                    results.append(await streams.finish(sid, owner, status, text, fields, now))
                elif op == "heartbeat":
                    results.append(await streams.heartbeat(sid, owner, now))
                elif op == "take_over":
                    results.append(await streams.take_over(sid, owner or "n3", now, LEASE))
                elif op == "release":
                    results.append(await streams.release(sid, owner))
                elif op == "poll":
                    results.append(await streams.poll(sid))
                elif op == "get":
                    results.append(await streams.get(sid))
                elif step % 5 == 0:  # now and then a fresh session, so finished ones run again
                    await streams.create(session(sid, owner=owner, heartbeat=now), TTL)
                    results.append(None)
                else:
                    results.append(None)
            assert results[0] == results[1], (step, op, sid, owner)
            if results[0] is True:
                succeeded.add(op)
        # the sequence reached every kind of successful write, not just the refusals
        assert succeeded == {"append", "replace", "finish", "heartbeat", "take_over", "release"}
        for sid in sids:
            assert await memory.streams.poll(sid) == await shared.streams.poll(sid)
            assert await memory.streams.get(sid) == await shared.streams.get(sid)
    finally:
        await shared.close()


# --------------------------------------------------------------------------------------- memory only

def test_expiring_map_bound_evicts_expired_then_soonest() -> None:
    clock = [100.0]
    entries: ExpiringMap[str] = ExpiringMap(3, lambda: clock[0])
    entries.put("a", "A", 10)
    entries.put("b", "B", 10)
    entries.put("c", "C", 50)
    clock[0] = 115.0  # a and b have expired
    entries.put("d", "D", 100)
    assert len(entries) == 2  # both expired entries went, not just one
    assert (entries.get("c"), entries.get("d")) == ("C", "D")
    entries.put("e", "E", 100)
    entries.put("f", "F", 100)  # full of live entries: the one closest to expiry (c) goes
    assert len(entries) == 3
    assert entries.get("c") is None
    assert [entries.get(k) for k in "def"] == ["D", "E", "F"]
    entries.touch("d", 500)  # d now outlives e, so e goes next
    entries.put("g", "G", 100)
    assert [entries.get(k) for k in "defg"] == ["D", None, "F", "G"]


def test_expiring_map_stays_small_under_many_touches() -> None:
    clock = [0.0]
    entries: ExpiringMap[int] = ExpiringMap(10, lambda: clock[0])
    entries.put("k", 1, 5)
    tracemalloc.start()
    try:
        for i in range(10_000):
            clock[0] = i * 0.001
            entries.touch("k", 5)
        grown, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert entries.get("k") == 1
    # A heap entry kept per touch would hold some 800 KB by now; compacted, one entry costs a few KB.
    assert grown < 64 * 1024, grown


@pytest.mark.gen_test
async def test_memory_store_bounds_sessions() -> None:
    clock = [T0]
    stores = MemoryStores(max_entries=2, clock=lambda: clock[0])
    await stores.streams.create(session("a"), 200)  # lives until +200
    await stores.streams.create(session("b"), 100)
    clock[0] += 50
    assert await stores.streams.append("b", "node-a", "x", T0)  # b now lives until +150
    # full: b goes, as the entry closest to expiry, though a is older and b was written last
    await stores.streams.create(session("c"), 120)
    present = {sid for sid in "abc" if await stores.streams.get(sid) is not None}
    assert present == {"a", "c"}
    clock[0] += 1000
    assert await stores.streams.get("a") is None


@pytest.mark.gen_test
async def test_open_stores_picks_the_implementation(redis_url: str) -> None:
    assert isinstance(open_stores(None), MemoryStores)
    assert isinstance(open_stores(""), MemoryStores)
    shared = open_stores(redis_url)
    try:
        assert isinstance(shared, RedisStores)
        await shared.ping()
    finally:
        await shared.close()


# ---------------------------------------------------------------------------------------- redis only

@pytest.mark.gen_test
async def test_redis_key_layout(redis_stores: RedisStores) -> None:
    client = redis_stores.client
    await redis_stores.streams.create(session(chat="chat1", extra={"msgtype": "text"}), TTL)
    await redis_stores.streams.append("s1", "node-a", "你好", T0 + 1)
    await redis_stores.streams.append("s1", "node-a", "世界", T0 + 2)
    await redis_stores.streams.poll("s1")
    await redis_stores.streams.finish("s1", "node-a", DONE, "。", {"conversation_id": "c1"}, T0 + 3)
    await redis_stores.streams.poll("s1")
    await redis_stores.dedupe.claim("helpdesk", "zhangsan", "", "msg-1", "s1", 3600)
    await redis_stores.conversations.set("helpdesk", "zhangsan", "c1", 7 * 86400)

    keys = Keys()
    stream, msgid, conv = keys.stream("s1"), keys.msgid("helpdesk", "zhangsan", "", "msg-1"), \
        keys.conversation("helpdesk", "zhangsan")
    assert stream == "laibao:stream:{s1}"
    assert re.fullmatch(r"laibao:msgid:\{[0-9a-f]{20}\}", msgid) and re.fullmatch(r"laibao:conv:\{[0-9a-f]{20}\}", conv)
    assert sorted(await client.keys("*")) == sorted([conv, msgid, stream])
    assert await client.type(stream) == "hash"
    assert await client.hgetall(stream) == {
        "bot": "helpdesk", "user": "zhangsan", "chat": "chat1", "query": "", "scope": "",
        "response_url": "", "owner": "node-a", "created": repr(T0), "deadline": repr(T0 + 360),
        "status": "done", "heartbeat": repr(T0 + 3), "conversation_id": "c1", "message_id": "",
        "task_id": "", "n": "3", "c:0": "你好", "r:0": "1", "c:1": "世界", "r:1": "1", "c:2": "。",
        "r:2": "1", "fin": "1", "ttl": "1800.0", "x:msgtype": "text",
    }
    assert await client.get(msgid) == "s1"
    assert await client.get(conv) == "c1"
    assert 1790_000 < await client.pttl(stream) <= 1800_000
    assert 3590_000 < await client.pttl(msgid) <= 3600_000
    assert 7 * 86400_000 - 10_000 < await client.pttl(conv) <= 7 * 86400_000


@pytest.mark.gen_test
async def test_redis_read_flags_record_first_delivery(redis_stores: RedisStores) -> None:
    await redis_stores.streams.create(session(), TTL)
    await redis_stores.streams.append("s1", "node-a", "一", T0 + 1)
    key = Keys().stream("s1")
    assert await redis_stores.client.hget(key, "r:0") == repr(T0 + 1)  # written, not delivered yet
    await redis_stores.streams.poll("s1", now=T0 + 3)
    await redis_stores.streams.poll("s1", now=T0 + 4)
    assert await redis_stores.client.hget(key, "r:0") == "d" + repr(T0 + 3)  # the first delivery stays


@pytest.mark.gen_test(timeout=60)  # 2500 script calls: heavy by design
async def test_redis_replace_leaves_no_old_chunks(redis_stores: RedisStores) -> None:
    await redis_stores.streams.create(session(), TTL)
    for i in range(2500):
        await redis_stores.streams.append("s1", "node-a", str(i), T0)
    await redis_stores.streams.replace("s1", "node-a", "新", T0)
    fields = await redis_stores.client.hkeys(Keys().stream("s1"))
    assert sorted(f for f in fields if f[:2] in {"c:", "r:"}) == ["c:0", "r:0"]


@pytest.mark.gen_test
async def test_redis_prefix(redis_url: str) -> None:
    other = RedisStores(redis_url, prefix="staging")
    try:
        await other.streams.create(session(), TTL)
        await other.dedupe.claim("b", "u", "", "m", "s1", 60)
        await other.conversations.set("b", "u", "c", 60)
        keys = Keys("staging")
        assert sorted(await other.client.keys("*")) == sorted([keys.conversation("b", "u"),
                                                               keys.msgid("b", "u", "", "m"), keys.stream("s1")])
        assert all(key.startswith("staging:") for key in await other.client.keys("*"))
    finally:
        await other.close()


@pytest.mark.gen_test
async def test_redis_writes_rearm_the_ttl(redis_stores: RedisStores) -> None:
    streams, client, key = redis_stores.streams, redis_stores.client, Keys().stream("s1")
    await streams.create(session(), 100)
    writes: list[Callable[[], Awaitable[bool]]] = [
        lambda: streams.append("s1", "node-a", "x", T0),
        lambda: streams.replace("s1", "node-a", "y", T0),
        lambda: streams.heartbeat("s1", "node-a", T0),
        lambda: streams.release("s1", "node-a"),
        lambda: streams.take_over("s1", "node-a", T0, LEASE),
        lambda: streams.finish("s1", "node-a", DONE, "z", {}, T0),
    ]
    for write in writes:
        await client.pexpire(key, 5000)
        assert await write()
        assert 95_000 < await client.pttl(key) <= 100_000
    await client.pexpire(key, 5000)
    await streams.poll("s1")  # a read: WeCom polling alone does not keep a session alive
    assert await client.pttl(key) <= 5000


@pytest.mark.gen_test
async def test_redis_poll_is_one_round_trip(redis_stores: RedisStores) -> None:
    client = redis_stores.client
    await redis_stores.streams.create(session(), TTL)
    for part in ["一", "二", "三"]:
        await redis_stores.streams.append("s1", "node-a", part, T0)
    await redis_stores.streams.poll("s1")  # warm: the script is loaded, the connection open
    await redis_stores.streams.finish("s1", "node-a", DONE, "四", {}, T0)
    threshold = str((await client.config_get("slowlog-log-slower-than"))["slowlog-log-slower-than"])
    # log every command; commands a script runs are logged with client "?:0", so they are told apart
    await client.config_set("slowlog-log-slower-than", 0)
    try:
        await client.slowlog_reset()
        snap = await redis_stores.streams.poll("s1")
        entries = await client.slowlog_get(128)
    finally:
        await client.config_set("slowlog-log-slower-than", threshold)
    assert snap is not None and snap.content == "一二三四"

    def text(value: bytes | str) -> str:
        return value.decode() if isinstance(value, bytes) else value

    top_level = [text(e["command"]).split()[0].upper() for e in entries
                 if text(e["client_address"]) != "?:0"
                 and not text(e["command"]).upper().startswith("SLOWLOG")]
    assert top_level == ["EVALSHA"]


@pytest.mark.gen_test
async def test_redis_wrong_type_is_a_store_error(redis_stores: RedisStores) -> None:
    await redis_stores.client.set(Keys().stream("s1"), "not a hash")
    with pytest.raises(StoreError) as caught:
        await redis_stores.streams.poll("s1")
    assert "WRONGTYPE" in str(caught.value)


@pytest.mark.gen_test(timeout=30)
async def test_redis_down_is_a_store_error(redis_stores: RedisStores, redis_server: RedisServer) -> None:
    await redis_stores.streams.create(session(), TTL)
    await redis_stores.ping()
    secret = "机密的回答内容"
    redis_server.stop()
    try:
        started = time.monotonic()
        streams = redis_stores.streams
        calls: list[Callable[[], Awaitable[object]]] = [
            redis_stores.ping,
            lambda: streams.create(session("s2"), TTL),
            lambda: streams.get("s1"),
            lambda: streams.append("s1", "node-a", secret, T0),
            lambda: streams.replace("s1", "node-a", secret, T0),
            lambda: streams.finish("s1", "node-a", DONE, secret, {}, T0),
            lambda: streams.heartbeat("s1", "node-a", T0),
            lambda: streams.poll("s1"),
            lambda: streams.take_over("s1", "node-b", T0, LEASE),
            lambda: streams.release("s1", "node-a"),
            lambda: redis_stores.dedupe.claim("b", "u", "", "m", "s1", 60),
            lambda: redis_stores.conversations.get("b", "u"),
            lambda: redis_stores.conversations.set("b", "u", "c", 60),
            lambda: redis_stores.conversations.delete("b", "u"),
        ]
        for call in calls:
            with pytest.raises(StoreError) as caught:
                await call()
            assert caught.value.__cause__ is not None
            assert secret not in str(caught.value)
        assert time.monotonic() - started < 5  # fails fast, no long retry loop
    finally:
        redis_server.start()
    # the same client recovers once Redis is back (the restarted server is empty)
    await redis_stores.ping()
    await redis_stores.streams.create(session(), TTL)
    assert await redis_stores.streams.append("s1", "node-a", "恢复", T0)
    snap = await redis_stores.streams.poll("s1")
    assert snap is not None and snap.content == "恢复"
