"""The one frozen configuration object, read once at start-up.

Precedence: command-line flags > environment (``LAIBAO_*``, then a ``.env`` file) > TOML file > defaults.
Every problem found is reported on its own line (``ConfigError.problems``); secrets never appear in them.
"""

from __future__ import annotations

import os
import re
import socket
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints
from urllib.parse import urlsplit

from laibao.crypto import WeComCrypto
from laibao.errors import ConfigError, CryptoError
from laibao.outbound import HostAllowlist
from stores.connection import parse_url as parse_redis_url
from stores.keys import Keys
from stores.numbers import ascii_digits
from stores.users import secret_key_bytes

ENV_PREFIX = "LAIBAO_"
BOT_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
DEFAULT_PLACEHOLDER = "正在思考…"
DEFAULT_DENIED = "抱歉，你还没有使用这个机器人的权限，请联系管理员开通。"
DEFAULT_WS_URL = "wss://openws.work.weixin.qq.com"


@dataclass(frozen=True)
class BotConfig:
    """One WeCom bot and the Dify app behind it."""

    name: str = field(metadata={"env": None})  # "" for the environment's bot, served at /wecom/callback
    token: str = field(repr=False, metadata={"env": "WECOM_TOKEN"})
    aes_key: str = field(repr=False, metadata={"env": "WECOM_AES_KEY"})
    dify_url: str
    dify_key: str = field(repr=False)
    receive_id: str = field(default="", metadata={"env": "WECOM_RECEIVE_ID"})
    placeholder: str = DEFAULT_PLACEHOLDER
    conversation_ttl: float = 7 * 24 * 3600.0
    auth: Literal["open", "allowlist", "token"] = field(default="open", metadata={"env": "AUTH_MODE"})
    auth_forward: Literal["header", "input"] = "header"  # token mode: Bearer header, or a Dify inputs variable
    auth_input_name: str = "token"
    denied_text: str = DEFAULT_DENIED
    group_scope: Literal["user", "chat"] = "user"  # a Dify conversation per user in a group, or one per group
    think: Literal["show", "hide"] = "show"  # <think> reasoning shown through WeCom's collapsible rendering, or hidden
    welcome: str = ""  # enter_chat text; "" = Dify's opening statement and suggested questions
    new_words: tuple[str, ...] = ("/new", "新对话", "新会话")
    stop_words: tuple[str, ...] = ("/stop", "停止", "停")
    help_words: tuple[str, ...] = ("/help", "帮助")
    help_text: str = ""
    # callback: WeCom posts to us; websocket: one process holds a long connection
    mode: Literal["callback", "websocket"] = field(default="callback", metadata={"env": "WECOM_MODE"})
    # websocket mode: the bot's BotID and Secret instead of Token and EncodingAESKey
    bot_id: str = field(default="", metadata={"env": "WECOM_BOT_ID"})
    secret: str = field(default="", repr=False, metadata={"env": "WECOM_BOT_SECRET"})
    ws_url: str = field(default=DEFAULT_WS_URL, metadata={"env": "WECOM_WS_URL"})

    @property
    def websocket(self) -> bool:
        """True when the bot runs in long-connection mode (no callbacks)."""
        return self.mode == "websocket"

    @property
    def path(self) -> str:
        """The callback path WeCom is configured with for this bot."""
        return "/wecom/callback" + (f"/{self.name}" if self.name else "")

    @property
    def key(self) -> str:
        """The bot's name inside store keys (never empty)."""
        return self.name or "default"


