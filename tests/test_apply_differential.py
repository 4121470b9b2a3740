"""Our hunk applier against `git apply` itself, on generated files, edits and drifted targets.

Both must produce the same bytes, or both must refuse. Files are drawn from a small alphabet so
context lines repeat and the nearest-match search order matters.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings, strategies as st

from builder.hunks import FileState, apply_hunks
from builder.patches import split_lf
from builder.patches import parse_patch

LINE = st.sampled_from([b"a\n", b"b\n", b"c\n", b"d\n", b"{\n", b"}\n", b"x = 1\n", b"\n", b"crlf\r\n"])
FILE = st.lists(LINE, min_size=0, max_size=30).map(b"".join)


def _no_final_newline(data: bytes, drop: bool) -> bytes:
    return data[:-1] if drop and data.endswith(b"\n") else data


@st.composite
def scenario(draw):
    base = _no_final_newline(draw(FILE), draw(st.booleans()))
    lines = split_lf(base)
    edited = list(lines)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["insert", "delete", "replace"]))
        pos = draw(st.integers(0, len(edited)))
        if op == "insert":
            edited[pos:pos] = draw(st.lists(LINE, min_size=1, max_size=3))
        elif edited and pos < len(edited):
            edited[pos:pos + 1] = [] if op == "delete" else [draw(LINE)]
    new = _no_final_newline(b"".join(edited), draw(st.booleans()))
    drift = list(lines)
    for _ in range(draw(st.integers(0, 3))):
        pos = draw(st.integers(0, len(drift)))
        if draw(st.booleans()):
            drift[pos:pos] = draw(st.lists(LINE, min_size=1, max_size=4))
        elif drift and pos < len(drift):
            del drift[pos]
    target = b"".join(drift) if draw(st.booleans()) else base
    context = draw(st.integers(1, 3))
    return base, new, target, context


def _git_diff(base: bytes, new: bytes, context: int, tmp: Path) -> bytes:
    (tmp / "a").mkdir(exist_ok=True)
    (tmp / "b").mkdir(exist_ok=True)
    (tmp / "a" / "f.txt").write_bytes(base)
    (tmp / "b" / "f.txt").write_bytes(new)
    proc = subprocess.run(["git", "diff", "--no-index", "--no-prefix", f"-U{context}", "a/f.txt", "b/f.txt"], cwd=tmp,
                          capture_output=True)
    return proc.stdout


def _git_apply(target: bytes, patch: bytes, tmp: Path) -> bytes | None:
    work = tmp / "w"
    work.mkdir(exist_ok=True)
    (work / "f.txt").write_bytes(target)
    (tmp / "p.diff").write_bytes(patch)
    proc = subprocess.run(["git", "apply", "--whitespace=nowarn", str(tmp / "p.diff")], cwd=work, capture_output=True)
    return (work / "f.txt").read_bytes() if proc.returncode == 0 else None


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenario())
def test_same_result_as_git_apply(case):
    base, new, target, context = case
    if base == new:
        return
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        patch_bytes = _git_diff(base, new, context, tmp)
        expected = _git_apply(target, patch_bytes, tmp)
    patch = parse_patch(patch_bytes, series="s", name="p", where="p")
    (diff,) = patch.files
    lines = split_lf(target)
    state, _offset, _fuzz, failed = apply_hunks(FileState("100644", lines, [None] * len(lines)), diff.hunks, 0,
                                                "p", diff.path, None)
    ours = None if state is None else b"".join(state.lines)
    assert ours == expected, (patch_bytes, target)


NAMES = st.sampled_from(["a.txt", "b.txt", "sub/c.txt", "sub/deep/d.txt", "e.sh"])


@st.composite
def tree_scenario(draw):
    """A small tree, a change to it (edits, new, deleted, renamed files, mode flips), a drifted target."""
    base = {name: draw(FILE) for name in draw(st.sets(NAMES, min_size=1, max_size=4))}
    new = dict(base)
    modes = {}
    for name in list(base):
        action = draw(st.sampled_from(["keep", "edit", "delete", "rename", "chmod"]))
        if action == "edit":
            lines = split_lf(new[name])
            pos = draw(st.integers(0, len(lines)))
            lines[pos:pos + draw(st.integers(0, 2))] = draw(st.lists(LINE, max_size=3))
            new[name] = _no_final_newline(b"".join(lines), draw(st.booleans()))
        elif action == "delete":
            del new[name]
        elif action == "rename":
            target = f"renamed/{name.replace('/', '_')}"
            new[target] = new.pop(name)
        elif action == "chmod":
            modes[name] = 0o755
    for name in draw(st.sets(NAMES, max_size=2)):
        if name not in base:
            new[name] = draw(FILE)
    target = dict(base)
    for name in list(target):
        if draw(st.booleans()):
            lines = split_lf(target[name])
            pos = draw(st.integers(0, len(lines)))
            lines[pos:pos] = draw(st.lists(LINE, min_size=1, max_size=2))
            target[name] = b"".join(lines)
    return base, new, modes, target


def _commit_tree(repo: Path, files: dict[str, bytes], modes: dict[str, int]) -> str:
    for path in repo.iterdir():
        if path.name != ".git":
            subprocess.run(["rm", "-rf", str(path)], check=True)
    for name, data in files.items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_bytes(data)
        (repo / name).chmod(modes.get(name, 0o644))
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run(["git", "commit", "-q", "--allow-empty", "-m", "t"], cwd=repo, check=True)
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, check=True).stdout.decode().strip()


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree_scenario())
def test_whole_patches_same_tree_as_git_apply(case):
    from builder.replay import Replayer

    base, new, modes, target = case
    with tempfile.TemporaryDirectory() as tmp_name:
        repo = Path(tmp_name) / "r"
        repo.mkdir()
        subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
        base_commit = _commit_tree(repo, base, {})
        new_commit = _commit_tree(repo, new, modes)
        patch_bytes = subprocess.run(["git", "diff", "--full-index", "-M", base_commit, new_commit], cwd=repo,
                                     capture_output=True, check=True).stdout
        if not patch_bytes:
            return
        target_commit = _commit_tree(repo, target, {})
        env = {**os.environ, "GIT_INDEX_FILE": str(Path(tmp_name) / "idx")}
        subprocess.run(["git", "read-tree", target_commit], cwd=repo, env=env, check=True)
        proc = subprocess.run(["git", "apply", "--cached"], input=patch_bytes, cwd=repo, env=env, capture_output=True)
        expected = None
        if proc.returncode == 0:
            expected = subprocess.run(["git", "write-tree"], cwd=repo, env=env, capture_output=True,
                                      check=True).stdout.decode().strip()
        patch = parse_patch(patch_bytes, series="s", name="p", where="p")
        replayer = Replayer(repo / ".git", target_commit, paths=patch.paths)
        try:
            writes, failed, _, _ = replayer._try(patch, patch.files, 0, False)
            ours = None
            if not failed:
                replayer._record(patch, writes)
                replayer.flush()
                ours = subprocess.run(["git", "rev-parse", f"{replayer.head}^{{tree}}"], cwd=repo, capture_output=True,
                                      check=True).stdout.decode().strip()
        finally:
            replayer.close()
        assert ours == expected, patch_bytes
