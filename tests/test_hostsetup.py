"""`stackbuild setup` against prepared host roots, a recording command runner and a fake engine."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from builder import hostsetup as H
from builder.cli import main
from builder.errors import SetupError

DEB822 = """\
# deb822, as the official bookworm images ship it
Types: deb
URIs: http://mirror.example.invalid/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://mirror.example.invalid/debian-security
Suites: bookworm-security
Components: main
"""
ONE_LINE = """\
# deb http://commented.example.invalid/debian bookworm main
deb-src http://src.example.invalid/debian bookworm main
deb [arch=amd64 signed-by=/usr/share/keyrings/docker.gpg] https://docker.example.invalid/linux/debian bookworm stable
deb http://oneline.example.invalid/debian bookworm main contrib
"""
PATH = ("/usr/local/bin", "/usr/bin", "/usr/sbin")


def make_root(tmp_path: Path, *, deb822: str | None = None, one_line: str | None = None,
              binaries: tuple[str, ...] = ("/usr/bin/apt-get",), dpkg: str = "") -> Path:
    root = tmp_path / "root"
    (root / "etc/apt").mkdir(parents=True)
    if deb822 is not None:
        (root / "etc/apt/sources.list.d").mkdir()
        (root / "etc/apt/sources.list.d/debian.sources").write_text(deb822)
    if one_line is not None:
        (root / "etc/apt/sources.list").write_text(one_line)
    for binary in binaries:
        install(root, binary)
    (root / "etc/ssl/certs").mkdir(parents=True)
    (root / "etc/ssl/certs/ca-certificates.crt").write_text("HOST BUNDLE\n")
    (root / "usr/local/share/ca-certificates").mkdir(parents=True)
    (root / "usr/local/share/ca-certificates/proxy.crt").write_text("PROXY CA\n")
    (root / "var/lib/dpkg").mkdir(parents=True)
    (root / "var/lib/dpkg/status").write_text(dpkg)
    return root


def install(root: Path, binary: str) -> None:
    path = root / binary.lstrip("/")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\nexit 1\n")
    path.chmod(0o755)


class FakeEngine:
    def __init__(self, *, up: bool, images: tuple[str, ...] = ()):
        self.up, self.images, self.imported = up, set(images), []

    def version(self):
        return "20.10.24" if self.up else None

    def has_image(self, ref):
        assert self.up, "asked for an image before the engine answered"
        return ref in self.images

    def import_tar(self, tar, ref, changes):
        self.imported.append((tar.read_bytes(), ref, changes))
        self.images.add(ref)


class FakeCommands:
    """Records argv lists; acts out the effects setup relies on (packages appear, the daemon
    answers, debootstrap fills its target, tar writes its file)."""

    def __init__(self, root: Path, engine: FakeEngine, fail: str | None = None):
        self.root, self.engine, self.fail, self.calls, self.detached = root, engine, fail, [], []

    def run(self, argv, *, timeout=None):
        assert isinstance(argv, list) and all(isinstance(a, str) for a in argv)
        self.calls.append(argv)
        if self.fail and argv[0] == self.fail:
            return 100, f"{argv[0]}: something went wrong\nE: the last line says why"
        if argv[:2] == ["apt-get", "install"]:
            for package in argv[5:]:
                install(self.root, {"docker.io": "/usr/sbin/dockerd", "debootstrap": "/usr/sbin/debootstrap"}[package])
                if package == "docker.io":
                    install(self.root, "/usr/bin/docker")
        elif argv[0] == "systemctl":
            self.engine.up = True
        elif argv[0] == "debootstrap":
            target = Path(argv[-2])
            (target / "etc/ssl/certs").mkdir(parents=True)
            (target / "var/cache/apt/archives").mkdir(parents=True)
            (target / "var/cache/apt/archives/python3.deb").write_text("deb")
            (target / "usr/local/share/ca-certificates").mkdir(parents=True)
        elif argv[0] == "chroot":
            assert (Path(argv[1]) / "usr/local/share/ca-certificates/proxy.crt").read_text() == "PROXY CA\n"
        elif argv[0] == "tar":
            rootfs = Path(argv[2])
            assert not list((rootfs / "var/cache/apt/archives").glob("*.deb"))
            Path(argv[4]).write_text("bundle=" + (rootfs / "etc/ssl/certs/ca-certificates.crt").read_text())
        return 0, ""

    def start_detached(self, argv, log):
        self.detached.append((argv, log))
        self.engine.up = True
        return 4242

    def programs(self):
        return [c[0] for c in self.calls]


def host(root, commands, engine, *, euid=0, ticks=None):
    clock = iter(ticks) if ticks is not None else None
    return H.Host(root=root, path=PATH, euid=euid, commands=commands, docker=engine,
                  clock=(lambda: next(clock)) if clock else (lambda: 0.0), sleep=lambda _s: None)


# --- apt's sources: the fresh-machine failure was here -----------------------------------------

def test_deb822_only_finds_the_mirror(tmp_path):
    """A fresh Debian 12 has /etc/apt/sources.list.d/debian.sources and no sources.list."""
    root = make_root(tmp_path, deb822=DEB822)
    assert not (root / "etc/apt/sources.list").exists()
    assert H.find_mirror(root, "bookworm") == ("http://mirror.example.invalid/debian", None)


def test_the_old_grep_pipeline_died_on_the_same_root(tmp_path):
    """What .ci/docker.sh did: under pipefail, grep's exit 2 for the missing file ended the script."""
    root = make_root(tmp_path, deb822=DEB822)
    script = ("set -euo pipefail; grep -rhoE '^(URIs:|deb) +https?://[^ ]+' "
              f"{root}/etc/apt/sources.list {root}/etc/apt/sources.list.d/ 2>/dev/null "
              "| awk '{print $2}' | grep -E '/debian/?$' | head -n 1")
    assert subprocess.run(["bash", "-c", script], capture_output=True).returncode == 2


