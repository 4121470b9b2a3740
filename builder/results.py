"""Smoke results: one JSON file per run under results/<stack>/, listed side by side and plotted.

Files are written to a temporary name and renamed, so a run that dies leaves no half record.
"""

from __future__ import annotations

import io
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

from .errors import ConfigError, SmokeError
from .fsutil import atomic_write

# The figures `results` shows per run; names as in the results files' "metrics".
COLUMNS = ("output_throughput", "output_throughput_spread_pct", "total_token_throughput", "median_ttft_ms",
           "median_ttft_ms_spread_pct", "p90_ttft_ms", "median_tpot_ms", "median_itl_ms")
# Short headers so the side-by-side table fits a terminal; --json keeps the full names.
LABELS = {"output_throughput": "out tok/s", "output_throughput_spread_pct": "±%", "total_token_throughput": "total tok/s",
          "median_ttft_ms": "TTFT ms", "median_ttft_ms_spread_pct": "±%", "p90_ttft_ms": "TTFT p90",
          "median_tpot_ms": "TPOT ms", "median_itl_ms": "ITL ms"}
SPREAD_SUFFIX = "_spread_pct"


def new_result_path(results_dir: Path, stack: str) -> tuple[str, Path]:
    """A UTC timestamp and a results path no earlier run has taken."""
    folder = results_dir / stack
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path, n = folder / f"{stamp}.json", 1
    while path.exists() or path.with_suffix(".server.log").exists():
        n += 1
        path = folder / f"{stamp}-{n}.json"
    return stamp, path


def write_result(path: Path, record: Mapping[str, Any]) -> None:
    atomic_write(path, (json.dumps(record, indent=2, sort_keys=False, default=str) + "\n").encode("utf-8"))


def read_result(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read results file: {exc}", where=str(path),
                          hint="name a results/<stack>/<timestamp>.json written by `stackbuild smoke`") from None
    if not isinstance(data, dict) or data.get("schema") != 1:
        raise ConfigError("not a stackbuild results file (schema 1)", where=str(path),
                          hint="name a results/<stack>/<timestamp>.json written by `stackbuild smoke`")
    return data


def list_results(results_dir: Path, stack: str) -> list[dict[str, Any]]:
    """Every run of the stack, oldest first, each with its file name under "file"."""
    folder = results_dir / stack
    runs = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        if path.name.startswith("."):
            continue
        data = read_result(path)
        runs.append({**data, "file": str(path)})
    runs.sort(key=lambda r: (r.get("started", ""), r["file"]))
    return runs


def summary_rows(runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for run in runs:
        metrics = run.get("metrics") or {}
        # Range over the bench rounds in % of the median; absent in runs from before rounds existed.
        spread = {f"{n}{SPREAD_SUFFIX}": s.get("pct") for n, s in (run.get("spread") or {}).items()}
        failed = [c["name"] for c in run.get("checks", []) if not c.get("ok")]
        rows.append({
            "started": run.get("started"),
            "profile": (run.get("profile") or {}).get("name"),
            "verdict": run.get("verdict"),
            "digest": (run.get("digest") or "")[:12] or None,
            "rounds": len(run.get("rounds") or []) or None,
            **{c: metrics.get(c, spread.get(c)) for c in COLUMNS},
            "failed": failed,
            "file": run.get("file"),
        })
    return rows


def throughput_figure(points: Sequence[Mapping[str, Any]], stack: str):
    """The figure `plot_throughput` saves (separate so its axes can be inspected)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=100)
    # Runs sit at even steps labelled by their time: a date axis stretches one run over a day.
    labels = [f"{r['started'][4:6]}-{r['started'][6:8]} {r['started'][9:11]}:{r['started'][11:13]}" for r in points]
    index = {id(r): i for i, r in enumerate(points)}
    profiles = sorted({(r.get("profile") or {}).get("name", "?") for r in points})
    top = 0.0
    for profile in profiles:
        mine = [r for r in points if (r.get("profile") or {}).get("name", "?") == profile]
        xs = [index[id(r)] for r in mine]
        for metric, style in (("output_throughput", "o-"), ("total_token_throughput", "s--")):
            ys = [r["metrics"].get(metric) for r in mine]
            # Error bars span the lowest and highest bench round; a run without rounds has none.
            lows = [y - ((r.get("spread") or {}).get(metric) or {}).get("min", y) for r, y in zip(mine, ys)]
            highs = [((r.get("spread") or {}).get(metric) or {}).get("max", y) - y for r, y in zip(mine, ys)]
            ax.errorbar(xs, ys, yerr=[lows, highs], fmt=style, capsize=4, label=f"{profile} {metric} (median, round range)")
            top = max(top, *(y + h for y, h in zip(ys, highs)))
        bad = [(index[id(r)], r["metrics"]["output_throughput"]) for r in mine if r.get("verdict") != "pass"]
        if bad:
            ax.scatter([x for x, _ in bad], [y for _, y in bad], marker="x", s=80, color="red", zorder=3, label=f"{profile} failed run")
    ax.set_title(f"stackbuild smoke: {stack}")
    ax.set_ylabel("tokens/s")
    ax.set_xlabel("run (UTC)")
    ax.set_xticks(range(len(points)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_xlim(-0.5, len(points) - 0.5)
    ax.set_ylim(0, top * 1.15 or 1)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_throughput(runs: Sequence[Mapping[str, Any]], out: Path, stack: str) -> Path:
    """Output and total tok/s per run (median, with the range over its bench rounds as error bars),
    one line per profile, failed runs marked, the axis from zero; PNG written atomically."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SmokeError("plotting needs matplotlib", where="--plot",
                         hint="pip install 'stackbuild[smoke]'") from None
    points = [r for r in runs if (r.get("metrics") or {}).get("output_throughput") is not None]
    if not points:
        raise SmokeError(f"no run of stack '{stack}' has throughput figures to plot", where=str(out),
                         hint=f"run `stackbuild smoke {stack}` first")
    fig = throughput_figure(points, stack)
    png = io.BytesIO()
    try:
        fig.savefig(png, format="png")
    finally:
        plt.close(fig)
    atomic_write(out, png.getvalue())
    return out
