"""`stackbuild setup`: Docker Engine and base image on this host."""

from __future__ import annotations

from pathlib import Path

import click

from . import Context, emit, json_option, main, pass_ctx, run


@main.command("setup")
@click.option("--image", envvar="STACKBUILD_BASE_IMAGE", default="stackbuild/base:bookworm", show_default=True,
              help="Base image to make when the engine lacks it (env STACKBUILD_BASE_IMAGE).")
@click.option("--suite", default="bookworm", show_default=True, help="Debian (or Ubuntu) suite the image holds.")
@click.option("--dockerd-log", "log", envvar="STACKBUILD_DOCKERD_LOG", default="/var/log/stackbuild-dockerd.log",
              show_default=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Where a dockerd started without systemd writes its log.")
@json_option
@pass_ctx
def setup_cmd(ctx: Context, image: str, suite: str, log: Path) -> None:
    """Make this host able to build: a Docker Engine that answers (Debian's docker.io, started,
    when there is none) and the base image (debootstrap from apt's own mirror, imported; no
    registry needed). Each step is skipped when its result is there; as root on Debian/Ubuntu."""
    from ..hostsetup import Host, setup

    say = (lambda _m: None) if ctx.as_json else (lambda m: click.echo(f"setup: {m}", err=True))
    report = run(ctx, lambda: setup(Host.this(), image=image, suite=suite, log=log, say=say))
    emit(ctx, report.to_json(), _render)


def _render(data: dict) -> None:
    click.echo(f"ready: Docker Engine answers, base image {data['image']} is on it")
    for r in data["running"]:
        where = f", log {r['log']}" if r["log"] else ""
        pid = f" (pid {r['pid']})" if r["pid"] else ""
        click.echo(f"left running: {r['what']}{pid}{where}; stop it with: {r['stop']}")
