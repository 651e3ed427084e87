"""The three Redis modes for real: a password and an ACL user, Sentinel failover, Cluster resharding.

Every server here is a real redis-server (or sentinel) started by the tests; the answers go through
the real HTTP path with a Dify stand-in.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Iterator

import pytest
import tornado.ioloop
from tornado.ioloop import IOLoop

from laibao.errors import StoreError
from stores import ChunkWrite, RedisStores, StreamSession
from stores.keys import Keys, new_sid
from stores.tokens import RedisTokenCache
from tests.difystub import DifyStub, Script
from tests.harness import AES_KEY, TOKEN, Service, eventually, follow, message, running_service
from tests.servers import RedisCluster, RedisSentinelSet, RedisServer, running

T0 = 1_732_500_000.0


@pytest.fixture
def secured(io_loop: tornado.ioloop.IOLoop) -> Iterator[RedisServer]:
    """A redis-server with a default-user password and an ACL user of its own."""
    acl = ("--requirepass", "default-pw", "--user", "laibao", "on", ">acl s3cret", "~*", "&*", "+@all")
    with running(RedisServer(*acl)) as server:
        yield server


@pytest.mark.gen_test(timeout=30)
async def test_password_and_acl_user(secured: RedisServer) -> None:
    base = f"127.0.0.1:{secured.port}/0"
    for url in (f"redis://:default-pw@{base}", f"redis://laibao:acl%20s3cret@{base}"):
        stores = RedisStores(url)
        try:
            await stores.ping()
            await stores.streams.create(StreamSession(sid="s1", bot="b", user="u", owner="n"), 60)
            assert await stores.streams.append("s1", "n", "好", T0)
            snap = await stores.streams.poll("s1")
            assert snap is not None and snap.content == "好"
            assert (await stores.describe()).startswith(f"single server at 127.0.0.1:{secured.port}")
        finally:
            await stores.close()
    for url in (f"redis://{base}", f"redis://laibao:wrong@{base}"):
        stores = RedisStores(url)
        try:
            with pytest.raises(StoreError) as info:
                await stores.ping()
            assert "wrong" not in str(info.value)
        finally:
            await stores.close()


@pytest.mark.cluster
@pytest.mark.gen_test(timeout=60)
async def test_check_names_each_mode(redis_url: str, redis_cluster: RedisCluster,
                                     redis_sentinel: RedisSentinelSet) -> None:
    for url, expected in (
        (redis_url, "single server at 127.0.0.1:"),
        (redis_cluster.url, "cluster, 6 nodes (3 primaries)"),
        (redis_sentinel.url, f"sentinel, primary laibao-primary at 127.0.0.1:{redis_sentinel.primary_port()}"),
    ):
        stores = RedisStores(url)
        try:
            assert (await stores.describe()).startswith(expected)
        finally:
            await stores.close()


@pytest.mark.cluster
@pytest.mark.sentinel
@pytest.mark.gen_test(timeout=60)
async def test_laibao_check_says_how_it_connected(redis_cluster: RedisCluster, redis_sentinel: RedisSentinelSet,
                                                  stub: DifyStub) -> None:
    for url, expected in (
        (redis_cluster.url, "redis: ok, cluster, 6 nodes (3 primaries)"),
        (redis_sentinel.url,
         f"redis: ok, sentinel, primary laibao-primary at 127.0.0.1:{redis_sentinel.primary_port()}"),
    ):
        env = {**os.environ, "LAIBAO_WECOM_TOKEN": TOKEN, "LAIBAO_WECOM_AES_KEY": AES_KEY,
               "LAIBAO_DIFY_URL": stub.base_url, "LAIBAO_DIFY_KEY": stub.api_key, "LAIBAO_REDIS_URL": url}
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "laibao.cli", "check", env=env,
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, (out, err)
        assert expected in out.decode().splitlines()


@pytest.mark.cluster
@pytest.mark.gen_test(timeout=60)
async def test_group_commit_on_a_cluster_is_atomic_per_stream(redis_cluster: RedisCluster) -> None:
    redis_cluster.flush()
    stores = RedisStores(redis_cluster.url)
    try:
        # 60 streams of 30 scopes: spread over the slots of all three primaries
        sids = [new_sid("b", f"user:{i % 30}") for i in range(60)]
        for sid in sids:
            await stores.streams.create(StreamSession(sid=sid, bot="b", user="u", owner="n"), 600)
        for index in range(5):
            writes = [ChunkWrite(sid, "n", f"{sid[-4:]}-{index};", index) for sid in sids]
            assert await stores.streams.commit(writes, T0) == [True] * len(sids)
            # the same batch again (a retry after a timeout): nothing lands twice
            assert await stores.streams.commit(writes, T0) == [True] * len(sids)
        stranger = ChunkWrite(sids[0], "other-node", "x", 5)
        assert await stores.streams.commit([stranger], T0) == [False]
        for sid in sids:
            snap = await stores.streams.poll(sid)
            assert snap is not None
            assert snap.content == "".join(f"{sid[-4:]}-{i};" for i in range(5)) and snap.n == 5
        assert len({redis_cluster.node_of(Keys().stream(sid)).port for sid in sids}) == 3
    finally:
        await stores.close()


@pytest.mark.cluster
@pytest.mark.gen_test(timeout=60)
async def test_token_invalidation_reaches_every_process_on_a_cluster(redis_cluster: RedisCluster) -> None:
    listener, publisher = RedisTokenCache(redis_cluster.url), RedisTokenCache(redis_cluster.url)
    seen: list[str] = []
    try:
        await listener.listen_invalidations(seen.append)
        await publisher.put("张三", "tok-1", {"name": "张三"}, 60)
        assert await listener.get("张三") == ("tok-1", {"name": "张三"})
        await publisher.drop("张三")
        await publisher.publish_invalidation("张三")
        await eventually(lambda: seen == ["张三"], "the invalidation to arrive")
        assert await listener.get("张三") is None
    finally:
        await listener.close()
        await publisher.close()


def _migrate_slot(cluster: RedisCluster, key: str) -> None:
    """Move ``key``'s slot to another primary, key by key, as `redis-cli --cluster reshard` does."""
    source = cluster.node_of(key)
    target = next(node for node in cluster.nodes
                  if node is not source and node.proc is not None and "role:master" in node.cli("INFO", "replication"))
    slot = source.cli("CLUSTER", "KEYSLOT", key).strip()
    source_id, target_id = source.cli("CLUSTER", "MYID").strip(), target.cli("CLUSTER", "MYID").strip()
    target.cli("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
    source.cli("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
    while keys := source.cli("CLUSTER", "GETKEYSINSLOT", slot, "100").split():
        source.cli("MIGRATE", "127.0.0.1", str(target.port), "", "0", "5000", "KEYS", *keys)
    for node in cluster.nodes:
        if node.proc is not None and "role:master" in node.cli("INFO", "replication"):
            node.cli("CLUSTER", "SETSLOT", slot, "NODE", target_id)
    cluster.wait_healthy()


@pytest.fixture
def on_cluster(redis_cluster: RedisCluster, io_loop: IOLoop) -> Iterator[Service]:
    """laibao in this process on the (flushed) cluster."""
    redis_cluster.flush()
    with running_service(io_loop, redis_cluster.url) as service:
        yield service


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.gen_test(timeout=90)
async def test_slot_migrated_while_an_answer_streams(redis_cluster: RedisCluster, on_cluster: Service) -> None:
    sentences = [f"第{i}句。" for i in range(60)]
    answer = "".join(sentences)
    hold = asyncio.Event()
    svc = on_cluster
    svc.dify.push(Script(answer=answer, deltas=sentences, cut=(200,), delay=0.05, hold=hold))
    first = await svc.wecom.stream(message("迁移中也要答完"))
    sid = str(first["id"])
    key = Keys().stream(sid)
    await eventually(lambda: svc.dify.chat_calls != [], "the answer to start")
    await asyncio.get_running_loop().run_in_executor(None, _migrate_slot, redis_cluster, key)
    hold.set()
    polls = await follow([svc.wecom], sid)
    assert polls[-1]["finish"] and polls[-1]["content"] == answer
    # a new message in the same conversation, after the move, is answered too
    svc.dify.push(Script(answer="迁移后的回答"))
    after = await svc.wecom.stream(message("再问一句"))
    assert (await follow([svc.wecom], str(after["id"])))[-1]["content"] == "迁移后的回答"


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.gen_test(timeout=120)
async def test_cluster_primary_killed_while_an_answer_streams(redis_cluster: RedisCluster,
                                                             on_cluster: Service) -> None:
    sentences = [f"第{i}句。" for i in range(40)]
    answer = "".join(sentences)
    hold = asyncio.Event()
    svc = on_cluster
    svc.dify.push(Script(answer=answer, deltas=sentences, cut=(200,), delay=0.1, hold=hold))
    first = await svc.wecom.stream(message("主节点挂了也要答完"))
    sid = str(first["id"])
    await eventually(lambda: svc.dify.chat_calls != [], "the answer to start")
    victim = redis_cluster.node_of(Keys().stream(sid))
    victim.kill()  # its replica is promoted after the node timeout (1 s)
    try:
        def promoted() -> bool:
            try:
                return redis_cluster.node_of(Keys().stream(sid)) is not victim
            except RuntimeError:
                return False  # no primary serves the slot during the election

        await eventually(promoted, "a replica to take the slot over", tries=1200)
        hold.set()
        polls = await follow([svc.wecom], sid, limit=1500, pause=0.05)
        assert polls[-1]["finish"] and polls[-1]["content"] == answer
        svc.dify.push(Script(answer="切换后的回答"))
        after = await svc.wecom.stream(message("再问一句"))
        assert (await follow([svc.wecom], str(after["id"])))[-1]["content"] == "切换后的回答"
    finally:
        victim.start()  # it rejoins as a replica (its nodes.conf is kept)
        await asyncio.get_running_loop().run_in_executor(None, redis_cluster.wait_healthy)


@pytest.fixture
def sentinel_set() -> Iterator[RedisSentinelSet]:
    """A sentinel set of this test's own: failing it over changes it for good."""
    with running(RedisSentinelSet()) as servers:
        yield servers


@pytest.fixture
def on_sentinel(sentinel_set: RedisSentinelSet, io_loop: IOLoop) -> Iterator[Service]:
    """laibao in this process on this test's sentinel set."""
    with running_service(io_loop, sentinel_set.url) as service:
        yield service


@pytest.mark.sentinel
@pytest.mark.slow
@pytest.mark.gen_test(timeout=120)
async def test_sentinel_failover_while_answers_stream(sentinel_set: RedisSentinelSet, on_sentinel: Service) -> None:
    sentences = [[f"{n}号第{i}句。" for i in range(40)] for n in range(3)]
    answers = ["".join(parts) for parts in sentences]
    hold = asyncio.Event()
    svc = on_sentinel
    # Each question gets its own answer whatever order the three jobs reach Dify in.
    scripts = {f"问题{n}": Script(answer="".join(parts), deltas=parts, cut=(200,), delay=0.1, hold=hold)
               for n, parts in enumerate(sentences)}
    svc.dify.answer_for = lambda query: scripts.get(query, svc.dify.default)
    firsts = [await svc.wecom.stream(message(f"问题{n}", user=f"user{n}")) for n in range(3)]
    await eventually(lambda: len(svc.dify.chat_calls) == 3, "three answers to start")
    old = sentinel_set.primary.port
    sentinel_set.primary.kill()  # a crashed host: the sentinel notices after 1 s and promotes the replica
    await eventually(lambda: sentinel_set.primary_port() != old, "the sentinel to promote the replica",
                     tries=1200)
    hold.set()
    for n, first in enumerate(firsts):
        polls = await follow([svc.wecom], str(first["id"]), limit=1500, pause=0.05)
        assert polls[-1]["finish"] and polls[-1]["content"] == answers[n]
    svc.dify.push(Script(answer="新主库上的回答"))
    after = await svc.wecom.stream(message("故障切换之后"))
    assert (await follow([svc.wecom], str(after["id"])))[-1]["content"] == "新主库上的回答"
    assert (await svc.runtime.stores.describe()).endswith(f"127.0.0.1:{sentinel_set.replica.port}")  # type: ignore[attr-defined]
