"""Rebasing a source's patches onto a new upstream commit: a resumable, reportable state machine.

Every patch is first tried in memory (a throw-away index, objects only): applied as is
(`unchanged`), applied at other line numbers (`moved`), or found already upstream by applying it
in reverse (`upstream`). Only a patch that needs a real three-way merge touches the worktree: git
cherry-picks its old commit (base = the old pin plus the patches before it, renames followed) and
either succeeds (`merged`) or stops with conflict markers (`conflict`).

State lives in work/<stack>/.rebase/<source>.json, rewritten atomically after every step, beside
byte copies of stack.toml and the series' files taken before anything changed. A killed process
loses at most the step it was in: `--continue` redoes it, `--abort` puts pins, patch files and the
worktree back exactly as they were.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Mapping, Sequence, cast

from . import sources
from .replay import ALREADY, CLEAN, OFFSET, THREEWAY, Replayer, replay
from .worktrees import (STATE_FILE, create_worktree, rebase_state_path, record_worktree, sources_in_progress, state_dir_for,
                        work_lock)
from .bisection import History, Upstream
from .config import Config, ResolvedStack
from .errors import ExportError, RebaseError
from .export import SeriesSpec, apply_export, canonical_range, plan_export, series_specs
from .fsutil import atomic_write
from .git import EMAIL, EPOCH, IDENTITY, git, out
from .patches import Patch, parse_patch
from .rebase_report import (FileCommits, PathChange, commits_by_file, markdown, merged_files, path_changes,
                            plain_failures, pr_number, touched)
from .series import load_stack_patches, series_fuzz
from .sources import git_source
from .settings import Settings

STATE_VERSION = 1
# The engine's committer: a commit made by a merge or a resolution looks like one made by apply.
FIXED_IDENTITY = {"GIT_COMMITTER_NAME": IDENTITY, "GIT_COMMITTER_EMAIL": EMAIL, "GIT_COMMITTER_DATE": EPOCH}
BATCH = 25  # in-memory commits per fast-import: few processes, and a crash repeats at most this many


# ---------------------------------------------------------------------------------------------
# models


@dataclass(frozen=True)
class Item:
    """One patch to replay: its series entry and its commit on top of the old pin."""

    series: str
    name: str
    old_commit: str


@dataclass(frozen=True)
class Plan:
    """Everything a rebase needs, gathered once from stack.toml, the mirror and the series."""

    stack: str
    source: str
    git_dir: Path  # the mirror: commits and objects live here
    worktree: Path
    branch: str
    old_pin: str
    onto: str
    items: tuple[Item, ...]
    root: Path
    stack_file: Path
    series: tuple[SeriesSpec, ...]
    current: Mapping[tuple[str, str], bytes] = field(repr=False)
    state_dir: Path


@dataclass(frozen=True)
class Result:
    series: str
    name: str
    outcome: str
    commit: str | None = None
    dropped: bool = False
    files: tuple[str, ...] = ()
    insertions: int = 0
    deletions: int = 0
    breaking: Upstream | None = None
    conflicted_files: tuple[str, ...] = ()  # conflicts left after the three-way merge
    upstream_commits: tuple[Upstream, ...] = ()
    merged_files: tuple[str, ...] = ()  # the plain apply failed on these, the three-way merge took them
    path_changes: tuple[PathChange, ...] = ()  # files of the patch upstream renamed or deleted
    commits_by_file: tuple[FileCommits, ...] = ()  # per conflicted file, the upstream commits touching it


@dataclass(frozen=True)
class State:
    stack: str
    source: str
    phase: str  # replaying | stopped | exporting
    git_dir: str  # where commits are made: the worktree's repository
    mirror: str
    worktree: str
    branch: str
    old_pin: str
    onto: str
    root: str
    stack_file: str
    items: tuple[Item, ...]
    series: tuple[SeriesSpec, ...]
    current: Mapping[str, str]  # "series/name" -> base64 of the decoded patch at start
    before: Mapping[str, object]  # worktree and branch as they were
    backups: tuple[str, ...]  # files (relative to root) copied before anything changed
    backup_dirs: tuple[str, ...]  # patch dirs whose new files an abort removes
    options: Mapping[str, bool]
    next: int = 0
    head: str = ""
    results: tuple[Result, ...] = ()
    stop: str = ""  # why the replay stopped: conflict | upstream


@dataclass(frozen=True)
class Report:
    stack: str
    source: str
    old_pin: str
    onto: str
    status: str  # finished | stopped | aborted
    results: tuple[Result, ...]
    stopped_at: Result | None = None
    export: Mapping | None = None

    def to_json(self) -> dict:
        return {
            "stack": self.stack, "source": self.source, "old_pin": self.old_pin, "onto": self.onto,
            "status": self.status, "results": [asdict(r) for r in self.results],
            "stopped_at": asdict(self.stopped_at) if self.stopped_at else None, "export": self.export,
        }


# ---------------------------------------------------------------------------------------------
# state on disk


def _backup_dir(state_dir: Path, source: str) -> Path:
    return state_dir / f"{source}.backup"


def _to_json(state: State) -> dict:
    data = asdict(state)
    data["version"] = STATE_VERSION
    data["series"] = [{**asdict(s), "patch_dir": str(s.patch_dir), "remote": sorted(s.remote)} for s in state.series]
    return data


def _from_json(data: dict) -> State:
    if data.get("version") != STATE_VERSION:
        raise RebaseError(f"rebase state has version {data.get('version')}, expected {STATE_VERSION}",
                          hint="finish or --abort it with the stackbuild version that started it")

    def up(d: dict | None) -> Upstream | None:
        return Upstream(**d) if d else None

    results = tuple(
        Result(**{**r, "files": tuple(r["files"]), "conflicted_files": tuple(r["conflicted_files"]),
                  "breaking": up(r["breaking"]), "upstream_commits": tuple(Upstream(**u) for u in r["upstream_commits"]),
                  "merged_files": tuple(r.get("merged_files", ())),
                  "path_changes": tuple(PathChange(**c) for c in r.get("path_changes", ())),
                  "commits_by_file": tuple(FileCommits(c["path"], tuple(c["commits"]))
                                           for c in r.get("commits_by_file", ()))})
        for r in data["results"])
    series = tuple(SeriesSpec(**{**s, "patch_dir": Path(s["patch_dir"]), "remote": frozenset(s["remote"])})
                   for s in data["series"])
    fields = {k: v for k, v in data.items() if k != "version"}
    return State(**{**fields, "items": tuple(Item(**i) for i in data["items"]), "series": series,
                    "results": results, "backups": tuple(data["backups"]), "backup_dirs": tuple(data["backup_dirs"])})


def save_state(state_dir: Path, state: State) -> None:
    atomic_write(rebase_state_path(state_dir, state.source), json.dumps(_to_json(state), indent=1).encode())


def load_state(state_dir: Path, source: str) -> State:
    path = rebase_state_path(state_dir, source)
    if not path.is_file():
        raise RebaseError(f"no rebase of '{source}' in progress", where=str(path),
                          hint="start one with `stackbuild rebase STACK --source SOURCE --onto REF`")
    try:
        return _from_json(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, KeyError, TypeError) as exc:
        raise RebaseError(f"rebase state is unreadable: {exc}", where=str(path),
                          hint="restore it, or delete it and the .backup folder beside it by hand") from None


# ---------------------------------------------------------------------------------------------
# git helpers specific to replaying


def replay_patches(git_dir: Path, old_pin: str, items: Sequence[Item]) -> list[Patch]:
    """The old commits as mail patches (one git process): the engine commits each with the same
    message, author and date, so a replayed commit equals what `apply` makes of its export."""
    if not items:
        return []
    mails = canonical_range(git_dir, old_pin, items[-1].old_commit)
    if len(mails) != len(items):
        raise RebaseError(f"the old series commits are not one linear chain on {old_pin[:12]}", where=str(git_dir),
                          hint="re-run the rebase from the start (--abort, then rebase again)")
    return [parse_patch(m, series=it.series, name=it.name, where=f"{it.series}/{it.name}@{it.old_commit[:12]}")
            for it, m in zip(items, mails)]


def _numbers(patch: Patch) -> tuple[tuple[str, ...], int, int]:
    return (tuple(dict.fromkeys(f.path for f in patch.files)), sum(f.added for f in patch.files),
            sum(f.removed for f in patch.files))


def diff_numbers(git_dir: Path, parent: str, commit: str) -> tuple[tuple[str, ...], int, int]:
    files: list[str] = []
    add = rem = 0
    for line in out(["diff-tree", "-r", "--numstat", "-M", parent, commit], git_dir=git_dir, error=RebaseError).splitlines():
        a, r, path = line.split("\t", 2)
        files.append(path)
        add += int(a) if a != "-" else 0
        rem += int(r) if r != "-" else 0
    return tuple(files), add, rem


# ---------------------------------------------------------------------------------------------
# the state machine


def _git_wt(state: State, *args: str, check: bool = True, env: Mapping[str, str] | None = None):
    return git(list(args), cwd=Path(state.worktree), env=env, check=check, error=RebaseError)


def _take_backups(plan: Plan) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Byte copies of stack.toml, every file in the series' folders and apply's record of the
    worktree, complete (renamed into place) before anything changes."""
    files = [plan.stack_file]
    record = plan.state_dir.parent / STATE_FILE
    if record.is_file():
        files.append(record)
    for spec in plan.series:
        if spec.patch_dir.is_dir():
            files += [p for p in sorted(spec.patch_dir.rglob("*")) if p.is_file()]
    final = _backup_dir(plan.state_dir, plan.source)
    shutil.rmtree(final, ignore_errors=True)  # left by a start that died before saving its state
    plan.state_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=plan.state_dir, prefix=f".{plan.source}.backup."))
    for number, f in enumerate(files):
        shutil.copy2(f, tmp / f"{number:05d}")
    os.replace(tmp, final)
    return tuple(str(f) for f in files), tuple(str(spec.patch_dir) for spec in plan.series)


