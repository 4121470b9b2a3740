"""The overlap report sees a patch that repeats another's change to a file (equal hunks), also
when the repeating patch only goes in by three-way merge."""

from __future__ import annotations

import json

from click.testing import CliRunner

from builder.cli import main
from builder.duplicates import find_duplicates
from builder.patches import parse_patch
from gitfixtures_rebase import lines, new_project


def test_a_prototype_repeating_part_of_the_bundle_is_reported(tmp_path):
    p = new_project(tmp_path)
    up = p.upstream
    f, g = lines(40, "f"), lines(10, "g")
    p.pin = up.commit("base", {"f.txt": f, "g.txt": g})

    def edit(text, *rows):
        for old, new in rows:
            text = text.replace(old, new)
        return text

    bundle = up.make_patch(p.pin, "bundle", {"f.txt": edit(f, ("f 5\n", "F5\n"), ("f 15\n", "F15\n"), ("f 25\n", "F25\n")),
                                             "g.txt": edit(g, ("g 2\n", "G2\n"))})
    # made on the pin too: repeats the bundle's 2nd and 3rd hunk of f.txt, and adds a change of its own
    proto = up.make_patch(p.pin, "prototype", {"f.txt": edit(f, ("f 15\n", "F15\n"), ("f 25\n", "F25\n"), ("f 35\n", "F35\n"))})
    # the same line changed differently: an overlap, not a duplicate
    other = up.make_patch(p.pin, "other", {"g.txt": edit(g, ("g 2\n", "other\n"))})
    p.entries = [("0001-bundle.patch", bundle), ("0002-proto.patch", proto), ("0003-other.patch", other)]
    p.write()
    result = CliRunner(mix_stderr=False).invoke(
        main, ["--stack", str(p.stack_file), "--work-dir", str(tmp_path / "work"), "--json", "check", "lab"])
    data = json.loads(result.stdout)
    src = data[0]["sources"][0]
    assert [x["outcome"] for x in src["patches"]][:2] == ["clean", "3way"]  # only by three-way on the bundle
    assert [d["text"] for d in src["duplicates"]] == [
        "duplicate: xpu/0002-proto.patch repeats xpu/0001-bundle.patch's change to f.txt, hunks 1..2"]
    assert src["duplicates"][0]["first_hunk"] == 1 and src["duplicates"][0]["last_hunk"] == 2

    table = CliRunner(mix_stderr=False).invoke(
        main, ["--stack", str(p.stack_file), "--work-dir", str(tmp_path / "work"), "check", "lab"])
    assert "duplicate: xpu/0002-proto.patch repeats xpu/0001-bundle.patch's change to f.txt, hunks 1..2" in table.stdout


def test_runs_of_hunks_and_single_hunks(tmp_path):
    p = new_project(tmp_path)
    up = p.upstream
    f = lines(60, "f")
    p.pin = up.commit("base", {"f.txt": f})
    a = up.make_patch(p.pin, "a", {"f.txt": f.replace("f 10\n", "X\n").replace("f 30\n", "Y\n").replace("f 50\n", "Z\n")})
    b = up.make_patch(p.pin, "b", {"f.txt": f.replace("f 10\n", "X\n").replace("f 20\n", "mine\n").replace("f 50\n", "Z\n")})
    pa, pb = (parse_patch(d, series="s", name=n, where=n) for d, n in ((a, "a.patch"), (b, "b.patch")))
    assert [d.text for d in find_duplicates([pa, pb])] == [
        "duplicate: s/b.patch repeats s/a.patch's change to f.txt, hunk 1",
        "duplicate: s/b.patch repeats s/a.patch's change to f.txt, hunk 3"]
    assert find_duplicates([pa]) == ()
