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
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Mapping, Sequence, cast

from . import apply, sources
from .config import Config, ResolvedStack, Source
from .errors import ExportError, RebaseError
from .export import ExportResult, SeriesSpec, apply_export, canonical_range, check_failure, plan_export
from .fsutil import atomic_write, locked
from .git import EMAIL, EPOCH, IDENTITY, git, out
from .patches import Patch, parse_patch
from .series import load_stack_patches
from .settings import Settings

STATE_VERSION = 1
# The engine's committer: a commit made by a merge or a resolution looks like one made by apply.
FIXED_IDENTITY = {"GIT_COMMITTER_NAME": IDENTITY, "GIT_COMMITTER_EMAIL": EMAIL, "GIT_COMMITTER_DATE": EPOCH}
OUTCOMES = ("unchanged", "moved", "merged", "upstream", "conflict")
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
class Upstream:
    sha: str
    subject: str
    author: str
    date: str


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
    conflicted_files: tuple[str, ...] = ()
    upstream_commits: tuple[Upstream, ...] = ()


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


def state_dir_for(work_dir: Path, stack: str) -> Path:
    return work_dir / stack / ".rebase"


def _state_path(state_dir: Path, source: str) -> Path:
    return state_dir / f"{source}.json"


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
                  "breaking": up(r["breaking"]), "upstream_commits": tuple(Upstream(**u) for u in r["upstream_commits"])})
        for r in data["results"])
    series = tuple(SeriesSpec(**{**s, "patch_dir": Path(s["patch_dir"]), "remote": frozenset(s["remote"])})
                   for s in data["series"])
    fields = {k: v for k, v in data.items() if k != "version"}
    return State(**{**fields, "items": tuple(Item(**i) for i in data["items"]), "series": series,
                    "results": results, "backups": tuple(data["backups"]), "backup_dirs": tuple(data["backup_dirs"])})


def save_state(state_dir: Path, state: State) -> None:
    atomic_write(_state_path(state_dir, state.source), json.dumps(_to_json(state), indent=1).encode())


def load_state(state_dir: Path, source: str) -> State:
    path = _state_path(state_dir, source)
    if not path.is_file():
        raise RebaseError(f"no rebase of '{source}' in progress", where=str(path),
                          hint="start one with `stackbuild rebase STACK --source SOURCE --onto REF`")
    try:
        return _from_json(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, KeyError, TypeError) as exc:
        raise RebaseError(f"rebase state is unreadable: {exc}", where=str(path),
                          hint="restore it, or delete it and the .backup folder beside it by hand") from None


def sources_in_progress(state_dir: Path) -> list[str]:
    return sorted(p.stem for p in state_dir.glob("*.json")) if state_dir.is_dir() else []


def _locked(state_dir: Path, source: str):
    """apply's lock on the stack's work directory: no apply (or other rebase) moves the worktree
    meanwhile. A kernel lock: a killed process releases it."""
    return locked(state_dir.parent / ".lock", f"the work directory of stack '{state_dir.parent.name}' ({source})")


# ---------------------------------------------------------------------------------------------
# git helpers specific to replaying


def commit_info(git_dir: Path, sha: str) -> Upstream:
    sha_, subject, author, date = out(["log", "-1", "--format=%H%x1f%s%x1f%an <%ae>%x1f%cI", sha],
                                      git_dir=git_dir, error=RebaseError).split("\x1f")
    return Upstream(sha_, subject, author, date)


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


def first_parent_range(git_dir: Path, old: str, new: str) -> list[str]:
    """Commits after `old` up to `new` on new's first-parent line, oldest first."""
    return out(["rev-list", "--first-parent", "--reverse", new, f"^{old}"], git_dir=git_dir, error=RebaseError).split()


# ---------------------------------------------------------------------------------------------
# probes and bisect (objects only, no worktree)


def probe(git_dir: Path, commit: str, patches: Sequence[Patch]) -> tuple[bool, ...]:
    """Which patches apply as they are (clean or at an offset) at `commit`, each on the ones
    before it that did. The engine's own hunk matcher on its in-memory tree: nothing is written
    (no fast-import, no three-way attempt), which is what makes a probe cheap enough to bisect.
    Shapes the matcher leaves to git (binary, copies) go through the engine's full step."""
    engine = apply.Engine(git_dir, commit, paths={p for patch in patches for p in patch.paths})
    try:
        return tuple(engine.probe(patch) for patch in patches)
    finally:
        engine.close()


@dataclass(frozen=True)
class Boundary:
    """A patch stops applying at `commit` while it applied at its first parent `good`."""

    series: str
    name: str
    commit: Upstream | None
    good: str | None
    probes: int
    note: str = ""


