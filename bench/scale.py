"""Many users at once: two `laibao serve` processes on one real redis-server, a Dify that drips its answers.

N users each send one text message, their starts spread over ``--ramp`` seconds. The Dify stand-in (its
own process) answers each in K deltas S seconds apart and records when it sent each one. WeCom is
played by this process: it polls each stream about once a second with jitter, alternating between the
two laibao processes, over keep-alive connections, and checks every reply's signature.

Reported: refused (服务繁忙 or an HTTP error) and lost answers (no finish in time, or not exactly the
answer Dify sent), message and poll latency, visible lag (at each poll, the age of the oldest text Dify
had sent before the poll that the reply does not show yet; 0 when laibao keeps up), RSS and CPU of the
laibao processes, Redis commands per answer and Redis memory.

The load generator and the stand-in run on uvloop, so that as much of the shared CPU as possible is
left to the processes under test; the report gives the CPU each of them used.

    python bench/scale.py N [--deltas 40] [--spacing 0.25] [--ramp 5] [--timeline] [--profile out.txt [--native]]
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import uvloop

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from laibao import texts  # noqa: E402
from laibao.crypto import WeComCrypto, generate_aes_key, generate_token  # noqa: E402
from tests.servers import RedisServer, free_port, wait_for_port  # noqa: E402

PLACEHOLDER = "正在思考…"
CLOCK_TICK = os.sysconf("SC_CLK_TCK")


def delta_text(user: int, index: int) -> str:
    """The ``index``-th delta of ``user``'s answer: distinct per user and per position."""
    return f"第{index}段〔{user}〕回答内容，"


def expected_answer(user: int, deltas: int) -> str:
    return "".join(delta_text(user, i) for i in range(deltas))


# ---------------------------------------------------------------------------------------------------
# The Dify stand-in: a bare asyncio HTTP/1.1 server in its own process (python bench/scale.py --dify).


class DripDify:
    """Answers /chat-messages with K deltas S seconds apart (chunked SSE); records each send time."""

    def __init__(self, deltas: int, spacing: float) -> None:
        self.deltas = deltas
        self.spacing = spacing
        self.sent: dict[str, list[float]] = {}  # query -> wall time each delta was written

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                if path.startswith("/v1/chat-messages") and method == "POST":
                    await self.stream(writer, json.loads(body))
                    return  # the stream ends the connection
                if path.startswith("/times"):
                    await self.reply(writer, json.dumps(self.sent).encode())
                elif path.startswith("/v1/info"):
                    await self.reply(writer, b'{"name":"bench","mode":"chat"}')
                elif path.startswith("/v1/parameters"):
                    await self.reply(writer, b'{"opening_statement":"","suggested_questions":[]}')
                else:
                    await self.reply(writer, b'{"code":"not_found","message":"Not found.","status":404}', 404)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def reply(self, writer: asyncio.StreamWriter, body: bytes, status: int = 200) -> None:
        writer.write(f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                     .encode() + body)
        await writer.drain()

    async def stream(self, writer: asyncio.StreamWriter, request: dict[str, Any]) -> None:
        query = str(request["query"])
        user = int(query[1:])
        ids = {"task_id": str(uuid.uuid4()), "message_id": str(uuid.uuid4()),
               "conversation_id": request.get("conversation_id") or str(uuid.uuid4())}
        ids["id"] = ids["message_id"]
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
                     b"Connection: close\r\n\r\n")

        def chunk(frame: bytes) -> None:
            writer.write(b"%x\r\n%s\r\n" % (len(frame), frame))

        chunk(b"event: ping\n\n")
        times = self.sent.setdefault(query, [])
        for index in range(self.deltas):
            await asyncio.sleep(self.spacing)
            event = {"event": "message", **ids, "answer": delta_text(user, index), "created_at": int(time.time())}
            chunk(b"data: " + json.dumps(event, ensure_ascii=False).encode() + b"\n\n")
            times.append(time.time())
            await writer.drain()
        end = {"event": "message_end", **ids, "metadata": {"usage": {"total_tokens": 10}}}
        chunk(b"data: " + json.dumps(end).encode() + b"\n\n")
        writer.write(b"0\r\n\r\n")
        await writer.drain()


