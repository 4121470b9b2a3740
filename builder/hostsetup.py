"""`stackbuild setup`: make this host able to build, from nothing, as root on Debian or Ubuntu.

Two steps, each skipped when its result is already there: a Docker Engine that answers (Debian's
`docker.io` when there is no engine at all, started by systemd where it runs, detached by hand
where it does not), and a base image made without any registry (`debootstrap` from the mirror
apt already uses, then imported into the engine). The engine is reached only through the Engine
API, never a `docker` client binary: these hosts may carry a newer client earlier on PATH that
wants a buildx plugin the distribution does not ship.

Everything outside Python goes through `Commands` (argv lists, no shell) and the host's files are
read below `root`, so tests run the whole set-up against prepared roots and fake engines.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol
from urllib.parse import urlparse

import docker.errors
import requests.exceptions

from . import engine as engines
from .errors import EngineError, SetupError

DEFAULT_IMAGE = "stackbuild/base:bookworm"
DEFAULT_SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEFAULT_LOG = "/var/log/stackbuild-dockerd.log"
PID_FILE = "/var/run/docker.pid"
# What the CPU recipe's image needs on top of minbase: a venv-capable Python and a C toolchain.
INCLUDE = ("ca-certificates", "python3", "python3-pip", "python3-venv", "python3-dev", "gcc", "libc6-dev")
# Packages of Docker's own distribution: their containerd.io conflicts with docker.io's containerd.
DOCKER_CE = ("docker-ce", "docker-ce-cli", "containerd.io", "moby-engine")
ENGINE_WAIT_S = 60.0
# A root shell from plain `su` lacks the sbin folders, where dockerd and debootstrap live.
SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")


def _with_sbin(path: list[str]) -> list[str]:
    return path + [p for p in SBIN if p not in path]


class Commands(Protocol):
    def run(self, argv: list[str], *, timeout: float | None = None) -> tuple[int, str]:
        """Runs to the end; returns (exit code, stdout and stderr together)."""

    def start_detached(self, argv: list[str], log: Path) -> int:
        """Starts a daemon that outlives this process, its output appended to `log`; returns its pid."""


class Docker(Protocol):
    def version(self) -> str | None:
        """The engine's version, or None when no engine answers."""

    def has_image(self, ref: str) -> bool: ...

    def import_tar(self, tar: Path, ref: str, changes: list[str]) -> None: ...


class SystemCommands:
    def run(self, argv: list[str], *, timeout: float | None = None) -> tuple[int, str]:
        path = os.pathsep.join(_with_sbin([p for p in os.environ.get("PATH", "").split(os.pathsep) if p]))
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive", "PATH": path}
        try:
            proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  timeout=timeout, env=env)
        except FileNotFoundError:
            return 127, f"{argv[0]}: command not found"
        except subprocess.TimeoutExpired:
            return 124, f"{argv[0]}: no end after {timeout:g} s"
        return proc.returncode, proc.stdout.decode("utf-8", "replace")

    def start_detached(self, argv: list[str], log: Path) -> int:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as sink:
            # A session of its own: the daemon must survive the shell that ran set-up and its Ctrl-C.
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        return proc.pid


class EngineApi:
    """The local engine (DOCKER_HOST or the socket) through the SDK, reconnected on every call:
    during set-up it appears only after the daemon starts."""

    def _engine(self) -> engines.Engine:
        return engines.connect(None, timeout=600)

    def version(self) -> str | None:
        try:
            eng = engines.connect(None, timeout=5)
            return str(eng.version().get("Version", "?"))
        except EngineError:
            return None

    def has_image(self, ref: str) -> bool:
        return self._engine().image_id(ref) is not None

    def import_tar(self, tar: Path, ref: str, changes: list[str]) -> None:
        repository, tag = ref.rsplit(":", 1) if ":" in ref.rsplit("/", 1)[-1] else (ref, "latest")
        try:
            self._engine().client.api.import_image(src=str(tar), repository=repository, tag=tag, changes=changes)
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            raise EngineError(f"the engine refused to import {ref}: {exc}", where=str(tar)) from None