@dataclass(frozen=True)
class BisectReport:
    source: str
    old_pin: str
    onto: str
    commits: int
    patches: tuple[Boundary, ...]
    newest_clean: Upstream | None  # newest commit where the whole series still applies as is
    probes: int  # distinct commits probed
    bound: int  # ⌈log2 N⌉ + 2: the most any one patch's search may probe

    def to_json(self) -> dict:
        return asdict(self)


class Prober:
    """Caches whole-series probes per commit, so the searches of several patches share them."""

    def __init__(self, git_dir: Path, patches: Sequence[Patch]):
        self.git_dir, self.patches = git_dir, patches
        self.cache: dict[str, tuple[bool, ...]] = {}

    def __call__(self, commit: str) -> tuple[bool, ...]:
        if commit not in self.cache:
            self.cache[commit] = probe(self.git_dir, commit, self.patches)
        return self.cache[commit]


def search(line: Sequence[str], ok: Callable[[str], bool]) -> tuple[int, int]:
    """Index of the first commit of `line` (line[0] is known good, line[-1] known bad) where `ok`
    fails, keeping the invariant good-at-lo / bad-at-hi, so the answer is always a real
    transition (good at its first parent) even when history is not monotone. Returns (hi, probes).
    """
    lo, hi, probes = 0, len(line) - 1, 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        probes += 1
        if ok(line[mid]):
            lo = mid
        else:
            hi = mid
    return hi, probes


class History:
    """The first-parent line old_pin..onto with a shared prober: every search over it reuses the
    probes of the others (a probe's verdict for patch k depends only on patches 0..k)."""

    def __init__(self, git_dir: Path, old_pin: str, onto: str, patches: Sequence[Patch]):
        self.git_dir = git_dir
        self.line = [old_pin] + first_parent_range(git_dir, old_pin, onto)
        self.prober = Prober(git_dir, patches)

    def boundary(self, k: int) -> Boundary | None:
        """Where patch k stops applying as is; None when it still applies at the end of the line."""
        p, line, prober = self.prober.patches[k], self.line, self.prober
        if prober(line[-1])[k]:
            return None
        if not prober(line[0])[k]:
            return Boundary(p.series, p.name, None, None, 2, "does not apply as is at the old pin either")
        hi, probes = search(line, lambda c: prober(c)[k])
        return Boundary(p.series, p.name, commit_info(self.git_dir, line[hi]), line[hi - 1], probes + 2)


def bisect(git_dir: Path, old_pin: str, onto: str, patches: Sequence[Patch], source: str = "") -> BisectReport:
    history = History(git_dir, old_pin, onto, patches)
    line, prober = history.line, history.prober
    found = [b for b in (history.boundary(k) for k in range(len(patches))) if b is not None]
    at_pin, at_onto = prober(line[0]), prober(line[-1])
    if all(at_onto):
        newest = commit_info(git_dir, line[-1])
    elif not all(at_pin):
        newest = None
    else:
        hi, _ = search(line, lambda c: all(prober(c)))
        newest = commit_info(git_dir, line[hi - 1])
    bound = math.ceil(math.log2(max(len(line) - 1, 1))) + 2
    return BisectReport(source, old_pin, line[-1], len(line) - 1, tuple(found), newest, len(prober.cache), bound)


# ---------------------------------------------------------------------------------------------
# the state machine


def _git_wt(state: State, *args: str, check: bool = True, env: Mapping[str, str] | None = None):
    return git(list(args), cwd=Path(state.worktree), env=env, check=check, error=RebaseError)


