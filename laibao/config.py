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
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from laibao.crypto import WeComCrypto
from laibao.errors import ConfigError, CryptoError

ENV_PREFIX = "LAIBAO_"
BOT_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
DEFAULT_PLACEHOLDER = "正在思考…"


@dataclass(frozen=True)
class BotConfig:
    """One WeCom bot and the Dify app behind it."""

    name: str  # "" for the environment's bot, served at /wecom/callback
    token: str = field(repr=False)
    aes_key: str = field(repr=False)
    dify_url: str
    dify_key: str = field(repr=False)
    receive_id: str = ""
    placeholder: str = DEFAULT_PLACEHOLDER
    conversation_ttl: float = 7 * 24 * 3600.0

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

    bots: tuple[BotConfig, ...]
    host: str = "0.0.0.0"  # noqa: S104 - a service behind a load balancer listens on all interfaces
    port: int = 8000
    node_id: str = ""
    redis_url: str = field(default="", repr=False)
    mysql_url: str = field(default="", repr=False)
    log_level: str = "INFO"
    dify_connect_timeout: float = 10.0
    dify_idle_timeout: float = 90.0
    dify_total_timeout: float = 1200.0
    http_max_clients: int = 1000
    lease: float = 15.0
    stream_ttl: float = 1800.0
    msgid_ttl: float = 3600.0
    flush_interval: float = 0.1
    flush_bytes: int = 1024
    max_body_bytes: int = 1024 * 1024

    @property
    def node(self) -> str:
        """This process's name in sessions and logs."""
        return self.node_id or f"{socket.gethostname()}:{self.port}"


# Settings of Config read from the environment / TOML top level, with their parsers.
_GLOBAL_PARSERS: dict[str, Callable[[str], Any]] = {
    "host": str,
    "port": int,
    "node_id": str,
    "redis_url": str,
    "mysql_url": str,
    "log_level": str,
    "dify_connect_timeout": float,
    "dify_idle_timeout": float,
    "dify_total_timeout": float,
    "http_max_clients": int,
    "lease": float,
    "stream_ttl": float,
    "msgid_ttl": float,
    "flush_interval": float,
    "flush_bytes": int,
    "max_body_bytes": int,
}
_BOT_PARSERS: dict[str, Callable[[str], Any]] = {
    "name": str,
    "token": str,
    "aes_key": str,
    "dify_url": str,
    "dify_key": str,
    "receive_id": str,
    "placeholder": str,
    "conversation_ttl": float,
}
# The environment's bot: LAIBAO_WECOM_TOKEN etc. map onto BotConfig fields.
_ENV_BOT = {
    "WECOM_TOKEN": "token",
    "WECOM_AES_KEY": "aes_key",
    "DIFY_URL": "dify_url",
    "DIFY_KEY": "dify_key",
    "WECOM_RECEIVE_ID": "receive_id",
    "PLACEHOLDER": "placeholder",
    "CONVERSATION_TTL": "conversation_ttl",
}
_BOT_REQUIRED = ("token", "aes_key", "dify_url", "dify_key")


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
) -> Config:
    """Build the validated Config from flags (``overrides``), environment, ``.env``, TOML and defaults."""
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
    if not bots and not problems:
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
    for key in table:
        if key not in _BOT_PARSERS:
            problems.append(f"{where}: unknown setting {key!r}")
    for name, parse in _BOT_PARSERS.items():
        raw = table.get(name)
        if raw is None or (raw == "" and name != "name"):
            if name in _BOT_REQUIRED:
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
    ttl = values.get("conversation_ttl")
    if isinstance(ttl, float) and ttl <= 0:
        problems.append(f"{label('conversation_ttl')}: must be positive")
    if len(problems) > before:
        return []
    values["dify_url"] = values["dify_url"].rstrip("/")
    return [BotConfig(**values)]


def _check_globals(config: Config) -> list[str]:
    """Range checks on the top-level settings."""
    problems = []
    if not 0 < config.port < 65536:
        problems.append(f"port: must be 1-65535, got {config.port}")
    for f in fields(Config):
        value = getattr(config, f.name)
        if f.name != "port" and isinstance(value, int | float) and value <= 0:
            problems.append(f"{f.name}: must be positive, got {value}")
    if config.redis_url and urlsplit(config.redis_url).scheme not in ("redis", "rediss", "unix"):
        problems.append("redis_url: must start with redis://, rediss:// or unix://")
    if config.mysql_url and urlsplit(config.mysql_url).scheme != "mysql":
        problems.append("mysql_url: must start with mysql://")
    if config.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        problems.append(f"log_level: must be DEBUG, INFO, WARNING or ERROR, got {config.log_level!r}")
    if config.lease < 3 * config.flush_interval:
        problems.append("lease: must be well above flush_interval")
    return problems


def _valid_aes_key(key: str) -> bool:
    try:
        WeComCrypto("token", key)
    except CryptoError:
        return False
    return True


def _coerce(parse: Callable[[str], Any], raw: Any) -> Any:
    if parse is str:
        if not isinstance(raw, str):
            raise ValueError(raw)
        return raw
    if isinstance(raw, bool):
        raise ValueError(raw)
    return parse(raw)


def _kind(parse: Callable[[str], Any]) -> str:
    if parse is int:
        return "an integer"
    return "a number" if parse is float else "a string"


def _shown(name: str, raw: Any) -> str:
    """A value fit for an error line: secrets are never echoed."""
    if name in ("token", "aes_key", "dify_key", "redis_url", "mysql_url"):
        return "(hidden)"
    return repr(raw)[:60]
