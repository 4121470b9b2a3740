"""The core end to end on repositories the tests build: outcomes, apply, check, status."""

from __future__ import annotations

import gzip
import base64
import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from builder.cli import main
from conftest import Upstream, sh, write_project

LINES = "".join(f"line {i}\n" for i in range(1, 41))


def body(**changes: str) -> str:
    """LINES with some lines replaced, by number: body(l5="five")."""
    out = []
    for i in range(1, 41):
        out.append(changes.get(f"l{i}", f"line {i}") + "\n")
    return "".join(out)


def stack_toml(url: Path, commit: str, series: str = "s1", extra: str = "") -> str:
    return f"""# the lab's stack
[sources.up]
url = "{url}"
commit = "{commit}"   # the pin

[series.{series}]
source = "up"
{extra}

[stacks.demo]
series = ["{series}"]
"""


def run(root: Path, *args: str, ok: bool | None = None) -> tuple[int, str, str]:
    runner = CliRunner(mix_stderr=False) if "mix_stderr" in CliRunner.__init__.__code__.co_varnames else CliRunner()
    res = runner.invoke(main, ["--stack", str(root / "stack.toml"), *args], catch_exceptions=False)
    stderr = getattr(res, "stderr", "") if hasattr(res, "stderr_bytes") and res.stderr_bytes is not None else ""
    if ok is True:
        assert res.exit_code == 0, (res.output, stderr)
    if ok is False:
        assert res.exit_code != 0, res.output
    return res.exit_code, res.output, stderr


def check_json(root: Path, *extra: str) -> tuple[int, dict]:
    code, out, _ = run(root, "check", "--format", "json", *extra)
    return code, json.loads(out)[0]


def outcomes(report: dict) -> list[str]:
    return [p["outcome"] for s in report["sources"] for p in s["patches"]]


@pytest.fixture
def project(tmp_path: Path, upstream: Upstream):
    """An upstream with one file, and a helper to write a project whose series holds PATCHES."""
    pin = upstream.commit({"a.txt": LINES, "b.txt": "b\n"}, "base")

    def make(patches: dict[str, bytes], series_text: str | None = None, extra: str = "", commit: str | None = None):
        root = tmp_path / "proj"
        files = {f"patches/s1/{name}": data for name, data in patches.items()}
        files["patches/s1/series"] = series_text if series_text is not None else "".join(f"{n}\n" for n in patches)
        write_project(root, stack_toml(upstream.path, commit or pin, extra=extra), files)
        return root

    make.pin = pin  # type: ignore[attr-defined]
    return make


def test_clean_offset_and_format_patch_identity(project, upstream: Upstream):
    one = upstream.format_patch({"a.txt": body(l5="five")}, "Make line five a word")
    two = upstream.diff({"a.txt": body(l30="thirty")})
    root = project({"0001-five.patch": one, "two.patch": two})
    code, report = check_json(root)
    assert code == 0 and outcomes(report) == ["clean", "clean"]
    # Upstream moves: two lines on top shift both hunks; check against the new commit says "offset".
    newer = upstream.commit({"a.txt": "new 1\nnew 2\n" + LINES}, "upstream adds lines")
    code, report = check_json(root, "--at", newer)
    assert code == 0 and outcomes(report) == ["offset", "offset"]
    assert report["sources"][0]["base"] == newer

    run(root, "apply", "demo", ok=True)
    wt = root / "work" / "demo" / "up"
    log = sh("git", "log", "--format=%an|%ae|%s|%b", "-2", cwd=wt)
    assert "Test Author|author@example.invalid|Make line five a word" in log
    assert "Stackbuild-Patch: s1/0001-five.patch" in log and "Stackbuild-Patch: s1/two.patch" in log
    assert (wt / "a.txt").read_text() == body(l5="five", l30="thirty")
    assert sh("git", "symbolic-ref", "HEAD", cwd=wt).strip() == "refs/heads/stackbuild/demo"


def test_apply_is_deterministic_and_rerun_is_a_noop(project, upstream: Upstream, tmp_path: Path):
    root = project({"one.patch": upstream.diff({"a.txt": body(l5="five")})})
    _, out, _ = run(root, "--json", "apply", "demo", ok=True)
    first = json.loads(out)
    assert first["sources"][0]["action"] == "created"
    _, out, _ = run(root, "--json", "apply", "demo", ok=True)
    again = json.loads(out)
    assert again["sources"][0]["action"] == "unchanged" and again["sources"][0]["head"] == first["sources"][0]["head"]
    # Same inputs elsewhere (another work dir) give the very same commit SHA.
    _, out, _ = run(root, "--work-dir", str(tmp_path / "other"), "--json", "apply", "demo", ok=True)
    assert json.loads(out)["sources"][0]["head"] == first["sources"][0]["head"]


