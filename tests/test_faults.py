"""Faults with real processes and a real redis-server: kill -9, SIGTERM, a Redis restart."""

from __future__ import annotations

import asyncio
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tornado.httpclient import AsyncHTTPClient
from tornado.ioloop import IOLoop

from tests.difystub import DifyStub, Script
from tests.harness import (
    Cluster,
    LaibaoProcess,
    WeCom,
    assert_no_secrets,
    eventually,
    follow,
    message,
    refresh,
    running_cluster,
)
from tests.servers import RedisServer

PARTIAL = ["第一段：进程", "死掉之前", "已经显示的内容。"]
FULL = "第一段：进程死掉之前已经显示的内容。第二段：接手的进程重新生成了完整回答。"


@pytest.fixture
def short_lease(io_loop: IOLoop, redis_url: str, tmp_path: Path) -> Iterator[Cluster]:
    """Two processes with a 1.5 s lease, so a dead owner is noticed quickly."""
    with running_cluster(io_loop, redis_url, tmp_path, LAIBAO_LEASE="1.5") as cluster:
        yield cluster


@pytest.fixture
def long_grace(io_loop: IOLoop, redis_url: str, tmp_path: Path) -> Iterator[Cluster]:
    """Two processes whose drain (60 s) outlasts the test: a draining process stays draining."""
    with running_cluster(io_loop, redis_url, tmp_path, LAIBAO_LEASE="120", LAIBAO_SHUTDOWN_GRACE="60") as cluster:
        yield cluster


@pytest.fixture
def long_lease(io_loop: IOLoop, redis_url: str, tmp_path: Path) -> Iterator[Cluster]:
    """Two processes whose lease (120 s) is far longer than the test may take: only a release helps."""
    with running_cluster(io_loop, redis_url, tmp_path, LAIBAO_LEASE="120", LAIBAO_SHUTDOWN_GRACE="2") as cluster:
        yield cluster


async def wait_for_content(wecom: WeCom, sid: str, text: str) -> None:
    """Poll until the snapshot shows ``text`` (bounded by the test's timeout)."""
    while True:
        stream = await wecom.stream(refresh(sid))
        assert stream["finish"] is False
        if text in str(stream["content"]):
            return
        await asyncio.sleep(0.05)


async def draining(cluster: Cluster, proc: LaibaoProcess) -> bytes:
    """Poll /readyz until the process reports 503 (after SIGTERM); return that body."""
    for _ in range(400):
        ready = await cluster.http.fetch(proc.base_url + "/readyz", raise_error=False)
        if ready.code == 503:
            return ready.body
        await asyncio.sleep(0.05)
    raise AssertionError("the process never reported draining")


async def metric(cluster: Cluster, proc: LaibaoProcess, name: str) -> float:
    """The value of one sample in a process's /metrics."""
    body = (await cluster.http.fetch(proc.base_url + "/metrics")).body.decode()
    for line in body.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.slow
@pytest.mark.gen_test(timeout=60)
async def test_kill_9_of_the_relaying_process_loses_no_answer(short_lease: Cluster) -> None:
    cluster = short_lease
    never = asyncio.Event()  # the first relay never gets its message_end: its process dies first
    cluster.dify.push(Script(answer="".join(PARTIAL), deltas=PARTIAL, hold=never, ping_every=0.2),
                      Script(answer=FULL))
    to_a, to_b = cluster.wecom(cluster.a), cluster.wecom(cluster.b)
    first = await to_a.stream(message("进程死了怎么办"))
    sid = str(first["id"])
    await wait_for_content(to_b, sid, PARTIAL[-1])
    cluster.a.proc.kill()  # kill -9 mid-answer
    cluster.a.proc.wait(timeout=10)
    polls = await follow([to_b], sid, limit=2000, pause=0.05)
    assert polls[-1]["content"] == FULL
    assert [p["finish"] for p in polls].count(True) == 1
    first_call, second_call = cluster.dify.chat_calls
    assert second_call.json == first_call.json  # same query, same conversation, same user
    assert await metric(cluster, cluster.b, "laibao_takeovers_total") == 1.0


@pytest.mark.slow
@pytest.mark.gen_test(timeout=60)
async def test_sigterm_drains_and_hands_over_without_waiting_for_the_lease(long_lease: Cluster) -> None:
    cluster = long_lease
    never = asyncio.Event()
    cluster.dify.push(Script(answer="".join(PARTIAL), deltas=PARTIAL, hold=never, ping_every=0.2),
                      Script(answer=FULL))
    to_a, to_b = cluster.wecom(cluster.a), cluster.wecom(cluster.b)
    first = await to_a.stream(message("优雅退出"))
    sid = str(first["id"])
    await wait_for_content(to_b, sid, PARTIAL[-1])
    cluster.a.signal(signal.SIGTERM)
    # Draining: /readyz says 503 at once while the process still answers.
    assert b"process: draining" in await draining(cluster, cluster.a)
    # After the 2 s grace the relay is released, and the next poll on B takes it over (lease is 120 s).
    polls = await follow([to_b], sid, limit=2000, pause=0.05)
    assert polls[-1]["content"] == FULL
    assert [p["finish"] for p in polls].count(True) == 1
    assert cluster.a.proc.wait(timeout=20) == 0
    log = cluster.a.log()
    assert "stopped accepting; 1 unfinished relays released to other processes" in log
    assert re.search(r": stopped$", log, re.MULTILINE), log  # it closed down, not just stopped accepting
    assert_no_secrets(log, "优雅退出")


