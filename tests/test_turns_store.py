"""One contract suite for turns and in-flight limits, run against the memory and the Redis implementation.

The Redis variant plays two laibao processes: two RedisTurns on separate clients of one server. The
memory variant is one process, so both "processes" are the same object. Sessions are real stream
sessions (created, finished) in the matching stores, since that is what turns and limits look at.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

import pytest
import redis.asyncio as aioredis
import tornado.ioloop
from redis.crc import key_slot

from laibao.errors import StoreError
from stores import DONE, ERROR, MemoryStores, RedisStores, StreamSession, StreamStore
from stores.keys import Keys, new_sid
from stores.turns_store import HEAD, NOT_QUEUED, WAITING, MemoryTurns, RedisTurns, Turns, session_status
from tests.clock import FakeClock
from tests.conftest import REDIS_MODES, redis_url_for
from tests.harness import eventually
from tests.servers import RedisServer

T0 = 1_732_500_000.25  # a fixed "now" for admissions (callers pass their own clock)
TTL = 1800.0
BOT, SCOPE, USER = "helpdesk", "wrkSFfCgAAtMQKg4xqDatM5C9IPAqTlA:张三", "张三"
LIMIT = 3  # WeCom's in-flight limit per user


@dataclass
class Cluster:
    """Two processes' views of the same turns and limits, and the sessions both read."""

    a: Turns
    b: Turns
    streams: StreamStore
    clock: FakeClock | None = None  # the memory variant's clock
    redis: aioredis.Redis | None = None  # the Redis variant's server

    async def let_pass(self, seconds: float, *keys: str) -> None:
        """``seconds`` go by for ``keys``: the memory clock moves, or Redis's TTL of each key shrinks."""
        if self.clock is not None:
            self.clock.advance(seconds)
            return
        assert self.redis is not None
        for key in keys:
            left = await self.redis.pttl(key)
            if left > 0:  # PEXPIRE with what is left: at or below zero, Redis drops the key as it would
                await self.redis.pexpire(key, left - round(seconds * 1000))

    async def start(self, *sids: str) -> None:
        """Create a running session for each sid, as the callback does before queueing it."""
        for sid in sids:
            await self.streams.create(StreamSession(sid=sid, bot=BOT, user=USER, owner="node-a"), TTL)

    async def end(self, sid: str, status: str = DONE) -> None:
        """Finish a session as its relay does when Dify is done (or failed)."""
        assert await self.streams.finish(sid, "node-a", status, "", {}, T0)


@pytest.fixture(params=["memory", *REDIS_MODES])
def cluster(request: pytest.FixtureRequest, io_loop: tornado.ioloop.IOLoop) -> Iterator[Cluster]:
    """Each implementation in turn; Redis on a flushed real server, reached by two clients."""
    if request.param == "memory":
        clock = FakeClock(T0)
        stores = MemoryStores(clock=clock)
        turns = MemoryTurns(session_status(stores.streams), clock=clock)
        yield Cluster(turns, turns, stores.streams, clock=clock)
        return
    url = redis_url_for(request, request.param)
    first, second = RedisStores(url), RedisStores(url)
    try:
        yield Cluster(RedisTurns(first.client), RedisTurns(second.client), first.streams, redis=first.client)
    finally:
        io_loop.run_sync(first.close)
        io_loop.run_sync(second.close)


@pytest.fixture
def redis_stores(redis_url: str, io_loop: tornado.ioloop.IOLoop) -> Iterator[RedisStores]:
    """The Redis implementation only, for what is specific to it."""
    built = RedisStores(redis_url)
    yield built
    io_loop.run_sync(built.close)


async def queued(turns: Turns, scope: str = SCOPE) -> list[str]:
    """The conversation's queue as stored, dead heads included: read here, since laibao itself never needs
    more than the head (Redis's list, or the memory map's entry under the same key name)."""
    key = Keys().turns(BOT, scope)
    if isinstance(turns, RedisTurns):
        return [str(sid) for sid in await turns.turns._client.lrange(key, 0, -1)]
    assert isinstance(turns, MemoryTurns)
    return list(turns.turns._queues.get(key) or [])


