"""The media hold: one contract suite over the memory and the Redis implementation, then Redis specifics."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis
import tornado.ioloop
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from laibao.errors import StoreError
from stores.media_store import MediaHold, MemoryMediaHold, RedisMediaHold
from tests.clock import FakeClock
from tests.harness import eventually
from tests.servers import free_port

TTL = 300.0
IMAGE = {"kind": "image", "upload_file_id": "72fa9618-8f69-4a37-9b33-7e1178a24a67", "name": "图片.png"}
FILE = {"kind": "document", "upload_file_id": "0d4e5c1a-0000-4000-8000-000000000001", "name": "报告.pdf",
        "size": 12345, "nested": {"ok": True, "list": [1, "二"]}}


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=["memory", "redis"])
def hold(request: pytest.FixtureRequest, io_loop: tornado.ioloop.IOLoop, clock: FakeClock) -> Iterator[MediaHold]:
    """Each implementation in turn; Redis on a flushed real server."""
    if request.param == "memory":
        yield MemoryMediaHold(max_items=5, clock=clock)
        return
    client = aioredis.Redis.from_url(request.getfixturevalue("redis_url"), decode_responses=True)
    yield RedisMediaHold(client, max_items=5)
    io_loop.run_sync(client.aclose)


@pytest.mark.gen_test
async def test_items_come_back_in_order_once(hold: MediaHold) -> None:
    assert await hold.add("hr", "zhangsan", IMAGE, TTL) == 1
    assert await hold.add("hr", "zhangsan", FILE, TTL) == 2
    assert await hold.take("hr", "zhangsan") == [IMAGE, FILE]
    assert await hold.take("hr", "zhangsan") == []
    assert await hold.add("hr", "zhangsan", FILE, TTL) == 1  # a fresh list after a take


@pytest.mark.gen_test
async def test_bots_and_scopes_are_separate(hold: MediaHold) -> None:
    await hold.add("hr", "zhangsan", IMAGE, TTL)
    await hold.add("it", "zhangsan", FILE, TTL)
    await hold.add("hr", "wrkChat/zhangsan", FILE, TTL)
    assert await hold.take("hr", "lisi") == []
    assert await hold.take("hr", "zhangsan") == [IMAGE]
    assert await hold.take("it", "zhangsan") == [FILE]
    assert await hold.take("hr", "wrkChat/zhangsan") == [FILE]


@pytest.mark.gen_test
async def test_only_the_newest_items_are_kept(hold: MediaHold) -> None:
    counts = [await hold.add("hr", "u", {"n": n}, TTL) for n in range(8)]
    assert counts == [1, 2, 3, 4, 5, 5, 5, 5]
    assert await hold.take("hr", "u") == [{"n": n} for n in range(3, 8)]


@pytest.mark.gen_test
async def test_concurrent_takes_get_the_items_exactly_once(hold: MediaHold) -> None:
    for n in range(3):
        await hold.add("hr", "u", {"n": n}, TTL)
    results = await asyncio.gather(*(hold.take("hr", "u") for _ in range(4)))
    assert sorted(results, key=len) == [[], [], [], [{"n": 0}, {"n": 1}, {"n": 2}]]


@pytest.mark.gen_test
async def test_taken_items_are_copies(hold: MediaHold) -> None:
    item: dict[str, Any] = {"list": [1]}
    await hold.add("hr", "u", item, TTL)
    item["list"].append(2)  # the caller changing its dict afterwards changes nothing held
    (taken,) = await hold.take("hr", "u")
    assert taken == {"list": [1]}


@pytest.mark.gen_test
async def test_bad_items_and_ttls_are_refused(hold: MediaHold) -> None:
    with pytest.raises(ValueError, match="JSON object"):
        await hold.add("hr", "u", {"data": b"raw bytes"}, TTL)
    with pytest.raises(ValueError, match="JSON object"):
        await hold.add("hr", "u", {"x": float("nan")}, TTL)
    with pytest.raises(ValueError, match="ttl"):
        await hold.add("hr", "u", IMAGE, 0)
    assert await hold.take("hr", "u") == []


@pytest.mark.gen_test
async def test_held_media_expire_and_each_add_rearms(
    hold: MediaHold, clock: FakeClock, request: pytest.FixtureRequest
) -> None:
    if isinstance(hold, MemoryMediaHold):
        await hold.add("hr", "u", IMAGE, 10)
        clock.now += 8
        await hold.add("hr", "u", FILE, 10)  # the whole list lives 10 s from now
        clock.now += 8
        assert await hold.take("hr", "u") == [IMAGE, FILE]
        await hold.add("hr", "u", IMAGE, 10)
        clock.now += 10.5
        assert await hold.take("hr", "u") == []
    else:
        # Redis keeps its own time: read the TTL it holds instead of sleeping through it
        client = aioredis.Redis.from_url(request.getfixturevalue("redis_url"), decode_responses=True)
        key = "laibao:media:hr:u"
        try:
            await hold.add("hr", "u", IMAGE, 10)
            await client.pexpire(key, 2000)  # as if 8 of its 10 s had passed
            await hold.add("hr", "u", FILE, 10)
            assert 9000 < await client.pttl(key) <= 10_000  # the whole list lives 10 s from now
            assert await hold.take("hr", "u") == [IMAGE, FILE]
            await hold.add("hr", "u", IMAGE, 1)
            assert 0 < await client.pttl(key) <= 1000

            async def expired() -> bool:
                return not await client.exists(key)

            await eventually(expired, "the held media expire")
            assert await hold.take("hr", "u") == []
        finally:
            await client.aclose()


# ------------------------------------------------------------------------------------ Redis only

@pytest.mark.gen_test
async def test_redis_layout_is_a_json_list_with_a_ttl(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        hold = RedisMediaHold(client)
        await hold.add("hr", "zhangsan", IMAGE, 120)
        key = "laibao:media:hr:zhangsan"
        assert hold.key("hr", "zhangsan") == key
        assert await client.type(key) == "list"
        assert 0 < await client.pttl(key) <= 120_000
        (raw,) = await client.lrange(key, 0, -1)
        assert "图片.png" in raw  # readable for operators, not \u escapes
        await client.rpush(key, "not json", "[1, 2]")  # written by something else: skipped on take
        assert await hold.take("hr", "zhangsan") == [IMAGE]
        assert await client.exists(key) == 0
    finally:
        await client.aclose()


@pytest.mark.gen_test
async def test_redis_works_without_decoded_responses(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    try:
        hold = RedisMediaHold(client)
        await hold.add("hr", "u", FILE, 60)
        assert await hold.take("hr", "u") == [FILE]
    finally:
        await client.aclose()


@pytest.mark.gen_test(timeout=20)
async def test_redis_unreachable_is_a_store_error() -> None:
    client = aioredis.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=1, retry=Retry(NoBackoff(), 0))
    try:
        hold = RedisMediaHold(client)
        with pytest.raises(StoreError, match="redis media add failed") as caught:
            await hold.add("hr", "u", {"secret": "机密文件名.pdf"}, 60)
        assert "机密" not in str(caught.value)
        assert caught.value.__cause__ is not None
        with pytest.raises(StoreError, match="redis media take failed"):
            await hold.take("hr", "u")
    finally:
        await client.aclose()


def test_max_items_must_be_positive() -> None:
    with pytest.raises(ValueError):
        MemoryMediaHold(max_items=0)
    with pytest.raises(ValueError):
        RedisMediaHold(aioredis.Redis(), max_items=0)
