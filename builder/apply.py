"""`apply` and `check` of whole stacks: a stack's inputs read and verified, each source replayed.

`prepare` loads and verifies everything a stack needs before anything is written (patches read,
sources synced); `check_stacks` gives every patch's verdict against the pins (or other refs)
without writing a commit; `materialize` makes every source's commits as objects (what `build`
takes); `apply_stack` makes them and moves the worktrees last (worktrees.py), so a failure leaves
the previous state as it was.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Collection, Sequence

from .config import Config, ResolvedStack, Source
from .duplicates import Duplicate, find_duplicates
from .errors import ApplyError, PatchError
from .fsutil import atomic_write, deferred_interrupts, sha256
from .patches import Patch
from .series import load_stack_patches
from .settings import Settings
from .replay import ENGINE_VERSION, FUZZ, PatchResult, Replay, replay
from .sources import Synced, fetch_ref, sync
from .worktrees import (STATE_FILE, Backup, Journal, branch_of, inspect_worktree, journaled_move, read_journal, read_state,
                        refuse_during_rebase, settle, stack_dir, work_lock)


@dataclass(frozen=True)
class Prepared:
    """A stack's inputs, loaded and verified before anything is written."""

    stack: ResolvedStack
    patches: dict[str, tuple[Patch, ...]]
    synced: dict[str, Synced]
    fuzz: dict[str, int]

    def digest(self, source: str) -> str:
        """Names the applied result of one source: its pin and the exact patches, in order."""
        parts = [ENGINE_VERSION, self.synced[source].commit]
        for p in self.patches[source]:
            parts.append(f"{p.label}\0{p.strip}\0{p.directory}\0{p.sha256}\0{self.fuzz.get(p.series, 0)}")
        return sha256("\n".join(parts).encode())


def prepare(settings: Settings, config: Config, name: str, *, progress: bool = False,
            tolerant: bool = False, sources: Collection[str] | None = None) -> Prepared:
    """TOLERANT (check): a patch that cannot be read becomes a `malformed` verdict in its place.
    SOURCES: only these sources are synced and their patches read (a partial build)."""
    stack = config.stack(name)
    if sources is not None:
        stack = stack.restricted(sources)
    patches = load_stack_patches(settings, config, stack, tolerant=tolerant)
    synced = {s.name: sync(settings, s, root=config.root, progress=progress) for s in stack.sources}
    return Prepared(stack, patches, synced, {s.name: s.fuzz for s in stack.series})


@dataclass(frozen=True)
class AppliedSource:
    source: Source
    git_dir: Path
    base: str
    commit: str
    patches: tuple[Patch, ...]
    replay: Replay


def _replay_source(prep: Prepared, source: str, base: str | None = None, *, allow_fuzz: int = 0,
                   stop_at_failure: bool = True, overlaps: bool = False, write: bool = True) -> Replay:
    synced = prep.synced[source]
    return replay(synced.git_dir, base or synced.commit, prep.patches[source], fuzz=allow_fuzz,
                  stop_at_failure=stop_at_failure, overlaps=overlaps,
                  fuzz_for=lambda p: prep.fuzz.get(p.series, 0), write=write)


def materialize(settings: Settings, config: Config, name: str, *, prep: Prepared | None = None,
                progress: bool = False) -> dict[str, AppliedSource]:
    """Every source of the stack with its patches applied as commits; no worktree, no ref moved.
    PREP, when the caller already loaded the stack's inputs, saves reading and syncing them again."""
    prep = prep or prepare(settings, config, name, progress=progress)
    out_: dict[str, AppliedSource] = {}
    for src in prep.stack.sources:
        result = _replay_source(prep, src.name)
        failure = result.first_failure
        if failure is not None:
            raise _failure_error(name, src.name, failure)
        synced = prep.synced[src.name]
        out_[src.name] = AppliedSource(src, synced.git_dir, synced.commit, result.head, prep.patches[src.name], result)
    return out_


def _failure_error(stack: str, source: str, failure: PatchResult) -> ApplyError | PatchError:
    where = str(failure.patch.path or failure.patch.url or failure.patch.label)
    if failure.error is not None:
        return failure.error
    if failure.outcome == FUZZ:
        return ApplyError(f"{failure.patch.label} applies to '{source}' only with reduced context ({failure.detail})",
                          where=where, hint=f"refresh the patch (stackbuild rebase {stack} then export), or allow it: "
                                            f"fuzz = N in [series.{failure.patch.series}] or --allow-fuzz")
    hunks = ", ".join(f"{f.path} hunk #{f.hunk} ({f.reason})" if f.hunk else f"{f.path} ({f.reason})"
                      for f in failure.failed[:6]) or failure.detail or "three-way merge left conflicts"
    return ApplyError(f"{failure.patch.label} does not apply to '{source}': {hunks}", where=where,
                      hint=f"fix the patch against the pin (the worktree holds the patches before it), or run "
                           f"'stackbuild rebase {stack} --source {source} --onto <ref>'")


# ---- check


@dataclass(frozen=True)
class SourceCheck:
    source: str
    base: str
    at: str | None
    replay: Replay
    duplicates: tuple[Duplicate, ...] = ()  # changes one patch repeats from an earlier one

    def to_json(self) -> dict:
        return {"source": self.source, "base": self.base, "at": self.at,
                "ok": self.replay.ok, "patches": [r.to_json() for r in self.replay.results],
                "overlaps": [o.to_json() for o in self.replay.overlaps],
                "duplicates": [d.to_json() for d in self.duplicates]}


