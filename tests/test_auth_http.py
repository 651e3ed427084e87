"""Who may talk to the bot, through the real HTTP path: real MariaDB, real Redis, the auth stand-in.

The callback path never waits on the auth service: a test locks the users table to play a slow database.

What WeCom shows, what Dify received (which bearer, which inputs), and how many sign-ins were made.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import aiomysql
import pytest
import redis.asyncio as aioredis
from tornado.ioloop import IOLoop

from laibao import texts
from laibao.config import DEFAULT_DENIED, DEFAULT_PLACEHOLDER
from stores.users import MySQLUserStore, User
from tests.authstub import SECRET_KEY, AuthStub
from tests.difystub import DifyStub, Script
from tests.harness import (
    Cluster,
    Service,
    WeCom,
    assert_no_secrets,
    eventually,
    follow,
    message,
    running_cluster,
    running_service,
)

SECRET = "zhangsan-secret-6f1c"
ACCOUNTS = {"E1001": SECRET, "E1002": "lisi-secret-83ad"}


class Revocable(set[str]):
    """Dify's per-user token check: accepts what the auth service issued and was not revoked."""

    def __init__(self, auth: AuthStub) -> None:
        super().__init__()
        self.auth = auth
        self.revoked: set[str] = set()
        self.refuse_all = False

    def __contains__(self, token: object) -> bool:
        return not self.refuse_all and token in self.auth.issued and token not in self.revoked


@dataclass
class Secured:
    auth: AuthStub
    svc: Service
    revocable: Revocable

    def bearers(self) -> list[str]:
        """The Authorization header of every chat call Dify received, without "Bearer "."""
        return [c.headers["Authorization"].removeprefix("Bearer ") for c in self.svc.dify.chat_calls]


def seed_users(io_loop: IOLoop, mysql_url: str) -> None:
    async def seed() -> None:
        users = MySQLUserStore(mysql_url, base64.b64decode(SECRET_KEY))
        await users.init_schema()
        await users.add(User("zhangsan", name="张三", code="E1001", secret=SECRET))
        await users.add(User("lisi", name="李四", code="E1002", secret="lisi-secret-83ad", enabled=False))
        await users.close()

    io_loop.run_sync(seed)


def auth_settings(auth: AuthStub, mysql_url: str, mode: str, **more: str) -> dict[str, str]:
    return {"auth_mode": mode, "auth_url": auth.url, "mysql_url": mysql_url, "secret_key": SECRET_KEY,
            "auth_timeout": "1", **more}


@pytest.fixture
def secured(request: pytest.FixtureRequest, io_loop: IOLoop, mysql_url: str, redis_url: str) -> Iterator[Secured]:
    """laibao with the auth mode of the ``settings`` marker (token by default)."""
    seed_users(io_loop, mysql_url)
    auth = AuthStub(accounts=ACCOUNTS)
    io_loop.run_sync(auth.start)
    marker = request.node.get_closest_marker("settings")
    extra = dict(marker.kwargs) if marker else {}
    mode = extra.pop("auth_mode", "token")
    try:
        with running_service(io_loop, redis_url, **auth_settings(auth, mysql_url, mode, **extra)) as svc:
            revocable = Revocable(auth)
            svc.dify.user_tokens = revocable
            yield Secured(auth, svc, revocable)
    finally:
        io_loop.run_sync(auth.stop)


async def ask(svc: Service, text: str, user: str = "zhangsan") -> str:
    """The final content WeCom shows for a message."""
    first = await svc.wecom.stream(message(text, user=user))
    if first["finish"]:
        return str(first["content"])
    return str((await follow([svc.wecom], str(first["id"])))[-1]["content"])