def _take_backups(plan: Plan) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Byte copies of stack.toml, every file in the series' folders and apply's record of the
    worktree, complete (renamed into place) before anything changes."""
    files = [plan.stack_file]
    record = plan.state_dir.parent / apply.STATE_FILE
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
        apply.create_worktree(plan.git_dir, wt, RebaseError)
    git(["update-ref", f"refs/heads/{plan.branch}", plan.onto], cwd=wt, error=RebaseError)
    git(["symbolic-ref", "HEAD", f"refs/heads/{plan.branch}"], cwd=wt, error=RebaseError)


def start(plan: Plan, *, drop_merged: bool = False, decode: bool = False, refresh_context: bool = False) -> Report:
    with _locked(plan.state_dir, plan.source):
        if _state_path(plan.state_dir, plan.source).exists():
            raise RebaseError(f"a rebase of '{plan.source}' is already in progress",
                              where=str(_state_path(plan.state_dir, plan.source)),
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
            options={"drop_merged": drop_merged, "decode": decode, "refresh_context": refresh_context},
            head=plan.onto,
        )
        save_state(plan.state_dir, state)
        _prepare_worktree(plan, before)
        return _run(plan.state_dir, state)


def resume(state_dir: Path, source: str, action: str) -> Report:
    """action: continue | skip | abort."""
    with _locked(state_dir, source):
        state = load_state(state_dir, source)
        if action == "abort":
            return _abort(state_dir, state)
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
        return _run(state_dir, state)


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


def _run(state_dir: Path, state: State) -> Report:
    if state.phase == "stopped":
        return _report(state, "stopped")
    if state.phase == "replaying":
        # A crash mid-step left the worktree anywhere: the state's head is the truth.
        _git_wt(state, "reset", "--hard", "-q", state.head)
        state = _replay(state_dir, state)
        if state.phase == "stopped":
            return _report(state, "stopped")
        _git_wt(state, "reset", "--hard", "-q", state.head)
        state = replace(state, phase="exporting")
        save_state(state_dir, state)
    export = _export(state)
    apply.record_worktree(state_dir.parent, state.source, git_dir=Path(state.mirror), base=state.onto, head=state.head)
    report = _report(state, "finished", export=export.to_json())
    _write_report(state_dir, report)
    _cleanup(state_dir, state.source)
    return report


def _replay(state_dir: Path, state: State) -> State:
    """Patches that apply in memory are batched into one fast-import; the state is saved at each
    flush, so a crash only repeats the unflushed part (same inputs, same commits)."""
    git_dir = Path(state.git_dir)
    patches = replay_patches(git_dir, state.old_pin, state.items)
    paths = {p for patch in patches for p in patch.paths}
    # Built on first need, then shared: the culprits of several patches reuse each other's probes.
    history = functools.cache(lambda: History(git_dir, state.old_pin, state.onto, patches))
    batch: list[tuple[Result, Patch | None]] = []
    engine: apply.Engine | None = None

    def settle(state: State) -> State:
        if not batch:
            return state
        assert engine is not None
        engine.flush()
        head, done = state.head, []
        for result, patch in batch:
            if patch is not None:
                head = engine.commits[id(patch)]
                result = replace(result, commit=head)
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
            if engine is None:
                engine = apply.Engine(git_dir, state.head, paths=paths)
            verdict = engine.step(patch, track=False)
            if verdict.outcome == apply.ALREADY:
                result = _upstream_result(state, k, patches, history)
                if not state.options["drop_merged"]:
                    return stop(settle(state), result)
                batch.append((result, None))
                continue
            if verdict.ok and verdict.outcome in (apply.CLEAN, apply.OFFSET, apply.THREEWAY):
                word = {apply.CLEAN: "unchanged", apply.OFFSET: "moved", apply.THREEWAY: "merged"}[verdict.outcome]
                breaking = _breaking(history(), k) if word == "merged" else None
                batch.append((Result(item.series, item.name, word, None, False, *_numbers(patch), breaking), patch))
                if len(batch) >= BATCH:
                    state = settle(state)  # the engine goes on from the flushed head
                continue
            state = settle(state)
            engine.close()
            engine = None  # the worktree takes over; a fresh engine starts from the next head
            result, head = _pick(state, k, patches, history)
            if result.outcome == "conflict" or (result.outcome == "upstream" and not state.options["drop_merged"]):
                return stop(state, result)
            state = replace(state, next=k + 1, head=head, results=state.results + (result,))
            save_state(state_dir, state)
        return settle(state)
    finally:
        if engine is not None:
            engine.close()


def _pick(state: State, k: int, patches: Sequence[Patch], history: Callable[[], History]) -> tuple[Result, str]:
    """A real three-way merge in the worktree: base = the old commit's parent, renames followed."""
    git_dir, item = Path(state.git_dir), state.items[k]
    _git_wt(state, "reset", "--hard", "-q", state.head)
    pick = _git_wt(state, "cherry-pick", "--no-rerere-autoupdate", item.old_commit, env=FIXED_IDENTITY, check=False)
    if pick.returncode == 0:
        commit = out(["rev-parse", "HEAD"], cwd=Path(state.worktree), error=RebaseError)
        files, add, rem = diff_numbers(git_dir, state.head, commit)
        return Result(item.series, item.name, "merged", commit, False, files, add, rem, _breaking(history(), k)), commit
    conflicted = tuple(out(["diff", "--name-only", "--diff-filter=U"], cwd=Path(state.worktree), error=RebaseError).split())
    if not conflicted:
        # The merge came out empty: upstream already has the change, in another shape.
        _git_wt(state, "reset", "--hard", "-q", state.head)
        return _upstream_result(state, k, patches, history), state.head
    files, add, rem = _numbers(patches[k])
    touched = _touching(git_dir, state.old_pin, state.onto, sorted(set(conflicted) | set(files)))
    return (Result(item.series, item.name, "conflict", None, False, files, add, rem, _breaking(history(), k),
                   conflicted, touched), state.head)


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
    return tuple(Upstream(*line.split("\x1f")) for line in text.splitlines() if line)


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


