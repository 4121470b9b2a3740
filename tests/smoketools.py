"""Shared setup for the smoke tests: hermetic settings, stack files, process checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from builder.config import parse_config
from builder.settings import Settings

HERE = Path(__file__).resolve().parent
FAKESERVER = HERE / "fakeserver.py"
REPO = HERE.parent


def hermetic_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STACKBUILD_")}
    env.update({"HOME": str(tmp_path / "home"), "XDG_CONFIG_HOME": str(tmp_path / "home" / ".config"),
                "STACKBUILD_CACHE": str(tmp_path / "cache"), "STACKBUILD_RESULTS": str(tmp_path / "results"),
                "STACKBUILD_DIST": str(tmp_path / "dist"), "STACKBUILD_WORK": str(tmp_path / "work")})
    return env


def settings_for(tmp_path: Path, cache: Path | None = None) -> Settings:
    return Settings(cache_dir=cache or tmp_path / "cache", work_dir=tmp_path / "work", dist_dir=tmp_path / "dist",
                    results_dir=tmp_path / "results")


def fake_stack(tmp_path: Path, *, server_flags: str = "", extra: str = "", pidfile: Path | None = None,
               canaries: str | None = None) -> Path:
    """A stack.toml whose server is tests/fakeserver.py, run by this interpreter on the host."""
    flags = [f'"{f}"' for f in server_flags.split()]
    if pidfile:
        flags += ['"--pidfile"', f'"{pidfile}"']
    canaries = canaries if canaries is not None else """
[[stacks.fake.smoke.canaries]]
name = "plain"
prompt = "Return only the number 42"
max_tokens = 8
expect_tokens = 8

[[stacks.fake.smoke.canaries]]
name = "chat-stream"
prompt = "Copy the target word: lantern"
chat = true
stream = true
max_tokens = 6
expect_tokens = 6
"""
    text = f"""
[smoke]
runtime = "host"
python = "{sys.executable}"
wheels = false
model = "fake-model"
ready_timeout = 20
request_timeout = 20
concurrency = 3
command = ["{{python}}", "{FAKESERVER}", {", ".join(flags)}]
expect_version = {{ version = "0.0.fake" }}

[smoke.bench]
requests = 6
concurrency = 2
prompt_tokens = 32
max_tokens = 12

[stacks.fake]
{extra}
{canaries}
"""
    path = tmp_path / "stack.toml"
    path.write_text(text)
    return path


def load(path: Path):
    return parse_config(path.read_text(), path)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def pids_from(pidfile: Path) -> list[int]:
    data = json.loads(pidfile.read_text())
    return [p for p in (data["server"], data["child"]) if p]


def wait_for(predicate, timeout: float = 20.0, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return False


def cli(args: list[str], env: dict[str, str], **kw) -> subprocess.Popen:
    """`stackbuild ARGS` as a real process."""
    return subprocess.Popen([sys.executable, "-m", "builder.cli", *args], env=env, cwd=str(REPO), **kw)
