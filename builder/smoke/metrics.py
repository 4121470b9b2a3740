"""Benchmarks, their metrics (named as `vllm bench serve` names them), gates and baselines."""

from __future__ import annotations

import statistics
import time
from typing import Any, Mapping, Sequence

import requests

from .checks import CheckResult, in_parallel
from .client import Client, Completion
from .config import Bench, Gate, HIGHER_IS_BETTER, LATENCIES


def bench_prompt(client: Client, bench: Bench) -> list[int] | str:
    """Exactly `prompt_tokens` token ids from the server's own tokenizer, as `vllm bench serve` does."""
    try:
        resp = client.post("/tokenize", {"model": client.model, "prompt": bench.prompt})
        tokens = resp.json().get("tokens") if resp.status_code == 200 else None
    except (requests.RequestException, ValueError):
        tokens = None
    if not tokens:
        return bench.prompt * max(1, bench.prompt_tokens // max(1, len(bench.prompt.split())))
    return [tokens[i % len(tokens)] for i in range(bench.prompt_tokens)]


def run_bench(client: Client, bench: Bench) -> tuple[list[Completion], float]:
    prompt = bench_prompt(client, bench)
    results: list[Completion] = []
    start = time.perf_counter()
    for first in range(0, bench.requests, bench.concurrency):
        batch = min(bench.concurrency, bench.requests - first)
        results += in_parallel(lambda _i: client.complete(prompt, stream=True, max_tokens=bench.max_tokens,
                                                        ignore_eos=True), batch)
    return results, time.perf_counter() - start


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values")
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def compute_metrics(done: Sequence[Completion], duration: float) -> dict[str, float]:
    ok = [c for c in done if c.ok and c.ttft is not None and c.completion_tokens]
    if not ok or duration <= 0:
        return {"completed": float(len(ok))}
    out_tokens = sum(c.completion_tokens or 0 for c in ok)
    in_tokens = sum(c.prompt_tokens or 0 for c in ok)
    series: dict[str, list[float]] = {
        "ttft_ms": [c.ttft * 1000 for c in ok],  # type: ignore[operator]
        "tpot_ms": [(c.e2e - c.ttft) * 1000 / (c.completion_tokens - 1) for c in ok if c.completion_tokens > 1],  # type: ignore[operator]
        "itl_ms": [x * 1000 for c in ok for x in c.itl],
        "e2el_ms": [c.e2e * 1000 for c in ok],
        "output_tok_s": [(c.completion_tokens - 1) / (c.e2e - c.ttft) for c in ok  # type: ignore[operator]
                         if c.completion_tokens > 1 and c.e2e > c.ttft],  # type: ignore[operator]
        "input_tok_s": [(c.prompt_tokens or 0) / c.ttft for c in ok if c.ttft],
        "total_tok_s": [((c.prompt_tokens or 0) + (c.completion_tokens or 0)) / c.e2e for c in ok if c.e2e],
    }
    metrics: dict[str, float] = {
        "completed": float(len(ok)),
        "failed": float(len(done) - len(ok)),
        "duration_s": duration,
        "total_input_tokens": float(in_tokens),
        "total_output_tokens": float(out_tokens),
        "request_throughput": len(ok) / duration,
        "output_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
        "input_throughput": in_tokens / duration,
    }
    for name, values in series.items():
        if not values:
            continue
        if name in LATENCIES:
            metrics[f"mean_{name}"] = statistics.fmean(values)
        metrics[f"median_{name}"] = statistics.median(values)
        metrics[f"p90_{name}"] = percentile(values, 90)
    return {k: round(v, 4) for k, v in metrics.items()}


def summarize_rounds(rounds: Sequence[Mapping[str, float]]) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """The median of each metric over the bench rounds, and its spread: lowest, highest, and the
    range as a percentage of the median. Only metrics every round measured count."""
    if not rounds:
        return {}, {}
    names = [n for n in rounds[0] if all(n in r for r in rounds[1:])]
    metrics, spread = {}, {}
    for name in names:
        values = [r[name] for r in rounds]
        median = statistics.median(values)
        metrics[name] = round(median, 4)
        spread[name] = {"min": round(min(values), 4), "max": round(max(values), 4),
                        "pct": round((max(values) - min(values)) / abs(median) * 100, 2) if median else 0.0}
    return metrics, spread


def describe_spread(name: str, spread: Mapping[str, Mapping[str, float]]) -> str:
    """`(range 480-560 over 3 rounds, 16%)`, or nothing for a single round."""
    s = spread.get(name)
    if not s or s["min"] == s["max"]:
        return ""
    return f" (rounds {s['min']:g}–{s['max']:g}, spread {s['pct']:g}%)"


def evaluate_gates(gates: Sequence[Gate], metrics: Mapping[str, float],
                   spread: Mapping[str, Mapping[str, float]] | None = None) -> list[CheckResult]:
    """Judges the median over the rounds; the spread is printed beside it, never judged."""
    out = []
    spread = spread or {}
    for gate in gates:
        value = metrics.get(gate.metric)
        bounds = " and ".join(b for b in (f">= {gate.min:g}" if gate.min is not None else "",
                                          f"<= {gate.max:g}" if gate.max is not None else "") if b)
        ok = value is not None and (gate.min is None or value >= gate.min) and (gate.max is None or value <= gate.max)
        out.append(CheckResult(f"gate:{gate.metric}", ok,
                               f"median {gate.metric} = {value}{describe_spread(gate.metric, spread)} (gate {bounds})",
                               {"value": value, "min": gate.min, "max": gate.max, "spread": spread.get(gate.metric)}))
    return out


def compare_baseline(baseline: Mapping[str, Any], metrics: Mapping[str, float], checks: Sequence[CheckResult],
                     names: Sequence[str], tolerance: float, source: str,
                     spread: Mapping[str, Mapping[str, float]] | None = None) -> list[CheckResult]:
    """Fails on a regression beyond the tolerance and on any canary whose output hash changed.

    A difference no larger than the noise — the wider of the two runs' round-to-round ranges — is
    "within noise" and passes whatever the tolerance: the figures cannot tell it from chance.
    """
    out = []
    spread = spread or {}
    base_metrics = baseline.get("metrics") or {}
    base_spread = baseline.get("spread") or {}
    for name in names:
        old, new = base_metrics.get(name), metrics.get(name)
        if old is None or new is None:
            continue
        noise = max((s["max"] - s["min"] for s in (spread.get(name), base_spread.get(name)) if s), default=0.0)
        change = (new - old) / old * 100 if old else 0.0
        figures = {"value": new, "baseline": old, "change_pct": round(change, 2), "noise": round(noise, 4)}
        if noise and abs(new - old) <= noise:
            out.append(CheckResult(f"baseline:{name}", True, f"median {new:g} vs {old:g} ({change:+.1f}%): within noise "
                                   f"(rounds differ by up to {noise:g})", figures))
            continue
        if name in HIGHER_IS_BETTER:
            ok = new >= old * (1 - tolerance)
        else:
            ok = new <= old * (1 + tolerance)
        beyond = f", beyond the noise of {noise:g}" if noise else ""
        out.append(CheckResult(f"baseline:{name}", ok,
                               f"median {new:g} vs {old:g} ({change:+.1f}%, tolerance {tolerance:.0%}{beyond})", figures))
    old_checks = {c.get("name"): c for c in baseline.get("checks") or [] if isinstance(c, dict)}
    for check in checks:
        if not check.name.startswith("canary:") or "sha256" not in check.figures:
            continue
        before = old_checks.get(check.name, {}).get("figures", {})
        keys = ("chat", "stream")
        if "sha256" not in before or any(before.get(k) != check.figures.get(k) for k in keys):
            continue
        same = before["sha256"] == check.figures["sha256"]
        out.append(CheckResult(f"baseline:{check.name}", same,
                               "output hash unchanged" if same else
                               f"output hash changed: {check.figures['sha256'][:12]}… vs {before['sha256'][:12]}…",
                               {"sha256": check.figures["sha256"], "baseline_sha256": before["sha256"]}))
    if not out:
        out.append(CheckResult("baseline", False, f"baseline {source} shares no metric or canary with this run",
                               {"baseline": source}))
    return out
