"""One contract suite for the long-connection store (lease, stand-down, live streams, sends) on both backends."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis.asyncio as aioredis
import tornado.ioloop

from laibao.errors import StoreError
from stores.ws_store import LiveStream, MemoryWsStore, RedisWsStore, WsStore
from tests.harness import eventually


class Clock:
    """A clock the memory store reads; Redis keeps its own time, so its TTLs are waited for instead."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["memory", "redis"])
def ws_store(request: pytest.FixtureRequest, io_loop: tornado.ioloop.IOLoop) -> Iterator[WsStore]:
    if request.param == "memory":
        yield MemoryWsStore()
        return
    client = aioredis.Redis.from_url(request.getfixturevalue("redis_url"), decode_responses=True)
    yield RedisWsStore(client)
    io_loop.run_sync(client.aclose)


@pytest.mark.gen_test
async def test_one_lease_holder_with_growing_fencing_tokens(ws_store: WsStore) -> None:
    first = await ws_store.acquire("hr", "node-a", 30)
    assert first > 0
    assert await ws_store.acquire("hr", "node-b", 30) == 0  # held: nobody else gets it
    assert await ws_store.acquire("it", "node-b", 30) > 0  # bots are independent
    assert await ws_store.renew("hr", "node-a", first, 30)
    assert not await ws_store.renew("hr", "node-b", first, 30)
    assert not await ws_store.release("hr", "node-b", first)
    node, token, left = await ws_store.holder("hr") or ("", 0, 0.0)
    assert (node, token) == ("node-a", first) and 0 < left <= 30
    assert await ws_store.release("hr", "node-a", first)
    assert await ws_store.holder("hr") is None
    second = await ws_store.acquire("hr", "node-b", 30)
    assert second > first
    # An old holder's token no longer renews or releases anything, even with the same node id.
    assert await ws_store.acquire("hr", "node-b", 30) > second
    assert not await ws_store.renew("hr", "node-b", second, 30)


@pytest.mark.gen_test
async def test_a_stand_down_keeps_everyone_from_the_lease(ws_store: WsStore) -> None:
    assert await ws_store.standing_down("hr") == 0
    await ws_store.stand_down("hr", 60)
    assert 0 < await ws_store.standing_down("hr") <= 60
    assert await ws_store.acquire("hr", "node-a", 30) == 0
    assert await ws_store.acquire("it", "node-a", 30) > 0


@pytest.mark.gen_test
async def test_live_streams_are_registered_once_and_updated(ws_store: WsStore) -> None:
    live = LiveStream("s1", "req-1", "zhangsan", "", 1000.5)
    assert await ws_store.add_live(live, "hr", 1800)
    assert not await ws_store.add_live(LiveStream("s1", "req-2", "lisi", "", 1001.0), "hr", 1800)
    assert await ws_store.live("hr") == [live]
    assert await ws_store.live("it") == []
    sent = LiveStream("s1", "req-1", "zhangsan", "", 1000.5, feedback_sent=True)
    await ws_store.update_live(sent, "hr")
    await ws_store.update_live(LiveStream("gone", "r", "u", "", 1.0), "hr")  # not registered: not added
    assert await ws_store.live("hr") == [sent]
    await ws_store.drop_live("hr", "s1")
    assert await ws_store.live("hr") == []


@pytest.mark.gen_test
async def test_send_requests_are_taken_once_or_withdrawn(ws_store: WsStore) -> None:
    assert await ws_store.take_send("hr", 0.1) is None
    await ws_store.post_send("hr", '{"id": "1"}')
    await ws_store.post_send("hr", '{"id": "2"}')
    assert await ws_store.take_send("hr", 1) == '{"id": "1"}'
    assert not await ws_store.withdraw_send("hr", '{"id": "1"}')  # taken: too late to withdraw
    assert await ws_store.withdraw_send("hr", '{"id": "2"}')
    assert await ws_store.take_send("hr", 0.1) is None
    assert await ws_store.send_answer("1", 0.1) is None
    await ws_store.answer_send("1", '{"errcode": 0}')
    assert await ws_store.send_answer("1", 1) == '{"errcode": 0}'


@pytest.mark.gen_test
async def test_memory_leases_expire_by_the_injected_clock() -> None:
    clock = Clock()
    store = MemoryWsStore(clock)
    token = await store.acquire("hr", "node-a", 15)
    clock.now += 14.9
    assert await store.acquire("hr", "node-b", 15) == 0
    clock.now += 0.2  # expired: node-a's renewal fails, node-b takes it
    assert not await store.renew("hr", "node-a", token, 15)
    assert await store.acquire("hr", "node-b", 15) > token
    await store.stand_down("hr", 5)
    clock.now += 5.1
    assert await store.standing_down("hr") == 0


@pytest.mark.gen_test(timeout=20)
async def test_redis_leases_expire_and_pass_on(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    store = RedisWsStore(client)
    try:
        token = await store.acquire("hr", "node-a", 0.3)
        assert await client.get("laibao:ws:hr:leader") == "node-a"  # the documented key, value = node id
        taken: list[int] = []

        async def node_b_takes_it() -> bool:
            taken.append(await store.acquire("hr", "node-b", 30))
            return taken[-1] > 0

        await eventually(node_b_takes_it, "the expired lease taken by node-b")
        assert taken[-1] > token
        assert not await store.renew("hr", "node-a", token, 30)
    finally:
        await client.aclose()


@pytest.mark.gen_test
async def test_redis_down_is_a_store_error() -> None:
    client = aioredis.Redis.from_url("redis://127.0.0.1:9/0", decode_responses=True, socket_connect_timeout=0.5)
    store = RedisWsStore(client)
    try:
        with pytest.raises(StoreError):
            await store.acquire("hr", "node-a", 15)
        with pytest.raises(StoreError):
            await store.live("hr")
    finally:
        await client.aclose()


@pytest.mark.gen_test(timeout=30)
async def test_redis_waits_longer_than_the_socket_timeout(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url, decode_responses=True, socket_timeout=3.0)
    store = RedisWsStore(client)
    try:
        # A send's answer may take the holder longer than one socket timeout: it must not be a StoreError.
        assert await store.send_answer("slow", 4.0) is None
    finally:
        await client.aclose()