@dataclass(frozen=True)
class StackCheck:
    stack: str
    sources: tuple[SourceCheck, ...]

    @property
    def ok(self) -> bool:
        return all(s.replay.ok for s in self.sources)

    def to_json(self) -> dict:
        return {"stack": self.stack, "ok": self.ok, "sources": [s.to_json() for s in self.sources]}


def parse_at(values: Sequence[str]) -> dict[str | None, str]:
    """`--at REF` applies to every git source; `--at SOURCE=REF` to one."""
    at: dict[str | None, str] = {}
    for value in values:
        source, sep, ref = value.partition("=")
        if sep and "/" not in source and ":" not in source:
            at[source] = ref
        else:
            at[None] = value
    return at


def check_stacks(settings: Settings, config: Config, names: Sequence[str], *, at: Sequence[str] = (),
                 allow_fuzz: int = 0, progress: bool = False) -> tuple[StackCheck, ...]:
    """Verdicts for every patch of every stack against the pins (or AT), without any checkout."""
    refs = parse_at(at)
    for key in refs:
        if key is not None and key not in config.sources:
            raise ApplyError(f"--at names unknown source '{key}'", where="--at",
                             hint=f"sources: {', '.join(config.sources)}")
    reports = []
    for name in names or sorted(config.stacks):
        prep = prepare(settings, config, name, progress=progress, tolerant=True)
        checks = []
        for src in prep.stack.sources:
            ref = refs.get(src.name) or (refs.get(None) if src.kind == "git" else None)
            synced = prep.synced[src.name]
            base = fetch_ref(settings, src, synced.git_dir, ref, progress=progress) if ref else synced.commit
            result = _replay_source(prep, src.name, base, allow_fuzz=allow_fuzz, stop_at_failure=False, overlaps=True,
                                    write=False)
            checks.append(SourceCheck(src.name, base, ref, result, find_duplicates(prep.patches[src.name])))
        reports.append(StackCheck(name, tuple(checks)))
    return tuple(reports)


# ---- apply into worktrees


@dataclass(frozen=True)
class SourceApply:
    source: str
    worktree: Path
    base: str
    head: str
    replay: Replay | None  # None when the worktree was already up to date
    action: str  # "created", "updated", "unchanged"
    backup: "Backup" = field(default_factory=lambda: Backup())

    def to_json(self) -> dict:
        return {"source": self.source, "worktree": str(self.worktree), "base": self.base, "head": self.head,
                "action": self.action, "ok": self.replay.ok if self.replay else True, "backup": self.backup.to_json(),
                "patches": [r.to_json() for r in self.replay.results] if self.replay else []}


@dataclass(frozen=True)
class ApplyReport:
    stack: str
    sources: tuple[SourceApply, ...]
    error: ApplyError | PatchError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_json(self) -> dict:
        return {"stack": self.stack, "ok": self.ok, "sources": [s.to_json() for s in self.sources],
                "error": self.error.to_json() if self.error else None}


def apply_stack(settings: Settings, config: Config, name: str, *, allow_fuzz: int = 0, force: bool = False,
                progress: bool = False) -> ApplyReport:
    """Worktrees at work/<stack>/<source> on branch stackbuild/<stack>, one commit per patch.

    Everything is computed first (patches read and verified, sources synced, commits written as
    objects); the worktrees and branches move last, with Ctrl-C held and each move journaled, so
    a failure or an interrupt leaves every worktree as it was or finishable by a plain re-run. A
    patch that does not apply stops its source at the last good commit.
    """
    root = stack_dir(settings, name)
    with work_lock(root):
        prep = prepare(settings, config, name, progress=progress)
        state = read_state(settings, name)
        branch = branch_of(name)
        # (source, worktree, its head now, replay or None when unchanged, digest, journal, recorded head)
        plans: list[tuple[Source, Path, str | None, Replay | None, str, Journal | None, str | None]] = []
        for src in prep.stack.sources:
            wt = root / src.name
            refuse_during_rebase(root, name, src.name)
            journal = read_journal(root, src.name)
            if journal is not None:
                settle(journal, wt)
            recorded = state["sources"].get(src.name, {})
            current = inspect_worktree(wt, branch, recorded.get("head"), force or journal is not None)
            digest = prep.digest(src.name)
            if (current is not None and current == recorded.get("head") and recorded.get("digest") == digest
                    and not force and journal is None):
                plans.append((src, wt, current, None, digest, None, recorded.get("head")))
                continue
            replay = _replay_source(prep, src.name, allow_fuzz=allow_fuzz)
            plans.append((src, wt, current, replay, digest, journal, recorded.get("head")))
        reports = []
        error = None
        with deferred_interrupts():
            for src, wt, current, result, digest, journal, recorded in plans:
                synced = prep.synced[src.name]
                head = current if result is None else result.head
                complete = result is None or result.ok
                state["sources"][src.name] = {
                    "git_dir": str(synced.git_dir), "base": synced.commit, "head": head,
                    "digest": digest if complete else None,
                    "patches": [{"patch": p.label, "sha256": p.sha256} for p in prep.patches[src.name]],
                }

                def record() -> None:
                    # Recorded as each worktree moves: if a later one fails, the next apply still
                    # recognises this one as its own and does not ask for --force.
                    atomic_write(root / STATE_FILE, json.dumps(state, indent=2).encode())

                if result is None:
                    action, backup = "unchanged", Backup()
                    record()
                else:
                    action, backup = journaled_move(root, src.name, synced.git_dir, wt, branch, current, result.head, force=force,
                                                    journal=journal, recorded=recorded, record=record)
                reports.append(SourceApply(src.name, wt, synced.commit, str(head), result, action, backup))
                if result is not None and error is None and result.first_failure is not None:
                    error = _failure_error(name, src.name, result.first_failure)
        return ApplyReport(name, tuple(reports), error)
