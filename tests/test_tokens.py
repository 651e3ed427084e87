"""The token cache contract, run against the memory and the Redis implementation alike.

The Redis-only tests pin what other processes and existing deployments rely on: the exact key
layout and TTLs, the lock shared between instances, and invalidations reaching another instance
(also after a Redis restart).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator

import pytest
import redis.asyncio as aioredis
import tornado.ioloop

from laibao.errors import StoreError
from stores.tokens import EVERY_USER, INVALIDATE_CHANNEL, MemoryTokenCache, RedisTokenCache, open_token_cache
from tests.authstub import make_config
from tests.clock import FakeClock
from tests.harness import eventually
from tests.servers import RedisServer

AnyCache = MemoryTokenCache | RedisTokenCache
INFO = {"userid": "zhangsan", "name": "张三", "code": "E1001"}


@pytest.fixture
def clock() -> FakeClock:
    """The memory cache's clock (Redis keeps its own time)."""
    return FakeClock()


@pytest.fixture(params=["memory", "redis"])
def cache(request: pytest.FixtureRequest, io_loop: tornado.ioloop.IOLoop) -> Iterator[AnyCache]:
    """Each implementation in turn; Redis on a flushed real server."""
    built: AnyCache = (
        MemoryTokenCache(clock=request.getfixturevalue("clock")) if request.param == "memory"
        else RedisTokenCache(request.getfixturevalue("redis_url"))
    )
    yield built
    io_loop.run_sync(built.close)


@pytest.fixture
def raw(redis_url: str, io_loop: tornado.ioloop.IOLoop) -> Iterator[aioredis.Redis]:
    """A plain client on the same Redis, as another deployment (or an operator) sees it."""
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    io_loop.run_sync(client.aclose)


async def wait_for(condition: Callable[[], bool], within: float = 5.0) -> None:
    """Poll ``condition()`` until true."""
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


# ------------------------------------------------------------------------------------ the contract

@pytest.mark.gen_test
async def test_put_then_get_returns_token_and_info(cache: AnyCache) -> None:
    assert await cache.get("zhangsan") is None
    await cache.put("zhangsan", "tok-1", INFO, 60)
    assert await cache.get("zhangsan") == ("tok-1", INFO)
    assert await cache.get("lisi") is None


@pytest.mark.gen_test
async def test_a_new_token_replaces_the_users_current_one(cache: AnyCache) -> None:
    await cache.put("zhangsan", "tok-1", INFO, 60)
    await cache.put("zhangsan", "tok-2", {**INFO, "n": 2}, 60)
    assert await cache.get("zhangsan") == ("tok-2", {**INFO, "n": 2})


@pytest.mark.gen_test
async def test_tokens_expire_with_their_lifetime(cache: AnyCache, clock: FakeClock) -> None:
    if isinstance(cache, MemoryTokenCache):
        await cache.put("zhangsan", "tok-1", INFO, 10)
        clock.advance(9.9)
        assert await cache.get("zhangsan") is not None
        clock.advance(0.2)
        assert await cache.get("zhangsan") is None
        return
    await cache.put("zhangsan", "tok-1", INFO, 1)
    assert await cache.get("zhangsan") is not None
    for key in ("authorization:wechatid:zhangsan", "authorization:token:tok-1"):
        assert 0 < await cache.client.pttl(key) <= 1000

    async def expired() -> bool:
        return await cache.get("zhangsan") is None

    await eventually(expired, "the token expires in Redis")


@pytest.mark.gen_test
async def test_drop_forgets_the_token(cache: AnyCache) -> None:
    await cache.put("zhangsan", "tok-1", INFO, 60)
    await cache.drop("zhangsan", "tok-1")
    assert await cache.get("zhangsan") is None


