"""Every bad input gets one clear line, its own exit code, and leaves nothing half-written."""

from __future__ import annotations

import base64
import gzip
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import Upstream, sh, write_project
from test_core import LINES, body, run, stack_toml


@pytest.fixture
def pinned(upstream: Upstream) -> str:
    return upstream.commit({"a.txt": LINES, "b.txt": "b\n"}, "base")


def project_with(tmp_path: Path, upstream: Upstream, pin: str, patches: dict[str, bytes], extra: str = "") -> Path:
    files = {f"patches/s1/{n}": d for n, d in patches.items()}
    files["patches/s1/series"] = "".join(f"{n}\n" for n in patches)
    return write_project(tmp_path / "proj", stack_toml(upstream.path, pin, extra=extra), files).parent


def error_of(root: Path, *args: str) -> tuple[int, dict]:
    code, out, _ = run(root, "--json", *args)
    data = json.loads(out)
    # `apply` prints its report with the error inside; other commands print the error alone.
    return code, data["error"] if isinstance(data.get("error"), dict) else data


@pytest.mark.parametrize("text,needle,line", [
    ("[sources.up\nurl = 1\n", "not valid TOML", None),
    ('[sources.up]\nurl = "x"\ncommit = "abc123"\n', "full 40-hex SHA", 3),
    ('[sources.up]\nurl = "x"\ncommit = "' + "g" * 40 + '"\n', "full 40-hex SHA", 3),
    ('[sources.up]\nurl = "x"\ncommit = "' + "a" * 40 + '"\nbranch = "main"\n', "unknown key 'branch'", 4),
    ('[stacks.x]\nseries = ["missing"]\n', "unknown series 'missing'", 2),
    ('[stacks.x]\nextends = "y"\n[stacks.y]\nextends = "x"\n', "cycle", None),
    ('[series.s]\nsource = "nope"\n', "unknown source 'nope'", 2),
    ('[sources.up]\nurl = "x"\ncommit = "' + "a" * 40 + '"\n[series.s]\nsource = "up"\ndirectory = "../etc"\n',
     "relative path inside the tree", 6),
    ('[sources.up]\narchive = "x.tar.gz"\n', "needs 'sha256'", None),
    ('[sources.up]\npypi = "vllm>=0.3"\nsha256 = "' + "a" * 64 + '"\n', "pin one exact release", 2),
    ('[series.s]\nsource = "up"\n[sources.up]\nurl = "x"\ncommit = "' + "a" * 40 + '"\n'
     '[stacks.a]\nseries = ["s"]\n[stacks.b]\nextends = "a"\nseries = ["s"]\n', "already in the stack", None),
])
def test_config_errors_name_file_line_and_key(tmp_path: Path, text: str, needle: str, line: int | None):
    root = tmp_path / "p"
    write_project(root, text)
    code, err = error_of(root, "series")
    assert code == 2, err
    assert needle in err["message"]
    assert err["where"].startswith(str(root / "stack.toml"))
    if line:
        assert f"stack.toml:{line} " in err["where"], err["where"]


def test_missing_stack_and_missing_file(tmp_path: Path):
    code, err = error_of(tmp_path / "nowhere", "series")
    assert code == 2 and "no stack file" in err["message"]


def test_series_file_errors(tmp_path: Path, upstream: Upstream, pinned: str):
    root = project_with(tmp_path, upstream, pinned, {"a.patch": upstream.diff({"a.txt": body(l1="x")})})
    (root / "patches/s1/series").write_text("a.patch\n\n# note\nmissing.patch -p1\n")
    code, err = error_of(root, "check")
    assert code == 3 and "missing.patch" in err["message"] and err["where"].endswith("series:4")
    (root / "patches/s1/series").write_text("a.patch\na.patch\n")
    code, err = error_of(root, "check")
    assert code == 3 and "listed twice" in err["message"] and err["where"].endswith("series:2")
    (root / "patches/s1/series").write_text("a.patch -R\n")
    code, err = error_of(root, "check")
    assert code == 3 and "unknown option '-R'" in err["message"]


