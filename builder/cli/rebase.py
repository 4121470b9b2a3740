"""`stackbuild rebase`, `export` and `bisect`: parse, call one library function, render."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .. import bisection as bisect_mod
from .. import export as export_mod
from .. import horizon as horizon_mod
from .. import rebase as rb
from .. import rebase_report
from .. import rebase_group as group_mod
from .. import vendor as vendor_mod
from ..errors import ConfigError, RebaseError
from ..fsutil import atomic_write
from ..report import console, patch_table, simple_table
from . import Context, emit, json_option, main, pass_ctx, run


@main.command("rebase")
@click.argument("stack", required=False)
@click.option("--source", metavar="NAME", help="Source whose patches move (needed when the stack patches several).")
@click.option("--onto", metavar="[SOURCE=]REF", multiple=True,
              help="Upstream SHA, tag or branch to move to (fetched if needed); SOURCE=REF, repeated, moves "
                   "several sources in one rebase.")
@click.option("--drop-merged", is_flag=True, help="Drop patches upstream already contains instead of stopping.")
@click.option("--decode", is_flag=True, help="Export encoded (.gz/.b64) patches back as plain .patch files.")
@click.option("--refresh-context", is_flag=True, help="Rewrite patches even when only their line numbers moved.")
@click.option("--continue", "action", flag_value="continue", help="Resume after resolving and staging a conflict.")
@click.option("--skip", "action", flag_value="skip", help="Drop the patch the rebase stopped at and go on.")
@click.option("--abort", "action", flag_value="abort", help="Put pins, patch files and worktree back as they were.")
@click.option("--markdown", "markdown_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the Markdown summary (for a pull request) to FILE.")
@json_option
@pass_ctx
def rebase_cmd(ctx: Context, stack: str | None, source: str | None, onto: tuple[str, ...], drop_merged: bool,
               decode: bool, refresh_context: bool, action: str | None, markdown_file: Path | None) -> None:
    """Replay a source's patches onto a new upstream REF, three-way, one word per patch."""

    def call() -> rb.Report | group_mod.GroupReport:
        cfg = _config_if_any(ctx) if action and not stack else ctx.config()
        settings = ctx.settings(cfg)
        return group_mod.rebase(settings, cfg, stack, source, onto=onto, action=action, drop_merged=drop_merged,
                                decode=decode, refresh_context=refresh_context)

    report = run(ctx, call)
    if markdown_file:
        text = group_mod.markdown(report) if isinstance(report, group_mod.GroupReport) else rebase_report.markdown(report)
        atomic_write(markdown_file, text.encode())
    if isinstance(report, group_mod.GroupReport):
        emit(ctx, report.to_json(), lambda _: _render_group(report))
    else:
        emit(ctx, report.to_json(), lambda _: _render_rebase(report))
    if report.status == "stopped":
        sys.exit(RebaseError.exit_code)


def _render_group(report: group_mod.GroupReport) -> None:
    for r in report.reports:
        if r.status in ("pending", "replayed", "aborted"):
            click.echo(f"{r.source}: {r.status}" + (f" ({len(r.results)} patches)" if r.results else ""))
        else:
            _render_rebase(r)
    if report.status == "finished":
        click.echo(f"stack {report.stack}: {len(report.reports)} sources rebased and exported")


def _config_if_any(ctx: Context):
    """`--continue` works from anywhere: the project's stack.toml only sets where work/ is."""
    try:
        return ctx.config()
    except ConfigError:  # no stack.toml here is fine: the rebase state names every path it needs
        return None


