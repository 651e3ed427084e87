"""The user store contract on memory and on a real MariaDB, the secret at rest, and the admin CLI.

The CLI tests run ``laibao.cli.main`` against the real MariaDB (and Redis, for the invalidation that
``users disable`` / ``users remove`` publish), configured through the environment as operators do.
"""

from __future__ import annotations

import base64
import io
import json
import sys
import time
from collections.abc import Iterator

import pytest
import redis
import tornado.ioloop

from laibao import cli
from laibao.errors import StoreError
from stores.tokens import INVALIDATE_CHANNEL
from stores.users import (
    SCHEMA_VERSION,
    MemoryUserStore,
    MySQLUserStore,
    User,
    decrypt_secret,
    open_user_store,
)
from tests.authstub import SECRET_KEY, make_config
from tests.servers import MariaDBServer

KEY = base64.b64decode(SECRET_KEY)
SECRET = "pa$$-wörd-密码-🔑"  # the test user's auth secret
T0 = 1_732_500_000.0

AnyUsers = MemoryUserStore | MySQLUserStore


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(params=["memory", "mysql"])
def users(request: pytest.FixtureRequest, io_loop: tornado.ioloop.IOLoop, clock: Clock) -> Iterator[AnyUsers]:
    """Each implementation in turn; MySQL on a fresh database of the real MariaDB, schema created."""
    store: AnyUsers
    if request.param == "memory":
        store = MemoryUserStore(clock=clock)
    else:
        store = MySQLUserStore(request.getfixturevalue("mysql_url"), KEY, clock=clock)
    io_loop.run_sync(store.init_schema)
    yield store
    io_loop.run_sync(store.close)


def database_of(url: str) -> str:
    return url.rsplit("/", 1)[1]


# ------------------------------------------------------------------------------------ the contract

@pytest.mark.gen_test
async def test_add_then_get_round_trips_every_field(users: AnyUsers) -> None:
    await users.add(User("zhangsan", name="张三 😀", code="E1001", secret=SECRET, enabled=True))
    assert await users.get("zhangsan") == User(
        "zhangsan", name="张三 😀", code="E1001", secret=SECRET, enabled=True, created=T0, updated=T0
    )
    assert await users.get("lisi") is None
    assert await users.get("ZHANGSAN") is None  # the userid exactly as WeCom sends it


@pytest.mark.gen_test
async def test_add_replaces_and_keeps_created(users: AnyUsers, clock: Clock) -> None:
    await users.add(User("zhangsan", name="张三", code="E1", secret=SECRET))
    clock.now = T0 + 60
    await users.add(User("zhangsan", name="张三丰", code="E2", secret="", enabled=False))
    assert await users.get("zhangsan") == User(
        "zhangsan", name="张三丰", code="E2", secret="", enabled=False, created=T0, updated=T0 + 60
    )


@pytest.mark.gen_test
async def test_set_enabled(users: AnyUsers, clock: Clock) -> None:
    await users.add(User("zhangsan"))
    clock.now = T0 + 5
    assert await users.set_enabled("zhangsan", False) is True
    got = await users.get("zhangsan")
    assert got is not None and got.enabled is False and got.updated == T0 + 5
    assert await users.set_enabled("zhangsan", False) is True  # already disabled: still found
    assert await users.set_enabled("zhangsan", True) is True
    assert (await users.get("zhangsan")).enabled is True  # type: ignore[union-attr]
    assert await users.set_enabled("lisi", True) is False
    assert await users.get("lisi") is None


@pytest.mark.gen_test
async def test_remove(users: AnyUsers) -> None:
    await users.add(User("zhangsan"))
    await users.add(User("lisi"))
    assert await users.remove("zhangsan") is True
    assert await users.remove("zhangsan") is False
    assert await users.get("zhangsan") is None
    assert [u.userid for u in await users.list()] == ["lisi"]


