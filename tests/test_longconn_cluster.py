"""Long-connection mode across real `laibao serve` processes on one redis-server and the WeCom stand-in."""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio
from tornado.httpclient import AsyncHTTPClient
from tornado.ioloop import IOLoop

from tests.difystub import DifyStub, Script
from tests.harness import LaibaoProcess, assert_no_secrets, eventually
from tests.test_longconn import API_KEY, ws_env, ws_message
from tests.wsstub import ForeignClient, WsStub

PARTIAL = ["第一段：持有连接的进程", "死掉之前", "已经推送的内容。"]
FULL = "第一段：持有连接的进程死掉之前已经推送的内容。第二段：接手的进程重新生成了完整回答。"
LEADER = "laibao:ws:default:leader"


@dataclass
class WsCluster:
    """Processes sharing one Redis, a Dify stand-in and the WeCom long-connection stand-in."""

    procs: list[LaibaoProcess]
    dify: DifyStub
    ws: WsStub
    redis: redis.asyncio.Redis
    http: AsyncHTTPClient

    async def holder(self, other_than: LaibaoProcess | None = None) -> LaibaoProcess:
        """The process that holds the lease and is subscribed (waits for both; for another than ``other_than``)."""
        found: list[LaibaoProcess] = []

        async def held() -> bool:
            node = await self.redis.get(LEADER)
            found[:] = [p for p in self.procs if p.name == node and p.proc.poll() is None and p is not other_than]
            return bool(found) and self.ws.connected() == 1

        await eventually(held, "one process subscribed under the lease", tries=600)
        return found[0]

    async def metric(self, proc: LaibaoProcess, sample: str) -> float:
        body = (await self.http.fetch(proc.base_url + "/metrics")).body.decode()
        for line in body.splitlines():
            if line.startswith(sample + " "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def frames(self, req_id: str) -> list[dict[str, Any]]:
        return [r.body["stream"] for r in self.ws.frames("aibot_respond_msg", req_id)]


@pytest.fixture
def cluster(request: pytest.FixtureRequest, io_loop: IOLoop, redis_url: str, tmp_path: Path) -> Iterator[WsCluster]:
    """``count`` processes (parametrised indirectly: {"count": N, LAIBAO_*: value})."""
    with ws_cluster(io_loop, redis_url, tmp_path, **request.param) as running:
        yield running


@contextmanager
def ws_cluster(io_loop: IOLoop, redis_url: str, workdir: Path, count: int, **settings: str) -> Iterator[WsCluster]:
    dify, ws = DifyStub(), WsStub()
    io_loop.run_sync(dify.start)
    io_loop.run_sync(ws.start)
    env = ws_env(dify.base_url, ws.url, redis_url, **{"LAIBAO_WS_PUSH_INTERVAL": "0.1", "LAIBAO_WS_LEASE": "2",
                                                     "LAIBAO_LEASE": "1.5", **settings})
    env.pop("LAIBAO_NODE_ID")
    http = AsyncHTTPClient(force_instance=True)
    client = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
    procs = [LaibaoProcess(workdir, f"node-{i}", env) for i in range(count)]
    cluster = WsCluster(procs, dify, ws, client, http)
    try:
        io_loop.run_sync(lambda: asyncio.gather(*(p.ready(http) for p in procs)))
        yield cluster
    finally:
        for proc in procs:
            proc.close()
        for proc in procs:
            assert_no_secrets(proc.log(), "SECRET", API_KEY)
        http.close()
        io_loop.run_sync(client.aclose)
        io_loop.run_sync(ws.stop)
        io_loop.run_sync(dify.stop)


def running(count: int, **settings: str) -> Any:
    """Parametrise the ``cluster`` fixture: ``count`` processes with extra LAIBAO_* settings."""
    return pytest.mark.parametrize("cluster", [{"count": count, **settings}], indirect=True)


@pytest.mark.slow
@running(3)
@pytest.mark.gen_test(timeout=90)
async def test_kill_9_of_the_holder_mid_answer_and_the_answer_completes(cluster: WsCluster) -> None:
    holder = await cluster.holder()
    assert await cluster.metric(holder, 'laibao_ws_connected{bot="default"}') == 1
    others = [p for p in cluster.procs if p is not holder]
    assert [await cluster.metric(p, 'laibao_ws_connected{bot="default"}') for p in others] == [0, 0]
    never = asyncio.Event()
    cluster.dify.push(Script(answer="".join(PARTIAL), deltas=PARTIAL, hold=never, ping_every=0.2),
                      Script(answer=FULL))
    req_id = await cluster.ws.push_message(ws_message("持有连接的进程死了怎么办", msgid="m-kill"))
    await eventually(lambda: any(PARTIAL[-1] in f["content"] for f in cluster.frames(req_id)),
                     "the partial answer pushed")
    holder.proc.kill()  # kill -9 mid-answer
    holder.proc.wait(timeout=10)
    await cluster.holder(other_than=holder)
    await eventually(lambda: any(f["finish"] for f in cluster.frames(req_id)), "the finishing frame", tries=800)
    frames = cluster.frames(req_id)
    assert frames[-1]["content"] == FULL and frames[-1]["finish"] is True
    assert cluster.ws.overlaps == 0  # never two laibao connections at once
    assert len(cluster.dify.chat_calls) == 2  # the dead holder's answer was regenerated once


@pytest.mark.slow
@running(2)
@pytest.mark.gen_test(timeout=90)
async def test_after_a_failover_a_refused_req_id_sends_the_answer_as_a_message(cluster: WsCluster) -> None:
    cluster.ws.bind_req_ids = True  # WeCom refuses replies to a message from another connection (846605)
    holder = await cluster.holder()
    never = asyncio.Event()
    cluster.dify.push(Script(answer="".join(PARTIAL), deltas=PARTIAL, hold=never, ping_every=0.2),
                      Script(answer=FULL))
    req_id = await cluster.ws.push_message(ws_message("换了连接还能收到吗", msgid="m-bind", user="lisi"))
    await eventually(lambda: any(PARTIAL[-1] in f["content"] for f in cluster.frames(req_id)), "the partial answer")
    holder.proc.kill()
    holder.proc.wait(timeout=10)
    await cluster.holder(other_than=holder)
    await eventually(lambda: cluster.ws.frames("aibot_send_msg"), "the answer as a message", tries=800)
    (sent,) = cluster.ws.frames("aibot_send_msg")
    assert sent.body == {"chatid": "lisi", "msgtype": "markdown", "markdown": {"content": FULL}}


@pytest.mark.slow
@running(2, LAIBAO_WS_LEASE="120")  # far longer than the test: only the release on SIGTERM can hand over
@pytest.mark.gen_test(timeout=90)
async def test_sigterm_hands_the_connection_over_without_waiting_for_the_lease(cluster: WsCluster) -> None:
    holder = await cluster.holder()
    gate = asyncio.Event()
    cluster.dify.push(Script(answer="".join(PARTIAL), deltas=PARTIAL, hold=gate, ping_every=0.2))
    req_id = await cluster.ws.push_message(ws_message("交接", msgid="m-term"))
    await eventually(lambda: any(PARTIAL[-1] in f["content"] for f in cluster.frames(req_id)), "the partial answer")
    holder.signal(signal.SIGTERM)
    await cluster.holder(other_than=holder)
    assert cluster.ws.overlaps == 0
    assert len(cluster.ws.subscribed()) == 2
    # The draining process still relays the answer (its grace period); the new holder pushes it.
    gate.set()
    await eventually(lambda: any(f["finish"] for f in cluster.frames(req_id)), "the finishing frame")
    assert cluster.frames(req_id)[-1]["content"] == "".join(PARTIAL)
    assert len(cluster.dify.chat_calls) == 1
    assert holder.proc.wait(timeout=30) == 0
    cluster.dify.push(Script(answer="交接之后的回答。"))
    after = await cluster.ws.push_message(ws_message("之后", msgid="m-after"))
    await eventually(lambda: any(f["finish"] for f in cluster.frames(after)), "the answer after")
    assert cluster.frames(after)[-1]["content"] == "交接之后的回答。"


BACKOFF = 3.0


@pytest.mark.slow
@running(2, LAIBAO_WS_DISPLACED_BACKOFF=str(BACKOFF))
@pytest.mark.gen_test(timeout=120)
async def test_a_foreign_client_makes_the_cluster_stand_down_instead_of_fighting(cluster: WsCluster) -> None:
    await cluster.holder()
    foreign = ForeignClient(cluster.ws)  # resubscribes 0.2 s after each displacement, for ever
    foreign.start()
    try:
        await eventually(lambda: len(cluster.ws.subscribed()) >= 4, "laibao retried after its backoffs", tries=1200)
    finally:
        await foreign.stop()
    times = [s.at for s in cluster.ws.subscribed()]
    gaps = [b - a for a, b in itertools.pairwise(times[1:])]
    # Each retake waits out the whole backoff after being displaced: a few subscribes a minute, no loop.
    assert all(gap >= BACKOFF * 0.9 for gap in gaps), gaps
    assert cluster.ws.overlaps == 0
    displaced = [await cluster.metric(p, 'laibao_ws_displaced_total{bot="default"}') for p in cluster.procs]
    assert sum(displaced) >= 2
    logs = "".join(p.log() for p in cluster.procs)
    assert "another client outside this cluster took the WeCom connection" in logs


async def api_send(cluster: WsCluster, proc: LaibaoProcess, body: dict[str, str]) -> tuple[int, Any]:
    response = await cluster.http.fetch(proc.base_url + "/api/send", method="POST", body=json.dumps(body),
                                        headers={"Authorization": f"Bearer {API_KEY}"}, raise_error=False,
                                        request_timeout=30)
    return response.code, json.loads(response.body) if response.code in (200, 502) else response.body


@pytest.mark.slow
@running(2)
@pytest.mark.gen_test(timeout=90)
async def test_api_send_through_a_process_that_does_not_hold_the_connection(cluster: WsCluster) -> None:
    holder = await cluster.holder()
    (other,) = [p for p in cluster.procs if p is not holder]
    code, answer = await api_send(cluster, other, {"bot": "default", "chatid": "wangwu", "markdown": "**构建完成**"})
    assert (code, answer) == (200, {"errcode": 0, "errmsg": "ok"})
    (sent,) = cluster.ws.frames("aibot_send_msg")
    assert sent.body == {"chatid": "wangwu", "msgtype": "markdown", "markdown": {"content": "**构建完成**"}}
    cluster.ws.errcodes["aibot_send_msg"] = 45009
    code, answer = await api_send(cluster, other, {"bot": "default", "chatid": "wangwu", "markdown": "限流"})
    assert (code, answer["errcode"]) == (502, 45009)


@pytest.mark.slow
@running(2, LAIBAO_WECOM_BOT_SECRET="WRONG", LAIBAO_WS_DISPLACED_BACKOFF="600")
@pytest.mark.gen_test(timeout=90)
async def test_a_wrong_secret_is_logged_not_retried_and_sends_get_503(cluster: WsCluster) -> None:
    await eventually(lambda: len(cluster.ws.subscribes) >= 1, "a subscribe attempt")
    code, _ = await api_send(cluster, cluster.procs[0], {"bot": "default", "chatid": "u", "markdown": "x"})
    assert code == 503
    assert len(cluster.ws.subscribes) == 1  # the cluster stood down: no other process tried again
    assert not cluster.ws.subscribed()
    logs = "".join(p.log() for p in cluster.procs)
    assert "WeCom refused the subscribe (errcode 853000): check the bot id and secret" in logs