async def positions(turns: Turns, *sids: str, scope: str = SCOPE) -> list[int | None]:
    """Where each sid stands in the conversation's queue (None: not queued)."""
    queue = await queued(turns, scope)
    return [queue.index(sid) if sid in queue else None for sid in sids]


PROBE = "probe"  # never a session: a newcomer that is admitted only to see whether it could be


async def taken(turns: Turns, now: float, *, ttl: float = TTL, user: str = USER, bot: str = BOT) -> int:
    """How many of the user's slots a new message finds taken at ``now``: the smallest limit that admits it,
    less one (it is released again at once). Like any admission, this drops stale and finished members."""
    for limit in range(1, 10):
        if await turns.inflight.acquire(bot, user, PROBE, limit, ttl, now):
            await turns.inflight.release(bot, user, PROBE)
            return limit - 1
    raise AssertionError("more than 8 slots taken")


# ------------------------------------------------------------------------------------------- turns

@pytest.mark.gen_test
async def test_turns_follow_arrival_order_across_processes(cluster: Cluster) -> None:
    await cluster.start("s1", "s2", "s3")
    assert await cluster.a.turns.join(BOT, SCOPE, "s1", TTL) == 0
    assert await cluster.b.turns.join(BOT, SCOPE, "s2", TTL) == 1
    assert await cluster.a.turns.join(BOT, SCOPE, "s3", TTL) == 2
    for view in (cluster.a, cluster.b):
        assert [await view.turns.my_turn(BOT, SCOPE, sid) for sid in ("s1", "s2", "s3")] == [HEAD, WAITING, WAITING]
    await cluster.a.turns.leave(BOT, SCOPE, "s1")  # s1's answer is complete
    for view in (cluster.a, cluster.b):
        assert [await view.turns.my_turn(BOT, SCOPE, sid) for sid in ("s1", "s2", "s3")] == [NOT_QUEUED, HEAD, WAITING]
    await cluster.b.turns.leave(BOT, SCOPE, "s2")
    assert await cluster.a.turns.my_turn(BOT, SCOPE, "s3") == HEAD
    assert await positions(cluster.b, "s1", "s2", "s3") == [None, None, 0]


@pytest.mark.gen_test
async def test_join_is_idempotent(cluster: Cluster) -> None:
    await cluster.start("s1", "s2", "s3")
    assert await cluster.a.turns.join(BOT, SCOPE, "s1", TTL) == 0
    assert await cluster.a.turns.join(BOT, SCOPE, "s2", TTL) == 1
    # a redelivered callback, on the same or another process, joins again: same place, no second entry
    assert await cluster.b.turns.join(BOT, SCOPE, "s1", TTL) == 0
    assert await cluster.a.turns.join(BOT, SCOPE, "s2", TTL) == 1
    assert await cluster.b.turns.join(BOT, SCOPE, "s3", TTL) == 2
    await cluster.a.turns.leave(BOT, SCOPE, "s1")
    assert await positions(cluster.a, "s1", "s2", "s3") == [None, 0, 1]
    assert await cluster.b.turns.my_turn(BOT, SCOPE, "s2") == HEAD


