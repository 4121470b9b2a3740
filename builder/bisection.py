"""Where each patch of a series stops applying as is on the way from its pin to a newer commit.

`stackbuild bisect` walks the first-parent line old pin..REF with a shared, cached prober: a
probe is the replayer's hunk matcher on its in-memory tree, nothing written, so probing stays
cheap; the search keeps good-at-lo / bad-at-hi, so every answer is a real transition. The rebase
state machine and `horizon` reuse the line, the search and the upstream commit records.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

from . import sources
from .config import Config
from .errors import RebaseError
from .git import out
from .patches import Patch
from .rebase_report import pr_number
from .replay import Replayer
from .series import load_stack_patches
from .settings import Settings
from .sources import git_source


@dataclass(frozen=True)
class Upstream:
    sha: str
    subject: str
    author: str
    date: str
    pr: int | None = None  # the pull request the subject names ("… (#12345)")


def commit_info(git_dir: Path, sha: str) -> Upstream:
    sha_, subject, author, date = out(["log", "-1", "--format=%H%x1f%s%x1f%an <%ae>%x1f%cI", sha],
                                      git_dir=git_dir, error=RebaseError).split("\x1f")
    return Upstream(sha_, subject, author, date, pr_number(subject))


def first_parent_range(git_dir: Path, old: str, new: str) -> list[str]:
    """Commits after `old` up to `new` on new's first-parent line, oldest first."""
    return out(["rev-list", "--first-parent", "--reverse", new, f"^{old}"], git_dir=git_dir, error=RebaseError).split()



def probe(git_dir: Path, commit: str, patches: Sequence[Patch]) -> tuple[bool, ...]:
    """Which patches apply as they are (clean or at an offset) at `commit`, each on the ones
    before it that did. The engine's own hunk matcher on its in-memory tree: nothing is written
    (no fast-import, no three-way attempt), which is what makes a probe cheap enough to bisect.
    Shapes the matcher leaves to git (binary, copies) go through the engine's full step."""
    replayer = Replayer(git_dir, commit, paths={p for patch in patches for p in patch.paths})
    try:
        return tuple(replayer.probe(patch) for patch in patches)
    finally:
        replayer.close()


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


def bisect_stack(settings: Settings, cfg: Config, stack: str, source: str | None, onto: str) -> BisectReport:
    resolved = cfg.stack(stack)
    src = git_source(cfg, resolved, source)
    mirror = sources.sync(settings, src).git_dir
    patches = load_stack_patches(settings, cfg, resolved).get(src.name, ())
    return bisect(mirror, str(src.commit), sources.fetch_ref(settings, src, mirror, onto), patches, src.name)