def test_corrupt_encoded_patches(tmp_path: Path, upstream: Upstream, pinned: str):
    good = upstream.diff({"a.txt": body(l1="x")})
    bad_b64 = base64.b64encode(gzip.compress(good))[:-7] + b"!!!"
    root = project_with(tmp_path, upstream, pinned, {"x.patch.gz.b64": bad_b64})
    code, err = error_of(root, "apply", "demo")
    assert code == 4 and "corrupt base64" in err["message"] and "x.patch.gz.b64" in err["where"]
    code, out, _ = run(root, "--json", "check")  # check reports it in place, as `malformed`
    verdict = json.loads(out)[0]["sources"][0]["patches"][0]
    assert code == 4 and verdict["outcome"] == "malformed" and "corrupt base64" in verdict["detail"]
    truncated = base64.b64encode(gzip.compress(good)[:-10])
    (root / "patches/s1/x.patch.gz.b64").write_bytes(truncated)
    code, err = error_of(root, "apply", "demo")
    assert code == 4 and "corrupt gzip" in err["message"]


@pytest.mark.parametrize("patch,needle", [
    (b"", "patch is empty"),
    (b"just some words\nno diff here\n", "contains no diff"),
    (b"--- a/../../etc/passwd\n+++ b/../../etc/passwd\n@@ -1 +1 @@\n-x\n+y\n", "invalid path"),
    (b"--- /etc/passwd\n+++ /etc/passwd\n@@ -1 +1 @@\n-x\n+y\n", None),
    (b"diff --git a/.git/config b/.git/config\n--- a/.git/config\n+++ b/.git/config\n@@ -1 +1 @@\n-x\n+y\n", "invalid path"),
    (b"--- a/a.txt\n+++ b/a.txt\n@@ -1,3 +1,3 @@\n line 1\n-line 2\n", "corrupt patch at line"),
    (b"--- a/a.txt\n+++ b/a.txt\n@@ -1 +1 @@\n", "corrupt patch at line"),
    (b"--- a/a.txt\n+++ b/a.txt\n@@ bad @@\n-x\n", "patch with only garbage at line 3"),
    (b"diff --git a/i.png b/i.png\nindex 1111111..2222222 100644\nBinary files a/i.png and b/i.png differ\n",
     "binary change without its content"),
])
def test_unsafe_or_malformed_patches_are_refused(tmp_path: Path, upstream: Upstream, pinned: str, patch: bytes, needle):
    root = project_with(tmp_path, upstream, pinned, {"p.patch": patch})
    code, err = error_of(root, "apply", "demo")
    if needle is None:  # an absolute path with -p1 stays inside the tree: it names etc/passwd there
        # A patch that does not apply leaves the worktree at the last good commit: here the pin.
        assert code == 6 and "etc/passwd" in err["message"]
        assert sh("git", "rev-parse", "HEAD", cwd=root / "work/demo/up").strip() == pinned
    else:
        assert code == 4, err
        assert needle in err["message"]
        assert "p.patch" in err["where"]
        assert not (root / "work" / "demo" / "up").exists()


def test_symlink_traversal_is_refused(tmp_path: Path, upstream: Upstream):
    pin = upstream.commit({"a.txt": LINES}, "base")
    os.symlink("/tmp", upstream.path / "link")
    sh("git", "add", "link", cwd=upstream.path)
    sh("git", "commit", "-qm", "symlink", cwd=upstream.path)
    pin = upstream.head()
    patch = b"diff --git a/link/evil b/link/evil\nnew file mode 100644\n--- /dev/null\n+++ b/link/evil\n@@ -0,0 +1 @@\n+owned\n"
    root = project_with(tmp_path, upstream, pin, {"evil.patch": patch})
    code, err = error_of(root, "apply", "demo")
    assert code == 4 and "'link/evil' is beyond a symbolic link" in err["message"]
    # Like any patch that does not apply: the worktree stops at the last good commit, the pin.
    assert sh("git", "rev-parse", "HEAD", cwd=root / "work/demo/up").strip() == pin
    assert not (root / "work/demo/up/link/evil").exists()


def test_unknown_stack(tmp_path: Path, upstream: Upstream, pinned: str):
    root = project_with(tmp_path, upstream, pinned, {"p.patch": upstream.diff({"a.txt": body(l1="x")})})
    code, err = error_of(root, "apply", "nope")
    assert code == 2 and "no stack named 'nope'" in err["message"] and "demo" in err["hint"]