@pytest.mark.gen_test
async def test_heads_that_can_never_finish_are_dropped(cluster: Cluster) -> None:
    # s2 has no session at all (expired, or never created); s1 and s3 ended without leaving
    await cluster.start("s1", "s3", "s4", "s5")
    for sid in ("s1", "s2", "s3", "s4", "s5"):
        await cluster.a.turns.join(BOT, SCOPE, sid, TTL)
    await cluster.end("s1", DONE)
    await cluster.end("s3", ERROR)
    assert await cluster.b.turns.my_turn(BOT, SCOPE, "s5") == WAITING  # s4 is running: it keeps the turn
    assert await positions(cluster.a, "s1", "s2", "s3", "s4", "s5") == [None, None, None, 0, 1]
    assert await cluster.b.turns.my_turn(BOT, SCOPE, "s4") == HEAD
    await cluster.end("s4", DONE)  # its relay crashed before leaving
    assert await cluster.a.turns.my_turn(BOT, SCOPE, "s5") == HEAD
    assert await positions(cluster.b, "s4", "s5") == [None, 0]


@pytest.mark.gen_test
async def test_a_dead_head_that_asks_gets_no_turn(cluster: Cluster) -> None:
    await cluster.start("s1", "s2")
    await cluster.a.turns.join(BOT, SCOPE, "s1", TTL)
    await cluster.a.turns.join(BOT, SCOPE, "s2", TTL)
    await cluster.end("s1")
    assert await cluster.a.turns.my_turn(BOT, SCOPE, "s1") == NOT_QUEUED
    assert await positions(cluster.a, "s1", "s2") == [None, 0]


@pytest.mark.gen_test
async def test_leave_from_the_middle(cluster: Cluster) -> None:
    await cluster.start("s1", "s2", "s3", "s4")
    for sid in ("s1", "s2", "s3", "s4"):
        await cluster.a.turns.join(BOT, SCOPE, sid, TTL)
    await cluster.b.turns.leave(BOT, SCOPE, "s3")  # /stop on a message still waiting
    assert await positions(cluster.a, "s1", "s2", "s3", "s4") == [0, 1, None, 2]
    assert await cluster.b.turns.head(BOT, SCOPE) == "s1"
    assert await cluster.b.turns.head(BOT, "other-scope") is None
    await cluster.b.turns.leave(BOT, SCOPE, "never-joined")
    await cluster.b.turns.leave(BOT, "other-scope", "s1")
    assert await positions(cluster.a, "s1", "s2", "s4") == [0, 1, 2]
    await cluster.a.turns.leave(BOT, SCOPE, "s1")
    await cluster.a.turns.leave(BOT, SCOPE, "s2")
    assert await cluster.b.turns.my_turn(BOT, SCOPE, "s4") == HEAD
    await cluster.a.turns.leave(BOT, SCOPE, "s4")
    assert await positions(cluster.a, "s4") == [None]
    assert await cluster.a.turns.my_turn(BOT, SCOPE, "s4") == NOT_QUEUED


@pytest.mark.gen_test
async def test_concurrent_joins_keep_every_sid_once(cluster: Cluster) -> None:
    sids = [f"s{i}" for i in range(24)]
    await cluster.start(*sids)
    # every sid joins twice (as a redelivery would), half of them through each process, all at once
    attempts = [(cluster.a if i % 2 else cluster.b, sid) for i, sid in enumerate(sids + sids)]
    random.Random(7).shuffle(attempts)
    got = await asyncio.gather(*(view.turns.join(BOT, SCOPE, sid, TTL) for view, sid in attempts))
    by_sid: dict[str, set[int]] = {}
    for (_, sid), pos in zip(attempts, got, strict=True):
        by_sid.setdefault(sid, set()).add(pos)
    assert all(len(seen) == 1 for seen in by_sid.values())  # both joins of a sid saw one place
    queued = await positions(cluster.a, *sids)
    assert sorted(p for p in queued if p is not None) == list(range(len(sids)))
    assert {sid: seen.pop() for sid, seen in by_sid.items()} == dict(zip(sids, queued, strict=True))
    assert await cluster.b.turns.join(BOT, SCOPE, "late", TTL) == len(sids)


