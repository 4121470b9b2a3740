"""The reproductions of issue 9, each against real `git apply --cached` on a temporary index.

The parity rule (docs/patches.md): whatever the engine accepts, git accepts with the same tree;
whatever git refuses, the engine refuses (a `malformed` or `conflict` verdict, or a PatchError
while parsing), at check time.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from builder.replay import ALREADY, CONFLICT, MALFORMED, replay
from builder.errors import PatchError
from builder.patches import parse_patch
from conftest import Upstream, sh, write_project
from test_core import run, stack_toml

A = "".join(f"line {i}\n" for i in range(1, 11))
B = "alpha\nbeta\ngamma\n"


@dataclass(frozen=True)
class Verdict:
    accepted: bool
    tree: str | None  # when accepted
    outcome: str  # ours: a PatchResult outcome, or "malformed" for a parse error; git: "ok"/"refused"
    message: str


@pytest.fixture
def base(upstream: Upstream) -> str:
    return upstream.commit({"a.txt": A, "b.txt": B}, "base")


def git_verdict(repo: Path, base: str, patch: bytes, tmp: Path) -> Verdict:
    env = {**os.environ, "GIT_INDEX_FILE": str(tmp / "git-index")}
    subprocess.run(["git", "read-tree", base], cwd=repo, env=env, check=True)
    proc = subprocess.run(["git", "apply", "--cached", "-p1"], cwd=repo, env=env, input=patch, capture_output=True)
    if proc.returncode != 0:
        return Verdict(False, None, "refused", proc.stderr.decode(errors="replace"))
    tree = subprocess.run(["git", "write-tree"], cwd=repo, env=env, capture_output=True, check=True).stdout
    return Verdict(True, tree.decode().strip(), "ok", "")


def our_verdict(repo: Path, base: str, patch: bytes) -> Verdict:
    try:
        parsed = parse_patch(patch, series="s", name="p.patch", where="p.patch")
    except PatchError as exc:
        return Verdict(False, None, MALFORMED, str(exc))
    result = replay(repo / ".git", base, [parsed], stop_at_failure=False)
    r = result.results[0]
    if not r.ok:
        return Verdict(False, None, r.outcome, r.detail or "; ".join(f"{f.path}: {f.reason}" for f in r.failed))
    tree = sh("git", "rev-parse", f"{result.head}^{{tree}}", cwd=repo).strip()
    return Verdict(True, tree, r.outcome, r.detail)


def both(upstream: Upstream, base: str, patch: bytes, tmp: Path) -> tuple[Verdict, Verdict]:
    """Our verdict and git's, asserting the parity rule; ALREADY is ours alone (git -R)."""
    ours, theirs = our_verdict(upstream.path, base, patch), git_verdict(upstream.path, base, patch, tmp)
    if ours.accepted and ours.outcome != ALREADY:
        assert theirs.accepted, f"we accept ({ours.outcome}), git refuses: {theirs.message}"
        assert ours.tree == theirs.tree, "both accept, trees differ"
    if not theirs.accepted:
        assert not ours.accepted, f"git refuses ({theirs.message.strip()}), we say {ours.outcome}"
    return ours, theirs


def section(*lines: str) -> bytes:
    return "".join(f"{ln}\n" for ln in lines).encode()


HEAD_A = ("diff --git a/a.txt b/a.txt", "--- a/a.txt", "+++ b/a.txt")
HUNK_A = ("@@ -1,3 +1,3 @@", "-line 1", "+LINE 1", " line 2", " line 3")
GOOD_B = section("diff --git a/b.txt b/b.txt", "--- a/b.txt", "+++ b/b.txt", "@@ -1,3 +1,3 @@",
                 "-alpha", "+ALPHA", " beta", " gamma")


# 1. sections without a usable hunk: git reads them as garbage, never as an empty change.
@pytest.mark.parametrize("patch,line", [
    (section(*HEAD_A, "@@", "-line 1", "+LINE 1"), 4),
    (section(*HEAD_A, "@@-1,3 +1,3 @@", "-line 1", "+LINE 1", " line 2", " line 3"), 4),
    (section("diff --git a/a.txt b/a.txt", "index 1234567..89abcde 100644"), 3),
    (section(*HEAD_A, "-line 1", "+LINE 1"), 4),
    (section("diff --git a/a.txt b/a.txt", "new mode 100755"), 3),
])
def test_garbage_sections_are_refused_in_git_words(upstream: Upstream, base: str, tmp_path: Path, patch: bytes,
                                                   line: int):
    ours, theirs = both(upstream, base, patch, tmp_path)
    assert f"patch with only garbage at line {line}" in theirs.message
    assert ours.outcome == MALFORMED and f"patch with only garbage at line {line}" in ours.message


