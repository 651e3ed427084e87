"""The shipped process manager and load balancer, really started: supervisord.conf and deploy/haproxy.cfg."""

from __future__ import annotations

import asyncio
import csv
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import pytest
from tornado.httpclient import AsyncHTTPClient

from laibao.config import read_dotenv
from tests.difystub import DifyStub
from tests.harness import AES_KEY, TOKEN, LaibaoProcess, WeCom, assert_no_secrets, eventually, message
from tests.servers import free_port
from tests.traffic import Tally, User, scripted

REPO = Path(__file__).resolve().parent.parent
HAPROXY_CFG = REPO / "deploy" / "haproxy.cfg"


def _binary(name: str) -> str:
    """A tool from this venv (the test extras) or the system (Debian packages, also in /usr/sbin)."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name) or shutil.which(name, path="/usr/sbin")
    if found is None:
        raise RuntimeError(f"{name} is not installed: run `make test`, which installs it")
    return found


def _port_block(count: int) -> int:
    """A base port such that base+1 .. base+count are all free right now."""
    for _ in range(50):
        base = free_port()
        sockets = []
        try:
            for offset in range(1, count + 1):
                sock = socket.socket()
                sockets.append(sock)
                sock.bind(("127.0.0.1", base + offset))
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
        return base
    raise RuntimeError(f"no block of {count} free ports found")


def _environment(settings: Mapping[str, str]) -> dict[str, str]:
    """This process's environment without LAIBAO_*, plus ``settings``.

    supervisord.conf starts laibao in the repository, where a developer's .env may hold other settings:
    an empty value in the environment wins over .env and counts as unset, so those are blanked.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAIBAO_")}
    dotenv = REPO / ".env"
    if dotenv.is_file():
        env.update({key: "" for key in read_dotenv(dotenv) if key.startswith("LAIBAO_")})
    env.update(settings)
    return env


async def _ready(http: AsyncHTTPClient, url: str) -> bool:
    try:
        response = await http.fetch(url + "/readyz", raise_error=False, request_timeout=2)
    except OSError:
        return False
    return response.code == 200


