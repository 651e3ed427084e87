"""Configuration: precedence, one clear line per problem, no secret in any message."""

from __future__ import annotations

from pathlib import Path

import pytest

from laibao.cli import main
from laibao.config import load_config
from laibao.errors import ConfigError

KEY = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"
ENV = {
    "LAIBAO_WECOM_TOKEN": "tok-secret-123",
    "LAIBAO_WECOM_AES_KEY": KEY,
    "LAIBAO_DIFY_URL": "http://dify.internal/v1/",
    "LAIBAO_DIFY_KEY": "app-secret-key",
}


def problems_of(**kwargs: object) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(dotenv=None, **kwargs)  # type: ignore[arg-type]
    return info.value.problems


def test_environment_bot_and_defaults() -> None:
    config = load_config(environ=ENV, dotenv=None)
    (bot,) = config.bots
    assert bot.path == "/wecom/callback"
    assert bot.key == "default"
    assert bot.dify_url == "http://dify.internal/v1"
    assert (config.host, config.port, config.redis_url, config.lease) == ("0.0.0.0", 8000, "", 15.0)
    assert config.node.endswith(":8000")


def test_nothing_configured_names_each_required_variable() -> None:
    problems = problems_of(environ={})
    assert problems == [
        "LAIBAO_WECOM_TOKEN: required (or configure [[bots]] in a --config TOML file)",
        "LAIBAO_WECOM_AES_KEY: required (or configure [[bots]] in a --config TOML file)",
        "LAIBAO_DIFY_URL: required (or configure [[bots]] in a --config TOML file)",
        "LAIBAO_DIFY_KEY: required (or configure [[bots]] in a --config TOML file)",
    ]


def test_malformed_values_one_line_each_and_no_secrets() -> None:
    env = dict(ENV, LAIBAO_WECOM_AES_KEY="short-secret", LAIBAO_DIFY_URL="ftp://x", LAIBAO_PORT="eighty",
               LAIBAO_REDIS_URL="http://user:redis-secret@h")
    problems = problems_of(environ=env)
    assert len(problems) == 3, problems  # the bot's two problems + the port; redis checked once the rest is valid
    text = "\n".join(problems)
    assert "LAIBAO_WECOM_AES_KEY: must be the 43-character EncodingAESKey (got 12 characters)" in text
    assert "LAIBAO_DIFY_URL: must be an http(s) URL" in text
    assert "LAIBAO_PORT: expected an integer, got 'eighty'" in text
    assert "short-secret" not in text and "redis-secret" not in text
    problems = problems_of(environ=dict(ENV, LAIBAO_REDIS_URL="http://user:redis-secret@h"))
    assert problems == ["redis_url: must start with redis://, rediss://, unix://, redis+sentinel:// or redis+cluster://"]
    for url, problem in (
        ("redis+sentinel://:redis-secret@h1:26379", "a sentinel URL ends in /master_name or /master_name/db"),
        ("redis+sentinel://h1:26379/mymaster/zero", "the database must be a number, not 'zero'"),
        ("redis+cluster://:redis-secret@h1:7000,h2/0", "each node must be host:port, not 'h2'"),
        ("redis+cluster://h1:7000/1", "a cluster URL has no path: Redis Cluster has database 0 only"),
    ):
        problems = problems_of(environ=dict(ENV, LAIBAO_REDIS_URL=url))
        assert problems == [f"redis_url: {problem}"]
        assert "redis-secret" not in "".join(problems)
    for prefix in ("a{b}", "has space"):
        assert problems_of(environ=dict(ENV, LAIBAO_REDIS_PREFIX=prefix)) == [
            "redis_prefix: the Redis key prefix must be non-empty, without braces or whitespace"]


def test_numbers_are_ascii_digits_only() -> None:
    # "²" and "٣" pass str.isdigit() but not int(); 5000 digits pass neither int() nor a sane setting
    for port in ("²", "٣", "9" * 5000, "--5"):
        (problem,) = problems_of(environ=dict(ENV, LAIBAO_PORT=port))
        assert problem.startswith("LAIBAO_PORT: expected an integer, got ")  # the value is cut when long
    for url, problem in (("redis+sentinel://h1:26379/mymaster/²", "the database must be a number, not '²'"),
                         ("redis+cluster://h1:7000,h2:٧٠٠١", "each node must be host:port, not 'h2:٧٠٠١'")):
        assert problems_of(environ=dict(ENV, LAIBAO_REDIS_URL=url)) == [f"redis_url: {problem}"]


def test_dify_url_must_be_the_api_base() -> None:
    assert problems_of(environ=dict(ENV, LAIBAO_DIFY_URL="https://dify.example.com")) == [
        "LAIBAO_DIFY_URL: must be Dify's API base ending in /v1, got 'https://dify.example.com'"
    ]


def test_precedence_flags_over_env_over_dotenv_over_toml(tmp_path: Path) -> None:
    toml = tmp_path / "laibao.toml"
    toml.write_text('port = 7001\nhost = "127.0.0.2"\nlease = 20\nnode_id = "from-toml"\n')
    dotenv = tmp_path / ".env"
    dotenv.write_text('# comment\nexport LAIBAO_PORT="7002"\nLAIBAO_LEASE=30\n' + "".join(
        f"{k}={v}\n" for k, v in ENV.items()))
    config = load_config(config_file=str(toml), environ={"LAIBAO_LEASE": "40"}, dotenv=str(dotenv),
                         overrides={"port": 7004})
    assert config.port == 7004  # flag
    assert config.lease == 40.0  # environment beats .env
    assert config.host == "127.0.0.2"  # only in TOML
    assert config.node == "from-toml"
    config = load_config(config_file=str(toml), environ={}, dotenv=str(dotenv))
    assert (config.port, config.lease) == (7002, 30.0)  # .env beats TOML


