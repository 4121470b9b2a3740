"""`stackbuild apply` killed at every moment of a move, then re-run plainly: the re-run finishes
the move by itself (no --force), the worktree is clean at the expected head and `git fsck` passes.

Kills come two ways: STACKBUILD_CRASH_AT=<moment> (apply's own testing seam, between git calls)
and a `git` shim first on PATH that, for one git subcommand, has a killer SIGKILL stackbuild (or
its whole process group and the git child) while git writes the worktree.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import Upstream, write_project

FILES = 800
REAL_GIT = shutil.which("git")

SHIM = """#!/bin/sh
case " $* " in
  *" $CRASH_GIT "*)
    echo $$ > "$CRASH_PIDFILE"
    # The killer runs in a session of its own: a kill of stackbuild's group must not stop it.
    setsid sh -c 'sleep "$1"
      if [ "$2" = group ]; then kill -9 "-$3"; kill -9 "$4"; else kill -9 "$3"; fi' killer "$CRASH_DELAY" "$CRASH_MODE" "$PPID" "$$" &
    sleep "$CRASH_SLOW"
    ;;
esac
exec {git} "$@"
"""


@dataclass(frozen=True)
class Project:
    v1: Path
    v2: Path
    head1: str
    head2: str
    cache: Path
    shim: Path


def content(i: int, tag: str = "") -> str:
    return "".join(f"file {i} line {n}{tag}\n" for n in range(5))


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Project:
    base = tmp_path_factory.mktemp("crash")
    up = Upstream(base / "upstream")
    files = {f"d{i % 30:02d}/f{i:04d}.txt": content(i) for i in range(FILES)}
    pin = up.commit(files, "base")
    small = up.diff({n: content(i, " small") for i, n in enumerate(sorted(files)) if i < 10})
    wide = up.diff({n: content(i, " wide") for i, n in enumerate(sorted(files))})
    toml = f'[sources.up]\nurl = "{up.path}"\ncommit = "{pin}"\n[series.s]\nsource = "up"\n[stacks.demo]\nseries = ["s"]\n'
    # v2 adds files and changes every file: the update writes the whole tree.
    added = up.diff({f"new/n{i:03d}.txt": content(i, " new") for i in range(200)})
    v1 = write_project(base / "v1", toml, {"patches/s/series": "small.patch\n", "patches/s/small.patch": small}).parent
    v2 = write_project(base / "v2", toml, {"patches/s/series": "wide.patch\nadded.patch\n",
                                           "patches/s/wide.patch": wide, "patches/s/added.patch": added}).parent
    shim = base / "shim"
    shim.mkdir()
    (shim / "git").write_text(SHIM.format(git=REAL_GIT))
    (shim / "git").chmod(0o755)
    p = Project(v1, v2, "", "", base / "cache", shim)
    heads = []
    for v in (v1, v2):
        work = base / f"reference-{v.name}"
        assert stackbuild(p, v, work).returncode == 0
        heads.append(head(work))
    return Project(v1, v2, heads[0], heads[1], p.cache, shim)


def env_for(p: Project, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STACKBUILD_", "CRASH_"))}
    env.update({"STACKBUILD_CACHE": str(p.cache), "PYTHONDONTWRITEBYTECODE": "1", **extra})
    return env


def stackbuild(p: Project, version: Path, work: Path, *extra: str, env: dict[str, str] | None = None,
               wait: bool = True):
    cmd = [sys.executable, "-m", "builder.cli", "--stack", str(version / "stack.toml"), "--work-dir", str(work),
           "--json", "apply", "demo", *extra]
    proc = subprocess.Popen(cmd, env=env or env_for(p), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    if not wait:
        return proc
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def head(work: Path) -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=work / "demo" / "up", capture_output=True,
                          text=True, check=True).stdout.strip()


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def assert_recovers(p: Project, version: Path, work: Path, expected: str) -> None:
    done = stackbuild(p, version, work)
    assert done.returncode == 0, done.stderr.decode() + done.stdout.decode()
    wt = work / "demo" / "up"
    assert head(work) == expected
    assert subprocess.run(["git", "symbolic-ref", "HEAD"], cwd=wt, capture_output=True, text=True).stdout.strip() \
        == "refs/heads/stackbuild/demo"
    status = subprocess.run(["git", "status", "--porcelain"], cwd=wt, capture_output=True, text=True, check=True).stdout
    assert status == ""
    fsck = subprocess.run(["git", "fsck", "--no-dangling"], cwd=wt, capture_output=True, text=True)
    assert fsck.returncode == 0 and "missing" not in fsck.stdout + fsck.stderr, fsck.stdout + fsck.stderr
    assert not list((work / "demo").glob(".*.move.json"))
    assert not (wt / ".git" / "index.lock").exists()


def crash(p: Project, version: Path, work: Path, tmp_path: Path, *, at: str = "", git_cmd: str = "",
          mode: str = "process", delay: float = 0.0, slow: float = 0.0) -> None:
    """Runs apply until it is killed: at a moment of apply's own, or while git runs GIT_CMD."""
    pidfile = tmp_path / "git.pid"
    extra = {"STACKBUILD_CRASH_AT": at} if at else {
        "PATH": f"{p.shim}{os.pathsep}{os.environ['PATH']}", "CRASH_GIT": git_cmd, "CRASH_MODE": mode,
        "CRASH_DELAY": str(delay), "CRASH_SLOW": str(slow), "CRASH_PIDFILE": str(pidfile)}
    proc = stackbuild(p, version, work, env=env_for(p, **extra), wait=False)
    proc.communicate(timeout=120)
    assert proc.returncode == -9, f"apply was not killed (exit {proc.returncode})"
    if pidfile.exists():
        # No git child of a killed apply writes on while the re-run starts.
        child = int(pidfile.read_text())
        deadline = time.monotonic() + 0.5
        while alive(child) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not alive(child), "the git child outlived the killed apply"


