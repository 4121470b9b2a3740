"""The work directory: worktrees at work/<stack>/<source> on branch stackbuild/<stack>, the state
file recording what apply put there, and where a rebase keeps its state.

A worktree moves only after everything it will hold exists as objects, with interrupts held and
the move journaled: a killed process leaves each worktree as it was or finishable by a re-run
(`settle`). What the user had — commits not on the branch, uncommitted edits, untracked files in
the way — is kept under a backup ref or folder before anything is overwritten.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from .config import Config
from .errors import ApplyError, LockError, StackbuildError
from .fsutil import atomic_write, locked, sha256
from .git import git, hint_for
from .series import stack_patch_digests
from .settings import Settings, env_value


STATE_FILE = "stackbuild-state.json"


def stack_dir(settings: Settings, stack: str) -> Path:
    return settings.work_dir / stack


def state_dir_for(work_dir: Path, stack: str) -> Path:
    return work_dir / stack / ".rebase"


def rebase_state_path(state_dir: Path, source: str) -> Path:
    return state_dir / f"{source}.json"


def sources_in_progress(state_dir: Path) -> list[str]:
    # A source name never starts with "_" (config.NAME_RE): such files belong to a multi-source rebase.
    return sorted(p.stem for p in state_dir.glob("*.json") if not p.name.startswith("_")) if state_dir.is_dir() else []


def work_lock(root: Path, detail: str = ""):
    """The lock on a stack's work directory ROOT: no apply or rebase moves its worktrees meanwhile.
    A kernel lock: a killed process releases it. DETAIL (the sources) goes into the message."""
    return locked(root / ".lock", f"the work directory of stack '{root.name}'" + (f" ({detail})" if detail else ""))


def branch_of(stack: str) -> str:
    return f"stackbuild/{stack}"


def read_state(settings: Settings, stack: str) -> dict:
    path = stack_dir(settings, stack) / STATE_FILE
    reset = f"delete it (rm {path}); the next apply rebuilds it from the worktrees"
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        return {"stack": stack, "sources": {}}
    except (OSError, ValueError) as exc:
        raise ApplyError(f"unreadable state file: {exc}", where=str(path), hint=reset) from None
    if not _state_shape_ok(state):
        raise ApplyError("the state file is not one stackbuild wrote (wrong JSON shape)", where=str(path), hint=reset)
    return state


def _state_shape_ok(state: object) -> bool:
    """What `apply` and `status` read from each record; anything else would fail deep inside them."""
    if not isinstance(state, dict) or not isinstance(state.get("sources"), dict):
        return False
    return all(isinstance(rec, dict) and isinstance(rec.get("head"), str) and isinstance(rec.get("base"), str)
               and isinstance(rec.get("patches"), list)
               and all(isinstance(p, dict) and isinstance(p.get("patch"), str) and isinstance(p.get("sha256"), str)
                       for p in rec["patches"])
               for rec in state["sources"].values())


def _wt_git(wt: Path, args: Sequence[str], **kw) -> subprocess.CompletedProcess:
    return git(args, cwd=wt, error=ApplyError, where=str(wt), **kw)


def inspect_worktree(wt: Path, branch: str, recorded: str | None, force: bool) -> str | None:
    """The worktree's current head, after making sure moving it loses nothing of the user's."""
    if not (wt / ".git").exists():
        if wt.exists() and any(wt.iterdir()):
            raise ApplyError("the worktree folder exists but is not a git worktree", where=str(wt),
                             hint="move it away; stackbuild will not overwrite files it did not create")
        return None
    head_ref = _wt_git(wt, ["symbolic-ref", "-q", "HEAD"], check=False).stdout.decode().strip()
    head = _wt_git(wt, ["rev-parse", "HEAD"]).stdout.decode().strip()
    if force:
        return head
    if head_ref != f"refs/heads/{branch}":
        raise ApplyError(f"the worktree is on '{head_ref or 'a detached HEAD'}', not {branch}", where=str(wt),
                         hint=f"git -C {wt} checkout {branch}, or re-run with --force to reset it (kept under a backup ref)")
    dirty = _wt_git(wt, ["status", "--porcelain", "--untracked-files=no"]).stdout.decode().strip()
    if dirty:
        raise ApplyError(f"the worktree has uncommitted changes ({len(dirty.splitlines())} files)", where=str(wt),
                         hint="commit and export them (stackbuild export), stash them, or re-run with --force "
                              "(they are kept under a backup ref)")
    if recorded and head != recorded:
        raise ApplyError("the worktree has commits that are not in the series", where=str(wt),
                         hint="export them first (stackbuild export), or re-run with --force (they are kept under a backup ref)")
    return head


# A move is journaled beside its worktree before anything of it changes, as git's sequencer and
# StGit's transaction log do: a process killed mid-move (or a disk that filled up) leaves the
# journal, and the next apply, holding the work directory's lock, finishes the move by itself.


@dataclass(frozen=True)
class Journal:
    path: Path
    start: str | None  # the head before the move; None: the worktree was being created
    to: str
    branch: str
    pid: int


def _journal_path(root: Path, source: str) -> Path:
    return root / f".{source}.move.json"


def _write_journal(root: Path, source: str, start: str | None, to: str, branch: str) -> Path:
    path = _journal_path(root, source)
    # No fsync: git does not sync the worktree files it writes either, so after a power cut no
    # journal could vouch for them; against a killed process the page cache is enough.
    atomic_write(path, json.dumps({"from": start, "to": to, "branch": branch, "pid": os.getpid()}).encode(),
                 durable=False)
    return path


def read_journal(root: Path, source: str) -> Journal | None:
    path = _journal_path(root, source)
    try:
        data = json.loads(path.read_text())
        return Journal(path, data["from"], str(data["to"]), str(data["branch"]), int(data["pid"]))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ApplyError(f"unreadable move journal: {exc}", where=str(path),
                         hint="delete it and re-run with --force (the worktree's own changes are kept under a backup ref)") from None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie no one reaped yet writes nothing any more
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def settle(journal: Journal, wt: Path) -> None:
    """Make an interrupted move's worktree movable again. The lock we hold proves its writer is
    gone, and git children die with it (builder/git.py); a live PID is only checked to be sure."""
    if journal.pid != os.getpid() and _alive(journal.pid):
        raise LockError(f"stackbuild pid {journal.pid} was moving this worktree and is still running", where=str(journal.path),
                        hint="wait for it to end; if that process is not stackbuild, delete the journal and re-run")
    # Left by a git we ran and that was killed; nobody else writes a worktree we are moving.
    (wt / ".git" / "index.lock").unlink(missing_ok=True)
    if journal.start is None:
        # A first checkout that did not finish: the folder holds nothing but what we wrote.
        shutil.rmtree(wt, ignore_errors=True)


def _crash_point(moment: str) -> None:
    """Testing seam of tests/test_apply_crash.py: STACKBUILD_CRASH_AT=<moment> kills apply at that
    moment of a move, as a power cut or `kill -9` would, to prove the next run finishes it."""
    if env_value("STACKBUILD_CRASH_AT") == moment:
        os.kill(os.getpid(), signal.SIGKILL)


def create_worktree(git_dir: Path, wt: Path, error: type[StackbuildError]) -> None:
    """A clone sharing the mirror's objects, so several work dirs can hold one stack; no checkout."""
    wt.parent.mkdir(parents=True, exist_ok=True)
    git(["clone", "-q", "--shared", "--no-checkout", "--", str(git_dir), str(wt)], error=error,
        hint="check disk space and permissions of the work directory")
    git(["config", "core.hooksPath", os.devnull], cwd=wt, error=error, where=str(wt))