@pytest.mark.gen_test
async def test_list_is_ordered_by_userid(users: AnyUsers) -> None:
    assert await users.list() == []
    for userid in ("wangwu", "lisi", "zhangsan"):
        await users.add(User(userid, name=userid.upper(), secret=SECRET if userid == "lisi" else ""))
    listed = await users.list()
    assert [u.userid for u in listed] == ["lisi", "wangwu", "zhangsan"]
    assert [u.secret for u in listed] == [SECRET, "", ""]


@pytest.mark.gen_test
async def test_userids_and_fields_that_do_not_fit_are_refused(users: AnyUsers) -> None:
    for bad in (User(""), User(" zhangsan"), User("x" * 65), User("u", name="n" * 256),
                User("u", code="c" * 256), User("u", secret="s" * 1025), User("u", secret="s\ud800")):
        with pytest.raises(ValueError) as caught:
            await users.add(bad)
        assert "sss" not in str(caught.value)
    await users.add(User("x" * 64, name="n" * 255, secret="s" * 1024))  # the limits themselves fit
    assert await users.list() == [await users.get("x" * 64)]


@pytest.mark.gen_test
async def test_init_schema_is_idempotent(users: AnyUsers) -> None:
    await users.add(User("zhangsan", secret=SECRET))
    await users.init_schema()
    await users.init_schema()
    assert (await users.get("zhangsan")).secret == SECRET  # type: ignore[union-attr]


def test_the_secret_never_shows_in_repr() -> None:
    user = User("zhangsan", name="张三", secret=SECRET)
    assert SECRET not in repr(user) and SECRET not in str(user)
    assert "张三" in repr(user)


def test_open_user_store_picks_mysql_only_when_configured(io_loop: tornado.ioloop.IOLoop) -> None:
    assert isinstance(open_user_store(make_config()), MemoryUserStore)
    store = open_user_store(make_config(mysql_url="mysql://u:p@127.0.0.1:1/laibao"))
    assert isinstance(store, MySQLUserStore)
    io_loop.run_sync(store.close)


# -------------------------------------------------------------------------------------- MySQL only

@pytest.fixture
def mysql_users(mysql_url: str, io_loop: tornado.ioloop.IOLoop) -> Iterator[MySQLUserStore]:
    store = MySQLUserStore(mysql_url, KEY)
    io_loop.run_sync(store.init_schema)
    yield store
    io_loop.run_sync(store.close)


@pytest.mark.gen_test
async def test_secret_is_encrypted_at_rest(
    mysql_users: MySQLUserStore, mysql_url: str, mariadb_server: MariaDBServer
) -> None:
    await mysql_users.add(User("zhangsan", secret=SECRET))
    await mysql_users.add(User("lisi", secret=SECRET))
    rows = dict(mariadb_server.admin(f"SELECT userid, secret FROM {database_of(mysql_url)}.users"))
    stored = str(rows["zhangsan"])
    assert SECRET not in stored and SECRET.encode() not in base64.b64decode(stored)
    assert len(base64.b64decode(stored)) == 12 + 16 + len(SECRET.encode())  # nonce | tag | ciphertext
    assert decrypt_secret(KEY, "zhangsan", stored) == SECRET
    assert rows["lisi"] != stored  # a fresh nonce each time
    with pytest.raises(ValueError):
        decrypt_secret(KEY, "lisi", stored)  # bound to its user
    with pytest.raises(ValueError):
        decrypt_secret(bytes(32), "zhangsan", stored)


@pytest.mark.gen_test
async def test_a_ciphertext_moved_to_another_row_does_not_decrypt(
    mysql_users: MySQLUserStore, mysql_url: str, mariadb_server: MariaDBServer
) -> None:
    await mysql_users.add(User("zhangsan", secret=SECRET))
    await mysql_users.add(User("lisi"))
    db = database_of(mysql_url)
    mariadb_server.admin(f"UPDATE {db}.users SET secret = (SELECT s FROM (SELECT secret AS s FROM {db}.users "
                         "WHERE userid = 'zhangsan') AS t) WHERE userid = 'lisi'")
    with pytest.raises(StoreError, match="lisi") as caught:
        await mysql_users.get("lisi")
    assert SECRET not in str(caught.value)


