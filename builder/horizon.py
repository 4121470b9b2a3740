"""How far each patch, and the whole stack, can follow upstream without being touched.

`stackbuild horizon STACK [--source S] [--to REF]` walks the first-parent line from the pin to
REF. For each patch it finds the newest commit at which the patch still applies — as is (clean, at
an offset), with the fuzz its series allows, by three-way merge, or already upstream: whatever
`stackbuild apply` accepts — and the first commit at which it stops applying; for the stack, the
newest commit at which every patch applies, i.e. how far the pin can move today with no patch
edited. It uses bisect's search (`bisection.search`: good at the low end, bad at the high end, so
every answer is a real transition) with probes cached per commit and shared between patches: at
most ⌈log2 N⌉ + 2 probes per patch. A probe is the apply engine's verdict for the whole series at
one commit with nothing written but the objects a three-way merge needs.
"""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable, Sequence

from . import sources
from .config import Config
from .errors import RebaseError
from .fsutil import atomic_write
from .patches import Patch
from .replay import PatchResult, Replayer
from .bisection import Upstream, commit_info, first_parent_range, search
from .sources import git_source
from .series import load_stack_patches
from .settings import Settings


@dataclass(frozen=True)
class PatchHorizon:
    series: str
    name: str
    at_to: str  # the verdict at REF
    applies_until: Upstream | None  # the newest commit it applies at (None: not even at the pin)
    mode: str  # how it applies there: clean | offset | fuzz | 3way | already-applied
    breaking: Upstream | None  # the first commit it stops applying at (None: it applies at REF)
    probes: int
    note: str = ""


@dataclass(frozen=True)
class Horizon:
    stack: str
    source: str
    pin: Upstream
    to: Upstream
    commits: int  # first-parent commits after the pin up to REF
    patches: tuple[PatchHorizon, ...]
    stack_until: Upstream | None  # the newest commit every patch applies at: how far the pin can move
    probes: int  # distinct commits probed
    bound: int  # ⌈log2 N⌉ + 2: the most one patch's search may probe

    def to_json(self) -> dict:
        return asdict(self)


class _Probe:
    """The verdicts of one commit, computed in series order only as far as they are asked for: a
    patch's verdict depends on the ones before it, never after, so the search for patch k (and
    the stack's, which stops at the first failure) never pays for a three-way attempt of a later
    patch. The engine stays open between requests, holding the tree so far in memory."""

    def __init__(self, git_dir: Path, commit: str, patches: Sequence[Patch], fuzz_for: Callable[[Patch], int]):
        self.replayer: Replayer | None = Replayer(git_dir, commit, paths={p for x in patches for p in x.paths})
        self.patches, self.fuzz_for = patches, fuzz_for
        self.results: list[PatchResult] = []

    def __getitem__(self, k: int) -> PatchResult:
        while len(self.results) <= k:
            assert self.replayer is not None
            patch = self.patches[len(self.results)]
            self.results.append(self.replayer.step(patch, fuzz=self.fuzz_for(patch), track=False))
        if len(self.results) == len(self.patches):
            self.close()
        return self.results[k]

    def all_ok(self) -> bool:
        return all(self[k].ok for k in range(len(self.patches)))

    def close(self) -> None:
        if self.replayer is not None:
            self.replayer.close()
            self.replayer = None


class _Prober:
    """Probes per commit, shared by every patch's search."""

    def __init__(self, git_dir: Path, patches: Sequence[Patch], fuzz_for: Callable[[Patch], int]):
        self.git_dir, self.patches, self.fuzz_for = git_dir, patches, fuzz_for
        self.cache: dict[str, _Probe] = {}

    def __call__(self, commit: str) -> _Probe:
        if commit not in self.cache:
            self.cache[commit] = _Probe(self.git_dir, commit, self.patches, self.fuzz_for)
        return self.cache[commit]

    def close(self) -> None:
        for probe in self.cache.values():
            probe.close()


def horizon(git_dir: Path, pin: str, to: str, patches: Sequence[Patch], *, stack: str = "", source: str = "",
            fuzz_for: Callable[[Patch], int] = lambda _p: 0) -> Horizon:
    line = [pin] + first_parent_range(git_dir, pin, to)
    prober = _Prober(git_dir, patches, fuzz_for)
    try:
        return _horizon(git_dir, line, patches, prober, stack, source)
    finally:
        prober.close()


