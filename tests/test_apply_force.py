"""What `apply --force` keeps, one cache ref per work dir, and no apply across a stopped rebase."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from click.testing import CliRunner

from builder.cli import main
from conftest import Upstream, sh, write_project
from test_core import LINES, body, stack_toml
from test_rebase_cli import cli as rebase_cli, project as rebase_project


def apply(root: Path, work: Path, *extra: str) -> tuple[int, dict]:
    res = CliRunner(mix_stderr=False).invoke(
        main, ["--stack", str(root / "stack.toml"), "--work-dir", str(work), "--json", "apply", "demo", *extra])
    return res.exit_code, json.loads(res.stdout)


def make(tmp_path: Path, upstream: Upstream, changes: dict[str, str]) -> Path:
    pin = upstream.commit({"a.txt": LINES, "b.txt": "b\n"}, "base")
    return write_project(tmp_path / "proj", stack_toml(upstream.path, pin),
                         {"patches/s1/series": "one.patch\n", "patches/s1/one.patch": upstream.diff(changes)}).parent


def mirror_of(work: Path) -> Path:
    state = json.loads((work / "demo" / "stackbuild-state.json").read_text())
    return Path(state["sources"]["up"]["git_dir"])


def test_two_work_dirs_survive_gc_of_the_cache_mirror(tmp_path: Path, upstream: Upstream):
    root = make(tmp_path, upstream, {"a.txt": body(l5="five")})
    one, two = tmp_path / "one", tmp_path / "two"
    assert apply(root, one)[0] == 0
    assert apply(root, two)[0] == 0
    # A changed patch moves only the second work dir; the first still stands on the old commits.
    (root / "patches/s1/one.patch").write_bytes(upstream.diff({"a.txt": body(l5="FIVE")}))
    assert apply(root, two)[0] == 0
    mirror = mirror_of(one)
    sh("git", f"--git-dir={mirror}", "gc", "-q", "--prune=now")
    for work in (one, two):
        wt = work / "demo" / "up"
        fsck = subprocess.run(["git", "fsck", "--no-dangling"], cwd=wt, capture_output=True, text=True)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
        assert sh("git", "status", "--porcelain", cwd=wt) == ""
    assert (one / "demo/up/a.txt").read_text() == body(l5="five")
    assert (two / "demo/up/a.txt").read_text() == body(l5="FIVE")


def test_refs_of_a_deleted_work_dir_are_pruned(tmp_path: Path, upstream: Upstream):
    root = make(tmp_path, upstream, {"a.txt": body(l5="five")})
    one, two = tmp_path / "one", tmp_path / "two"
    assert apply(root, one)[0] == 0
    assert apply(root, two)[0] == 0
    mirror = mirror_of(one)

    def refs() -> list[str]:
        return sh("git", f"--git-dir={mirror}", "for-each-ref", "--format=%(refname)", "refs/stackbuild/applied/").split()

    assert len(refs()) == 2
    shutil.rmtree(one)
    (root / "patches/s1/one.patch").write_bytes(upstream.diff({"a.txt": body(l5="FIVE")}))
    assert apply(root, two)[0] == 0
    assert len(refs()) == 1


def test_force_keeps_untracked_files_hand_commits_and_changes(tmp_path: Path, upstream: Upstream):
    root = make(tmp_path, upstream, {"a.txt": body(l5="five")})
    work = tmp_path / "work"
    assert apply(root, work)[0] == 0
    wt = work / "demo" / "up"
    (wt / "b.txt").write_text("my hand commit\n")
    sh("git", "commit", "-q", "-am", "mine", cwd=wt)
    mine = sh("git", "rev-parse", "HEAD", cwd=wt).strip()
    (wt / "a.txt").write_text("unsaved\n")
    (root / "patches/s1/one.patch").write_bytes(upstream.diff({"a.txt": body(l5="FIVE"), "new.txt": "from the patch\n"}))
    (wt / "new.txt").write_text("my untracked file\n")
    (wt / "notes.txt").write_text("not in the way\n")

    code, _ = apply(root, work)
    assert code == 6
    code, report = apply(root, work, "--force")
    assert code == 0
    backup = report["sources"][0]["backup"]
    assert (wt / "new.txt").read_text() == "from the patch\n"
    assert (wt / "notes.txt").read_text() == "not in the way\n"
    assert backup["files"] == ["new.txt"]
    assert (Path(backup["folder"]) / "new.txt").read_text() == "my untracked file\n"
    assert Path(backup["folder"]).is_relative_to(work / "demo" / ".backup")
    kept = {ref.rsplit("/", 1)[1]: sh("git", "rev-parse", ref, cwd=wt).strip() for ref in backup["refs"]}
    assert kept["head"] == mine
    assert sh("git", "show", f"{kept['uncommitted']}:a.txt", cwd=wt) == "unsaved\n"


def test_force_names_the_backups_in_its_output(tmp_path: Path, upstream: Upstream):
    root = make(tmp_path, upstream, {"a.txt": body(l5="five")})
    work = tmp_path / "work"
    assert apply(root, work)[0] == 0
    (work / "demo/up/b.txt").write_text("mine\n")
    res = CliRunner(mix_stderr=False).invoke(
        main, ["--stack", str(root / "stack.toml"), "--work-dir", str(work), "apply", "demo", "--force"])
    assert res.exit_code == 0
    assert "refs/stackbuild/backup/" in res.stdout and "uncommitted" in res.stdout


def test_apply_refuses_while_a_rebase_is_stopped(tmp_path: Path):
    p, _ = rebase_project(tmp_path)
    code, data, _ = rebase_cli(p, tmp_path, "rebase", "lab", "--source", "vllm", "--onto", "v2")
    assert code == 8 and data["status"] == "stopped"
    wt = tmp_path / "work" / "lab" / "vllm"
    stopped_head = sh("git", "rev-parse", "HEAD", cwd=wt)
    for extra in ((), ("--force",)):
        code, data, _ = rebase_cli(p, tmp_path, "apply", "lab", *extra)
        assert code == 6
        assert "rebase of 'vllm' is in progress" in data["message"]
        assert "rebase --continue" in data["hint"] and "rebase --abort" in data["hint"]
    assert sh("git", "rev-parse", "HEAD", cwd=wt) == stopped_head
    assert (tmp_path / "work" / "lab" / ".rebase" / "vllm.json").is_file()