@pytest.mark.gen_test
async def test_dropping_an_old_token_keeps_a_newer_one(cache: AnyCache) -> None:
    await cache.put("zhangsan", "tok-old", INFO, 60)
    await cache.put("zhangsan", "tok-new", INFO, 60)
    await cache.drop("zhangsan", "tok-old")
    assert await cache.get("zhangsan") == ("tok-new", INFO)


@pytest.mark.gen_test
async def test_drop_without_a_token_drops_the_current_one(cache: AnyCache) -> None:
    await cache.put("zhangsan", "tok-1", INFO, 60)
    await cache.put("lisi", "tok-2", INFO, 60)
    await cache.drop("zhangsan")
    await cache.drop("nobody")
    assert await cache.get("zhangsan") is None
    assert await cache.get("lisi") == ("tok-2", INFO)


@pytest.mark.gen_test
async def test_lock_has_one_holder_until_released(cache: AnyCache) -> None:
    first = await cache.acquire_lock("zhangsan", 10)
    assert first
    assert await cache.acquire_lock("zhangsan", 10) is None
    assert await cache.acquire_lock("lisi", 10)  # per user
    await cache.release_lock("zhangsan", "not-the-holder")
    assert await cache.acquire_lock("zhangsan", 10) is None
    await cache.release_lock("zhangsan", first)
    second = await cache.acquire_lock("zhangsan", 10)
    assert second and second != first


@pytest.mark.gen_test
async def test_lock_expires(cache: AnyCache, clock: FakeClock) -> None:
    first = await cache.acquire_lock("zhangsan", 1 if isinstance(cache, RedisTokenCache) else 5)
    assert first
    if isinstance(cache, MemoryTokenCache):
        clock.advance(4.9)
        assert await cache.acquire_lock("zhangsan", 10) is None  # still held
        clock.advance(0.2)
    else:
        assert 0 < await cache.client.pttl("laibao:auth:lock:zhangsan") <= 1000

        async def free() -> bool:
            return not await cache.client.exists("laibao:auth:lock:zhangsan")

        await eventually(free, "the lock expires in Redis")
    second = await cache.acquire_lock("zhangsan", 10)
    assert second
    await cache.release_lock("zhangsan", first)  # the expired holder must not free the new one
    assert await cache.acquire_lock("zhangsan", 10) is None


@pytest.mark.gen_test
async def test_invalidation_reaches_the_listener(cache: AnyCache) -> None:
    heard: list[str] = []
    await cache.listen_invalidations(heard.append)
    await cache.publish_invalidation("zhangsan")
    await wait_for(lambda: heard == ["zhangsan"])


@pytest.mark.gen_test
async def test_non_positive_ttls_are_refused(cache: AnyCache) -> None:
    with pytest.raises(ValueError):
        await cache.put("zhangsan", "tok-1", INFO, 0)
    with pytest.raises(ValueError):
        await cache.acquire_lock("zhangsan", -1)
    assert await cache.get("zhangsan") is None


def test_open_token_cache_picks_redis_only_when_configured(io_loop: tornado.ioloop.IOLoop) -> None:
    memory = open_token_cache(make_config(redis_url=""))
    redis_cache = open_token_cache(make_config(redis_url="redis://127.0.0.1:1/0"))
    assert isinstance(memory, MemoryTokenCache) and isinstance(redis_cache, RedisTokenCache)
    io_loop.run_sync(memory.close)
    io_loop.run_sync(redis_cache.close)


# -------------------------------------------------------------------------------------- Redis only

@pytest.mark.gen_test
async def test_key_layout_is_the_existing_deployments(redis_url: str, raw: aioredis.Redis) -> None:
    cache = RedisTokenCache(redis_url)
    try:
        await cache.put("zhangsan", "tok-1", INFO, 120)
        assert await raw.get("authorization:wechatid:zhangsan") == "tok-1"
        assert json.loads(await raw.get("authorization:token:tok-1")) == INFO
        for key in ("authorization:wechatid:zhangsan", "authorization:token:tok-1"):
            assert 119_000 < await raw.pttl(key) <= 120_000
        assert sorted(await raw.keys("*")) == ["authorization:token:tok-1", "authorization:wechatid:zhangsan"]
    finally:
        await cache.close()