@dataclass(frozen=True)
class Backup:
    """What a forced move replaced, kept: refs in the worktree's repository, files in a folder."""

    refs: tuple[str, ...] = ()
    folder: Path | None = None
    files: tuple[str, ...] = ()

    def to_json(self) -> dict:
        return {"refs": list(self.refs), "folder": str(self.folder) if self.folder else None, "files": list(self.files)}


def _stamp() -> str:
    return f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{os.getpid()}"


def _set_aside(root: Path, wt: Path, stamp: str, paths: Sequence[str]) -> Path | None:
    """Moves PATHS of the worktree into <work>/<stack>/.backup/<stamp>/<source>/, keeping their layout."""
    if not paths:
        return None
    folder = root / ".backup" / stamp / wt.name
    for p in paths:
        (folder / p).parent.mkdir(parents=True, exist_ok=True)
        os.replace(wt / p, folder / p)
    return folder


def _back_up(root: Path, wt: Path, branch: str, recorded: str | None, new: str, *, commits: bool) -> Backup:
    """Before a worktree is reset (`--force`, or finishing an interrupted move): with COMMITS, its
    own commits and uncommitted changes under refs/stackbuild/backup/<stamp>/; always, untracked
    files NEW's files would overwrite, set aside."""
    stamp = _stamp()
    refs = []
    if commits:
        keep = {recorded, new, None, ""}
        heads = {"head": _wt_git(wt, ["rev-parse", "-q", "--verify", "HEAD"], check=False).stdout.decode().strip(),
                 "branch": _wt_git(wt, ["rev-parse", "-q", "--verify", f"refs/heads/{branch}"], check=False).stdout.decode().strip(),
                 "uncommitted": _wt_git(wt, ["stash", "create"], check=False).stdout.decode().strip()}
        for what, sha in heads.items():
            if sha not in keep:
                ref = f"refs/stackbuild/backup/{stamp}/{what}"
                _wt_git(wt, ["update-ref", ref, sha])
                refs.append(ref)
                keep.add(sha)
    untracked = _paths(_wt_git(wt, ["ls-files", "-z", "--others"]))
    files: list[str] = []
    if untracked:
        tracked = _paths(_wt_git(wt, ["ls-tree", "-r", "-z", "--name-only", new]))
        names = set(tracked)
        dirs = {str(q) for p in tracked for q in Path(p).parents}
        files = [p for p in untracked if p in names or p in dirs or {str(q) for q in Path(p).parents} & names]
    return Backup(tuple(refs), _set_aside(root, wt, stamp, files), tuple(files))