def test_garbage_section_in_a_multi_file_patch_refuses_the_whole_patch(upstream: Upstream, base: str, tmp_path: Path):
    patch = GOOD_B + section(*HEAD_A, "@@", "-line 1", "+LINE 1")
    ours, _ = both(upstream, base, patch, tmp_path)
    assert ours.outcome == MALFORMED and "p.patch:12" in ours.message


# 2. names: traditional diffs take git's one name; disagreeing git headers are git's to decide.
@pytest.mark.parametrize("names", [
    ("--- a/a.txt", "+++ b/b.txt"),
    ("--- a/a.txt", "+++ b/a.txt.new"),
    ("--- a/a.txt.orig", "+++ b/a.txt"),
    ("--- /d/f.txt", "+++ b/a.txt"),
    ("diff --git a/a.txt b/b.txt", "--- a/a.txt", "+++ b/b.txt"),
    ("diff --git a/a.txt b/b.txt", "rename to b.txt", "--- a/a.txt", "+++ b/b.txt"),
    ("diff --git a/a.txt b/c.txt", "rename from a.txt", "--- a/a.txt", "+++ b/c.txt"),
    ("diff --git a/a.txt b/a.txt", "--- a/b.txt", "+++ b/b.txt"),
])
def test_names_resolve_as_git_resolves_them(upstream: Upstream, base: str, tmp_path: Path, names: tuple[str, ...]):
    both(upstream, base, section(*names, *HUNK_A), tmp_path)


def test_traditional_name_extension_patches_the_first_name(upstream: Upstream, base: str, tmp_path: Path):
    ours, theirs = both(upstream, base, section("--- a/a.txt", "+++ b/a.txt.new", *HUNK_A), tmp_path)
    assert ours.accepted and theirs.accepted


# 3. a last line without its newline is a truncated patch.
@pytest.mark.parametrize("patch", [
    section(*HEAD_A, *HUNK_A)[:-1],
    section(*HEAD_A, "@@ -1,3 +1,3 @@", "-line 1", " line 2", " line 3", "+LINE 1")[:-1],
])
def test_unterminated_last_line_is_a_corrupt_patch(upstream: Upstream, base: str, tmp_path: Path, patch: bytes):
    ours, theirs = both(upstream, base, patch, tmp_path)
    assert "corrupt patch at line 8" in theirs.message
    assert ours.outcome == MALFORMED and "corrupt patch at line 8" in ours.message


# 4. a "\ No newline" marker anywhere but the end of a side: git's reading decides.
@pytest.mark.parametrize("hunk", [
    ("@@ -1,3 +1,3 @@", "-line 1", "\\ No newline at end of file", "+LINE 1", " line 2", " line 3"),
    ("@@ -1,3 +1,3 @@", "-line 1", "+LINE 1", "\\ No newline at end of file", " line 2", " line 3"),
    ("@@ -1,3 +1,4 @@", "-line 1", "+LINE 1", "+one", "\\ No newline at end of file", "+two", " line 2", " line 3"),
    ("@@ -1,3 +1,3 @@", " line 1", "\\ No newline at end of file", "-line 2", "+LINE 2", " line 3"),
])
def test_no_newline_marker_inside_a_hunk(upstream: Upstream, base: str, tmp_path: Path, hunk: tuple[str, ...]):
    both(upstream, base, section(*HEAD_A, *hunk), tmp_path)


def test_no_newline_marker_at_the_end_of_both_sides_stays_ours(upstream: Upstream, base: str, tmp_path: Path):
    base2 = upstream.commit({"n.txt": "one\ntwo"}, "no eol")
    patch = section("diff --git a/n.txt b/n.txt", "--- a/n.txt", "+++ b/n.txt", "@@ -1,2 +1,2 @@", " one",
                    "-two", "\\ No newline at end of file", "+TWO", "\\ No newline at end of file")
    assert not parse_patch(patch, series="s", name="p", where="p").files[0].needs_git
    ours, theirs = both(upstream, base2, patch, tmp_path)
    assert ours.accepted and theirs.accepted