def _worktree_before(plan: Plan) -> dict:
    before: dict = {"exists": False}
    if (plan.worktree / ".git").exists():
        status = out(["status", "--porcelain", "--untracked-files=no"], cwd=plan.worktree, error=RebaseError)
        if status:
            raise RebaseError(f"worktree has uncommitted changes: {status.splitlines()[0]} …", where=str(plan.worktree),
                              hint="commit or discard them (`git -C WORKTREE stash`) before rebasing")
        head_ref = git(["symbolic-ref", "-q", "HEAD"], cwd=plan.worktree, check=False).stdout.decode().strip()
        branch = git(["rev-parse", "--verify", "-q", f"refs/heads/{plan.branch}"], cwd=plan.worktree, check=False)
        before.update(exists=True, head=out(["rev-parse", "HEAD"], cwd=plan.worktree, error=RebaseError),
                      head_ref=head_ref or None, branch_head=branch.stdout.decode().strip() or None)
    elif plan.worktree.exists() and any(plan.worktree.iterdir()):
        raise RebaseError("the worktree folder exists but is not a git worktree", where=str(plan.worktree),
                          hint="move it away; stackbuild will not overwrite files it did not create")
    return before


def _prepare_worktree(plan: Plan, before: Mapping) -> None:
    """The worktree apply makes: a clone sharing the mirror's objects, on the stack's branch."""
    wt = plan.worktree
    if not before["exists"]:
        create_worktree(plan.git_dir, wt, RebaseError)
    git(["update-ref", f"refs/heads/{plan.branch}", plan.onto], cwd=wt, error=RebaseError)
    git(["symbolic-ref", "HEAD", f"refs/heads/{plan.branch}"], cwd=wt, error=RebaseError)


