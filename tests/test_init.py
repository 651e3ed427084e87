"""`laibao init` writes a first .env that `laibao serve` accepts; a first run without one says what to do."""

from __future__ import annotations

import asyncio
import base64
import fcntl
import io
import os
import pty
import stat
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from laibao.cli import main
from laibao.config import load_config
from laibao.crypto import WeComCrypto
from tests.difystub import DifyStub


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAIBAO_")}
    env["PYTHONWARNINGS"] = "error"
    return env


async def laibao(cwd: Path, *args: str) -> tuple[int, str, str]:
    """Run the laibao command in ``cwd`` with no terminal (stdin is /dev/null); exit status, stdout, stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "laibao.cli", *args, cwd=cwd, env=_env(),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def _controlling_terminal() -> None:
    # Runs in the child after setsid: make the pty on stdin its controlling terminal, as a login shell's is,
    # so getpass reads the key from /dev/tty without echo.
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


async def laibao_on_terminal(cwd: Path, answers: list[tuple[str, str]], *args: str) -> tuple[int, str]:
    """Run the laibao command on a pseudo-terminal, typing each answer once its prompt shows; status, output."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(  # noqa: ASYNC220 - the child is polled below without blocking the loop
        [sys.executable, "-m", "laibao.cli", *args], cwd=cwd, env=_env(), stdin=slave, stdout=slave, stderr=slave,
        start_new_session=True, preexec_fn=_controlling_terminal,
    )
    os.close(slave)
    os.set_blocking(master, False)
    output, pending = b"", list(answers)
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            try:
                chunk = os.read(master, 4096)
            except BlockingIOError:
                chunk = b""
            except OSError:  # EIO: the child closed the terminal
                if proc.poll() is not None:
                    break
                chunk = b""
            output += chunk
            if pending and pending[0][0].encode() in output:
                os.write(master, pending.pop(0)[1].encode() + b"\n")
            if not chunk:
                if proc.poll() is not None and not pending:
                    break
                await asyncio.sleep(0.02)
        assert proc.poll() is not None, f"laibao init still waits; output so far:\n{output.decode(errors='replace')}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        os.close(master)
    return proc.returncode, output.decode(errors="replace")


@pytest.mark.gen_test(timeout=90)
async def test_init_writes_a_working_env_and_checks_dify(stub: DifyStub, tmp_path: Path) -> None:
    status, out, err = await laibao(tmp_path, "init", "--dify-url", stub.base_url, "--dify-key", "app-test-key")
    assert status == 0, err
    env_file = tmp_path / ".env"
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600  # it holds the keys
    config = load_config(environ={}, dotenv=str(env_file))  # exactly what `laibao serve` reads there
    bot = config.bots[0]
    assert (bot.dify_url, bot.dify_key, bot.path) == (stub.base_url, "app-test-key", "/wecom/callback")
    WeComCrypto(bot.token, bot.aes_key)  # a usable Token and 43-character EncodingAESKey
    assert len(base64.b64decode(config.secret_key)) == 32
    # Dify was asked with the app key, and the user is told what to paste into WeCom's console.
    info = stub.calls("GET", "/v1/info")
    assert len(info) == 1 and info[0].headers["Authorization"] == "Bearer app-test-key"
    assert "dify (environment bot): ok, app mode chat" in out
    assert "https://<this server's public address>/wecom/callback" in out
    assert bot.token in out and bot.aes_key in out
    assert "app-test-key" not in out + err  # the Dify key is not echoed

    # Never overwritten without --force; with it, the keys are new.
    before = env_file.read_text()
    status, out, err = await laibao(tmp_path, "init", "--dify-url", stub.base_url, "--dify-key", "app-test-key")
    assert status == 2 and "exists and is kept; --force replaces it" in err
    assert env_file.read_text() == before
    status, _, err = await laibao(tmp_path, "init", "--force", "--dify-url", stub.base_url, "--dify-key",
                                  "app-test-key")
    assert status == 0, err
    again = load_config(environ={}, dotenv=str(env_file)).bots[0]
    assert again.token != bot.token and again.aes_key != bot.aes_key
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    assert os.listdir(tmp_path) == [".env"]  # no temporary file left behind


@pytest.fixture
def bare(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working directory, no LAIBAO_* in the environment, and no terminal on stdin."""
    monkeypatch.chdir(tmp_path)
    for name in [k for k in os.environ if k.startswith("LAIBAO_")]:
        monkeypatch.delenv(name)
    monkeypatch.setattr(sys, "stdin", io.StringIO())
    return tmp_path


def test_init_refuses_bad_input_and_writes_nothing(bare: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # No terminal to ask on: the missing flag is named.
    assert main(["init", "--dify-url", "http://127.0.0.1:9/v1"]) == 2
    assert "--dify-key required (no terminal to ask on)" in capsys.readouterr().err
    # A URL that is not Dify's API base: the same check `laibao serve` makes.
    assert main(["init", "--dify-url", "http://127.0.0.1:9", "--dify-key", "app-test-key"]) == 2
    assert "LAIBAO_DIFY_URL: must be Dify's API base ending in /v1" in capsys.readouterr().err
    assert main(["init", "--dify-url", "http://127.0.0.1:9/v1", "--dify-key", "app key # x"]) == 2
    assert "LAIBAO_DIFY_KEY: must be one word" in capsys.readouterr().err
    assert os.listdir(bare) == []


def test_a_first_run_without_configuration_points_to_init(bare: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "laibao: no configuration here (no .env, no LAIBAO_* variables): run `laibao init` (or `make init`) "
        "to write a first .env"]
    # Once there is configuration, a problem in it is reported without the first-run hint.
    (bare / ".env").write_text("LAIBAO_WECOM_TOKEN=x\n")
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert "LAIBAO_WECOM_AES_KEY: required" in err and "laibao init" not in err


@pytest.mark.gen_test(timeout=90)
async def test_init_with_a_key_dify_refuses_keeps_the_env_and_says_what_to_fix(stub: DifyStub, tmp_path: Path) -> None:
    status, out, err = await laibao(tmp_path, "init", "--dify-url", stub.base_url, "--dify-key", "app-wrong")
    assert status == 1
    assert "dify (environment bot): FAILED" in out and "401" in out
    assert "correct LAIBAO_DIFY_URL / LAIBAO_DIFY_KEY" in err and "laibao check" in err
    # The keys are kept: fixing the Dify key does not force new WeCom keys on the admin.
    assert load_config(environ={}, dotenv=str(tmp_path / ".env")).bots[0].dify_key == "app-wrong"


@pytest.mark.gen_test(timeout=90)
async def test_init_asks_on_a_terminal(stub: DifyStub, tmp_path: Path) -> None:
    status, output = await laibao_on_terminal(
        tmp_path, [("Dify API base URL", stub.base_url), ("Dify app API key", "app-test-key")], "init")
    assert status == 0, output
    assert "app-test-key" not in output  # the key is typed without echo
    assert load_config(environ={}, dotenv=str(tmp_path / ".env")).bots[0].dify_key == "app-test-key"
    assert len(stub.calls("GET", "/v1/info")) == 1
