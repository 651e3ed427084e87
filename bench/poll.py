"""Refresh-poll throughput and latency of one laibao process against real Redis, next to a baseline.

The baseline (bench/baseline.py) is the least any poll handler must do: verify, decrypt, one Redis
read, encrypt, sign. Both servers run as single processes, measured in the same run by the same
load generator; the ratios are what to compare between machines, not the absolute figures.

    python bench/poll.py [--requests 3000] [--concurrency 16] [--content-bytes 4000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlencode

from tornado.httpclient import AsyncHTTPClient

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import redis.asyncio  # noqa: E402

from laibao.crypto import WeComCrypto, generate_aes_key, generate_token  # noqa: E402
from stores.base import DONE, StreamSession  # noqa: E402
from stores.redis_store import RedisStores  # noqa: E402
from tests.servers import RedisServer, free_port, wait_for_port  # noqa: E402


async def seed(url: str, sid: str, content: str) -> None:
    """A finished laibao session (in chunks, as a relay leaves it) and the baseline's one key."""
    stores = RedisStores(url)
    now = time.time()
    await stores.streams.create(StreamSession(sid=sid, bot="default", user="u", owner="bench", created=now,
                                              deadline=now + 360, heartbeat=now), 1800)
    step = max(1, len(content) // 8)
    for i in range(0, len(content), step):
        await stores.streams.append(sid, "bench", content[i:i + step], now)
    await stores.streams.finish(sid, "bench", DONE, "", {}, now)
    await stores.close()
    client = redis.asyncio.Redis.from_url(url, decode_responses=True)
    await client.set(f"baseline:{sid}", content)
    await client.aclose()


async def load(port: int, crypto: WeComCrypto, sid: str, requests: int, concurrency: int) -> tuple[float, list[float]]:
    """Send ``requests`` refresh polls with ``concurrency`` in flight; (seconds, latencies)."""
    http = AsyncHTTPClient(force_instance=True, max_clients=concurrency)
    sealed = [crypto.seal_callback({"msgtype": "stream", "stream": {"id": sid}, "msgid": f"m{i}",
                                    "from": {"userid": "u"}}) for i in range(256)]
    latencies: list[float] = []
    counter = iter(range(requests))

    async def worker() -> None:
        for i in counter:
            params, body = sealed[i % len(sealed)]
            started = time.perf_counter()
            response = await http.fetch(f"http://127.0.0.1:{port}/wecom/callback?{urlencode(params)}",
                                        method="POST", body=body)
            latencies.append(time.perf_counter() - started)
            assert crypto.open_reply(response.body, expected_nonce=params["nonce"])["stream"]["id"] == sid

    for _ in range(50):  # warm-up, not measured
        params, body = sealed[0]
        await http.fetch(f"http://127.0.0.1:{port}/wecom/callback?{urlencode(params)}", method="POST", body=body)
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    http.close()
    return elapsed, latencies


def summary(name: str, elapsed: float, latencies: list[float]) -> tuple[float, float, float]:
    ordered = sorted(latencies)
    rps = len(ordered) / elapsed
    p50 = statistics.median(ordered) * 1000
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000
    print(f"{name:9s} {rps:9.0f} req/s   p50 {p50:7.2f} ms   p99 {p99:7.2f} ms")
    return rps, p50, p99


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--content-bytes", type=int, default=4000)
    args = parser.parse_args()

    token, key = generate_token(), generate_aes_key()
    crypto = WeComCrypto(token, key)
    content = ("流式回答" * args.content_bytes)[: args.content_bytes // 3]
    sid = os.urandom(16).hex()
    redis_server = RedisServer()
    redis_server.start()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        asyncio.run(seed(redis_server.url, sid, content))
        env = {k: v for k, v in os.environ.items() if not k.startswith("LAIBAO_")}
        laibao_port, baseline_port = free_port(), free_port()
        env.update({"LAIBAO_WECOM_TOKEN": token, "LAIBAO_WECOM_AES_KEY": key, "LAIBAO_DIFY_URL": "http://127.0.0.1:9/v1",
                    "LAIBAO_DIFY_KEY": "unused", "LAIBAO_REDIS_URL": redis_server.url,
                    "LAIBAO_PORT": str(laibao_port), "LAIBAO_HOST": "127.0.0.1", "LAIBAO_LOG_LEVEL": "WARNING"})
        procs.append(subprocess.Popen([sys.executable, "-m", "laibao.cli", "serve"], env=env, cwd=ROOT / "bench"))
        procs.append(subprocess.Popen([sys.executable, str(ROOT / "bench" / "baseline.py"), str(baseline_port),
                                       redis_server.url, token, key], env=env, cwd=ROOT))
        wait_for_port(laibao_port, proc=procs[0])
        wait_for_port(baseline_port, proc=procs[1])
        print(f"{args.requests} polls, {args.concurrency} in flight, answer of {len(content.encode())} bytes "
              f"in 8 chunks, one process each, real redis-server")
        results = {}
        # Alternate the two so neither always runs on a warmer machine.
        for name, port in (("baseline", baseline_port), ("laibao", laibao_port),
                           ("baseline", baseline_port), ("laibao", laibao_port)):
            elapsed, latencies = asyncio.run(load(port, crypto, sid, args.requests, args.concurrency))
            results.setdefault(name, []).append(summary(name, elapsed, latencies))
        best = {name: (max(r[0] for r in runs), min(r[1] for r in runs), min(r[2] for r in runs))
                for name, runs in results.items()}
        (b_rps, b_p50, b_p99), (l_rps, l_p50, l_p99) = best["baseline"], best["laibao"]
        print(f"ratio laibao/baseline (best of 2): throughput {l_rps / b_rps:.2f}x   "
              f"p50 {l_p50 / b_p50:.2f}x   p99 {l_p99 / b_p99:.2f}x")
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=10)
        redis_server.close()


if __name__ == "__main__":
    main()
