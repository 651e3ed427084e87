"""AuthService against real Redis, a real MariaDB and the auth stand-in over real HTTP.

Each AuthService here has its own user store, token cache and HTTP client, as a separate laibao
process would: two of them on the same Redis play two processes.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis.asyncio as aioredis
import tornado.ioloop

from laibao.auth import AuthService, Credential, lookup, nest
from laibao.config import Config
from laibao.errors import AuthUnavailable, NotAuthorized
from stores.tokens import MemoryTokenCache, RedisTokenCache
from stores.users import MemoryUserStore, MySQLUserStore, User
from tests.authstub import SECRET_KEY, Answer, AuthStub, bot, make_config
from tests.clock import FakeClock
from tests.conftest import make_outbound
from tests.harness import eventually
from tests.servers import RedisServer

KEY = base64.b64decode(SECRET_KEY)
SECRET = "zhangsan-secret-6f1c"  # the user's secret at the auth service
USERS = (
    User("zhangsan", name="张三", code="E1001", secret=SECRET),
    User("lisi", name="李四", code="E1002", secret="lisi-secret-83ad", enabled=False),
    User("wangwu", name="王五", code="E1003", secret="wrong-secret-for-wangwu"),
)


@dataclass
class World:
    """The stand-in auth service, the seeded databases, and the AuthServices ("processes") built on them."""

    stub: AuthStub
    config: Config
    redis: aioredis.Redis
    services: list[AuthService] = field(default_factory=list)

    async def process(self, clock: Callable[[], float] = time.time, **overrides: Any) -> AuthService:
        """A started AuthService with its own stores and HTTP client, as another laibao process has."""
        config = dataclasses.replace(self.config, **overrides)
        service = AuthService(
            config,
            MySQLUserStore(config.mysql_url, KEY),
            RedisTokenCache(config.redis_url),
            make_outbound(),
            clock=clock,
        )
        await service.start()
        self.services.append(service)
        return service

    async def auth_keys(self) -> list[str]:
        """Every authorization:* key in Redis."""
        return sorted(await self.redis.keys("authorization:*"))

    async def close(self) -> None:
        for service in self.services:
            await service.close()
            service.http.close()
        await self.stub.stop()
        await self.redis.aclose()


@pytest.fixture
def world(io_loop: tornado.ioloop.IOLoop, mysql_url: str, redis_url: str) -> Iterator[World]:
    stub = AuthStub(accounts={"E1001": SECRET, "E1002": "lisi-secret-83ad", "E1003": "the-real-one"})

    async def setup() -> World:
        await stub.start()
        users = MySQLUserStore(mysql_url, KEY)
        await users.init_schema()
        for user in USERS:
            await users.add(user)
        await users.close()
        config = make_config(auth_url=stub.url, auth_timeout=1.0, mysql_url=mysql_url, redis_url=redis_url)
        return World(stub, config, aioredis.Redis.from_url(redis_url, decode_responses=True))

    built = io_loop.run_sync(setup)
    yield built
    io_loop.run_sync(built.close)


def resolver(service: AuthService, mode: str) -> Callable[[str], Any]:
    return lambda userid: service.resolve(bot(service.config, mode), userid)


async def let_redis_pass(redis: aioredis.Redis, seconds: float, *keys: str) -> None:
    """``seconds`` of each key's life go by in Redis (it drops a key whose time is up)."""
    for key in keys:
        left = await redis.pttl(key)
        if left > 0:
            await redis.pexpire(key, left - round(seconds * 1000))


# ----------------------------------------------------------------------------------------- modes

@pytest.mark.gen_test
async def test_open_mode_touches_no_store(io_loop: tornado.ioloop.IOLoop) -> None:
    # stores that fail on any use: open mode must not use them
    config = make_config(mysql_url="mysql://u:p@127.0.0.1:1/x", redis_url="redis://127.0.0.1:1/0")
    http = make_outbound()
    service = AuthService(config, MySQLUserStore(config.mysql_url, KEY, connect_timeout=0.2),
                          RedisTokenCache(config.redis_url, connect_timeout=0.2), http)
    try:
        assert await resolver(service, "open")("anyone") == Credential("anyone")  # the stores would have failed
    finally:
        await service.close()
        http.close()