@dataclass(frozen=True)
class Config:
    """Everything the service needs, validated."""

    bots: tuple[BotConfig, ...] = field(metadata={"setting": False})  # from the environment and [[bots]]
    host: str = "0.0.0.0"  # noqa: S104 - a service behind a load balancer listens on all interfaces
    port: int = 8000
    node_id: str = ""
    redis_url: str = field(default="", repr=False)
    redis_prefix: str = "laibao"  # the first part of every key laibao owns (not the authorization:* ones)
    redis_sentinel_password: str = field(default="", repr=False)  # the sentinels' own password, if they have one
    mysql_url: str = field(default="", repr=False)
    log_level: str = "INFO"
    dify_connect_timeout: float = 10.0
    dify_idle_timeout: float = 90.0
    dify_total_timeout: float = 1200.0
    http_max_clients: int = 1000
    redis_pool_size: int = 50  # connections per process; a burst waits for one instead of failing
    redis_pool_timeout: float = 5.0  # seconds to wait for a free connection before the call fails
    max_relays: int = 400  # live answers per process; past it a message waits, unowned, for room elsewhere
    event_loop: Literal["uvloop", "asyncio"] = "uvloop"
    lease: float = 15.0
    stream_ttl: float = 1800.0
    msgid_ttl: float = 3600.0
    stream_window: float = 360.0  # WeCom polls a stream for 6 minutes from the user's message
    window_margin: float = 20.0  # finish the stream this long before the window closes
    flush_interval: float = 0.1
    flush_bytes: int = 1024
    max_body_bytes: int = 1024 * 1024
    idle_connection_timeout: float = 30.0  # a client connection idle (or sending its headers) this long is closed
    body_timeout: float = 10.0  # a request body not complete within this many seconds closes the connection
    log_content: bool = False  # message and answer text in logs (debugging only)
    max_clock_skew: float = 600.0  # callbacks whose timestamp is further from now are refused
    shutdown_grace: float = 20.0
    shutdown_delay: float = 2.0  # after SIGTERM keep accepting this long: load balancers see /readyz 503 first
    auth_url: str = ""
    auth_timeout: float = 5.0
    auth_admit_timeout: float = 0.5  # the callback path waits at most this long for a user's record
    auth_code_field: str = "code"
    auth_secret_field: str = "secret"  # noqa: S105 - a JSON field name, not a secret
    auth_token_field: str = "token"  # noqa: S105 - a JSON field name, not a secret
    auth_ttl_field: str = "expires_in"
    auth_default_ttl: float = 3600.0
    auth_max_ttl: float = 86400.0  # a longer token lifetime from the auth service is cut to this
    secret_key: str = field(default="", repr=False)
    token_cache_ttl: float = 30.0
    token_cache_size: int = 10000
    media_hold_seconds: float = 300.0
    media_max_bytes: int = 20 * 1024 * 1024
    response_url_retries: int = 3
    turn_wait: float = 1800.0  # longest a message waits for the one ahead in its conversation
    max_answer_bytes: int = 512 * 1024  # raw Dify text kept per answer (hidden reasoning included)
    media_deadline: float = 120.0  # seconds for one answer's media step (downloads and uploads, or images)
    media_memory_bytes: int = 256 * 1024 * 1024  # media bytes held in memory at once on one process
    delivery_sweep: float = 10.0  # seconds between looks for response_url deliveries a dead process left
    # Where URLs from outside may point; empty = WeCom's own hosts (laibao.outbound). Entries are host,
    # host:port or *.domain; hosts listed here may resolve to private addresses.
    wecom_media_hosts: tuple[str, ...] = ()
    response_url_hosts: tuple[str, ...] = ()
    dify_file_hosts: tuple[str, ...] = ()  # besides each bot's Dify origin
    ws_push_interval: float = 0.5  # at most one stream frame per stream this often (long-connection mode)
    ws_lease: float = 15.0  # the connection holder's Redis lease; a dead holder is replaced after it
    ws_ping_interval: float = 30.0
    ws_displaced_backoff: float = 300.0  # after another client took the bot's connection, wait this long
    api_key: str = field(default="", repr=False)  # bearer of POST /api/send; unset = endpoint off

    @cached_property
    def node(self) -> str:
        """This process's name in sessions and logs."""
        return self.node_id or f"{socket.gethostname()}:{self.port}"


Parser = Callable[[Any], Any]