class HangingServer:
    """Accepts connections and never answers: a remote patch fetch that blocks until interrupted."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.accepted = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            self.accepted.set()

    def close(self) -> None:
        for c in self.conns:
            c.close()
        self.sock.close()


def _cli(root: Path, *args: str) -> subprocess.Popen:
    # A session of its own: a terminal's Ctrl-C reaches the whole group, and so does ours (killpg).
    return subprocess.Popen([sys.executable, "-m", "builder.cli", "--stack", str(root / "stack.toml"), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=Path(__file__).parent.parent,
                            start_new_session=True)


def test_ctrl_c_and_lock_leave_previous_state(tmp_path: Path, upstream: Upstream, pinned: str):
    root = project_with(tmp_path, upstream, pinned, {"one.patch": upstream.diff({"a.txt": body(l5="five")})})
    run(root, "apply", "demo", ok=True)
    wt = root / "work/demo/up"
    head_before = sh("git", "rev-parse", "HEAD", cwd=wt).strip()
    state_before = (root / "work/demo/stackbuild-state.json").read_bytes()
    server = HangingServer()
    try:
        digest = "a" * 64
        (root / "stack.toml").write_text(stack_toml(upstream.path, pinned, extra=(
            f'patches = ["one.patch", {{ url = "http://127.0.0.1:{server.port}/two.patch", sha256 = "{digest}" }}]')))
        proc = _cli(root, "apply", "demo")
        assert server.accepted.wait(30), proc.communicate(timeout=5)
        # A second stackbuild on the same work directory is told who holds it.
        second = _cli(root, "--json", "apply", "demo")
        out, _ = second.communicate(timeout=60)
        assert second.returncode == 7, out
        assert f"pid {proc.pid}" in json.loads(out)["message"]
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 130, err
        assert b"interrupted" in err
    finally:
        server.close()
    assert sh("git", "rev-parse", "HEAD", cwd=wt).strip() == head_before
    assert (root / "work/demo/stackbuild-state.json").read_bytes() == state_before
    assert sh("git", "status", "--porcelain", cwd=wt).strip() == ""
    assert not list((Path(os.environ["STACKBUILD_CACHE"]) / "patches").rglob("two.patch"))


def test_interrupt_during_replay_keeps_old_worktree(tmp_path: Path, upstream: Upstream, pinned: str):
    """Ctrl-C (to the whole process group, git children included) at many points of a longer
    apply: the worktree is always the old or the new state, never half moved."""
    patches = {}
    for i in range(1, 41):
        content = body(**{f"l{j}": f"patched {j}" for j in range(1, i + 1)})
        upstream.commit({"a.txt": content}, f"step {i}")
    # Cut one patch per step from the history the upstream fixture just made.
    log = sh("git", "rev-list", "--reverse", f"{pinned}..HEAD", cwd=upstream.path).split()
    for n, sha in enumerate(log, 1):
        patches[f"{n:03d}.patch"] = subprocess.run(["git", "format-patch", "--stdout", "--full-index", "-1", sha],
                                                   cwd=upstream.path, capture_output=True, check=True).stdout
    root = project_with(tmp_path, upstream, pinned, {"001.patch": patches["001.patch"]})
    run(root, "apply", "demo", ok=True)
    wt = root / "work/demo/up"
    old = (wt / "a.txt").read_text()
    (root / "patches/s1").joinpath("series").write_text("".join(f"{n}\n" for n in patches))
    for n, data in patches.items():
        (root / "patches/s1" / n).write_bytes(data)
    final = body(**{f"l{j}": f"patched {j}" for j in range(1, 41)})
    for delay in (0.05, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8):
        proc = _cli(root, "apply", "demo")
        time.sleep(delay)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        # -SIGINT: the signal came before Python installed its handler.
        assert proc.returncode in (0, 130, -signal.SIGINT), (proc.returncode, err.decode(errors="replace")[-2000:])
        text = (wt / "a.txt").read_text()
        assert text in (old, final)
        assert sh("git", "status", "--porcelain", "--untracked-files=no", cwd=wt).strip() == ""
        if proc.returncode == 0:
            assert text == final
            break
    run(root, "apply", "demo", ok=True)
    assert (wt / "a.txt").read_text() == final
