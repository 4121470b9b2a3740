"""The rebase state machine on repositories built here: every outcome, continue/skip/abort."""

from __future__ import annotations

import pytest

from builder import export as ex
from builder import patches as pt
from builder import rebase as rb
from builder.errors import RebaseError
from gitfixtures_rebase import lines, new_project, run


def five_outcomes(tmp_path):
    """Patches p1..p5 meant to come out moved, unchanged, merged, upstream and conflict."""
    p = new_project(tmp_path)
    up = p.upstream
    base = {f"{n}.txt": lines(30, n) for n in "abcde"}
    p.pin = up.commit("base", base)
    edit = lambda name, i, new: base[name].replace(f"{name[0]} {i}\n", f"{new}\n")  # noqa: E731
    p.entries = [
        ("0001-a.patch", up.make_patch(p.pin, "xpu: tune a", {"a.txt": edit("a.txt", 20, "A20")})),
        ("0002-b.patch", up.make_patch(p.pin, "xpu: tune b", {"b.txt": edit("b.txt", 5, "B5")})),
        ("0003-c.patch", up.make_patch(p.pin, "xpu: tune c", {"c.txt": edit("c.txt", 10, "C10")})),
        ("0004-d.patch", up.make_patch(p.pin, "xpu: tune d", {"d.txt": edit("d.txt", 5, "D5")})),
        ("0005-e.patch", up.make_patch(p.pin, "xpu: tune e", {"e.txt": edit("e.txt", 5, "E5-ours")})),
    ]
    up.commit("shift a", {"a.txt": "new 1\nnew 2\nnew 3\n" + base["a.txt"]})
    up.commit("touch c near our line", {"c.txt": base["c.txt"].replace("c 12\n", "c twelve\n")})
    up.commit("take d upstream", {"d.txt": edit("d.txt", 5, "D5")})
    breaking = up.commit("rework e", {"e.txt": edit("e.txt", 5, "E5-theirs")}, author="Other Dev")
    onto = up.commit("unrelated", {"z.txt": "z\n"})
    p.write()
    p.refresh_mirror()
    return p, onto, breaking


def test_every_outcome_then_continue(tmp_path):
    p, onto, breaking = five_outcomes(tmp_path)
    work = tmp_path / "work"
    before = p.snapshot()
    report = rb.start(p.plan(onto, work), drop_merged=True)
    assert report.status == "stopped"
    assert [r.outcome for r in report.results] == ["moved", "unchanged", "merged", "upstream", "conflict"]
    assert report.results[3].dropped
    assert report.results[2].breaking.subject == "touch c near our line"
    assert report.results[3].breaking.subject == "take d upstream"
    assert report.results[0].breaking is None and report.results[1].breaking is None
    stop = report.stopped_at
    assert stop.conflicted_files == ("e.txt",)
    assert [u.sha for u in stop.upstream_commits] == [breaking]
    assert stop.upstream_commits[0].author.startswith("Other Dev")
    assert stop.breaking.sha == breaking
    wt = work / "lab" / "vllm"
    assert "<<<<<<<" in (wt / "e.txt").read_text()
    assert p.snapshot() == before  # nothing in the project changes until the replay finishes

    with pytest.raises(RebaseError, match="unresolved conflicts in e.txt"):
        rb.resume(work / "lab" / ".rebase", "vllm", "continue")
    (wt / "e.txt").write_text(p.upstream.read(onto, "e.txt").replace("E5-theirs", "E5-both"))
    run("add", "e.txt", cwd=wt)
    done = rb.resume(work / "lab" / ".rebase", "vllm", "continue")
    assert done.status == "finished"
    assert [r.outcome for r in done.results][-1] == "conflict" and done.results[-1].commit

    # The pin moved with its comment; d is gone from the series; a only moved: not rewritten.
    toml = p.stack_file.read_text()
    assert f'commit = "{onto}"  # pinned by hand, see the wiki' in toml
    assert toml.startswith("# The lab's stack.")
    assert ex.series_entries((p.patch_dir / "series").read_text()) == [
        "0001-a.patch", "0002-b.patch", "0003-c.patch", "0005-e.patch"]
    assert (p.patch_dir / "series").read_text().startswith("# xpu patches, in order\n")
    assert not (p.patch_dir / "0004-d.patch").exists()
    assert (p.patch_dir / "0001-a.patch").read_bytes() == before["patches/xpu/0001-a.patch"]
    assert (p.patch_dir / "0002-b.patch").read_bytes() == before["patches/xpu/0002-b.patch"]
    assert b"c twelve" in (p.patch_dir / "0003-c.patch").read_bytes()
    assert b"+E5-both" in (p.patch_dir / "0005-e.patch").read_bytes()
    assert not (work / "lab" / ".rebase" / "vllm.json").exists()
    assert "| 5 | `xpu/0005-e.patch` | conflict |" in (work / "lab" / "rebase-vllm.md").read_text()
    assert run("rev-parse", "stackbuild/lab", cwd=wt) == done.results[-1].commit