# 5. deleting a file that is not there.
def test_deleting_a_missing_file_is_a_conflict(upstream: Upstream, base: str, tmp_path: Path):
    patch = section("diff --git a/nope.txt b/nope.txt", "deleted file mode 100644", "index 1234567..0000000",
                    "--- a/nope.txt", "+++ /dev/null", "@@ -1 +0,0 @@", "-x")
    ours, theirs = both(upstream, base, patch, tmp_path)
    assert "does not exist" in theirs.message
    assert ours.outcome == CONFLICT and "nope.txt" in ours.message


def test_deleting_a_file_upstream_removed_is_already_applied(upstream: Upstream, base: str, tmp_path: Path):
    patch = upstream.diff({"b.txt": None})
    removed = upstream.commit({"b.txt": None}, "upstream removes b.txt")
    assert our_verdict(upstream.path, removed, patch).outcome == ALREADY


# 6. paths outside the tree, and files behind a symlink the same patch makes.
@pytest.mark.parametrize("patch", [
    section("diff --git a//tmp/x b//tmp/x", "new file mode 100644", "--- /dev/null", "+++ b//tmp/x",
            "@@ -0,0 +1 @@", "+x"),
    section("--- a//tmp/x", "+++ b//tmp/x", "@@ -0,0 +1 @@", "+x"),
])
def test_absolute_paths_are_invalid(upstream: Upstream, base: str, tmp_path: Path, patch: bytes):
    ours, theirs = both(upstream, base, patch, tmp_path)
    assert "invalid path '/tmp/x'" in theirs.message and "invalid path '/tmp/x'" in ours.message


NEW_F = ("diff --git a/d/f b/d/f", "new file mode 100644", "--- /dev/null", "+++ b/d/f", "@@ -0,0 +1 @@", "+x")
NEW_LINK = ("diff --git a/d b/d", "new file mode 120000", "--- /dev/null", "+++ b/d", "@@ -0,0 +1 @@", "+a.txt",
            "\\ No newline at end of file")


@pytest.mark.parametrize("patch", [section(*NEW_F, *NEW_LINK), section(*NEW_LINK, *NEW_F)])
def test_file_behind_a_symlink_of_the_same_patch(upstream: Upstream, base: str, tmp_path: Path, patch: bytes):
    ours, theirs = both(upstream, base, patch, tmp_path)
    assert "beyond a symbolic link" in theirs.message
    assert ours.outcome == MALFORMED and "'d/f' is beyond a symbolic link" in ours.message


# 7. what git's verify_path and mode parsing refuse is refused at check time.
@pytest.mark.parametrize("path", [".GIT/config", "GIT~1/x", ".git /x", ".git./x", ".Git. . /x", "x/.git:stream/y"])
def test_dotgit_variants_are_invalid(upstream: Upstream, base: str, tmp_path: Path, path: str):
    patch = section(f"diff --git a/{path} b/{path}", "new file mode 100644", "--- /dev/null", f"+++ b/{path}",
                    "@@ -0,0 +1 @@", "+x")
    ours, theirs = both(upstream, base, patch, tmp_path)
    assert "invalid path" in theirs.message and ours.outcome == MALFORMED and "invalid path" in ours.message


def test_hfs_spelling_of_dotgit_is_refused(upstream: Upstream, base: str):
    path = ".g\u200cit/config"
    patch = section(f"diff --git a/{path} b/{path}", "new file mode 100644", "--- /dev/null", f"+++ b/{path}",
                    "@@ -0,0 +1 @@", "+x")
    assert our_verdict(upstream.path, base, patch).outcome == MALFORMED  # stricter than git on Linux


@pytest.mark.parametrize("name", [".gitmodules", ".GitModules", "GITMOD~1"])
def test_gitmodules_symlink_is_invalid(upstream: Upstream, base: str, tmp_path: Path, name: str):
    patch = section(f"diff --git a/{name} b/{name}", "new file mode 120000", "--- /dev/null", f"+++ b/{name}",
                    "@@ -0,0 +1 @@", "+a.txt", "\\ No newline at end of file")
    ours, theirs = both(upstream, base, patch, tmp_path)
    assert "invalid path" in theirs.message and ours.outcome == MALFORMED