def test_changed_patch_is_stale_then_updated(project, upstream: Upstream):
    root = project({"one.patch": upstream.diff({"a.txt": body(l5="five")})})
    run(root, "apply", "demo", ok=True)
    (root / "patches/s1/one.patch").write_bytes(upstream.diff({"a.txt": body(l5="FIVE")}))
    _, out, _ = run(root, "--json", "status", ok=True)
    row = json.loads(out)[0]
    assert row["stale"] and row["changed"] == ["s1/one.patch"]
    _, out, _ = run(root, "--json", "apply", "demo", ok=True)
    assert json.loads(out)["sources"][0]["action"] == "updated"
    assert (root / "work/demo/up/a.txt").read_text() == body(l5="FIVE")
    _, out, _ = run(root, "--json", "status", ok=True)
    assert json.loads(out)[0]["stale"] is False


def test_conflict_names_file_and_hunk_and_stops_at_last_good(project, upstream: Upstream):
    good = upstream.diff({"a.txt": body(l5="five")})
    bad = upstream.diff({"b.txt": "changed\n"}).replace(b"-b\n", b"-not what upstream has\n")
    after = upstream.diff({"a.txt": body(l30="thirty")})
    root = project({"good.patch": good, "bad.patch": bad, "after.patch": after})
    code, report = check_json(root)
    assert code == 6
    assert outcomes(report) == ["clean", "conflict", "clean"]  # check goes on past a failure
    failed = report["sources"][0]["patches"][1]["failed"]
    assert failed[0]["path"] == "b.txt" and failed[0]["hunk"] == 1 and failed[0]["header"].startswith("@@ -1")
    code, out, err = run(root, "--json", "apply", "demo")
    data = json.loads(out)
    assert code == 6 and data["error"]["error"] == "apply"
    assert "bad.patch does not apply" in data["error"]["message"] and "b.txt hunk #1" in data["error"]["message"]
    wt = root / "work/demo/up"
    assert (wt / "a.txt").read_text() == body(l5="five")  # the last good patch is there
    assert (wt / "b.txt").read_text() == "b\n"
    assert sh("git", "log", "--format=%s", "-1", cwd=wt).strip() == "Apply good.patch"
    _, out, _ = run(root, "--json", "status")
    assert json.loads(out)[0]["complete"] is False


def test_already_applied_and_three_way(project, upstream: Upstream):
    fix = upstream.diff({"a.txt": body(l10="ten")})
    # A patch whose context upstream changed right next to it: a plain apply fails, the blobs in
    # its index line let git merge it.
    near = upstream.diff({"a.txt": body(l20="twenty")})
    root = project({"fix.patch": fix, "near.patch": near})
    newer = upstream.commit({"a.txt": body(l10="ten", l23="upstream 23")}, "upstream takes the fix and edits 23")
    code, report = check_json(root, "--at", newer)
    assert outcomes(report) == ["already-applied", "3way"], report
    assert code == 0


def test_fuzz_is_refused_unless_allowed(project, upstream: Upstream):
    # A plain diff without index lines: no three-way merge possible, only fuzz.
    plain = upstream.diff({"a.txt": body(l20="twenty")})
    plain = b"\n".join(ln for ln in plain.split(b"\n") if not ln.startswith(b"index ")).replace(b"diff --git a/a.txt b/a.txt\n", b"")
    root = project({"plain.patch": plain})
    newer = upstream.commit({"a.txt": body(l17="upstream 17")}, "edit within the context")
    code, report = check_json(root, "--at", newer)
    assert code == 6 and outcomes(report) == ["fuzz"] and not report["sources"][0]["patches"][0]["ok"]
    code, report = check_json(root, "--at", newer, "--allow-fuzz", "1")
    assert code == 0 and outcomes(report) == ["fuzz"]
    root = project({"plain.patch": plain}, extra="fuzz = 2", commit=newer)
    code, report = check_json(root)
    assert code == 0 and outcomes(report) == ["fuzz"]