class Supervisord:
    """`supervisord -c supervisord.conf`, the file as shipped, run from a temporary working directory."""

    def __init__(self, workdir: Path, env: Mapping[str, str]) -> None:
        self.conf = REPO / "supervisord.conf"
        self.env = dict(env)
        self.log_path = workdir / "supervisord.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen([_binary("supervisord"), "-c", str(self.conf)], cwd=workdir, env=self.env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        # The processes log to /dev/stdout: on a regular file each would write at its own offset over the
        # others' lines, on a pipe (as under systemd or Docker) they interleave whole lines.
        assert self.proc.stdout is not None
        self._copier = subprocess.Popen(["cat"], stdin=self.proc.stdout, stdout=self._log)
        self.proc.stdout.close()

    async def ctl(self, *command: str, check: bool = True) -> str:
        """Run supervisorctl against this supervisord; its output (failing on a non-zero exit with ``check``)."""
        proc = await asyncio.create_subprocess_exec(
            _binary("supervisorctl"), "-c", str(self.conf), *command, env=self.env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 90)
        text = out.decode(errors="replace")
        assert proc.returncode == 0 or not check, f"supervisorctl {' '.join(command)} exited {proc.returncode}:\n{text}"
        return text

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        """SIGTERM supervisord (it stops its processes the configured way), SIGKILL if it hangs."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=45)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._copier.wait(timeout=10)  # ends with the pipe: every line is in the file
        self._log.close()


def _settings(dify: DifyStub, redis_url: str, **extra: str) -> dict[str, str]:
    return {"LAIBAO_WECOM_TOKEN": TOKEN, "LAIBAO_WECOM_AES_KEY": AES_KEY, "LAIBAO_DIFY_URL": dify.base_url,
            "LAIBAO_DIFY_KEY": "app-test-key", "LAIBAO_REDIS_URL": redis_url, **extra}


@pytest.mark.slow
@pytest.mark.gen_test(timeout=150)
async def test_supervisord_conf_runs_four_ready_processes_and_a_restart_finishes_every_answer(
    stub: DifyStub, redis_url: str, tmp_path: Path
) -> None:
    dify = stub
    assert (REPO / ".venv" / "bin" / "laibao").is_file(), "supervisord.conf runs .venv/bin/laibao: run `make test`"
    dify.answer_for = lambda query: scripted(query, delay=0.04)  # about 2 s: longer than the drain below
    base = _port_block(4)
    # A 1 s drain: the restart catches every answer mid-way, and the processes started after it finish them.
    env = _environment(_settings(dify, redis_url, LAIBAO_PORT_BASE=str(base), LAIBAO_SHUTDOWN_GRACE="1"))
    supervisor = Supervisord(tmp_path, env)
    http = AsyncHTTPClient(force_instance=True)
    urls = [f"http://127.0.0.1:{base + n}" for n in range(1, 5)]
    try:
        async def all_ready() -> bool:
            assert supervisor.proc.poll() is None, supervisor.log()
            return all(await asyncio.gather(*(_ready(http, url) for url in urls)))

        await eventually(all_ready, "the four processes answer /readyz", tries=1200)
        status = ""

        async def all_running() -> bool:  # supervisord calls a process RUNNING once it has lived startsecs
            nonlocal status
            status = await supervisor.ctl("status", check=False)  # exit status 3 while one is not running
            return sorted(line.split()[0] for line in status.splitlines() if " RUNNING " in line) == [
                f"laibao:laibao-{n}" for n in range(1, 5)]

        await eventually(all_running, "supervisorctl status shows the four RUNNING", tries=600)
        pids = {line.split()[0]: line.split("pid ")[1].split(",")[0] for line in status.splitlines()}

        tally = Tally()
        users = [User(http, urls[n % 4], f"user{n}", tally, retry_unavailable=True) for n in range(8)]
        talks = [asyncio.create_task(user.converse(f"{user.name} 在重启前问的问题")) for user in users]
        await eventually(lambda: len(dify.chat_calls) >= len(users), "every question reached Dify")
        assert tally.answers == 0  # every answer is still being written when the restart begins

        restarted = await supervisor.ctl("restart", "laibao:*")
        assert restarted.count("stopped") == 4 and restarted.count("started") == 4, restarted
        await asyncio.gather(*talks)
        assert tally.failures == [] and tally.wrong == [], tally
        assert tally.answers == len(users)

        status = await supervisor.ctl("status")
        assert status.count("RUNNING") == 4, status
        after = {line.split()[0]: line.split("pid ")[1].split(",")[0] for line in status.splitlines()}
        assert all(after[name] != pid for name, pid in pids.items())  # really new processes
        assert all(await asyncio.gather(*(_ready(http, url) for url in urls)))
        # Each of the four drained and handed its unfinished answers over; eight processes listened in all.
        await eventually(lambda: supervisor.log().count("unfinished relays released to other processes") == 4
                         and supervisor.log().count(" listening on 0.0.0.0:") == 8, "the processes' log lines")
        print(f"\nsupervisorctl restart laibao:*: {tally.figures()}")
    finally:
        http.close()
        supervisor.close()
    assert_no_secrets(supervisor.log(), "在重启前问的问题")


class HAProxy:
    """deploy/haproxy.cfg as shipped, with its addresses given through the environment as it documents."""

    def __init__(self, workdir: Path, backends: list[int]) -> None:
        self.port, self.stats_port = free_port(), free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("LAIBAO_")}
        env.update({"LAIBAO_LB_BIND": f"127.0.0.1:{self.port}", "LAIBAO_LB_STATS": f"127.0.0.1:{self.stats_port}"})
        env.update({f"LAIBAO_BACKEND_{n}": f"127.0.0.1:{port}" for n, port in enumerate(backends, 1)})
        self.log_path = workdir / "haproxy.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen([_binary("haproxy"), "-db", "-f", str(HAPROXY_CFG)], env=env,
                                     stdout=self._log, stderr=subprocess.STDOUT)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def states(self, http: AsyncHTTPClient) -> dict[str, str]:
        """Each server of the laibao backend and its state as HAProxy's checks see it ("UP", "DOWN", ...)."""
        assert self.proc.poll() is None, self.log()
        response = await http.fetch(f"http://127.0.0.1:{self.stats_port}/;csv", request_timeout=5)
        rows = csv.DictReader(io.StringIO(response.body.decode().lstrip("# ")))
        return {row["svname"]: row["status"] for row in rows
                if row["pxname"] == "laibao" and row["svname"] not in ("FRONTEND", "BACKEND")}

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self._log.close()


async def _exited(proc: LaibaoProcess, within: float = 60.0) -> int:
    deadline = time.monotonic() + within
    while proc.proc.poll() is None:
        assert time.monotonic() < deadline, f"{proc.name} did not stop:\n{proc.log()}"
        await asyncio.sleep(0.05)
    return proc.proc.returncode


