"""File-system primitives that never leave a half-written file behind."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import signal
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import LockError


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    """In blocks: wheels and sdists run to hundreds of MB."""
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write(path: Path, data: bytes, *, mode: int | None = None, durable: bool = True) -> None:
    """Write beside the target, fsync, then rename: readers see the old or the new file, never half.
    DURABLE=False skips the fsync, for records that need to outlive a killed process but not a
    power cut (the kernel's page cache survives the one, not the other)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        elif path.exists():
            os.chmod(tmp, path.stat().st_mode & 0o7777)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def locked(path: Path, what: str) -> Iterator[None]:
    """An exclusive, non-blocking lock; the holder's PID is in the file to tell the user who it is."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise LockError(
                f"another stackbuild (pid {holder}) is working on {what}",
                where=str(path),
                hint="wait for it to finish; the lock goes away with its process",
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


_shielded = False


def shielded() -> bool:
    """True inside `deferred_interrupts`: child processes must not see a terminal's Ctrl-C either."""
    return _shielded


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold Ctrl-C/SIGTERM during the few calls that move refs, then deliver it once they are done.

    A terminal's Ctrl-C goes to the whole foreground process group, so git children started
    meanwhile run in a session of their own (see git.git) and finish their checkout.
    """
    global _shielded
    pending: list[int] = []

    def hold(signum: int, _frame: object) -> None:
        pending.append(signum)

    try:
        previous = {s: signal.signal(s, hold) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: signals cannot be caught here anyway
        yield
        return
    _shielded = True
    try:
        yield
    finally:
        _shielded = False
        for s, handler in previous.items():
            signal.signal(s, handler)
        if pending:
            if pending[0] == signal.SIGINT:
                raise KeyboardInterrupt
            os.kill(os.getpid(), pending[0])