def test_new_deleted_renamed_mode_and_no_newline(project, upstream: Upstream):
    upstream.commit({"c.txt": "no newline", "d.sh": "echo\n"}, "more files")
    pin = upstream.head()
    sh("git", "mv", "b.txt", "b2.txt", cwd=upstream.path)
    (upstream.path / "b2.txt").write_text("b\nmore\n")
    os.chmod(upstream.path / "d.sh", 0o755)
    data = upstream.diff({"new/dir/n.txt": "new\n", "c.txt": "no newline\nnow", "a.txt": None}, "-M")
    root = project({"mixed.patch": data}, commit=pin)
    code, report = check_json(root)
    assert code == 0, report
    run(root, "apply", "demo", ok=True)
    wt = root / "work/demo/up"
    assert not (wt / "a.txt").exists() and not (wt / "b.txt").exists()
    assert (wt / "b2.txt").read_text() == "b\nmore\n"
    assert (wt / "new/dir/n.txt").read_text() == "new\n"
    assert (wt / "c.txt").read_bytes() == b"no newline\nnow"
    assert os.access(wt / "d.sh", os.X_OK)
    # The engine's tree equals what git's own apply makes of the same patch.
    tmp_index = {"GIT_INDEX_FILE": str(wt.parent / "idx")}
    env = {**os.environ, **tmp_index}
    import subprocess
    subprocess.run(["git", "read-tree", pin], cwd=upstream.path, env=env, check=True)
    subprocess.run(["git", "apply", "--cached"], input=data, cwd=upstream.path, env=env, check=True)
    tree = subprocess.run(["git", "write-tree"], cwd=upstream.path, env=env, capture_output=True, check=True).stdout.strip()
    assert sh("git", "rev-parse", "HEAD^{tree}", cwd=wt).strip() == tree.decode()


def test_binary_patch_goes_through_git(project, upstream: Upstream):
    data = upstream.diff({"img.bin": bytes(range(256)) * 4}, "--binary")
    root = project({"bin.patch": data})
    code, report = check_json(root)
    assert code == 0 and outcomes(report) == ["clean"]
    run(root, "apply", "demo", ok=True)
    assert (root / "work/demo/up/img.bin").read_bytes() == bytes(range(256)) * 4


def test_crlf_content_applies_but_crlf_headers_are_refused(project, upstream: Upstream):
    upstream.commit({"win.txt": "one\r\ntwo\r\n"}, "windows file")
    pin = upstream.head()
    content = upstream.diff({"win.txt": "one\r\nTWO\r\n"})
    root = project({"content.patch": content}, commit=pin)
    assert check_json(root)[0] == 0
    converted = content.replace(b"\n", b"\r\n")
    root = project({"converted.patch": converted}, commit=pin)
    code, out, _ = run(root, "--json", "check")
    err = malformed_verdict(out)
    assert code == 4
    assert "CRLF" in err and "converted.patch:1" in err and "dos2unix" in err


def malformed_verdict(out: str) -> str:
    """`check` reports a patch it cannot read in place: the first verdict's detail."""
    verdict = json.loads(out)[0]["sources"][0]["patches"][0]
    assert verdict["outcome"] == "malformed", verdict
    return verdict["detail"]


def test_overlap_report(project, upstream: Upstream):
    first = upstream.diff({"a.txt": body(l10="ten")})
    upstream.commit({"a.txt": body(l10="ten")}, "tmp")
    second = upstream.diff({"a.txt": body(l10="TEN", l11="eleven")})
    root = project({"first.patch": first, "second.patch": second})
    code, report = check_json(root)
    assert code == 0, report
    overlaps = report["sources"][0]["overlaps"]
    assert any(o["kind"] == "rewrites" and o["earlier"] == "s1/first.patch" and o["later"] == "s1/second.patch"
               and o["first_line"] == 10 for o in overlaps), overlaps


def test_junit_output(project, upstream: Upstream):
    root = project({"one.patch": upstream.diff({"a.txt": body(l5="five")}),
                    "bad.patch": upstream.diff({"b.txt": "x\n"}).replace(b"-b\n", b"-zzz\n")})
    code, out, _ = run(root, "check", "--format", "junit")
    assert code == 6
    assert 'tests="2"' in out and 'failures="1"' in out and "conflict" in out


