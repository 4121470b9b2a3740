"""`stackbuild up`: the whole job, sync -> apply -> build -> smoke, each step skipped when its
content-addressed result already exists, stopping at the first failure with that step's hint."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import build as build_mod
from .smoke import run as smoke_run
from .apply import apply_stack
from .config import Config, thaw
from .errors import StackbuildError
from .fsutil import atomic_write, sha256
from .settings import Settings
from .sources import sync

STEPS = ("sync", "apply", "build", "smoke")


@dataclass(frozen=True)
class Step:
    name: str
    status: str  # done | skipped | failed | not run
    seconds: float = 0.0
    detail: str = ""
    where: str = ""

    def to_json(self) -> dict:
        return vars(self).copy()

    def line(self) -> str:
        """One progress line; a step that never ran has no time to report."""
        if self.status == "not run":
            return f"[{self.name}] not run: an earlier step failed"
        return f"[{self.name}] {self.status} in {self.seconds:.1f} s" + (f": {self.detail}" if self.detail else "")


@dataclass(frozen=True)
class UpReport:
    stack: str
    steps: tuple[Step, ...]
    error: StackbuildError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_json(self) -> dict:
        return {"stack": self.stack, "ok": self.ok, "steps": [s.to_json() for s in self.steps],
                "error": self.error.to_json() if self.error else None}


def _smoke_key(config: Config, stack: str, digest: str, profile: str | None) -> str:
    """A smoke verdict is reused only for the same wheels, the same smoke settings and profile."""
    table = thaw(config.stack(stack).smoke)
    text = json.dumps({"digest": digest, "smoke": table, "profile": profile}, sort_keys=True)
    return sha256(text.encode())


def _passed_marker(settings: Settings, stack: str, key: str) -> Path:
    return settings.results_dir / stack / ".passed" / key


def up(settings: Settings, config: Config, stack: str, *, profile: str | None = None, force: bool = False,
       engine_urls: tuple[str, ...] = (), smoke: bool = True, say: Callable[[str], None] = lambda _m: None,
       on_step: Callable[[Step], None] = lambda _s: None) -> UpReport:
    resolved = config.stack(stack)
    steps: list[Step] = []

    def record(step: Step) -> None:
        steps.append(step)
        on_step(step)

    def run_step(name: str, fn: Callable[[], tuple[str, str, str]]) -> None:
        say(f"{name} ...")
        start = time.perf_counter()
        try:
            status, detail, where = fn()
        except StackbuildError as exc:
            record(Step(name, "failed", round(time.perf_counter() - start, 2), str(exc.message), exc.where or ""))
            raise
        record(Step(name, status, round(time.perf_counter() - start, 2), detail, where))

    def do_sync() -> tuple[str, str, str]:
        done = [sync(settings, src, root=config.root, progress=True) for src in resolved.sources]
        fetched = [f"{d.source.name}@{d.commit[:12]}" for d in done if d.fetched]
        where = str(settings.mirror_dir)
        return ("done", "fetched " + ", ".join(fetched), where) if fetched else ("skipped", "pins already in the cache", where)

    def do_apply() -> tuple[str, str, str]:
        report = apply_stack(settings, config, stack)
        if report.error is not None:
            raise report.error
        changed = [s.source for s in report.sources if s.action != "unchanged"]
        where = str(settings.work_dir / stack)
        patches = sum(len(s.replay.results) for s in report.sources if s.replay)
        if not changed:
            return "skipped", "worktrees up to date", where
        return "done", f"{patches} patches applied to {', '.join(changed)}", where

    manifest: dict = {}

    def do_build() -> tuple[str, str, str]:
        manifest.update(build_mod.build_stack(settings, config, stack, engine_urls=engine_urls, force=force, log=say))
        info = manifest["summary"]
        where = str(settings.dist_dir / stack)
        if info.get("built"):
            return "done", f"built {', '.join(info['built'])}" + (
                f"; cached {', '.join(info['cached'])}" if info.get("cached") else ""), where
        return "skipped", f"cache hit for {', '.join(info.get('cached', [])) or 'every source'}", where

    def do_smoke() -> tuple[str, str, str]:
        key = _smoke_key(config, stack, manifest["digest"], profile)
        marker = _passed_marker(settings, stack, key)
        if marker.is_file() and not force:
            return "skipped", "passed before with these wheels and settings", marker.read_text().strip()
        record_ = smoke_run.run_smoke(settings, config, stack, profile=profile, say=say)
        result_file = record_["results_file"]
        atomic_write(marker, (result_file + "\n").encode())
        figure = record_["metrics"].get("output_throughput")
        detail = f"{len(record_['checks'])} checks passed" + (
            f", output {figure:.1f} tok/s" if isinstance(figure, (int, float)) else "")
        return "done", detail, result_file

    plan = [("sync", do_sync), ("apply", do_apply), ("build", do_build)]
    if smoke:
        plan.append(("smoke", do_smoke))
    for index, (name, fn) in enumerate(plan):
        try:
            run_step(name, fn)
        except StackbuildError as exc:
            for rest, _ in plan[index + 1:]:
                record(Step(rest, "not run"))
            return UpReport(stack, tuple(steps), exc)
    return UpReport(stack, tuple(steps))