@pytest.mark.parametrize("mode,expect", [("100777", "100755"), ("100775", "100755"), ("100600", "100644")])
def test_modes_are_normalised_as_git_does(upstream: Upstream, base: str, tmp_path: Path, mode: str, expect: str):
    patch = section("diff --git a/a.txt b/a.txt", "old mode 100644", f"new mode {mode}")
    ours, theirs = both(upstream, base, patch, tmp_path)
    assert ours.accepted and theirs.accepted  # 100600 is a mode change to git, to the same 100644
    assert f"{expect} blob" in sh("git", "ls-tree", ours.tree, "a.txt", cwd=upstream.path)


@pytest.mark.parametrize("mode", ["abc", "100644x", ""])
def test_garbage_modes_are_refused(upstream: Upstream, base: str, tmp_path: Path, mode: str):
    patch = section("diff --git a/a.txt b/a.txt", "old mode 100644", f"new mode {mode}")
    ours, theirs = both(upstream, base, patch, tmp_path)
    assert "invalid mode on line 2" in theirs.message  # git counts from the line after 'diff --git'
    assert f"p.patch:3: invalid mode '{mode}'" in ours.message


# 8. a damaged binary literal is malformed, not a conflict.
def test_corrupt_binary_literal_is_malformed(upstream: Upstream, base: str, tmp_path: Path):
    good = upstream.diff({"bin.dat": bytes(range(256)) * 4}, "--binary")
    ours, theirs = both(upstream, base, good, tmp_path)
    assert ours.accepted and theirs.accepted
    lines = good.split(b"\n")
    first_data = next(i for i, ln in enumerate(lines) if ln.startswith(b"literal ")) + 1
    damaged = [
        b"\n".join(lines[:first_data + 1]) + b"\n",                        # truncated: no end of the block
        b"\n".join(lines[:first_data] + [b"A" + lines[first_data][1:]] + lines[first_data + 1:]),  # bad length
        b"\n".join(lines[:first_data] + [lines[first_data][:-5] + b"!!!!!"] + lines[first_data + 1:]),
        good.replace(b"literal ", b"literal 9", 1),                      # wrong inflated size
        good.replace(b"literal ", b"litteral ", 1),
    ]
    for patch in damaged:
        ours, theirs = both(upstream, base, patch, tmp_path)
        assert not theirs.accepted and ours.outcome == MALFORMED, (patch[-200:], ours)
        assert "binary patch at line" in ours.message


# 9. one bad patch reported in place; other stacks and other patches are checked as usual.
def test_a_malformed_patch_does_not_break_other_stacks(upstream: Upstream, base: str, tmp_path: Path):
    good = upstream.diff({"a.txt": A.replace("line 5", "LINE 5")})
    extra = '[series.bad]\nsource = "up"\n\n[stacks.broken]\nseries = ["s1", "bad"]\n'
    root = write_project(tmp_path / "proj", stack_toml(upstream.path, base, extra=extra), {
        "patches/s1/good.patch": good, "patches/s1/series": "good.patch\n",
        "patches/bad/bad.patch": section(*HEAD_A, "@@", "-line 1"), "patches/bad/series": "bad.patch\n",
    }).parent
    assert run(root, "--json", "check", "demo")[0] == 0
    code, out, _ = run(root, "--json", "series")
    assert code == 0
    rows = {p["name"]: p for s in json.loads(out)["series"] for p in s["patches"]}
    assert "patch with only garbage at line 4" in rows["bad.patch"]["error"] and "error" not in rows["good.patch"]
    code, out, err = run(root, "--json", "check")
    assert code == 4, err
    verdicts = {(r["stack"], p["patch"]): p["outcome"] for r in json.loads(out) for s in r["sources"] for p in s["patches"]}
    assert verdicts == {("broken", "s1/good.patch"): "clean", ("broken", "bad/bad.patch"): MALFORMED,
                        ("demo", "s1/good.patch"): "clean"}
    code, out, _ = run(root, "--json", "apply", "broken")
    assert code == 4 and "patch with only garbage at line 4" in out


