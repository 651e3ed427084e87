"""What token auth costs a message callback, in one run.

1. Per-message cost on a process-cache hit, next to a message without auth. Every message callback
   verifies and decrypts WeCom's body and encrypts and signs a reply: that work is measured together
   with ``AuthService.resolve`` for an ``open`` bot (no auth) and for a ``token`` bot whose user is in
   the process cache. A hit in Redis (the process cache off) is shown for context. Rounds alternate,
   the best of each is kept.
2. The callback reply time of users' first messages (each needs a sign-in) through a real laibao
   (HTTP, real MariaDB user records, real Redis) with a fast auth service next to a slow one: the
   sign-in happens in the answer job, so a slow auth service must not slow the reply.

    python bench/auth.py [--messages 20000] [--rounds 3] [--first-messages 40] [--slow 2.0]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from tornado.httpclient import AsyncHTTPClient

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from laibao.app import make_server  # noqa: E402
from laibao.auth import AuthService  # noqa: E402
from laibao.crypto import WeComCrypto, generate_aes_key, generate_token  # noqa: E402
from laibao.outbound import Outbound  # noqa: E402
from laibao.runtime import Runtime  # noqa: E402
from stores.tokens import RedisTokenCache  # noqa: E402
from stores.users import MemoryUserStore, MySQLUserStore, User  # noqa: E402
from tests.authstub import SECRET_KEY, AuthStub, bot, make_config  # noqa: E402
from tests.difystub import DifyStub  # noqa: E402
from tests.harness import WeCom, message, service_config  # noqa: E402
from tests.servers import MariaDBServer, RedisServer, free_port  # noqa: E402


async def timed(n: int, step: Callable[[], Awaitable[object]]) -> float:
    """Microseconds per ``step``, over ``n`` awaited steps."""
    started = time.perf_counter()
    for _ in range(n):
        await step()
    return (time.perf_counter() - started) / n * 1e6


async def run(redis_url: str, messages: int, rounds: int) -> None:
    stub = AuthStub(accounts={"E1001": "bench-secret"})
    await stub.start()
    config = make_config(auth_url=stub.url, redis_url=redis_url)
    services: list[AuthService] = []
    http = Outbound(trusted=["127.0.0.1"])  # the auth stand-in is a configured upstream on loopback

    async def service(**overrides: object) -> AuthService:
        users = MemoryUserStore()  # the user store is read only on a miss, which nothing here measures
        await users.add(User("zhangsan", name="张三", code="E1001", secret="bench-secret"))
        built = AuthService(dataclasses.replace(config, **overrides), users, RedisTokenCache(redis_url), http)
        await built.start()
        services.append(built)
        return built

    try:
        cached = await service()
        # the process cache effectively off: every resolve reads Redis
        uncached = await service(token_cache_ttl=1e-9)
        open_bot, token_bot = bot(config, "open"), bot(config, "token")
        await cached.resolve(token_bot, "zhangsan")  # signs in once; the rest are hits
        await uncached.resolve(token_bot, "zhangsan")

        crypto = WeComCrypto(generate_token(), generate_aes_key())
        params, body = crypto.seal_callback(message("报销流程是什么？"))

        def callback_work() -> None:
            payload = crypto.open_callback(params["msg_signature"], params["timestamp"], params["nonce"], body)
            crypto.seal_reply({"msgtype": "stream", "stream": {"id": os.urandom(8).hex(), "finish": False,
                                                               "content": "正在思考…"}}, params["nonce"])
            assert payload["from"]["userid"] == "zhangsan"

        async def plain() -> None:
            callback_work()
            await cached.resolve(open_bot, "zhangsan")

        async def with_token() -> None:
            callback_work()
            await cached.resolve(token_bot, "zhangsan")

        steps: dict[str, tuple[Callable[[], Awaitable[object]], int]] = {
            "resolve, open bot": (lambda: cached.resolve(open_bot, "zhangsan"), messages),
            "resolve, token bot, process-cache hit": (lambda: cached.resolve(token_bot, "zhangsan"), messages),
            "resolve, token bot, Redis hit": (lambda: uncached.resolve(token_bot, "zhangsan"), messages // 10),
            "message without auth (crypto + open resolve)": (plain, messages // 2),
            "message with token auth (crypto + process hit)": (with_token, messages // 2),
        }
        figures: dict[str, list[float]] = {name: [] for name in steps}
        # Small slices, alternating and in a rotating order, so drift (frequency, GC, neighbours)
        # lands on every figure alike; a figure is the best of ``rounds`` sums of its slices.
        slices = 20
        for round_no in range(rounds):
            totals = dict.fromkeys(steps, 0.0)
            names = list(steps)
            for index in range(slices):
                shift = (round_no + index) % len(names)
                for name in names[shift:] + names[:shift]:
                    step, n = steps[name]
                    totals[name] += await timed(max(1, n // slices), step) / slices
            for name, total in totals.items():
                figures[name].append(total)
        best = {name: min(runs) for name, runs in figures.items()}
        assert len(stub.calls) == 1, "one sign-in; every measured token resolve must be a cache hit"
        assert cached.stats["redis"] == 0 and uncached.stats["process"] == 0

        print(f"{messages} resolves per figure (Redis: {messages // 10}), best of {rounds} alternating rounds")
        for name, micros in best.items():
            print(f"  {name:48s} {micros:9.2f} µs")
        overhead = best["resolve, token bot, process-cache hit"] - best["resolve, open bot"]
        plain_message = best["message without auth (crypto + open resolve)"]
        token_message = best["message with token auth (crypto + process hit)"]
        print(f"token auth overhead per message (process hit - open): {overhead:.2f} µs "
              f"= {overhead / plain_message * 100:.2f} % of a message's callback work")
        print(f"ratio message with token auth / without: {token_message / plain_message:.3f}x")
        hit, redis_hit = best["resolve, token bot, process-cache hit"], best["resolve, token bot, Redis hit"]
        print(f"ratio resolve process hit / open: {hit / best['resolve, open bot']:.1f}x   "
              f"Redis hit / process hit: {redis_hit / hit:.0f}x")
    finally:
        for built in services:
            await built.close()
        http.close()
        await stub.stop()


GAP = 0.15  # seconds between first messages, so answer jobs do not share the event loop with callbacks


async def first_replies(redis_url: str, mysql_url: str, users: int, delay: float) -> list[float]:
    """Seconds to the callback reply of each user's first message, the auth service answering after ``delay``."""
    stub = AuthStub()  # accepts any code and secret
    stub.answer.delay = delay
    await stub.start()
    dify = DifyStub()
    await dify.start()
    store = MySQLUserStore(mysql_url, base64.b64decode(SECRET_KEY))
    await store.init_schema()
    prefix = f"d{int(delay * 1000)}-"
    for i in range(-1, users):  # user -1 warms the connections up, untimed
        await store.add(User(f"{prefix}{i}", code=f"E{i}", secret="s"))
    await store.close()
    config = service_config(dify.base_url, redis_url, auth_mode="token", auth_url=stub.url, mysql_url=mysql_url,
                            secret_key=SECRET_KEY, auth_timeout=delay + 5, auth_forward="input")
    runtime = Runtime.build(config)
    await runtime.start()
    port = free_port()
    server = make_server(runtime)
    server.listen(port, address="127.0.0.1")
    http = AsyncHTTPClient(force_instance=True)
    wecom = WeCom(http, f"http://127.0.0.1:{port}")
    times = []
    try:
        for i in range(-1, users):
            started = time.perf_counter()
            reply = await wecom.stream(message("第一条消息", user=f"{prefix}{i}"))
            if i >= 0:
                times.append(time.perf_counter() - started)
            assert reply["finish"] is False, reply  # the placeholder: the answer follows
            await asyncio.sleep(GAP)  # a fast sign-in's answer job ends before the next callback
    finally:
        http.close()
        server.stop()
        await runtime.close(grace=delay + 10)
        await dify.stop()
        await stub.stop()
    assert len(stub.calls) == users + 1, "each first message signs in once, in its answer job"
    return times


