"""`stackbuild smoke`, `serve` and `results`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from .. import results as results_mod
from ..smoke import checks as smoke_checks
from ..smoke import config as smoke_config
from ..smoke import run as smoke_run
from ..errors import SmokeError
from ..report import console, simple_table
from . import Context, emit, fail, json_option, main, pass_ctx, run


def _say(message: str) -> None:
    click.echo(f"stackbuild: {message}", err=True)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def _render_run(record: dict) -> None:
    title = f"smoke {record['stack']} ({record['profile']['name']}): {record['verdict'].upper()}"
    console.print(simple_table(title, ("check", "ok", "detail"),
                               ((c["name"], "pass" if c["ok"] else "[red]FAIL[/red]", c["detail"]) for c in record["checks"])))
    metrics = record.get("metrics") or {}
    spread = record.get("spread") or {}
    if len(metrics) > 1:
        names = [n for n in ("completed", "duration_s", *smoke_config.METRICS) if n in metrics]
        rounds = len(record.get("rounds") or []) or 1
        console.print(simple_table(f"metrics (vllm bench serve names): median of {rounds} round(s)",
                                   ("metric", "median", "min", "max", "spread %"),
                                   ((n, _fmt(metrics[n]), *(_fmt((spread.get(n) or {}).get(k)) for k in ("min", "max", "pct")))
                                    for n in names)))
    timings = record.get("timings") or {}
    if timings:
        console.print("timings: " + ", ".join(f"{k} {v}" for k, v in timings.items()))
    console.print(f"results: {record.get('results_file', '')}  server log: {record['server']['log']}")


@main.command("smoke")
@click.argument("stack")
@click.option("--profile", metavar="NAME", help="Server profile from [smoke.profiles] (default: [smoke] profile).")
@click.option("--baseline", type=click.Path(dir_okay=False, path_type=Path),
              help="A results file to compare against (overrides [smoke] baseline).")
@click.option("--host", help="Address to bind (default: [smoke] host, 127.0.0.1).")
@click.option("--port", type=click.IntRange(0, 65535), help="Port (default: [smoke] port; 0 = a free one).")
@click.option("--prepare-only", is_flag=True,
              help="Only create the cached serving environment and model (e.g. to warm a CI cache), then exit.")
@json_option
@pass_ctx
def smoke_cmd(ctx: Context, stack: str, profile: str | None, baseline: Path | None, host: str | None,
              port: int | None, prepare_only: bool) -> None:
    """Serve STACK's wheels, check and measure the server, record the results, stop it."""
    def go() -> dict:
        cfg = ctx.config()
        if prepare_only:
            prep = smoke_run.prepare_stack(ctx.settings(cfg), cfg, stack, profile=profile, say=_say)
            return {"stack": stack, "runtime": prep.sc.runtime, "environment": prep.env_path or prep.image,
                    "python": prep.python, "model": prep.model_path, "version": prep.expected_version}
        try:
            return smoke_run.run_smoke(ctx.settings(cfg), cfg, stack, profile=profile, baseline=baseline,
                                       host=host, port=port, say=_say)
        except smoke_checks.ServerFailed as exc:
            if exc.log_tail:
                click.echo(f"--- last {smoke_config.LOG_TAIL} lines of the server log ---\n{exc.log_tail}\n---", err=True)
            raise
        except smoke_run.SmokeFailed as exc:
            if not ctx.as_json:
                _render_run({**exc.record, "results_file": exc.where})
            raise

    record = run(ctx, go)
    emit(ctx, record, _render_run if not prepare_only else lambda d: click.echo(
        "\n".join(f"{k}: {v}" for k, v in d.items())))


@main.command("serve")
@click.argument("stack")
@click.option("--profile", metavar="NAME", help="Server profile from [smoke.profiles].")
@click.option("--host", help="Address to bind (default: [smoke] host, 127.0.0.1).")
@click.option("--port", type=click.IntRange(0, 65535), help="Port (default: [smoke] port; 0 = a free one).")
@json_option
@pass_ctx
def serve_cmd(ctx: Context, stack: str, profile: str | None, host: str | None, port: int | None) -> None:
    """Run STACK's server in the foreground (same environment and profile as smoke) until Ctrl-C."""
    def go() -> int:
        cfg = ctx.config()
        return smoke_run.serve(ctx.settings(cfg), cfg, stack, profile=profile, host=host, port=port, say=_say)

    code = run(ctx, go)
    if code:
        fail(ctx, SmokeError(f"the server exited with code {code}", where=stack, hint="read its output above"))
    emit(ctx, {"stack": stack, "exit_code": code}, lambda _d: None)


@main.command("results")
@click.argument("stack")
@click.option("--plot", "plot", type=click.Path(dir_okay=False, path_type=Path), metavar="PNG",
              help="Also draw throughput over time into this PNG.")
@click.option("--last", type=click.IntRange(1), help="Only the last N runs.")
@json_option
@pass_ctx
def results_cmd(ctx: Context, stack: str, plot: Path | None, last: int | None) -> None:
    """List STACK's past smoke runs side by side (and plot throughput over time)."""
    def go() -> dict:
        cfg = ctx.config()
        cfg.stack(stack)
        runs = results_mod.list_results(ctx.settings(cfg).results_dir, stack)
        if last:
            runs = runs[-last:]
        out = {"stack": stack, "runs": results_mod.summary_rows(runs)}
        if plot:
            out["plot"] = str(results_mod.plot_throughput(runs, plot, stack))
        return out

    def render(data: dict) -> None:
        cols = ("started", "profile", "verdict", "digest", "rounds", *results_mod.COLUMNS)
        console.print(simple_table(f"smoke runs of {stack}", [results_mod.LABELS.get(c, c) for c in cols],
                                      ([_fmt(row[c]) for c in cols] for row in data["runs"])))
        if data.get("plot"):
            click.echo(f"plot: {data['plot']}")

    emit(ctx, run(ctx, go), render)
