"""The maintainer's report: breaking commit with its PR number, files a plain apply failed on but
the three-way merge took (apart from files still conflicting after it), upstream renames (with the
new name) and deletions, and the upstream commits touching each conflicted file."""

from __future__ import annotations

import json

from builder import rebase as rb
from builder.rebase_report import FileCommits, PathChange, markdown, pr_number
from gitfixtures_rebase import lines, new_project, run


def renamed_and_deleted(tmp_path):
    p = new_project(tmp_path)
    up = p.upstream
    base = {"old/model.py": lines(30, "m"), "gone.txt": lines(30, "g"), "two.txt": lines(30, "t"),
            "c.txt": lines(30, "c")}
    p.pin = up.commit("base", base)
    edit = lambda name, old, new: base[name].replace(old, new)  # noqa: E731
    p.entries = [
        # the file moves upstream: the plain apply fails (no such file), the merge follows the rename
        ("0001-model.patch", up.make_patch(p.pin, "xpu: model", {"old/model.py": edit("old/model.py", "m 10\n", "M10\n")})),
        # two files: one applies as is, the other only by three-way, and c conflicts
        ("0002-two.patch", up.make_patch(p.pin, "xpu: two and c", {
            "two.txt": edit("two.txt", "t 15\n", "T15\n"), "c.txt": edit("c.txt", "c 5\n", "ours\n")})),
        # the file goes upstream: a modify/delete conflict
        ("0003-gone.patch", up.make_patch(p.pin, "xpu: gone", {"gone.txt": edit("gone.txt", "g 3\n", "G3\n")})),
    ]
    renaming = up.commit("Move the model (#31337)", renames={"old/model.py": "new/model.py"})
    up.commit("touch two's context", {"two.txt": edit("two.txt", "t 18\n", "t eighteen\n")})
    c1 = up.commit("rework c (#12345)", {"c.txt": edit("c.txt", "c 5\n", "theirs\n")})
    c2 = up.commit("Merge pull request #777 from x/y", {"c.txt": edit("c.txt", "c 5\n", "theirs again\n")})
    deleting = up.commit("drop gone.txt", {"gone.txt": None})
    onto = up.commit("unrelated", {"z.txt": "z\n"})
    p.write()
    p.refresh_mirror()
    return p, onto, renaming, (c1, c2), deleting


def test_report_names_renames_deletions_merged_files_prs_and_commits_per_file(tmp_path):
    p, onto, renaming, (c1, c2), deleting = renamed_and_deleted(tmp_path)
    work = tmp_path / "work"
    report = rb.start(p.plan(onto, work))
    model, two = report.results[0], report.results[1]
    assert model.outcome == "merged"
    assert model.path_changes == (PathChange("old/model.py", "renamed", "new/model.py"),)
    assert model.merged_files == ("old/model.py",)
    assert model.breaking.sha == renaming and model.breaking.pr == 31337

    assert two.outcome == "conflict" and report.status == "stopped"
    assert two.conflicted_files == ("c.txt",)
    # two.txt: only the plain apply failed (its context moved); c.txt still conflicts after the merge
    assert two.merged_files == ("two.txt",)
    assert two.commits_by_file == (FileCommits("c.txt", (c2, c1)),)
    assert [u.pr for u in two.upstream_commits if u.sha in (c1, c2)] == [777, 12345]
    md = markdown(report)
    assert "#### `xpu/0002-two.patch`: conflict" in md
    assert "- conflicts after the three-way merge: `c.txt`" in md
    assert "- plain apply failed, the three-way merge took: `two.txt`" in md
    assert f"- upstream commits touching `c.txt`: `{c2[:12]}` Merge pull request #777 from x/y; `{c1[:12]}` rework c (#12345)" in md
    assert "- upstream renamed `old/model.py` → `new/model.py`" in md and "— PR #31337" in md

    # the state round-trips every new field: resolve, continue, and the deletion is next
    wt = work / "lab" / "vllm"
    (wt / "c.txt").write_text(lines(30, "c").replace("c 5\n", "both\n"))

    run("add", "c.txt", cwd=wt)
    report = rb.resume(work / "lab" / ".rebase", "vllm", "continue")
    assert report.results[0] == model
    gone = report.stopped_at
    assert gone.name == "0003-gone.patch" and gone.outcome == "conflict"
    assert gone.conflicted_files == ("gone.txt",)
    assert gone.path_changes == (PathChange("gone.txt", "deleted"),)
    assert gone.breaking.sha == deleting and gone.breaking.pr is None
    assert gone.commits_by_file == (FileCommits("gone.txt", (deleting,)),)
    assert "- upstream deleted `gone.txt`" in markdown(report)
    data = json.loads(json.dumps(report.to_json()))
    assert data["stopped_at"]["path_changes"] == [{"path": "gone.txt", "change": "deleted", "new_path": None}]
    assert data["results"][0]["merged_files"] == ["old/model.py"]


def test_pr_numbers_from_subjects():
    assert pr_number("[Kernel] faster attention (#12345)") == 12345
    assert pr_number("Revert \"x (#1)\" (#2)") == 2
    assert pr_number("Merge pull request #99 from a/b") == 99
    assert pr_number("fix #12 in the docs") is None