@pytest.mark.gen_test
async def test_reads_tokens_another_deployment_wrote(redis_url: str, raw: aioredis.Redis) -> None:
    await raw.set("authorization:wechatid:wangwu", "their-token", ex=300)
    await raw.set("authorization:token:their-token", json.dumps({"userId": 7, "dept": "财务"}), ex=300)
    await raw.set("authorization:wechatid:zhaoliu", "half-token", ex=300)  # info key missing
    await raw.set("authorization:wechatid:qianqi", "odd-token", ex=300)
    await raw.set("authorization:token:odd-token", "not json", ex=300)
    cache = RedisTokenCache(redis_url)
    try:
        assert await cache.get("wangwu") == ("their-token", {"userId": 7, "dept": "财务"})
        assert await cache.get("zhaoliu") is None
        assert await cache.get("qianqi") == ("odd-token", {})
    finally:
        await cache.close()


@pytest.mark.gen_test
async def test_lock_is_shared_between_instances(redis_url: str) -> None:
    one, two = RedisTokenCache(redis_url), RedisTokenCache(redis_url)
    try:
        held = await one.acquire_lock("zhangsan", 10)
        assert held and await two.acquire_lock("zhangsan", 10) is None
        await one.release_lock("zhangsan", held)
        assert await two.acquire_lock("zhangsan", 10)
    finally:
        await one.close()
        await two.close()


@pytest.mark.gen_test
async def test_invalidation_reaches_another_instance(redis_url: str, raw: aioredis.Redis) -> None:
    listener, publisher = RedisTokenCache(redis_url), RedisTokenCache(redis_url)
    heard: list[str] = []
    try:
        await listener.listen_invalidations(heard.append)
        assert await raw.pubsub_numsub(INVALIDATE_CHANNEL) == [(INVALIDATE_CHANNEL, 1)]
        await publisher.publish_invalidation("zhangsan")
        await publisher.publish_invalidation("李四")
        await wait_for(lambda: heard == ["zhangsan", "李四"])
    finally:
        await listener.close()
        await publisher.close()
    assert await raw.pubsub_numsub(INVALIDATE_CHANNEL) == [(INVALIDATE_CHANNEL, 0)]


@pytest.mark.gen_test(timeout=40)
async def test_listener_resubscribes_after_a_redis_restart(
    redis_url: str, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    listener = RedisTokenCache(redis_url, reconnect_delays=(0.05, 0.2))
    heard: list[str] = []
    try:
        await listener.listen_invalidations(heard.append)
        redis_server.stop()
        await wait_for(lambda: "invalidation listener lost Redis" in caplog.text, within=15)
        redis_server.start()
        # everything published while it was away is lost: it tells its owner to drop every local token
        await wait_for(lambda: EVERY_USER in heard, within=15)
        publisher = RedisTokenCache(redis_url)
        try:
            await publisher.publish_invalidation("zhangsan")
            await wait_for(lambda: "zhangsan" in heard)
        finally:
            await publisher.close()
    finally:
        await listener.close()


@pytest.mark.gen_test(timeout=30)
async def test_redis_down_is_a_store_error(redis_url: str, redis_server: RedisServer) -> None:
    cache = RedisTokenCache(redis_url, connect_timeout=0.5)
    redis_server.stop()
    try:
        with pytest.raises(StoreError, match="get token"):
            await cache.get("zhangsan")
        with pytest.raises(StoreError, match="put token"):
            await cache.put("zhangsan", "tok-secret-value", INFO, 60)
        with pytest.raises(StoreError) as caught:
            await cache.acquire_lock("zhangsan", 5)
        assert "tok-secret-value" not in str(caught.value)
    finally:
        redis_server.start()
        await cache.close()