@pytest.mark.gen_test
async def test_each_conversation_has_its_own_queue(cluster: Cluster) -> None:
    await cluster.start("s1", "s2", "s3")
    assert await cluster.a.turns.join(BOT, SCOPE, "s1", TTL) == 0
    assert await cluster.a.turns.join(BOT, "李四", "s2", TTL) == 0
    assert await cluster.a.turns.join("sales", SCOPE, "s3", TTL) == 0
    assert await cluster.b.turns.my_turn(BOT, "李四", "s2") == HEAD
    assert await cluster.b.turns.my_turn("sales", SCOPE, "s3") == HEAD
    assert await cluster.b.turns.my_turn(BOT, SCOPE, "s2") == NOT_QUEUED


@pytest.mark.gen_test
async def test_a_stream_closed_for_the_window_keeps_its_turn_and_slot_while_its_relay_beats(
    cluster: Cluster
) -> None:
    # WeCom's window closed s1's stream (done for WeCom) while Dify still streams it: the relay is on
    await cluster.start("s1", "s2", "s3", "s4")
    for sid in ("s1", "s2"):
        await cluster.a.turns.join(BOT, SCOPE, sid, TTL)
    for sid in ("s1", "s2", "s3"):
        assert await cluster.a.inflight.acquire(BOT, USER, sid, LIMIT, TTL, T0)
    assert await cluster.streams.finish("s1", "node-a", DONE, "（回答较长）", {"relay": "on", "beat": repr(T0)}, T0)
    assert await cluster.b.turns.my_turn(BOT, SCOPE, "s2", T0 + 10) == WAITING
    assert not await cluster.b.inflight.acquire(BOT, USER, "s4", LIMIT, TTL, T0 + 10)
    assert await taken(cluster.b, T0 + 10) == 3
    # its heartbeat went stale (the process died): neither the turn nor the slot is held any longer
    assert await cluster.b.turns.my_turn(BOT, SCOPE, "s2", T0 + 16) == HEAD
    assert await cluster.b.inflight.acquire(BOT, USER, "s4", LIMIT, TTL, T0 + 16)
    # the relay's end frees them at once
    assert await cluster.streams.finish("s2", "node-a", DONE, "", {"relay": "on", "beat": repr(T0 + 16)}, T0)
    assert await cluster.a.turns.my_turn(BOT, SCOPE, "s2", T0 + 17) == HEAD
    await cluster.streams.annotate("s2", {"relay": "over"})
    assert await cluster.a.turns.my_turn(BOT, SCOPE, "s2", T0 + 17) == NOT_QUEUED


# ---------------------------------------------------------------------------------------- in flight

@pytest.mark.gen_test
async def test_fourth_message_is_refused_until_one_is_released(cluster: Cluster) -> None:
    await cluster.start("s1", "s2", "s3", "s4")
    assert await cluster.a.inflight.acquire(BOT, USER, "s1", LIMIT, TTL, T0)
    assert await cluster.b.inflight.acquire(BOT, USER, "s2", LIMIT, TTL, T0 + 1)
    assert await cluster.a.inflight.acquire(BOT, USER, "s3", LIMIT, TTL, T0 + 2)
    assert not await cluster.b.inflight.acquire(BOT, USER, "s4", LIMIT, TTL, T0 + 3)
    assert await taken(cluster.a, T0 + 3) == 3
    await cluster.b.inflight.release(BOT, USER, "s2")
    await cluster.b.inflight.release(BOT, USER, "never-admitted")
    assert await taken(cluster.a, T0 + 4) == 2
    assert await cluster.b.inflight.acquire(BOT, USER, "s4", LIMIT, TTL, T0 + 4)
    assert not await cluster.a.inflight.acquire(BOT, USER, "s2", LIMIT, TTL, T0 + 5)  # full again


