"""Hermetic tests: every test gets its own HOME, cache, git identity and dates."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import NoReturn

import pytest

# tests/test_require_guard.py runs pytest on small suites of its own to prove the skip guard below.
pytest_plugins = ["pytester"]

FIXED_DATE = "1700000000 +0000"
# CI sets these so that a tier it paid for cannot quietly skip.
REQUIRE_VARS = ("STACKBUILD_REQUIRE_DOCKER", "STACKBUILD_REQUIRE_VLLM")


def required(var: str) -> bool:
    """Whether VAR demands its tier: set to anything but empty or "0"."""
    return os.environ.get(var, "") not in ("", "0")


def unavailable(var: str, reason: str) -> NoReturn:
    """Skip for REASON, or fail when VAR says this tier must run."""
    if required(var):
        pytest.fail(f"{var} is set but {reason}")
    pytest.skip(reason)


class _SkipGuard:
    """Any skip (of a test or a whole module) fails the run while a REQUIRE variable is set.

    A skip nobody asked for is how a paid-for tier silently stops running: the per-test
    `unavailable` calls cover the known ones, this covers every other skip.
    """

    def __init__(self, demanded: list[str]) -> None:
        self.demanded = demanded
        self.skipped: list[tuple[str, str]] = []

    def _note(self, report: pytest.CollectReport | pytest.TestReport) -> None:
        if report.skipped and not hasattr(report, "wasxfail"):
            longrepr = report.longrepr
            reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
            self.skipped.append((report.nodeid, reason.removeprefix("Skipped: ")))

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        self._note(report)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self._note(report)

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self.demanded and self.skipped and session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        if self.demanded and self.skipped:
            terminalreporter.section("skips refused", sep="=", red=True)
            for nodeid, reason in self.skipped:
                terminalreporter.line(f"{nodeid}: {reason}")
            verb = "is" if len(self.demanded) == 1 else "are"
            terminalreporter.line(f"{len(self.skipped)} skipped while {' and '.join(self.demanded)} {verb} set: failing the run")


def pytest_configure(config: pytest.Config) -> None:
    # A shell without job control starts background jobs with SIGINT ignored (POSIX, "Signals"),
    # and an ignored signal stays ignored across exec: every CLI the Ctrl-C tests start would
    # then shrug off their SIGINT. A handler of our own is reset to the default at exec.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    config.pluginmanager.register(_SkipGuard([var for var in REQUIRE_VARS if required(var)]), "stackbuild-skip-guard")


@pytest.fixture(autouse=True)
def hermetic(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path_factory.mktemp("home")
    for key in list(os.environ):
        if key.startswith(("GIT_", "STACKBUILD_")) and key not in (*REQUIRE_VARS, "STACKBUILD_VLLM_VENV", "STACKBUILD_BASE_IMAGE",
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
