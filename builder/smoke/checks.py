"""Readiness and the checks a run makes against a live server."""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import requests

from ..errors import SmokeError
from .client import Client, Completion, short_error
from .config import Canary, LOG_TAIL
from .runtime import Server, tail_text


# ---------------------------------------------------------------------------------------------
# Readiness


class ServerFailed(SmokeError):
    """The server died or never became ready; carries the end of its log for the user."""

    def __init__(self, message: str, *, log: Path | None, hint: str | None = None):
        super().__init__(message, where=str(log) if log else None, hint=hint)
        self.log_tail = tail_text(log, LOG_TAIL) if log else ""



def wait_ready(server: Server, client: Client, timeout: float, poll: float = 0.2) -> float:
    """Seconds until `/health` is 200 and a real completion succeeds; fails at once if the server exits."""
    start = time.monotonic()
    deadline = start + timeout
    while True:
        code = server.exit_code()
        if code is not None:
            raise ServerFailed(f"the server exited with code {code} before it was ready", log=server.log,
                               hint="read the server log lines above")
        if time.monotonic() > deadline:
            raise ServerFailed(f"the server was not ready after {timeout:g} s", log=server.log,
                               hint="raise ready_timeout in the profile if it is only slow")
        try:
            health = client.get("/health", timeout=5).status_code
        except requests.RequestException:
            health = None
        if health == 200:
            probe = client.complete("Hello", max_tokens=1, timeout=max(5.0, deadline - time.monotonic()))
            if probe.ok and (probe.completion_tokens or probe.text):
                return time.monotonic() - start
            # 503 and dropped connections mean "still starting"; anything else is a real failure.
            if probe.status not in (0, 503):
                raise ServerFailed(f"/health is 200 but a completion fails: {probe.error}", log=server.log,
                                   hint="the engine is broken, not starting; read the server log")
        time.sleep(poll)


# ---------------------------------------------------------------------------------------------
# Checks, metrics, gates


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    detail: str
    figures: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"name": self.name, "ok": self.ok, "detail": self.detail, "figures": dict(self.figures)}


def _json_of(client: Client, path: str) -> tuple[requests.Response | None, Any, str | None]:
    try:
        resp = client.get(path)
    except requests.RequestException as exc:
        return None, None, short_error(exc)
    if resp.status_code != 200:
        return resp, None, f"HTTP {resp.status_code}"
    try:
        return resp, resp.json(), None
    except ValueError:
        return resp, None, "not JSON"


def check_health(client: Client) -> CheckResult:
    try:
        t = time.perf_counter()
        code = client.get("/health").status_code
        ms = (time.perf_counter() - t) * 1000
    except requests.RequestException as exc:
        return CheckResult("health", False, short_error(exc))
    return CheckResult("health", code == 200, f"GET /health -> {code}", {"status": code, "ms": round(ms, 2)})


def check_models(client: Client, served: str, max_model_len: int) -> CheckResult:
    _resp, data, err = _json_of(client, "/v1/models")
    if err:
        return CheckResult("models", False, f"GET /v1/models: {err}")
    try:
        entry = next(m for m in data["data"] if m.get("id") == served)
    except (KeyError, TypeError, StopIteration):
        ids = [m.get("id") for m in (data or {}).get("data", []) if isinstance(m, dict)] if isinstance(data, dict) else []
        return CheckResult("models", False, f"model '{served}' not listed (listed: {ids})", {"ids": ids})
    got = entry.get("max_model_len")
    ok = got == max_model_len
    return CheckResult("models", ok, f"id {served}, max_model_len {got}" + ("" if ok else f" (profile says {max_model_len})"),
                       {"id": served, "max_model_len": got, "expected_max_model_len": max_model_len})


def reported_as(got: str, installed: str) -> bool:
    """Is GOT what vLLM reports for a wheel of version INSTALLED? Its build appends the target
    device to the wheel's local label only: `0.32.0+cpu` is served as `0.32.0`, and a git source's
    `0.0.0+gc51df4300572.cpu` (PEP 440 joins local segments with '.') as `0.0.0+gc51df4300572`."""
    if got in (installed, installed.split("+")[0]):
        return True
    return "+" in got and installed.startswith(got + ".")


def check_version(client: Client, expected: Mapping[str, str], installed: str | None = None) -> CheckResult:
    """`expected` fields must match exactly; `installed` (the wheel's or distribution's version) may
    differ by its local label: vLLM's build appends `+cpu` to the wheel only, not to what it reports."""
    _resp, data, err = _json_of(client, "/version")
    if err or not isinstance(data, dict):
        return CheckResult("version", False, f"GET /version: {err or 'not an object'}")
    wanted = dict(expected)
    wrong = {k: data.get(k) for k, v in wanted.items() if str(data.get(k)) != v}
    got = data.get("version")
    if got is None:
        wrong["version"] = None
    elif installed and "version" not in wanted:
        wanted["version"] = installed
        if not reported_as(str(got), installed):
            wrong["version"] = got
    detail = ", ".join(f"{k}={data.get(k)!r}" for k in sorted(set(wanted) | {"version"}))
    if installed and got != installed and "version" not in wrong and "version" not in expected:
        detail += f" (installed {installed}; the local label is not reported)"
    if wrong:
        detail += "; expected " + ", ".join(f"{k}={wanted.get(k, '<present>')!r}" for k in wrong)
    return CheckResult("version", not wrong, detail, {"response": data, "expected": wanted})