@pytest.mark.gen_test
async def test_wrong_or_missing_key_is_a_store_error(mysql_users: MySQLUserStore, mysql_url: str) -> None:
    await mysql_users.add(User("zhangsan", secret=SECRET))
    await mysql_users.add(User("lisi"))
    for key in (bytes(32), None):
        other = MySQLUserStore(mysql_url, key)
        try:
            with pytest.raises(StoreError, match="LAIBAO_SECRET_KEY") as caught:
                await other.get("zhangsan")
            assert SECRET not in str(caught.value)
            assert await other.get("lisi") == await mysql_users.get("lisi")  # rows without a secret read fine
        finally:
            await other.close()


@pytest.mark.gen_test
async def test_a_secret_without_a_key_is_refused(mysql_url: str) -> None:
    store = MySQLUserStore(mysql_url, None)
    try:
        await store.init_schema()
        with pytest.raises(StoreError, match="LAIBAO_SECRET_KEY") as caught:
            await store.add(User("zhangsan", secret=SECRET))
        assert SECRET not in str(caught.value)
        assert await store.get("zhangsan") is None
        await store.add(User("zhangsan", code="E1"))  # no secret: fine without a key
        assert (await store.get("zhangsan")).code == "E1"  # type: ignore[union-attr]
    finally:
        await store.close()


@pytest.mark.gen_test
async def test_schema_version_row(mysql_url: str, mariadb_server: MariaDBServer) -> None:
    store = MySQLUserStore(mysql_url, KEY)
    db = database_of(mysql_url)
    try:
        assert await store.schema_version() == 0
        with pytest.raises(StoreError, match="laibao db init"):
            await store.get("zhangsan")
        await store.init_schema()
        await store.init_schema()
        assert await store.schema_version() == SCHEMA_VERSION
        assert mariadb_server.admin(f"SELECT id, version FROM {db}.schema_version") == [(1, SCHEMA_VERSION)]
        tables = mariadb_server.admin(
            f"SELECT table_name, table_collation FROM information_schema.tables WHERE table_schema = '{db}' "
            "ORDER BY table_name")
        assert tables == [("schema_version", "utf8mb4_bin"), ("users", "utf8mb4_bin")]
        mariadb_server.admin(f"UPDATE {db}.schema_version SET version = {SCHEMA_VERSION + 1}")
        with pytest.raises(StoreError, match="knows versions up to"):
            await store.init_schema()
    finally:
        await store.close()


@pytest.mark.gen_test(timeout=30)
async def test_mysql_down_is_a_store_error(mysql_url: str, mariadb_server: MariaDBServer) -> None:
    store = MySQLUserStore(mysql_url.replace(f":{mariadb_server.port}/", ":1/"), KEY, connect_timeout=1)
    try:
        with pytest.raises(StoreError, match="mysql get failed"):
            await store.get("zhangsan")
        with pytest.raises(StoreError, match="mysql ping failed"):
            await store.ping()
    finally:
        await store.close()
    wrong = MySQLUserStore(mysql_url.replace("s3cret", "wrong"), KEY)
    try:
        with pytest.raises(StoreError, match="Access denied") as caught:
            await wrong.ping()
        assert "wrong" not in str(caught.value) and "s3cret" not in str(caught.value)
    finally:
        await wrong.close()


@pytest.mark.gen_test
async def test_store_survives_a_killed_connection(mysql_users: MySQLUserStore, mariadb_server: MariaDBServer) -> None:
    await mysql_users.add(User("zhangsan"))
    pooled = mariadb_server.admin("SELECT id FROM information_schema.processlist WHERE user = 'laibao'")
    assert pooled, "the store holds no connection to kill"
    for (conn_id,) in pooled:
        mariadb_server.admin(f"KILL {conn_id}")
    alive = {row[0] for row in mariadb_server.admin("SELECT id FROM information_schema.processlist")}
    assert not alive & {conn_id for (conn_id,) in pooled}  # every pooled connection is really gone
    # the pool notices the dead connection and opens another one instead of failing the call
    assert (await mysql_users.get("zhangsan")) is not None


