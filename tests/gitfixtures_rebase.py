"""Repositories the rebase/export/bisect tests build themselves: an upstream with a history we
write line by line, a bare mirror of it, and a project with stack.toml and a patch series."""

from __future__ import annotations

import os
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from builder import export as ex
from builder import patches as pt
from builder.rebase import Item, Plan
from builder.export import SeriesSpec

def run(*args: str, cwd: Path | None = None, input: bytes | None = None, env: dict | None = None) -> str:
    proc = subprocess.run(["git", *args], cwd=cwd, input=input, capture_output=True, env={**os.environ, **(env or {})})
    if proc.returncode:
        raise AssertionError(f"git {' '.join(args)}: {proc.stderr.decode()}")
    return proc.stdout.decode().strip()


def lines(n: int, prefix: str = "line") -> str:
    return "".join(f"{prefix} {i}\n" for i in range(1, n + 1))


class Upstream:
    """A non-bare repository on `main`; every commit gets its own, increasing date."""

    def __init__(self, path: Path):
        self.path = path
        path.mkdir(parents=True)
        run("init", "-q", "-b", "main", cwd=path)
        self.tick = 0

    def commit(self, message: str, files: dict[str, str | None] | None = None, renames: dict[str, str] | None = None,
               author: str = "Up Stream") -> str:
        for old, new in (renames or {}).items():
            (self.path / new).parent.mkdir(parents=True, exist_ok=True)
            run("mv", old, new, cwd=self.path)
        for name, text in (files or {}).items():
            p = self.path / name
            if text is None:
                run("rm", "-q", name, cwd=self.path)
                continue
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(text)
            run("add", name, cwd=self.path)
        self.tick += 1
        date = f"2026-01-01T00:{self.tick // 60:02d}:{self.tick % 60:02d}Z"
        run("commit", "-q", "--allow-empty", "-m", message, cwd=self.path,
            env={"GIT_AUTHOR_DATE": date, "GIT_COMMITTER_DATE": date, "GIT_AUTHOR_NAME": author})
        return self.head()

    def head(self) -> str:
        return run("rev-parse", "HEAD", cwd=self.path)

    def read(self, commit: str, name: str) -> str:
        return run("show", f"{commit}:{name}", cwd=self.path) + "\n"

    def make_patch(self, base: str, subject: str, files: dict[str, str | None], author: str = "Pat Cher") -> bytes:
        """A mail patch of `files` changed on top of `base`, made in a scratch index (main untouched)."""
        with tempfile.TemporaryDirectory() as tmp:
            env = {"GIT_INDEX_FILE": os.path.join(tmp, "index")}
            run("read-tree", base, cwd=self.path, env=env)
            for name, text in files.items():
                if text is None:
                    run("rm", "-q", "--cached", name, cwd=self.path, env=env)
                    continue
                blob = run("hash-object", "-w", "--stdin", cwd=self.path, input=text.encode())
                run("update-index", "--add", "--cacheinfo", f"100644,{blob},{name}", cwd=self.path, env=env)
            tree = run("write-tree", cwd=self.path, env=env)
        commit = run("commit-tree", tree, "-p", base, "-m", subject, cwd=self.path,
                     env={"GIT_AUTHOR_NAME": author, "GIT_AUTHOR_EMAIL": "pat@example.invalid"})
        return ex.canonical_patch(self.path / ".git", commit)


