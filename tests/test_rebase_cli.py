"""The commands end to end: stack.toml -> mirror -> series -> rebase/export/bisect, through click."""

from __future__ import annotations

import json

from click.testing import CliRunner

from builder.cli import main
from gitfixtures_rebase import lines, new_project, run


def project(tmp_path):
    p = new_project(tmp_path)
    up = p.upstream
    base = {n: lines(30, n) for n in ("a.txt", "e.txt")}
    p.pin = up.commit("base", base)
    p.entries = [
        ("0001-a.patch", up.make_patch(p.pin, "xpu: a", {"a.txt": base["a.txt"].replace("a.txt 20\n", "A20\n")})),
        ("0002-e.patch.gz.b64", up.make_patch(p.pin, "xpu: e", {"e.txt": base["e.txt"].replace("e.txt 5\n", "ours\n")})),
    ]
    up.commit("shift a", {"a.txt": "new\n" + base["a.txt"]})
    up.commit("rework e", {"e.txt": base["e.txt"].replace("e.txt 5\n", "theirs\n")})
    onto = up.commit("tag me", {"z.txt": "z\n"})
    run("tag", "v2", cwd=up.path)
    p.write()
    return p, onto


def cli(p, tmp_path, *args):
    result = CliRunner(mix_stderr=False).invoke(
        main, ["--stack", str(p.stack_file), "--work-dir", str(tmp_path / "work"), "--json", *args])
    return result.exit_code, (json.loads(result.stdout) if result.stdout.strip() else None), result.stderr


def test_rebase_conflict_continue_then_export_check(tmp_path):
    p, onto = project(tmp_path)
    before = p.snapshot()
    code, data, _ = cli(p, tmp_path, "bisect", "lab", "--source", "vllm", "--onto", "v2")
    assert code == 0
    assert [b["name"] for b in data["patches"]] == ["0002-e.patch.gz.b64"]
    assert data["patches"][0]["commit"]["subject"] == "rework e"
    assert data["newest_clean"]["subject"] == "shift a"
    assert p.snapshot() == before and not (tmp_path / "work" / "lab" / "vllm").exists()

    code, data, err = cli(p, tmp_path, "rebase", "lab", "--source", "vllm", "--onto", "v2")
    assert code == 8, err
    assert data["status"] == "stopped"
    assert [r["outcome"] for r in data["results"]] == ["moved", "conflict"]
    assert data["stopped_at"]["conflicted_files"] == ["e.txt"]
    assert data["stopped_at"]["upstream_commits"][0]["subject"] == "rework e"

    wt = tmp_path / "work" / "lab" / "vllm"
    (wt / "e.txt").write_text(lines(30, "e.txt").replace("e.txt 5\n", "both\n"))
    run("add", "e.txt", cwd=wt)
    code, data, err = cli(p, tmp_path, "rebase", "--continue")
    assert code == 0, err
    assert data["status"] == "finished"
    assert f'commit = "{onto}"  # pinned by hand, see the wiki' in p.stack_file.read_text()

    code, data, err = cli(p, tmp_path, "export", "lab", "--check")
    assert code == 0, err
    # apply, from the exported files at the new pin, lands on the very commits the rebase made
    head = run("rev-parse", "HEAD", cwd=wt)
    code, applied, err = cli(p, tmp_path, "apply", "lab")
    assert code == 0, err
    assert run("rev-parse", "HEAD", cwd=wt) == head
    code, data, err = cli(p, tmp_path, "export", "lab")
    assert code == 0 and all(c["action"] in ("unchanged", "kept") for c in data[0]["patches"])

    # A hand edit to a patch file is caught by --check, and export puts the canonical bytes back.
    exported = (p.patch_dir / "0001-a.patch").read_bytes()
    (p.patch_dir / "0001-a.patch").write_bytes(exported.replace(b"Subject: [PATCH] xpu: a", b"Subject: xpu: a"))
    code, data, err = cli(p, tmp_path, "export", "lab", "--check")
    assert code == 9 and "0001-a.patch (rewritten)" in err
    code, _, _ = cli(p, tmp_path, "export", "lab")
    fixed = (p.patch_dir / "0001-a.patch").read_bytes()
    # Rewritten from the commit, so with today's line numbers and blob ids (the kept file had the old ones).
    assert code == 0 and b"Subject: [PATCH] xpu: a\n" in fixed and b"@@ -18,7 +18,7 @@" in fixed
    assert b"@@ -17,7 +17,7 @@" in exported
    assert cli(p, tmp_path, "export", "lab", "--check")[0] == 0


def test_abort_from_the_cli_and_markdown(tmp_path):
    p, _ = project(tmp_path)
    before = p.snapshot()
    md = tmp_path / "summary.md"
    code, data, _ = cli(p, tmp_path, "rebase", "lab", "--onto", "v2", "--markdown", str(md))
    assert code == 8
    assert "| 2 | `xpu/0002-e.patch.gz.b64` | conflict |" in md.read_text()
    code, data, _ = cli(p, tmp_path, "rebase", "--abort")
    assert code == 0 and data["status"] == "aborted"
    assert p.snapshot() == before
    code, data, err = cli(p, tmp_path, "rebase", "--continue")
    assert code == 8 and "no rebase in progress" in err


def test_unknown_ref_is_a_clear_error(tmp_path):
    p, _ = project(tmp_path)
    code, data, err = cli(p, tmp_path, "rebase", "lab", "--onto", "no-such-branch")
    assert code != 0 and "no-such-branch" in err and data["hint"]
    assert not (tmp_path / "work" / "lab" / ".rebase" / "vllm.json").exists()



def test_human_output_names_the_outcomes_and_the_culprit(tmp_path):
    p, _ = project(tmp_path)
    base = ["--stack", str(p.stack_file), "--work-dir", str(tmp_path / "work")]
    runner = CliRunner(mix_stderr=False)
    shown = runner.invoke(main, [*base, "bisect", "lab", "--onto", "v2"], terminal_width=200)
    assert shown.exit_code == 0 and "rework e" in shown.stdout and "up to" in shown.stdout
    stopped = runner.invoke(main, [*base, "rebase", "lab", "--onto", "v2"], terminal_width=200)
    assert stopped.exit_code == 8
    assert "moved" in stopped.stdout and "conflicts in e.txt" in stopped.stdout and "rework e" in stopped.stdout
    aborted = runner.invoke(main, [*base, "rebase", "--abort"])
    assert aborted.exit_code == 0 and "aborted" in aborted.stdout


def test_export_refuses_to_drop_patches_a_worktree_lacks_unless_pruned(tmp_path):
    p, _ = project(tmp_path)
    assert cli(p, tmp_path, "rebase", "lab", "--onto", "v2")[0] == 8
    assert cli(p, tmp_path, "rebase", "--skip")[0] == 0
    wt = tmp_path / "work" / "lab" / "vllm"
    run("reset", "-q", "--hard", "HEAD~1", cwd=wt)  # as if apply had stopped before the last patch
    before = p.snapshot()
    code, data, err = cli(p, tmp_path, "export", "lab")
    assert code == 9 and "0001-a.patch" in err and "--prune" in err
    assert p.snapshot() == before
    code, data, err = cli(p, tmp_path, "export", "lab", "--prune")
    assert code == 0 and [c["action"] for c in data[0]["patches"]] == ["deleted"]
    assert not (p.patch_dir / "0001-a.patch").exists()
    assert (p.patch_dir / "series").read_text() == "# xpu patches, in order\n"