def start(plan: Plan, *, drop_merged: bool = False, decode: bool = False, refresh_context: bool = False) -> Report:
    with work_lock(plan.state_dir.parent, plan.source):
        state = begin(plan, drop_merged=drop_merged, decode=decode, refresh_context=refresh_context)
        return advance(plan.state_dir, state)


def begin(plan: Plan, *, drop_merged: bool = False, decode: bool = False, refresh_context: bool = False,
          defer_export: bool = False) -> State:
    """Backups, the first state and the worktree on the new branch; the caller holds the lock.
    DEFER_EXPORT: the replay stops at phase `replayed` and the caller runs `finish` (a rebase of
    several sources exports them all once every replay is done)."""
    if rebase_state_path(plan.state_dir, plan.source).exists():
        raise RebaseError(f"a rebase of '{plan.source}' is already in progress",
                          where=str(rebase_state_path(plan.state_dir, plan.source)),
                          hint="`stackbuild rebase --continue`, `--skip` or `--abort` it first")
    before = _worktree_before(plan)
    backups, dirs = _take_backups(plan)
    state = State(
        # Commits are made in the worktree's own repository, which sees the mirror's objects.
        stack=plan.stack, source=plan.source, phase="replaying", git_dir=str(plan.worktree / ".git"),
        mirror=str(plan.git_dir),
        worktree=str(plan.worktree), branch=plan.branch, old_pin=plan.old_pin, onto=plan.onto,
        root=str(plan.root), stack_file=str(plan.stack_file), items=plan.items, series=plan.series,
        current={f"{s}/{n}": base64.b64encode(b).decode() for (s, n), b in plan.current.items()},
        before=before, backups=backups, backup_dirs=dirs,
        options={"drop_merged": drop_merged, "decode": decode, "refresh_context": refresh_context,
                 "defer_export": defer_export},
        head=plan.onto,
    )
    save_state(plan.state_dir, state)
    _prepare_worktree(plan, before)
    return state