async def serve_dify(port: int, deltas: int, spacing: float) -> None:
    dify = DripDify(deltas, spacing)
    server = await asyncio.start_server(dify.handle, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


# ---------------------------------------------------------------------------------------------------
# WeCom: keep-alive connections to each process, sealed callbacks, checked replies.


class Conn:
    """One keep-alive HTTP/1.1 connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def post(self, target: str, body: bytes) -> tuple[int, bytes]:
        self.writer.write(f"POST {target} HTTP/1.1\r\nHost: wecom\r\nContent-Type: application/json\r\n"
                          f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        return status, await self.reader.readexactly(length)


class Pool:
    """Keep-alive connections to one laibao process (at most ``size``, reused LIFO)."""

    def __init__(self, port: int, size: int) -> None:
        self.port = port
        self.idle: list[Conn] = []
        self.slots = asyncio.Semaphore(size)

    async def post(self, target: str, body: bytes) -> tuple[int, bytes]:
        async with self.slots:
            conn = self.idle.pop() if self.idle else Conn(*await asyncio.open_connection("127.0.0.1", self.port))
            try:
                result = await conn.post(target, body)
            except BaseException:
                conn.writer.close()
                raise
            self.idle.append(conn)
            return result


@dataclass
class Outcome:
    user: int
    refused: bool = False
    lost: str = ""  # why, when the answer never came right
    exact: bool = False
    restarts: int = 0  # the shown answer started over (a takeover regenerated it)
    message_latency: float = 0.0
    polls: list[tuple[float, float, int]] = field(default_factory=list)  # (sent at, latency, deltas shown)
    sid: str = ""


class WeCom:
    def __init__(self, crypto: WeComCrypto, pools: list[Pool], deltas: int, poll_every: float,
                 give_up: float) -> None:
        self.crypto = crypto
        self.pools = pools
        self.deltas = deltas
        self.poll_every = poll_every
        self.give_up = give_up

    async def call(self, pool: Pool, payload: dict[str, Any]) -> tuple[int, dict[str, Any] | None]:
        params, body = self.crypto.seal_callback(payload)
        status, reply = await pool.post(f"/wecom/callback?{urlencode(params)}", body)
        if status != 200 or not reply:
            return status, None
        # open_reply checks the signature and that the nonce is the request's
        return status, self.crypto.open_reply(reply, expected_nonce=params["nonce"])

    async def user(self, user: int, delay: float) -> Outcome:
        await asyncio.sleep(delay)
        outcome = Outcome(user)
        want = expected_answer(user, self.deltas)
        ends = list(_cumulative(user, self.deltas))
        frm = {"userid": f"u{user}"}
        started = time.perf_counter()
        status, reply = await self.call(self.pools[user % 2], {
            "msgid": uuid.uuid4().hex, "aibotid": "AIBOT", "chattype": "single", "from": frm,
            "response_url": "http://127.0.0.1:9/unused", "msgtype": "text", "text": {"content": f"q{user}"}})
        outcome.message_latency = time.perf_counter() - started
        if reply is None or reply["stream"]["content"] == texts.BUSY or reply["stream"]["finish"]:
            outcome.refused = True
            return outcome
        sid = outcome.sid = reply["stream"]["id"]
        deadline = time.monotonic() + self.give_up
        shown = ""
        turn = user + 1
        while time.monotonic() < deadline:
            await asyncio.sleep(self.poll_every * random.uniform(0.8, 1.2))  # jitter, not crypto
            sent_at = time.time()
            started = time.perf_counter()
            status, reply = await self.call(self.pools[turn % 2], {
                "msgid": uuid.uuid4().hex, "aibotid": "AIBOT", "chattype": "single", "from": frm,
                "msgtype": "stream", "stream": {"id": sid}})
            latency = time.perf_counter() - started
            turn += 1
            if reply is None:
                outcome.lost = f"poll answered HTTP {status}"
                return outcome
            stream = reply["stream"]
            content = stream["content"]
            if content != PLACEHOLDER:
                if not want.startswith(content):
                    outcome.lost = f"content not a prefix of the answer: {content[-40:]!r}"
                    return outcome
                if not content.startswith(shown):
                    outcome.restarts += 1  # taken over and regenerated: WeCom shows the new snapshot
                shown = content
            outcome.polls.append((sent_at, latency, bisect.bisect_right(ends, len(shown))))
            if stream["finish"]:
                outcome.exact = content == want
                if not outcome.exact:
                    outcome.lost = f"finished with {content[-60:]!r}"
                return outcome
        outcome.lost = "no finish in time"
        return outcome


def _cumulative(user: int, deltas: int) -> list[int]:
    total, ends = 0, []
    for index in range(deltas):
        total += len(delta_text(user, index))
        ends.append(total)
    return ends


# ---------------------------------------------------------------------------------------------------
# Measuring the processes.


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICK  # utime + stime


def memory_mb(pid: int, name: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def redis_info(port: int) -> dict[str, str]:
    out = subprocess.run(["redis-cli", "-p", str(port), "INFO", "all"], capture_output=True, text=True,
                         check=True).stdout
    return dict(line.split(":", 1) for line in out.splitlines() if ":" in line and not line.startswith("#"))


def pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def poll_p99_by_second(outcomes: list[Outcome], start: float) -> list[float]:
    """p99 poll latency (ms) of the polls sent in each second of the run."""
    buckets: dict[int, list[float]] = {}
    for outcome in outcomes:
        for sent_at, latency, _ in outcome.polls:
            buckets.setdefault(int(sent_at - start), []).append(latency)
    return [round(pct(buckets.get(second, []), 0.99) * 1000) for second in range(max(buckets, default=-1) + 1)]


def visible_lags(outcomes: list[Outcome], sent: dict[str, list[float]]) -> list[float]:
    """At each poll: how long the oldest delta Dify had sent before it, and the reply lacks, had been sent."""
    lags = []
    for outcome in outcomes:
        times = sent.get(f"q{outcome.user}", [])
        for sent_at, _, shown in outcome.polls:
            sent_before = bisect.bisect_right(times, sent_at)
            lags.append(sent_at - times[shown] if shown < sent_before else 0.0)
    return lags


async def sample_cpu(pids: list[int], timeline: list[list[float]]) -> None:
    """Append each second's CPU share of each of ``pids`` to ``timeline`` until cancelled."""
    last = [cpu_seconds(pid) for pid in pids]
    while True:
        await asyncio.sleep(1.0)
        now = [cpu_seconds(pid) for pid in pids]
        timeline.append([round(b - a, 2) for a, b in zip(last, now, strict=True)])
        last = now


async def fetch_json(port: int, path: str) -> Any:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(int(ln.split(":")[1]) for ln in head.decode().split("\r\n")
                  if ln.lower().startswith("content-length"))
    body = await reader.readexactly(length)
    writer.close()
    return json.loads(body)


async def metric_value(port: int, name: str) -> float:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    text = (await reader.read()).decode()
    writer.close()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


async def run_load(args: argparse.Namespace, crypto: WeComCrypto, ports: list[int], pids: list[int],
                   redis_port: int, dify_port: int, dify_pid: int) -> dict[str, Any]:
    pools = [Pool(port, args.connections) for port in ports]
    wecom = WeCom(crypto, pools, args.deltas, args.poll, give_up=args.give_up)
    for pool in pools:  # warm-up, not measured: connections, first requests through each process
        for _ in range(20):
            await wecom.call(pool, {"msgid": uuid.uuid4().hex, "aibotid": "AIBOT", "chattype": "single",
                                    "from": {"userid": "warm"}, "msgtype": "stream", "stream": {"id": "warm-up"}})
    cpu0 = [cpu_seconds(pid) for pid in pids]
    started_wall = time.time()
    own0 = cpu_seconds(os.getpid())
    dify0 = cpu_seconds(dify_pid)
    info0 = redis_info(redis_port)
    started = time.monotonic()
    profiler = None
    if args.profile:
        pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        # --native needs the process paused while sampled: py-spy refuses it with --nonblocking.
        mode = ["--native"] if args.native else ["--nonblocking"]
        command = [pyspy, "record", "-r", "200", "-d", str(args.profile_seconds), "-f", "raw", *mode,
                   "-o", args.profile, "-p", str(pids[0])]
        profiler = subprocess.Popen(command, stdout=subprocess.DEVNULL,  # noqa: ASYNC220 - once, before the load
                                    stderr=subprocess.DEVNULL)
    timeline: list[list[float]] = []  # per second: CPU share of each laibao process, the player, Dify
    sampler = asyncio.ensure_future(sample_cpu([*pids, os.getpid(), dify_pid], timeline)) if args.timeline else None
    outcomes = await asyncio.gather(*(wecom.user(user, user * args.ramp / args.users) for user in range(args.users)))
    elapsed = time.monotonic() - started
    if sampler is not None:
        sampler.cancel()
    cpu = [cpu_seconds(pid) - c for pid, c in zip(pids, cpu0, strict=True)]
    own = cpu_seconds(os.getpid()) - own0
    dify_cpu = cpu_seconds(dify_pid) - dify0
    info = redis_info(redis_port)
    sent = await fetch_json(dify_port, "/times")
    cap_hits = [await metric_value(port, "laibao_relay_cap_hits_total") for port in ports]
    if profiler is not None:
        profiler.wait(timeout=args.profile_seconds + 30)
    polls = [latency for o in outcomes for _, latency, _ in o.polls]
    lags = visible_lags(outcomes, sent)
    commands = int(info["total_commands_processed"]) - int(info0["total_commands_processed"])
    by_command = {}
    for name, value in info.items():
        if name.startswith("cmdstat_"):
            calls = int(value.split(",")[0].split("=")[1]) - int(
                (info0.get(name) or "calls=0").split(",")[0].split("=")[1])
            by_command[name[8:]] = round(calls / args.users, 1)
    return {
        "users": args.users,
        "seconds": round(elapsed, 1),
        "refused": sum(o.refused for o in outcomes),
        "lost": sum(bool(o.lost) for o in outcomes),
        "exact": sum(o.exact for o in outcomes),
        "restarted": sum(o.restarts > 0 for o in outcomes),
        "lost_examples": [o.lost for o in outcomes if o.lost][:3],
        "message_p50_ms": round(pct([o.message_latency for o in outcomes], 0.5) * 1000, 1),
        "message_p99_ms": round(pct([o.message_latency for o in outcomes], 0.99) * 1000, 1),
        "poll_p50_ms": round(pct(polls, 0.5) * 1000, 1),
        "poll_p99_ms": round(pct(polls, 0.99) * 1000, 1),
        "polls": len(polls),
        "lag_p50_ms": round(pct(lags, 0.5) * 1000, 1),
        "lag_p99_ms": round(pct(lags, 0.99) * 1000, 1),
        "rss_peak_mb": [round(memory_mb(pid, "VmHWM"), 1) for pid in pids],
        "cpu_s": [round(c, 2) for c in cpu],
        "cpu_ms_per_answer": round(sum(cpu) / args.users * 1000, 1),
        "wecom_cpu_s": round(own, 2),
        "dify_cpu_s": round(dify_cpu, 2),
        "redis_cpu_s": round(sum(float(info[k]) - float(info0[k]) for k in ("used_cpu_sys", "used_cpu_user")), 2),
        "redis_commands_per_answer": round(commands / args.users, 1),
        "redis_commands": dict(sorted(by_command.items(), key=lambda kv: -kv[1])[:12]),
        "redis_memory_peak_mb": round(int(info["used_memory_peak"]) / 2**20, 1),
        "cap_hits": cap_hits,
        "timeline": timeline,
        "poll_p99_by_second": poll_p99_by_second(outcomes, started_wall),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("users", type=int, nargs="?", default=300)
    parser.add_argument("--deltas", type=int, default=40)
    parser.add_argument("--spacing", type=float, default=0.25, help="seconds between Dify's deltas")
    parser.add_argument("--ramp", type=float, default=5.0, help="seconds over which the users start")
    parser.add_argument("--poll", type=float, default=1.0, help="seconds between one stream's polls (±20%%)")
    parser.add_argument("--connections", type=int, default=100, help="keep-alive connections per process")
    parser.add_argument("--give-up", type=float, default=300.0, help="seconds a user waits for the finish")
    parser.add_argument("--max-relays", type=int, default=0, help="LAIBAO_MAX_RELAYS (0: laibao's default)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="a laibao setting for both processes, e.g. --set redis_pool_size=100 (repeatable)")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--profile", default="", help="py-spy raw output file (profiles the first process)")
    parser.add_argument("--profile-seconds", type=int, default=20)
    parser.add_argument("--native", action="store_true", help="py-spy --native: C frames too")
    parser.add_argument("--cprofile", default="", help="run laibao under cProfile, writing DIR/laibao-N.prof "
                        "at exit (call counts per answer; slows laibao down)")
    parser.add_argument("--priority", action="store_true", help="laibao and redis-server at nice -10 (needs "
                        "root): the load generator and the stand-in only get the CPU they leave")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--timeline", action="store_true", help="also print CPU and poll p99 per second")
    parser.add_argument("--laibao-path", default="", help="run the laibao code found here (e.g. an older checkout)")
    parser.add_argument("--dify", type=int, default=0, help=argparse.SUPPRESS)  # run as the stand-in
    args = parser.parse_args()
    if args.dify:
        uvloop.run(serve_dify(args.dify, args.deltas, args.spacing))
        return

    token, key = generate_token(), generate_aes_key()
    crypto = WeComCrypto(token, key)
    workdir = Path(tempfile.mkdtemp(prefix="laibao-scale-"))
    redis_server = RedisServer()
    redis_server.start()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        dify_port = free_port()
        procs.append(subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--dify", str(dify_port),
                                       "--deltas", str(args.deltas), "--spacing", str(args.spacing)]))
        wait_for_port(dify_port, proc=procs[0])
        env = {k: v for k, v in os.environ.items() if not k.startswith("LAIBAO_")}
        env.update({"LAIBAO_WECOM_TOKEN": token, "LAIBAO_WECOM_AES_KEY": key,
                    "LAIBAO_DIFY_URL": f"http://127.0.0.1:{dify_port}/v1", "LAIBAO_DIFY_KEY": "app-bench",
                    "LAIBAO_REDIS_URL": redis_server.url, "LAIBAO_HOST": "127.0.0.1",
                    "LAIBAO_LOG_LEVEL": args.log_level})
        if args.laibao_path:
            env["PYTHONPATH"] = args.laibao_path
        if args.max_relays:
            env["LAIBAO_MAX_RELAYS"] = str(args.max_relays)
        for setting in args.set:
            name, _, value = setting.partition("=")
            env[f"LAIBAO_{name.upper()}"] = value
        ports = [free_port(), free_port()]
        for index, port in enumerate(ports):
            log = (workdir / f"laibao-{index}.log").open("wb")
            profiled = ["-m", "cProfile", "-o", str(Path(args.cprofile).resolve() / f"laibao-{index}.prof")
                        ] if args.cprofile else []
            procs.append(subprocess.Popen([sys.executable, *profiled, "-m", "laibao.cli", "serve"], cwd=workdir,
                                          stdout=log,
                                          stderr=subprocess.STDOUT,
                                          env={**env, "LAIBAO_PORT": str(port), "LAIBAO_NODE_ID": f"node-{index}"}))
        for proc, port in zip(procs[1:], ports, strict=True):
            wait_for_port(port, proc=proc)
        if args.priority:
            # As in production, where WeCom and Dify run elsewhere: laibao and Redis get the CPU first, the
            # load generator and the stand-in what is left (their own delays still count in the latencies).
            assert redis_server.proc is not None
            try:
                for pid in [*(p.pid for p in procs[1:]), redis_server.proc.pid]:
                    os.setpriority(os.PRIO_PROCESS, pid, -10)
            except PermissionError:
                sys.exit("--priority needs root (a negative nice value)")
        result = uvloop.run(run_load(args, crypto, ports, [p.pid for p in procs[1:]], redis_server.port, dify_port,
                                     procs[0].pid))
        errors = sum(1 for i in range(2) for line in (workdir / f"laibao-{i}.log").open(errors="replace")
                     if " ERROR " in line or "Traceback" in line)
        result["log_errors"] = errors
        if args.json:
            print(json.dumps(result))
        else:
            report(result, args)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=15)
        redis_server.close()
        shutil.rmtree(workdir, ignore_errors=True)