FRESH = [
    {"at": "journaled"},
    {"at": "cloned"},
    {"at": "moved"},
    {"at": "recorded"},
    {"git_cmd": "clone", "delay": 0.005},
    {"git_cmd": "clone", "delay": 0.005, "mode": "group"},
    {"git_cmd": "checkout", "delay": 0.03},
    {"git_cmd": "checkout", "delay": 0.03, "mode": "group"},
    {"git_cmd": "checkout", "delay": 0.05, "slow": 1.0},  # git starts after apply died
]
UPDATE = [
    {"at": "journaled"},
    {"at": "read-tree"},
    {"at": "moved"},
    {"at": "recorded"},
    {"git_cmd": "read-tree", "delay": 0.03},
    {"git_cmd": "read-tree", "delay": 0.03, "mode": "group"},
    {"git_cmd": "read-tree", "delay": 0.05, "slow": 1.0},
]


def name(case: dict) -> str:
    return case.get("at") or f"{case['git_cmd']}-{case.get('mode', 'process')}{'-slow' if 'slow' in case else ''}"


@pytest.mark.parametrize("case", FRESH, ids=name)
def test_killed_first_apply_is_finished_by_a_plain_rerun(project: Project, tmp_path: Path, case: dict):
    work = tmp_path / "work"
    crash(project, project.v1, work, tmp_path, **case)
    assert_recovers(project, project.v1, work, project.head1)


@pytest.mark.parametrize("case", UPDATE, ids=name)
def test_killed_update_is_finished_by_a_plain_rerun(project: Project, tmp_path: Path, case: dict):
    work = tmp_path / "work"
    assert stackbuild(project, project.v1, work).returncode == 0
    crash(project, project.v2, work, tmp_path, **case)
    assert_recovers(project, project.v2, work, project.head2)


def test_index_lock_of_a_killed_git_is_removed_by_the_rerun(project: Project, tmp_path: Path):
    """What a git killed inside read-tree leaves: its index.lock. The journal says the git was ours."""
    work = tmp_path / "work"
    assert stackbuild(project, project.v1, work).returncode == 0
    crash(project, project.v2, work, tmp_path, at="journaled")
    (work / "demo" / "up" / ".git" / "index.lock").write_bytes(b"")
    assert_recovers(project, project.v2, work, project.head2)


def test_a_foreign_index_lock_is_left_alone(project: Project, tmp_path: Path):
    """Without a journal, an index.lock is somebody else's git at work: apply fails and keeps it."""
    work = tmp_path / "work"
    assert stackbuild(project, project.v1, work).returncode == 0
    lock = work / "demo" / "up" / ".git" / "index.lock"
    lock.write_bytes(b"")
    done = stackbuild(project, project.v2, work)
    assert done.returncode == 6 and lock.exists()


def test_a_journal_whose_writer_still_runs_is_not_touched(project: Project, tmp_path: Path):
    work = tmp_path / "work"
    assert stackbuild(project, project.v1, work).returncode == 0
    crash(project, project.v2, work, tmp_path, at="journaled")
    journal = work / "demo" / ".up.move.json"
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        journal.write_text(json.dumps({**json.loads(journal.read_text()), "pid": sleeper.pid}))
        done = stackbuild(project, project.v2, work)
        assert done.returncode == 7 and f"pid {sleeper.pid}" in json.loads(done.stdout)["message"]
    finally:
        sleeper.kill()
        sleeper.wait()
    assert_recovers(project, project.v2, work, project.head2)


def test_disk_full_during_an_update_then_rerun_after_freeing_space(project: Project, tmp_path: Path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        work = mnt / "work"
        assert stackbuild(project, project.v1, work).returncode == 0
        filler = mnt / "filler"
        with open(filler, "wb") as handle:
            try:
                while True:
                    handle.write(b"\0" * (1 << 16))
                    handle.flush()
            except OSError:
                pass
        os.truncate(filler, filler.stat().st_size - (1 << 17))  # room for the journal, not the tree
        full = stackbuild(project, project.v2, work)
        assert full.returncode == 6, full.stdout.decode() + full.stderr.decode()
        hint = json.loads(full.stdout)["hint"]
        assert "disk is full" in hint and "re-run finishes it" in hint, hint
        filler.unlink()
        assert_recovers(project, project.v2, work, project.head2)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_an_interrupted_update_to_a_target_no_longer_wanted(project: Project, tmp_path: Path):
    """Killed moving to v2, the stack is set back to v1: files v2's move may have written are
    untracked then; they are set aside (they might be the user's), not left in the worktree."""
    work = tmp_path / "work"
    assert stackbuild(project, project.v1, work).returncode == 0
    crash(project, project.v2, work, tmp_path, at="journaled")
    written = work / "demo" / "up" / "new" / "n000.txt"
    written.parent.mkdir()
    written.write_text(content(0, " new"))  # as a read-tree killed midway leaves it: not in the index
    assert_recovers(project, project.v1, work, project.head1)
    assert [p.read_text() for p in (work / "demo" / ".backup").rglob("n000.txt")] == [content(0, " new")]