def resume(state_dir: Path, source: str, action: str) -> Report:
    """action: continue | skip | abort."""
    with work_lock(state_dir.parent, source):
        return resume_locked(state_dir, source, action)


def resume_locked(state_dir: Path, source: str, action: str) -> Report:
    state = load_state(state_dir, source)
    if action == "abort":
        return abort(state_dir, state)
    if action == "skip":
        if state.phase != "stopped":
            raise RebaseError("nothing to skip: the rebase is not stopped at a patch",
                              hint="`stackbuild rebase --continue` resumes it")
        stopped = state.results[-1]
        _git_wt(state, "reset", "--hard", "-q", state.head)
        state = replace(state, phase="replaying", next=state.next + 1, stop="",
                        results=state.results[:-1] + (replace(stopped, dropped=True),))
        save_state(state_dir, state)
    elif state.phase == "stopped":
        state = _continue_stopped(state)
        save_state(state_dir, state)
    return advance(state_dir, state)


def _continue_stopped(state: State) -> State:
    stopped = state.results[-1]
    if state.stop == "upstream":
        raise RebaseError(f"{stopped.series}/{stopped.name} is already upstream and cannot be replayed",
                          hint="`stackbuild rebase --skip` drops it, `--abort` undoes the rebase")
    unmerged = out(["diff", "--name-only", "--diff-filter=U"], cwd=Path(state.worktree), error=RebaseError)
    if unmerged:
        raise RebaseError(f"unresolved conflicts in {', '.join(unmerged.split())}", where=state.worktree,
                          hint="edit the files, `git add` them, then `stackbuild rebase --continue`")
    if git(["diff", "--quiet"], cwd=Path(state.worktree), check=False, error=RebaseError).returncode:
        raise RebaseError("the worktree has changes that are not staged", where=state.worktree,
                          hint="`git add` the resolution (or `git checkout -- FILE` to drop it), then --continue")
    item = state.items[state.next]
    head = out(["rev-parse", "HEAD"], cwd=Path(state.worktree), error=RebaseError)
    if head != state.head:
        # The user committed the resolution themselves: accept it if it sits right on our head.
        if out(["rev-parse", f"{head}^"], cwd=Path(state.worktree), error=RebaseError) != state.head:
            raise RebaseError("HEAD moved away from the replay", where=state.worktree,
                              hint=f"reset it: git reset --hard {state.head[:12]}, or --abort")
        commit = head
    elif git(["diff", "--cached", "--quiet", "HEAD"], cwd=Path(state.worktree), check=False, error=RebaseError).returncode == 0:
        _git_wt(state, "reset", "--hard", "-q", state.head)
        result = replace(stopped, dropped=True)
        return replace(state, phase="replaying", next=state.next + 1, stop="", results=state.results[:-1] + (result,))
    else:
        _git_wt(state, "commit", "-q", "--no-verify", "--allow-empty-message", "-C", item.old_commit, env=FIXED_IDENTITY)
        commit = out(["rev-parse", "HEAD"], cwd=Path(state.worktree), error=RebaseError)
    files, add, rem = diff_numbers(Path(state.git_dir), state.head, commit)
    result = replace(stopped, commit=commit, files=files, insertions=add, deletions=rem)
    return replace(state, phase="replaying", next=state.next + 1, head=commit, stop="",
                   results=state.results[:-1] + (result,))


