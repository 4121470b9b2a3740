"""Apply/check speed against `git am` and the squashed floor, on a vLLM-size tree.

Builds (once, in a temporary folder) a repository shaped like vLLM 0.32.0's source release —
7,700 files, ~130 MB — and a 200-patch `git format-patch` series touching ~470 files with ~630
hunks, then times, medians of --runs:
  git am            the 200 mails onto a checkout of the base (what people do by hand)
  squashed floor    ONE `git apply --cached` of the squashed diff into a temporary index
  stackbuild check  every patch's verdict, in memory (commits only where git must merge)
  stackbuild apply  every patch as a commit (one fast-import), then an existing worktree moved
Ratios are printed against `git am` and against the floor. Usage:
  python bench/bench_apply.py [--runs 5] [--files 7700] [--patches 200]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from builder.replay import replay  # noqa: E402
from builder.worktrees import journaled_move  # noqa: E402
from timing import timed  # noqa: E402
from builder.patches import parse_patch  # noqa: E402

ENV = {**os.environ, "GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@b", "GIT_COMMITTER_NAME": "b",
       "GIT_COMMITTER_EMAIL": "b@b", "GIT_AUTHOR_DATE": "1700000000 +0000", "GIT_COMMITTER_DATE": "1700000000 +0000",
       "GIT_CONFIG_NOSYSTEM": "1", "HOME": tempfile.gettempdir()}


def git(*args: str, cwd: Path, input: bytes | None = None, env: dict | None = None) -> bytes:
    return subprocess.run(["git", *args], cwd=cwd, input=input, env=env or ENV, check=True, capture_output=True).stdout


def make_tree(root: Path, files: int, rng: random.Random) -> list[str]:
    names = []
    for i in range(files):
        d = f"pkg{i % 40}/mod{i % 7}"
        name = f"{d}/file_{i}.py"
        lines = [f"def f_{i}_{j}(x):  # {rng.getrandbits(48):x}\n    return x + {j}\n" for j in range(rng.randint(80, 420))]
        (root / d).mkdir(parents=True, exist_ok=True)
        (root / name).write_text("".join(lines))
        names.append(name)
    return names


def make_series(repo: Path, names: list[str], patches: int, rng: random.Random) -> Path:
    """One commit per patch on a branch; 630 hunks over ~474 files in all."""
    touched = rng.sample(names, 474)
    plan: list[list[str]] = [[] for _ in range(patches)]
    for i, name in enumerate(touched):
        plan[i % patches].append(name)
    hunks_left = 630 - len(touched)
    for n in range(patches):
        files = plan[n]
        for name in files:
            path = repo / name
            lines = path.read_text().splitlines(keepends=True)
            hunk_count = 1 + (1 if hunks_left > 0 and rng.random() < 0.35 else 0)
            hunks_left -= hunk_count - 1
            at = rng.randrange(10, len(lines) - 10)
            for h in range(hunk_count):
                at = at if h == 0 else min(len(lines) - 5, at + 40)
                lines[at] = lines[at].rstrip("\n") + f"  # patched {n}\n"
                lines.insert(at + 1, f"    pass  # added by patch {n}\n")
            path.write_text("".join(lines))
        git("add", "-A", cwd=repo)
        git("commit", "-q", "-m", f"patch {n}: tune {len(files)} files", cwd=repo)
    out = repo.parent / "series"
    out.mkdir()
    git("format-patch", "-q", "--full-index", "--zero-commit", "-o", str(out), f"HEAD~{patches}", cwd=repo)
    return out


def settle(checkout: Path) -> None:
    """A worktree made this second is "racily clean": git would re-read every file. Real worktrees
    are older than that, so both contenders start from a settled, refreshed index."""
    time.sleep(1.1)
    git("update-index", "-q", "--refresh", cwd=checkout)
    git("status", "--porcelain", cwd=checkout)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--files", type=int, default=7700)
    ap.add_argument("--patches", type=int, default=200)
    args = ap.parse_args()
    rng = random.Random(20261128)
    tmp = Path(tempfile.mkdtemp(prefix="stackbuild-bench-"))
    try:
        src = tmp / "src"
        src.mkdir()
        git("init", "-q", "-b", "main", cwd=src)
        names = make_tree(src, args.files, rng)
        git("add", "-A", cwd=src)
        git("commit", "-q", "-m", "base", cwd=src)
        base = git("rev-parse", "HEAD", cwd=src).decode().strip()
        series_dir = make_series(src, names, args.patches, rng)
        tip = git("rev-parse", "HEAD", cwd=src).decode().strip()
        mails = sorted(series_dir.glob("*.patch"))
        squashed = git("diff", "--full-index", base, tip, cwd=src)
        size = sum(f.stat().st_size for f in src.rglob("*") if f.is_file() and ".git" not in f.parts)
        print(f"tree: {len(names)} files, {size / 1e6:.0f} MB; series: {len(mails)} patches", file=sys.stderr)
        patches = [parse_patch(m.read_bytes(), series="bench", name=m.name, where=str(m)) for m in mails]
        print(f"hunks: {sum(len(f.hunks) for p in patches for f in p.files)}, "
              f"files: {len({f.path for p in patches for f in p.files})}", file=sys.stderr)
        mirror = tmp / "mirror.git"
        git("clone", "-q", "--bare", str(src), str(mirror), cwd=tmp)
        tip_tree = git("rev-parse", f"{tip}^{{tree}}", cwd=src).decode().strip()

        results: dict[str, list[float]] = {"git am": [], "squashed floor": [], "stackbuild check": [],
                                           "stackbuild apply": []}
        for run in range(args.runs):
            am = tmp / f"am{run}"
            git("clone", "-q", "--shared", str(mirror), str(am), cwd=tmp)
            git("checkout", "-q", base, cwd=am)
            settle(am)
            results["git am"].append(timed(lambda: git("am", "-q", "--committer-date-is-author-date",
                                                       *map(str, mails), cwd=am)))
            assert git("rev-parse", "HEAD^{tree}", cwd=am).decode().strip() == tip_tree
            idx_env = {**ENV, "GIT_INDEX_FILE": str(tmp / f"floor{run}.idx")}

            def floor() -> None:
                git("read-tree", base, cwd=am, env=idx_env)
                git("apply", "--cached", cwd=am, input=squashed, env=idx_env)
                git("write-tree", cwd=am, env=idx_env)

            results["squashed floor"].append(timed(floor))
            shutil.rmtree(am)

            holder: dict = {}
            results["stackbuild check"].append(timed(lambda: holder.update(r=replay(mirror, base, patches, write=False))))
            assert holder["r"].ok and len(holder["r"].results) == len(patches)

            wt = tmp / f"wt{run}"
            git("clone", "-q", "--shared", "--no-checkout", str(mirror), str(wt), cwd=tmp)
            git("checkout", "-q", "-B", "stackbuild/bench", base, cwd=wt)
            settle(wt)

            def ours_apply() -> None:
                res = replay(mirror, base, patches)
                journaled_move(tmp, wt.name, mirror, wt, "stackbuild/bench", base, res.head, record=lambda: None)

            results["stackbuild apply"].append(timed(ours_apply))
            assert git("rev-parse", "HEAD^{tree}", cwd=wt).decode().strip() == tip_tree
            shutil.rmtree(wt)

        med = {k: statistics.median(v) for k, v in results.items()}
        rows = []
        for k, v in med.items():
            rows.append({"step": k, "median_s": round(v, 3), "min_s": round(min(results[k]), 3),
                         "max_s": round(max(results[k]), 3), "vs_git_am": round(med["git am"] / v, 2),
                         "vs_floor": round(v / med["squashed floor"], 2)})
        print(f"{'step':18} {'median s':>9} {'range':>15} {'git am / x':>11} {'x / floor':>10}")
        for row in rows:
            print(f"{row['step']:18} {row['median_s']:9.3f} {row['min_s']:7.3f}-{row['max_s']:<7.3f} "
                  f"{row['vs_git_am']:11.2f} {row['vs_floor']:10.2f}")
        print(json.dumps({"runs": args.runs, "files": len(names), "patches": len(mails), "results": rows}))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