def test_one_line_only_skips_comments_sources_and_other_repositories(tmp_path):
    root = make_root(tmp_path, one_line=ONE_LINE)
    assert H.find_mirror(root, "bookworm") == ("http://oneline.example.invalid/debian", None)


def test_both_formats_sources_list_first(tmp_path):
    root = make_root(tmp_path, deb822=DEB822, one_line=ONE_LINE)
    assert H.find_mirror(root, "bookworm")[0] == "http://oneline.example.invalid/debian"
    sources, files = H.apt_sources(root)
    assert files == ["/etc/apt/sources.list", "/etc/apt/sources.list.d/debian.sources"]
    assert [s.origin for s in sources][-2:] == ["/etc/apt/sources.list.d/debian.sources:2",
                                                "/etc/apt/sources.list.d/debian.sources:8"]


def test_neither_file_falls_back_to_deb_debian_org_with_a_note(tmp_path):
    root = make_root(tmp_path)
    mirror, note = H.find_mirror(root, "bookworm")
    assert mirror == H.DEFAULT_MIRROR
    assert "neither /etc/apt/sources.list nor /etc/apt/sources.list.d/ exists" in note


def test_deb822_disabled_stanzas_source_types_and_another_suite(tmp_path):
    text = ("Types: deb-src\nURIs: http://src.example.invalid/debian\nSuites: bookworm\nComponents: main\n\n"
            "Types: deb\nURIs: http://off.example.invalid/debian\nSuites: bookworm\nComponents: main\nEnabled: no\n\n"
            "Types: deb\nURIs: http://trixie.example.invalid/debian/\nSuites: trixie\nComponents: main\n"
            "Signed-By:\n -----BEGIN PGP PUBLIC KEY BLOCK-----\n .\n -----END PGP PUBLIC KEY BLOCK-----\n")
    root = make_root(tmp_path, deb822=text)
    # No entry for bookworm itself: the same Debian archive serves it.
    assert H.find_mirror(root, "bookworm") == ("http://trixie.example.invalid/debian/", None)


def test_an_ubuntu_host_has_no_debian_mirror(tmp_path):
    text = "Types: deb\nURIs: http://archive.ubuntu.example.invalid/ubuntu/\nSuites: noble noble-updates\nComponents: main universe\n"
    root = make_root(tmp_path, deb822=text)
    assert H.find_mirror(root, "bookworm")[0] == H.DEFAULT_MIRROR
    assert H.find_mirror(root, "noble")[0] == "http://archive.ubuntu.example.invalid/ubuntu/"


# --- the engine ---------------------------------------------------------------------------------

