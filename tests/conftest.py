"""Hermetic tests: every test gets its own HOME, cache, git identity and dates."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

FIXED_DATE = "1700000000 +0000"


@pytest.fixture(autouse=True)
def hermetic(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path_factory.mktemp("home")
    for key in list(os.environ):
        if key.startswith(("GIT_", "STACKBUILD_")) and key not in ("STACKBUILD_REQUIRE_DOCKER", "STACKBUILD_REQUIRE_VLLM",
                                                                  "STACKBUILD_VLLM_VENV", "STACKBUILD_BASE_IMAGE",
                                                                  "STACKBUILD_WHEELHOUSE", "STACKBUILD_TEST_CACHE"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / ".cache"))
    monkeypatch.setenv("STACKBUILD_CACHE", str(home / "cache"))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    monkeypatch.setenv("GIT_AUTHOR_NAME", "Test Author")
    monkeypatch.setenv("GIT_AUTHOR_EMAIL", "author@example.invalid")
    monkeypatch.setenv("GIT_COMMITTER_NAME", "Test Committer")
    monkeypatch.setenv("GIT_COMMITTER_EMAIL", "committer@example.invalid")
    monkeypatch.setenv("GIT_AUTHOR_DATE", FIXED_DATE)
    monkeypatch.setenv("GIT_COMMITTER_DATE", FIXED_DATE)
    return home


def sh(*args: str | Path, cwd: Path | None = None, input: bytes | None = None, check: bool = True) -> str:
    proc = subprocess.run([str(a) for a in args], cwd=cwd, input=input, capture_output=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed: {proc.stderr.decode(errors='replace')}")
    return proc.stdout.decode(errors="replace")


class Upstream:
    """A small upstream repository the test owns, with helpers to commit files and cut patches."""

    def __init__(self, path: Path):
        self.path = path
        path.mkdir(parents=True)
        sh("git", "init", "-q", "-b", "main", cwd=path)

    def write(self, files: dict[str, bytes | str | None]) -> None:
        for name, content in files.items():
            target = self.path / name
            if content is None:
                target.unlink()
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content.encode() if isinstance(content, str) else content)

    def commit(self, files: dict[str, bytes | str | None], message: str = "change") -> str:
        self.write(files)
        sh("git", "add", "-A", cwd=self.path)
        sh("git", "commit", "-q", "--allow-empty", "-m", message, cwd=self.path)
        return self.head()

    def head(self) -> str:
        return sh("git", "rev-parse", "HEAD", cwd=self.path).strip()

    def diff(self, files: dict[str, bytes | str | None], *extra: str) -> bytes:
        """A `git diff` of FILES against HEAD, leaving the repository unchanged."""
        self.write(files)
        sh("git", "add", "-A", cwd=self.path)
        data = subprocess.run(["git", "diff", "--cached", "--full-index", *extra], cwd=self.path,
                              capture_output=True, check=True).stdout
        sh("git", "reset", "-q", "--hard", "HEAD", cwd=self.path)
        sh("git", "clean", "-qfd", cwd=self.path)
        return data

    def format_patch(self, files: dict[str, bytes | str | None], subject: str) -> bytes:
        """A `git format-patch` mail of FILES as one commit on HEAD, leaving HEAD where it was."""
        base = self.head()
        self.commit(files, subject)
        data = subprocess.run(["git", "format-patch", "--stdout", "--full-index", "-1", "HEAD"], cwd=self.path,
                              capture_output=True, check=True).stdout
        sh("git", "reset", "-q", "--hard", base, cwd=self.path)
        return data


@pytest.fixture
def upstream(tmp_path: Path) -> Upstream:
    return Upstream(tmp_path / "upstream")


def write_project(root: Path, stack_toml: str, patches: dict[str, bytes | str] | None = None) -> Path:
    """A project folder with stack.toml and patch files (keys are paths relative to the root)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "stack.toml").write_text(stack_toml)
    for rel, content in (patches or {}).items():
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content.encode() if isinstance(content, str) else content)
    return root / "stack.toml"
