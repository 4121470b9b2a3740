"""File-system primitives that never leave a half-written file behind."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import shutil
import signal
import stat
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Mapping

from .errors import LockError, os_error


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

    The file keeps the mode it had; a new one gets the umask's (mkstemp alone would leave 0600).
    DURABLE=False skips the fsync, for records that need to outlive a killed process but not a
    power cut (the kernel's page cache survives the one, not the other).
    """
    tmp = _stage(path, data, mode, durable)
    try:
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise os_error(exc, path, f"write {path.name}") from None
        raise


def commit_files(writes: Mapping[Path, bytes | None]) -> None:
    """Writes (bytes) and deletions (None) as close to all-or-nothing as a file system allows:
    every new content is staged and synced beside its target first, the renames come last, so a
    failure while staging changes nothing and a kill during the renames leaves whole files only."""
    staged: list[tuple[str, Path]] = []
    try:
        for path, data in writes.items():
            if data is not None:
                staged.append((_stage(path, data, None, True), path))
    except BaseException:
        for tmp, _ in staged:
            Path(tmp).unlink(missing_ok=True)
        raise
    for tmp, path in staged:
        os.replace(tmp, path)
    for path, data in writes.items():
        if data is None:
            path.unlink(missing_ok=True)


def _stage(path: Path, data: bytes, mode: int | None, durable: bool) -> str:
    """DATA in a temporary file beside PATH with the mode PATH has (or a new file would get)."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if mode is None:
            mode = mode_for(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        return tmp
    except BaseException as exc:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        if isinstance(exc, OSError):
            raise os_error(exc, path, f"write {path.name}") from None
        raise


def mode_for(path: Path) -> int:
    """The mode a rewrite of PATH gets: the one it has, else what the umask gives a new file."""
    try:
        return path.stat().st_mode & 0o7777
    except FileNotFoundError:
        return 0o666 & ~_umask()


def _umask() -> int:
    """The process umask; reading it means setting it, so it is put straight back."""
    current = os.umask(0o022)
    os.umask(current)
    return current


@contextlib.contextmanager
def locked(path: Path, what: str, *, wait: bool = False) -> Iterator[None]:
    """An exclusive lock; the holder's PID is in the file to tell the user who it is. Without
    WAIT a held lock is an error naming its holder; with it we queue behind the holder (for
    cache entries, where the other process is making what we want).

    Opened without following a symlink and never truncated before it is ours: a link planted at
    the lock path must not make us overwrite its target. The file (and the folder, when the lock
    made it) goes away on every exit, so a failed command leaves nothing behind.
    """
    made = not path.parent.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = _open_lock(path, what, wait)
    except OSError as exc:
        raise os_error(exc, Path(exc.filename) if exc.filename else path, f"lock {what}") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)
        if made:
            with contextlib.suppress(OSError):
                os.rmdir(path.parent)


def _open_lock(path: Path, what: str, wait: bool) -> int:
    """The locked descriptor of PATH. Retried when the file was removed between our open and our
    lock (its holder finished): a lock on an unlinked file would lock nothing."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise LockError(f"the lock of {what} is a symbolic link", where=str(path),
                                hint="remove the link; stackbuild never writes through one") from None
            raise
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise LockError(f"the lock of {what} is not a regular file", where=str(path),
                                hint="remove it; stackbuild creates its own lock file")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                raise LockError(
                    f"another stackbuild (pid {holder}) is working on {what}",
                    where=str(path),
                    hint="wait for it to finish; the lock goes away with its process",
                ) from None
            try:
                same = os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
        except BaseException:
            os.close(fd)
            raise
        if same:
            return fd
        os.close(fd)


@contextlib.contextmanager
def publishing(final: Path, what: str, ready: Callable[[Path], bool]) -> Iterator[Path | None]:
    """A shared cache entry (a folder) made once, whole, by one process at a time.

    Yields None when READY(FINAL) already holds: nothing to do. Otherwise yields an empty staging
    folder beside FINAL; when the block ends without an error the staging folder replaces FINAL in
    one rename (an incomplete FINAL a killed run left is moved aside and removed first). An error
    or a kill leaves FINAL as it was and only a hidden `.stage-*` folder behind, which the next
    publisher of the same entry removes. A lock beside FINAL makes a second process wait for the
    first and then find the entry made; READY is checked again under the lock for that reason.
    """
    if ready(final):
        yield None
        return
    parent = final.parent
    with locked(parent / f".{final.name}.lock", what, wait=True):
        if ready(final):
            yield None
            return
        for stale in parent.glob(f".{final.name}.stage-*"):
            shutil.rmtree(stale, ignore_errors=True)
        try:
            staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.stage-", dir=parent))
        except OSError as exc:
            raise os_error(exc, parent, f"stage {what}") from None
        try:
            yield staging
            os.chmod(staging, 0o777 & ~_umask())  # mkdtemp's 0700 would hide a shared cache from its group
            if final.exists() or final.is_symlink():
                aside = Path(tempfile.mkdtemp(prefix=f".{final.name}.stage-", dir=parent))
                os.replace(final, aside / "old")
            os.replace(staging, final)
        except OSError as exc:
            raise os_error(exc, final, f"publish {what}") from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            for stale in parent.glob(f".{final.name}.stage-*"):
                shutil.rmtree(stale, ignore_errors=True)


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
