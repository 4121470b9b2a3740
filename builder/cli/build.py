"""`stackbuild build`, `verify` and `doctor`."""

from __future__ import annotations

from pathlib import Path

import click

from . import Context, emit, json_option, main, pass_ctx, run


def _log(line: str) -> None:
    click.echo(line, err=True)


@main.command("build")
@click.argument("stack")
@click.option("--engine", "engine_urls", multiple=True, metavar="URL",
              help="Docker Engine to build on (repeatable: sources are spread across them).")
@click.option("--force", is_flag=True, help="Rebuild even when the cache holds the wheel.")
@click.option("--plan", "plan_only", is_flag=True, help="Show the build plan (scripts, keys) and build nothing.")
@click.option("--quiet", is_flag=True, help="Do not stream the container logs (they still go to the log files).")
@click.option("--only", "only", multiple=True, metavar="SRC[,SRC…]",
              help="Build only these sources (a partial build: verify and smoke refuse it).")
@click.option("--recipe", metavar="NAME", help="Build with this recipe instead of the stack's (e.g. cpu).")
@json_option
@pass_ctx
def build_cmd(ctx: Context, stack: str, engine_urls: tuple[str, ...], force: bool, plan_only: bool, quiet: bool,
              only: tuple[str, ...], recipe: str | None) -> None:
    """Build the wheels of STACK in containers into dist/STACK/."""
    from ..build import build_stack, plan_stack

    names = [n.strip() for value in only for n in value.split(",") if n.strip()]

    def go():
        cfg = ctx.config()
        settings = ctx.settings(cfg)
        if plan_only:
            return plan_stack(settings, cfg, stack, engine_urls=engine_urls, only=names, recipe=recipe)
        return build_stack(settings, cfg, stack, engine_urls=engine_urls, force=force, only=names, recipe=recipe,
                           log=(lambda _l: None) if quiet or ctx.as_json else _log)

    result = run(ctx, go)
    emit(ctx, result, _render_plan if plan_only else _render_build)


def _render_plan(plan: dict) -> None:
    click.echo(f"stack {plan['stack']}: recipe {plan['recipe']} ({plan['dockerfile']}), base {plan['base']}"
               f" [{plan['base_id'] or 'not on the engine'}]" + variant_line(plan.get("variant")))
    if plan["skipped"]:
        click.echo(f"partial: skipped {', '.join(plan['skipped'])}")
    for step in plan["steps"]:
        resolved = "" if step["key_resolved"] else " (base image unresolved)"
        click.echo(f"\n== {step['source']}  key {step['key'][:16]}{resolved}  image {step['image']}")
        if step["version"]:
            click.echo(f"   version {step['version']['value']}  ({step['version']['origin']})")
        for patch in step["patches"]:
            click.echo(f"   patch {patch['name']}  {patch['sha256'][:12]}")
        for k, v in step["env"].items():
            click.echo(f"   env {k}={v}")
        click.echo("   script:")
        for line in step["script"].splitlines():
            click.echo(f"     {line}")


def variant_line(variant: dict | None) -> str:
    """Says which target a dist was built for and what that target leaves out."""
    if not variant:
        return ""
    skipped = ", ".join(variant.get("skipped") or []) or "nothing"
    return f" (variant {variant['name']}: skipped {skipped})"


def _render_build(manifest: dict) -> None:
    summary = manifest.get("summary", {})
    for wheel in manifest["wheels"]:
        click.echo(f"{wheel['file']}  {wheel['sha256'][:16]}")
    click.echo(f"dist/{manifest['stack']}: built {len(summary.get('built', []))}, "
               f"cached {len(summary.get('cached', []))}, {summary.get('seconds', 0):.2f} s, digest {manifest['digest'][:16]}"
               + variant_line(manifest.get("variant")))
    if manifest.get("partial"):
        skipped = ", ".join(f"{s['source']} ({s['reason']})" for s in manifest["skipped"])
        click.echo(f"partial build: skipped {skipped}; verify and smoke refuse it")


@main.command("verify")
@click.argument("folder", type=click.Path(path_type=Path))
@json_option
@pass_ctx
def verify_cmd(ctx: Context, folder: Path) -> None:
    """Re-hash the wheels of a dist folder against its manifest.json."""
    from ..build import verify

    result = run(ctx, lambda: verify(folder))
    emit(ctx, result, lambda r: click.echo(f"ok: {len(r['wheels'])} wheels of {r['stack']} match {r['folder']}/manifest.json"
                                           + variant_line(r.get("variant"))))


@main.command("doctor")
@click.argument("stacks", nargs=-1)
@click.option("--recipe", metavar="NAME", help="Check for a recipe by name (cpu, xpu) without a stack file.")
@click.option("--engine", "engine_url", metavar="URL", help="Docker Engine to check (default: DOCKER_HOST or the local socket).")
@json_option
@pass_ctx
def doctor_cmd(ctx: Context, stacks: tuple[str, ...], recipe: str | None, engine_url: str | None) -> None:
    """Check this host for building STACKS (default: every stack of the stack file): Docker,
    disk, RAM + swap, and the XPU needs. `stackbuild setup` fixes the first two. A variant stack
    named here whose variant names a precompiled wheel also gets its compiled ops compared with the
    ones its patched source registers."""
    from ..recipes import parse_recipe, stack_recipe
    from ..doctor import run_checks
    from ..opsprobe import check_stack

    def go():
        extra = []
        if recipe:
            recipes, disk = [parse_recipe({"recipe": recipe}, Path.cwd())], ctx.settings().cache_dir
        else:
            cfg = ctx.config()
            names = list(stacks) or sorted(cfg.stacks)
            recipes = [stack_recipe(cfg, cfg.stack(n)) for n in names]
            disk = ctx.settings(cfg).cache_dir
            # A variant naming its precompiled wheel: are its ops the ones the source calls?
            # Only for the stacks asked for by name: it syncs and applies the stack in memory.
            probed = [check_stack(ctx.settings(cfg), cfg, n) for n in stacks]
            extra = [p[0] for p in probed if p is not None]
        return run_checks(recipes, engine_url=engine_url, disk_path=disk, extra=extra)

    report = run(ctx, go)
    emit(ctx, report, _render_doctor)
    if not report["ok"]:
        from ..errors import DoctorError

        raise SystemExit(DoctorError.exit_code)


def _render_doctor(report: dict) -> None:
    for check in report["checks"]:
        mark = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL", "skip": "skip"}[check["status"]]
        click.echo(f"{mark} {check['name']}: {check['detail']}")