def _horizon(git_dir: Path, line: Sequence[str], patches: Sequence[Patch], prober: _Prober, stack: str,
             source: str) -> Horizon:
    info: dict[str, Upstream] = {}

    def at(commit: str) -> Upstream:
        if commit not in info:
            info[commit] = commit_info(git_dir, commit)
        return info[commit]

    rows = []
    for k, p in enumerate(patches):
        end = prober(line[-1])[k]
        if end.ok:
            rows.append(PatchHorizon(p.series, p.name, end.outcome, at(line[-1]), end.outcome, None, 1))
            continue
        start = prober(line[0])[k]
        if not start.ok:
            rows.append(PatchHorizon(p.series, p.name, end.outcome, None, start.outcome, at(line[0]), 2,
                                     "does not apply at the pin either"))
            continue
        hi, probes = search(line, lambda c: prober(c)[k].ok)
        rows.append(PatchHorizon(p.series, p.name, end.outcome, at(line[hi - 1]), prober(line[hi - 1])[k].outcome,
                                 at(line[hi]), probes + 2))
    if prober(line[-1]).all_ok():
        until: Upstream | None = at(line[-1])
    elif not prober(line[0]).all_ok():
        until = None
    else:
        hi, _ = search(line, lambda c: prober(c).all_ok())
        until = at(line[hi - 1])
    bound = math.ceil(math.log2(max(len(line) - 1, 1))) + 2
    return Horizon(stack, source, at(line[0]), at(line[-1]), len(line) - 1, tuple(rows), until, len(prober.cache), bound)


def horizon_stack(settings: Settings, cfg: Config, stack: str, source: str | None, to: str | None) -> Horizon:
    resolved = cfg.stack(stack)
    src = git_source(cfg, resolved, source)
    mirror = sources.sync(settings, src).git_dir
    patches = load_stack_patches(settings, cfg, resolved).get(src.name, ())
    fuzz = {s.name: s.fuzz for s in resolved.series}
    # Without --to: the upstream's default branch (its HEAD), fetched like any other ref.
    target = sources.fetch_ref(settings, src, mirror, to or "HEAD")
    return horizon(mirror, str(src.commit), target, patches, stack=stack, source=src.name,
                   fuzz_for=lambda p: fuzz.get(p.series, 0))


# ---------------------------------------------------------------------------------------------
# the picture


def _day(date: str) -> float:
    """matplotlib's date number of an ISO date: floats keep the bars' arithmetic simple."""
    from matplotlib.dates import date2num

    return float(date2num(datetime.fromisoformat(date)))


def horizon_figure(h: Horizon):
    """One row per patch over upstream commit dates: green while it applies, red from its breaking
    commit on; the stack's horizon as a dashed line."""
    import matplotlib.pyplot as plt

    start, end = _day(h.pin.date), _day(h.to.date)
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.35 * max(len(h.patches), 1)), dpi=100)
    for row, p in enumerate(h.patches):
        if p.applies_until is not None:
            good_end = end if p.breaking is None else _day(p.breaking.date)
            ax.barh(row, good_end - start, left=start, color="tab:green", height=0.6)
        if p.breaking is not None:
            bad_start = _day(p.breaking.date)
            # a patch broken by the last commit still gets a visible sliver of red
            ax.barh(row, max(end - bad_start, (end - start) / 400), left=bad_start, color="tab:red", height=0.6)
    if h.stack_until is not None:
        ax.axvline(_day(h.stack_until.date), color="black", linestyle="--", linewidth=1)
    ax.set_yticks(range(len(h.patches)), [f"{p.series}/{p.name}" for p in h.patches], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(start, max(end, start + 1 / 24))
    ax.xaxis_date()
    reach = (f"dashed: the whole stack applies up to {h.stack_until.sha[:12]}" if h.stack_until
             else "the stack does not apply at its pin")
    ax.set_title(f"stackbuild horizon: {h.stack} / {h.source}, {h.commits} commits "
                 f"{h.pin.sha[:12]}..{h.to.sha[:12]}\n{reach}", fontsize=10)
    ax.set_xlabel("upstream commit date")
    fig.autofmt_xdate()
    fig.tight_layout()
    return fig


def plot(h: Horizon, out: Path) -> Path:
    """The PNG, written atomically; matplotlib is optional (the `smoke` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RebaseError("plotting needs matplotlib", where="--plot", hint="pip install 'stackbuild[smoke]'") from None
    fig = horizon_figure(h)
    png = io.BytesIO()
    try:
        fig.savefig(png, format="png")
    finally:
        plt.close(fig)
    atomic_write(out, png.getvalue())
    return out