def _paths(proc: subprocess.CompletedProcess) -> list[str]:
    """NUL-separated paths as git prints them; bytes that are not UTF-8 survive the round trip."""
    return [os.fsdecode(p) for p in proc.stdout.split(b"\0") if p]


def _leftovers(root: Path, wt: Path, journal: Journal, backup: Backup) -> Backup:
    """Files an interrupted `read-tree` may have written for a target the stack no longer wants:
    untracked now. Set aside rather than deleted: the user's own file may sit there."""
    assert journal.start is not None
    added = set(_paths(_wt_git(wt, ["diff-tree", "-r", "-z", "--name-only", "--diff-filter=A", journal.start, journal.to])))
    files = [p for p in _paths(_wt_git(wt, ["ls-files", "-z", "--others"])) if p in added]
    if not files:
        return backup
    folder = _set_aside(root, wt, backup.folder.parent.name if backup.folder else _stamp(), files)
    return Backup(backup.refs, folder, backup.files + tuple(files))


def move_worktree(git_dir: Path, wt: Path, branch: str, current: str | None, new: str, *,
                  force: bool = False, journal: Journal | None = None) -> str:
    """Moves WT from CURRENT (None: not there yet) to NEW on BRANCH. JOURNAL, when given, is the
    record of an interrupted move: the worktree is ours mid-way and is reset to NEW."""
    if current is None:
        try:
            create_worktree(git_dir, wt, ApplyError)
            _crash_point("cloned")
            _wt_git(wt, ["-c", "checkout.workers=0", "checkout", "-q", "-B", branch, new])
        except ApplyError:
            shutil.rmtree(wt, ignore_errors=True)  # a failure we saw (a kill leaves the journal)
            raise
        action = "created"
    elif force or journal is not None:
        _wt_git(wt, ["-c", "checkout.workers=0", "checkout", "-q", "-f", "-B", branch, new],
                hint="free disk space (or fix what git names), then re-run: the move is journaled and finishes by itself")
        action = "updated"
    else:
        # Parallel checkout: writing the changed files is most of an apply's wall time.
        proc = _wt_git(wt, ["-c", "checkout.workers=0", "read-tree", "-m", "-u", current, new], check=False)
        if proc.returncode != 0:
            err = proc.stderr.decode(errors="replace")
            if "would be overwritten" in err or "would be removed" in err:
                # read-tree checks every path before writing one: nothing moved.
                raise _MoveRefused(f"git read-tree refused: {err.strip().splitlines()[0]}", where=str(wt),
                                   hint="an untracked file in the worktree is in the way; move it and re-run")
            cause = hint_for(proc.stderr, wt) or "fix what git names"
            raise ApplyError(f"git read-tree failed: {err.strip().splitlines()[-1] if err.strip() else proc.returncode}",
                             where=str(wt), hint=f"{cause}; the move is journaled: a re-run finishes it by itself")
        _crash_point("read-tree")
        _wt_git(wt, ["update-ref", f"refs/heads/{branch}", new, current])
        action = "updated"
    _crash_point("moved")
    keep_alive(git_dir, wt, new)
    return action


class _MoveRefused(ApplyError):
    """A move git refused before writing anything: there is nothing to finish."""


# The worktree borrows the mirror's objects: a ref there keeps `git gc` from pruning them. One
# ref per worktree, named by a hash of its absolute path, so two work dirs of one stack never
# share (or overwrite) one; the map beside them names the paths, to drop refs of deleted ones.
APPLIED_MAP = "stackbuild-worktrees.json"


def applied_ref(wt: Path) -> str:
    return f"refs/stackbuild/applied/{sha256(str(wt.absolute()).encode())[:32]}"