def _render_rebase(report: rb.Report) -> None:
    rows = []
    for r in report.results:
        detail = [f"+{r.insertions}/-{r.deletions}"] + (["dropped"] if r.dropped else [])
        if r.breaking:
            detail.append(f"broken by {r.breaking.sha[:12]} {r.breaking.subject}")
        detail += [f"upstream renamed {c.path} -> {c.new_path}" if c.new_path else f"upstream deleted {c.path}"
                   for c in r.path_changes]
        if r.merged_files:
            detail.append(f"3-way took {', '.join(r.merged_files)}")
        rows.append({"patch": f"{r.series}/{r.name}", "outcome": r.outcome, "files": r.files, "detail": ", ".join(detail)})
    console.print(patch_table(f"rebase {report.source} ({report.stack}): {report.old_pin[:12]} -> {report.onto[:12]}",
                              rows))
    s = report.stopped_at
    if report.status == "stopped" and s:
        if s.outcome == "upstream":
            click.echo(f"stopped: {s.series}/{s.name} is already upstream; `stackbuild rebase --skip` drops it "
                       "(or rerun with --drop-merged)")
            return
        click.echo(f"stopped at {s.series}/{s.name}: conflicts in {', '.join(s.conflicted_files)}")
        subjects = {u.sha: u for u in s.upstream_commits}
        for fc in s.commits_by_file:
            click.echo(f"  {fc.path}:")
            for sha in fc.commits:
                u = subjects.get(sha)
                click.echo(f"    upstream {sha[:12]} " + (f"{u.date[:10]} {u.author}: {u.subject}" if u else ""))
        click.echo("resolve, `git add` the files, then `stackbuild rebase --continue` (or --skip / --abort)")
    elif report.status == "finished" and report.export:
        changed = [c for c in report.export["patches"] if c["action"] not in ("unchanged", "kept")]
        click.echo(f"exported: {len(changed)} patch files changed; pin now {report.onto}")
    else:
        click.echo(report.status)


@main.command("export")
@click.argument("stack")
@click.option("--source", metavar="NAME", help="Only this source's series.")
@click.option("--check", is_flag=True, help="Write nothing; exit non-zero if any file is not the canonical export.")
@click.option("--decode", is_flag=True, help="Write encoded (.gz/.b64) patches as plain .patch files.")
@click.option("--refresh-context", is_flag=True, help="Rewrite patches whose line numbers or blob ids moved.")
@click.option("--prune", is_flag=True, help="Drop series entries that have no commit in the worktree.")
@json_option
@pass_ctx
def export_cmd(ctx: Context, stack: str, source: str | None, check: bool, decode: bool, refresh_context: bool,
               prune: bool) -> None:
    """Rewrite the patch files from the worktree's commits, in canonical form."""

    def call():
        cfg = ctx.config()
        return export_mod.export_stack(ctx.settings(cfg), cfg, stack, source, check=check, decode=decode,
                               refresh_context=refresh_context, prune=prune)

    results = run(ctx, call)
    emit(ctx, [r.to_json() for r in results], lambda _: _render_export(results, check))


def _render_export(results, check: bool) -> None:
    for r in results:
        for c in r.changes:
            if c.action not in ("unchanged", "kept"):
                click.echo(f"  {c.action:<9} {c.path}")
        moved = sum(c.action == "kept" for c in r.changes)
        click.echo(f"{r.source}: {'canonical' if check else 'exported'}" + (f" ({moved} moved only, kept)" if moved else ""))


@main.command("bisect")
@click.argument("stack")
@click.option("--source", metavar="NAME", help="Source whose patches are probed.")
@click.option("--onto", required=True, metavar="REF", help="Upstream SHA, tag or branch to probe up to.")
@json_option
@pass_ctx
def bisect_cmd(ctx: Context, stack: str, source: str | None, onto: str) -> None:
    """Name the upstream commit that breaks each patch, and how far the pin can move today."""

    def call():
        cfg = ctx.config()
        return bisect_mod.bisect_stack(ctx.settings(cfg), cfg, stack, source, onto)

    report = run(ctx, call)
    emit(ctx, report.to_json(), lambda _: _render_bisect(report))


def _render_bisect(r: bisect_mod.BisectReport) -> None:
    rows = [(f"{b.series}/{b.name}", b.commit.sha[:12] if b.commit else "", b.commit.date[:10] if b.commit else "",
             b.commit.subject if b.commit else b.note) for b in r.patches]
    console.print(simple_table(f"{r.source}: {r.commits} commits {r.old_pin[:12]}..{r.onto[:12]}, {r.probes} probes",
                               ["patch", "stops applying at", "date", "subject"], rows))
    if r.newest_clean:
        click.echo(f"whole series applies as is up to {r.newest_clean.sha[:12]} {r.newest_clean.date[:10]} "
                   f"{r.newest_clean.subject}")
    else:
        click.echo("the series does not apply as is even at the current pin")