def test_no_docker_installs_docker_io_and_starts_dockerd_by_hand(tmp_path):
    root = make_root(tmp_path, deb822=DEB822, binaries=("/usr/bin/apt-get", "/usr/local/bin/docker"))
    engine = FakeEngine(up=False, images=(H.DEFAULT_IMAGE,))
    commands = FakeCommands(root, engine)
    said = []
    report = H.setup(host(root, commands, engine), log=tmp_path / "dockerd.log", say=said.append)
    assert commands.calls == [["apt-get", "update", "-qq"],
                              ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "docker.io"]]
    assert commands.detached == [(["/usr/sbin/dockerd"], tmp_path / "dockerd.log")]
    assert [(s.name, s.status) for s in report.steps] == [("docker engine", "done"), ("base image", "skipped")]
    assert report.running == (H.Running("dockerd", 4242, str(tmp_path / "dockerd.log"), "kill $(cat /var/run/docker.pid)"),)
    assert "[docker engine] done in 0.0 s: Docker Engine 20.10.24, started by hand (pid 4242)" in said


def test_a_newer_client_earlier_on_path_is_never_called(tmp_path):
    """The 28.x client in /usr/local/bin wants buildx: neither it nor any docker client is run, and
    a client alone is no engine."""
    root = make_root(tmp_path, deb822=DEB822, binaries=("/usr/bin/apt-get", "/usr/local/bin/docker"))
    engine = FakeEngine(up=False)
    commands = FakeCommands(root, engine)
    report = H.setup(host(root, commands, engine), log=tmp_path / "dockerd.log")
    assert "docker" not in commands.programs() and "/usr/local/bin/docker" not in commands.programs()
    assert ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "docker.io"] in commands.calls
    assert engine.imported and report.steps[1].status == "done"


def test_systemd_host_uses_systemctl(tmp_path):
    root = make_root(tmp_path, deb822=DEB822, binaries=("/usr/bin/apt-get", "/usr/bin/dockerd"))
    (root / "run/systemd/system").mkdir(parents=True)
    engine = FakeEngine(up=False, images=(H.DEFAULT_IMAGE,))
    commands = FakeCommands(root, engine)
    report = H.setup(host(root, commands, engine))
    assert commands.calls == [["systemctl", "start", "docker"]] and not commands.detached
    assert report.running[0].stop == "systemctl stop docker"


def test_engine_already_running_changes_nothing(tmp_path):
    root = make_root(tmp_path, binaries=())
    engine = FakeEngine(up=True, images=(H.DEFAULT_IMAGE,))
    commands = FakeCommands(root, engine)
    report = H.setup(host(root, commands, engine, euid=1000))
    assert commands.calls == [] and not commands.detached
    assert [s.status for s in report.steps] == ["skipped", "skipped"]


def test_docker_ce_is_never_replaced_by_docker_io(tmp_path):
    ce = "Package: docker-ce\nStatus: install ok installed\n\nPackage: containerd.io\nStatus: install ok installed\n"
    root = make_root(tmp_path, deb822=DEB822, dpkg=ce)
    engine = FakeEngine(up=False)
    commands = FakeCommands(root, engine)
    with pytest.raises(SetupError) as err:
        H.setup(host(root, commands, engine))
    assert commands.calls == []
    assert "docker-ce, containerd.io" in str(err.value) and "setup step 'docker engine'" in str(err.value)


def test_docker_ce_with_its_daemon_is_started_not_reinstalled(tmp_path):
    ce = "Package: docker-ce\nStatus: install ok installed\n"
    root = make_root(tmp_path, deb822=DEB822, dpkg=ce, binaries=("/usr/bin/apt-get", "/usr/bin/dockerd"))
    engine = FakeEngine(up=False, images=(H.DEFAULT_IMAGE,))
    commands = FakeCommands(root, engine)
    H.setup(host(root, commands, engine), log=tmp_path / "d.log")
    assert commands.calls == [] and commands.detached == [(["/usr/bin/dockerd"], tmp_path / "d.log")]


def test_an_engine_that_never_answers_names_the_step_and_the_log(tmp_path):
    root = make_root(tmp_path, binaries=("/usr/bin/dockerd",))
    engine = FakeEngine(up=False)
    commands = FakeCommands(root, engine)
    commands.start_detached = lambda argv, log: 7  # starts, never answers
    with pytest.raises(SetupError) as err:
        H.setup(host(root, commands, engine, ticks=[0.0, 0.0, 30.0, 61.0, 62.0]), log=tmp_path / "d.log")
    assert str(err.value) == (f"setup step 'docker engine': dockerd did not answer within 60 s "
                              f"(hint: read {tmp_path / 'd.log'})")


def test_not_root_without_an_engine_says_what_to_do(tmp_path):
    root = make_root(tmp_path, binaries=("/usr/bin/dockerd",))
    engine = FakeEngine(up=False)
    with pytest.raises(SetupError, match="only root can fix that.*docker group"):
        H.setup(host(root, FakeCommands(root, engine), engine, euid=1000))