@dataclass(frozen=True)
class Host:
    root: Path = Path("/")
    path: tuple[str, ...] = ()
    euid: int = 0
    commands: Commands = field(default_factory=SystemCommands)
    docker: Docker = field(default_factory=EngineApi)
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep

    @classmethod
    def this(cls) -> Host:
        path = _with_sbin([p for p in os.environ.get("PATH", "").split(os.pathsep) if p])
        return cls(path=tuple(path), euid=os.geteuid())

    def file(self, absolute: str) -> Path:
        return self.root / absolute.lstrip("/")

    def which(self, name: str) -> str | None:
        """The first `name` on PATH, as a path on the host (not below `root`)."""
        for folder in self.path:
            candidate = self.file(f"{folder}/{name}")
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return f"{folder.rstrip('/')}/{name}"
        return None


@dataclass(frozen=True)
class Step:
    name: str
    status: str  # done | skipped
    detail: str
    seconds: float


@dataclass(frozen=True)
class Running:
    what: str
    pid: int | None
    log: str | None
    stop: str


@dataclass(frozen=True)
class SetupReport:
    steps: tuple[Step, ...]
    notes: tuple[str, ...]
    running: tuple[Running, ...]
    image: str

    def to_json(self) -> dict:
        return {"image": self.image, "steps": [vars(s) for s in self.steps], "notes": list(self.notes),
                "running": [vars(r) for r in self.running]}


# --- apt's sources -------------------------------------------------------------------------------

@dataclass(frozen=True)
class AptSource:
    uri: str
    suites: tuple[str, ...]
    components: tuple[str, ...]
    origin: str


def _one_line_sources(text: str, origin: str) -> list[AptSource]:
    out = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line.startswith("deb ") and not line.startswith("deb\t"):
            continue
        words = line.split()[1:]
        if words and words[0].startswith("["):
            # Options such as [arch=amd64 signed-by=...] sit between `deb` and the URI.
            while words and not words[0].endswith("]"):
                words.pop(0)
            words = words[1:]
        if len(words) >= 2:
            out.append(AptSource(words[0], (words[1],), tuple(words[2:]), f"{origin}:{number}"))
    return out


def _deb822_sources(text: str, origin: str) -> list[AptSource]:
    out = []
    stanzas: list[tuple[int, dict[str, str]]] = []
    fields: dict[str, str] = {}
    start, key = 0, ""
    for number, raw in enumerate(text.splitlines() + [""], 1):
        if raw.startswith("#"):
            continue
        if not raw.strip():
            if fields:
                stanzas.append((start, fields))
            fields, key = {}, ""
            continue
        if raw[0] in " \t":
            if key:
                fields[key] += " " + raw.strip()
            continue
        name, sep, value = raw.partition(":")
        if sep:
            if not fields:
                start = number
            key = name.strip().lower()
            fields[key] = value.strip()
    for start, f in stanzas:
        if "deb" not in f.get("types", "").split() or f.get("enabled", "yes").strip().lower() == "no":
            continue
        suites, components = tuple(f.get("suites", "").split()), tuple(f.get("components", "").split())
        for uri in f.get("uris", "").split():
            out.append(AptSource(uri, suites, components, f"{origin}:{start}"))
    return out


def apt_sources(root: Path) -> tuple[list[AptSource], list[str]]:
    """Every `deb` entry apt reads, in apt's order (sources.list, then sources.list.d by name),
    and the files read. Either format, either file missing."""
    files = []
    main = root / "etc/apt/sources.list"
    if main.is_file():
        files.append(main)
    folder = root / "etc/apt/sources.list.d"
    if folder.is_dir():
        files += sorted(p for p in folder.iterdir() if p.suffix in (".list", ".sources") and p.is_file())
    out: list[AptSource] = []
    for path in files:
        origin = "/" + path.relative_to(root).as_posix()
        text = path.read_text(errors="replace")
        out += _deb822_sources(text, origin) if path.suffix == ".sources" else _one_line_sources(text, origin)
    return out, ["/" + p.relative_to(root).as_posix() for p in files]


def find_mirror(root: Path, suite: str) -> tuple[str, str | None]:
    """(mirror URL, note). The host's own Debian mirror is the one it can reach: an entry carrying
    `suite` with `main`, else any Debian archive (a path ending in /debian) with `main`; without
    one, deb.debian.org and a note saying why."""
    sources, files = apt_sources(root)
    usable = [s for s in sources if urlparse(s.uri).scheme in ("http", "https", "file") and "main" in s.components]
    for source in usable:
        if suite in source.suites:
            return source.uri, None
    for source in usable:
        if urlparse(source.uri).path.rstrip("/").endswith("/debian"):
            return source.uri, None
    read = ", ".join(files) if files else "neither /etc/apt/sources.list nor /etc/apt/sources.list.d/ exists"
    return DEFAULT_MIRROR, f"no Debian mirror for {suite} in apt's sources ({read}): using {DEFAULT_MIRROR}"


