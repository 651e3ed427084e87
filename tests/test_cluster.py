"""Two real `laibao serve` processes on one real redis-server: any process answers any poll."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from tornado.ioloop import IOLoop

from laibao import texts
from tests.difystub import Script
from tests.harness import (
    AES_KEY,
    TOKEN,
    Cluster,
    assert_no_secrets,
    eventually,
    follow,
    message,
    refresh,
    running_cluster,
)

ANSWER = "分布式的回答：第一段，" + "内容🙂" * 300 + "。第二段 ends here."


@pytest.fixture
def cluster(io_loop: IOLoop, redis_url: str, tmp_path: Path) -> Iterator[Cluster]:
    """A Dify stand-in in this process and two laibao processes sharing Redis."""
    with running_cluster(io_loop, redis_url, tmp_path) as cluster:
        yield cluster
    # What the processes logged across the scenario: no key, token, or message text.
    for proc in (cluster.a, cluster.b):
        assert_no_secrets(proc.log(), "请分两段回答", "重复投递到两个进程")


@pytest.mark.slow
@pytest.mark.gen_test(timeout=60)
async def test_polls_alternating_between_processes_show_a_growing_answer(cluster: Cluster) -> None:
    hold = asyncio.Event()
    cluster.dify.push(Script(answer=ANSWER, hold=hold, delay=0.001, cut=(1, 7, 3, 13, 2, 29, 5, 101)))
    to_a, to_b = cluster.wecom(cluster.a), cluster.wecom(cluster.b)
    first = await to_a.stream(message("请分两段回答"))
    assert first["finish"] is False
    sid = str(first["id"])
    # Poll both processes while Dify is mid-answer: the content is partial and never shrinks.
    seen: list[dict[str, object]] = []
    while not str(seen[-1]["content"] if seen else "").endswith("。第二段 ends here."):
        assert len(seen) < 2000, f"the whole answer never showed while Dify held message_end: {seen[-1]}"
        stream = await (to_a, to_b)[len(seen) % 2].stream(refresh(sid))
        seen.append(stream)
        assert stream["finish"] is False  # message_end is held back
        await asyncio.sleep(0.01)
    hold.set()
    seen.extend(await follow([to_b, to_a], sid))
    shown = ""
    for stream in seen:
        content = str(stream["content"])
        if content != "正在思考…":
            assert content.startswith(shown)
            shown = content
    assert shown == ANSWER
    assert [s["finish"] for s in seen].count(True) == 1 and seen[-1]["finish"] is True
    assert len(to_a.replies) > 2 and len(to_b.replies) > 2  # both processes answered polls
    assert len(cluster.dify.chat_calls) == 1


@pytest.mark.slow
@pytest.mark.gen_test(timeout=60)
async def test_same_msgid_on_two_processes_calls_dify_once(cluster: Cluster) -> None:
    hold = asyncio.Event()
    cluster.dify.push(Script(answer="只答一次", hold=hold))
    payload = message("重复投递到两个进程", msgid="dup-across")
    first = await cluster.wecom(cluster.a).stream(payload)
    second = await cluster.wecom(cluster.b).stream(payload)
    assert second["id"] == first["id"]
    hold.set()
    polls = await follow([cluster.wecom(cluster.b)], str(first["id"]))
    assert polls[-1]["content"] == "只答一次"
    assert len(cluster.dify.chat_calls) == 1


@pytest.mark.slow
@pytest.mark.gen_test(timeout=60)
async def test_laibao_chat_cli_plays_wecom(cluster: Cluster, tmp_path: Path) -> None:
    cluster.dify.push(Script(answer="命令行里的回答"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAIBAO_")}
    env.update({"LAIBAO_WECOM_TOKEN": TOKEN, "LAIBAO_WECOM_AES_KEY": AES_KEY, "LAIBAO_DIFY_URL": "http://x/v1",
                "LAIBAO_DIFY_KEY": "k", "PYTHONWARNINGS": "error"})
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "laibao.cli", "chat", "--url", cluster.a.base_url + "/wecom/callback",
        "--interval", "0.2", "--user", "wangwu", "你好", cwd=tmp_path, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert out.decode().replace("\n", "").endswith("命令行里的回答")
    assert cluster.dify.chat_calls[-1].json["user"] == "wecom:wangwu"  # type: ignore[index]
    # A wrong token is reported in one line, not silently shown (the signature fails: 401).
    env["LAIBAO_WECOM_TOKEN"] = TOKEN[::-1]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "laibao.cli", "chat", "--url", cluster.a.base_url + "/wecom/callback", "再问",
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 1
    assert b"laibao: chat: laibao answered HTTP 401" in err


@pytest.mark.slow
@pytest.mark.gen_test(timeout=60)
async def test_one_conversation_is_answered_in_order_across_processes(cluster: Cluster) -> None:
    hold = asyncio.Event()
    cluster.dify.push(Script(answer="先到的回答", hold=hold, ping_every=0.2), Script(answer="后到的回答"))
    to_a, to_b = cluster.wecom(cluster.a), cluster.wecom(cluster.b)
    first = await to_a.stream(message("先问的", user="zhaoliu"))
    second = await to_b.stream(message("后问的", user="zhaoliu"))
    await eventually(lambda: bool(cluster.dify.chat_calls), "Dify is asked the first question")
    await asyncio.sleep(1.0)  # B checks its turn every 0.2 s: a wrongly parallel call would show by now
    assert [c.json["query"] for c in cluster.dify.chat_calls] == ["先问的"]
    hold.set()
    assert (await follow([to_b], str(first["id"])))[-1]["content"] == "先到的回答"
    assert (await follow([to_a], str(second["id"])))[-1]["content"] == "后到的回答"
    calls = [c.json for c in cluster.dify.chat_calls]
    assert [c["query"] for c in calls] == ["先问的", "后问的"]
    assert calls[1]["conversation_id"] != ""  # it waited for the first answer's conversation


@pytest.mark.slow
@pytest.mark.gen_test(timeout=60)
async def test_stop_on_another_process_ends_the_answer(cluster: Cluster) -> None:
    never = asyncio.Event()
    cluster.dify.push(Script(answer="A 上生成的部分", deltas=["A 上生成的", "部分"], hold=never, ping_every=0.2))
    to_a, to_b = cluster.wecom(cluster.a), cluster.wecom(cluster.b)
    sid = str((await to_a.stream(message("写一篇长文", user="sunba")))["id"])

    async def partial_shown() -> bool:
        return "部分" in str((await to_b.stream(refresh(sid, user="sunba")))["content"])

    await eventually(partial_shown, "the partial answer is shown")
    stopped = await to_b.stream(message("/stop", user="sunba"))  # WeCom's next callback lands on B
    assert (stopped["content"], stopped["finish"]) == (texts.STOPPED, True)
    polls = await follow([to_b, to_a], sid)
    assert polls[-1]["content"] == "A 上生成的部分\n\n" + texts.STOPPED_NOTE
    assert len(cluster.dify.stops) == 1  # A, which runs the relay, called Dify's stop API