def report(r: dict[str, Any], args: argparse.Namespace) -> None:
    print(f"{r['users']} users, {args.deltas} deltas {args.spacing} s apart, polls every ~{args.poll} s, "
          f"2 laibao processes, real redis-server{', laibao and Redis first on the CPU' if args.priority else ''}; "
          f"{r['seconds']} s")
    print(f"  refused {r['refused']}   lost {r['lost']}   exactly right {r['exact']}/{r['users']}   "
          f"restarted {r['restarted']}"
          + (f"   e.g. {r['lost_examples']}" if r["lost_examples"] else ""))
    print(f"  message  p50 {r['message_p50_ms']} ms   p99 {r['message_p99_ms']} ms")
    print(f"  poll     p50 {r['poll_p50_ms']} ms   p99 {r['poll_p99_ms']} ms   ({r['polls']} polls)")
    print(f"  visible lag p50 {r['lag_p50_ms']} ms   p99 {r['lag_p99_ms']} ms")
    print(f"  laibao RSS peak {r['rss_peak_mb']} MB   CPU {r['cpu_s']} s = {r['cpu_ms_per_answer']} ms per answer")
    print(f"  redis {r['redis_commands_per_answer']} commands per answer, memory peak {r['redis_memory_peak_mb']} MB")
    print(f"  redis commands per answer by name: {r['redis_commands']}")
    print(f"  CPU of the rest: the WeCom player (this process) {r['wecom_cpu_s']} s, the Dify stand-in "
          f"{r['dify_cpu_s']} s, redis-server {r['redis_cpu_s']} s")
    print(f"  relay cap hits {r['cap_hits']}   ERROR lines in the logs {r['log_errors']}")
    if r["timeline"]:
        print("  per second: CPU of laibao 1, laibao 2, the player, the Dify stand-in; poll p99 ms")
        for second, shares in enumerate(r["timeline"]):
            p99 = r["poll_p99_by_second"][second] if second < len(r["poll_p99_by_second"]) else 0
            print(f"    {second:3d}s  {'  '.join(f'{share:4.2f}' for share in shares)}   {p99} ms")


if __name__ == "__main__":
    main()