@pytest.mark.gen_test
async def test_an_admitted_message_is_admitted_again(cluster: Cluster) -> None:
    await cluster.start("s1", "s2", "s3", "s4")
    for sid in ("s1", "s2", "s3"):
        assert await cluster.a.inflight.acquire(BOT, USER, sid, LIMIT, TTL, T0)
    # full, yet a redelivered s2 (on another process) keeps its slot and takes no second one
    assert await cluster.b.inflight.acquire(BOT, USER, "s2", LIMIT, TTL, T0 + 1)
    assert await taken(cluster.a, T0 + 1) == 3
    assert not await cluster.b.inflight.acquire(BOT, USER, "s4", LIMIT, TTL, T0 + 1)


@pytest.mark.gen_test
async def test_finished_or_missing_sessions_stop_counting(cluster: Cluster) -> None:
    await cluster.start("s1", "s2", "s3", "s4", "s5", "s6")
    for sid in ("s1", "s2", "s3"):
        assert await cluster.a.inflight.acquire(BOT, USER, sid, LIMIT, TTL, T0)
    await cluster.end("s2", DONE)  # answered, but the relay never released
    assert await taken(cluster.b, T0) == 2
    assert await cluster.b.inflight.acquire(BOT, USER, "s4", LIMIT, TTL, T0)
    assert not await cluster.b.inflight.acquire(BOT, USER, "s5", LIMIT, TTL, T0)
    await cluster.end("s1", ERROR)
    assert await cluster.b.inflight.acquire(BOT, USER, "s5", LIMIT, TTL, T0)
    assert not await cluster.a.inflight.acquire(BOT, USER, "s6", LIMIT, TTL, T0)
    # a session that expired (or was never created) holds no slot either
    await cluster.a.inflight.release(BOT, USER, "s3")
    assert await cluster.a.inflight.acquire(BOT, USER, "gone", LIMIT, TTL, T0 + 6)
    assert await taken(cluster.a, T0 + 6) == 2  # s4, s5
    assert await cluster.b.inflight.acquire(BOT, USER, "s6", LIMIT, TTL, T0 + 7)
    assert await taken(cluster.b, T0 + 7) == 3


@pytest.mark.gen_test
async def test_stale_admissions_stop_counting(cluster: Cluster) -> None:
    ttl = 400.0  # WeCom's 6-minute window and a margin
    await cluster.start("s1", "s2", "s3", "s4", "s5")
    assert await cluster.a.inflight.acquire(BOT, USER, "s1", LIMIT, ttl, T0)
    assert await cluster.a.inflight.acquire(BOT, USER, "s2", LIMIT, ttl, T0 + 100)
    assert await cluster.a.inflight.acquire(BOT, USER, "s3", LIMIT, ttl, T0 + 100)
    assert not await cluster.b.inflight.acquire(BOT, USER, "s4", LIMIT, ttl, T0 + ttl)  # s1 is exactly ttl old
    assert await taken(cluster.b, T0 + ttl, ttl=ttl) == 3
    assert await taken(cluster.b, T0 + ttl + 1, ttl=ttl) == 2
    assert await cluster.b.inflight.acquire(BOT, USER, "s4", LIMIT, ttl, T0 + ttl + 1)
    # s1's stale slot was dropped, not kept: asking again, it waits like any newcomer
    assert not await cluster.a.inflight.acquire(BOT, USER, "s1", LIMIT, ttl, T0 + ttl + 2)
    assert await taken(cluster.a, T0 + 100 + ttl + 1, ttl=ttl) == 1  # s4
    assert await cluster.a.inflight.acquire(BOT, USER, "s5", LIMIT, ttl, T0 + 100 + ttl + 1)


@pytest.mark.gen_test
async def test_limits_are_per_user_and_bot(cluster: Cluster) -> None:
    await cluster.start("s1", "s2", "s3", "s4", "s5")
    for sid in ("s1", "s2", "s3"):
        assert await cluster.a.inflight.acquire(BOT, USER, sid, LIMIT, TTL, T0)
    assert await cluster.b.inflight.acquire(BOT, "李四", "s4", LIMIT, TTL, T0)
    assert await cluster.b.inflight.acquire("sales", USER, "s5", LIMIT, TTL, T0)
    assert await taken(cluster.a, T0, user="李四") == 1
    assert await taken(cluster.a, T0, user="nobody") == 0