# --- the base image -----------------------------------------------------------------------------

def test_base_image_from_the_hosts_mirror_with_its_cas(tmp_path):
    root = make_root(tmp_path, deb822=DEB822, binaries=("/usr/bin/apt-get",))
    engine = FakeEngine(up=True)
    commands = FakeCommands(root, engine)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    report = H.setup(host(root, commands, engine), image="stackbuild/base:ci-fresh-1", workdir=scratch)
    boot = next(c for c in commands.calls if c[0] == "debootstrap")
    assert boot[:3] == ["debootstrap", "--variant=minbase",
                        "--include=ca-certificates,python3,python3-pip,python3-venv,python3-dev,gcc,libc6-dev"]
    assert boot[3] == "bookworm" and boot[5] == "http://mirror.example.invalid/debian"
    assert commands.programs() == ["apt-get", "apt-get", "debootstrap", "chroot", "tar"]
    assert engine.imported == [(b"bundle=HOST BUNDLE\n", "stackbuild/base:ci-fresh-1", ['CMD ["/bin/bash"]'])]
    assert report.steps[1].detail == "stackbuild/base:ci-fresh-1 (bookworm from http://mirror.example.invalid/debian)"
    assert list(scratch.iterdir()) == [], "the rootfs and its tar are removed"
    # Idempotent: a second run finds both results and runs nothing.
    commands.calls.clear()
    again = H.setup(host(root, commands, engine), image="stackbuild/base:ci-fresh-1")
    assert commands.calls == [] and [s.status for s in again.steps] == ["skipped", "skipped"]


def test_base_image_without_sources_notes_the_default_mirror(tmp_path):
    root = make_root(tmp_path, binaries=("/usr/sbin/debootstrap",))
    engine = FakeEngine(up=True)
    commands = FakeCommands(root, engine)
    report = H.setup(host(root, commands, engine))
    assert next(c for c in commands.calls if c[0] == "debootstrap")[5] == H.DEFAULT_MIRROR
    assert len(report.notes) == 1 and "using http://deb.debian.org/debian" in report.notes[0]


def test_a_failed_debootstrap_is_one_line_and_leaves_nothing(tmp_path):
    root = make_root(tmp_path, deb822=DEB822, binaries=("/usr/sbin/debootstrap",))
    engine = FakeEngine(up=True)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    with pytest.raises(SetupError) as err:
        H.setup(host(root, FakeCommands(root, engine, fail="debootstrap"), engine), workdir=scratch)
    text = str(err.value)
    assert text.startswith("setup step 'base image': `debootstrap --variant=minbase --include=")
    assert "exited 100: E: the last line says why" in text and "\n" not in text
    assert "check that http://mirror.example.invalid/debian serves bookworm" in text
    assert list(scratch.iterdir()) == [] and not engine.imported


# --- the command --------------------------------------------------------------------------------

def test_cli_setup_json_and_exit_code(monkeypatch, tmp_path):
    root = make_root(tmp_path, binaries=())
    engine = FakeEngine(up=False)
    monkeypatch.setattr(H.Host, "this", classmethod(lambda cls: host(root, FakeCommands(root, engine), engine, euid=1000)))
    out = CliRunner(mix_stderr=False).invoke(main, ["setup", "--json"])
    assert out.exit_code == SetupError.exit_code == 16
    assert json.loads(out.stdout)["where"] == "setup step 'docker engine'"
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("stackbuild: setup error: setup step 'docker engine'")
    engine.up, engine.images = True, {H.DEFAULT_IMAGE}
    ok = CliRunner(mix_stderr=False).invoke(main, ["setup", "--json"])
    assert ok.exit_code == 0 and [s["status"] for s in json.loads(ok.stdout)["steps"]] == ["skipped", "skipped"]


def test_system_commands_report_exit_output_and_missing_programs(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    commands = H.SystemCommands()
    assert commands.run(["sh", "-c", "echo out; echo err >&2; exit 3"]) == (3, "out\nerr\n")
    assert commands.run(["stackbuild-no-such-program"])[0] == 127
    assert commands.run(["sleep", "5"], timeout=0.2)[0] == 124
    log = tmp_path / "logs" / "daemon.log"
    pid = commands.start_detached(["sh", "-c", "echo started; ps -o sid= -p $$"], log)
    for _ in range(100):
        if log.is_file() and len(log.read_text().split()) == 2:
            break
        time.sleep(0.05)
    word, sid = log.read_text().split()
    assert word == "started" and int(sid) == pid != os.getsid(0), "a session of its own"
