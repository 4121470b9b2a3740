"""Commands of the core: sources, series, apply, check, status."""

from __future__ import annotations

import json
import sys

import click

from .. import apply, worktrees
from ..replay import MALFORMED
from ..errors import ApplyError, ConfigError, PatchError
from ..report import console, junit, patch_table, simple_table
from ..series import describe_series, unused_patch_files
from ..sources import sync
from ..up import up
from . import Context, emit, fail, json_option, main, pass_ctx, run


@main.group()
def sources() -> None:
    """Upstream sources and their mirrors."""


@sources.command("sync")
@click.argument("names", nargs=-1)
@json_option
@pass_ctx
def sources_sync(ctx: Context, names: tuple[str, ...]) -> None:
    """Fetch the pinned commit of each source (all when no NAME) into its cache mirror."""

    def go() -> list[dict]:
        config = ctx.config()
        settings = ctx.settings(config)
        unknown = [n for n in names if n not in config.sources]
        if unknown:
            raise ConfigError(f"unknown source '{unknown[0]}'", where=str(config.path),
                              hint=f"sources: {', '.join(config.sources)}")
        out = []
        for name in names or list(config.sources):
            done = sync(settings, config.sources[name], root=config.root, progress=not ctx.as_json and sys.stderr.isatty())
            out.append({"source": name, "pin": config.sources[name].pin, "commit": done.commit,
                        "mirror": str(done.git_dir), "fetched": done.fetched})
        return out

    rows = run(ctx, go)
    emit(ctx, rows, lambda r: console.print(simple_table(
        "sources", ["source", "commit", "fetched", "mirror"],
        [(x["source"], x["commit"][:12], "yes" if x["fetched"] else "cached", x["mirror"]) for x in r])))


@main.command("series")
@json_option
@pass_ctx
def series_cmd(ctx: Context) -> None:
    """What is defined: series with their patches, stacks with their layers, unused patch files."""

    def go() -> dict:
        config = ctx.config()
        settings = ctx.settings(config)
        out: dict[str, list] = {"series": [], "stacks": []}
        for s in config.series.values():
            out["series"].append({
                "name": s.name, "source": s.source, "directory": s.directory, "strip": s.strip, "fuzz": s.fuzz,
                "patches": describe_series(settings, s),
                "unused_files": unused_patch_files(s) if s.inline is None else [],
            })

        for name in config.stacks:
            st = config.stack(name)
            out["stacks"].append({"name": name, "extends": st.chain[:-1], "series": [s.name for s in st.series],
                                  "sources": [s.name for s in st.sources]})
        return out

    def render(data: dict) -> None:
        console.print(simple_table("series", ["series", "source", "dir", "-p", "patches", "unused files"], [
            (s["name"], s["source"], s["directory"] or ".", s["strip"], len(s["patches"]), ", ".join(s["unused_files"]))
            for s in data["series"]]))
        console.print(simple_table("stacks", ["stack", "extends", "series", "sources"], [
            (s["name"], " > ".join(s["extends"]), ", ".join(s["series"]), ", ".join(s["sources"]))
            for s in data["stacks"]]))

    emit(ctx, run(ctx, go), render)


@main.command("apply")
@click.argument("stack")
@click.option("--allow-fuzz", type=click.IntRange(0, 3), default=0, show_default=True,
              help="Accept patches that apply only with up to N lines of context dropped.")
@click.option("--force", is_flag=True, help="Reset the worktrees; their own commits, changes and untracked files in the way are kept as backups.")
@json_option
@pass_ctx
def apply_cmd(ctx: Context, stack: str, allow_fuzz: int, force: bool) -> None:
    """Materialise STACK as worktrees (work/STACK/SOURCE), one commit per patch."""

    def go() -> apply.ApplyReport:
        config = ctx.config()
        return apply.apply_stack(ctx.settings(config), config, stack, allow_fuzz=allow_fuzz, force=force,
                                  progress=not ctx.as_json and sys.stderr.isatty())

    report = run(ctx, go)

    def render(data: dict) -> None:
        for s in data["sources"]:
            title = f"{data['stack']} / {s['source']}: {s['action']} at {s['head'][:12]} ({s['worktree']})"
            if s["patches"]:
                console.print(patch_table(title, s["patches"]))
            else:
                console.print(title)
            backup = s["backup"]
            for ref in backup["refs"]:
                console.print(f"  replaced by --force, kept: {ref} (in {s['worktree']})")
            if backup["files"]:
                console.print(f"  untracked files in the patches' way, moved to {backup['folder']}: "
                              + ", ".join(backup["files"][:10]) + (" …" if len(backup["files"]) > 10 else ""))

    emit(ctx, report.to_json(), render)
    if report.error is not None:
        if ctx.as_json:
            sys.exit(report.error.exit_code)
        fail(ctx, report.error)


@main.command("check")
@click.argument("stacks", nargs=-1)
@click.option("--at", "at", multiple=True, metavar="[SOURCE=]REF",
              help="Check against REF instead of the pins (a SHA, tag, branch or origin/BRANCH).")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "junit"]), default="table", show_default=True)