@pytest.mark.gen_test
async def test_non_positive_ttl_is_refused(cluster: Cluster) -> None:
    await cluster.start("s1")
    with pytest.raises(ValueError):
        await cluster.a.turns.join(BOT, SCOPE, "s1", 0)
    with pytest.raises(ValueError):
        await cluster.a.inflight.acquire(BOT, USER, "s1", LIMIT, -1, T0)
    assert await positions(cluster.a, "s1") == [None]
    assert await taken(cluster.a, T0) == 0


@pytest.mark.gen_test
async def test_queues_and_admissions_expire(cluster: Cluster) -> None:
    queue, admitted = Keys().turns(BOT, SCOPE), Keys().inflight(BOT, USER)
    await cluster.start("s1", "s2", "s3")
    await cluster.a.turns.join(BOT, SCOPE, "s1", 10)
    assert await cluster.a.inflight.acquire(BOT, USER, "s1", 1, 10, T0)
    await cluster.let_pass(6, queue, admitted)
    await cluster.b.turns.join(BOT, SCOPE, "s2", 10)  # a join re-arms the whole queue's life
    await cluster.let_pass(6, queue, admitted)  # 12 s after s1 joined, 6 s after s2 did
    assert await positions(cluster.a, "s1", "s2") == [0, 1]
    # the user's admissions are forgotten ttl after the last one, though the caller's clock stood still
    assert await cluster.a.inflight.acquire(BOT, USER, "s3", 1, 10, T0)
    await cluster.let_pass(10.001, queue, admitted)
    assert await positions(cluster.a, "s1", "s2") == [None, None]
    assert await taken(cluster.a, T0) == 0


@pytest.mark.gen_test
async def test_redis_expires_queues_and_admissions_on_its_own(redis_stores: RedisStores) -> None:
    turns, client = RedisTurns(redis_stores.client), redis_stores.client
    await redis_stores.streams.create(StreamSession(sid="s1", bot=BOT, user=USER, owner="node-a"), TTL)
    await turns.turns.join(BOT, SCOPE, "s1", 1)
    assert await turns.inflight.acquire(BOT, USER, "s1", 1, 1, T0)
    keys = (Keys().turns(BOT, SCOPE), Keys().inflight(BOT, USER))
    for key in keys:
        assert 0 < await client.pttl(key) <= 1000
    for key in keys:
        async def gone(key: str = key) -> bool:
            return not await client.exists(key)

        await eventually(gone, f"{key} expires")
    assert await positions(turns, "s1") == [None]
    assert await taken(turns, T0) == 0


# ------------------------------------------------------------------------ both behave the same way