@pytest.mark.slow
@pytest.mark.gen_test(timeout=180)
async def test_rolling_restart_behind_haproxy_fails_no_request_and_loses_no_answer(
    stub: DifyStub, redis_url: str, tmp_path: Path
) -> None:
    stub.answer_for = scripted
    settings = _settings(stub, redis_url, LAIBAO_SHUTDOWN_GRACE="3")
    procs = [LaibaoProcess(tmp_path, f"node-{n}", settings) for n in range(1, 4)]
    http = AsyncHTTPClient(force_instance=True)
    # The shipped file has four servers (supervisord's ports); the fourth is left where nothing listens:
    # a backend that is down from the start must not fail a request either.
    lb = HAProxy(tmp_path, [proc.port for proc in procs] + [free_port()])
    tally, stop = Tally(), asyncio.Event()
    talks: list[asyncio.Task[None]] = []
    try:
        await asyncio.gather(*(proc.ready(http) for proc in procs))

        async def in_rotation(server: str) -> bool:
            return (await lb.states(http)).get(server) == "UP"

        for n in range(1, 4):
            await eventually(lambda n=n: in_rotation(f"laibao{n}"), f"HAProxy sees laibao{n} up", tries=1200)
        users = [User(http, lb.url, f"user{n}", tally) for n in range(6)]
        talks = [asyncio.create_task(user.talk(stop)) for user in users]

        def talking(condition: bool) -> bool:
            stopped = [task for task in talks if task.done()]  # a user stops early only on a failed request
            assert not stopped, f"a user stopped: {stopped[0].exception()!r}; failures: {tally.failures[:3]}"
            return condition

        await eventually(lambda: talking(tally.answers >= len(users)), "every user got a first answer", tries=1200)

        for n, old in enumerate(list(procs), 1):
            old.signal(signal.SIGTERM)
            assert await _exited(old) == 0, old.log()
            assert "stopped" in old.log()
            old.close()
            procs[n - 1] = LaibaoProcess(tmp_path, f"node-{n}-new", settings, port=old.port)
            await procs[n - 1].ready(http)
            await eventually(lambda n=n: in_rotation(f"laibao{n}"), f"HAProxy takes laibao{n} back", tries=1200)

        done = [user.finished for user in users]
        await eventually(lambda: talking(all(u.finished > d for u, d in zip(users, done, strict=True))),
                         "every user got an answer after the last restart", tries=1200)
        stop.set()
        await asyncio.gather(*talks)
        print(f"\nrolling restart behind HAProxy: {tally.figures()}")
        assert tally.failures == [], tally.failures[:5]
        assert tally.wrong == [], tally.wrong[:5]
        assert tally.answers >= 2 * len(users)
        assert (await lb.states(http))["laibao4"].startswith("DOWN")
    finally:
        stop.set()
        for task in talks:
            task.cancel()
        await asyncio.gather(*talks, return_exceptions=True)
        http.close()
        lb.close()
        for proc in procs:
            proc.close()
    for proc in procs:
        assert_no_secrets(proc.log(), "的第 1 个问题")


@pytest.mark.gen_test(timeout=60)
async def test_an_idle_process_keeps_accepting_after_sigterm_until_load_balancers_can_notice(
    stub: DifyStub, redis_url: str, tmp_path: Path
) -> None:
    # Nothing to drain: without the shutdown delay the process would stop listening at once, before a load
    # balancer's next check, and requests already on their way to it would fail.
    proc = LaibaoProcess(tmp_path, "idle", _settings(stub, redis_url))
    http = AsyncHTTPClient(force_instance=True)
    try:
        await proc.ready(http)
        proc.signal(signal.SIGTERM)

        async def draining() -> bool:  # a refused connection fails the test: the process stopped too early
            ready = await http.fetch(proc.base_url + "/readyz", raise_error=False)
            return ready.code == 503 and b"process: draining" in ready.body

        await eventually(draining, "/readyz reports draining")
        # Still answered meanwhile: a message (recorded for another process to answer) and a health check.
        reply = await WeCom(http, proc.base_url).stream(message("停机前一刻到达的消息"))
        assert reply["finish"] is False
        assert (await http.fetch(proc.base_url + "/healthz")).code == 200
        assert await _exited(proc) == 0
        assert "stopped" in proc.log()
    finally:
        http.close()
        proc.close()