def test_remote_patch_through_mirror_map(project, upstream: Upstream, tmp_path: Path, monkeypatch):
    data = upstream.diff({"a.txt": body(l7="seven")})
    served = tmp_path / "served"
    served.mkdir()
    (served / "seven.patch.gz.b64").write_bytes(base64.b64encode(gzip.compress(data)))
    import hashlib
    digest = hashlib.sha256(data).hexdigest()
    extra = f'patches = [{{ url = "https://patches.example.invalid/lab/seven.patch.gz.b64", sha256 = "{digest}" }}]'
    root = project({}, series_text="", extra=extra)
    code, out, _ = run(root, "--json", "check")
    assert code == 4 and "cannot fetch remote patch" in json.loads(out)["message"]
    monkeypatch.setenv("STACKBUILD_MIRRORS", f"https://patches.example.invalid/lab/={served}/")
    code, report = check_json(root)
    assert code == 0 and outcomes(report) == ["clean"]
    # Cached now: it works without the mirror, and is verified again on use.
    monkeypatch.delenv("STACKBUILD_MIRRORS")
    assert check_json(root)[0] == 0
    cached = next((Path(os.environ["STACKBUILD_CACHE"]) / "patches").rglob("seven.patch.gz.b64"))
    cached.write_bytes(base64.b64encode(gzip.compress(data + b" ")))
    code, out, _ = run(root, "--json", "check")
    assert code == 4 and "expected" in malformed_verdict(out)


def test_remote_hash_mismatch_is_refused(project, upstream: Upstream, tmp_path: Path, monkeypatch):
    served = tmp_path / "served"
    served.mkdir()
    (served / "x.patch").write_bytes(upstream.diff({"a.txt": body(l7="seven")}))
    extra = f'patches = [{{ url = "https://h.invalid/x.patch", sha256 = "{"0" * 64}" }}]'
    root = project({}, series_text="", extra=extra)
    monkeypatch.setenv("STACKBUILD_MIRRORS", f"https://h.invalid/={served}/")
    code, out, _ = run(root, "--json", "check")
    err = json.loads(out)
    assert code == 4 and "expected 000" in err["message"] and "refused" in err["hint"]
    assert not list((Path(os.environ["STACKBUILD_CACHE"]) / "patches").rglob("x.patch"))


def test_source_mirror_map_rewrites_git_url(project, upstream: Upstream, tmp_path: Path, monkeypatch):
    pin = upstream.head()
    root = tmp_path / "proj2"
    write_project(root, stack_toml(Path("https://git.example.invalid/up.git"), pin).replace(
        'url = "https:/', 'url = "https://'), {"patches/s1/series": ""})
    code, out, _ = run(root, "--json", "sources", "sync")
    assert code == 5 and "cannot be fetched" in json.loads(out)["message"]
    user_config = Path(os.environ["XDG_CONFIG_HOME"]) / "stackbuild" / "config.toml"
    user_config.parent.mkdir(parents=True)
    user_config.write_text(f'[mirrors]\n"https://git.example.invalid/up.git" = "{upstream.path}"\n')
    code, out, _ = run(root, "--json", "sources", "sync")
    assert code == 0 and json.loads(out)[0]["commit"] == pin


def test_dirty_worktree_is_never_overwritten(project, upstream: Upstream):
    root = project({"one.patch": upstream.diff({"a.txt": body(l5="five")})})
    run(root, "apply", "demo", ok=True)
    (root / "work/demo/up/a.txt").write_text("my unsaved work\n")
    (root / "patches/s1/one.patch").write_bytes(upstream.diff({"a.txt": body(l5="FIVE")}))
    code, out, _ = run(root, "--json", "apply", "demo")
    assert code == 6 and "uncommitted changes" in json.loads(out)["message"]
    assert (root / "work/demo/up/a.txt").read_text() == "my unsaved work\n"
    run(root, "apply", "demo", "--force", ok=True)
    assert (root / "work/demo/up/a.txt").read_text() == body(l5="FIVE")


def test_two_patches_sharing_hunks_merge_three_way(tmp_path: Path, upstream: Upstream):
    """The lab's shape: the CPU-KV prototype carries the promoted bundle's hunks in scheduler.py.

    On top of the bundle a plain apply of the prototype fails on that file; the three-way merge
    with the blobs named in its index lines succeeds, and the other files apply as they are.
    """
    sched = "".join(f"    step {i}\n" for i in range(1, 61))
    pin = upstream.commit({"vllm/v1/core/sched/scheduler.py": sched, "vllm/worker.py": "w\n" * 20}, "base")
    shared = {"vllm/v1/core/sched/scheduler.py": sched.replace("    step 20\n", "    step 20  # promoted\n")}
    bundle = upstream.format_patch({**shared, "vllm/other.py": "bundle\n"}, "promoted bundle")
    prototype = upstream.format_patch({**shared, "vllm/worker.py": "w\n" * 19 + "cpu kv\n"}, "cpu-kv prototype")
    root = tmp_path / "lab"
    write_project(root, f"""
[sources.vllm]
url = "{upstream.path}"
commit = "{pin}"
[series.promoted-vllm]
source = "vllm"
[series.cpu-kv]
source = "vllm"
[stacks.baseline]
series = ["promoted-vllm"]
[stacks.cpu-kv]
extends = "baseline"
series = ["cpu-kv"]
""", {"patches/promoted-vllm/series": "bundle.patch\n", "patches/promoted-vllm/bundle.patch": bundle,
      "patches/cpu-kv/series": "proto.patch\n", "patches/cpu-kv/proto.patch": prototype})
    code, out, _ = run(root, "--json", "check", "cpu-kv", "--format", "json")
    assert code == 0, out
    assert outcomes(json.loads(out)[0]) == ["clean", "3way"]
    run(root, "apply", "cpu-kv", ok=True)
    wt = root / "work/cpu-kv/vllm"
    assert (wt / "vllm/v1/core/sched/scheduler.py").read_text() == shared["vllm/v1/core/sched/scheduler.py"]
    assert (wt / "vllm/worker.py").read_text().endswith("cpu kv\n")


