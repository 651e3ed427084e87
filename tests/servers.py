"""Real backing servers for tests: redis-server and MariaDB, each on a free port in a temporary directory.

``running`` and ``serving`` hold a server for a ``with`` block (a fixture's life): the processes here,
or a stand-in that listens on the test's own event loop.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol, TypeVar
from urllib.parse import quote

import pymysql
from tornado.ioloop import IOLoop


class _Process(Protocol):
    def start(self) -> None: ...

    def close(self) -> None: ...


class _StandIn(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...


P = TypeVar("P", bound=_Process)
S = TypeVar("S", bound=_StandIn)


@contextmanager
def running(server: P) -> Iterator[P]:
    """``server`` started for the block and closed after it; whatever did start is closed when starting fails."""
    try:
        server.start()
        yield server
    finally:
        server.close()


@contextmanager
def serving(io_loop: IOLoop, stand_in: S) -> Iterator[S]:
    """A stand-in server listening on the test's loop for the block, stopped after it."""
    io_loop.run_sync(stand_in.start)
    try:
        yield stand_in
    finally:
        io_loop.run_sync(stand_in.stop)


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ephemeral_start() -> int:
    """Where the kernel's range of ports for ``bind(0)`` (``free_port``) begins."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_cluster_port() -> int:
    """A free port whose cluster bus port (10000 higher) is free too, both below the kernel's ephemeral
    range, so that ``free_port`` (another worker's plain redis-server, say) can never be handed either."""
    highest = _ephemeral_start() - 10001
    for _ in range(200):
        port = random.randint(10001, max(10001, highest))
        try:
            for candidate in (port, port + 10000):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


class PortTaken(RuntimeError):
    """The port was free when chosen, but something else listened on it before the server could."""


LISTENING = "Running mode="  # redis-server (and sentinel) log it once the listening socket is bound


def spawn_redis(command: list[str], port: int, log: Path, timeout: float = 15.0) -> subprocess.Popen[bytes]:
    """Start a redis-server or sentinel whose ``command`` logs to ``log``; return once *it* listens on ``port``.

    Waiting for a connection alone is not enough: a server that lost the race for its port exits, and
    whoever took the port would answer in its place.
    """
    offset = log.stat().st_size if log.exists() else 0
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        exited = proc.poll() is not None
        said = _log_since(log, offset)  # read after the poll: an exited server's last words are in it
        if LISTENING in said:
            wait_for_port(port, timeout=timeout, proc=proc)
            return proc
        if exited:
            if "Address already in use" in said:
                raise PortTaken(f"port {port} was taken before redis-server could listen on it")
            raise RuntimeError(f"redis-server exited with {proc.returncode}: {said[-1000:]}")
        time.sleep(0.02)
    proc.kill()
    proc.wait(timeout=10)
    raise RuntimeError(f"redis-server did not listen on {port} within {timeout} s")


def _log_since(log: Path, offset: int) -> str:
    try:
        with log.open("rb") as file:
            file.seek(offset)
            return file.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


def wait_for_port(port: int, timeout: float = 15.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Block until something accepts connections on ``port`` (or fail, naming why)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout} s")


class RedisServer:
    """A throw-away redis-server process; ``stop``/``start`` simulate an outage on the same port."""

    def __init__(self, *args: str, pick_port: Callable[[], int] = free_port) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed: run `make test`, which installs it")
        self.binary = binary
        self.dir = Path(tempfile.mkdtemp(prefix="laibao-redis-"))
        self.pick_port = pick_port
        self.port = pick_port()
        self._listened = False  # once it has, the port is the server's: a restart must come back on it
        self.args = list(args)  # more redis-server options (password, ACL user, replica of, cluster mode)
        self.proc: subprocess.Popen[bytes] | None = None
        self._keep_data = False  # set by stop(save=True): the next start finds the data

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        # A dump left by an earlier test's saved restart must not come back in a later test's restart.
        if not self._keep_data:
            (self.dir / "dump.rdb").unlink(missing_ok=True)
        self._keep_data = False
        self.launch(lambda: [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
                             "--save", "", "--appendonly", "no", "--protected-mode", "no", "--daemonize", "no",
                             "--logfile", str(self.dir / "redis.log"), *self.args],
                    self.dir / "redis.log")

    def launch(self, command: Callable[[], list[str]], log: Path) -> None:
        """Start ``command()`` (it names ``self.port``); on a first start, a port lost to a race is replaced."""
        for _ in range(5):
            try:
                self.proc = spawn_redis(command(), self.port, log)
            except PortTaken:
                if self._listened:
                    raise
                self.port = self.pick_port()
                continue
            self._listened = True
            return
        raise RuntimeError("five ports in a row were taken before redis-server could listen")

    def cli(self, *command: str) -> str:
        """Run one redis-cli command against this server (fixture set-up only); its output."""
        result = subprocess.run([_redis_cli(), "-h", "127.0.0.1", "-p", str(self.port), *command],
                                capture_output=True, text=True, timeout=30, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"redis-cli {command[0]} failed: {result.stderr or result.stdout}")
        return result.stdout

    def kill(self) -> None:
        """Die at once, as a crashed host does (no shutdown handshake)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    def stop(self, save: bool = False) -> None:
        """Stop the server; ``save`` writes its data first, so a restart finds it (a persistent Redis)."""
        if save and self.proc is not None and self.proc.poll() is None:
            with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
                sock.sendall(b"*2\r\n$8\r\nSHUTDOWN\r\n$4\r\nSAVE\r\n")
                sock.recv(64)  # the server closes the connection once the data is saved
            self.proc.wait(timeout=10)
            self._keep_data = True
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None

    def flush(self) -> None:
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            sock.sendall(b"*1\r\n$8\r\nFLUSHALL\r\n")
            reply = sock.recv(64)
        if not reply.startswith(b"+OK"):
            raise RuntimeError(f"FLUSHALL answered {reply!r}")

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def _redis_cli() -> str:
    binary = shutil.which("redis-cli")
    if binary is None:
        raise RuntimeError("redis-cli is not installed: run `make test`, which installs redis-server")
    return binary


def _wait(check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Poll ``check`` until it holds (fixture set-up only)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except RuntimeError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{what} not reached after {timeout} s")


class RedisCluster:
    """A Redis Cluster of 3 primaries, each with ``replicas`` replicas, on free ports."""

    def __init__(self, replicas: int = 1) -> None:
        self.replicas = replicas
        self.nodes = [RedisServer("--cluster-enabled", "yes", "--cluster-node-timeout", "1000",
                                  "--cluster-config-file", "nodes.conf", "--cluster-replica-validity-factor", "0",
                                  pick_port=free_cluster_port)
                      for _ in range(3 * (1 + replicas))]

    @property
    def url(self) -> str:
        """Seeds: the first two nodes (the client learns the rest)."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{node.port}" for node in self.nodes[:2])

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        result = subprocess.run(
            [_redis_cli(), "--cluster", "create", *(f"127.0.0.1:{node.port}" for node in self.nodes),
             "--cluster-replicas", str(self.replicas), "--cluster-yes"],
            capture_output=True, text=True, timeout=60, check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {result.stdout[-2000:]}{result.stderr[-2000:]}")
        self.wait_healthy()

    def wait_healthy(self) -> None:
        """Until every live node says the cluster is ok and every replica has synced."""
        def ok() -> bool:
            live = [node for node in self.nodes if node.proc is not None]
            return all("cluster_state:ok" in node.cli("CLUSTER", "INFO") for node in live) and all(
                "master_link_status:up" in node.cli("INFO", "replication")
                for node in live if "role:slave" in node.cli("INFO", "replication"))
        _wait(ok, "a healthy cluster")

    def node_of(self, key: str) -> RedisServer:
        """The primary serving ``key``'s slot now."""
        live = next(node for node in self.nodes if node.proc is not None)
        slot = int(live.cli("CLUSTER", "KEYSLOT", key).strip())
        for line in live.cli("CLUSTER", "NODES").splitlines():
            fields = line.split()
            if "master" in fields[2] and "fail" not in fields[2] and _serves(fields[8:], slot):
                port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
                return next(node for node in self.nodes if node.port == port)
        raise RuntimeError(f"no live primary serves slot {slot}")

    def flush(self) -> None:
        for node in self.nodes:
            if node.proc is not None and "role:master" in node.cli("INFO", "replication"):
                node.cli("FLUSHALL")

    def close(self) -> None:
        for node in self.nodes:
            node.close()


def _serves(ranges: list[str], slot: int) -> bool:
    for item in ranges:
        if item.startswith("["):
            continue  # a slot being migrated or imported
        low, _, high = item.partition("-")
        if int(low) <= slot <= int(high or low):
            return True
    return False


class RedisSentinelSet:
    """A primary, a replica and one sentinel watching them (quorum 1, failover after 1 s down)."""

    master = "laibao-primary"

    def __init__(self) -> None:
        self.primary = RedisServer()
        self.replica = RedisServer("--replicaof", "127.0.0.1", "<primary>")  # its port once it listens
        self.sentinel = RedisServer()
        self.conf = self.sentinel.dir / "sentinel.conf"

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.sentinel.port}/{self.master}/0"

    def start(self) -> None:
        self.primary.start()
        self.replica.args[-1] = str(self.primary.port)
        self.replica.start()
        self.conf.write_text(
            f"sentinel monitor {self.master} 127.0.0.1 {self.primary.port} 1\n"
            f"sentinel down-after-milliseconds {self.master} 1000\n"
            f"sentinel failover-timeout {self.master} 10000\n"
        )
        self.sentinel.args = [str(self.conf), "--sentinel"]
        # the config file comes first on the command line
        sentinel = self.sentinel
        sentinel.launch(lambda: [sentinel.binary, str(self.conf), "--sentinel", "--port", str(sentinel.port),
                                 "--bind", "127.0.0.1", "--dir", str(sentinel.dir), "--protected-mode", "no",
                                 "--logfile", str(sentinel.dir / "sentinel.log")],
                        sentinel.dir / "sentinel.log")
        _wait(lambda: "master_link_status:up" in self.replica.cli("INFO", "replication"), "a synced replica")
        _wait(lambda: "slaves=1" in self.sentinel.cli("INFO", "sentinel"), "a sentinel that sees the replica")

    def primary_port(self) -> int:
        """The port the sentinel names as primary now."""
        reply = self.sentinel.cli("SENTINEL", "get-master-addr-by-name", self.master).split()
        return int(reply[1])

    def flush(self) -> None:
        for node in (self.primary, self.replica):
            if node.proc is not None and "role:master" in node.cli("INFO", "replication"):
                node.cli("FLUSHALL")

    def close(self) -> None:
        for node in (self.sentinel, self.replica, self.primary):
            node.close()


