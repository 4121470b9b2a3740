"""`stackbuild vendor`: remote patches (file:// URL + sha256) into the patch folder, stack.toml
rewritten with its comments, then rebased and written back."""

from __future__ import annotations

import hashlib
import json
import tomllib

from click.testing import CliRunner

from builder import patches as pt
from builder.cli import main
from gitfixtures_rebase import lines, new_project, run

STACK = """\
# The lab's stack: the bundle comes from the lab's repository.
[sources.vllm]
url = "{url}"
commit = "{pin}"  # the pin

[series.lab]   # the lab's bundle
source = "vllm"
patches = [   # fetched by URL, pinned by sha256
  {{ url = "{base}/0001-a.patch.gz.b64", sha256 = "{sha_a}" }},  # the tuning
  "0002-local.patch",
  {{ url = "{base}/0003-e.patch", sha256 = "{sha_e}", strip = 1 }},
]
fuzz = 0  # never

[stacks.lab]
series = ["lab"]  # one for now
"""


def remote_project(tmp_path):
    p = new_project(tmp_path)
    up = p.upstream
    base = {n: lines(30, n) for n in ("a.txt", "b.txt", "e.txt")}
    p.pin = up.commit("base", base)
    a = up.make_patch(p.pin, "lab: a", {"a.txt": base["a.txt"].replace("a.txt 20\n", "A20\n")})
    b = up.make_patch(p.pin, "lab: b", {"b.txt": base["b.txt"].replace("b.txt 3\n", "B3\n")})
    e = up.make_patch(p.pin, "lab: e", {"e.txt": base["e.txt"].replace("e.txt 5\n", "ours\n")})
    served = tmp_path / "served"
    served.mkdir()
    (served / "0001-a.patch.gz.b64").write_bytes(pt.encode(a, "gz.b64"))
    (served / "0003-e.patch").write_bytes(e)
    (p.root / "patches" / "lab").mkdir(parents=True)
    (p.root / "patches" / "lab" / "0002-local.patch").write_bytes(b)
    p.stack_file.write_text(STACK.format(url=p.upstream.path, pin=p.pin, base=served.as_uri(),
                                         sha_a=hashlib.sha256(a).hexdigest(), sha_e=hashlib.sha256(e).hexdigest()))
    up.commit("shift a", {"a.txt": "new\n" + base["a.txt"]})
    onto = up.commit("rework e", {"e.txt": base["e.txt"].replace("e.txt 5\n", "theirs\n")})
    return p, served, {"a": a, "b": b, "e": e}, onto


def cli(p, tmp_path, *args):
    result = CliRunner(mix_stderr=False).invoke(
        main, ["--stack", str(p.stack_file), "--work-dir", str(tmp_path / "work"), "--json", *args])
    return result.exit_code, (json.loads(result.stdout) if result.stdout.strip() else None), result.stderr


def test_vendor_writes_files_series_and_keeps_every_comment(tmp_path):
    p, served, data, _ = remote_project(tmp_path)
    before = p.stack_file.read_text()
    code, out, err = cli(p, tmp_path, "vendor", "--stack", "lab")
    assert code == 0, err
    assert out["series"] == ["lab"] and out["stack_file_changed"]
    assert [(v["name"], v["action"]) for v in out["patches"]] == [("0001-a.patch", "written"), ("0003-e.patch", "written")]
    folder = p.root / "patches" / "lab"
    # decoded to plain .patch: the bytes the sha256 pins
    assert (folder / "0001-a.patch").read_bytes() == data["a"]
    assert (folder / "0003-e.patch").read_bytes() == data["e"]
    series = (folder / "series").read_text().splitlines()
    assert series[1:] == [
        f"0001-a.patch  # vendored from {served.as_uri()}/0001-a.patch.gz.b64 sha256 {hashlib.sha256(data['a']).hexdigest()}",
        "0002-local.patch",
        f"0003-e.patch -p1  # vendored from {served.as_uri()}/0003-e.patch sha256 {hashlib.sha256(data['e']).hexdigest()}",
    ]
    after = p.stack_file.read_text()
    # Every line of the old file is still there: unchanged, or commented out under a note.
    for line in before.splitlines():
        assert line in after or f"# {line.strip()}" in after, line
    assert "# patches vendored by `stackbuild vendor` into patches/lab/series" in after
    assert "fuzz = 0  # never" in after and "[series.lab]   # the lab's bundle" in after
    parsed = tomllib.loads(after)
    assert "patches" not in parsed["series"]["lab"] and parsed["series"]["lab"]["fuzz"] == 0
    # the stack now reads the local files, and still applies
    code, check, err = cli(p, tmp_path, "check", "lab")
    assert code == 0, err
    assert [x["patch"] for x in check[0]["sources"][0]["patches"]] == [
        "lab/0001-a.patch", "lab/0002-local.patch", "lab/0003-e.patch"]

    # Idempotent: a second run finds nothing remote and writes nothing.
    snapshot = p.snapshot()
    code, out, err = cli(p, tmp_path, "vendor", "lab")
    assert code == 0, err
    assert out["series"] == [] and out["already_local"] == ["lab"] and not out["stack_file_changed"]
    assert p.snapshot() == snapshot