@pytest.mark.gen_test
async def test_allowlist_mode(world: World) -> None:
    service = await world.process()
    resolve = resolver(service, "allowlist")
    assert await resolve("zhangsan") == Credential("zhangsan", "张三")
    for userid in ("lisi", "nobody"):
        with pytest.raises(NotAuthorized):
            await resolve(userid)
    await service.users.set_enabled("lisi", True)
    assert await resolve("lisi") == Credential("lisi", "李四")  # read on every message: no stale grant
    await service.users.set_enabled("zhangsan", False)
    with pytest.raises(NotAuthorized):
        await resolve("zhangsan")
    assert world.stub.calls == [] and await world.auth_keys() == []


# ------------------------------------------------------------------------------- the token levels

@pytest.mark.gen_test(timeout=30)
async def test_token_mode_cache_levels(world: World) -> None:
    first = await world.process()
    resolve = resolver(first, "token")

    credential = await resolve("zhangsan")
    assert credential == Credential("zhangsan", "张三", world.stub.issued[0])
    assert len(world.stub.calls) == 1
    call = world.stub.calls[0]
    assert call.json == {"code": "E1001", "secret": SECRET}
    assert call.headers["Content-Type"].startswith("application/json")
    token = credential.token
    assert await world.redis.get("authorization:wechatid:zhangsan") == token
    info = json.loads(await world.redis.get(f"authorization:token:{token}"))
    assert (info["userid"], info["name"]) == ("zhangsan", "张三") and SECRET not in json.dumps(info)
    assert 3590_000 < await world.redis.pttl(f"authorization:token:{token}") <= 3600_000

    # level 2: another process finds the token in Redis
    second = await world.process()
    assert await resolver(second, "token")("zhangsan") == credential
    assert len(world.stub.calls) == 1

    # level 1: with the shared keys gone, a Redis read would miss and call the service; the process
    # cache answers without either
    await world.redis.delete(*await world.auth_keys())
    assert await resolve("zhangsan") == credential
    assert await resolver(second, "token")("zhangsan") == credential
    assert len(world.stub.calls) == 1 and await world.auth_keys() == []


@pytest.mark.gen_test
async def test_nested_fields_and_lifetime(world: World) -> None:
    world.stub.code_field, world.stub.secret_field = "auth.employee_code", "auth.secret"
    world.stub.answer = Answer(token_field="data.access_token", ttl_field="data.expires", ttl="120")
    service = await world.process(auth_code_field="auth.employee_code", auth_secret_field="auth.secret",
                                  auth_token_field="data.access_token", auth_ttl_field="data.expires")
    credential = await resolver(service, "token")("zhangsan")
    assert world.stub.calls[0].json == {"auth": {"employee_code": "E1001", "secret": SECRET}}
    assert credential.token == world.stub.issued[0]
    assert 119_000 < await world.redis.pttl("authorization:wechatid:zhangsan") <= 120_000


@pytest.mark.gen_test
async def test_missing_lifetime_uses_the_default(world: World) -> None:
    world.stub.answer = Answer(ttl=None)
    service = await world.process(auth_default_ttl=600.0)
    await resolver(service, "token")("zhangsan")
    assert 599_000 < await world.redis.pttl("authorization:wechatid:zhangsan") <= 600_000


@pytest.mark.gen_test
async def test_a_token_is_not_used_past_its_lifetime(world: World) -> None:
    world.stub.answer = Answer(ttl=10)
    clock = FakeClock(time.time())
    service = await world.process(clock=clock)  # token_cache_ttl is 30 s: the token's own 10 s must win
    resolve = resolver(service, "token")
    first = await resolve("zhangsan")
    clock.advance(9.9)
    assert await resolve("zhangsan") == first
    clock.advance(0.2)
    await let_redis_pass(world.redis, 10.1, *await world.auth_keys())  # Redis drops the token too
    second = await resolve("zhangsan")
    assert second.token != first.token and len(world.stub.calls) == 2


