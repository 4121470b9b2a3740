"""Canonical export: byte-for-byte round trips, no churn, --check, encodings, series and pin edits."""

from __future__ import annotations


import pytest

from builder import export as ex
from builder import patches as pt
from builder.errors import ExportError
from gitfixtures_rebase import lines, new_project, replay_old, run


def project(tmp_path, names=("0001-a.patch", "0002-b.patch.gz.b64")):
    p = new_project(tmp_path)
    up = p.upstream
    body = lines(20, "x")
    p.pin = up.commit("base", {"a.txt": body, "b.txt": body})
    p.entries = [
        (names[0], up.make_patch(p.pin, "xpu: a\n\nWhy a.", {"a.txt": body.replace("x 10\n", "A10\n")})),
        (names[1], up.make_patch(p.pin, "xpu: b", {"b.txt": body.replace("x 9\n", "B9\n")})),
    ]
    p.write()
    p.refresh_mirror()
    items = replay_old(p.mirror, p.pin, [(p.series, n, d) for n, d in p.entries])
    return p, items


def plan(p, head, **kw):
    return ex.plan_export(git_dir=p.mirror, base=p.pin, head=head, root=p.root, stack_file=p.stack_file, source="vllm",
                          series=(ex.SeriesSpec(p.series, p.patch_dir),), current=p.current(), **kw)


def test_round_trip_is_byte_for_byte_and_writes_nothing(tmp_path):
    p, items = project(tmp_path)
    before = p.snapshot()
    result = plan(p, items[-1].old_commit)
    assert [c.action for c in result.changes] == ["unchanged", "unchanged"]
    assert not result.writes and ex.check_failure([result]) is None
    ex.apply_export(result)
    assert p.snapshot() == before


def test_canonical_form_ignores_user_git_config(tmp_path, monkeypatch):
    p, items = project(tmp_path)
    expected = ex.canonical_patch(p.mirror, items[0].old_commit)
    cfg = tmp_path / "gitconfig"
    cfg.write_text("[diff]\n noprefix = true\n context = 7\n algorithm = patience\n"
                   "[format]\n signature = hi\n numbered = true\n[core]\n abbrev = 7\n")
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(cfg))
    assert ex.canonical_patch(p.mirror, items[0].old_commit) == expected
    assert b"Stackbuild-Patch" not in expected
    assert b"From 0000000000000000000000000000000000000000 Mon Sep 17 00:00:00 2001\n" in expected
    assert any(len(line.split(b"..")[0]) == 46 for line in expected.splitlines() if line.startswith(b"index "))


def test_check_fails_on_non_canonical_then_export_fixes_it_once(tmp_path):
    p, items = project(tmp_path)
    # The same change as a bare diff without headers: applies fine, but is not the canonical form.
    raw = (p.patch_dir / "0001-a.patch").read_bytes()
    (p.patch_dir / "0001-a.patch").write_bytes(raw[raw.index(b"diff --git"):])
    result = plan(p, items[-1].old_commit)
    err = ex.check_failure([result])
    assert isinstance(err, ExportError) and "xpu/0001-a.patch (rewritten)" in str(err)
    ex.apply_export(result)
    assert (p.patch_dir / "0001-a.patch").read_bytes() == raw
    first = p.snapshot()
    again = plan(p, items[-1].old_commit)
    assert ex.check_failure([again]) is None
    ex.apply_export(again)
    assert p.snapshot() == first


def test_moved_patch_not_rewritten_unless_refresh_context(tmp_path):
    p, items = project(tmp_path)
    up = p.upstream
    body = lines(20, "x")
    newer = up.commit("shift", {"a.txt": "top\n" + body})
    p.refresh_mirror()
    moved = replay_old(p.mirror, newer, [(p.series, "0001-a.patch", p.entries[0][1])])[0].old_commit
    result = ex.plan_export(git_dir=p.mirror, base=newer, head=moved, root=p.root, stack_file=p.stack_file, source="vllm",
                            series=(ex.SeriesSpec(p.series, p.patch_dir),), current={(p.series, "0001-a.patch"): p.entries[0][1]})
    assert [c.action for c in result.changes] == ["kept"]
    refreshed = ex.plan_export(git_dir=p.mirror, base=newer, head=moved, root=p.root, stack_file=p.stack_file,
                               source="vllm", series=(ex.SeriesSpec(p.series, p.patch_dir),),
                               current={(p.series, "0001-a.patch"): p.entries[0][1]}, refresh_context=True)
    assert [c.action for c in refreshed.changes] == ["rewritten"]
    assert b"@@ -8,7 +8,7 @@" in refreshed.writes[p.patch_dir / "0001-a.patch"]