def test_keep_encoding_keeps_the_served_bytes(tmp_path):
    p, served, _, _ = remote_project(tmp_path)
    code, out, err = cli(p, tmp_path, "vendor", "lab", "--keep-encoding")
    assert code == 0, err
    assert (p.root / "patches/lab/0001-a.patch.gz.b64").read_bytes() == (served / "0001-a.patch.gz.b64").read_bytes()
    assert (p.root / "patches/lab/series").read_text().splitlines()[1].startswith("0001-a.patch.gz.b64  # vendored")


def test_vendor_refuses_local_edits_and_finishes_an_interrupted_run(tmp_path):
    p, _, data, _ = remote_project(tmp_path)
    toml = p.stack_file.read_text()
    edited = p.root / "patches" / "lab" / "0003-e.patch"
    edited.write_bytes(data["e"].replace(b"+ours", b"+mine"))
    snapshot = p.snapshot()
    code, out, err = cli(p, tmp_path, "vendor", "lab")
    assert code == 3 and "patches/lab/0003-e.patch exists with other content" in err
    assert "never overwrites" in out["hint"]
    assert p.snapshot() == snapshot  # nothing written, not even the other patch

    # A run killed after the patch files and series file but before stack.toml: the same as a
    # finished run with the old stack.toml put back. Running it again accepts its own files.
    edited.unlink()
    code, _, err = cli(p, tmp_path, "vendor", "lab")
    assert code == 0, err
    vendored = p.snapshot()
    p.stack_file.write_text(toml)
    code, out, err = cli(p, tmp_path, "vendor", "lab")
    assert code == 0, err
    assert [v["action"] for v in out["patches"]] == ["unchanged", "unchanged"] and out["stack_file_changed"]
    assert p.snapshot() == vendored

    # a series file of someone else's beside an inline list is not overwritten either
    p.stack_file.write_text(toml)
    (p.root / "patches/lab/series").write_text("0002-local.patch\n")
    code, _, err = cli(p, tmp_path, "vendor", "lab")
    assert code == 3 and "exists beside them with other content" in err


def test_a_hash_mismatch_vendors_nothing(tmp_path):
    p, served, data, _ = remote_project(tmp_path)
    (served / "0003-e.patch").write_bytes(data["e"] + b" ")
    snapshot = p.snapshot()
    code, out, err = cli(p, tmp_path, "vendor", "lab")
    assert code == 4 and "expected" in out["message"]
    assert p.snapshot() == snapshot


def test_vendored_then_rebased_and_written_back(tmp_path):
    p, _, _, onto = remote_project(tmp_path)
    code, out, err = cli(p, tmp_path, "rebase", "lab", "--onto", onto)
    assert code == 8 and "cannot be written back to its URL" not in err  # stops at the conflict first
    code, _, err = cli(p, tmp_path, "rebase", "--abort")
    assert code == 0, err
    code, _, err = cli(p, tmp_path, "vendor", "lab")
    assert code == 0, err
    code, out, err = cli(p, tmp_path, "rebase", "lab", "--onto", onto)
    assert code == 8 and out["stopped_at"]["conflicted_files"] == ["e.txt"]
    wt = tmp_path / "work" / "lab" / "vllm"
    (wt / "e.txt").write_text(lines(30, "e.txt").replace("e.txt 5\n", "both\n"))
    run("add", "e.txt", cwd=wt)
    code, out, err = cli(p, tmp_path, "rebase", "--continue")
    assert code == 0, err
    assert out["status"] == "finished"
    e = (p.root / "patches/lab/0003-e.patch").read_bytes()
    assert b"+both" in e and b"-theirs" in e
    toml = p.stack_file.read_text()
    assert f'commit = "{onto}"  # the pin' in toml and toml.startswith("# The lab's stack")
    assert "#   { url = " in toml  # the provenance survived the pin move
    code, _, err = cli(p, tmp_path, "export", "lab", "--check")
    assert code == 0, err  # the written-back bytes are the canonical export


def test_vendor_needs_series_or_a_stack(tmp_path):
    p, _, _, _ = remote_project(tmp_path)
    code, out, err = cli(p, tmp_path, "vendor")
    assert code == 2 and "--stack" in out["hint"] and err.count("\n") == 1
    code, out, _ = cli(p, tmp_path, "vendor", "nope")
    assert code == 2 and "no series named 'nope'" in out["message"]