@pytest.mark.gen_test(timeout=30)
async def test_token_mode_forwards_the_users_token_and_signs_in_once(secured: Secured) -> None:
    svc = secured.svc
    assert await ask(svc, "第一问") == svc.dify.default.answer
    assert await ask(svc, "第二问") == svc.dify.default.answer
    (token,) = secured.auth.issued
    assert secured.bearers() == [token, token]
    assert len(secured.auth.calls) == 1
    assert secured.auth.calls[0].json == {"code": "E1001", "secret": SECRET}
    metrics = (await svc.wecom.http.fetch(svc.wecom.base_url + "/metrics")).body.decode()
    assert 'laibao_auth_resolutions_total{level="service"} 1.0' in metrics
    assert 'laibao_auth_resolutions_total{level="process"}' in metrics
    redis = aioredis.Redis.from_url(svc.redis_url, decode_responses=True)
    assert await redis.get("authorization:wechatid:zhangsan") == token
    assert await redis.exists(f"authorization:token:{token}")
    await redis.aclose()


@pytest.mark.settings(auth_forward="input", auth_input_name="user_token")
@pytest.mark.gen_test(timeout=30)
async def test_token_mode_can_forward_the_token_as_a_dify_input(secured: Secured) -> None:
    await ask(secured.svc, "问题")
    (call,) = secured.svc.dify.chat_calls
    assert call.headers["Authorization"] == "Bearer app-test-key"
    assert call.json["inputs"] == {"user_token": secured.auth.issued[0]}


@pytest.mark.gen_test(timeout=30)
async def test_a_refused_token_is_dropped_and_the_user_signs_in_again_once(secured: Secured) -> None:
    svc = secured.svc
    await ask(svc, "第一问")
    first = secured.auth.issued[0]
    secured.revocable.revoked.add(first)  # the token expired at the gateway
    assert await ask(svc, "第二问") == svc.dify.default.answer
    second = secured.auth.issued[1]
    assert secured.bearers() == [first, first, second]
    # Refused every time: one re-sign-in, then a clear message.
    secured.revocable.refuse_all = True
    assert await ask(svc, "第三问") == texts.SIGN_IN_FAILED
    assert len(secured.auth.calls) == 3


@pytest.mark.gen_test(timeout=30)
async def test_sign_in_failures_get_a_short_message_and_cache_nothing(secured: Secured) -> None:
    svc = secured.svc
    secured.auth.answer.status = 500
    assert await ask(svc, "问题") == texts.SIGN_IN_FAILED
    secured.auth.answer.status = 200
    secured.auth.answer.garbage = True
    assert await ask(svc, "问题") == texts.SIGN_IN_FAILED
    await secured.auth.stop()  # down
    assert await ask(svc, "问题") == texts.SIGN_IN_FAILED
    assert svc.dify.chat_calls == []
    redis = aioredis.Redis.from_url(svc.redis_url, decode_responses=True)
    assert await redis.keys("authorization:*") == []
    await redis.aclose()
    assert (await svc.wecom.http.fetch(svc.wecom.base_url + "/healthz")).code == 200


@pytest.mark.gen_test(timeout=30)
async def test_unknown_or_disabled_users_are_told_whom_to_ask(secured: Secured) -> None:
    assert await ask(secured.svc, "我能用吗", user="stranger") == DEFAULT_DENIED
    assert await ask(secured.svc, "我能用吗", user="lisi") == DEFAULT_DENIED
    assert secured.svc.dify.chat_calls == [] and secured.auth.calls == []


@pytest.mark.settings(auth_mode="allowlist", denied_text="请找 IT 部开通权限。")
@pytest.mark.gen_test(timeout=30)
async def test_allowlist_mode(secured: Secured) -> None:
    svc = secured.svc
    assert await ask(svc, "你好") == svc.dify.default.answer
    assert secured.bearers() == ["app-test-key"]
    assert await ask(svc, "你好", user="lisi") == "请找 IT 部开通权限。"
    assert await ask(svc, "你好", user="stranger") == "请找 IT 部开通权限。"
    assert len(svc.dify.chat_calls) == 1 and secured.auth.calls == []


