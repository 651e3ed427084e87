"""Real backing servers for tests: redis-server and MariaDB, each on a free port in a temporary directory."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

import pymysql


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed: run `make test`, which installs it")
        self.binary = binary
        self.dir = Path(tempfile.mkdtemp(prefix="laibao-redis-"))
        self.port = free_port()
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
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
             "--save", "", "--appendonly", "no", "--protected-mode", "no", "--daemonize", "no",
             "--logfile", str(self.dir / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port, proc=self.proc)

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