@main.command("vendor")
@click.argument("series", nargs=-1)
@click.option("--stack", "stack_name", metavar="STACK",
              help="Vendor every series of STACK that has remote patches (here a stack's name; before the "
                   "command, --stack names the stack file).")
@click.option("--keep-encoding", is_flag=True, help="Keep .gz/.b64 patches encoded instead of writing plain .patch.")
@json_option
@pass_ctx
def vendor_cmd(ctx: Context, series: tuple[str, ...], stack_name: str | None, keep_encoding: bool) -> None:
    """Copy remote patches (URL + sha256) into the patch folder and list them in a series file."""

    def call():
        cfg = ctx.config()
        return vendor_mod.vendor(ctx.settings(cfg), cfg, series, stack=stack_name, keep_encoding=keep_encoding)

    result = run(ctx, call)
    emit(ctx, result.to_json(), lambda _: _render_vendor(result))


def _render_vendor(result: vendor_mod.VendorResult) -> None:
    for p in result.patches:
        click.echo(f"  {p.action:<9} {p.path}  (from {p.url})")
    for name in result.already_local:
        click.echo(f"{name}: no remote patches, nothing to vendor")
    if result.series:
        click.echo(f"vendored {', '.join(result.series)}" + ("; stack.toml now reads the series files"
                                                            if result.stack_file_changed else ""))
    elif not result.patches and not result.already_local:
        click.echo("nothing to vendor: every series named already reads local patch files")


@main.command("horizon")
@click.argument("stack")
@click.option("--source", metavar="NAME", help="Source whose patches are forecast (needed when the stack patches several).")
@click.option("--to", "to", metavar="REF", help="Upstream SHA, tag or branch to look up to (default: its HEAD).")
@click.option("--plot", "plot_file", type=click.Path(dir_okay=False, path_type=Path), metavar="PNG",
              help="Also draw each patch over upstream commit dates: green while it applies, red after it breaks.")
@json_option
@pass_ctx
def horizon_cmd(ctx: Context, stack: str, source: str | None, to: str | None, plot_file: Path | None) -> None:
    """How far each patch, and the stack's pin, can follow upstream without touching a patch."""

    def call():
        cfg = ctx.config()
        report = horizon_mod.horizon_stack(ctx.settings(cfg), cfg, stack, source, to)
        if plot_file:
            horizon_mod.plot(report, plot_file)
        return report

    report = run(ctx, call)
    data = report.to_json() | ({"plot": str(plot_file)} if plot_file else {})
    emit(ctx, data, lambda _: _render_horizon(report, plot_file))


def _render_horizon(h: horizon_mod.Horizon, plot_file: Path | None) -> None:
    def short(u) -> str:
        return f"{u.sha[:12]} {u.date[:10]}" if u else ""

    rows = [(f"{p.series}/{p.name}", short(p.applies_until), p.mode if p.applies_until else "",
             (short(p.breaking) + f" {p.breaking.subject}" + (f" (PR #{p.breaking.pr})" if p.breaking.pr and
                                                               f"#{p.breaking.pr}" not in p.breaking.subject else ""))
             if p.breaking else "", p.at_to, p.note) for p in h.patches]
    console.print(simple_table(
        f"{h.source} ({h.stack}): {h.commits} commits {h.pin.sha[:12]}..{h.to.sha[:12]}, {h.probes} probes",
        ["patch", "applies up to", "as", "breaks at", f"at {h.to.sha[:12]}", "note"], rows))
    if h.stack_until is None:
        click.echo("the stack does not apply even at its pin")
    elif h.stack_until.sha == h.to.sha:
        click.echo(f"the whole stack applies up to {h.to.sha[:12]}: the pin can move all the way")
    else:
        click.echo(f"the pin can move to {h.stack_until.sha[:12]} {h.stack_until.date[:10]} "
                   f"({h.stack_until.subject}) without touching a patch")
    if plot_file:
        click.echo(f"plot: {plot_file}")