@pytest.mark.gen_test(timeout=30)
async def test_no_secret_or_token_in_the_logs(secured: Secured, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    await ask(secured.svc, "机密")
    secured.revocable.revoked.add(secured.auth.issued[0])
    await ask(secured.svc, "机密二")
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "stream" in logged
    assert_no_secrets(logged, SECRET, SECRET_KEY, *secured.auth.issued, "机密")


# ------------------------------------------------------------------------------------ two processes

@pytest.fixture
def token_cluster(
    io_loop: IOLoop, mysql_url: str, redis_url: str, tmp_path: Path
) -> Iterator[tuple[Cluster, AuthStub]]:
    # DEBUG: the tests watch the processes hear invalidations
    with auth_cluster(io_loop, mysql_url, redis_url, tmp_path, LAIBAO_LOG_LEVEL="DEBUG") as running:
        yield running


@contextmanager
def auth_cluster(io_loop: IOLoop, mysql_url: str, redis_url: str, tmp_path: Path, delay: float = 0.0,
                 **env: str) -> Iterator[tuple[Cluster, AuthStub]]:
    """Two processes in token mode, and the auth stand-in answering after ``delay`` seconds."""
    seed_users(io_loop, mysql_url)
    auth = AuthStub(accounts=ACCOUNTS)
    auth.answer.delay = delay
    io_loop.run_sync(auth.start)
    settings = {f"LAIBAO_{k.upper()}": v for k, v in auth_settings(auth, mysql_url, "token").items()}
    try:
        with running_cluster(io_loop, redis_url, tmp_path, **settings, **env) as cluster:
            yield cluster, auth
    finally:
        io_loop.run_sync(auth.stop)


@pytest.mark.slow
@pytest.mark.gen_test(timeout=60)
async def test_a_token_refused_on_one_process_is_dropped_on_every_process(
    token_cluster: tuple[Cluster, AuthStub],
) -> None:
    cluster, auth = token_cluster
    dify: DifyStub = cluster.dify
    revocable = Revocable(auth)
    dify.user_tokens = revocable
    to_a, to_b = cluster.wecom(cluster.a), cluster.wecom(cluster.b)
    await follow([to_a], str((await to_a.stream(message("A 上的第一问")))["id"]))  # A signs in: T1 cached on A
    await follow([to_b], str((await to_b.stream(message("B 上的问题")))["id"]))  # B finds T1 in Redis
    first = auth.issued[0]
    revocable.revoked.add(first)
    await follow([to_b], str((await to_b.stream(message("B 上的第二问")))["id"]))  # 401 on B: drop, sign in: T2
    second = auth.issued[1]
    # B's invalidation travels to A over Redis pub/sub: A's next message must not race it
    await eventually(lambda: "dropping the local token of zhangsan" in cluster.a.log(), "A hears B's invalidation")
    polls = await follow([to_a], str((await to_a.stream(message("A 上的第二问")))["id"]))
    assert polls[-1]["content"] == dify.default.answer
    bearers = [c.headers["Authorization"].removeprefix("Bearer ") for c in dify.chat_calls]
    # A used T2 straight away: its cached T1 was dropped by B's invalidation, so no 401 and no third sign-in.
    assert bearers == [first, first, first, second, second]
    assert len(auth.calls) == 2
    for proc in (cluster.a, cluster.b):
        assert_no_secrets(proc.log(), SECRET, first, second)


# --------------------------------------------- sign-in never holds up the callback (nothing outside laibao)
def event(kind: str, user: str = "zhangsan", chatid: str = "", **body: Any) -> dict[str, Any]:
    """A WeCom event callback from ``user`` (in group ``chatid`` when given)."""
    payload: dict[str, Any] = {"msgid": f"ev-{kind}-{user}-{id(body)}", "aibotid": "AIBOT",
                               "chattype": "group" if chatid else "single", "from": {"userid": user},
                               "msgtype": "event", "event": {"eventtype": kind, **body}}
    if chatid:
        payload["chatid"] = chatid
    return payload


async def first_reply(wecom: WeCom, payload: dict[str, Any]) -> dict[str, Any]:
    """The stream of the reply WeCom gets to its callback."""
    return await wecom.stream(payload)


@asynccontextmanager
async def users_table_locked(mysql_url: str) -> AsyncIterator[None]:
    """Hold a write lock on the users table: every read of a user record waits until it is released."""
    url = urlsplit(mysql_url)
    conn = await aiomysql.connect(host=url.hostname or "127.0.0.1", port=url.port or 3306,
                                  user=unquote(url.username or ""), password=unquote(url.password or ""),
                                  db=url.path.lstrip("/"))
    try:
        async with conn.cursor() as cursor:
            await cursor.execute("LOCK TABLES users WRITE")
        yield
        async with conn.cursor() as cursor:
            await cursor.execute("UNLOCK TABLES")
    finally:
        conn.close()


async def metrics(svc: Service) -> str:
    return (await svc.wecom.http.fetch(svc.wecom.base_url + "/metrics")).body.decode()


# ------------------------------------------------------------------------------------ two processes

@pytest.fixture
def stalling_cluster(
    io_loop: IOLoop, mysql_url: str, redis_url: str, tmp_path: Path
) -> Iterator[tuple[Cluster, AuthStub]]:
    """Two processes in token mode (sign-in timeout 1 s) in front of an auth service that stalls 10 s."""
    with auth_cluster(io_loop, mysql_url, redis_url, tmp_path, delay=10.0) as running:
        yield running


@pytest.mark.slow
@pytest.mark.gen_test(timeout=60)
async def test_a_stalled_auth_service_gets_the_placeholder_and_the_sign_in_message_follows(
    stalling_cluster: tuple[Cluster, AuthStub],
) -> None:
    cluster, auth = stalling_cluster
    to_a, to_b = cluster.wecom(cluster.a), cluster.wecom(cluster.b)
    first = await first_reply(to_a, message("第一问"))
    # Before this fix the reply waited for the sign-in and came back finished with the failure.
    assert first["finish"] is False and first["content"] == DEFAULT_PLACEHOLDER
    await eventually(lambda: len(auth.calls) == 1, "the answer job asks the auth service")
    polls = await follow([to_b], str(first["id"]))  # the other process shows the outcome
    assert polls[-1]["content"] == texts.SIGN_IN_FAILED
    assert cluster.dify.chat_calls == []


# ------------------------------------------------------------------------------------ one process

@pytest.mark.settings(auth_timeout="8")
@pytest.mark.gen_test(timeout=40)
async def test_a_slow_auth_service_still_answers_with_its_token(secured: Secured) -> None:
    svc = secured.svc
    secured.auth.answer.delay = 3.0
    first = await first_reply(svc.wecom, message("慢慢来"))
    assert first["finish"] is False and first["content"] == DEFAULT_PLACEHOLDER
    polls = await follow([svc.wecom], str(first["id"]), limit=800)
    assert polls[-1]["content"] == svc.dify.default.answer
    assert secured.bearers() == secured.auth.issued and len(secured.auth.issued) == 1
    text = await metrics(svc)
    assert 'laibao_callback_reply_seconds_count{kind="text"} 1.0' in text
    assert 'laibao_callback_reply_seconds_count{kind="stream"}' in text


@pytest.mark.settings(auth_mode="allowlist")
@pytest.mark.gen_test(timeout=40)
async def test_a_slow_user_database_gets_the_placeholder_and_the_answer_job_decides(
    secured: Secured, mysql_url: str
) -> None:
    svc = secured.svc
    async with users_table_locked(mysql_url):
        allowed = await first_reply(svc.wecom, message("你好"))
        refused = await first_reply(svc.wecom, message("你好", user="lisi"))
        command = await first_reply(svc.wecom, message("/help", user="wangwu"))
        # Nobody could be decided while the table is locked: each got the placeholder, none a verdict.
        for reply in (allowed, refused, command):
            assert reply["finish"] is False and reply["content"] == DEFAULT_PLACEHOLDER
    assert (await follow([svc.wecom], str(allowed["id"])))[-1]["content"] == svc.dify.default.answer
    assert (await follow([svc.wecom], str(refused["id"])))[-1]["content"] == DEFAULT_DENIED
    assert (await follow([svc.wecom], str(command["id"])))[-1]["content"] == DEFAULT_DENIED
    assert len(svc.dify.chat_calls) == 1
    assert 'laibao_auth_admissions_total{outcome="undecided"} 3.0' in await metrics(svc)
    # Decided once, the next message of each is answered from the per-process cache at once.
    again = await first_reply(svc.wecom, message("/help", user="lisi"))
    assert again["finish"] is True and again["content"] == DEFAULT_DENIED


async def add_user(mysql_url: str, user: User) -> None:
    users = MySQLUserStore(mysql_url, base64.b64decode(SECRET_KEY))
    await users.add(user)
    await users.close()


@pytest.mark.settings(auth_mode="allowlist", group_scope="chat")
@pytest.mark.gen_test(timeout=40)
async def test_commands_and_feedback_need_an_allowed_user_and_their_own_answer(
    secured: Secured, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    svc = secured.svc
    held = asyncio.Event()
    svc.dify.push(Script(answer="群里的回答", deltas=["群里的", "回答"], hold=held, ping_every=0.2))
    first = await first_reply(svc.wecom, message("群里提问", chatid="G1", chattype="group"))
    sid = str(first["id"])
    # lisi is disabled, stranger unknown: neither may stop or reset the group's conversation.
    for user in ("lisi", "stranger"):
        for word in ("/stop", "/new"):
            reply = await first_reply(svc.wecom, message(word, user=user, chatid="G1", chattype="group"))
            assert reply["finish"] is True and reply["content"] == DEFAULT_DENIED
    assert await svc.wecom.post(event("enter_chat", user="lisi")) == {
        "msgtype": "text", "text": {"content": DEFAULT_DENIED}}
    held.set()
    polls = await follow([svc.wecom], sid)
    assert polls[-1]["content"] == "群里的回答"  # not stopped
    assert svc.dify.stops == []
    # The conversation was not reset: the next question continues it.
    await follow([svc.wecom], str((await first_reply(svc.wecom, message("再问", chatid="G1",
                                                                             chattype="group")))["id"]))
    conversation = svc.dify.chat_calls[1].json["conversation_id"]
    assert conversation and svc.dify.calls("DELETE", f"/v1/conversations/{conversation}") == []

    # Ratings: lisi (disabled) is refused; in a group sharing one conversation, zhangsan may rate.
    await svc.wecom.post(event("feedback_event", user="lisi", chatid="G1", feedback_event={"id": sid, "type": 2}))
    await eventually(lambda: any("may not use the bot" in r.getMessage() for r in caplog.records),
                     "the disabled user's rating is refused")
    await svc.wecom.post(event("feedback_event", user="zhangsan", chatid="G1",
                               feedback_event={"id": sid, "type": 1}))
    await eventually(lambda: len(svc.dify.feedbacks) == 1, "the allowed member's rating reaches Dify")
    assert svc.dify.feedbacks[0]["rating"] == "like"


@pytest.mark.settings(auth_mode="allowlist")
@pytest.mark.gen_test(timeout=40)
async def test_only_the_answers_user_may_rate_it_in_a_single_chat(
    secured: Secured, mysql_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    svc = secured.svc
    await add_user(mysql_url, User("wangwu", name="王五"))
    sid = str((await first_reply(svc.wecom, message("我的问题")))["id"])
    await follow([svc.wecom], sid)
    await svc.wecom.post(event("feedback_event", user="wangwu", feedback_event={"id": sid, "type": 2}))
    await eventually(lambda: any("of another user ignored" in r.getMessage() for r in caplog.records),
                     "another user's rating is ignored")
    await svc.wecom.post(event("feedback_event", user="zhangsan", feedback_event={"id": sid, "type": 1}))
    await eventually(lambda: len(svc.dify.feedbacks) == 1, "the answer's user's rating reaches Dify")
    assert svc.dify.feedbacks[0]["user"] == "wecom:zhangsan"