@pytest.mark.gen_test(timeout=90)
async def test_memory_and_redis_agree_on_random_operations(
    redis_url: str, io_loop: tornado.ioloop.IOLoop
) -> None:
    memory_stores, redis_stores = MemoryStores(), RedisStores(redis_url)
    memory = MemoryTurns(session_status(memory_stores.streams))
    shared = RedisTurns(redis_stores.client)
    rng = random.Random(20241126)
    sids, scopes = [f"s{i}" for i in range(6)], ["a", "b"]
    seen: dict[str, set[object]] = {}
    lengths: set[int] = set()  # of the queues read
    try:
        for step in range(400):
            sid, scope = rng.choice(sids), rng.choice(scopes)
            now = T0 + step + rng.choice([0.0, 0.5])
            op = rng.choice(["join", "my_turn", "leave", "queued", "acquire", "release", "taken",
                             "start", "end"])
            results: list[object] = []
            for impl, stores in ((memory, memory_stores), (shared, redis_stores)):
                if op == "join":
                    results.append(await impl.turns.join(BOT, scope, sid, TTL))
                elif op == "my_turn":
                    results.append(await impl.turns.my_turn(BOT, scope, sid))
                elif op == "leave":
                    await impl.turns.leave(BOT, scope, sid)
                    results.append(None)
                elif op == "queued":
                    results.append(await queued(impl, scope))
                    lengths.add(len(await queued(impl, scope)))
                elif op == "acquire":
                    results.append(await impl.inflight.acquire(BOT, scope, sid, 2, 30.0, now))
                elif op == "release":
                    await impl.inflight.release(BOT, scope, sid)
                    results.append(None)
                elif op == "taken":
                    results.append(await taken(impl, now, ttl=30.0, user=scope))
                elif op == "start":
                    await stores.streams.create(StreamSession(sid=sid, bot=BOT, user=USER, owner="n"), TTL)
                    results.append(None)
                else:
                    results.append(await stores.streams.finish(sid, "n", DONE, "", {}, now))
            assert results[0] == results[1], (step, op, sid, scope)
            seen.setdefault(op, set()).add(repr(results[0]))
        # the sequence reached both answers of every question, not just one
        assert seen["my_turn"] == {"1", "0", "-1"}
        assert seen["acquire"] == {"True", "False"}
        assert {0, 1, 2} <= lengths
        assert {"0", "1", "2"} <= seen["taken"]
        for scope in scopes:
            assert await positions(memory, *sids, scope=scope) == await positions(shared, *sids, scope=scope)
    finally:
        await redis_stores.close()


# --------------------------------------------------------------------------------------- memory only

@pytest.mark.gen_test
async def test_memory_without_sessions_drops_nothing() -> None:
    turns = MemoryTurns()  # no session lookup: only leave, release and expiry end an entry
    await turns.turns.join(BOT, SCOPE, "s1", TTL)
    await turns.turns.join(BOT, SCOPE, "s2", TTL)
    assert await turns.turns.my_turn(BOT, SCOPE, "s1") == HEAD
    assert await turns.turns.my_turn(BOT, SCOPE, "s2") == WAITING
    for sid in ("s1", "s2", "s3"):
        assert await turns.inflight.acquire(BOT, USER, sid, LIMIT, TTL, T0)
    assert not await turns.inflight.acquire(BOT, USER, "s4", LIMIT, TTL, T0)


@pytest.mark.gen_test
async def test_memory_status_lookup_may_suspend() -> None:
    stores = MemoryStores()
    lookup = session_status(stores.streams)

    async def slow_status(sid: str) -> StreamSession | None:
        await asyncio.sleep(0.01)  # as a remote lookup would: other calls run meanwhile
        return await lookup(sid)

    turns = MemoryTurns(slow_status)
    sids = [f"s{i}" for i in range(8)]
    for sid in sids:
        await stores.streams.create(StreamSession(sid=sid, bot=BOT, user=USER, owner="n"), TTL)
        await turns.turns.join(BOT, SCOPE, sid, TTL)
    for sid in sids[:4]:
        assert await stores.streams.finish(sid, "n", DONE, "", {}, T0)
    # racing checks must drop each dead head once, never a live one
    verdicts = await asyncio.gather(*(turns.turns.my_turn(BOT, SCOPE, sid) for sid in sids * 2))
    assert [sid for sid, mine in zip(sids * 2, verdicts, strict=True) if mine == HEAD] == ["s4", "s4"]
    assert await positions(turns, *sids) == [None] * 4 + [0, 1, 2, 3]
    admitted = await asyncio.gather(*(turns.inflight.acquire(BOT, USER, sid, LIMIT, TTL, T0) for sid in sids[4:]))
    assert sorted(admitted) == [False, True, True, True]
    assert await taken(turns, T0) == LIMIT


# ---------------------------------------------------------------------------------------- redis only

