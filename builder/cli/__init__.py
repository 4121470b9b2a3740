"""The `stackbuild` command. Thin: parse, call one library function, render.

Each concept's commands live in a module of this package and attach themselves to `main`.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any, Callable, NoReturn

import click

from .. import __version__
from ..config import Config, load_config
from ..errors import Interrupted, StackbuildError, os_error
from ..settings import Settings, load_settings


@dataclass
class Context:
    stack_file: str | None
    work_dir: str | None
    as_json: bool = False

    def config(self) -> Config:
        return load_config(self.stack_file)

    def settings(self, config: Config | None = None) -> Settings:
        return load_settings(config, work_dir=self.work_dir)


def json_option(f: Callable) -> Callable:
    """`--json` on every command, also accepted before the command name."""

    def set_json(ctx: click.Context, _param: click.Parameter, value: bool) -> bool:
        if value:
            obj = ctx.find_object(Context)
            assert obj is not None, "the main group makes the Context"
            obj.as_json = True
        return value

    return click.option("--json", "as_json", is_flag=True, expose_value=False, callback=set_json,
                        help="Machine-readable output on stdout.")(f)


def emit(ctx: Context, data: Any, render: Callable[[Any], None] | None = None) -> None:
    if ctx.as_json or render is None:
        click.echo(json.dumps(data, indent=2, sort_keys=False, default=str))
    else:
        render(data)


def run(ctx: Context, fn: Callable[[], Any]) -> Any:
    """Calls into the library and turns its errors into one line and their exit code."""
    try:
        return fn()
    except StackbuildError as exc:
        fail(ctx, exc)
    except KeyboardInterrupt:
        fail(ctx, INTERRUPTED)
    except OSError as exc:
        # Where a library call did not name what it was doing, the path and errno still tell what to do.
        fail(ctx, os_error(exc, exc.filename, "read or write a file"))


def fail(ctx: Context, exc: StackbuildError) -> None:
    if ctx.as_json:
        click.echo(json.dumps(exc.to_json(), indent=2))
    click.echo(f"stackbuild: {exc.kind} error: {exc}", err=True)
    sys.exit(exc.exit_code)


INTERRUPTED = Interrupted("interrupted", hint="run the command again: finished steps are kept, an unfinished one left nothing behind")


class Group(click.Group):
    """Ctrl-C anywhere (parsing, rendering) exits 130 like an interrupt inside a command, not
    with click's "Aborted!" and exit 1."""

    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        # Parsing the command line comes before invoke: a Ctrl-C there reached click's own handler.
        try:
            return super().make_context(*args, **kwargs)
        except KeyboardInterrupt:
            self._interrupted()

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            self._interrupted()
        except OSError as exc:  # outside `run`: rendering, writing output files
            error = os_error(exc, exc.filename, "read or write a file")
            click.echo(f"stackbuild: {error.kind} error: {error}", err=True)
            sys.exit(error.exit_code)

    @staticmethod
    def _interrupted() -> NoReturn:
        click.echo(f"stackbuild: {INTERRUPTED.kind} error: {INTERRUPTED}", err=True)
        sys.exit(INTERRUPTED.exit_code)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--stack", "stack_file", envvar="STACKBUILD_STACK", metavar="PATH",
              help="stack.toml to use (default: ./stack.toml or the nearest parent's).")
@click.option("--work-dir", envvar="STACKBUILD_WORK", metavar="DIR", help="Where worktrees go (default: work/).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout.")
@click.version_option(__version__, prog_name="stackbuild")
@click.pass_context
def main(click_ctx: click.Context, stack_file: str | None, work_dir: str | None, as_json: bool) -> None:
    """Patch stacks over pinned upstream sources: apply, check, rebase, build, smoke."""
    click_ctx.obj = Context(stack_file=stack_file, work_dir=work_dir, as_json=as_json)


pass_ctx = click.make_pass_decorator(Context)


from . import build, core, hostsetup, rebase, smoke  # noqa: E402,F401  (commands register themselves on `main`)
