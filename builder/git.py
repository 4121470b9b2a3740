"""Running git: the one runner every git call goes through, and a long-lived `cat-file --batch` reader.

Plain subprocess rather than GitPython's wrapper: the apply engine's budget is a few hundred
milliseconds for hundreds of patches, and per-call overhead is what it is measured by.

Every call is hermetic: no system or global git configuration (a user's `url.insteadOf`, hooks
or aliases must not change what a stack means), only the transports a stack may name (`ext::`
would run a command), and callers put `--` before every URL and path.
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
# Ends the message of every commit the replayer makes, naming its patch: export reads it back.
TRAILER = "Stackbuild-Patch"


ALLOWED_PROTOCOLS = "file:https:ssh:git"
# Set by a hook or a surrounding git command, these would point our calls at another repository.
_INHERITED_LOCATION = ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_OBJECT_DIRECTORY",
                       "GIT_ALTERNATE_OBJECT_DIRECTORIES", "GIT_NAMESPACE", "GIT_COMMON_DIR", "GIT_PREFIX",
                       "GIT_CONFIG", "GIT_CONFIG_COUNT", "GIT_CONFIG_PARAMETERS", "GIT_EXEC_PATH")


def base_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in _INHERITED_LOCATION and not k.startswith(("GIT_CONFIG_KEY_", "GIT_CONFIG_VALUE_"))}
    env.update({
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": os.devnull,
        "GIT_ALLOW_PROTOCOL": ALLOWED_PROTOCOLS,
        "GIT_TERMINAL_PROMPT": "0",
        "LC_ALL": "C",
        "GIT_AUTHOR_NAME": IDENTITY, "GIT_AUTHOR_EMAIL": EMAIL, "GIT_AUTHOR_DATE": EPOCH,
        "GIT_COMMITTER_NAME": IDENTITY, "GIT_COMMITTER_EMAIL": EMAIL, "GIT_COMMITTER_DATE": EPOCH,
    })
    if extra:
        env.update(extra)
    return env


def command(args: Sequence[str], git_dir: Path | None = None) -> list[str]:
    """The argv of a git call; with `base_env()` it is all a caller needing its own pipes uses."""
    return ["git", *([f"--git-dir={git_dir}"] if git_dir is not None else []), *args]


def operation(args: Sequence[str]) -> str:
    """The subcommand of ARGS, skipping `-c key=value` pairs: errors name what failed, not '-c'."""
    rest = list(args)
    while rest and rest[0].startswith("-"):
        rest = rest[2:] if rest[0] == "-c" else rest[1:]
    return rest[0] if rest else "command"


def _die_with_parent(parent: int) -> None:
    """A shielded child runs in its own session (a terminal's Ctrl-C must not stop a checkout
    halfway), so a SIGKILL of our process group would not reach it: the kernel kills it when we
    die instead, and a re-run never races a checkout still writing (prctl PR_SET_PDEATHSIG)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # we died before prctl took effect
        os._exit(137)


def git(args: Sequence[str], *, git_dir: Path | None = None, cwd: Path | None = None, input: bytes | None = None,
        env: Mapping[str, str] | None = None, check: bool = True, error: type[StackbuildError] = SourceError,
        where: str | None = None, hint: str | None = None, progress: bool = False) -> subprocess.CompletedProcess:
    """PROGRESS: git's stderr goes to the terminal (fetch progress) instead of being captured."""
    shield = shielded()
    parent = os.getpid()
    try:
        proc = subprocess.run(command(args, git_dir), cwd=cwd, input=input, env=base_env(env),
                              stdout=subprocess.PIPE, stderr=None if progress else subprocess.PIPE,
                              start_new_session=shield,
                              preexec_fn=(lambda: _die_with_parent(parent)) if shield else None)
    except OSError as exc:
        raise error(f"cannot run git {operation(args)}: {exc.strerror}", where=where or str(git_dir or cwd or "."),
                    hint="check that git is installed and the folder exists and is readable") from None
    if check and proc.returncode != 0:
        detail = (proc.stderr or b"").decode(errors="replace").strip().splitlines()
        raise error(f"git {operation(args)} failed: {detail[-1] if detail else f'exit {proc.returncode}'}",
                    where=where or str(git_dir or cwd or "."), hint=hint_for(proc.stderr or b"", cwd or git_dir) or hint)
    return proc


# What git's message says about the cause outranks the caller's guess at the usual one.
_CAUSES = (
    ((b"No space left on device", b"Disk quota exceeded"), "the disk is full; free space and run the command again"),
    ((b"Read-only file system",), "the file system is read-only; point STACKBUILD_CACHE or --work-dir at a writable folder"),
    ((b"Permission denied",), "check the permissions of the folder named, or use another STACKBUILD_CACHE / --work-dir"),
    ((b"invalid path", b"File name too long"),
     "a path in the tree is not valid on this file system (name, length or a case clash); it cannot be checked out here"),
)


DISK_FULL = _CAUSES[0][1]


def hint_for(stderr: bytes, place: Path | None) -> str | None:
    found = next((hint for needles, hint in _CAUSES if any(n in stderr for n in needles)), None)
    if found is None and b"unable to write" in stderr and place is not None and _nearly_full(place):
        found = DISK_FULL  # a checkout's "unable to write file" does not say why; the file system can
    return found


def _nearly_full(place: Path) -> bool:
    """Less than 1 MiB or no inode left where git was writing."""
    try:
        fs = os.statvfs(place)
    except OSError:
        return False
    return fs.f_bavail * fs.f_frsize < (1 << 20) or (fs.f_files > 0 and fs.f_favail == 0)


def fast_import(git_dir: Path, args: Sequence[str], stream: bytes) -> subprocess.CompletedProcess:
    """`git fast-import` fed STREAM (ARGS: options and the subcommand). A failed import leaves a
    crash report in the repository; its last lines are in stderr already, so it is removed."""
    proc = subprocess.Popen(command(args, git_dir), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=base_env())
    stdout, stderr = proc.communicate(stream)
    if proc.returncode != 0:
        (git_dir / f"fast_import_crash_{proc.pid}").unlink(missing_ok=True)
        stderr = b"".join(line for line in stderr.splitlines(keepends=True) if b"crash report" not in line)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def out(args: Sequence[str], **kw) -> str:
    return git(args, **kw).stdout.decode().strip()


class CatFile:
    """Reads many objects through one process; a process per blob would dominate apply time."""

    def __init__(self, git_dir: Path):
        self.proc = subprocess.Popen(command(["cat-file", "--batch"], git_dir), stdin=subprocess.PIPE,
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