def replay_old(git_dir: Path, pin: str, patches: list[tuple[str, str, bytes]]) -> tuple[Item, ...]:
    """The commits of the series on its old pin, shaped like the apply engine makes them: the mail's
    author, date and message plus the `Stackbuild-Patch:` trailer; fixed committer."""
    items = []
    head = pin
    with tempfile.TemporaryDirectory() as tmp:
        env = {"GIT_INDEX_FILE": os.path.join(tmp, "index")}
        run(f"--git-dir={git_dir}", "read-tree", pin, env=env)
        for series, name, data in patches:
            msg_file, patch_file = Path(tmp, "msg"), Path(tmp, "patch")
            info = subprocess.run(["git", "mailinfo", str(msg_file), str(patch_file)], input=data, capture_output=True,
                                  check=True).stdout.decode()
            fields = dict(line.split(": ", 1) for line in info.splitlines() if ": " in line)
            run(f"--git-dir={git_dir}", "apply", "--cached", str(patch_file), env=env)
            tree = run(f"--git-dir={git_dir}", "write-tree", env=env)
            body = msg_file.read_text().strip()
            message = fields["Subject"] + ("\n\n" + body if body else "") + f"\n\nStackbuild-Patch: {series}/{name}\n"
            head = run(f"--git-dir={git_dir}", "commit-tree", tree, "-p", head, input=message.encode(), env={
                "GIT_AUTHOR_NAME": fields["Author"], "GIT_AUTHOR_EMAIL": fields["Email"],
                "GIT_AUTHOR_DATE": fields["Date"], "GIT_COMMITTER_NAME": "stackbuild",
                "GIT_COMMITTER_EMAIL": "stackbuild@invalid", "GIT_COMMITTER_DATE": "2000-01-01T00:00:00Z"})
            items.append(Item(series, name, head))
    return tuple(items)


STACK_TOML = """\
# The lab's stack. Comments here must survive a pin move.
[sources.vllm]
url = "{url}"
commit = "{pin}"  # pinned by hand, see the wiki

# our series
[series.xpu]
source = "vllm"

[stacks.lab]
series = ["xpu"]  # only one for now
"""


@dataclass
class Project:
    root: Path
    upstream: Upstream
    mirror: Path
    pin: str
    series: str = "xpu"
    entries: list[tuple[str, bytes]] = field(default_factory=list)

    @property
    def stack_file(self) -> Path:
        return self.root / "stack.toml"

    @property
    def patch_dir(self) -> Path:
        return self.root / "patches" / self.series

    def write(self) -> None:
        self.stack_file.write_text(STACK_TOML.format(url=self.upstream.path, pin=self.pin))
        self.patch_dir.mkdir(parents=True, exist_ok=True)
        for name, data in self.entries:
            (self.patch_dir / name).write_bytes(pt.encode(data, pt.encoding_of(name)))
        (self.patch_dir / "series").write_text("# xpu patches, in order\n" + "".join(f"{n}\n" for n, _ in self.entries))

    def refresh_mirror(self) -> None:
        run("fetch", "-q", str(self.upstream.path), "+refs/heads/*:refs/heads/*", cwd=self.mirror)

    def current(self) -> dict[tuple[str, str], bytes]:
        names = ex.series_entries((self.patch_dir / "series").read_text())
        return {(self.series, n): pt.decode((self.patch_dir / n).read_bytes(), pt.encoding_of(n), n) for n in names}

    def plan(self, onto: str, work: Path) -> Plan:
        current = self.current()
        items = replay_old(self.mirror, self.pin, [(s, n, d) for (s, n), d in current.items()])
        return Plan(
            stack="lab", source="vllm", git_dir=self.mirror, worktree=work / "lab" / "vllm", branch="stackbuild/lab",
            old_pin=self.pin, onto=onto, items=items, root=self.root, stack_file=self.stack_file,
            series=(SeriesSpec(self.series, self.patch_dir),), current=current, state_dir=work / "lab" / ".rebase",
        )

    def snapshot(self) -> dict[str, bytes]:
        return {str(p.relative_to(self.root)): p.read_bytes() for p in sorted(self.root.rglob("*")) if p.is_file()}


def new_project(tmp: Path) -> Project:
    up = Upstream(tmp / "upstream")
    root = tmp / "project"
    root.mkdir()
    mirror = tmp / "mirror.git"
    run("init", "-q", "--bare", str(mirror))
    return Project(root=root, upstream=up, mirror=mirror, pin="")
