"""One rebase across several sources of a stack: `rebase STACK --onto vllm=REF --onto other=REF`.

Each source gets the single-source state machine of `rebase.py` (its own state file, backups and
worktree), started with its export deferred; a group file `_group.json` beside them records the
sources in order and the phase. The sources replay one after another, and a stop in any of them
stops the whole operation: one `--continue`, `--skip` or `--abort` acts on the group. Only once
every replay is done are the patch files, series files and pins written (source by source, each
step safe to repeat), and only then are the states dropped — until that moment `--abort` puts
every source back. The stack's other sources are never touched.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

from . import rebase as rb
from .config import Config
from .schema import NAME_RE
from .errors import RebaseError
from .fsutil import atomic_write
from .settings import Settings
from .rebase_report import markdown as report_markdown
from .worktrees import sources_in_progress, state_dir_for, work_lock

GROUP_FILE = "_group.json"  # "_" keeps it apart from the per-source states (a source name never starts so)
GROUP_VERSION = 1


@dataclass(frozen=True)
class Group:
    stack: str
    sources: tuple[str, ...]
    phase: str  # starting | replaying | exporting
    current: int = 0  # the source replaying (or stopped)


@dataclass(frozen=True)
class GroupReport:
    stack: str
    status: str  # finished | stopped | aborted
    reports: tuple[rb.Report, ...]  # one per source, in order; a source not reached yet is "pending"

    @property
    def stopped_at(self) -> rb.Report | None:
        return next((r for r in self.reports if r.status == "stopped"), None)

    def to_json(self) -> dict:
        stopped = self.stopped_at
        return {"stack": self.stack, "status": self.status, "sources": [r.to_json() for r in self.reports],
                "stopped_source": stopped.source if stopped else None,
                "stopped_at": stopped.to_json()["stopped_at"] if stopped else None}


def parse_onto(values: Sequence[str], source: str | None) -> list[tuple[str | None, str]]:
    """`--onto REF` (with `--source` or a stack patching one source) or `--onto SOURCE=REF`, repeated."""
    targets: list[tuple[str | None, str]] = []
    for value in values:
        name, sep, ref = value.partition("=")
        if sep and NAME_RE.match(name) and ref:
            targets.append((name, ref))
        else:
            targets.append((None, value))
    if len(targets) > 1 and any(name is None for name, _ in targets):
        raise RebaseError("several --onto need the source each one moves", where="--onto",
                          hint="--onto vllm=REF --onto llm-scaler=REF")
    if len(targets) > 1 and source:
        raise RebaseError("--source names one source; with several --onto SOURCE=REF leave it out", where="--source")
    if len(targets) == 1 and source and targets[0][0] not in (None, source):
        raise RebaseError(f"--source {source} and --onto {targets[0][0]}=… name different sources", where="--onto")
    names = [n for n, _ in targets]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise RebaseError(f"--onto names source '{dup}' twice", where="--onto", hint="give each source one REF")
    return targets


def _path(state_dir: Path) -> Path:
    return state_dir / GROUP_FILE


def _save(state_dir: Path, group: Group) -> None:
    data = {"version": GROUP_VERSION, "stack": group.stack, "sources": list(group.sources), "phase": group.phase,
            "current": group.current}
    atomic_write(_path(state_dir), json.dumps(data, indent=1).encode())


def _load(state_dir: Path) -> Group:
    path = _path(state_dir)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("version") != GROUP_VERSION:
            raise RebaseError(f"multi-source rebase state has version {data.get('version')}, expected {GROUP_VERSION}",
                              where=str(path), hint="finish or --abort it with the stackbuild version that started it")
        return Group(str(data["stack"]), tuple(str(s) for s in data["sources"]), str(data["phase"]), int(data["current"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise RebaseError(f"multi-source rebase state is unreadable: {exc}", where=str(path),
                          hint="restore it, or delete it and the files beside it by hand") from None


def find_group(settings: Settings, stack: str | None) -> Path | None:
    """The state folder of the multi-source rebase a bare `--continue` means, if there is one."""
    if stack:
        found = [state_dir_for(settings.work_dir, stack)]
    else:
        found = sorted(p.parent for p in settings.work_dir.glob(f"*/.rebase/{GROUP_FILE}"))
    found = [d for d in found if _path(d).is_file()]
    if len(found) > 1:
        raise RebaseError(f"{len(found)} multi-source rebases in progress: "
                          + ", ".join(d.parent.name for d in found), where=str(settings.work_dir),
                          hint="name the stack: stackbuild rebase STACK --continue")
    return found[0] if found else None


def _pending(state: rb.State) -> bool:
    return state.phase == "replaying" and state.next == 0 and not state.results


def _report(state_dir: Path, group: Group, status: str, finished: Sequence[rb.Report] = ()) -> GroupReport:
    if finished:
        return GroupReport(group.stack, status, tuple(finished))
    reports = []
    for src in group.sources:
        state = rb.load_state(state_dir, src)
        word = ("pending" if _pending(state) else state.phase) if status != "aborted" else "aborted"
        reports.append(rb.report_of(state, word))
    return GroupReport(group.stack, status, tuple(reports))


def start(settings: Settings, cfg: Config, stack: str, targets: Sequence[tuple[str, str]], *, drop_merged: bool = False,
          decode: bool = False, refresh_context: bool = False) -> GroupReport:
    # Every source's plan (mirror, REF fetched, old series replayed) before anything is written.
    plans = [rb.make_plan(settings, cfg, stack, src, ref) for src, ref in targets]
    state_dir = plans[0].state_dir
    with work_lock(state_dir.parent, "+".join(p.source for p in plans)):
        busy = sources_in_progress(state_dir) + (["(several)"] if _path(state_dir).exists() else [])
        if busy:
            raise RebaseError(f"a rebase of stack '{stack}' is already in progress ({', '.join(busy)})",
                              where=str(state_dir), hint="`stackbuild rebase --continue`, `--skip` or `--abort` it first")
        group = Group(stack, tuple(p.source for p in plans), "starting")
        _save(state_dir, group)
        try:
            for plan in plans:
                rb.begin(plan, drop_merged=drop_merged, decode=decode, refresh_context=refresh_context,
                         defer_export=True)
        except BaseException:
            _abort(state_dir, group)  # e.g. the second worktree is dirty: the first one goes back too
            raise
        group = replace(group, phase="replaying")
        _save(state_dir, group)
        return _advance(state_dir, group)


def resume(state_dir: Path, action: str) -> GroupReport:
    group = _load(state_dir)
    with work_lock(state_dir.parent, "+".join(group.sources)):
        group = _load(state_dir)
        if action == "abort" or group.phase == "starting":
            report = _abort(state_dir, group)
            if action != "abort":
                # Killed while the sources were still being set up: nothing of the project had
                # changed, so undoing the setup is the one safe way to finish it.
                raise RebaseError("the rebase was interrupted while it was starting; it has been undone",
                                  where=str(state_dir), hint="start it again with the same --onto options")
            return report
        if group.phase == "replaying":
            src = group.sources[group.current]
            state = rb.load_state(state_dir, src)
            if action == "skip" or state.phase == "stopped":
                rb.resume_locked(state_dir, src, action)  # refuses a skip when nothing is stopped
        elif action == "skip":
            raise RebaseError("nothing to skip: every source is replayed, the export is what is left",
                              hint="`stackbuild rebase --continue` finishes it, `--abort` undoes it")
        return _advance(state_dir, group)


def _advance(state_dir: Path, group: Group) -> GroupReport:
    while group.phase == "replaying" and group.current < len(group.sources):
        state = rb.load_state(state_dir, group.sources[group.current])
        report = rb.advance(state_dir, state)
        if report.status == "stopped":
            return _report(state_dir, group, "stopped")
        group = replace(group, current=group.current + 1)
        _save(state_dir, group)
    if group.phase == "replaying":
        group = replace(group, phase="exporting")
        _save(state_dir, group)
    # Each export reads stack.toml as the one before left it, so every pin moves; each is safe to redo.
    finished = [rb.finish(state_dir, rb.load_state(state_dir, src), keep_state=True) for src in group.sources]
    for src in group.sources:
        rb.cleanup(state_dir, src)
    _path(state_dir).unlink()
    _rmdir(state_dir)
    return _report(state_dir, group, "finished", finished)


def _abort(state_dir: Path, group: Group) -> GroupReport:
    reports = []
    for src in reversed(group.sources):
        if src in sources_in_progress(state_dir):
            reports.append(rb.abort(state_dir, rb.load_state(state_dir, src)))
    _path(state_dir).unlink()
    _rmdir(state_dir)
    return GroupReport(group.stack, "aborted", tuple(reversed(reports)))


def _rmdir(state_dir: Path) -> None:
    try:
        state_dir.rmdir()
    except OSError:
        pass  # not empty: something else is in it


def markdown(report: GroupReport) -> str:
    title = f"## Rebase of stack `{report.stack}` ({len(report.reports)} sources): {report.status}\n\n"
    return title + "\n".join(report_markdown(r) for r in report.reports)


def rebase(settings: Settings, cfg: Config | None, stack: str | None, source: str | None, *, onto: Sequence[str],
           action: str | None = None, drop_merged: bool = False, decode: bool = False,
           refresh_context: bool = False) -> rb.Report | GroupReport:
    """What `stackbuild rebase` does, for one source or several."""
    if action:
        if onto:
            raise RebaseError(f"--{action} takes no --onto", hint=f"`stackbuild rebase --{action}`")
        group_dir = find_group(settings, stack)
        if group_dir is not None:
            return resume(group_dir, action)
        return rb.rebase_stack(settings, cfg, stack, source, onto=None, action=action)
    targets = parse_onto(onto, source)
    if len(targets) <= 1 or cfg is None or not stack:
        only = targets[0] if targets else (None, None)
        return rb.rebase_stack(settings, cfg, stack, only[0] or source, onto=only[1], drop_merged=drop_merged,
                               decode=decode, refresh_context=refresh_context)
    return start(settings, cfg, stack, [(str(n), r) for n, r in targets], drop_merged=drop_merged, decode=decode,
                 refresh_context=refresh_context)