# Shapes the differential fuzzer found after the reproductions were fixed.
@pytest.mark.parametrize("patch", [
    b"--- a/dir/\n+++ b/a.txt\r\n" + section(*HUNK_A),
    b"--- a.txt.orig\n+++ b/a.txt\n" + section(*HUNK_A),
    b"--- a/a.txt\n+++ .gitmodules\n" + section(*HUNK_A),
    b"--- a/b.txt\n+++ b/b.txt\n@@ -2 +2 @@\n beta\n",
    b"diff --git a/a.txt b/a.txt\nold mode 100644\nnew mode 100755",
    b"diff --git a/a.txt b/a.txt\nold mode 100644\nnew mode 100755\r\n",
    b"diff --git a/.git /x b/d\ncopy from a.txt\ncopy to d\n",
    b"diff --git a/b.txt b/b.txt\n" + section(*HEAD_A, *HUNK_A),
    b"diff --git a/a.txt b/a.txt\nindex 1234567\n" + section(*HEAD_A[1:], *HUNK_A),
    b"diff --git a/a.txt b/m.txt\nrename from a.txt\nrename to m.txt\t\n",
    b"diff --git a/a.txt b/m.txt\nnew file mode 100644\nrename from a.txt\nrename to m.txt\n",
])
def test_fuzzer_found_shapes(upstream: Upstream, base: str, tmp_path: Path, patch: bytes):
    both(upstream, base, patch, tmp_path)


@pytest.mark.parametrize("patch", [
    b"diff --git a/n.txt b/n.txt\nnew file mode 100644\n--- /dev/null\n",
    b"diff --git a/n.txt b/n.txt\nnew file mode 100644\n+++ b/n.txt\n@@ -0,0 +1 @@\n+x\n",
    b"--- a/b.txt\n+++ /dev/null\n@@ -1,3 +0,0 @@\n-alpha\n-beta\n-gamma\n\\ No newline at end of file",
    b"diff --git a/a.txt b/a.txt\nold mode 100644\nnew mode 100755\ndiff--git a/b.txt b/b.txt\n--- a/b.txt\n"
    b"+++ b/b.txt\n",
])
def test_more_fuzzer_found_shapes(upstream: Upstream, base: str, tmp_path: Path, patch: bytes):
    both(upstream, base, patch, tmp_path)


@pytest.mark.parametrize("names", [("+++ b/n.txt", "--- /dev/null"), ("--- a/a.txt", "--- a/a.txt", "+++ b/a.txt")])
def test_header_name_lines_in_any_order_go_to_git(upstream: Upstream, base: str, tmp_path: Path,
                                                  names: tuple[str, ...]):
    new = names[0].endswith("n.txt")
    head = ("diff --git a/n.txt b/n.txt", "new file mode 100644") if new else ("diff --git a/a.txt b/a.txt",)
    hunk = ("@@ -0,0 +1 @@", "+x") if new else HUNK_A
    both(upstream, base, section(*head, *names, *hunk), tmp_path)


# Classes the 50,000-case fuzzer run found.
# apply.c git_header_name: a 'diff --git' line gives both sides one name only when it shows up
# twice in exactly the same form; an unterminated quote, or a quoted name beside a plain one,
# gives none, and parse_git_diff_header refuses a header that names the file nowhere else.
@pytest.mark.parametrize("first", ['diff --git a/a.txt "/a.txt', 'diff --git a/a.txt "b/a.txt',
                                   'diff --git "a/a.txt b/a.txt', 'diff --git "a/a.txt" b/a.txt'])
def test_header_without_a_name_git_can_read_is_malformed(upstream: Upstream, base: str, tmp_path: Path, first: str):
    ours, theirs = both(upstream, base, section(first, "old mode 100644", "new mode 100755"), tmp_path)
    words = "git diff header lacks filename information when removing 1 leading pathname component (line 4)"
    assert words in theirs.message
    assert ours.outcome == MALFORMED and words in ours.message


@pytest.mark.parametrize("first", ['diff --git "a/a.txt" "b/a.txt"', "diff --git a/a.txt\tb/a.txt"])
def test_header_names_git_can_read(upstream: Upstream, base: str, tmp_path: Path, first: str):
    ours, theirs = both(upstream, base, section(first, "old mode 100644", "new mode 100755"), tmp_path)
    assert ours.accepted and theirs.accepted