def advance(state_dir: Path, state: State) -> Report:
    if state.phase == "stopped":
        return report_of(state, "stopped")
    if state.phase == "replaying":
        # A crash mid-step left the worktree anywhere: the state's head is the truth.
        _git_wt(state, "reset", "--hard", "-q", state.head)
        state = _replay(state_dir, state)
        if state.phase == "stopped":
            return report_of(state, "stopped")
        _git_wt(state, "reset", "--hard", "-q", state.head)
        state = replace(state, phase="replayed" if state.options.get("defer_export") else "exporting")
        save_state(state_dir, state)
    if state.phase == "replayed":
        return report_of(state, "replayed")
    return finish(state_dir, state)


def finish(state_dir: Path, state: State, *, keep_state: bool = False) -> Report:
    """Export, pin move, apply's record and the report of a finished replay. Safe to repeat (a
    crash here is redone by the next run): the same commits give the same files. KEEP_STATE keeps
    the state and backups, so a rebase of several sources can still abort them all."""
    export = _export(state)
    record_worktree(state_dir.parent, state.source, git_dir=Path(state.mirror), base=state.onto, head=state.head)
    report = report_of(state, "finished", export=export.to_json())
    _write_report(state_dir, report)
    if not keep_state:
        cleanup(state_dir, state.source)
    return report


