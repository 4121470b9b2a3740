"""The file-writing primitives every module shares: multi-file commits and published cache folders."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from builder import fsutil
from builder.errors import StackbuildError


def test_commit_files_writes_and_deletes(tmp_path):
    a, b = tmp_path / "a", tmp_path / "d" / "b"
    a.write_text("old")
    fsutil.commit_files({a: None, b: b"new"})
    assert not a.exists() and b.read_bytes() == b"new"
    assert [p.name for p in tmp_path.rglob("*.tmp")] == []
    assert os.listdir(tmp_path / "d") == ["b"]


def test_commit_files_changes_nothing_when_one_file_cannot_be_staged(tmp_path):
    kept, blocker = tmp_path / "kept", tmp_path / "blocker"
    kept.write_text("old")
    blocker.write_text("a file where a folder is needed")
    with pytest.raises(StackbuildError):
        fsutil.commit_files({kept: b"new", blocker / "x": b"y", tmp_path / "gone": None})
    assert kept.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker", "kept"]


def test_commit_files_keeps_the_mode_of_a_rewritten_file(tmp_path):
    script = tmp_path / "run.sh"
    script.write_text("old")
    script.chmod(0o755)
    fsutil.commit_files({script: b"new"})
    assert script.stat().st_mode & 0o777 == 0o755


def _ready(path: Path) -> bool:
    return (path / "done").is_file()


def test_publishing_makes_an_entry_once(tmp_path):
    final = tmp_path / "entry"
    with fsutil.publishing(final, "the entry", _ready) as staging:
        assert staging is not None and staging.parent == tmp_path and not final.exists()
        (staging / "done").write_text("1")
    assert (final / "done").read_text() == "1"
    assert final.stat().st_mode & 0o777 == 0o777 & ~_umask()
    with fsutil.publishing(final, "the entry", _ready) as again:
        assert again is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry"]


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def test_publishing_leaves_the_old_entry_when_the_maker_fails(tmp_path):
    final = tmp_path / "entry"
    final.mkdir()
    (final / "partial").write_text("a killed run's half")
    with pytest.raises(RuntimeError):
        with fsutil.publishing(final, "the entry", _ready) as staging:
            assert staging is not None
            (staging / "done").write_text("1")
            raise RuntimeError("maker failed")
    assert [p.name for p in final.iterdir()] == ["partial"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry"]


def test_publishing_replaces_an_incomplete_entry_and_clears_a_killed_stage(tmp_path):
    final = tmp_path / "entry"
    final.mkdir()
    (final / "partial").write_text("half")
    (tmp_path / ".entry.stage-killed").mkdir()
    with fsutil.publishing(final, "the entry", _ready) as staging:
        assert staging is not None
        assert not (tmp_path / ".entry.stage-killed").exists()
        (staging / "done").write_text("1")
    assert sorted(p.name for p in final.iterdir()) == ["done"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry"]


def test_two_processes_publishing_one_entry_make_it_once(tmp_path):
    """The second waits on the lock, then finds the entry the first made instead of making it again."""
    final, counter = tmp_path / "entry", tmp_path / "made"
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from builder import fsutil
        final, counter = Path({str(final)!r}), Path({str(counter)!r})
        with fsutil.publishing(final, "the entry", lambda p: (p / "done").is_file()) as staging:
            if staging is not None:
                with open(counter, "a") as fh:
                    fh.write("x")
                time.sleep(1.0)
                (staging / "done").write_text("1")
        print("ready" if (final / "done").is_file() else "missing")
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert outs == ["ready", "ready"]
    assert counter.read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry", "made"]