# apply.c check_header_line: a section is at most one of creation, deletion, rename and copy.
@pytest.mark.parametrize("lines,numbers", [
    (("new file mode 100644", "deleted file mode 100644", "old mode 100644", "new mode 100755"), "2 and 3"),
    (("old mode 100644", "new file mode 100644", "new mode 100755", "rename from a.txt"), "3 and 5"),
    (("copy from a.txt", "rename to m.txt"), "2 and 3"),
])
def test_inconsistent_header_lines_are_malformed(upstream: Upstream, base: str, tmp_path: Path,
                                                 lines: tuple[str, ...], numbers: str):
    ours, theirs = both(upstream, base, section("diff --git a/a.txt b/a.txt", *lines), tmp_path)
    assert f"inconsistent header lines {numbers}" in theirs.message
    assert ours.outcome == MALFORMED and f"inconsistent header lines {numbers}" in ours.message


# apply.c find_name_common: a name with nothing after its -p prefix ('+++ b/') names nothing. A
# traditional diff takes the other side's name (find_name_traditional's default); a git header
# is left with one side unnamed, which parse_git_diff_header refuses.
@pytest.mark.parametrize("names,accepted", [
    (("--- a/a.txt", "+++ b/"), True),
    (("--- a/", "+++ b/a.txt"), True),
    (("--- /dev/null", "+++ b/"), False),
    (("diff --git a/a.txt b/a.txt", "--- a/a.txt", "+++ b/"), False),
])
def test_empty_names_are_read_as_git_reads_them(upstream: Upstream, base: str, tmp_path: Path,
                                                names: tuple[str, ...], accepted: bool):
    hunk = HUNK_A if names[0] != "--- /dev/null" else ("@@ -0,0 +1 @@", "+x")
    ours, theirs = both(upstream, base, section(*names, *hunk), tmp_path)
    assert theirs.accepted is accepted and ours.accepted is accepted
    if not accepted:
        assert ours.outcome == MALFORMED and theirs.message.strip().removeprefix("error: ") in ours.message


# A blank or CR-only line ends a git header (parse_git_diff_header: gitdiff_unrecognized), and
# the ---/+++ pair after it starts a second, traditional section for the same path: git's
# check_patch asks only the index whether a created path exists, so both creations pass and the
# later one wins. Repeated paths are git's to decide.
@pytest.mark.parametrize("blank", ["", " ", "\r"])
def test_a_path_created_twice_in_one_patch(upstream: Upstream, base: str, tmp_path: Path, blank: str):
    patch = section("diff --git a/n.txt b/n.txt", "new file mode 120000", blank, "--- /dev/null", "+++ b/n.txt",
                    "@@ -0,0 +1,2 @@", "+x", "+y")
    ours, theirs = both(upstream, base, patch, tmp_path)
    assert ours.accepted and theirs.accepted


def test_a_type_change_stays_ours(upstream: Upstream, base: str, tmp_path: Path):
    patch = section("diff --git a/b.txt b/b.txt", "deleted file mode 100644", "--- a/b.txt", "+++ /dev/null",
                    "@@ -1,3 +0,0 @@", "-alpha", "-beta", "-gamma",
                    "diff --git a/b.txt b/b.txt", "new file mode 120000", "--- /dev/null", "+++ b/b.txt",
                    "@@ -0,0 +1 @@", "+a.txt", "\\ No newline at end of file")
    assert not any(f.needs_git for f in parse_patch(patch, series="s", name="p", where="p").files)
    ours, theirs = both(upstream, base, patch, tmp_path)
    assert ours.accepted and theirs.accepted