def test_toml_bots(tmp_path: Path) -> None:
    toml = tmp_path / "laibao.toml"
    toml.write_text(
        f'[[bots]]\nname = "hr"\ntoken = "t1"\naes_key = "{KEY}"\ndify_url = "http://d/v1"\ndify_key = "k1"\n'
        f'placeholder = "稍等"\n'
        f'[[bots]]\nname = "it"\ntoken = "t2"\naes_key = "{KEY}"\ndify_url = "http://d/v1"\ndify_key = "k2"\n'
    )
    config = load_config(config_file=str(toml), environ={}, dotenv=None)
    assert [(b.name, b.path, b.placeholder) for b in config.bots] == [
        ("hr", "/wecom/callback/hr", "稍等"), ("it", "/wecom/callback/it", "正在思考…")]


def test_toml_problems(tmp_path: Path) -> None:
    toml = tmp_path / "laibao.toml"
    toml.write_text(
        '[[bots]]\nname = "bad name"\ntoken = "t"\naes_key = "x"\ndify_url = "http://d/v1"\ncolour = 1\n'
        '[[bots]]\nname = "ok"\ntoken = "t"\n'
    )
    problems = problems_of(config_file=str(toml), environ={})
    where = f"{toml}: bots"
    assert f"{where}[0]: unknown setting 'colour'" in problems
    assert f"{where}[0].dify_key: required" in problems
    assert f"{where}[0].name: required, letters, digits, '-' and '_' only" in problems
    assert f"{where}[0].aes_key: must be the 43-character EncodingAESKey (got 1 characters)" in problems
    assert f"{where}[1].aes_key: required" in problems
    broken = tmp_path / "broken.toml"
    broken.write_text("port = = 1")
    assert problems_of(config_file=str(broken), environ={})[0].startswith(f"--config {broken}: not valid TOML")
    assert problems_of(config_file=str(tmp_path / "missing.toml"), environ={})[0].startswith(
        f"--config {tmp_path / 'missing.toml'}: cannot read")


def test_serve_with_missing_settings_exits_2_with_one_line_each(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)  # no .env here
    for name in list(__import__("os").environ):
        if name.startswith("LAIBAO_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("LAIBAO_WECOM_TOKEN", "tok")
    assert main(["serve"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "laibao: config: LAIBAO_WECOM_AES_KEY: required",
        "laibao: config: LAIBAO_DIFY_URL: required",
        "laibao: config: LAIBAO_DIFY_KEY: required",
    ]


def test_gen_key_prints_a_usable_pair(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["gen-key"]) == 0
    lines = dict(line.split("=", 1) for line in capsys.readouterr().out.splitlines())
    env = dict(ENV, LAIBAO_WECOM_TOKEN=lines["LAIBAO_WECOM_TOKEN"], LAIBAO_WECOM_AES_KEY=lines["LAIBAO_WECOM_AES_KEY"])
    assert load_config(environ=env, dotenv=None).bots[0].aes_key == lines["LAIBAO_WECOM_AES_KEY"]


def test_auth_modes_need_their_backends() -> None:
    assert problems_of(environ=dict(ENV, LAIBAO_AUTH_MODE="token")) == [
        "mysql_url: required when a bot uses auth = allowlist or token (the user records)",
        "auth_url: required when a bot uses auth = token (LAIBAO_AUTH_URL)",
        "secret_key: required when a bot uses auth = token (it decrypts the users' secrets)",
    ]
    assert problems_of(environ=dict(ENV, LAIBAO_AUTH_MODE="sometimes")) == [
        "LAIBAO_AUTH_MODE: expected one of open, allowlist, token, got 'sometimes'"]
    config = load_config(environ=dict(ENV, LAIBAO_AUTH_MODE="allowlist", LAIBAO_MYSQL_URL="mysql://u:p@h/db"),
                         dotenv=None)
    assert config.bots[0].auth == "allowlist"


def test_token_cache_settings_are_read(tmp_path: Path) -> None:
    defaults = load_config(environ=ENV, dotenv=None)
    assert (defaults.token_cache_ttl, defaults.token_cache_size) == (30.0, 10000)  # the README's
    config = load_config(environ={**ENV, "LAIBAO_TOKEN_CACHE_TTL": "45", "LAIBAO_TOKEN_CACHE_SIZE": "500"}, dotenv=None)
    assert (config.token_cache_ttl, config.token_cache_size) == (45.0, 500)
    toml = tmp_path / "laibao.toml"
    toml.write_text("token_cache_ttl = 5\n")
    assert load_config(config_file=str(toml), environ=ENV, dotenv=None).token_cache_ttl == 5.0
    assert any("LAIBAO_TOKEN_CACHE_TTL" in p for p in problems_of(environ={**ENV, "LAIBAO_TOKEN_CACHE_TTL": "soon"}))
