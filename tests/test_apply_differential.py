"""Our hunk applier against `git apply` itself, on generated files, edits and drifted targets.

Both must produce the same bytes, or both must refuse. Files are drawn from a small alphabet so
context lines repeat and the nearest-match search order matters.
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings, strategies as st

from builder.apply import _FileState, apply_hunks
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
    state, _offset, _fuzz, failed = apply_hunks(_FileState("100644", lines, [None] * len(lines)), diff.hunks, 0,
                                                "p", diff.path, None)
    ours = None if state is None else b"".join(state.lines)
    assert ours == expected, (patch_bytes, target)