# apply.c gitdiff_verify_name: the first name a header gives a side stays; every later one, and
# /dev/null for a created or deleted side, must agree with it.
@pytest.mark.parametrize("lines,words", [
    (("new file mode 100644", "--- a/a.txt", "+++ b/a.txt"), "expected /dev/null on line"),
    (("deleted file mode 100644", "--- a/a.txt", "+++ b/a.txt"), "expected /dev/null on line"),
    (("new file mode 100644", "--- /dev/null", "+++ b/b.txt"), "inconsistent new filename on line"),
    (("deleted file mode 100644", "--- /dev/null", "+++ /dev/null"), "inconsistent old filename on line"),
    (("--- a/a.txt", "+++ b/a.txt", "deleted file mode 100644", "+++ /dev/null"), "expected /dev/null, got a.txt"),
])
def test_header_names_that_disagree_are_malformed(upstream: Upstream, base: str, tmp_path: Path,
                                                  lines: tuple[str, ...], words: str):
    ours, theirs = both(upstream, base, section("diff --git a/a.txt b/a.txt", *lines, *HUNK_A), tmp_path)
    assert f"git apply: bad git-diff - {words}" in theirs.message
    assert ours.outcome == MALFORMED and f"git apply: bad git-diff - {words}" in ours.message


# apply.c parse_binary_hunk reads 'literal N'/'delta N' with strtoul: what follows the number
# (a tab, a space) does not make the block unreadable.
@pytest.mark.parametrize("after", ["\t", " ", "  \t", "x"])
def test_binary_size_line_is_read_as_strtoul_reads_it(upstream: Upstream, base: str, tmp_path: Path, after: str):
    good = upstream.diff({"bin.dat": bytes(range(256)) * 4}, "--binary")
    head, rest = good.split(b"literal ", 1)
    size, tail = rest.split(b"\n", 1)
    ours, theirs = both(upstream, base, head + b"literal " + size + after.encode() + b"\n" + tail, tmp_path)
    assert ours.accepted and theirs.accepted


# apply.c is_dev_null: '/dev/null' followed by any white space, as a diff tool may leave it.
def test_dev_null_with_trailing_space_creates(upstream: Upstream, base: str, tmp_path: Path):
    ours, theirs = both(upstream, base, section("--- /dev/null ", "+++ b/n.txt", "@@ -0,0 +1 @@", "+x"), tmp_path)
    assert ours.accepted and theirs.accepted


# apply.c parse_single_patch/check_preimage: a traditional diff whose one hunk has no old lines
# creates the file when the index does not have it.
def test_traditional_hunk_without_old_lines_creates_a_missing_file(upstream: Upstream, base: str, tmp_path: Path):
    ours, theirs = both(upstream, base, section("--- a/dir/", "+++ b/n.txt", "@@ -0,0 +1,2 @@", "+x", "+y"),
                        tmp_path)
    assert ours.accepted and theirs.accepted


# apply.c find_header: a line starting '@@ -' outside a section is an error only when it parses
# as a fragment header; git reads past any other.
def test_unparsable_hunk_header_after_a_mode_change_is_skipped(upstream: Upstream, base: str, tmp_path: Path):
    patch = section("diff --git a/a.txt b/a.txt", "old mode 100644", "new mode 100755", "--- a/a.txt",
                    "+++ b/a.txt", "\tline 1", "@@ -1,3 +1", "-line 2", "-line 3")
    ours, theirs = both(upstream, base, patch, tmp_path)
    assert ours.accepted and theirs.accepted


# apply.c check_preimage: the old mode a patch states ('old mode', 'deleted file mode', the
# index line's) must be of the file's type; the index line's mode is the old side's only, the
# result keeps the file's own mode. check_patch: a new mode must be of the old one's type.
@pytest.mark.parametrize("lines,accepted", [
    (("index 1234567..89abcde 100755", "--- a/a.txt", "+++ b/a.txt", *HUNK_A), True),
    (("index 1234567..89abcde 120000", "--- a/a.txt", "+++ b/a.txt", *HUNK_A), False),
    (("old mode 120000", "new mode 120000", "--- a/a.txt", "+++ b/a.txt", *HUNK_A), False),
    (("new mode 120000", "--- a/a.txt", "+++ b/a.txt", *HUNK_A), False),
    (("old mode 120000", "similarity index 100%", "rename from a.txt", "rename to z/a.txt"), False),
])
def test_stated_modes_must_fit_the_file(upstream: Upstream, base: str, tmp_path: Path, lines: tuple[str, ...],
                                        accepted: bool):
    first = "diff --git a/a.txt b/z/a.txt" if "rename to z/a.txt" in lines else "diff --git a/a.txt b/a.txt"
    ours, theirs = both(upstream, base, section(first, *lines), tmp_path)
    assert ours.accepted is accepted and theirs.accepted is accepted
    if accepted:
        assert "100644 blob" in sh("git", "ls-tree", ours.tree, "a.txt", cwd=upstream.path)