def check_headers(client: Client, expected: Mapping[str, str], paths: Sequence[str]) -> CheckResult:
    seen: dict[str, dict[str, str | None]] = {}
    ok = True
    for path in paths:
        try:
            headers = {k.lower(): v for k, v in client.get(path).headers.items()}
        except requests.RequestException as exc:
            return CheckResult("headers", False, f"GET {path}: {short_error(exc)}")
        seen[path] = {name: headers.get(name.lower()) for name in expected}
        ok &= all(headers.get(name.lower()) == value for name, value in expected.items())
    detail = "; ".join(f"{p}: " + ", ".join(f"{n}={v!r}" for n, v in h.items()) for p, h in seen.items())
    return CheckResult("headers", ok, detail + ("" if ok else f"; expected {dict(expected)}"), {"seen": seen})


def check_canary(client: Client, canary: Canary) -> tuple[CheckResult, Completion]:
    done = client.complete(canary.prompt, chat=canary.chat, stream=canary.stream, max_tokens=canary.max_tokens,
                           ignore_eos=canary.ignore_eos)
    figures = {"chat": canary.chat, "stream": canary.stream, "sha256": done.sha256, "text": done.text,
               "completion_tokens": done.completion_tokens, "finish_reason": done.finish_reason,
               "ttft_ms": None if done.ttft is None else round(done.ttft * 1000, 2), "e2el_ms": round(done.e2e * 1000, 2)}
    name = f"canary:{canary.name}"
    if not done.ok:
        return CheckResult(name, False, done.error or "failed", figures), done
    problems = []
    if not done.text.strip():
        problems.append("empty answer")
    if canary.expect is not None and done.text.strip() != canary.expect:
        problems.append(f"answer {done.text.strip()[:60]!r} is not {canary.expect!r}")
    if canary.expect_regex is not None and not re.search(canary.expect_regex, done.text):
        problems.append(f"answer {done.text.strip()[:60]!r} does not match /{canary.expect_regex}/")
    if canary.expect_sha256 is not None and done.sha256 != canary.expect_sha256:
        problems.append(f"sha256 {done.sha256[:12]}… is not the pinned {canary.expect_sha256[:12]}…")
    if canary.expect_tokens is not None and done.completion_tokens != canary.expect_tokens:
        problems.append(f"{done.completion_tokens} tokens, expected {canary.expect_tokens}")
    detail = "; ".join(problems) or f"{done.completion_tokens} tokens, sha256 {done.sha256[:12]}…"
    return CheckResult(name, not problems, detail, figures), done


def check_determinism(client: Client, canary: Canary) -> CheckResult:
    runs = [client.complete(canary.prompt, chat=canary.chat, max_tokens=canary.max_tokens, ignore_eos=canary.ignore_eos)
            for _ in range(2)]
    failed = [r.error for r in runs if not r.ok]
    if failed:
        return CheckResult("determinism", False, failed[0] or "failed")
    hashes = [r.sha256 for r in runs]
    ok = hashes[0] == hashes[1]
    return CheckResult("determinism", ok, "two temperature-0 answers are identical" if ok else
                       f"two temperature-0 answers differ: {hashes[0][:12]}… vs {hashes[1][:12]}…", {"sha256": hashes})


def in_parallel(fn: Callable[[int], Completion], count: int) -> list[Completion]:
    """Daemon threads: an interrupted run must not wait for streams of a server being stopped."""
    out: list[Completion | None] = [None] * count
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            out[i] = fn(i)
        except BaseException as exc:  # surfaced in the caller's thread below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        while t.is_alive():
            t.join(0.1)
    if errors:
        raise errors[0]
    return [c for c in out if c is not None]


def check_concurrency(client: Client, streams: int, max_tokens: int) -> CheckResult:
    runs = in_parallel(lambda i: client.complete(f"Stream {i}: count with me.", stream=True, max_tokens=max_tokens,
                                               ignore_eos=True), streams)
    bad = [f"#{i}: {r.error or 'empty'}" for i, r in enumerate(runs) if not r.ok or not r.text]
    short = [f"#{i}: {r.completion_tokens} tokens" for i, r in enumerate(runs)
             if r.ok and r.completion_tokens is not None and r.completion_tokens != max_tokens]
    ok = not bad and not short
    wall = max((r.start + r.e2e for r in runs), default=0) - min((r.start for r in runs), default=0)
    return CheckResult("concurrency", ok, f"{streams} parallel streams finished" if ok else "; ".join(bad + short),
                       {"streams": streams, "max_tokens": max_tokens, "wall_s": round(wall, 3)})
