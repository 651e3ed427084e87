"""The user records: who may talk to a bot, and the code and secret that sign them in to the auth service.

MySQL (MariaDB) holds them for every process; the in-memory store is for one process and the tests.

    users           userid VARCHAR(64) PK (the WeCom userid, exactly as WeCom sends it), name, code,
                    secret (AES-GCM, base64 of nonce | tag | ciphertext; '' = none), enabled,
                    created, updated (unix seconds)
    schema_version  one row (id = 1): the schema version ``laibao db init`` brought the database to

The secret is encrypted with the 32-byte ``LAIBAO_SECRET_KEY`` and the userid as associated data, so a
ciphertext copied onto another user's row does not decrypt. It is plaintext only inside ``User``
(never in its repr). pymysql/aiomysql failures leave this module as ``StoreError``; their messages
name the operation and the error code, never a value that was sent.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol
from urllib.parse import parse_qs, unquote, urlsplit

import aiomysql
from Crypto.Cipher import AES
from Crypto.Random import get_random_bytes

from stores.errors import StoreError

__all__ = [
    "SCHEMA_VERSION",
    "MemoryUserStore",
    "MySQLUserStore",
    "User",
    "UserStore",
    "check_user",
    "decrypt_secret",
    "encrypt_secret",
    "open_user_store",
]

SCHEMA_VERSION = 1
MAX_USERID = 64  # WeCom userids are 1-64 bytes
MAX_TEXT = 255  # name and code
MAX_SECRET_BYTES = 1024  # plaintext; its ciphertext fits the 2048-character column

_NONCE_LEN = 12
_TAG_LEN = 16
_KEY_LEN = 32

Clock = Callable[[], float]
Rows = list[Sequence[Any]]  # module level: inside the stores, ``list`` is the method of that name


@dataclass(frozen=True)
class User:
    """One WeCom user as the user store keeps them."""

    userid: str
    name: str = ""
    code: str = ""  # the user's code at the auth service (not secret)
    secret: str = field(default="", repr=False)  # plaintext in memory only; encrypted at rest
    enabled: bool = True
    created: float = 0.0  # unix seconds; 0 = set by the store on first add
    updated: float = 0.0


class UserStore(Protocol):
    """The user records, keyed by WeCom userid."""

    async def get(self, userid: str) -> User | None:
        """The user, or None if unknown."""
        ...

    async def add(self, user: User) -> None:
        """Insert or replace the user (``created`` is kept for an existing one, ``updated`` set to now)."""
        ...

    async def set_enabled(self, userid: str, enabled: bool) -> bool:
        """Enable or disable the user; False if unknown."""
        ...

    async def remove(self, userid: str) -> bool:
        """Delete the user; False if unknown."""
        ...

    async def list(self) -> list[User]:
        """Every user, ordered by userid."""
        ...

    async def init_schema(self) -> None:
        """Create or migrate the schema to SCHEMA_VERSION (idempotent)."""
        ...

    async def schema_version(self) -> int:
        """The schema version the store is at (0 before ``init_schema``)."""
        ...

    async def ping(self) -> None:
        """Raise StoreError if the store cannot be reached."""
        ...

    async def close(self) -> None:
        """Release connections; the store is unusable afterwards."""
        ...


def check_user(user: User) -> None:
    """Raise ValueError naming the field if ``user`` does not fit the schema (never echoing the secret)."""
    for name in ("userid", "name", "code", "secret"):
        try:
            getattr(user, name).encode()
        except UnicodeEncodeError:  # a lone surrogate, e.g. from non-UTF-8 command-line bytes
            raise ValueError(f"{name} must be valid Unicode text") from None
    if not user.userid or user.userid != user.userid.strip() or len(user.userid.encode()) > MAX_USERID:
        raise ValueError(f"userid must be 1-{MAX_USERID} bytes without surrounding spaces")
    for name in ("name", "code"):
        if len(getattr(user, name)) > MAX_TEXT:
            raise ValueError(f"{name} must be at most {MAX_TEXT} characters")
    if len(user.secret.encode()) > MAX_SECRET_BYTES:
        raise ValueError(f"secret must be at most {MAX_SECRET_BYTES} bytes")


def encrypt_secret(key: bytes, userid: str, secret: str) -> str:
    """AES-GCM ``secret`` bound to ``userid``: base64 of nonce | tag | ciphertext."""
    cipher = AES.new(key, AES.MODE_GCM, nonce=_random_nonce())
    cipher.update(userid.encode())
    ciphertext, tag = cipher.encrypt_and_digest(secret.encode())
    return base64.b64encode(cipher.nonce + tag + ciphertext).decode("ascii")


def decrypt_secret(key: bytes, userid: str, stored: str) -> str:
    """The plaintext of ``encrypt_secret``'s output; ValueError if the key, userid or data do not match."""
    try:
        raw = base64.b64decode(stored, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("not base64") from exc
    if len(raw) < _NONCE_LEN + _TAG_LEN:
        raise ValueError("too short")
    nonce, tag, ciphertext = raw[:_NONCE_LEN], raw[_NONCE_LEN:_NONCE_LEN + _TAG_LEN], raw[_NONCE_LEN + _TAG_LEN:]
    cipher = AES.new(key, AES.MODE_GCM, nonce=nonce)
    cipher.update(userid.encode())
    plaintext = cipher.decrypt_and_verify(ciphertext, tag)  # ValueError on a wrong key or altered data
    return plaintext.decode()


def _random_nonce() -> bytes:
    # 96-bit random nonces: safe for far more encryptions than a user table will ever see
    return bytes(get_random_bytes(_NONCE_LEN))


# ------------------------------------------------------------------------------------------ memory

class MemoryUserStore:
    """User records in this process's memory (one process, tests); secrets stay plaintext here."""

    def __init__(self, *, clock: Clock = time.time) -> None:
        self._users: dict[str, User] = {}
        self._clock = clock

    async def get(self, userid: str) -> User | None:
        """The user, or None if unknown."""
        return self._users.get(userid)

    async def add(self, user: User) -> None:
        """Insert or replace the user (``created`` is kept for an existing one, ``updated`` set to now)."""
        check_user(user)
        now = self._clock()
        existing = self._users.get(user.userid)
        created = existing.created if existing else (user.created or now)
        self._users[user.userid] = replace(user, created=created, updated=now)

    async def set_enabled(self, userid: str, enabled: bool) -> bool:
        """Enable or disable the user; False if unknown."""
        user = self._users.get(userid)
        if user is None:
            return False
        self._users[userid] = replace(user, enabled=enabled, updated=self._clock())
        return True

    async def remove(self, userid: str) -> bool:
        """Delete the user; False if unknown."""
        return self._users.pop(userid, None) is not None

    async def list(self) -> list[User]:
        """Every user, ordered by userid."""
        return [self._users[userid] for userid in sorted(self._users)]

    async def init_schema(self) -> None:
        """Nothing to create."""

    async def schema_version(self) -> int:
        """Always current."""
        return SCHEMA_VERSION

    async def ping(self) -> None:
        """Always reachable."""

    async def close(self) -> None:
        """Nothing to release."""


# ------------------------------------------------------------------------------------------- MySQL

# Each migration brings the schema from the previous version to its own; ``init_schema`` applies the
# ones above the database's version in order. Version 1 creates the tables.
_TABLE_OPTIONS = "ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin"
_CREATE_TABLES = {
    "schema_version": f"""
        CREATE TABLE IF NOT EXISTS schema_version (
          id TINYINT UNSIGNED NOT NULL PRIMARY KEY,
          version INT UNSIGNED NOT NULL,
          updated DOUBLE NOT NULL
        ) {_TABLE_OPTIONS}""",
    "users": f"""
        CREATE TABLE IF NOT EXISTS users (
          userid VARCHAR({MAX_USERID}) NOT NULL PRIMARY KEY,
          name VARCHAR({MAX_TEXT}) NOT NULL DEFAULT '',
          code VARCHAR({MAX_TEXT}) NOT NULL DEFAULT '',
          secret VARCHAR(2048) NOT NULL DEFAULT '' COMMENT 'AES-GCM, base64(nonce|tag|ciphertext)',
          enabled TINYINT(1) NOT NULL DEFAULT 1,
          created DOUBLE NOT NULL,
          updated DOUBLE NOT NULL
        ) {_TABLE_OPTIONS}""",
}
_MIGRATIONS: dict[int, Sequence[str]] = {1: ()}  # version 1 is the tables themselves

_UPSERT = """
    INSERT INTO users (userid, name, code, secret, enabled, created, updated)
    VALUES (%s, %s, %s, %s, %s, %s, %s)
    ON DUPLICATE KEY UPDATE name = VALUES(name), code = VALUES(code), secret = VALUES(secret),
                            enabled = VALUES(enabled), updated = VALUES(updated)"""

# MySQL error codes with a message of their own: the table is missing (no `laibao db init` yet).
_NO_SUCH_TABLE = 1146
# pymysql.constants.CLIENT.FOUND_ROWS: UPDATE reports the rows it matched, not only those it changed
_CLIENT_FOUND_ROWS = 2
# pymysql's exceptions, as aiomysql re-exports them (pymysql ships no type information)
_MySQLError: type[Exception] = aiomysql.MySQLError
_MESSAGE_SAFE: tuple[type[Exception], ...] = (aiomysql.OperationalError, aiomysql.InterfaceError)
# "server has gone away", "lost connection during query"
_CONNECTION_LOST = (2006, 2013)


def _connection_lost(exc: Exception) -> bool:
    """True when the connection died under the statement (not when none could be opened)."""
    if isinstance(exc, aiomysql.InterfaceError):
        return True  # pymysql's "(0, '')": the socket was already closed
    return isinstance(exc, aiomysql.OperationalError) and exc.args[:1] in ((code,) for code in _CONNECTION_LOST)


def _parse_url(url: str) -> dict[str, Any]:
    """aiomysql connection arguments from ``mysql://user:pass@host:port/db[?unix_socket=/path]``."""
    parts = urlsplit(url)
    if parts.scheme != "mysql":
        raise StoreError("mysql_url must start with mysql://")
    database = unquote(parts.path.lstrip("/"))
    if not database:
        raise StoreError("mysql_url must name the database: mysql://user:pass@host:3306/laibao")
    try:
        port = parts.port or 3306
    except ValueError as exc:
        raise StoreError("mysql_url has an invalid port") from exc
    query = parse_qs(parts.query)
    args: dict[str, Any] = {
        "host": parts.hostname or "127.0.0.1",
        "port": port,
        "user": unquote(parts.username or ""),
        "password": unquote(parts.password or ""),
        "db": database,
    }
    if query.get("unix_socket"):
        args["unix_socket"] = query["unix_socket"][0]
    return args


class MySQLUserStore:
    """User records in MySQL/MariaDB through an aiomysql pool, created on first use."""

    def __init__(
        self,
        url: str,
        secret_key: bytes | None,
        *,
        minsize: int = 1,
        maxsize: int = 10,
        connect_timeout: float = 5.0,
        timeout: float = 10.0,
        clock: Clock = time.time,
    ) -> None:
        if secret_key is not None and len(secret_key) != _KEY_LEN:
            raise ValueError("secret_key must be 32 bytes")
        self._connect_args = _parse_url(url)
        self._key = secret_key
        self._minsize = minsize
        self._maxsize = maxsize
        self._connect_timeout = connect_timeout
        self._timeout = timeout  # per statement, including waiting for a free connection
        self._clock = clock
        self._pool: aiomysql.Pool | None = None
        self._pool_lock = asyncio.Lock()
        self._closed = False

    def __repr__(self) -> str:
        args = self._connect_args
        return f"MySQLUserStore({args['user']}@{args['host']}:{args['port']}/{args['db']})"

    # ------------------------------------------------------------------------------ the protocol

    async def get(self, userid: str) -> User | None:
        """The user, or None if unknown."""
        rows, _ = await self._run(
            "get", "SELECT userid, name, code, secret, enabled, created, updated FROM users WHERE userid = %s",
            (userid,),
        )
        return self._user(rows[0]) if rows else None

    async def add(self, user: User) -> None:
        """Insert or replace the user (``created`` is kept for an existing one, ``updated`` set to now)."""
        check_user(user)
        stored_secret = ""
        if user.secret:
            if self._key is None:
                raise StoreError("a secret can only be stored with LAIBAO_SECRET_KEY set (laibao gen-key prints one)")
            stored_secret = encrypt_secret(self._key, user.userid, user.secret)
        now = self._clock()
        await self._run(
            "add",
            _UPSERT,
            (user.userid, user.name, user.code, stored_secret, int(user.enabled), user.created or now, now),
        )

    async def set_enabled(self, userid: str, enabled: bool) -> bool:
        """Enable or disable the user; False if unknown."""
        # the pool's connections report matched rows (CLIENT.FOUND_ROWS), so an unchanged flag counts
        _, count = await self._run(
            "set_enabled", "UPDATE users SET enabled = %s, updated = %s WHERE userid = %s",
            (int(enabled), self._clock(), userid),
        )
        return count > 0

    async def remove(self, userid: str) -> bool:
        """Delete the user; False if unknown."""
        _, count = await self._run("remove", "DELETE FROM users WHERE userid = %s", (userid,))
        return count > 0

    async def list(self) -> list[User]:
        """Every user, ordered by userid."""
        rows, _ = await self._run(
            "list", "SELECT userid, name, code, secret, enabled, created, updated FROM users ORDER BY userid", ()
        )
        return [self._user(row) for row in rows]

    async def init_schema(self) -> None:
        """Create the tables that are missing and migrate to SCHEMA_VERSION (idempotent)."""
        rows, _ = await self._run(
            "init_schema",
            "SELECT table_name FROM information_schema.tables WHERE table_schema = DATABASE()",
            (),
        )
        present = {str(row[0]) for row in rows}
        # Only the missing tables are created: CREATE TABLE IF NOT EXISTS on an existing table leaves
        # a note that aiomysql turns into a Python warning.
        for table, ddl in _CREATE_TABLES.items():
            if table not in present:
                await self._run("init_schema", ddl, ())
        rows, _ = await self._run("init_schema", "SELECT version FROM schema_version WHERE id = 1", ())
        version = int(rows[0][0]) if rows else 0
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"the database schema is version {version}; this laibao knows versions up to {SCHEMA_VERSION}"
            )
        for target in range(version + 1, SCHEMA_VERSION + 1):
            for statement in _MIGRATIONS[target]:
                await self._run("init_schema", statement, ())
            await self._run(
                "init_schema",
                "INSERT INTO schema_version (id, version, updated) VALUES (1, %s, %s) "
                "ON DUPLICATE KEY UPDATE version = VALUES(version), updated = VALUES(updated)",
                (target, self._clock()),
            )

    async def schema_version(self) -> int:
        """The version recorded in the database (0 when ``init_schema`` never ran)."""
        try:
            rows, _ = await self._run("schema_version", "SELECT version FROM schema_version WHERE id = 1", ())
        except StoreError as exc:
            if isinstance(exc.__cause__, _MySQLError) and exc.__cause__.args[:1] == (_NO_SUCH_TABLE,):
                return 0
            raise
        return int(rows[0][0]) if rows else 0

    async def ping(self) -> None:
        """Raise StoreError if MySQL cannot be reached."""
        await self._run("ping", "SELECT 1", ())

    async def close(self) -> None:
        """Close the pool and wait for its connections to close."""
        self._closed = True
        async with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()
            await pool.wait_closed()

    # -------------------------------------------------------------------------------- internals

    def _user(self, row: Sequence[Any]) -> User:
        userid, name, code, stored_secret, enabled, created, updated = row
        secret = ""
        if stored_secret:
            if self._key is None:
                raise StoreError(f"user {userid!r} has a secret but LAIBAO_SECRET_KEY is not set")
            try:
                secret = decrypt_secret(self._key, userid, stored_secret)
            except ValueError as exc:
                raise StoreError(
                    f"the secret of user {userid!r} does not decrypt: wrong LAIBAO_SECRET_KEY, or the row was altered"
                ) from exc
        return User(
            userid=userid, name=name, code=code, secret=secret, enabled=bool(enabled),
            created=float(created), updated=float(updated),
        )

    async def _get_pool(self) -> aiomysql.Pool:
        if self._closed:
            raise StoreError("the user store is closed")
        async with self._pool_lock:
            if self._pool is None:
                self._pool = await aiomysql.create_pool(
                    minsize=self._minsize,
                    maxsize=self._maxsize,
                    connect_timeout=self._connect_timeout,
                    autocommit=True,
                    charset="utf8mb4",
                    # strict: a value too long for its column is an error, not a silent truncation
                    sql_mode="'STRICT_ALL_TABLES,NO_ENGINE_SUBSTITUTION'",  # aiomysql sends it unquoted
                    client_flag=_CLIENT_FOUND_ROWS,
                    pool_recycle=3600,  # under the server's usual wait_timeout of 8 h, with room
                    **self._connect_args,
                )
            return self._pool

    async def _run(self, operation: str, sql: str, args: Sequence[Any]) -> tuple[Rows, int]:
        """Execute one parameterised statement; (rows, affected or matched row count)."""
        try:
            try:
                return await self._execute(sql, args)
            except _MySQLError as exc:
                if not _connection_lost(exc):
                    raise
                # A pooled connection the server dropped (restart, KILL, idle timeout) fails only when
                # used. Every statement here is idempotent, so one retry on a fresh connection is safe.
                return await self._execute(sql, args)
        except StoreError:
            raise
        except TimeoutError as exc:
            raise StoreError(f"mysql {operation} failed: no answer within {self._timeout:g} s") from exc
        except _MySQLError as exc:
            raise StoreError(_describe(operation, exc)) from exc
        except OSError as exc:
            raise StoreError(f"mysql {operation} failed: {type(exc).__name__}: {exc.strerror or ''}") from exc

    async def _execute(self, sql: str, args: Sequence[Any]) -> tuple[Rows, int]:
        async with asyncio.timeout(self._timeout):
            pool = await self._get_pool()
            conn = await pool.acquire()
            try:
                async with conn.cursor() as cursor:
                    await cursor.execute(sql, args)
                    rows = list(await cursor.fetchall())
                    return rows, int(cursor.rowcount)
            except BaseException:
                # after an error, a timeout or a cancellation the protocol state is unknown:
                # a closed connection is dropped by the pool instead of being handed out again
                conn.close()
                raise
            finally:
                await pool.release(conn)