@pytest.mark.gen_test
async def test_the_process_cache_trusts_an_entry_for_token_cache_ttl(world: World) -> None:
    clock = FakeClock(time.time())
    service = await world.process(clock=clock, token_cache_ttl=30.0)  # LAIBAO_TOKEN_CACHE_TTL
    resolve = resolver(service, "token")
    first = await resolve("zhangsan")
    await world.redis.set("authorization:wechatid:zhangsan", "tok-from-another-process")
    await world.redis.set("authorization:token:tok-from-another-process",
                          json.dumps({"userid": "zhangsan", "name": "张三", "expires_at": time.time() + 3600}))
    clock.advance(29.9)
    assert await resolve("zhangsan") == first  # within the cache TTL: Redis is not read
    clock.advance(0.2)
    assert (await resolve("zhangsan")).token == "tok-from-another-process"  # then Redis is read again
    assert len(world.stub.calls) == 1


@pytest.mark.gen_test
async def test_unknown_or_disabled_user_is_refused_without_an_auth_call(world: World) -> None:
    service = await world.process()
    for userid in ("nobody", "lisi"):
        with pytest.raises(NotAuthorized):
            await resolver(service, "token")(userid)
    assert world.stub.calls == [] and await world.auth_keys() == []


# ------------------------------------------------------------------------- invalidation, concurrency

@pytest.mark.gen_test(timeout=30)
async def test_invalidation_reaches_the_other_process(world: World) -> None:
    one, two = await world.process(), await world.process()
    old = await resolver(one, "token")("zhangsan")
    assert await resolver(two, "token")("zhangsan") == old

    await one.invalidate("zhangsan", old.token)  # Dify refused the token on process one
    assert await world.auth_keys() == []
    # process two hears it on pub/sub and drops its copy: its next resolve signs in afresh
    deadline = time.monotonic() + 20
    while (fresh := await resolver(two, "token")("zhangsan")).token == old.token:
        assert time.monotonic() < deadline, "process two kept the invalidated token"
        await asyncio.sleep(0.02)
    assert fresh.token == world.stub.issued[1] and len(world.stub.calls) == 2
    assert await resolver(one, "token")("zhangsan") == fresh  # from Redis: no third sign-in
    assert len(world.stub.calls) == 2