@pytest.mark.gen_test
async def test_redis_key_layout(redis_stores: RedisStores) -> None:
    client, turns = redis_stores.client, RedisTurns(redis_stores.client)
    sid = new_sid(BOT, SCOPE)
    await redis_stores.streams.create(StreamSession(sid=sid, bot=BOT, user=USER, owner="n"), TTL)
    await turns.turns.join(BOT, SCOPE, sid, 600)
    await turns.inflight.acquire(BOT, USER, sid, LIMIT, 400, T0)
    keys = Keys()
    queue, admitted, stream = keys.turns(BOT, SCOPE), keys.inflight(BOT, USER), keys.stream(sid)
    assert sorted(await client.keys("*")) == sorted([admitted, stream, queue])
    # a conversation's queue and its sessions share one hash slot (one script may touch both)
    assert key_slot(queue.encode()) == key_slot(stream.encode())
    assert await client.type(queue) == "list"
    assert await client.lrange(queue, 0, -1) == [sid]
    assert await client.zrange(admitted, 0, -1, withscores=True) == [(sid, T0)]
    assert 590_000 < await client.pttl(queue) <= 600_000
    assert 390_000 < await client.pttl(admitted) <= 400_000


@pytest.mark.gen_test
async def test_redis_prefix_covers_the_sessions_read(redis_stores: RedisStores, redis_url: str) -> None:
    staging = RedisStores(redis_url, prefix="staging")
    try:
        turns = RedisTurns(staging.client, Keys("staging"))
        # a live session under the default prefix must not keep staging's s1 alive
        await redis_stores.streams.create(StreamSession(sid="s1", bot=BOT, user=USER, owner="n"), TTL)
        await staging.streams.create(StreamSession(sid="s2", bot=BOT, user=USER, owner="n"), TTL)
        for sid in ("s1", "s2"):
            await turns.turns.join(BOT, SCOPE, sid, TTL)
            assert await turns.inflight.acquire(BOT, USER, sid, 1, TTL, T0)  # s2 only once s1 is dropped
        assert await turns.turns.my_turn(BOT, SCOPE, "s2") == HEAD
        assert await taken(turns, T0) == 1
        assert sorted(k for k in await staging.client.keys("staging:*") if ":stream:" not in k) == sorted([
            Keys("staging").inflight(BOT, USER), Keys("staging").turns(BOT, SCOPE)])
    finally:
        await staging.close()


@pytest.mark.gen_test(timeout=30)
async def test_redis_down_is_a_store_error(redis_stores: RedisStores, redis_server: RedisServer) -> None:
    turns = RedisTurns(redis_stores.client)
    await redis_stores.streams.create(StreamSession(sid="s1", bot=BOT, user=USER, owner="n"), TTL)
    await turns.turns.join(BOT, SCOPE, "s1", TTL)
    redis_server.stop()
    try:
        started = time.monotonic()
        calls: list[Callable[[], Awaitable[object]]] = [
            lambda: turns.turns.join(BOT, SCOPE, "s2", TTL),
            lambda: turns.turns.my_turn(BOT, SCOPE, "s1"),
            lambda: turns.turns.leave(BOT, SCOPE, "s1"),
            lambda: turns.inflight.acquire(BOT, USER, "s1", LIMIT, TTL, T0),
            lambda: turns.inflight.release(BOT, USER, "s1"),
        ]
        for call in calls:
            with pytest.raises(StoreError) as caught:
                await call()
            assert caught.value.__cause__ is not None
        assert time.monotonic() - started < 5  # fails fast, no long retry loop
    finally:
        redis_server.start()
    # the same client recovers once Redis is back (the restarted server is empty)
    await redis_stores.streams.create(StreamSession(sid="s3", bot=BOT, user=USER, owner="n"), TTL)
    assert await turns.turns.join(BOT, SCOPE, "s3", TTL) == 0
    assert await turns.turns.my_turn(BOT, SCOPE, "s3") == HEAD
    assert await turns.inflight.acquire(BOT, USER, "s3", LIMIT, TTL, T0)
