"""What a maintainer reads about each patch of a rebase, beyond its one word: the pull request of
the breaking commit, the files a plain apply failed on but the three-way merge took, the files
upstream renamed (to what) or deleted, and the upstream commits that touched each conflicted file.

Everything here reads objects only (the mirror or the worktree's repository): no worktree moves.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

from .errors import RebaseError
from .git import out
from .patches import Patch
from .replay import Replayer

if TYPE_CHECKING:
    from .rebase import Report

# GitHub's squash merges end the subject with " (#12345)"; its merge commits say "Merge pull request #12345".
_PR_RE = re.compile(r"\(#(\d+)\)")
_MERGE_PR_RE = re.compile(r"^Merge pull request #(\d+)\b")
# Every word a rebase gives a patch, in the order the summary counts them.
OUTCOMES = ("unchanged", "moved", "merged", "upstream", "conflict")


def pr_number(subject: str) -> int | None:
    found = _PR_RE.findall(subject)
    if found:
        return int(found[-1])
    m = _MERGE_PR_RE.match(subject)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class PathChange:
    """A file a patch touches that upstream renamed (`new_path` as git's rename detection finds
    it) or deleted between the old pin and the new one."""

    path: str
    change: str  # renamed | deleted
    new_path: str | None = None


@dataclass(frozen=True)
class FileCommits:
    path: str
    commits: tuple[str, ...]  # upstream SHAs since the old pin that touched PATH, newest first


def path_changes(git_dir: Path, old: str, new: str) -> dict[str, PathChange]:
    """Renames and deletions of the whole tree old..new: rename detection needs every added file,
    so the diff cannot be limited to the patch's paths (a pathspec would turn a rename into a
    deletion). git's own -M similarity rule (diffcore-rename.c) decides what is a rename."""
    text = out(["diff-tree", "-r", "-M", "-z", "--name-status", "--diff-filter=DR", old, new], git_dir=git_dir,
               error=RebaseError)
    fields = text.split("\0")
    found: dict[str, PathChange] = {}
    i = 0
    while i < len(fields) and fields[i]:
        status = fields[i]
        if status.startswith("R"):
            found[fields[i + 1]] = PathChange(fields[i + 1], "renamed", fields[i + 2])
            i += 3
        else:
            found[fields[i + 1]] = PathChange(fields[i + 1], "deleted")
            i += 2
    return found


def touched(patch: Patch, changes: Mapping[str, PathChange]) -> tuple[PathChange, ...]:
    olds = dict.fromkeys(f.old_path for f in patch.files if f.old_path)
    return tuple(changes[p] for p in olds if p in changes)


def plain_failures(git_dir: Path, parent: str, patch: Patch) -> tuple[str, ...]:
    """Files of PATCH whose hunks do not apply as they are at PARENT (the head the patch was
    replayed on): each file is probed on its own with the engine's hunk matcher, nothing written."""
    failed = []
    for diff in patch.files:
        replayer = Replayer(git_dir, parent, paths={p for p in (diff.old_path, diff.new_path) if p})
        try:
            if not replayer.probe(replace(patch, files=(diff,))):
                failed.append(diff.path if diff.old_path is None else diff.old_path)
        finally:
            replayer.close()
    return tuple(dict.fromkeys(failed))


def merged_files(plain: Sequence[str], conflicted: Sequence[str], changes: Mapping[str, PathChange]) -> tuple[str, ...]:
    """Files where only the plain apply failed: the three-way merge took them (a file upstream
    renamed counts as conflicted when its new name is)."""
    def now(path: str) -> str:
        change = changes.get(path)
        return change.new_path if change and change.new_path else path

    return tuple(p for p in plain if p not in conflicted and now(p) not in conflicted)


def commits_by_file(git_dir: Path, old: str, new: str, paths: Sequence[str], limit: int = 20) -> tuple[FileCommits, ...]:
    """For each path, the upstream commits old..new that touched it (one `git log` for all)."""
    if not paths:
        return ()
    text = out(["log", "--format=%x00%H", "--name-only", f"{old}..{new}", "--", *paths], git_dir=git_dir,
               error=RebaseError)
    per: dict[str, list[str]] = {p: [] for p in paths}
    for block in text.split("\0")[1:]:
        sha, _, names = block.partition("\n")
        for name in names.split("\n"):
            if name in per and len(per[name]) < limit:
                per[name].append(sha.strip())
    return tuple(FileCommits(p, tuple(per[p])) for p in paths)



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
    lines += details_markdown(report)
    return "\n".join(lines) + "\n"


def details_markdown(report: Report) -> list[str]:
    """A section per patch that needed more than a plain apply: what broke it and where."""
    lines: list[str] = []
    subjects = {u.sha: u for r in report.results for u in r.upstream_commits}
    for r in report.results:
        if r.outcome in ("unchanged", "moved"):
            continue
        lines += ["", f"#### `{r.series}/{r.name}`: {r.outcome}" + (" (dropped)" if r.dropped else "")]
        if r.breaking:
            pr = f" — PR #{r.breaking.pr}" if r.breaking.pr else ""
            lines.append(f"- first breaking upstream commit: `{r.breaking.sha[:12]}` {_md(r.breaking.subject)}"
                         f" ({r.breaking.date[:10]}){pr}")
        if r.conflicted_files:
            lines.append("- conflicts after the three-way merge: " + ", ".join(f"`{f}`" for f in r.conflicted_files))
        if r.merged_files:
            lines.append("- plain apply failed, the three-way merge took: " + ", ".join(f"`{f}`" for f in r.merged_files))
        for c in r.path_changes:
            lines.append(f"- upstream renamed `{c.path}` → `{c.new_path}`" if c.change == "renamed"
                         else f"- upstream deleted `{c.path}`")
        for fc in r.commits_by_file:
            named = [f"`{sha[:12]}` {_md(subjects[sha].subject)}" if sha in subjects else f"`{sha[:12]}`"
                     for sha in fc.commits]
            lines.append(f"- upstream commits touching `{fc.path}`: " + ("; ".join(named) or "none"))
    return lines


def _md(text: str) -> str:
    return text.replace("|", "\\|")