def _abort(state_dir: Path, state: State) -> Report:
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
    report = _report(state, "aborted")
    _cleanup(state_dir, state.source)
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


def _cleanup(state_dir: Path, source: str) -> None:
    shutil.rmtree(_backup_dir(state_dir, source), ignore_errors=True)
    _state_path(state_dir, source).unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # not empty: another source's rebase is still stopped
        state_dir.rmdir()


def _report(state: State, status: str, export: Mapping | None = None) -> Report:
    return Report(state.stack, state.source, state.old_pin, state.onto, status, state.results,
                  state.results[-1] if status == "stopped" and state.results else None, export)


def _write_report(state_dir: Path, report: Report) -> None:
    atomic_write(state_dir.parent / f"rebase-{report.source}.json", json.dumps(report.to_json(), indent=2).encode())
    atomic_write(state_dir.parent / f"rebase-{report.source}.md", markdown(report).encode())


# ---------------------------------------------------------------------------------------------
# rendering


def markdown(report: Report) -> str:
    """A summary a person can paste into a pull request."""
    counts = {o: sum(1 for r in report.results if r.outcome == o) for o in OUTCOMES}
    lines = [
        f"### Rebase of `{report.source}` in stack `{report.stack}`: {report.status}",
        "",
        f"`{report.old_pin[:12]}` → `{report.onto[:12]}` — "
        + ", ".join(f"{n} {o}" for o, n in counts.items() if n),
        "",
        "| # | Patch | Outcome | Files | +/- | Breaking upstream commit |",
        "|---|-------|---------|-------|-----|--------------------------|",
    ]
    for i, r in enumerate(report.results, 1):
        outcome = r.outcome + (" (dropped)" if r.dropped else "")
        brk = f"`{r.breaking.sha[:12]}` {_md(r.breaking.subject)} ({r.breaking.date[:10]})" if r.breaking else ""
        lines.append(f"| {i} | `{r.series}/{r.name}` | {outcome} | {len(r.files)} | +{r.insertions}/-{r.deletions} | {brk} |")
    if report.stopped_at and report.stopped_at.conflicted_files:
        s = report.stopped_at
        lines += ["", f"Stopped at `{s.series}/{s.name}`; conflicted: " + ", ".join(f"`{f}`" for f in s.conflicted_files)]
        lines += [f"- `{u.sha[:12]}` {_md(u.subject)} — {_md(u.author)}" for u in s.upstream_commits]
    return "\n".join(lines) + "\n"


def _md(text: str) -> str:
    return text.replace("|", "\\|")


# ---------------------------------------------------------------------------------------------
# from stack.toml to a plan: the one place that reads the core's sources, series and engine


def _git_source(cfg: Config, resolved: ResolvedStack, name: str | None) -> Source:
    git_sources = [s for s in resolved.sources if resolved.series_for(s.name)]
    if name is None:
        if len(git_sources) != 1:
            raise RebaseError(f"stack '{resolved.name}' patches {len(git_sources)} sources; say which",
                              hint=f"--source {' or --source '.join(s.name for s in git_sources) or 'NAME'}")
        return git_sources[0]
    found = [s for s in resolved.sources if s.name == name]
    if not found or not resolved.series_for(name):
        raise RebaseError(f"stack '{resolved.name}' has no series for source '{name}'", where=str(cfg.path),
                          hint=f"sources with series: {', '.join(s.name for s in git_sources) or 'none'}")
    if found[0].kind != "git":
        raise RebaseError(f"source '{name}' is an {found[0].kind} pin; only git sources can be rebased",
                          where=cfg.where.at(f"sources.{name}"), hint="point it at a git url + commit to rebase it")
    return found[0]


def _specs(resolved: ResolvedStack, source: str, patches: Sequence[Patch]) -> tuple[SeriesSpec, ...]:
    return tuple(
        SeriesSpec(name=s.name, patch_dir=s.patch_dir, directory=s.directory, strip=s.strip, inline=s.inline is not None,
                   remote=frozenset(p.name for p in patches if p.series == s.name and p.url))
        for s in resolved.series_for(source))