# --- the steps -----------------------------------------------------------------------------------

class _Run:
    """One set-up run: its steps, notes and what it leaves running."""

    def __init__(self, host: Host, say: Callable[[str], None]):
        self.host, self.say = host, say
        self.steps: list[Step] = []
        self.notes: list[str] = []
        self.running: list[Running] = []
        self.apt_updated = False

    def note(self, text: str) -> None:
        self.notes.append(text)
        self.say(f"note: {text}")

    def cmd(self, step: str, argv: list[str], what_to_do: str, *, timeout: float | None = None) -> str:
        code, output = self.host.commands.run(argv, timeout=timeout)
        if code != 0:
            last = next((line.strip() for line in reversed(output.splitlines()) if line.strip()), "no output")
            raise SetupError(f"`{' '.join(argv[:3])}` exited {code}: {last}", where=f"setup step '{step}'",
                             hint=what_to_do)
        return output

    def need_root(self, step: str, why: str, hint: str) -> None:
        if self.host.euid != 0:
            raise SetupError(f"{why}, and only root can fix that", where=f"setup step '{step}'", hint=hint)

    def install(self, step: str, packages: list[str]) -> None:
        self.need_root(step, f"{', '.join(packages)} missing", f"sudo apt-get install {' '.join(packages)}")
        if self.host.which("apt-get") is None:
            raise SetupError(f"{', '.join(packages)} missing and there is no apt-get", where=f"setup step '{step}'",
                             hint=f"install {' '.join(packages)} with this system's package manager")
        hint = "check network access to apt's mirror (apt-get update) and retry"
        if not self.apt_updated:
            self.say("apt-get update")
            self.cmd(step, ["apt-get", "update", "-qq"], hint, timeout=600)
            self.apt_updated = True
        self.say(f"apt-get install {' '.join(packages)}")
        self.cmd(step, ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages], hint, timeout=1200)

    def docker_ce(self) -> list[str]:
        status = self.host.file("/var/lib/dpkg/status")
        if not status.is_file():
            return []
        found, package = [], ""
        for line in status.read_text(errors="replace").splitlines():
            if line.startswith("Package:"):
                package = line.split(":", 1)[1].strip()
            elif line.startswith("Status:") and line.split()[-1] == "installed" and package in DOCKER_CE:
                found.append(package)
        return found

    def systemd(self) -> bool:
        return self.host.file("/run/systemd/system").is_dir()

    def stop_hint(self) -> str:
        return "systemctl stop docker" if self.systemd() else f"kill $(cat {PID_FILE})"

    def daemon_pid(self) -> int | None:
        try:
            pid = int(self.host.file(PID_FILE).read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if self.host.file(f"/proc/{pid}").is_dir() else None

    def engine(self, log: Path) -> tuple[str, str]:
        step = "docker engine"
        version = self.host.docker.version()
        if version is not None:
            pid = self.daemon_pid()
            if pid is not None:
                self.running.append(Running("dockerd", pid, None, self.stop_hint()))
            return "skipped", f"Docker Engine {version} answers"
        dockerd = self.host.which("dockerd")
        if dockerd is None:
            ce = self.docker_ce()
            if ce:
                # docker.io beside Docker CE would replace its containerd and fight over the socket.
                raise SetupError(f"Docker CE is installed ({', '.join(ce)}) but without dockerd",
                                 where=f"setup step '{step}'", hint="reinstall docker-ce: apt-get install --reinstall docker-ce")
            self.install(step, ["docker.io"])
            dockerd = self.host.which("dockerd")
            if dockerd is None:
                raise SetupError("docker.io is installed but no dockerd is on PATH", where=f"setup step '{step}'",
                                 hint="dpkg -L docker.io | grep dockerd, and add its folder to PATH")
        self.need_root(step, "no Docker Engine answers", "sudo systemctl start docker, or add yourself to the docker "
                                                         "group (sudo usermod -aG docker $USER) and log in again")
        if self.daemon_pid() is not None:
            self.say("dockerd runs but does not answer yet: waiting")
            how, pid, where = "already starting", self.daemon_pid(), None
        elif self.systemd():
            self.say("systemctl start docker")
            self.cmd(step, ["systemctl", "start", "docker"], "read journalctl -u docker")
            how, pid, where = "systemctl start docker", None, "journalctl -u docker"
        else:
            self.say(f"starting {dockerd} (no systemd), log {log}")
            pid = self.host.commands.start_detached([dockerd], log)
            how, where = f"started by hand (pid {pid})", str(log)
        deadline = self.host.clock() + ENGINE_WAIT_S
        while (version := self.host.docker.version()) is None:
            if self.host.clock() > deadline:
                raise SetupError(f"dockerd did not answer within {ENGINE_WAIT_S:g} s", where=f"setup step '{step}'",
                                 hint=f"read {where or 'its log'}")
            self.host.sleep(0.5)
        self.running.append(Running("dockerd", pid, where, self.stop_hint()))
        return "done", f"Docker Engine {version}, {how}"

    def image(self, image: str, suite: str, workdir: Path | None) -> tuple[str, str]:
        step = "base image"
        if self.host.docker.has_image(image):
            return "skipped", f"{image} is on the engine"
        self.need_root(step, f"{image} is missing and debootstrap needs root",
                       "run stackbuild setup as root, or set STACKBUILD_BASE_IMAGE to an image your engine has")
        if self.host.which("debootstrap") is None:
            self.install(step, ["debootstrap"])
        mirror, note = find_mirror(self.host.root, suite)
        if note:
            self.note(note)
        scratch = Path(tempfile.mkdtemp(prefix="stackbuild-base-", dir=workdir))
        rootfs, tar = scratch / "rootfs", scratch / "rootfs.tar"
        try:
            self.say(f"debootstrap {suite} from {mirror} (about a minute)")
            self.cmd(step, ["debootstrap", "--variant=minbase", f"--include={','.join(INCLUDE)}", suite, str(rootfs),
                            mirror], f"check that {mirror} serves {suite} (or fix apt's sources) and retry", timeout=1800)
            self.trust_host_cas(step, rootfs)
            for deb in (rootfs / "var/cache/apt/archives").glob("*.deb"):
                deb.unlink()
            self.say(f"docker import {image}")
            self.cmd(step, ["tar", "-C", str(rootfs), "-cf", str(tar), "."], f"free disk space at {scratch.parent}")
            try:
                self.host.docker.import_tar(tar, image, ['CMD ["/bin/bash"]'])
            except EngineError as exc:
                raise SetupError(exc.message, where=f"setup step '{step}'", hint="check the engine: docker info") from None
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return "done", f"{image} ({suite} from {mirror})"

    def trust_host_cas(self, step: str, rootfs: Path) -> None:
        """An intercepting proxy's CA, trusted by this host, must be trusted inside builds too."""
        extra = self.host.file("/usr/local/share/ca-certificates")
        if extra.is_dir() and any(extra.iterdir()):
            shutil.copytree(extra, rootfs / "usr/local/share/ca-certificates", dirs_exist_ok=True)
            self.cmd(step, ["chroot", str(rootfs), "update-ca-certificates"], "check the certificates in "
                     "/usr/local/share/ca-certificates")
        bundle = self.host.file("/etc/ssl/certs/ca-certificates.crt")
        if bundle.is_file():
            (rootfs / "etc/ssl/certs").mkdir(parents=True, exist_ok=True)
            shutil.copyfile(bundle, rootfs / "etc/ssl/certs/ca-certificates.crt")


def setup(host: Host, *, image: str = DEFAULT_IMAGE, suite: str = DEFAULT_SUITE, log: Path = Path(DEFAULT_LOG),
          workdir: Path | None = None, say: Callable[[str], None] = lambda _m: None) -> SetupReport:
    """Runs the steps in order, each skipped when its result exists; the first failure raises
    SetupError naming its step (what was done before it stays done: a rerun continues)."""
    state = _Run(host, say)
    for name, fn in (("docker engine", lambda: state.engine(log)), ("base image", lambda: state.image(image, suite, workdir))):
        say(f"[{name}] ...")
        start = host.clock()
        status, detail = fn()
        state.steps.append(Step(name, status, detail, round(host.clock() - start, 1)))
        say(f"[{name}] {status} in {host.clock() - start:.1f} s: {detail}")
    return SetupReport(tuple(state.steps), tuple(state.notes), tuple(state.running), image)