def test_upstream_stops_without_drop_merged_and_skip_drops(tmp_path):
    p, onto, _ = five_outcomes(tmp_path)
    work = tmp_path / "work"
    report = rb.start(p.plan(onto, work))
    assert report.status == "stopped" and report.stopped_at.outcome == "upstream"
    assert report.stopped_at.breaking.subject == "take d upstream"
    with pytest.raises(RebaseError, match="already upstream"):
        rb.resume(work / "lab" / ".rebase", "vllm", "continue")
    report = rb.resume(work / "lab" / ".rebase", "vllm", "skip")
    assert report.stopped_at.outcome == "conflict"
    report = rb.resume(work / "lab" / ".rebase", "vllm", "skip")
    assert report.status == "finished"
    assert ex.series_entries((p.patch_dir / "series").read_text()) == ["0001-a.patch", "0002-b.patch", "0003-c.patch"]
    assert not (p.patch_dir / "0005-e.patch").exists()


def test_abort_restores_everything(tmp_path):
    p, onto, _ = five_outcomes(tmp_path)
    work = tmp_path / "work"
    # An existing worktree on the branch, at the old pin with the patches: abort must bring it back.
    plan = p.plan(onto, work)
    wt = plan.worktree
    run(f"--git-dir={p.mirror}", "worktree", "add", "-q", "-B", "stackbuild/lab", str(wt), plan.items[-1].old_commit)
    (wt / "untracked.txt").write_text("mine\n")
    before = p.snapshot()
    head_before = run("rev-parse", "HEAD", cwd=wt)
    report = rb.start(plan, drop_merged=True)
    assert report.status == "stopped"
    aborted = rb.resume(work / "lab" / ".rebase", "vllm", "abort")
    assert aborted.status == "aborted"
    assert p.snapshot() == before
    assert run("rev-parse", "HEAD", cwd=wt) == head_before
    assert run("symbolic-ref", "HEAD", cwd=wt) == "refs/heads/stackbuild/lab"
    assert run("status", "--porcelain", cwd=wt) == "?? untracked.txt"
    assert not (work / "lab" / ".rebase" / "vllm.json").exists()
    with pytest.raises(RebaseError, match="no rebase"):
        rb.resume(work / "lab" / ".rebase", "vllm", "continue")


def test_abort_removes_worktree_it_created(tmp_path):
    p, onto, _ = five_outcomes(tmp_path)
    work = tmp_path / "work"
    rb.start(p.plan(onto, work), drop_merged=True)
    rb.resume(work / "lab" / ".rebase", "vllm", "abort")
    assert not (work / "lab" / "vllm").exists()
    assert run("branch", "--list", "stackbuild/lab", cwd=p.mirror) == ""


def test_second_start_refused_while_in_progress(tmp_path):
    p, onto, _ = five_outcomes(tmp_path)
    work = tmp_path / "work"
    rb.start(p.plan(onto, work), drop_merged=True)
    with pytest.raises(RebaseError, match="already in progress"):
        rb.start(p.plan(onto, work), drop_merged=True)


def test_dirty_worktree_refused(tmp_path):
    p, onto, _ = five_outcomes(tmp_path)
    work = tmp_path / "work"
    plan = p.plan(onto, work)
    run(f"--git-dir={p.mirror}", "worktree", "add", "-q", "-B", "stackbuild/lab", str(plan.worktree), p.pin)
    (plan.worktree / "a.txt").write_text("dirty\n")
    with pytest.raises(RebaseError, match="uncommitted changes"):
        rb.start(plan)
    assert not (work / "lab" / ".rebase" / "vllm.json").exists()


