"""Per-message cost of token auth on a process-cache hit, next to a message without auth, in one run.

Every message callback verifies and decrypts WeCom's body and encrypts and signs a reply: that work
is measured together with ``AuthService.resolve`` for an ``open`` bot (no auth) and for a ``token``
bot whose user is in the process cache. A hit in Redis (the process cache off) is shown for context.
Real redis-server and the auth stand-in over HTTP; rounds alternate, the best of each is kept.

    python bench/auth.py [--messages 20000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from laibao.auth import AuthService  # noqa: E402
from laibao.crypto import WeComCrypto, generate_aes_key, generate_token  # noqa: E402
from laibao.outbound import Outbound  # noqa: E402
from stores.tokens import RedisTokenCache  # noqa: E402
from stores.users import MemoryUserStore, User  # noqa: E402
from tests.authstub import AuthStub, bot, make_config  # noqa: E402
from tests.harness import message  # noqa: E402
from tests.servers import RedisServer  # noqa: E402


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    redis_server = RedisServer()
    redis_server.start()
    try:
        asyncio.run(run(redis_server.url, args.messages, args.rounds))
    finally:
        redis_server.close()


if __name__ == "__main__":
    main()