def test_new_file_under_a_file_or_over_a_folder_conflicts(project, upstream: Upstream):
    upstream.commit({"dir/inner.txt": "x\n"}, "a folder")
    pin = upstream.head()
    under_file = b"diff --git a/b.txt/x b/b.txt/x\nnew file mode 100644\n--- /dev/null\n+++ b/b.txt/x\n@@ -0,0 +1 @@\n+x\n"
    over_dir = b"diff --git a/dir b/dir\nnew file mode 100644\n--- /dev/null\n+++ b/dir\n@@ -0,0 +1 @@\n+x\n"
    root = project({"under.patch": under_file, "over.patch": over_dir}, commit=pin)
    code, report = check_json(root)
    assert code == 6 and outcomes(report) == ["conflict", "conflict"]
    reasons = [p["failed"][0]["reason"] for p in report["sources"][0]["patches"]]
    assert reasons == ["'b.txt' is a file", "file already exists"]


def test_check_at_a_branch_fetches_it(project, upstream: Upstream):
    root = project({"one.patch": upstream.diff({"a.txt": body(l5="five")})})
    run(root, "sources", "sync", ok=True)
    newer = upstream.commit({"a.txt": "top\n" + LINES}, "upstream moves on main")
    code, report = check_json(root, "--at", "origin/main")
    assert code == 0 and outcomes(report) == ["offset"] and report["sources"][0]["base"] == newer
    code, report = check_json(root, "--at", f"up={project.pin}")
    assert code == 0 and outcomes(report) == ["clean"]
    code, out, _ = run(root, "--json", "check", "--at", "origin/no-such-branch")
    assert code == 5 and "cannot fetch 'origin/no-such-branch'" in json.loads(out)["message"]


def test_a_failed_move_of_one_worktree_keeps_the_others_recognised(tmp_path: Path):
    """The second source's worktree refuses to move (an untracked file in the way) after the first
    moved: the first is recorded as moved, so the re-run after the fix needs no --force."""
    a, b = Upstream(tmp_path / "a"), Upstream(tmp_path / "b")
    pin_a, pin_b = a.commit({"a.txt": LINES}, "a"), b.commit({"b.txt": "b\n"}, "b")
    root = tmp_path / "proj"
    write_project(root, f"""
[sources.a]
url = "{a.path}"
commit = "{pin_a}"
[sources.b]
url = "{b.path}"
commit = "{pin_b}"
[series.sa]
source = "a"
[series.sb]
source = "b"
[stacks.two]
series = ["sa", "sb"]
""", {"patches/sa/series": "p.patch\n", "patches/sa/p.patch": a.diff({"a.txt": body(l3="three")}),
      "patches/sb/series": "p.patch\n", "patches/sb/p.patch": b.diff({"b.txt": "B\n"})})
    run(root, "apply", "two", ok=True)
    (root / "patches/sa/p.patch").write_bytes(a.diff({"a.txt": body(l3="THREE")}))
    (root / "patches/sb/p.patch").write_bytes(b.diff({"b.txt": "B\n", "new.txt": "new\n"}))
    (root / "work/two/b/new.txt").write_text("mine, untracked\n")
    code, out, _ = run(root, "--json", "apply", "two")
    assert code == 6 and "untracked file" in json.loads(out)["hint"]
    assert (root / "work/two/a/a.txt").read_text() == body(l3="THREE")  # a moved before b failed
    assert (root / "work/two/b/new.txt").read_text() == "mine, untracked\n"  # nothing of the user's lost
    (root / "work/two/b/new.txt").unlink()
    _, out, _ = run(root, "--json", "apply", "two", ok=True)
    actions = {s["source"]: s["action"] for s in json.loads(out)["sources"]}
    assert actions == {"a": "unchanged", "b": "updated"}