def _describe(operation: str, exc: Exception) -> str:
    """An operator's line for a pymysql error; server texts that may quote sent values are left out."""
    code = exc.args[0] if exc.args else ""
    if code == _NO_SUCH_TABLE:
        return f"mysql {operation} failed: a table is missing (run `laibao db init`)"
    detail = ""
    if isinstance(exc, _MESSAGE_SAFE) and len(exc.args) > 1:
        # connection-level errors (refused, access denied, gone away) name the server, never a value
        detail = f": {str(exc.args[1])[:200]}"
    return f"mysql {operation} failed: {type(exc).__name__} {code}{detail}"


class UserSettings(Protocol):
    """What ``open_user_store`` reads from the configuration (``laibao.config.Config`` has it)."""

    @property
    def mysql_url(self) -> str:
        """The MySQL URL, or "" for in-process records."""
        ...

    @property
    def secret_key(self) -> str:
        """Base64 of the 32-byte key for secrets at rest, or ""."""
        ...


def secret_key_bytes(key: str) -> bytes | None:
    """The 32-byte AES-GCM key for secrets at rest, or None when ``key`` is not base64 of 32 bytes."""
    try:
        raw = base64.b64decode(key, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == 32 else None


def open_user_store(config: UserSettings) -> UserStore:
    """MySQL when ``mysql_url`` is set (with the secret key when configured), else in-process."""
    if not config.mysql_url:
        return MemoryUserStore()
    key = secret_key_bytes(config.secret_key) if config.secret_key else None
    return MySQLUserStore(config.mysql_url, key)