def _str(raw: Any) -> str:
    if not isinstance(raw, str):
        raise ValueError(raw)
    return raw


def _int(raw: Any) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int | str):
        raise ValueError(raw)
    if not ascii_digits(str(raw).strip().removeprefix("-"), 18):
        raise ValueError(raw)
    return int(raw)


def _float(raw: Any) -> float:
    if isinstance(raw, bool):
        raise ValueError(raw)
    return float(raw)


def _bool(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)


def _words(raw: Any) -> tuple[str, ...]:
    """A list of words: a TOML array of strings, or a comma-separated string from the environment."""
    items = raw.split(",") if isinstance(raw, str) else raw
    if not isinstance(items, list | tuple) or not all(isinstance(item, str) for item in items):
        raise ValueError(raw)
    return tuple(item.strip() for item in items if item.strip())


def _choice(*options: str) -> Parser:
    def parse(raw: Any) -> str:
        if raw not in options:
            raise ValueError(raw)
        return str(raw)

    parse.__doc__ = "one of " + ", ".join(options)
    return parse


_KINDS: dict[Parser, str] = {
    _str: "a string", _int: "an integer", _float: "a number", _bool: "true or false",
    _words: "a list of words (comma-separated)",
}

def _parser(annotation: Any) -> Parser:
    """The parser of a setting, from its type: str, int, float, bool, a tuple of words, or a Literal choice."""
    if get_origin(annotation) is Literal:
        return _choice(*get_args(annotation))
    if get_origin(annotation) is tuple:
        return _words
    return {str: _str, int: _int, float: _float, bool: _bool}[annotation]


def _parsers(cls: type) -> dict[str, Parser]:
    """Every setting of a config dataclass, in declaration order, with the parser its type implies."""
    hints = get_type_hints(cls)
    return {f.name: _parser(hints[f.name]) for f in fields(cls) if f.metadata.get("setting", True)}


# Each setting is declared once, as a field: its type gives its parser; a bot field's environment name
# is LAIBAO_ + the field's name in capitals unless its metadata names another ("env"; None: none).
_GLOBAL_PARSERS = _parsers(Config)  # the environment / TOML top level
_BOT_PARSERS = _parsers(BotConfig)  # a [[bots]] table
# The environment's bot: LAIBAO_WECOM_TOKEN etc. map onto BotConfig fields.
_ENV_BOT = {env: f.name for f in fields(BotConfig) if (env := f.metadata.get("env", f.name.upper()))}
_BOT_REQUIRED = ("token", "aes_key", "dify_url", "dify_key")
_WS_BOT_REQUIRED = ("bot_id", "secret", "dify_url", "dify_key")


def read_dotenv(path: Path) -> dict[str, str]:
    """Parse a ``.env`` file: ``KEY=VALUE`` lines, ``#`` comments, optional ``export`` and quotes."""
    values: dict[str, str] = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        key = key.strip().removeprefix("export ").strip()
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key] = value
    return values


