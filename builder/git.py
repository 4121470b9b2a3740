"""Running git: one small wrapper, and a long-lived `cat-file --batch` reader.

Plain subprocess rather than GitPython's wrapper: the apply engine's budget is a few hundred
milliseconds for hundreds of patches, and per-call overhead is what it is measured by.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import threading
from pathlib import Path
from typing import Mapping, Sequence

from .errors import SourceError, StackbuildError
from .fsutil import shielded

# Identity and dates are fixed so equal inputs give equal commits, whoever runs the tool.
IDENTITY = "stackbuild"
EMAIL = "stackbuild@invalid"
EPOCH = "946684800 +0000"  # 2000-01-01T00:00:00Z


def base_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "GIT_TERMINAL_PROMPT": "0",
        "LC_ALL": "C",
        "GIT_AUTHOR_NAME": IDENTITY, "GIT_AUTHOR_EMAIL": EMAIL, "GIT_AUTHOR_DATE": EPOCH,
        "GIT_COMMITTER_NAME": IDENTITY, "GIT_COMMITTER_EMAIL": EMAIL, "GIT_COMMITTER_DATE": EPOCH,
    })
    if extra:
        env.update(extra)
    return env


def _die_with_parent(parent: int) -> None:
    """A shielded child runs in its own session (a terminal's Ctrl-C must not stop a checkout
    halfway), so a SIGKILL of our process group would not reach it: the kernel kills it when we
    die instead, and a re-run never races a checkout still writing (prctl PR_SET_PDEATHSIG)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # we died before prctl took effect
        os._exit(137)


def git(args: Sequence[str], *, git_dir: Path | None = None, cwd: Path | None = None, input: bytes | None = None,
        env: Mapping[str, str] | None = None, check: bool = True, error: type[StackbuildError] = SourceError,
        where: str | None = None, hint: str | None = None) -> subprocess.CompletedProcess:
    cmd = ["git"]
    if git_dir is not None:
        cmd.append(f"--git-dir={git_dir}")
    cmd.extend(args)
    shield = shielded()
    parent = os.getpid()
    proc = subprocess.run(cmd, cwd=cwd, input=input, env=base_env(env), capture_output=True,
                          start_new_session=shield, preexec_fn=(lambda: _die_with_parent(parent)) if shield else None)
    if check and proc.returncode != 0:
        detail = proc.stderr.decode(errors="replace").strip().splitlines()
        raise error(f"git {args[0]} failed: {detail[-1] if detail else f'exit {proc.returncode}'}",
                    where=where or str(git_dir or cwd or "."), hint=hint)
    return proc


def out(args: Sequence[str], **kw) -> str:
    return git(args, **kw).stdout.decode().strip()


class CatFile:
    """Reads many objects through one process; a process per blob would dominate apply time."""

    def __init__(self, git_dir: Path):
        self.proc = subprocess.Popen(["git", f"--git-dir={git_dir}", "cat-file", "--batch"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=base_env())

    def read(self, spec: str) -> bytes | None:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(spec.encode() + b"\n")
        self.proc.stdin.flush()
        header = self.proc.stdout.readline()
        if header.endswith(b" missing\n") or header.endswith(b" ambiguous\n"):
            return None
        size = int(header.split()[2])
        data = self.proc.stdout.read(size)
        self.proc.stdout.read(1)
        return data

    def read_many(self, specs: list[str]) -> dict[str, bytes | None]:
        """One pipelined round trip for many objects: requests are written by a thread while the
        answers are read, so neither pipe can fill up and stall the other."""
        assert self.proc.stdin and self.proc.stdout
        stdin, stdout = self.proc.stdin, self.proc.stdout

        def write() -> None:
            stdin.write(b"".join(s.encode() + b"\n" for s in specs))
            stdin.flush()

        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        found: dict[str, bytes | None] = {}
        for spec in specs:
            header = stdout.readline()
            if header.endswith(b" missing\n") or header.endswith(b" ambiguous\n"):
                found[spec] = None
                continue
            size = int(header.split()[2])
            found[spec] = stdout.read(size)
            stdout.read(1)
        writer.join()
        return found

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait()

    def __enter__(self) -> "CatFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
