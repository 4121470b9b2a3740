"""Mirrors: pins fetched by SHA, submodules mirrored too and present in the tree a build gets."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from builder.config import Source
from builder.errors import SourceError
from builder.settings import load_settings
from builder.sources import _child, has_commit, mirror_path, submodules_of, sync, tree_archive
from conftest import Upstream, sh


def test_submodules_are_mirrored_and_archived(tmp_path: Path, monkeypatch):
    kernels = Upstream(tmp_path / "kernels")
    kernels.commit({"csrc/kernel.cpp": "int k() { return 1; }\n"}, "kernels")
    top = Upstream(tmp_path / "top")
    top.commit({"setup.py": "print('top')\n"}, "top")
    sh("git", "-c", "protocol.file.allow=always", "submodule", "add", "-q", str(kernels.path), "third_party/kernels",
       cwd=top.path)
    pin = top.commit({}, "add the kernels submodule")
    settings = load_settings(None, work_dir=tmp_path / "work")
    source = Source("top", "git", url=str(top.path), commit=pin, submodules=True)
    synced = sync(settings, source)
    child_mirrors = [p for p in settings.mirror_dir.glob("top.third_party.kernels-*.git")]
    assert len(child_mirrors) == 1
    with tarfile.open(fileobj=io.BytesIO(tree_archive(settings, source, synced.git_dir, pin))) as tar:
        names = set(tar.getnames())
        assert "setup.py" in names and "third_party/kernels/csrc/kernel.cpp" in names
        assert tar.extractfile("third_party/kernels/csrc/kernel.cpp").read() == b"int k() { return 1; }\n"
    # Without submodules=true the folder stays as git archive leaves it: empty.
    plain = Source("top", "git", url=str(top.path), commit=pin)
    with tarfile.open(fileobj=io.BytesIO(tree_archive(settings, plain, mirror_path(settings, plain), pin))) as tar:
        assert "third_party/kernels/csrc/kernel.cpp" not in tar.getnames()


def test_sync_is_cheap_when_the_pin_is_there(tmp_path: Path, upstream: Upstream):
    pin = upstream.commit({"a": "1\n"}, "one")
    settings = load_settings(None, work_dir=tmp_path / "work")
    source = Source("up", "git", url=str(upstream.path), commit=pin)
    assert sync(settings, source).fetched is True
    assert sync(settings, source).fetched is False


def test_a_failed_submodule_sync_is_retried_by_the_next_sync(tmp_path: Path):
    kernels = Upstream(tmp_path / "kernels")
    kernel_pin = kernels.commit({"csrc/kernel.cpp": "int k() { return 1; }\n"}, "kernels")
    top = Upstream(tmp_path / "top")
    top.commit({"setup.py": "print('top')\n"}, "top")
    sh("git", "-c", "protocol.file.allow=always", "submodule", "add", "-q", str(kernels.path), "third_party/kernels",
       cwd=top.path)
    pin = top.commit({}, "add the kernels submodule")
    settings = load_settings(None, work_dir=tmp_path / "work")
    source = Source("top", "git", url=str(top.path), commit=pin, submodules=True)
    away = tmp_path / "kernels-away"
    kernels.path.rename(away)  # the submodule's server is down for the first sync
    with pytest.raises(SourceError, match=f"commit {kernel_pin}"):
        sync(settings, source)
    away.rename(kernels.path)
    assert sync(settings, source).fetched is True  # not the fast path: the superproject's pin alone is not enough
    child = _child(source, submodules_of(mirror_path(settings, source), pin)[0])
    assert has_commit(mirror_path(settings, child), kernel_pin)
    with tarfile.open(fileobj=io.BytesIO(tree_archive(settings, source, mirror_path(settings, source), pin))) as tar:
        assert "third_party/kernels/csrc/kernel.cpp" in tar.getnames()
    assert sync(settings, source).fetched is False