@click.option("--allow-fuzz", type=click.IntRange(0, 3), default=0, show_default=True)
@json_option
@pass_ctx
def check_cmd(ctx: Context, stacks: tuple[str, ...], at: tuple[str, ...], fmt: str, allow_fuzz: int) -> None:
    """Verdict for every patch of every stack, without checking anything out."""

    def go():
        config = ctx.config()
        return apply.check_stacks(ctx.settings(config), config, stacks, at=at, allow_fuzz=allow_fuzz,
                                   progress=not ctx.as_json and sys.stderr.isatty())

    reports = run(ctx, go)
    data = [r.to_json() for r in reports]
    if fmt == "json" or ctx.as_json:
        click.echo(json.dumps(data, indent=2))
    elif fmt == "junit":
        click.echo(junit("stackbuild check", (
            (f"{r['stack']}.{s['source']}", p["patch"], p["outcome"], p["ok"],
             "; ".join(f"{f['path']} hunk #{f['hunk']} ({f['reason']})" for f in p["failed"]) or p["detail"])
            for r in data for s in r["sources"] for p in s["patches"])), nl=False)
    else:
        for r in data:
            for s in r["sources"]:
                where = f"at {s['at']} ({s['base'][:12]})" if s["at"] else f"at pin {s['base'][:12]}"
                console.print(patch_table(f"{r['stack']} / {s['source']} {where}", s["patches"]))
                if s["overlaps"]:
                    console.print(simple_table("overlaps", ["file", "lines", "earlier patch", "later patch", "kind"], [
                        (o["path"], f"{o['first_line']}-{o['last_line']}", o["earlier"], o["later"], o["kind"])
                        for o in s["overlaps"]]))
                for d in s["duplicates"]:
                    click.echo(d["text"])
    if not all(r.ok for r in reports):
        bad = next(p for r in data for s in r["sources"] for p in s["patches"] if not p["ok"])
        # A patch no git would take (malformed) is a patch error, as `apply` reports it.
        kind = PatchError if any(p["outcome"] == MALFORMED for r in data for s in r["sources"]
                                 for p in s["patches"]) else ApplyError
        err = kind(f"{sum(1 for r in data for s in r['sources'] for p in s['patches'] if not p['ok'])} patch(es) "
                         f"do not apply; first: {bad['patch']} ({bad['outcome']})", where="check",
                         hint="see the table; refresh them with stackbuild rebase, or fix the patch files")
        click.echo(f"stackbuild: {err.kind} error: {err}", err=True)
        sys.exit(err.exit_code)


@main.command("status")
@click.argument("stacks", nargs=-1)
@json_option
@pass_ctx
def status_cmd(ctx: Context, stacks: tuple[str, ...]) -> None:
    """What is applied where, and what is stale."""

    def go() -> list[dict]:
        config = ctx.config()
        return worktrees.status(ctx.settings(config), config, stacks)

    def render(rows: list[dict]) -> None:
        def state(r: dict) -> str:
            if not r["applied"]:
                return "not applied"
            flags = [f for f, on in (("stale", r["stale"]), ("incomplete", not r["complete"]),
                                     ("dirty", r["dirty"]), ("moved", r["moved"])) if on]
            return ", ".join(flags) or "up to date"

        console.print(simple_table("status", ["stack", "source", "state", "head", "changed patches", "worktree"], [
            (r["stack"], r["source"], state(r), r.get("head", "")[:12], ", ".join(r.get("changed", [])), r["worktree"])
            for r in rows]))

    emit(ctx, run(ctx, go), render)


@main.command("up")
@click.argument("stack", required=False)
@click.option("--profile", help="Smoke profile (default: the stack's).")
@click.option("--engine", "engines", multiple=True, metavar="URL", help="Docker Engine(s) to build on.")
@click.option("--force", is_flag=True, help="Rebuild and re-smoke even when results exist.")
@click.option("--no-smoke", is_flag=True, help="Stop after the build.")
@json_option
@pass_ctx
def up_cmd(ctx: Context, stack: str | None, profile: str | None, engines: tuple[str, ...], force: bool,
           no_smoke: bool) -> None:
    """The whole job for STACK: sync, apply, build, smoke; each skipped when its result exists.

    Without STACK, the stack file's only stack (or the one named 'default') is used.
    """


    def go():
        config = ctx.config()
        name = stack or _default_stack(config)
        say = (lambda m: None) if ctx.as_json else (lambda m: click.echo(f"  {m}", err=True))
        return up(ctx.settings(config), config, name, profile=profile, force=force, engine_urls=engines,
                  smoke=not no_smoke, say=say,
                  on_step=(lambda s: None) if ctx.as_json else
                  (lambda s: click.echo(s.line(), err=True)))

    report = run(ctx, go)

    def render(data: dict) -> None:
        console.print(simple_table(f"stackbuild up {data['stack']}", ["step", "status", "time", "result", "where"], [
            (s["name"], s["status"], f"{s['seconds']:.1f} s" if s["status"] != "not run" else "", s["detail"], s["where"])
            for s in data["steps"]]))

    emit(ctx, report.to_json(), render)
    if report.error is not None:
        if ctx.as_json:
            sys.exit(report.error.exit_code)
        fail(ctx, report.error)


def _default_stack(config) -> str:
    if len(config.stacks) == 1:
        return next(iter(config.stacks))
    if "default" in config.stacks:
        return "default"
    raise ConfigError("more than one stack and none named 'default'", where=str(config.path),
                      hint=f"name one: {', '.join(config.stacks)}")