def load_config(
    *,
    config_file: str | None = None,
    environ: Mapping[str, str] | None = None,
    dotenv: str | None = ".env",
    overrides: Mapping[str, Any] | None = None,
    require_bots: bool = True,
) -> Config:
    """Build the validated Config from flags (``overrides``), environment, ``.env``, TOML and defaults.

    ``require_bots=False`` is for commands that only reach the databases (``laibao db``/``users``).
    """
    problems: list[str] = []
    env: dict[str, str] = {}
    if dotenv and Path(dotenv).is_file():
        env.update(read_dotenv(Path(dotenv)))
    env.update(os.environ if environ is None else environ)

    toml: dict[str, Any] = {}
    if config_file:
        try:
            toml = tomllib.loads(Path(config_file).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError([f"--config {config_file}: cannot read ({exc.strerror})"]) from exc
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError([f"--config {config_file}: not valid TOML ({exc})"]) from exc

    values: dict[str, Any] = {}
    for name, parse in _GLOBAL_PARSERS.items():
        for source, raw in (
            ("flag --" + name.replace("_", "-"), (overrides or {}).get(name)),
            (ENV_PREFIX + name.upper(), env.get(ENV_PREFIX + name.upper())),
            (f"{config_file}: {name}", toml.get(name)),
        ):
            if raw is None or raw == "":
                continue
            try:
                values[name] = _coerce(parse, raw)
            except ValueError:
                problems.append(f"{source}: expected {_kind(parse)}, got {_shown(name, raw)}")
            break

    bots: list[BotConfig] = []
    env_bot = {
        field_name: env[ENV_PREFIX + var] for var, field_name in _ENV_BOT.items() if env.get(ENV_PREFIX + var)
    }
    if env_bot:
        bots.extend(_build_bot({"name": "", **env_bot}, "environment", problems, env_names=True))
    toml_bots = toml.get("bots", [])
    if not isinstance(toml_bots, list) or not all(isinstance(b, dict) for b in toml_bots):
        problems.append(f"{config_file}: bots must be [[bots]] tables")
        toml_bots = []
    for index, table in enumerate(toml_bots):
        bots.extend(_build_bot(table, f"{config_file}: bots[{index}]", problems, env_names=False))
    if require_bots and not bots and not problems:
        problems.extend(
            f"{ENV_PREFIX}{var}: required (or configure [[bots]] in a --config TOML file)"
            for var, name in _ENV_BOT.items()
            if name in _BOT_REQUIRED
        )
    names = [bot.name for bot in bots]
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"bots: the name {name or '(environment bot)'!r} is used more than once")

    config = Config(bots=tuple(bots), **values) if not problems else None
    if config is not None:
        problems.extend(_check_globals(config))
    if problems or config is None:
        raise ConfigError(problems)
    return config