def _replay(state_dir: Path, state: State) -> State:
    """Patches that apply in memory are batched into one fast-import; the state is saved at each
    flush, so a crash only repeats the unflushed part (same inputs, same commits)."""
    git_dir = Path(state.git_dir)
    patches = replay_patches(git_dir, state.old_pin, state.items)
    paths = {p for patch in patches for p in patch.paths}
    # Built on first need, then shared: the culprits of several patches reuse each other's probes.
    history = functools.cache(lambda: History(git_dir, state.old_pin, state.onto, patches))
    changes = functools.cache(lambda: path_changes(git_dir, state.old_pin, state.onto))
    batch: list[tuple[Result, Patch | None]] = []
    replayer: Replayer | None = None

    def settle(state: State) -> State:
        if not batch:
            return state
        assert replayer is not None
        replayer.flush()
        head, done = state.head, []
        for result, patch in batch:
            if patch is not None:
                parent, head = head, replayer.commits[id(patch)]
                result = replace(result, commit=head)
                if result.outcome == "merged":
                    result = _detailed(git_dir, result, patch, parent, changes())
            done.append(result)
        state = replace(state, next=state.next + len(batch), head=head, results=state.results + tuple(done))
        batch.clear()
        save_state(state_dir, state)
        return state

    def stop(state: State, result: Result) -> State:
        state = replace(state, phase="stopped", stop=result.outcome, results=state.results + (result,))
        save_state(state_dir, state)
        return state

    try:
        while state.next + len(batch) < len(state.items):
            k = state.next + len(batch)
            item, patch = state.items[k], patches[k]
            if replayer is None:
                replayer = Replayer(git_dir, state.head, paths=paths)
            verdict = replayer.step(patch, track=False)
            if verdict.outcome == ALREADY:
                result = replace(_upstream_result(state, k, patches, history), path_changes=touched(patch, changes()))
                if not state.options["drop_merged"]:
                    return stop(settle(state), result)
                batch.append((result, None))
                continue
            if verdict.ok and verdict.outcome in (CLEAN, OFFSET, THREEWAY):
                word = {CLEAN: "unchanged", OFFSET: "moved", THREEWAY: "merged"}[verdict.outcome]
                breaking = _breaking(history(), k) if word == "merged" else None
                batch.append((Result(item.series, item.name, word, None, False, *_numbers(patch), breaking), patch))
                if len(batch) >= BATCH:
                    state = settle(state)  # the engine goes on from the flushed head
                continue
            state = settle(state)
            replayer.close()
            replayer = None  # the worktree takes over; a fresh engine starts from the next head
            result, head = _pick(state, k, patches, history, changes)
            if result.outcome == "conflict" or (result.outcome == "upstream" and not state.options["drop_merged"]):
                return stop(state, result)
            state = replace(state, next=k + 1, head=head, results=state.results + (result,))
            save_state(state_dir, state)
        return settle(state)
    finally:
        if replayer is not None:
            replayer.close()


def _pick(state: State, k: int, patches: Sequence[Patch], history: Callable[[], History],
          changes: Callable[[], Mapping[str, PathChange]]) -> tuple[Result, str]:
    """A real three-way merge in the worktree: base = the old commit's parent, renames followed."""
    git_dir, item = Path(state.git_dir), state.items[k]
    _git_wt(state, "reset", "--hard", "-q", state.head)
    pick = _git_wt(state, "cherry-pick", "--no-rerere-autoupdate", item.old_commit, env=FIXED_IDENTITY, check=False)
    if pick.returncode == 0:
        commit = out(["rev-parse", "HEAD"], cwd=Path(state.worktree), error=RebaseError)
        files, add, rem = diff_numbers(git_dir, state.head, commit)
        merged = Result(item.series, item.name, "merged", commit, False, files, add, rem, _breaking(history(), k))
        return _detailed(git_dir, merged, patches[k], state.head, changes()), commit
    conflicted = tuple(out(["diff", "--name-only", "--diff-filter=U"], cwd=Path(state.worktree), error=RebaseError).split())
    if not conflicted:
        # The merge came out empty: upstream already has the change, in another shape.
        _git_wt(state, "reset", "--hard", "-q", state.head)
        return replace(_upstream_result(state, k, patches, history), path_changes=touched(patches[k], changes())), state.head
    files, add, rem = _numbers(patches[k])
    upstream = _touching(git_dir, state.old_pin, state.onto, sorted(set(conflicted) | set(files)))
    result = Result(item.series, item.name, "conflict", None, False, files, add, rem, _breaking(history(), k),
                    conflicted, upstream, commits_by_file=commits_by_file(git_dir, state.old_pin, state.onto, conflicted))
    return _detailed(git_dir, result, patches[k], state.head, changes()), state.head


def _detailed(git_dir: Path, result: Result, patch: Patch, parent: str, changes: Mapping[str, PathChange]) -> Result:
    """What the maintainer's report adds to a patch that needed the three-way merge."""
    plain = plain_failures(git_dir, parent, patch)
    return replace(result, merged_files=merged_files(plain, result.conflicted_files, changes),
                   path_changes=touched(patch, changes))