def test_rename_upstream_is_merged_onto_new_path(tmp_path):
    p = new_project(tmp_path)
    up = p.upstream
    body = lines(40, "f")
    p.pin = up.commit("base", {"old/f.py": body})
    p.entries = [("0001-f.patch", up.make_patch(p.pin, "xpu: f", {"old/f.py": body.replace("f 7\n", "F7\n")}))]
    onto = up.commit("move f", renames={"old/f.py": "new/f.py"})
    p.write()
    p.refresh_mirror()
    report = rb.start(p.plan(onto, tmp_path / "work"))
    assert report.status == "finished"
    assert [r.outcome for r in report.results] == ["merged"]
    assert report.results[0].files == ("new/f.py",)
    patch = (p.patch_dir / "0001-f.patch").read_bytes()
    assert b"diff --git a/new/f.py b/new/f.py" in patch and b"+F7" in patch


def test_all_clean_finishes_and_encoded_patch_keeps_encoding(tmp_path):
    p = new_project(tmp_path)
    up = p.upstream
    body = lines(30, "g")
    p.pin = up.commit("base", {"g.txt": body, "h.txt": body})
    p.entries = [
        ("0001-g.patch.gz.b64", up.make_patch(p.pin, "xpu: g", {"g.txt": body.replace("g 3\n", "G3\n")})),
        ("0002-h.patch", up.make_patch(p.pin, "xpu: h", {"h.txt": body.replace("g 3\n", "H3\n")})),
    ]
    onto = up.commit("context near g", {"g.txt": body.replace("g 5\n", "g five\n")})
    p.write()
    p.refresh_mirror()
    report = rb.start(p.plan(onto, tmp_path / "work"))
    assert [r.outcome for r in report.results] == ["merged", "unchanged"]
    raw = (p.patch_dir / "0001-g.patch.gz.b64").read_bytes()
    assert b"g five" in pt.decode(raw, "gz.b64", "t")
    assert raw == pt.encode(pt.decode(raw, "gz.b64", "t"), "gz.b64")


def test_decode_writes_plain_patch_and_updates_series(tmp_path):
    p = new_project(tmp_path)
    up = p.upstream
    body = lines(30, "g")
    p.pin = up.commit("base", {"g.txt": body})
    p.entries = [("0001-g.patch.gz.b64", up.make_patch(p.pin, "xpu: g", {"g.txt": body.replace("g 3\n", "G3\n")}))]
    onto = up.commit("later", {"other.txt": "x\n"})
    p.write()
    p.refresh_mirror()
    rb.start(p.plan(onto, tmp_path / "work"), decode=True)
    assert ex.series_entries((p.patch_dir / "series").read_text()) == ["0001-g.patch"]
    assert not (p.patch_dir / "0001-g.patch.gz.b64").exists()
    assert (p.patch_dir / "0001-g.patch").read_bytes().startswith(b"From 0000000000000000000000000000000000000000 ")


def test_resolution_that_keeps_upstream_drops_the_patch_and_own_commit_is_accepted(tmp_path):
    p, onto, _ = five_outcomes(tmp_path)
    work = tmp_path / "work"
    rb.start(p.plan(onto, work), drop_merged=True)
    wt = work / "lab" / "vllm"
    (wt / "e.txt").write_text(p.upstream.read(onto, "e.txt"))  # take theirs: nothing of ours is left
    run("add", "e.txt", cwd=wt)
    done = rb.resume(work / "lab" / ".rebase", "vllm", "continue")
    assert done.status == "finished" and done.results[-1].dropped
    assert "0005-e.patch" not in ex.series_entries((p.patch_dir / "series").read_text())

    q, onto2, _ = five_outcomes(tmp_path / "again")
    rb.start(q.plan(onto2, tmp_path / "again" / "work"), drop_merged=True)
    wt2 = tmp_path / "again" / "work" / "lab" / "vllm"
    (wt2 / "e.txt").write_text(q.upstream.read(onto2, "e.txt").replace("E5-theirs", "E5-mine"))
    run("add", "e.txt", cwd=wt2)
    run("commit", "-q", "--no-edit", cwd=wt2)  # commits with the cherry-pick's message, trailer included
    done = rb.resume(tmp_path / "again" / "work" / "lab" / ".rebase", "vllm", "continue")
    assert done.status == "finished" and not done.results[-1].dropped
    assert b"+E5-mine" in (q.patch_dir / "0005-e.patch").read_bytes()