@pytest.mark.slow
@pytest.mark.gen_test(timeout=60)
async def test_a_message_on_a_draining_process_is_answered_by_another(long_grace: Cluster) -> None:
    cluster = long_grace
    never = asyncio.Event()
    cluster.dify.push(Script(answer="占住", hold=never, ping_every=0.2))  # keeps A draining for its grace
    to_a, to_b = cluster.wecom(cluster.a), cluster.wecom(cluster.b)
    await to_a.stream(message("让 A 忙着"))
    cluster.a.signal(signal.SIGTERM)
    await draining(cluster, cluster.a)
    cluster.dify.push(Script(answer="B 回答了排空期间的新消息"))
    # another user's message (not queued behind the held one) reaches A while A drains
    late = await to_a.stream(message("排空时到达的消息", user="lisi"))
    polls = await follow([to_b], str(late["id"]), limit=2000, pause=0.05)
    assert polls[-1]["content"] == "B 回答了排空期间的新消息"
    assert b"process: draining" in await draining(cluster, cluster.a)  # A is still draining
    sid = str(late["id"])
    assert f"took over stream {sid} from (released)" in cluster.b.log()  # B took it, at once, not after the lease


@pytest.mark.slow
@pytest.mark.gen_test(timeout=90)
async def test_redis_restart_mid_answer(redis_server: RedisServer, redis_url: str, tmp_path: Path) -> None:
    dify = DifyStub()
    await dify.start()
    proc = LaibaoProcess(tmp_path, "solo", {"LAIBAO_REDIS_URL": redis_url, "LAIBAO_DIFY_URL": dify.base_url,
                                            "LAIBAO_DIFY_KEY": "app-test-key"})
    http = AsyncHTTPClient(force_instance=True)
    try:
        await proc.ready(http)
        wecom = WeCom(http, proc.base_url)
        hold = asyncio.Event()
        ending = "——Redis 重启之后的结尾。"
        # Dify goes silent after the partial answer; the ending comes while Redis is down, and its
        # message_end only once the test saw the relay keep that text
        dify.push(Script(answer="".join(PARTIAL) + ending, deltas=[*PARTIAL, ending], stall_after=len(PARTIAL),
                         hold=hold, ping_every=0.2))
        first = await wecom.stream(message("Redis 重启"))
        sid = str(first["id"])
        await wait_for_content(wecom, sid, PARTIAL[-1])
        redis_server.stop(save=True)
        try:
            started = time.monotonic()
            during = await wecom.stream(refresh(sid))  # a poll during the outage repeats what was shown
            assert during["finish"] is False and PARTIAL[-1] in str(during["content"])
            busy = await wecom.stream(message("Redis 挂着的时候"))
            assert (busy["content"], busy["finish"]) == ("服务繁忙，请稍后再试。", True)
            assert time.monotonic() - started < 10  # fast answers, not hangs
            ready = await http.fetch(proc.base_url + "/readyz", raise_error=False)
            assert ready.code == 503 and ready.body.startswith(b"redis: ")
            dify.release()  # the ending arrives: its write fails, the relay keeps the text
            kept = "streams failed, text kept for retry"  # the warning the README tells operators to expect
            await eventually(lambda: kept in proc.log(), "the relay keeps the text")
            metrics = (await http.fetch(proc.base_url + "/metrics")).body.decode()
            errors = [line for line in metrics.splitlines() if line.startswith("laibao_store_errors_total ")]
            assert errors and float(errors[0].split()[1]) >= 1, errors
            hold.set()  # Dify finishes while Redis is down: the final write retries
        finally:
            redis_server.start()
        polls = await follow([wecom], sid, limit=2000, pause=0.1)
        assert polls[-1]["content"] == "".join(PARTIAL) + ending
        assert (await http.fetch(proc.base_url + "/readyz", raise_error=False)).code == 200
        after = await wecom.stream(message("恢复以后"))
        assert (await follow([wecom], str(after["id"])))[-1]["content"] == Script().answer
        assert proc.proc.poll() is None  # nothing crashed
    finally:
        proc.close()
        http.close()
        await dify.stop()
    assert_no_secrets(proc.log(), "Redis 重启", "恢复以后")