def _upstream_result(state: State, k: int, patches: Sequence[Patch], history: Callable[[], History]) -> Result:
    item = state.items[k]
    return Result(item.series, item.name, "upstream", None, bool(state.options["drop_merged"]), *_numbers(patches[k]),
                  breaking=_breaking(history(), k))


def _touching(git_dir: Path, old: str, new: str, paths: Sequence[str], limit: int = 20) -> tuple[Upstream, ...]:
    """Upstream commits since the old pin that changed the conflicted files, newest first."""
    if not paths:
        return ()
    text = out(["log", f"--max-count={limit}", "--format=%H%x1f%s%x1f%an <%ae>%x1f%cI", f"{old}..{new}", "--", *paths],
               git_dir=git_dir, error=RebaseError)
    rows = [line.split("\x1f") for line in text.splitlines() if line]
    return tuple(Upstream(sha, subject, author, date, pr_number(subject)) for sha, subject, author, date in rows)


def _breaking(history: History, k: int) -> Upstream | None:
    """The first commit after the old pin at which patch k (on the ones before it) stops applying."""
    found = history.boundary(k)
    return found.commit if found else None


def _export(state: State):
    # Keys are "series/name", as the state was written.
    current = cast("dict[tuple[str, str], bytes]", {tuple(k.split("/", 1)): base64.b64decode(v) for k, v in state.current.items()})
    try:
        result = plan_export(
            git_dir=Path(state.git_dir), base=state.onto, head=state.head, root=Path(state.root),
            stack_file=Path(state.stack_file), source=state.source, series=state.series, current=current,
            pin_to=state.onto, decode_all=bool(state.options["decode"]),
            refresh_context=bool(state.options["refresh_context"]),
        )
    except ExportError as exc:
        raise RebaseError(f"replay finished but export failed: {exc.message}", where=exc.where,
                          hint=(exc.hint or "") + "; fix it, then `stackbuild rebase --continue` (or --abort)") from None
    apply_export(result)
    return result


def abort(state_dir: Path, state: State) -> Report:
    backup = _backup_dir(state_dir, state.source)
    kept = set(state.backups)
    for folder in state.backup_dirs:
        if Path(folder).is_dir():
            for p in Path(folder).rglob("*"):
                if p.is_file() and str(p) not in kept:
                    p.unlink()
    for number, name in enumerate(state.backups):
        dest, saved = Path(name), (backup / f"{number:05d}").read_bytes()
        if not dest.is_file() or dest.read_bytes() != saved:
            atomic_write(dest, saved)
    _restore_worktree(state)
    report = report_of(state, "aborted")
    cleanup(state_dir, state.source)
    return report


def _restore_worktree(state: State) -> None:
    before, wt = state.before, Path(state.worktree)
    if not before["exists"]:
        shutil.rmtree(wt, ignore_errors=True)
        return
    branch_ref = f"refs/heads/{state.branch}"
    if before["branch_head"]:
        git(["update-ref", branch_ref, str(before["branch_head"])], cwd=wt, error=RebaseError)
    else:
        git(["update-ref", "-d", branch_ref], cwd=wt, check=False)
    if before.get("head_ref"):
        git(["symbolic-ref", "HEAD", str(before["head_ref"])], cwd=wt, error=RebaseError)
    else:
        git(["update-ref", "--no-deref", "HEAD", str(before["head"])], cwd=wt, error=RebaseError)
    # reset also drops a half-done cherry-pick (CHERRY_PICK_HEAD) and its conflict markers
    git(["reset", "--hard", "-q", str(before["head"])], cwd=wt, error=RebaseError)


def cleanup(state_dir: Path, source: str) -> None:
    shutil.rmtree(_backup_dir(state_dir, source), ignore_errors=True)
    rebase_state_path(state_dir, source).unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # not empty: another source's rebase is still stopped
        state_dir.rmdir()