def keep_alive(git_dir: Path, wt: Path, head: str) -> None:
    git(["update-ref", applied_ref(wt), head], git_dir=git_dir, check=False)
    path = git_dir / APPLIED_MAP
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if not isinstance(known, dict):
        known = {}
    gone = [ref for ref, where in known.items() if not (Path(str(where)) / ".git").exists()]
    for ref in gone:
        git(["update-ref", "-d", ref], git_dir=git_dir, check=False)
        del known[ref]
    if gone or known.get(applied_ref(wt)) != str(wt.absolute()):
        known[applied_ref(wt)] = str(wt.absolute())
        atomic_write(path, json.dumps(known, indent=1, sort_keys=True).encode(), durable=False)  # a lost entry only keeps a ref


def journaled_move(root: Path, source: str, git_dir: Path, wt: Path, branch: str, current: str | None, new: str, *,
                   force: bool = False, journal: Journal | None = None, recorded: str | None = None,
                   record: Callable[[], None]) -> tuple[str, Backup]:
    """One worktree move of apply, journaled in ROOT: the journal is written before the worktree
    changes and removed once RECORD has noted the new head, so a kill anywhere in between leaves
    the journal for the next run to finish from. JOURNAL: the one an interrupted move left."""
    backup = Backup()
    if current is not None and (force or journal is not None):
        backup = _back_up(root, wt, branch, recorded, new, commits=journal is None)
    path = _write_journal(root, source, current, new, branch)
    _crash_point("journaled")
    try:
        action = move_worktree(git_dir, wt, branch, current, new, force=force, journal=journal)
    except _MoveRefused:
        path.unlink()
        raise
    except ApplyError:
        if current is None:  # the half-made worktree is gone already
            path.unlink()
        raise
    if journal is not None and journal.start is not None and journal.to != new:
        backup = _leftovers(root, wt, journal, backup)
    record()
    _crash_point("recorded")
    path.unlink()
    return action, backup


def refuse_during_rebase(root: Path, stack: str, source: str) -> None:
    state_dir = state_dir_for(root.parent, stack)
    if source in sources_in_progress(state_dir):
        raise ApplyError(f"a rebase of '{source}' is in progress in this work directory", where=str(state_dir / f"{source}.json"),
                         hint=f"finish it (`stackbuild rebase --continue`) or undo it (`stackbuild rebase --abort`) "
                              f"before applying '{stack}'")


def record_worktree(root: Path, source: str, *, git_dir: Path, base: str, head: str) -> None:
    """Note a worktree's new head made outside `apply` (a finished rebase) in the stack's work
    folder ROOT, so the next apply moves it without --force. No digest: that apply replays the
    exported files."""
    path = root / STATE_FILE
    state: dict = json.loads(path.read_text()) if path.is_file() else {"stack": root.name, "sources": {}}
    state["sources"][source] = {"git_dir": str(git_dir), "base": base, "head": head, "digest": None, "patches": []}
    atomic_write(path, json.dumps(state, indent=2).encode())


# ---- status


def status(settings: Settings, config: Config, names: Sequence[str]) -> list[dict]:
    """What is applied where, and what is stale: patch files changed since the worktree was made."""
    rows = []
    for name in names or sorted(config.stacks):
        stack = config.stack(name)
        state = read_state(settings, name)
        current = {src: {d.label: d.sha256 for d in digests}
                   for src, digests in stack_patch_digests(config, stack).items()}
        for src in stack.sources:
            wt = stack_dir(settings, name) / src.name
            rec = state["sources"].get(src.name)
            row = {"stack": name, "source": src.name, "worktree": str(wt), "applied": bool(rec and (wt / ".git").exists())}
            if row["applied"]:
                recorded = {p["patch"]: p["sha256"] for p in rec["patches"]}
                now = current.get(src.name, {})
                changed = sorted(k for k in now if recorded.get(k) not in (None, now[k]))
                added = sorted(k for k in now if k not in recorded)
                removed = sorted(k for k in recorded if k not in now)
                head = _wt_git(wt, ["rev-parse", "HEAD"]).stdout.decode().strip()
                dirty = bool(_wt_git(wt, ["status", "--porcelain", "--untracked-files=no"]).stdout.strip())
                row.update({
                    "head": head, "pin": src.pin, "base": rec["base"], "complete": rec.get("digest") is not None,
                    "stale": bool(changed or added or removed) or rec["base"] != (src.commit or rec["base"]),
                    "changed": changed, "added": added, "removed": removed,
                    "moved": head != rec["head"], "dirty": dirty,
                })
            rows.append(row)
    return rows