def _build_bot(
    table: Mapping[str, Any], where: str, problems: list[str], *, env_names: bool
) -> list[BotConfig]:
    """Validate one bot's settings; append problems and return [] when unusable."""

    def label(name: str) -> str:
        if env_names:
            var = next((v for v, f in _ENV_BOT.items() if f == name), name.upper())
            return ENV_PREFIX + var
        return f"{where}.{name}"

    before = len(problems)
    values: dict[str, Any] = {}
    required = _WS_BOT_REQUIRED if table.get("mode") == "websocket" else _BOT_REQUIRED
    for key in table:
        if key not in _BOT_PARSERS:
            problems.append(f"{where}: unknown setting {key!r}")
    for name, parse in _BOT_PARSERS.items():
        raw = table.get(name)
        if raw is None or (raw == "" and name not in ("name", "welcome", "help_text")):
            if name in required:
                problems.append(f"{label(name)}: required")
            continue
        try:
            values[name] = _coerce(parse, raw)
        except ValueError:
            problems.append(f"{label(name)}: expected {_kind(parse)}, got {_shown(name, raw)}")
    if not env_names and not BOT_NAME_RE.match(str(values.get("name", ""))):
        problems.append(f"{label('name')}: required, letters, digits, '-' and '_' only")
    aes_key = values.get("aes_key")
    if isinstance(aes_key, str) and not _valid_aes_key(aes_key):
        problems.append(
            f"{label('aes_key')}: must be the 43-character EncodingAESKey (got {len(aes_key)} characters)"
        )
    dify_url = values.get("dify_url")
    if isinstance(dify_url, str):
        parts = urlsplit(dify_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            problems.append(f"{label('dify_url')}: must be an http(s) URL, got {dify_url!r}")
        elif not parts.path.rstrip("/").endswith("/v1"):
            problems.append(f"{label('dify_url')}: must be Dify's API base ending in /v1, got {dify_url!r}")
    ws_url = values.get("ws_url")
    if isinstance(ws_url, str) and (urlsplit(ws_url).scheme not in ("ws", "wss") or not urlsplit(ws_url).netloc):
        problems.append(f"{label('ws_url')}: must be a ws:// or wss:// URL, got {ws_url!r}")
    ttl = values.get("conversation_ttl")
    if isinstance(ttl, float) and ttl <= 0:
        problems.append(f"{label('conversation_ttl')}: must be positive")
    if len(problems) > before:
        return []
    values["dify_url"] = values["dify_url"].rstrip("/")
    # A websocket bot has no Token or EncodingAESKey: its BotID and Secret authenticate instead.
    values.setdefault("token", "")
    values.setdefault("aes_key", "")
    return [BotConfig(**values)]


def _check_globals(config: Config) -> list[str]:
    """Range checks on the top-level settings."""
    problems = []
    if not 0 < config.port < 65536:
        problems.append(f"port: must be 1-65535, got {config.port}")
    for f in fields(Config):
        value = getattr(config, f.name)
        if f.name != "port" and isinstance(value, int | float) and not isinstance(value, bool) and value <= 0:
            problems.append(f"{f.name}: must be positive, got {value}")
    if config.redis_url:
        try:
            parse_redis_url(config.redis_url)
        except ValueError as exc:
            problems.append(f"redis_url: {exc}")
    try:
        Keys(config.redis_prefix)
    except ValueError as exc:
        problems.append(f"redis_prefix: {exc}")
    if config.mysql_url and urlsplit(config.mysql_url).scheme != "mysql":
        problems.append("mysql_url: must start with mysql://")
    if config.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        problems.append(f"log_level: must be DEBUG, INFO, WARNING or ERROR, got {config.log_level!r}")
    modes = {bot.auth for bot in config.bots}
    if modes & {"allowlist", "token"} and not config.mysql_url:
        problems.append("mysql_url: required when a bot uses auth = allowlist or token (the user records)")
    if "token" in modes and not config.auth_url:
        problems.append("auth_url: required when a bot uses auth = token (LAIBAO_AUTH_URL)")
    if "token" in modes and not config.secret_key:
        problems.append("secret_key: required when a bot uses auth = token (it decrypts the users' secrets)")
    if config.auth_url and urlsplit(config.auth_url).scheme not in ("http", "https"):
        problems.append("auth_url: must be an http(s) URL")
    if config.secret_key and secret_key_bytes(config.secret_key) is None:
        problems.append("secret_key: must be base64 of 32 bytes (laibao gen-key prints one)")
    if config.auth_default_ttl > config.auth_max_ttl:
        problems.append("auth_default_ttl: must not exceed auth_max_ttl")
    for name in ("wecom_media_hosts", "response_url_hosts", "dify_file_hosts"):
        for entry in getattr(config, name):
            try:
                HostAllowlist(name, (entry,))
            except ValueError:
                problems.append(f"{name}: {entry!r} is not a host, host:port or *.domain")
    if config.window_margin >= config.stream_window:
        problems.append("window_margin: must be shorter than stream_window")
    if config.max_answer_bytes < 2 * 20480:
        problems.append("max_answer_bytes: must hold at least what WeCom can show (40960)")
    if config.lease < 3 * config.flush_interval:
        problems.append("lease: must be well above flush_interval")
    if any(bot.websocket for bot in config.bots) and config.ws_lease < 1.0:
        problems.append("ws_lease: must be at least 1 second (it is renewed three times per period)")
    return problems


def _valid_aes_key(key: str) -> bool:
    try:
        WeComCrypto("token", key)
    except CryptoError:
        return False
    return True


def _coerce(parse: Parser, raw: Any) -> Any:
    return parse(raw)


def _kind(parse: Parser) -> str:
    return _KINDS.get(parse) or parse.__doc__ or "a value"


def _shown(name: str, raw: Any) -> str:
    """A value fit for an error line: secrets are never echoed."""
    if name in ("token", "aes_key", "dify_key", "redis_url", "mysql_url", "secret", "api_key",
                "redis_sentinel_password"):
        return "(hidden)"
    return repr(raw)[:60]