def _mariadb_binary() -> str | None:
    """mariadbd: on PATH for root, in /usr/sbin (not on a user's PATH) on Debian."""
    return shutil.which("mariadbd") or next(
        (path for path in ("/usr/sbin/mariadbd", "/usr/libexec/mariadbd") if Path(path).is_file()), None
    )


class MariaDBServer:
    """A throw-away MariaDB server: its own datadir, socket and free port, a database and a user.

    Root connects over the socket without a password (only the fixtures do); laibao connects over TCP
    as ``user`` with a password that needs URL quoting, as real ones often do.
    """

    user = "laibao"
    password = "s3cret p@ss/w:rd%"  # a throw-away test server's password, with characters that need URL quoting

    def __init__(self) -> None:
        binary = _mariadb_binary()
        install = shutil.which("mariadb-install-db") or shutil.which("mysql_install_db")
        if binary is None or install is None:
            raise RuntimeError("mariadb-server is not installed: run `make test`, which installs it")
        self.binary = binary
        self.install = install
        self.dir = Path(tempfile.mkdtemp(prefix="laibao-mariadb-"))
        self.datadir = self.dir / "data"
        self.socket = self.dir / "mysqld.sock"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._databases = 0

    def _as_root(self) -> list[str]:
        # mariadbd refuses to run as root unless told to; only root may pass --user
        return ["--user=root"] if os.geteuid() == 0 else []

    def start(self) -> None:
        if not self.datadir.exists():
            result = subprocess.run(
                [self.install, "--no-defaults", f"--datadir={self.datadir}", "--auth-root-authentication-method=normal",
                 "--skip-test-db", "--skip-name-resolve", *self._as_root()],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=False,
            )
            if result.returncode != 0:
                raise RuntimeError(f"mariadb-install-db failed: {result.stdout.decode(errors='replace')[-2000:]}")
        self.proc = subprocess.Popen(
            [self.binary, "--no-defaults", f"--datadir={self.datadir}", f"--port={self.port}",
             "--bind-address=127.0.0.1", f"--socket={self.socket}", f"--pid-file={self.dir / 'mysqld.pid'}",
             f"--log-error={self.dir / 'error.log'}", "--skip-name-resolve", "--skip-log-bin",
             # a test server: durability traded for speed
             "--innodb-flush-log-at-trx-commit=0", "--innodb-doublewrite=0", "--innodb-buffer-pool-size=32M",
             "--character-set-server=utf8mb4", "--collation-server=utf8mb4_unicode_ci", *self._as_root()],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            wait_for_port(self.port, timeout=60, proc=self.proc)
            self._wait_for_socket()
        except RuntimeError as exc:
            error_log = self.dir / "error.log"
            log = error_log.read_text(errors="replace")[-2000:] if error_log.exists() else ""
            self.stop()
            raise RuntimeError(f"{exc}\n{log}") from exc
        self.admin(
            f"CREATE USER IF NOT EXISTS '{self.user}'@'127.0.0.1' IDENTIFIED BY '{self.password}'",
            f"GRANT ALL PRIVILEGES ON *.* TO '{self.user}'@'127.0.0.1'",
        )

    def _wait_for_socket(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.admin("SELECT 1")
                return
            except pymysql.err.OperationalError:
                time.sleep(0.05)
        raise RuntimeError(f"MariaDB does not accept connections on {self.socket} after {timeout} s")

    def admin(self, *statements: str) -> list[tuple[object, ...]]:
        """Run statements as root over the socket (fixture set-up only); the last one's rows."""
        conn = pymysql.connect(unix_socket=str(self.socket), user="root", password="", autocommit=True,
                               charset="utf8mb4", connect_timeout=5)
        try:
            rows: list[tuple[object, ...]] = []
            with conn.cursor() as cursor:
                for statement in statements:
                    cursor.execute(statement)
                    rows = list(cursor.fetchall())
            return rows
        finally:
            conn.close()

    def url(self, database: str) -> str:
        """The mysql:// URL laibao uses for ``database``."""
        return f"mysql://{self.user}:{quote(self.password, safe='')}@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A new, empty utf8mb4 database; its name."""
        self._databases += 1
        name = f"laibao_test_{self._databases}"
        self.admin(f"DROP DATABASE IF EXISTS {name}", f"CREATE DATABASE {name} CHARACTER SET utf8mb4")
        return name

    def drop_database(self, name: str) -> None:
        self.admin(f"DROP DATABASE IF EXISTS {name}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