async def reply_times(redis_url: str, mysql_url: str, users: int, slow: float) -> None:
    print(f"\ncallback reply time of {users} users' first messages (each signs in, in the answer job)")
    figures = {}
    for name, delay in (("fast auth service (answers at once)", 0.0), (f"slow auth service ({slow:g} s)", slow)):
        times = sorted(await first_replies(redis_url, mysql_url, users, delay))
        p50, p99 = statistics.median(times), times[min(len(times) - 1, int(len(times) * 0.99))]
        figures[name] = p50
        print(f"  {name:40s} p50 {p50 * 1000:7.2f} ms   p99 {p99 * 1000:7.2f} ms   max {times[-1] * 1000:7.2f} ms")
    fast, slow_p50 = figures.values()
    print(f"ratio slow / fast (p50): {slow_p50 / fast:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--first-messages", type=int, default=40, help="users whose first message is timed")
    parser.add_argument("--slow", type=float, default=2.0, help="seconds the slow auth service takes")
    args = parser.parse_args()
    redis_server = RedisServer()
    redis_server.start()
    mariadb = MariaDBServer()
    try:
        asyncio.run(run(redis_server.url, args.messages, args.rounds))
        mariadb.start()
        mysql_url = mariadb.url(mariadb.create_database())
        asyncio.run(reply_times(redis_server.url, mysql_url, args.first_messages, args.slow))
    finally:
        mariadb.close()
        redis_server.close()


if __name__ == "__main__":
    main()