def test_changed_commit_rewrites_in_original_encoding(tmp_path):
    p, items = project(tmp_path)
    wt = tmp_path / "wt"
    run(f"--git-dir={p.mirror}", "worktree", "add", "-q", "--detach", str(wt), items[-1].old_commit)
    (wt / "b.txt").write_text((wt / "b.txt").read_text().replace("B9", "B9-better"))
    run("commit", "-q", "-a", "--amend", "--no-edit", cwd=wt)
    head = run("rev-parse", "HEAD", cwd=wt)
    result = plan(p, head)
    assert [c.action for c in result.changes] == ["unchanged", "rewritten"]
    ex.apply_export(result)
    raw = (p.patch_dir / "0002-b.patch.gz.b64").read_bytes()
    assert b"+B9-better" in pt.decode(raw, "gz.b64", "t")
    assert ex.check_failure([plan(p, head)]) is None
    decoded = plan(p, head, decode_all=True)
    ex.apply_export(decoded)
    assert ex.series_entries((p.patch_dir / "series").read_text()) == ["0001-a.patch", "0002-b.patch"]
    assert b"+B9-better" in (p.patch_dir / "0002-b.patch").read_bytes()
    assert not (p.patch_dir / "0002-b.patch.gz.b64").exists()


def test_new_commit_without_trailer_becomes_a_new_entry(tmp_path):
    p, items = project(tmp_path)
    wt = tmp_path / "wt"
    run(f"--git-dir={p.mirror}", "worktree", "add", "-q", "--detach", str(wt), items[-1].old_commit)
    (wt / "c.txt").write_text("new\n")
    run("add", "c.txt", cwd=wt)
    run("commit", "-q", "-m", "xpu: Add C file!", cwd=wt)
    result = plan(p, run("rev-parse", "HEAD", cwd=wt))
    ex.apply_export(result)
    assert ex.series_entries((p.patch_dir / "series").read_text())[-1] == "xpu-add-c-file.patch"
    assert b"+new" in (p.patch_dir / "xpu-add-c-file.patch").read_bytes()


def test_foreign_trailer_is_an_error(tmp_path):
    p, items = project(tmp_path)
    wt = tmp_path / "wt"
    run(f"--git-dir={p.mirror}", "worktree", "add", "-q", "--detach", str(wt), items[-1].old_commit)
    run("commit", "-q", "--allow-empty", "-m", "x\n\nStackbuild-Patch: other/x.patch", cwd=wt)
    with pytest.raises(ExportError, match="series 'other' is not one of xpu"):
        plan(p, run("rev-parse", "HEAD", cwd=wt))


def test_plain_name_drops_the_encoding():
    assert ex.plain_name("0001-x.patch.gz.b64") == "0001-x.patch"
    assert ex.plain_name("0001-x.diff.b64") == "0001-x.diff"
    assert ex.plain_name("0001-x.gz") == "0001-x.patch"


def test_pin_move_keeps_comments_and_layout():
    text = ('# header\n[sources.vllm]  # the big one\nurl = "u"\ncommit = "' + "a" * 40 + '"   # v1\n\n'
            '[sources.other]\nother = { url = "v", commit = "' + "c" * 40 + '" }\n')
    moved = ex.move_pin(text, "vllm", "b" * 40)
    assert moved == text.replace("a" * 40, "b" * 40)
    with pytest.raises(ExportError, match="no 'commit' pin"):
        ex.move_pin(text, "missing", "b" * 40)


def test_series_file_edit_keeps_comments_and_options():
    text = "# top\n0001-a.patch -p1\n# mid\n0002-b.patch\n0003-c.patch.gz.b64\n"
    out = ex.edit_series_file(text, ["0001-a.patch", "0003-c.patch", "0004-d.patch"], {"0003-c.patch.gz.b64": "0003-c.patch"})
    assert out == "# top\n0001-a.patch -p1\n# mid\n0003-c.patch\n0004-d.patch\n"


def test_inline_series_in_stack_toml_is_edited_with_its_comments(tmp_path):
    p, items = project(tmp_path)
    text = p.stack_file.read_text().replace(
        '[series.xpu]\nsource = "vllm"\n',
        '[series.xpu]\nsource = "vllm"\npatches = [\n  "0001-a.patch",  # first\n  { file = "0002-b.patch.gz.b64" },\n]\n')
    p.stack_file.write_text(text)
    (p.patch_dir / "series").unlink()
    current = {(p.series, n): d for n, d in p.entries}
    spec = ex.SeriesSpec(p.series, p.patch_dir, inline=True)
    only_b = replay_old(p.mirror, p.pin, [(p.series, p.entries[1][0], p.entries[1][1])])[0].old_commit
    result = ex.plan_export(git_dir=p.mirror, base=p.pin, head=only_b, root=p.root, stack_file=p.stack_file,
                            source="vllm", series=(spec,), current=current, decode_all=True)
    ex.apply_export(result)
    toml = p.stack_file.read_text()
    assert '"0001-a.patch"' not in toml and 'file = "0002-b.patch"' in toml
    assert toml.startswith("# The lab's stack.") and "# only one for now" in toml
    assert (p.patch_dir / "0002-b.patch").is_file() and not (p.patch_dir / "0001-a.patch").exists()