def _fuzz(resolved: ResolvedStack, patch: Patch) -> int:
    return next((s.fuzz for s in resolved.series if s.name == patch.series), 0)


def _old_commits(mirror: Path, pin: str, patches: Sequence[Patch], resolved: ResolvedStack) -> tuple[Item, ...]:
    replay = apply.replay(mirror, pin, patches, fuzz_for=lambda p: _fuzz(resolved, p))
    bad = [r for r in replay.results if not r.ok or not r.commit]
    if bad:
        raise RebaseError(f"{bad[0].patch.series}/{bad[0].patch.name} does not apply at the current pin ({bad[0].outcome})",
                          hint="fix the series at its own pin first (`stackbuild check`), then rebase")
    return tuple(Item(r.patch.series, r.patch.name, r.commit) for r in replay.results if r.commit)  # all, after `bad`


def make_plan(settings: Settings, cfg: Config, stack: str, source: str | None, onto: str) -> Plan:
    resolved = cfg.stack(stack)
    src = _git_source(cfg, resolved, source)
    mirror = sources.sync(settings, src).git_dir
    patches = load_stack_patches(settings, cfg, resolved).get(src.name, ())
    return Plan(
        stack=stack, source=src.name, git_dir=mirror, worktree=settings.work_dir / stack / src.name,
        branch=f"stackbuild/{stack}", old_pin=str(src.commit), onto=sources.fetch_ref(settings, src, mirror, onto),
        items=_old_commits(mirror, str(src.commit), patches, resolved), root=cfg.root, stack_file=cfg.path,
        series=_specs(resolved, src.name, patches), current={(p.series, p.name): p.data for p in patches},
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


def bisect_stack(settings: Settings, cfg: Config, stack: str, source: str | None, onto: str) -> BisectReport:
    resolved = cfg.stack(stack)
    src = _git_source(cfg, resolved, source)
    mirror = sources.sync(settings, src).git_dir
    patches = load_stack_patches(settings, cfg, resolved).get(src.name, ())
    return bisect(mirror, str(src.commit), sources.fetch_ref(settings, src, mirror, onto), patches, src.name)


def export_stack(settings: Settings, cfg: Config, stack: str, source: str | None = None, *, check: bool = False,
                 decode: bool = False, refresh_context: bool = False, prune: bool = False) -> tuple[ExportResult, ...]:
    """Patch files from the worktree's commits (or, with no worktree, from an in-memory apply)."""
    resolved = cfg.stack(stack)
    chosen = [_git_source(cfg, resolved, source)] if source else [
        s for s in resolved.sources if resolved.series_for(s.name) and s.kind == "git"]
    loaded = load_stack_patches(settings, cfg, resolved)
    results = []
    for src in chosen:
        state = _state_path(state_dir_for(settings.work_dir, stack), src.name)
        if state.exists():
            raise ExportError(f"a rebase of '{src.name}' is in progress", where=str(state),
                              hint="finish it (`stackbuild rebase --continue`) or `--abort` it first")
        repo = sources.sync(settings, src).git_dir
        patches = loaded.get(src.name, ())
        worktree = settings.work_dir / stack / src.name
        if (worktree / ".git").exists():
            repo = worktree / ".git"  # commits made there (by hand, or a resolution) live only there
            head = out(["rev-parse", "HEAD"], cwd=worktree, error=ExportError)
            if git(["merge-base", "--is-ancestor", str(src.commit), head], cwd=worktree, check=False).returncode:
                raise ExportError(f"the worktree is not based on the pin {str(src.commit)[:12]}", where=str(worktree),
                                  hint="re-apply the stack, or finish the rebase that moved it")
            dirty = out(["status", "--porcelain", "--untracked-files=no"], cwd=worktree, error=ExportError)
            if dirty:
                # Export reads commits: edits not committed would be missing from the files, and
                # --check would call them canonical.
                raise ExportError(f"the worktree has uncommitted changes ({len(dirty.splitlines())} files)",
                                  where=str(worktree), hint="commit them (git commit, amend or fixup), or stash them")
        else:
            head = apply.replay(repo, str(src.commit), patches, fuzz_for=lambda p: _fuzz(resolved, p)).head
        results.append(plan_export(
            git_dir=repo, base=str(src.commit), head=head, root=cfg.root, stack_file=cfg.path, source=src.name,
            series=_specs(resolved, src.name, patches), current={(p.series, p.name): p.data for p in patches},
            decode_all=decode, refresh_context=refresh_context, prune=prune))
    if check:
        failure = check_failure(results)
        if failure:
            raise failure
        return tuple(results)
    for result in results:
        apply_export(result)
    return tuple(results)