@pytest.mark.gen_test(timeout=60)
async def test_a_process_that_resubscribed_drops_its_whole_cache(
    world: World, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    service = await world.process()
    old = await resolver(service, "token")("zhangsan")
    redis_server.stop(save=True)  # a persistent Redis restarts: invalidations published meanwhile are lost
    try:
        await eventually(lambda: "invalidation listener lost Redis" in caplog.text, "the listener notices")
    finally:
        redis_server.start()
    await eventually(lambda: "resubscribed to laibao:auth:invalidate" in caplog.text, "the listener resubscribes")
    # meanwhile the old token was refused elsewhere and the user signed in again on another process
    info = {"userid": "zhangsan", "name": "张三", "expires_at": time.time() + 3600}
    await world.redis.set("authorization:wechatid:zhangsan", "tok-after-the-outage", ex=3600)
    await world.redis.set("authorization:token:tok-after-the-outage", json.dumps(info), ex=3600)
    fresh = await resolver(service, "token")("zhangsan")
    assert (old.token, fresh.token) == (world.stub.issued[0], "tok-after-the-outage")  # not the cached one
    assert len(world.stub.calls) == 1


@pytest.mark.gen_test(timeout=30)
async def test_invalidating_an_old_token_keeps_a_newer_one(world: World) -> None:
    one, two = await world.process(), await world.process()
    old = await resolver(one, "token")("zhangsan")
    await one.invalidate("zhangsan", old.token)
    new = await resolver(two, "token")("zhangsan")
    await two.invalidate("zhangsan", old.token)  # a late 401 for the old token elsewhere
    assert await world.redis.get("authorization:wechatid:zhangsan") == new.token


@pytest.mark.gen_test(timeout=30)
async def test_concurrent_messages_make_one_auth_call(world: World) -> None:
    world.stub.answer = Answer(delay=0.3)
    one, two = await world.process(), await world.process()
    results = await asyncio.gather(*(
        resolver(one if i % 2 else two, "token")("zhangsan") for i in range(20)
    ))
    assert len(world.stub.calls) == 1
    assert {c.token for c in results} == {world.stub.issued[0]}


@pytest.mark.gen_test(timeout=30)
async def test_a_waiter_gives_up_when_the_lock_holder_never_delivers(world: World) -> None:
    service = await world.process(auth_timeout=0.3)
    service.lock_margin = 0.2
    holder = RedisTokenCache(world.config.redis_url)  # a process that took the lock and hangs
    try:
        assert await holder.acquire_lock("zhangsan", 30)
        started = time.monotonic()
        with pytest.raises(AuthUnavailable, match="another process"):
            await resolver(service, "token")("zhangsan")
        # it waits auth_timeout + 2 margins (0.7 s), not for the holder's 30 s lock
        assert 0.69 < time.monotonic() - started < 20
        assert world.stub.calls == []
    finally:
        await holder.close()


@pytest.mark.gen_test(timeout=30)
async def test_a_waiter_signs_in_itself_once_a_dead_holders_lock_expires(world: World) -> None:
    service = await world.process()
    holder = RedisTokenCache(world.config.redis_url)
    try:
        assert await holder.acquire_lock("zhangsan", 0.4)  # its process died: the lock just expires
        credential = await resolver(service, "token")("zhangsan")
        assert credential.token == world.stub.issued[0] and len(world.stub.calls) == 1
    finally:
        await holder.close()


@pytest.mark.gen_test(timeout=30)
async def test_an_invalidation_during_a_fetch_keeps_it_out_of_the_process_cache(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="laibao.auth")
    signed_in = asyncio.Event()
    world.stub.answer = Answer(hold=signed_in)
    one = await world.process()
    pending = asyncio.ensure_future(resolver(one, "token")("zhangsan"))
    await eventually(lambda: bool(world.stub.calls), "the sign-in reaches the auth service")
    other = RedisTokenCache(world.config.redis_url)  # another process: a 401 for an older token there
    try:
        await other.publish_invalidation("zhangsan")
    finally:
        await other.close()
    await eventually(lambda: "dropping the local token of zhangsan" in caplog.text, "process one hears it")
    signed_in.set()
    fetched = await pending
    # Were the fetched token in the process cache, it would survive the shared keys going away.
    await world.redis.delete(*await world.auth_keys())
    assert (await resolver(one, "token")("zhangsan")).token != fetched.token
    assert len(world.stub.calls) == 2


@pytest.mark.gen_test
async def test_memory_backends_work_for_one_process(world: World) -> None:
    memory = MemoryUserStore()
    await memory.add(USERS[0])
    http = make_outbound()
    service = AuthService(dataclasses.replace(world.config, redis_url="", mysql_url=""), memory,
                          MemoryTokenCache(), http)
    try:
        await service.start()
        resolve = resolver(service, "token")
        first = await resolve("zhangsan")
        assert await resolve("zhangsan") == first
        await service.invalidate("zhangsan", first.token)
        assert (await resolve("zhangsan")).token != first.token
        assert len(world.stub.calls) == 2
    finally:
        await service.close()
        http.close()


# --------------------------------------------------------------------------------------- failures

FAILURES: dict[str, Answer | None] = {
    "down": None,
    "slow": Answer(delay=60.0),  # far beyond auth_timeout (1 s): only the timeout ends the wait
    "500": Answer(status=500),
    "garbage": Answer(garbage=True),
    "no token": Answer(omit_token=True),
    "token at another path": Answer(token_field="data.token"),
    # the token travels in an HTTP header: printable ASCII without spaces, at most 4096 characters
    "non-printable token": Answer(token="tok-\x07-bell"),
    "token with a space": Answer(token="tok with space"),
    "non-ASCII token": Answer(token="tok-令牌"),
    "token over 4096": Answer(token="t" * 4097),
    "a redirect": Answer(redirect="/api/elsewhere"),  # where a fresh token would be waiting
}


@pytest.mark.parametrize("failure", list(FAILURES))
@pytest.mark.gen_test(timeout=30)
async def test_auth_service_failures_cache_nothing(world: World, failure: str) -> None:
    answer = FAILURES[failure]
    if answer is None:
        await world.stub.stop()
    else:
        world.stub.answer = answer
    service = await world.process()
    resolve = resolver(service, "token")
    started = time.monotonic()
    with pytest.raises(AuthUnavailable) as caught:
        await resolve("zhangsan")
    assert time.monotonic() - started < 20  # bounded by auth_timeout (1 s), not by the service
    assert SECRET not in str(caught.value)
    assert await world.auth_keys() == []
    assert await world.redis.keys("laibao:auth:lock:*") == []  # the lock was released

    # nothing was cached: once the service answers again, the next message signs in at once
    if answer is None:
        await world.stub.start()
    world.stub.answer = Answer()
    calls = len(world.stub.calls)
    credential = await resolve("zhangsan")
    assert credential.token == world.stub.issued[-1] and len(world.stub.calls) == calls + 1


@pytest.mark.gen_test
async def test_a_token_of_4096_printable_characters_is_accepted(world: World) -> None:
    token = "".join(chr(33 + i % 94) for i in range(4096))  # every printable ASCII character but space
    world.stub.answer = Answer(token=token)
    service = await world.process()
    assert (await resolver(service, "token")("zhangsan")).token == token
    assert await world.redis.get("authorization:wechatid:zhangsan") == token


@pytest.mark.gen_test
async def test_refused_secret_is_unavailable_not_cached(world: World) -> None:
    service = await world.process()
    with pytest.raises(AuthUnavailable, match="HTTP 401"):
        await resolver(service, "token")("wangwu")
    assert await world.auth_keys() == []


@pytest.mark.gen_test(timeout=30)
async def test_backends_down_are_unavailable(world: World, redis_server: RedisServer) -> None:
    service = await world.process()
    redis_server.stop()
    try:
        with pytest.raises(AuthUnavailable, match="token cache"):
            await resolver(service, "token")("zhangsan")
    finally:
        redis_server.start()
    assert world.stub.calls == []
    broken = await world.process(mysql_url=world.config.mysql_url.rsplit(":", 1)[0] + ":1/x")
    with pytest.raises(AuthUnavailable, match="user store"):
        await resolver(broken, "allowlist")("zhangsan")
    with pytest.raises(AuthUnavailable, match="user store"):
        await resolver(broken, "token")("zhangsan")


@pytest.mark.gen_test(timeout=60)
async def test_no_secret_or_token_in_logs(world: World, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    one, two = await world.process(), await world.process()
    first = await resolver(one, "token")("zhangsan")
    await resolver(two, "token")("zhangsan")
    await one.invalidate("zhangsan", first.token)
    # logged locally on one, then by both listeners once the pub/sub message arrives
    await eventually(lambda: caplog.text.count("dropping the local token of zhangsan") >= 3, "both processes hear it")
    for answer in (Answer(status=500), Answer(garbage=True), Answer(delay=3.0), Answer(omit_token=True)):
        world.stub.answer = answer
        with pytest.raises(AuthUnavailable):
            await resolver(two, "token")("zhangsan")
    with pytest.raises(AuthUnavailable):
        await resolver(two, "token")("wangwu")
    world.stub.answer = Answer()
    await resolver(two, "token")("zhangsan")
    await one.invalidate("zhangsan", world.stub.issued[-1])

    assert len(world.stub.issued) >= 2 and caplog.records  # the scenarios ran and logged
    assert "zhangsan" in caplog.text  # failures name the user...
    for value in (SECRET, "wrong-secret-for-wangwu", *world.stub.issued):  # ...never a secret or token
        assert value not in caplog.text
        for record in caplog.records:
            assert value not in repr(record.args)


# ----------------------------------------------------------------------------- response parsing

def test_lookup_and_nest_follow_dotted_paths() -> None:
    payload = {"data": {"token": "t", "items": [{"token": "u"}]}, "a.b": 1}
    assert lookup(payload, "data.token") == "t"
    assert lookup(payload, "data.items.0.token") == "u"
    assert lookup(payload, "a.b") == 1  # a literal key with a dot wins
    for missing in ("data.nope", "data.token.x", "data.items.5.token", "nope"):
        assert lookup(payload, missing) is None
    assert lookup(["x"], "0") == "x" and lookup("text", "token") is None
    body: dict[str, Any] = {}
    nest(body, "auth.code", "c")
    nest(body, "auth.secret", "s")
    nest(body, "flat", 1)
    assert body == {"auth": {"code": "c", "secret": "s"}, "flat": 1}
