"""Benchmark: `stackbuild bisect` and `stackbuild rebase` against doing the same by hand with git.

Builds everything in a temporary folder: an upstream with COMMITS first-parent commits (written
through `git fast-import`), a 50-patch series on its first commit, and a stack.toml. Then:

  bisect   stackbuild: `bisect` over the whole history (every patch that stops applying, and the
           newest commit where the whole series still applies), in memory.
           by hand:    for each of those patches, `git bisect run git apply --check PATCH` in a
           worktree (what a person does today), plus the same for the whole series.
  rebase   stackbuild: `rebase STACK --onto REF` end to end (mirror, series, replay, export of
           the patch files, pin move).
           by hand:    `git rebase --onto REF PIN` of the 50 equivalent commits in a worktree
           (commits only: no patch files written).
  horizon  (its own upstream: COMMITS commits, --horizon-patches patches, three of them broken
           for good by upstream rewriting their own line, one only in its context)
           stackbuild: `horizon STACK --to REF`: per patch the newest commit it applies at (clean,
           offset, 3way) and the first that breaks it, and the stack's horizon.
           naive:      every first-parent commit read into an index, then `git apply --cached
           --check PATCH` for each patch, and where that fails `git apply --cached --3way PATCH`:
           the per-commit loop that gives the same answers.

Both rebases start from a worktree that already holds the old series (made untimed: `stackbuild
apply` / `git worktree add`). Each figure is the median of --runs runs; ratios are by-hand time /
stackbuild time.
Usage: python bench/bench_rebase.py [--commits 1000] [--patches 50] [--files 60] [--runs 5] [--json]
                                    [--horizon-patches 10] [--horizon-runs 3] [--only horizon]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from builder import bisection as bs  # noqa: E402
from builder import horizon as hz  # noqa: E402
from builder import rebase as rb  # noqa: E402
from builder.apply import apply_stack  # noqa: E402
from builder.config import load_config  # noqa: E402
from builder.export import canonical_patch  # noqa: E402
from builder.settings import load_settings  # noqa: E402
from timing import timed  # noqa: E402

LINES = 200
ENV = {
    "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull, "LC_ALL": "C",
    "GIT_AUTHOR_NAME": "Bench", "GIT_AUTHOR_EMAIL": "bench@example.invalid", "GIT_AUTHOR_DATE": "1700000000 +0000",
    "GIT_COMMITTER_NAME": "Bench", "GIT_COMMITTER_EMAIL": "bench@example.invalid", "GIT_COMMITTER_DATE": "1700000000 +0000",
}


def git(*args: str, cwd: Path | None = None, input: bytes | None = None, check: bool = True) -> str:
    proc = subprocess.run(["git", *args], cwd=cwd, input=input, capture_output=True, env={**os.environ, **ENV})
    if check and proc.returncode:
        raise SystemExit(f"git {' '.join(args)}: {proc.stderr.decode()}")
    return proc.stdout.decode().strip()


def content(f: int, edits: dict[int, str], top: int) -> bytes:
    rows = [f"file {f} line {i}\n" for i in range(1, LINES + 1)]
    for i, text in edits.items():
        rows[i - 1] = text + "\n"
    return ("".join(f"header {f}.{j}\n" for j in range(top)) + "".join(rows)).encode()


def build_upstream(path: Path, commits: int, patches: int, files: int,
                   breaks: dict[int, tuple[int, int]] | None = None) -> tuple[list[str], dict[int, int]]:
    """Commit 0 is the pin. Upstream commit i touches line 10 of one file (never a patch's context),
    every 50th inserts a line at the top of a file (patches move), and a few touch a patch's
    context (that patch stops applying as is; a three-way merge still takes it). BREAKS maps an
    upstream commit to (patch, line it rewrites): line 100 is the patch's own (a real conflict)."""
    git("init", "-q", "-b", "main", str(path))
    planted = breaks or {commits * 3 // 10: (3, 103), commits * 7 // 10: (7, 103)}
    edits: dict[int, dict[int, str]] = {f: {} for f in range(files)}
    tops = {f: 0 for f in range(files)}
    stream = []
    for i in range(commits + 1):
        changed = set(range(files)) if i == 0 else set()
        if i:
            f = i % min(files, 60)
            edits[f][10] = f"upstream {i}"
            changed.add(f)
            if i % 50 == 0:
                tops[(i // 50) % patches] += 1
                changed.add((i // 50) % patches)
            if i in planted:
                patch, line = planted[i]
                edits[patch][line] = f"upstream {i} rewrites line {line}"
                changed.add(patch)
        msg = f"upstream {i}".encode()
        stream.append(b"commit refs/heads/main\nmark :%d\n" % (i + 1))
        stream.append(b"author Up <up@example.invalid> %d +0000\ncommitter Up <up@example.invalid> %d +0000\n"
                      % (1700000000 + i * 60, 1700000000 + i * 60))
        stream.append(b"data %d\n%s\n" % (len(msg), msg))
        if i:
            stream.append(b"from :%d\n" % i)
        for f in sorted(changed):
            data = content(f, edits[f], tops[f])
            stream.append(b"M 100644 inline src/f%04d.txt\ndata %d\n%s\n" % (f, len(data), data))
    subprocess.run(["git", "fast-import", "--quiet"], cwd=path, input=b"".join(stream), check=True,
                   env={**os.environ, **ENV})
    git("reset", "-q", "--hard", "main", cwd=path)
    return git("rev-list", "--first-parent", "--reverse", "main", cwd=path).split(), {v[0]: k for k, v in planted.items()}


def make_series(upstream: Path, pin: str, patches: int, patch_dir: Path) -> list[str]:
    """Patch k changes line 100 of file k, as a format-patch mail on the pin."""
    names = []
    patch_dir.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(patches):
            env_idx = {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
            subprocess.run(["git", "read-tree", pin], cwd=upstream, env={**os.environ, **ENV, **env_idx}, check=True)
            blob = git("hash-object", "-w", "--stdin", cwd=upstream, input=content(k, {100: f"xpu tuned {k}"}, 0))
            subprocess.run(["git", "update-index", "--cacheinfo", f"100644,{blob},src/f{k:04d}.txt"], cwd=upstream,
                           env={**os.environ, **ENV, **env_idx}, check=True)
            tree = subprocess.run(["git", "write-tree"], cwd=upstream, env={**os.environ, **ENV, **env_idx},
                                  capture_output=True, check=True).stdout.decode().strip()
            commit = git("commit-tree", tree, "-p", pin, "-m", f"xpu: tune file {k}", cwd=upstream)
            name = f"{k + 1:04d}-xpu-tune-file-{k}.patch"
            (patch_dir / name).write_bytes(canonical_patch(upstream / ".git", commit))
            names.append(name)
    (patch_dir / "series").write_text("".join(f"{n}\n" for n in names))
    return names


def bench_horizon(tmp: Path, commits: int, patches: int, files: int, runs: int) -> dict:
    up = tmp / "horizon-upstream"
    breaks = {commits // 4: (2, 100), commits * 2 // 5: (4, 103), commits // 2: (5, 100), commits * 3 // 4: (8, 100)}
    shas, _ = build_upstream(up, commits, patches, files, breaks)
    pin, ref = shas[0], shas[-1]
    root = tmp / "horizon-project"
    names = make_series(up, pin, patches, root / "patches" / "xpu")
    (root / "stack.toml").write_text(f'[sources.vllm]\nurl = "{up}"\ncommit = "{pin}"\n\n'
                                     '[series.xpu]\nsource = "vllm"\n\n[stacks.lab]\nseries = ["xpu"]\n')
    cfg = load_config(root / "stack.toml")
    settings = load_settings(cfg, work_dir=root / "work")
    first = hz.horizon_stack(settings, cfg, "lab", "vllm", ref)  # warms the mirror (a fetch is not what we measure)
    index = {c: i for i, c in enumerate(shas)}
    ours = {p.name: index[p.breaking.sha] for p in first.patches if p.breaking}
    conflicts = {names[k]: i for i, (k, line) in breaks.items() if line == 100}
    assert ours == conflicts, (ours, conflicts)
    assert first.stack_until and index[first.stack_until.sha] == min(conflicts.values()) - 1
    assert next(p for p in first.patches if p.name == names[4]).mode == "3way"
    assert all(p.probes <= first.bound for p in first.patches)

    files_ = [str(root / "patches" / "xpu" / n) for n in names]

    def naive() -> dict[str, int]:
        first_failure: dict[str, int] = {}
        with tempfile.TemporaryDirectory() as scratch:
            env = {**os.environ, **ENV, "GIT_INDEX_FILE": str(Path(scratch) / "index")}
            for i, commit in enumerate(shas):
                subprocess.run(["git", "read-tree", commit], cwd=up, env=env, check=True)
                for name, path in zip(names, files_):
                    rc = subprocess.run(["git", "apply", "--cached", "--check", path], cwd=up, env=env,
                                        capture_output=True).returncode
                    if rc:
                        # `apply --check --3way` exits 0 even when the merge would conflict (git 2.39,
                        # observed), so the merge is run for real on the index, then the index reset.
                        rc = subprocess.run(["git", "apply", "--cached", "--3way", path], cwd=up, env=env,
                                            capture_output=True).returncode
                        subprocess.run(["git", "read-tree", commit], cwd=up, env=env, check=True)
                    if rc and name not in first_failure:
                        first_failure[name] = i
        return first_failure

    got = naive()
    assert got == ours, (got, ours)  # the same answers, or the comparison means nothing
    return {
        "horizon_commits": commits, "horizon_patches": patches, "horizon_runs": runs,
        "horizon_probes": first.probes, "horizon_bound_per_patch": first.bound,
        "horizon_ours_s": statistics.median(timed(lambda: hz.horizon_stack(settings, cfg, "lab", "vllm", ref))
                                            for _ in range(runs)),
        "horizon_naive_s": statistics.median(timed(naive) for _ in range(runs)),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--commits", type=int, default=1000)
    ap.add_argument("--patches", type=int, default=50)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--files", type=int, default=60, help="files in the tree (vLLM has ~4,800)")
    ap.add_argument("--horizon-patches", type=int, default=10)
    ap.add_argument("--horizon-runs", type=int, default=3, help="the naive loop runs ~11 git processes per commit")
    ap.add_argument("--only", choices=["horizon"], help="run only this part")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    os.environ.update(ENV)
    with tempfile.TemporaryDirectory(prefix="bench-rebase-") as tmp_s:
        tmp = Path(tmp_s)
        os.environ["HOME"] = str(tmp / "home")
        os.environ["STACKBUILD_CACHE"] = str(tmp / "cache")
        horizon = bench_horizon(tmp, args.commits, args.horizon_patches, args.files, args.horizon_runs)
        horizon["horizon_speedup"] = horizon["horizon_naive_s"] / horizon["horizon_ours_s"]
        if args.only == "horizon":
            report_horizon(horizon, args.json)
            return
        up = tmp / "upstream"
        shas, breaks = build_upstream(up, args.commits, args.patches, args.files)
        pin, ref = shas[0], shas[-1]
        pristine = tmp / "pristine"
        names = make_series(up, pin, args.patches, pristine / "patches" / "xpu")
        (pristine / "stack.toml").write_text(
            f'# bench stack\n[sources.vllm]\nurl = "{up}"\ncommit = "{pin}"  # the pin\n\n'
            '[series.xpu]\nsource = "vllm"\n\n[stacks.lab]\nseries = ["xpu"]\n')

        def fresh(run: int) -> tuple[Path, object, object]:
            root = tmp / f"project-{run}"
            shutil.rmtree(root, ignore_errors=True)
            shutil.copytree(pristine, root)
            cfg = load_config(root / "stack.toml")
            return root, cfg, load_settings(cfg, work_dir=root / "work")

        # warm the mirror once (a fetch is not what we measure)
        _, cfg0, settings0 = fresh(0)
        report = bs.bisect_stack(settings0, cfg0, "lab", "vllm", ref)
        mirror = bs.sources.sync(settings0, cfg0.sources["vllm"]).git_dir
        found = {b.name: b.commit.sha for b in report.patches if b.commit}
        expected = {names[k]: shas[i] for k, i in breaks.items()}
        assert found == expected, (found, expected)
        assert report.newest_clean and report.newest_clean.sha == shas[min(breaks.values()) - 1]
        assert all(b.probes <= report.bound for b in report.patches)

        def ours_bisect() -> None:
            bs.bisect_stack(settings0, cfg0, "lab", "vllm", ref)

        def hand_bisect() -> None:
            wt = tmp / "bisect-wt"
            git("worktree", "add", "-q", "--detach", str(wt), ref, cwd=up)
            try:
                files = [str(pristine / "patches" / "xpu" / n) for n in names]
                for target in [files[k] for k in sorted(breaks)] + [None]:
                    git("bisect", "start", ref, pin, cwd=wt)
                    check = ["git", "apply", "--check", target] if target else ["git", "apply", "--check", *files]
                    git("bisect", "run", *check, cwd=wt)
                    git("bisect", "reset", cwd=wt)
            finally:
                git("worktree", "remove", "--force", str(wt), cwd=up)

        def ours_rebase(run: int) -> float:
            root, cfg, settings = fresh(run)
            # Both sides start from a worktree that holds the old series (by hand: `worktree add`).
            apply_stack(settings, cfg, "lab")
            out: list = []
            t = timed(lambda: out.append(rb.rebase_stack(settings, cfg, "lab", "vllm", onto=ref)))
            assert out[0].status == "finished", out[0].to_json()
            assert f'commit = "{ref}"' in (root / "stack.toml").read_text()
            return t

        def hand_rebase(run: int) -> float:
            _, cfg, settings = fresh(run)
            plan = rb.make_plan(settings, cfg, "lab", "vllm", ref)
            wt = tmp / f"rebase-wt-{run}"
            git("worktree", "add", "-q", "-B", f"hand-{run}", str(wt), plan.items[-1].old_commit, cwd=mirror)
            try:
                return timed(lambda: git("rebase", "-q", "--onto", ref, pin, cwd=wt))
            finally:
                git("worktree", "remove", "--force", str(wt), cwd=mirror)

        results = {
            "commits": args.commits, "patches": args.patches, "files": args.files, "runs": args.runs,
            "bisect_probes": report.probes, "bisect_bound_per_patch": report.bound,
            "bisect_ours_s": statistics.median(timed(ours_bisect) for _ in range(args.runs)),
            "bisect_by_hand_s": statistics.median(timed(hand_bisect) for _ in range(args.runs)),
            "rebase_ours_s": statistics.median(ours_rebase(r + 1) for r in range(args.runs)),
            "rebase_by_hand_s": statistics.median(hand_rebase(r + 1) for r in range(args.runs)),
        }
        results["bisect_speedup"] = results["bisect_by_hand_s"] / results["bisect_ours_s"]
        results["rebase_speedup"] = results["rebase_by_hand_s"] / results["rebase_ours_s"]
        results.update(horizon)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"history: {args.commits} commits, tree: {args.files} files, series: {args.patches} patches, "
          f"median of {args.runs}")
    print(f"bisect  stackbuild {results['bisect_ours_s']:.2f} s ({report.probes} probes)   "
          f"git bisect run by hand {results['bisect_by_hand_s']:.2f} s   x{results['bisect_speedup']:.1f}")
    print(f"rebase  stackbuild {results['rebase_ours_s']:.2f} s (with export)   "
          f"git rebase by hand {results['rebase_by_hand_s']:.2f} s   x{results['rebase_speedup']:.2f}")
    report_horizon(results, False)


def report_horizon(r: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(r, indent=2))
        return
    print(f"horizon stackbuild {r['horizon_ours_s']:.2f} s ({r['horizon_probes']} probes, {r['horizon_commits']} commits x "
          f"{r['horizon_patches']} patches, median of {r['horizon_runs']})   naive per-commit git apply --check loop "
          f"{r['horizon_naive_s']:.2f} s   x{r['horizon_speedup']:.1f}")


if __name__ == "__main__":
    main()