def report_of(state: State, status: str, export: Mapping | None = None) -> Report:
    return Report(state.stack, state.source, state.old_pin, state.onto, status, state.results,
                  state.results[-1] if status == "stopped" and state.results else None, export)


def _write_report(state_dir: Path, report: Report) -> None:
    atomic_write(state_dir.parent / f"rebase-{report.source}.json", json.dumps(report.to_json(), indent=2).encode())
    atomic_write(state_dir.parent / f"rebase-{report.source}.md", markdown(report).encode())


# ---------------------------------------------------------------------------------------------
# from stack.toml to a plan: the one place that reads the core's sources, series and engine


def _old_commits(mirror: Path, pin: str, patches: Sequence[Patch], resolved: ResolvedStack) -> tuple[Item, ...]:
    replayed = replay(mirror, pin, patches, fuzz_for=lambda p: series_fuzz(resolved, p))
    bad = [r for r in replayed.results if not r.ok or not r.commit]
    if bad:
        raise RebaseError(f"{bad[0].patch.series}/{bad[0].patch.name} does not apply at the current pin ({bad[0].outcome})",
                          hint="fix the series at its own pin first (`stackbuild check`), then rebase")
    return tuple(Item(r.patch.series, r.patch.name, r.commit) for r in replayed.results if r.commit)  # all, after `bad`


def make_plan(settings: Settings, cfg: Config, stack: str, source: str | None, onto: str) -> Plan:
    resolved = cfg.stack(stack)
    src = git_source(cfg, resolved, source)
    mirror = sources.sync(settings, src).git_dir
    patches = load_stack_patches(settings, cfg, resolved).get(src.name, ())
    return Plan(
        stack=stack, source=src.name, git_dir=mirror, worktree=settings.work_dir / stack / src.name,
        branch=f"stackbuild/{stack}", old_pin=str(src.commit), onto=sources.fetch_ref(settings, src, mirror, onto),
        items=_old_commits(mirror, str(src.commit), patches, resolved), root=cfg.root, stack_file=cfg.path,
        series=series_specs(resolved, src.name, patches), current={(p.series, p.name): p.data for p in patches},
        state_dir=state_dir_for(settings.work_dir, stack),
    )


def find_in_progress(settings: Settings, stack: str | None, source: str | None) -> tuple[Path, str]:
    """The state of the one rebase a bare `--continue` means."""
    stacks = [stack] if stack else sorted(p.parent.parent.name for p in settings.work_dir.glob("*/.rebase/*.json"))
    found = [(state_dir_for(settings.work_dir, s), src) for s in dict.fromkeys(stacks)
             for src in sources_in_progress(state_dir_for(settings.work_dir, s)) if source in (None, src)]
    if len(found) != 1:
        raise RebaseError("no rebase in progress" if not found else
                          f"{len(found)} rebases in progress: " + ", ".join(f"{d.parent.name}/{s}" for d, s in found),
                          where=str(settings.work_dir), hint="name it: stackbuild rebase STACK --source SOURCE --continue")
    return found[0]


def rebase_stack(settings: Settings, cfg: Config | None, stack: str | None, source: str | None, *, onto: str | None,
                 action: str | None = None, drop_merged: bool = False, decode: bool = False,
                 refresh_context: bool = False) -> Report:
    """What `stackbuild rebase` does: start a replay, or continue/skip/abort the one in progress."""
    if action:
        if onto:
            raise RebaseError(f"--{action} takes no --onto", hint=f"`stackbuild rebase --{action}`")
        state_dir, src = find_in_progress(settings, stack, source)
        return resume(state_dir, src, action)
    if not stack or not onto or cfg is None:
        raise RebaseError("rebase needs a stack and --onto REF", hint="stackbuild rebase STACK --source vllm --onto REF")
    return start(make_plan(settings, cfg, stack, source, onto), drop_merged=drop_merged, decode=decode,
                 refresh_context=refresh_context)
