"""Nothing runs that the user did not ask for, nothing is left half-written, every error is one line.

Each test here is a row of docs/safety.md.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from builder.config import Source
from builder.settings import load_settings
from builder.sources import sync
from conftest import Upstream, sh, write_project
from test_core import LINES, body, run, stack_toml

EVIL = "--upload-pack=touch PWNED"


@pytest.fixture
def pinned(upstream: Upstream) -> str:
    return upstream.commit({"a.txt": LINES}, "base")


def project(tmp_path: Path, url: str | Path, pin: str, extra_top: str = "") -> Path:
    patch = {"patches/s1/one.patch": "", "patches/s1/series": ""}
    root = write_project(tmp_path / "proj", extra_top + stack_toml(Path(url) if not str(url).startswith("-") else url,
                                                                   pin), patch).parent
    return root


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


# ---- 1. no command through a git URL


@pytest.mark.parametrize("command", [["sources", "sync"], ["check"], ["apply", "demo"]])
def test_option_url_in_a_source_is_refused(tmp_path: Path, pinned: str, command: list[str], monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = project(tmp_path, EVIL, pinned)
    code, _, err = run(root, *command)
    assert code == 2, err
    assert "sources.up.url" in one_error_line(err) and "git option" in err
    assert not (tmp_path / "PWNED").exists() and not (root / "PWNED").exists()


def test_option_mirror_target_is_refused(tmp_path: Path, upstream: Upstream, pinned: str, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = project(tmp_path, upstream.path, pinned, extra_top=f'[mirrors]\n"{upstream.path}" = "{EVIL}"\n')
    code, _, err = run(root, "sources", "sync")
    assert code == 2 and "mirrors." in one_error_line(err), err
    (root / "stack.toml").write_text(stack_toml(upstream.path, pinned))
    monkeypatch.setenv("STACKBUILD_MIRRORS", f"{upstream.path}={EVIL}")
    code, _, err = run(root, "sources", "sync")
    assert code == 2 and "STACKBUILD_MIRRORS" in one_error_line(err), err
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("url,path", [(EVIL, "sub"), ("../sub", "-sub"), ("ext::sh -c touch% PWNED", "sub"),
                                      ("../sub", "../outside")])
def test_unsafe_gitmodules_entry_is_refused(tmp_path: Path, upstream: Upstream, monkeypatch, url: str, path: str):
    monkeypatch.chdir(tmp_path)
    sub = Upstream(tmp_path / "sub")
    sub_pin = sub.commit({"k.c": "int k;\n"}, "sub")
    upstream.write({".gitmodules": f'[submodule "evil"]\n\tpath = {path}\n\turl = {url}\n'})
    gitlink = "sub" if path.startswith("..") else path  # git itself refuses such an index entry
    sh("git", "update-index", "--add", "--cacheinfo", f"160000,{sub_pin},{gitlink}", cwd=upstream.path)
    sh("git", "add", ".gitmodules", cwd=upstream.path)
    sh("git", "commit", "-q", "-m", "evil submodule", cwd=upstream.path)
    pin = upstream.head()
    root = write_project(tmp_path / "proj", stack_toml(upstream.path, pin).replace(
        f'commit = "{pin}"', f'commit = "{pin}"\nsubmodules = true'), {"patches/s1/series": ""}).parent
    code, _, err = run(root, "sources", "sync")
    assert code == 5, err
    assert "submodule 'evil'" in one_error_line(err) and ".gitmodules" in err
    assert not (tmp_path / "PWNED").exists()


def test_git_ignores_the_users_global_config(tmp_path: Path, upstream: Upstream, pinned: str, hermetic: Path,
                                             monkeypatch):
    # A user's url.insteadOf must not change which repository a stack means.
    (hermetic / ".gitconfig").write_text(f'[url "{tmp_path}/nowhere/"]\n\tinsteadOf = {upstream.path.parent}/\n')
    # Nor may a surrounding hook's repository or one-off settings.
    monkeypatch.setenv("GIT_DIR", str(upstream.path / ".git"))
    monkeypatch.setenv("GIT_CONFIG_COUNT", "1")
    monkeypatch.setenv("GIT_CONFIG_KEY_0", f"url.{tmp_path}/nowhere/.insteadOf")
    monkeypatch.setenv("GIT_CONFIG_VALUE_0", f"{upstream.path.parent}/")
    settings = load_settings(None, work_dir=tmp_path / "work")
    assert sync(settings, Source("up", "git", url=str(upstream.path), commit=pinned)).commit == pinned


def patched_project(tmp_path: Path, upstream: Upstream, pin: str, new: str = "x") -> Path:
    files = {"patches/s1/one.patch": upstream.diff({"a.txt": body(l1=new)}), "patches/s1/series": "one.patch\n"}
    return write_project(tmp_path / "proj", stack_toml(upstream.path, pin), files).parent


# ---- 2. locks never follow a symlink and never outlive their command


def test_symlink_at_the_work_lock_is_refused(tmp_path: Path, upstream: Upstream, pinned: str):
    root = patched_project(tmp_path, upstream, pinned)
    precious = tmp_path / "precious"
    precious.write_text("keep me\n")
    (root / "work" / "demo").mkdir(parents=True)
    (root / "work" / "demo" / ".lock").symlink_to(precious)
    code, _, err = run(root, "apply", "demo")
    assert code == 7 and "symbolic link" in one_error_line(err), err
    assert precious.read_text() == "keep me\n"


def test_symlink_at_the_mirror_lock_is_refused(tmp_path: Path, upstream: Upstream, pinned: str):
    from builder.sources import mirror_path

    root = patched_project(tmp_path, upstream, pinned)
    settings = load_settings(None, work_dir=tmp_path / "work")
    git_dir = mirror_path(settings, Source("up", "git", url=str(upstream.path), commit=pinned))
    precious = tmp_path / "precious"
    precious.write_text("keep me\n")
    settings.mirror_dir.mkdir(parents=True)
    (settings.mirror_dir / f".{git_dir.name}.lock").symlink_to(precious)
    code, _, err = run(root, "sources", "sync")
    assert code == 7 and "symbolic link" in one_error_line(err), err
    assert precious.read_text() == "keep me\n"


def test_no_lock_left_after_a_failed_command(tmp_path: Path, upstream: Upstream, pinned: str):
    root = patched_project(tmp_path, upstream, pinned)
    code, _, err = run(root, "apply", "nope")
    assert code == 2, err
    assert not (root / "work" / "nope").exists()
    assert run(root, "apply", "demo")[0] == 0
    (root / "patches/s1/one.patch").write_bytes(upstream.diff({"a.txt": body(l1="x")}).replace(b"-line 1", b"-nothere"))
    code, _, err = run(root, "apply", "demo")
    assert code == 6, err
    assert not list((root / "work").rglob("*.lock"))
    assert not list(Path(os.environ["STACKBUILD_CACHE"]).rglob("*.lock"))


# ---- 6. every OSError, a malformed state file and an early Ctrl-C give one line


@pytest.fixture
def mount_tmpfs(tmp_path: Path):
    """A small tmpfs: a read-only or full disk, as only a real file system can make it."""
    mounted: list[Path] = []

    def make(name: str, options: str) -> Path:
        where = tmp_path / name
        where.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
        mounted.append(where)
        return where

    yield make
    for where in reversed(mounted):
        subprocess.run(["umount", str(where)], check=True)


def test_read_only_cache_is_one_line(tmp_path: Path, upstream: Upstream, pinned: str, mount_tmpfs, monkeypatch):
    root = patched_project(tmp_path, upstream, pinned)
    monkeypatch.setenv("STACKBUILD_CACHE", str(mount_tmpfs("cache", "size=1m,ro")))
    code, _, err = run(root, "sources", "sync")
    assert code == 15 and "read-only" in one_error_line(err), err


def test_read_only_work_dir_is_one_line(tmp_path: Path, upstream: Upstream, pinned: str, mount_tmpfs):
    root = patched_project(tmp_path, upstream, pinned)
    work = mount_tmpfs("work", "size=1m,ro")
    code, _, err = run(root, "--work-dir", str(work), "apply", "demo")
    assert code == 15 and "read-only" in one_error_line(err) and str(work) in err, err


def test_cache_path_that_is_a_file_is_one_line(tmp_path: Path, upstream: Upstream, pinned: str, monkeypatch):
    root = patched_project(tmp_path, upstream, pinned)
    (tmp_path / "cache-file").write_text("not a folder\n")
    monkeypatch.setenv("STACKBUILD_CACHE", str(tmp_path / "cache-file"))
    code, _, err = run(root, "sources", "sync")
    assert code == 15 and "cache-file" in one_error_line(err) and "move it away" in err, err


def test_full_disk_during_a_remote_patch_write(tmp_path: Path, mount_tmpfs, monkeypatch):
    from builder.config import PatchRef
    from builder.errors import FileError
    from builder.fsutil import sha256
    from builder.series import fetch_remote

    cache = mount_tmpfs("cache", "size=64k")
    fd = os.open(cache / "filler", os.O_WRONLY | os.O_CREAT)
    with pytest.raises(OSError):
        while True:
            os.write(fd, b"\0" * 4096)
    os.close(fd)
    data = b"--- a/x\n+++ b/x\n@@ -1 +1 @@\n-a\n+b\n" * 100
    (tmp_path / "big.patch").write_bytes(data)
    monkeypatch.setenv("STACKBUILD_CACHE", str(cache))
    settings = load_settings(None, work_dir=tmp_path / "work")
    ref = PatchRef(name="big.patch", strip=None, url=str(tmp_path / "big.patch"), sha256=sha256(data), where="x")
    with pytest.raises(FileError) as raised:
        fetch_remote(settings, ref)
    assert "full" in str(raised.value) and "big.patch" in str(raised.value)
    assert [p.name for p in cache.rglob("*") if p.is_file()] == ["filler"]


@pytest.mark.parametrize("text", ['{"sources": []}', '[]', '{"sources": {"up": {"head": 1}}}'])
def test_malformed_state_file_says_which_and_how_to_reset(tmp_path: Path, upstream: Upstream, pinned: str, text: str):
    root = patched_project(tmp_path, upstream, pinned)
    assert run(root, "apply", "demo")[0] == 0
    state = root / "work/demo/stackbuild-state.json"
    state.write_text(text)
    for command in (["apply", "demo"], ["status"]):
        code, _, err = run(root, *command)
        assert code == 6 and str(state) in one_error_line(err) and f"rm {state}" in err, (command, err)


@pytest.mark.parametrize("delay", [0.0, 0.02, 0.05])
def test_ctrl_c_while_loading_exits_130(tmp_path: Path, delay: float):
    # What the console script does, with a mark once stackbuild's first module is in: the
    # interpreter's own start before it is beyond any program's reach.
    script = "import sys, builder.launch as l; print('in', file=sys.stderr, flush=True); l.main()"
    proc = subprocess.Popen([sys.executable, "-c", script, "series"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stderr.readline() == b"in\n"
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert b"Traceback" not in err and len(err.decode().strip().splitlines()) == 1, err


# ---- 9, 10, 12: export keeps modes, checks trailer names, refuses a dirty worktree


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def applied(tmp_path: Path, upstream: Upstream, pin: str) -> tuple[Path, Path]:
    root = patched_project(tmp_path, upstream, pin)
    code, _, err = run(root, "apply", "demo")
    assert code == 0, err
    return root, root / "work/demo/up"


def test_export_keeps_file_modes(tmp_path: Path, upstream: Upstream, pinned: str, umask_022):
    root, wt = applied(tmp_path, upstream, pinned)
    series = root / "patches/s1/series"
    patch = root / "patches/s1/one.patch"
    series.chmod(0o664)
    patch.chmod(0o640)
    sh("git", "commit", "-q", "--amend", "-m", "one, reworded\n\nStackbuild-Patch: s1/one.patch", cwd=wt)
    (wt / "a.txt").write_text(body(l1="x", l3="three"))
    sh("git", "commit", "-q", "-am", "three", cwd=wt)
    code, _, err = run(root, "export", "demo")
    assert code == 0, err
    new = [p for p in (root / "patches/s1").iterdir() if p.name not in ("series", "one.patch")]
    assert len(new) == 1 and b"three" in new[0].read_bytes()
    assert b"reworded" in patch.read_bytes()
    assert (series.stat().st_mode & 0o777, patch.stat().st_mode & 0o777, new[0].stat().st_mode & 0o777) == \
        (0o664, 0o640, 0o644)


def test_rewritten_files_keep_their_mode(tmp_path: Path, umask_022):
    from builder.fsutil import commit_files
    from builder.fsutil import atomic_write

    kept, fresh, other = tmp_path / "stack.toml", tmp_path / "new.patch", tmp_path / "state.json"
    kept.write_text("old\n")
    kept.chmod(0o640)
    other.write_text("{}\n")
    other.chmod(0o604)
    commit_files({kept: b"new\n", fresh: b"patch\n"})
    atomic_write(other, b"[]\n")
    assert [p.stat().st_mode & 0o777 for p in (kept, fresh, other)] == [0o640, 0o644, 0o604]


@pytest.mark.parametrize("name", ["../../escaped.patch", "/tmp/absolute.patch"])
def test_trailer_names_are_checked_like_series_entries(tmp_path: Path, upstream: Upstream, pinned: str, name: str):
    root, wt = applied(tmp_path, upstream, pinned)
    (wt / "a.txt").write_text(body(l1="x", l3="three"))
    sh("git", "commit", "-q", "-am", f"three\n\nStackbuild-Patch: s1/{name}", cwd=wt)
    code, _, err = run(root, "export", "demo")
    assert code == 9 and "not a path inside the patch folder" in one_error_line(err), err
    assert not (root / "escaped.patch").exists() and not Path("/tmp/absolute.patch").exists()


def test_export_check_fails_on_a_dirty_worktree(tmp_path: Path, upstream: Upstream, pinned: str):
    root, wt = applied(tmp_path, upstream, pinned)
    assert run(root, "export", "demo")[0] == 0  # the hand-made diff becomes its canonical form
    assert run(root, "export", "demo", "--check")[0] == 0
    (wt / "a.txt").write_text(body(l1="x", l7="uncommitted"))
    code, _, err = run(root, "export", "demo", "--check")
    assert code == 9 and "uncommitted changes" in one_error_line(err), err


# ---- 7. nothing left behind by a failed fetch, fast-import or rebase --abort


def test_failed_fetch_leaves_no_partial_pack(tmp_path: Path):
    up = Upstream(tmp_path / "up")
    # Over fetch.unpackLimit objects, so git keeps the pack as a file while it arrives.
    pin = up.commit({**{f"f{i}": os.urandom(2000).hex() for i in range(150)}, "big": os.urandom(1 << 20).hex()}, "many")
    blob = sh("git", "rev-parse", f"{pin}:f99", cwd=up.path).strip()
    loose = up.path / ".git/objects" / blob[:2] / blob[2:]
    loose.chmod(0o644)
    loose.write_bytes(b"corrupt")
    settings = load_settings(None, work_dir=tmp_path / "work")
    from builder.errors import SourceError

    for _ in range(2):
        with pytest.raises(SourceError):
            sync(settings, Source("up", "git", url=str(up.path), commit=pin))
    assert not list(settings.mirror_dir.rglob("tmp_*"))
    assert not list(settings.mirror_dir.rglob("*.lock"))


def test_failed_fast_import_leaves_no_crash_report(tmp_path: Path):
    from builder.git import fast_import

    repo = tmp_path / "r.git"
    sh("git", "init", "-q", "--bare", repo)
    proc = fast_import(repo, ["fast-import", "--quiet"], b"commit refs/heads/x\nnonsense\n")
    assert proc.returncode != 0 and b"committer" in proc.stderr and b"crash report" not in proc.stderr
    assert not list(repo.glob("fast_import_crash_*"))


def test_rebase_abort_leaves_no_rebase_folder(tmp_path: Path, upstream: Upstream, pinned: str):
    root, wt = applied(tmp_path, upstream, pinned)
    onto = upstream.commit({"a.txt": body(l1="upstream took another way")}, "conflicting")
    code, _, err = run(root, "rebase", "demo", "--onto", onto)
    assert code == 8, err
    assert (root / "work/demo/.rebase").is_dir()
    code, _, err = run(root, "rebase", "demo", "--abort")
    assert code == 0, err
    assert not (root / "work/demo/.rebase").exists()


# ---- 8. hints that name the real cause


def test_full_work_disk_gets_the_disk_full_hint(tmp_path: Path, upstream: Upstream, pinned: str, mount_tmpfs):
    root = patched_project(tmp_path, upstream, pinned)
    work = mount_tmpfs("work", "size=256k")
    assert run(root, "--work-dir", str(work), "apply", "demo")[0] == 0
    big = upstream.diff({"a.txt": body(l1="x"), "big.txt": os.urandom(400_000).hex()})
    (root / "patches/s1/one.patch").write_bytes(big)
    code, _, err = run(root, "--work-dir", str(work), "apply", "demo")
    assert code == 6, err
    line = one_error_line(err)
    assert "disk is full" in line and "untracked file" not in line, err


def test_invalid_path_gets_its_own_hint(tmp_path: Path, upstream: Upstream, pinned: str):
    root = patched_project(tmp_path, upstream, pinned)
    patch = upstream.diff({"a.txt": body(l1="x"), "dir_file.txt": "x\n"}).replace(b"dir_file.txt", b"git~1/x.txt")
    (root / "patches/s1/one.patch").write_bytes(patch)
    code, _, err = run(root, "apply", "demo")
    # Refused as the patch is read (git's verify_path), before any worktree is touched.
    assert code == 4, err
    line = one_error_line(err)
    assert "invalid path 'git~1/x.txt'" in line and "untracked file" not in line, err


def test_git_errors_name_the_operation():
    from builder.git import operation

    assert operation(["-c", "checkout.workers=0", "read-tree", "-m", "-u", "a", "b"]) == "read-tree"
    assert operation(["--no-pager", "log"]) == "log"


@pytest.mark.parametrize("text,needle", [
    ('[stacks.x]\nextends = "y"\n[stacks.y]\nextends = "x"\n', "remove 'extends'"),
    ('[stacks.x]\nextends = "nope"\n', "defined stacks: x"),
])
def test_stack_errors_have_hints(tmp_path: Path, text: str, needle: str):
    root = write_project(tmp_path / "p", text).parent
    code, _, err = run(root, "series")
    assert code == 2 and needle in one_error_line(err), err


def test_series_path_error_has_a_hint(tmp_path: Path, upstream: Upstream, pinned: str):
    root = patched_project(tmp_path, upstream, pinned)
    (root / "patches/s1/series").write_text("../outside.patch\n")
    code, _, err = run(root, "check")
    assert code == 3 and "hint: name the file relative" in one_error_line(err), err


# ---- 11. credentials in URLs never reach a manifest, a plan, a log or an error line

SECRET_URL = "https://bob:s3cret@repo.example.invalid/simple"
REPO = Path(__file__).resolve().parent.parent


def test_build_args_with_credentials_are_redacted(tmp_path: Path, monkeypatch):
    from builder import build as B
    from builder import recipes as R
    from builder.config import load_config

    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/stackbuild-test.sock")
    monkeypatch.setenv("STACKBUILD_BUILD_ARG_EXTRA_INDEX", SECRET_URL)
    monkeypatch.setenv("STACKBUILD_DIST", str(tmp_path / "dist"))
    code, out, err = run(REPO, "--json", "build", "baseline", "--plan")
    assert code == 0, err
    assert "s3cret" not in out and "https://<redacted>@repo.example.invalid/simple" in out
    cfg = load_config(REPO / "stack.toml")
    resolved = cfg.stack("baseline")
    recipe = R.stack_recipe(cfg, resolved)
    source = resolved.sources[0]
    item = B.BuildInput(source, Path(), str(source.pin))
    done = [B.SourceResult(source.name, "k" * 64, True, 0.0, (), "sha256:img", None, None, "fake")]
    manifest = B.write_dist(load_settings(cfg), "baseline", [item], recipe,
                            {source.name: B._Job(item, R.parse_source_build(source))}, done, dist_dir=None, seconds=0.0)
    written = (tmp_path / "dist/baseline/manifest.json").read_text()
    assert "s3cret" not in written and "s3cret" not in json.dumps(manifest)
    assert json.loads(written)["sources"][0]["recipe"]["args"]["EXTRA_INDEX"] == \
        "https://<redacted>@repo.example.invalid/simple"


def test_redaction_keeps_a_bare_ssh_user():
    from builder.errors import redact_credentials

    assert redact_credentials("ssh://git@host/x and https://tok@host/y") == "ssh://git@host/x and https://<redacted>@host/y"


def test_source_url_credentials_are_redacted_in_errors(tmp_path: Path, pinned: str):
    root = write_project(tmp_path / "p", stack_toml("https://bob:s3cret@127.0.0.1:9/x.git", pinned),
                         {"patches/s1/series": ""}).parent
    code, out, err = run(root, "sources", "sync")
    assert code == 5, err
    assert "s3cret" not in err and "<redacted>@127.0.0.1:9" in one_error_line(err)


def test_option_ref_is_refused(tmp_path: Path, upstream: Upstream, pinned: str, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = patched_project(tmp_path, upstream, pinned)
    code, _, err = run(root, "check", "--at", f"up={EVIL}")
    assert code == 5 and "git option" in one_error_line(err), err
    assert not (tmp_path / "PWNED").exists()