# --------------------------------------------------------------------------------------------- CLI

@pytest.fixture
def env(
    monkeypatch: pytest.MonkeyPatch, tmp_path: object, mysql_url: str, redis_url: str
) -> dict[str, str]:
    """The operator's environment: the service's settings, the user database and Redis."""
    monkeypatch.chdir(tmp_path)  # type: ignore[arg-type]  # no stray .env
    config = make_config()
    values = {
        "LAIBAO_WECOM_TOKEN": config.bots[0].token,
        "LAIBAO_WECOM_AES_KEY": config.bots[0].aes_key,
        "LAIBAO_DIFY_URL": "http://127.0.0.1:9/v1",
        "LAIBAO_DIFY_KEY": "app-test-key",
        "LAIBAO_MYSQL_URL": mysql_url,
        "LAIBAO_REDIS_URL": redis_url,
        "LAIBAO_SECRET_KEY": SECRET_KEY,
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return values


def laibao(*argv: str) -> int:
    return cli.main(list(argv))


def stored(env: dict[str, str], userid: str) -> User | None:
    """The user as the service would read it."""
    import asyncio

    async def read() -> User | None:
        store = MySQLUserStore(env["LAIBAO_MYSQL_URL"], KEY)
        try:
            return await store.get(userid)
        finally:
            await store.close()

    return asyncio.run(read())


def next_message(pubsub: redis.client.PubSub, kind: str = "message") -> object:
    """The data of the next pub/sub message of ``kind`` (waiting up to 5 s)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        message = pubsub.get_message(timeout=0.5)
        if message is not None and message["type"] == kind:
            return message["data"]
    raise AssertionError(f"no {kind} message within 5 s")


def test_cli_db_init_is_idempotent(env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    assert laibao("db", "init") == 0
    assert laibao("db", "init") == 0
    out = capsys.readouterr().out
    assert f"schema version {SCHEMA_VERSION}" in out
    assert stored(env, "anyone") is None  # the tables exist


def test_cli_users_add_list_and_secret(env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    assert laibao("db", "init") == 0
    assert laibao("users", "add", "zhangsan", "--name", "张三", "--code", "E1001", "--secret", SECRET) == 0
    user = stored(env, "zhangsan")
    assert user is not None and (user.name, user.code, user.secret, user.enabled) == ("张三", "E1001", SECRET, True)
    assert laibao("users", "add", "lisi") == 0
    capsys.readouterr()
    assert laibao("users", "list") == 0
    out = capsys.readouterr().out
    assert SECRET not in out
    lines = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    assert lines["zhangsan"][1:4] == ["张三", "E1001", "enabled"] and "yes" in lines["zhangsan"]
    assert lines["lisi"][1:3] == ["-", "-"] and "no" in lines["lisi"]


def test_cli_secret_from_stdin(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert laibao("db", "init") == 0
    monkeypatch.setattr(sys, "stdin", io.StringIO(SECRET + "\n"))
    assert laibao("users", "add", "zhangsan", "--code", "E1", "--secret-stdin") == 0
    assert stored(env, "zhangsan").secret == SECRET  # type: ignore[union-attr]
    assert SECRET not in capsys.readouterr().out
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert laibao("users", "add", "lisi", "--secret-stdin") == 2
    assert stored(env, "lisi") is None


def test_cli_add_updates_only_what_is_given(env: dict[str, str]) -> None:
    assert laibao("db", "init") == 0
    assert laibao("users", "add", "zhangsan", "--name", "张三", "--code", "E1", "--secret", SECRET) == 0
    assert laibao("users", "disable", "zhangsan") == 0
    assert laibao("users", "add", "zhangsan", "--name", "张三丰") == 0
    user = stored(env, "zhangsan")
    assert user is not None
    assert (user.name, user.code, user.secret, user.enabled) == ("张三丰", "E1", SECRET, False)


def test_cli_disable_enable_remove(env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    client = redis.Redis.from_url(env["LAIBAO_REDIS_URL"], decode_responses=True)
    pubsub = client.pubsub()
    try:
        pubsub.subscribe(INVALIDATE_CHANNEL)
        assert next_message(pubsub, "subscribe") == 1  # subscribed before anything is published
        assert laibao("db", "init") == 0
        assert laibao("users", "add", "zhangsan", "--code", "E1", "--secret", SECRET) == 0
        client.set("authorization:wechatid:zhangsan", "tok-1", ex=600)
        client.set("authorization:token:tok-1", json.dumps({"userid": "zhangsan"}), ex=600)

        assert laibao("users", "disable", "zhangsan") == 0
        assert stored(env, "zhangsan").enabled is False  # type: ignore[union-attr]
        assert client.exists("authorization:wechatid:zhangsan", "authorization:token:tok-1") == 0
        assert next_message(pubsub) == "zhangsan"

        assert laibao("users", "enable", "zhangsan") == 0
        assert stored(env, "zhangsan").enabled is True  # type: ignore[union-attr]

        client.set("authorization:wechatid:zhangsan", "tok-2", ex=600)
        client.set("authorization:token:tok-2", "{}", ex=600)
        assert laibao("users", "remove", "zhangsan") == 0
        assert stored(env, "zhangsan") is None
        assert client.exists("authorization:wechatid:zhangsan", "authorization:token:tok-2") == 0
        assert next_message(pubsub) == "zhangsan"

        capsys.readouterr()
        for command in ("disable", "enable", "remove"):
            assert laibao("users", command, "nobody") == 1
        err = capsys.readouterr().err
        assert err.count("no user 'nobody'") == 3 and len(err.splitlines()) == 3
    finally:
        pubsub.close()
        client.close()


def test_cli_usage_and_configuration_errors(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert laibao("db", "init") == 0
    with pytest.raises(SystemExit) as caught:
        laibao("users", "add", "zhangsan", "--secret", "x", "--secret-stdin")
    assert caught.value.code == 2
    assert laibao("users", "add", "x" * 65) == 2
    monkeypatch.delenv("LAIBAO_SECRET_KEY")
    capsys.readouterr()
    assert laibao("users", "add", "zhangsan", "--secret", SECRET) == 2
    err = capsys.readouterr().err
    assert "LAIBAO_SECRET_KEY" in err and SECRET not in err
    assert stored(env, "zhangsan") is None
    monkeypatch.delenv("LAIBAO_MYSQL_URL")
    assert laibao("users", "list") == 2
    assert "LAIBAO_MYSQL_URL" in capsys.readouterr().err


def test_cli_database_down_is_one_line_and_status_1(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    mariadb_server: MariaDBServer,
) -> None:
    monkeypatch.setenv("LAIBAO_MYSQL_URL", env["LAIBAO_MYSQL_URL"].replace(f":{mariadb_server.port}/", ":1/"))
    assert laibao("users", "add", "zhangsan", "--secret", SECRET) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "mysql" in err and SECRET not in err


def test_cli_user_commands_need_no_bot_settings(env: dict[str, str], monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("LAIBAO_WECOM_TOKEN", "LAIBAO_WECOM_AES_KEY", "LAIBAO_DIFY_URL", "LAIBAO_DIFY_KEY"):
        monkeypatch.delenv(name)
    assert laibao("db", "init") == 0
    assert laibao("users", "add", "wangwu", "--name", "王五") == 0
    assert (stored(env, "wangwu") or User("")).name == "王五"
    assert laibao("serve") == 2  # the service itself still needs its bot
    assert "LAIBAO_WECOM_TOKEN: required" in capsys.readouterr().err
