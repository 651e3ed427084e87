"""Load makes answers slower, never lost: the blocking Redis pool, group commit, the rolled-back claim, the cap."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis.asyncio
from tornado.ioloop import IOLoop

from laibao import texts
from laibao.answer.writer import Flusher, StreamWriter
from laibao.app import GC_MIDDLE_THRESHOLD, GC_YOUNG_THRESHOLD
from laibao.errors import OwnershipLost
from stores import ChunkWrite, MemoryStores, RedisStores, StreamSession
from tests.difystub import Script
from tests.harness import Cluster, Service, eventually, follow, message, running_cluster, running_service
from tests.test_faults import metric

T0 = 1_732_500_000.0


def session(sid: str, owner: str = "node-a") -> StreamSession:
    return StreamSession(sid=sid, bot="default", user="u", owner=owner, created=T0, deadline=T0 + 360,
                         heartbeat=T0)


@pytest.mark.gen_test(timeout=60)
async def test_a_pool_of_two_serves_many_concurrent_operations_without_a_failure(redis_url: str) -> None:
    stores = RedisStores(redis_url, pool_size=2, pool_timeout=30)
    observer = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
    try:
        async def one(i: int) -> None:
            sid = f"s{i}"
            assert await stores.dedupe.claim("default", "u", "", f"m{i}", sid, 600) == sid
            await stores.streams.create(session(sid), 600)
            assert await stores.streams.commit([ChunkWrite(sid, "node-a", f"<{i}>")], T0) == [True]
            assert await stores.streams.append(sid, "node-a", "。", T0)
            assert await stores.streams.get(sid) is not None

        # 400 messages at once through 2 connections: each call waits for a connection, none fails
        await asyncio.gather(*(one(i) for i in range(400)))
        snapshots = await asyncio.gather(*(stores.streams.poll(f"s{i}") for i in range(400)))
        assert [s.content if s else None for s in snapshots] == [f"<{i}>。" for i in range(400)]
        clients = await observer.client_list()
        assert len(clients) <= 3  # the pool's two connections and this observer
    finally:
        await observer.aclose()
        await stores.close()


@pytest.mark.parametrize("backend", ["memory", "redis"])
@pytest.mark.gen_test(timeout=30)
async def test_a_retried_commit_adds_nothing_twice_and_keeps_the_owner_check(
    backend: str, request: pytest.FixtureRequest
) -> None:
    stores = MemoryStores() if backend == "memory" else RedisStores(request.getfixturevalue("redis_url"))
    try:
        await stores.streams.create(session("a"), 600)
        await stores.streams.create(session("b", owner="node-b"), 600)
        batch = [ChunkWrite("a", "node-a", "一", index=0), ChunkWrite("b", "node-a", "不是我的", index=0)]
        assert await stores.streams.commit(batch, T0) == [True, False]
        # the same batch again, as after a timeout that hid its success: nothing doubles
        assert await stores.streams.commit(batch, T0) == [True, False]
        assert await stores.streams.commit([ChunkWrite("a", "node-a", "二", index=1)], T0) == [True]
        assert await stores.streams.commit([ChunkWrite("a", "node-a", "全新", replace=True)], T0) == [True]
        assert await stores.streams.commit([ChunkWrite("a", "node-a", "。", index=1)], T0) == [True]
        a, b = await stores.streams.poll("a"), await stores.streams.poll("b")
        assert a is not None and a.content == "全新。"
        assert b is not None and b.content == ""
        assert await stores.dedupe.claim("default", "u", "", "m1", "a", 600) == "a"
        assert not await stores.dedupe.unclaim("default", "u", "", "m1", "other")
        assert await stores.dedupe.unclaim("default", "u", "", "m1", "a")
        assert await stores.dedupe.claim("default", "u", "", "m1", "c", 600) == "c"
    finally:
        await stores.close()


@pytest.mark.gen_test(timeout=30)
async def test_the_flusher_commits_every_stream_in_order_and_reports_a_lost_session(redis_url: str) -> None:
    stores = RedisStores(redis_url)
    flusher = Flusher(stores.streams, interval=0.05, max_bytes=1024)
    try:
        writers = []
        for i in range(30):
            await stores.streams.create(session(f"w{i}"), 600)
            writers.append(StreamWriter(flusher, f"w{i}", "node-a"))
        for step in range(20):
            for i, writer in enumerate(writers):
                writer.add(f"[{i}.{step}]")
            await asyncio.sleep(0.01)
        for i, writer in enumerate(writers):
            await writer.finish("done", "end", {})
            snapshot = await stores.streams.poll(f"w{i}")
            assert snapshot is not None
            assert snapshot.content == "".join(f"[{i}.{step}]" for step in range(20)) + "end"
        assert flusher.ticks < 20 * 30  # many streams per round trip
        # another process took a stream over: its writer learns at the next add
        await stores.streams.create(session("lost"), 600)
        writer = StreamWriter(flusher, "lost", "node-a")
        assert await stores.streams.take_over("lost", "node-b", T0 + 100, 15)
        writer.add("太晚了")
        await eventually(lambda: writer.lost, "the refused write is seen")
        with pytest.raises(OwnershipLost):
            writer.add("再写")
    finally:
        await flusher.close()
        await stores.close()


@pytest.fixture
def limited(redis_url: str, io_loop: IOLoop) -> Iterator[tuple[Service, redis.asyncio.Redis]]:
    """laibao on a Redis user that may claim msgids but not record sessions (until granted), and an admin."""
    admin = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
    io_loop.run_sync(lambda: admin.acl_setuser("limited", enabled=True, passwords=["+limited-pw"],
                                               keys=["laibao:msgid:*", "laibao:media:*"], commands=["+@all"],
                                               channels=["*"]))
    parts = urlsplit(redis_url)
    try:
        with running_service(io_loop, f"redis://limited:limited-pw@{parts.hostname}:{parts.port}/0") as svc:
            yield svc, admin
    finally:

        async def cleanup() -> None:
            await admin.acl_deluser("limited")
            await admin.aclose()

        io_loop.run_sync(cleanup)


@pytest.mark.gen_test(timeout=60)
async def test_a_claim_whose_session_was_not_recorded_is_rolled_back(
    limited: tuple[Service, redis.asyncio.Redis]
) -> None:
    svc, admin = limited
    payload = message("第一次投递失败了", msgid="redelivered")
    first = await svc.wecom.stream(payload)
    assert (first["content"], first["finish"]) == (texts.BUSY, True)
    assert await admin.get("laibao:msgid:default:redelivered") is None  # the claim was given back
    await admin.acl_setuser("limited", enabled=True, keys=["*"], commands=["+@all"], channels=["*"])
    # WeCom delivers the message again: now it gets a real answer, not "expired"
    again = await svc.wecom.stream(payload)
    assert again["finish"] is False and again["id"] != first["id"]
    polls = await follow([svc.wecom], str(again["id"]))
    assert polls[-1]["content"] == Script().answer


@pytest.fixture
def capped(io_loop: IOLoop, redis_url: str, tmp_path: Path) -> Iterator[Cluster]:
    """Two processes that each relay at most one answer at a time."""
    with running_cluster(io_loop, redis_url, tmp_path, LAIBAO_MAX_RELAYS="1", LAIBAO_LEASE="120") as cluster:
        yield cluster


@pytest.mark.slow
@pytest.mark.gen_test(timeout=60)
async def test_a_full_process_leaves_a_message_to_the_first_process_with_room(capped: Cluster) -> None:
    cluster = capped
    hold = asyncio.Event()
    cluster.dify.push(Script(answer="占着名额的回答", hold=hold, ping_every=0.2), Script(answer="另一个进程的回答"))
    to_a, to_b = cluster.wecom(cluster.a), cluster.wecom(cluster.b)
    first = await to_a.stream(message("先来的", user="lisi"))
    await eventually(lambda: len(cluster.dify.chat_calls) == 1, "the first answer holds A's only slot")
    second = await to_a.stream(message("后来的", user="wangwu"))
    assert second["finish"] is False
    # A is full: it recorded the message unowned. The first poll on B takes it over at once,
    # long before the 120 s lease could pass.
    polls = await follow([to_b], str(second["id"]), limit=400, pause=0.05)
    assert polls[-1]["content"] == "另一个进程的回答"
    assert [c.json["query"] for c in cluster.dify.chat_calls] == ["先来的", "后来的"]
    assert await metric(cluster, cluster.a, "laibao_relay_cap_hits_total") == 1
    assert await metric(cluster, cluster.a, "laibao_max_relays") == 1
    assert await metric(cluster, cluster.b, "laibao_takeovers_total") == 1
    ready = await cluster.http.fetch(cluster.a.base_url + "/readyz", raise_error=False)
    assert ready.code == 200  # being full is not being unready
    hold.set()
    assert (await follow([to_a, to_b], str(first["id"])))[-1]["content"] == "占着名额的回答"
    assert "took over stream" in cluster.b.log()


def test_serving_freezes_start_up_objects_and_collects_the_young_less_often() -> None:
    # In a fresh interpreter: the test process's own collector is left as it is.
    probe = ("import gc, json; from laibao.app import tune_gc; before = gc.get_threshold(); tune_gc(); "
             "print(json.dumps([before, gc.get_threshold(), gc.get_freeze_count()]))")
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    before, after, frozen = json.loads(run.stdout)
    assert after == [GC_YOUNG_THRESHOLD, GC_MIDDLE_THRESHOLD, before[2]] and after[0] > before[0]
    assert frozen > 10_000  # the modules and objects start-up made are out of every later collection