def test_deleting_a_symlink_as_a_file_is_refused(upstream: Upstream, tmp_path: Path):
    upstream.commit({"a.txt": A}, "base")
    os.symlink("a.txt", upstream.path / "link")
    base = upstream.commit({}, "with a link")
    patch = section("diff --git a/link b/link", "deleted file mode 100644", "--- a/link", "+++ /dev/null",
                    "@@ -1 +0,0 @@", "-a.txt", "\\ No newline at end of file")
    ours, theirs = both(upstream, base, patch, tmp_path)
    assert "wrong type" in theirs.message and not ours.accepted


# apply.c find_header: a 'diff --git' line right before 'GIT binary patch' has no header, so git
# skips it and reads on; the sections before it still apply.
def test_binary_marker_right_after_diff_git_is_skipped(upstream: Upstream, base: str, tmp_path: Path):
    patch = GOOD_B + section("diff --git a/bin.dat b/bin.dat", "GIT binary patch", "index 1234567..89abcde 100644",
                             "delta 5", "zcmV", "")
    ours, theirs = both(upstream, base, patch, tmp_path)
    assert ours.accepted and theirs.accepted


# Two sections for one path: a change of what an earlier section wrote reads as a sequence, as in
# git's previous_patch; a rename after a change reads the index (previous_patch skips renames),
# and a second creation passes git's check_patch: both are git's to decide.
@pytest.mark.parametrize("second,ours_alone", [
    (section("diff --git a/a.txt b/a.txt", "--- a/a.txt", "+++ b/a.txt", "@@ -1,2 +1,2 @@", "-LINE 1", "+Line 1",
             " line 2"), True),
    (section("diff --git a/a.txt b/m.txt", "similarity index 100%", "rename from a.txt", "rename to m.txt"), False),
    (section("diff --git a/a.txt b/m.txt", "similarity index 90%", "rename from a.txt", "rename to m.txt",
             "--- a/a.txt", "+++ b/m.txt", "@@ -1,2 +1,2 @@", "-line 1", "+Line 1", " line 2"), False),
])
def test_a_path_in_two_sections(upstream: Upstream, base: str, tmp_path: Path, second: bytes, ours_alone: bool):
    patch = section(*HEAD_A, *HUNK_A) + second
    assert (not any(f.needs_git for f in parse_patch(patch, series="s", name="p", where="p").files)) is ours_alone
    both(upstream, base, patch, tmp_path)


# apply.c find_header skips a 'diff --git' line with no header after it but keeps the names its
# parse_git_diff_header set: the next header may rely on them. git decides that section.
@pytest.mark.parametrize("patch", [
    section("diff --git a/a.txt b/a.txt", "diff --git a/a.txt b/a.txt ", "old mode 100644", "new mode 100755"),
    section("diff --git a/a.txt b/a.txt", "diff --git a/a.txt b/a.txt", "index 1234567..89abcde 100644",
            "+++ b/a.txt", *HUNK_A),
])
def test_names_a_skipped_header_leaves_behind(upstream: Upstream, base: str, tmp_path: Path, patch: bytes):
    ours, theirs = both(upstream, base, patch, tmp_path)
    assert ours.accepted and theirs.accepted


# Stricter than git, deliberately (docs/patches.md): a 'diff --git' name git's verify_path refuses
# is refused even where git takes the file's name from elsewhere.
@pytest.mark.parametrize("patch", [
    section("diff --git a/n.txt b/GIT~1/x", "new file mode 100644", "+++ b/n.txt", "@@ -0,0 +1 @@", "+x"),
    section("diff --git a/a.txt b/a.txt", "diff --git a/dir/ b/a.txt", "old mode 100644", "new mode 100755"),
])
def test_invalid_header_name_git_does_not_use_is_refused(upstream: Upstream, base: str, tmp_path: Path,
                                                         patch: bytes):
    ours, theirs = our_verdict(upstream.path, base, patch), git_verdict(upstream.path, base, patch, tmp_path)
    assert theirs.accepted
    assert ours.outcome == MALFORMED and "invalid path" in ours.message
