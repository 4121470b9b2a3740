"""Release archives as deterministic git commits: local files, and sdists through a real
PEP 503 index served over HTTP by this test."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import subprocess
import tarfile
import threading
import zipfile
from pathlib import Path

import pytest

from builder import archives
from builder.config import Source
from builder.errors import SourceError
from builder.settings import Settings


@pytest.fixture(autouse=True)
def hermetic(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for var in ("PIP_INDEX_URL", "PIP_CONFIG_FILE"):
        monkeypatch.delenv(var, raising=False)


def settings(root: Path) -> Settings:
    return Settings(cache_dir=root / "cache", work_dir=root / "work", dist_dir=root / "dist", results_dir=root / "r")


def make_tar(path: Path, top: str = "pkg-1.0", files: dict | None = None) -> str:
    files = files or {"setup.py": b"print('hi')\n", "src/a.c": b"int a;\n", ".gitignore": b"*.c\nbuild/\n",
                      "build/keep.txt": b"ignored by .gitignore, kept by the import\n"}
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"{top}/{name}" if top else name)
            info.size = len(data)
            info.mtime = 1234567890
            tar.addfile(info, io.BytesIO(data))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def git(git_dir: Path, *args: str) -> str:
    return subprocess.run(["git", "--git-dir", str(git_dir), *args], capture_output=True, text=True, check=True).stdout


def test_same_archive_same_commit(tmp_path):
    sha = make_tar(tmp_path / "pkg-1.0.tar.gz")
    src = Source("pkg", "archive", archive=str(tmp_path / "pkg-1.0.tar.gz"), sha256=sha)
    git_dir, commit = archives.import_archive(settings(tmp_path / "one"), src)
    git_dir2, commit2 = archives.import_archive(settings(tmp_path / "two"), src)
    assert commit == commit2 and git_dir != git_dir2
    files = sorted(git(git_dir, "ls-tree", "-r", "--name-only", commit).split())
    assert files == [".gitignore", "build/keep.txt", "setup.py", "src/a.c"]  # top folder stripped, nothing ignored
    log = git(git_dir, "log", "-1", "--format=%an <%ae> %aI|%cn <%ce> %cI|%s", commit).strip()
    assert log == ("stackbuild <stackbuild@invalid> 2000-01-01T00:00:00+00:00|"
                   "stackbuild <stackbuild@invalid> 2000-01-01T00:00:00+00:00|Import pkg-1.0.tar.gz")


def test_second_call_uses_the_cache(tmp_path):
    sha = make_tar(tmp_path / "pkg-1.0.tar.gz")
    src = Source("pkg", "archive", archive="pkg-1.0.tar.gz", sha256=sha)
    s = settings(tmp_path)
    first = archives.import_archive(s, src, root=tmp_path)
    (tmp_path / "pkg-1.0.tar.gz").unlink()  # the original is gone; the cache answers
    assert archives.import_archive(s, src, root=tmp_path) == first


def test_no_top_folder_is_imported_as_is(tmp_path):
    sha = make_tar(tmp_path / "flat.tar.gz", top="", files={"a.txt": b"a\n", "b/c.txt": b"c\n"})
    git_dir, commit = archives.import_archive(settings(tmp_path), Source("f", "archive", archive=str(tmp_path / "flat.tar.gz"), sha256=sha))
    assert sorted(git(git_dir, "ls-tree", "-r", "--name-only", commit).split()) == ["a.txt", "b/c.txt"]


def test_zip_archive(tmp_path):
    path = tmp_path / "z-2.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("z-2/x.py", "x = 1\n")
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    git_dir, commit = archives.import_archive(settings(tmp_path), Source("z", "archive", archive=str(path), sha256=sha))
    assert git(git_dir, "show", f"{commit}:x.py") == "x = 1\n"


def test_wrong_sha256_leaves_nothing(tmp_path):
    make_tar(tmp_path / "pkg-1.0.tar.gz")
    s = settings(tmp_path)
    with pytest.raises(SourceError, match="sha256 is"):
        archives.import_archive(s, Source("pkg", "archive", archive=str(tmp_path / "pkg-1.0.tar.gz"), sha256="0" * 64))
    assert not [p for p in (s.cache_dir / "archives" / "files").rglob("*") if p.is_file()]


def test_unsafe_archive_is_refused(tmp_path):
    sha = make_tar(tmp_path / "evil.tar.gz", top="", files={"../escape.txt": b"x"})
    with pytest.raises(SourceError, match="cannot unpack"):
        archives.import_archive(settings(tmp_path), Source("e", "archive", archive=str(tmp_path / "evil.tar.gz"), sha256=sha))
    assert not (tmp_path / "cache" / "archives" / "escape.txt").exists()


@pytest.fixture()
def index(tmp_path):
    """A PEP 503 simple index over real HTTP, holding one sdist."""
    root = tmp_path / "index"
    (root / "simple" / "demo").mkdir(parents=True)
    (root / "files").mkdir()
    sha = make_tar(root / "files" / "demo-1.0.tar.gz", top="demo-1.0")
    (root / "simple" / "demo" / "index.html").write_text(
        f'<html><body><a href="../../files/demo-1.0.tar.gz#sha256={sha}">demo-1.0.tar.gz</a></body></html>')
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/simple/", sha
    server.shutdown()
    server.server_close()


def test_pypi_sdist_through_the_configured_index(tmp_path, index, monkeypatch):
    url, sha = index
    monkeypatch.setenv("PIP_INDEX_URL", url)
    s = settings(tmp_path)
    git_dir, commit = archives.import_archive(s, Source("demo", "pypi", pypi="demo==1.0"))
    assert "setup.py" in git(git_dir, "ls-tree", "--name-only", commit)
    assert git(git_dir, "log", "-1", "--format=%s", commit).strip() == "Import demo-1.0.tar.gz"
    # Same archive by path gives the same commit as by index.
    local = Source("demo", "archive", archive=str(tmp_path / "index" / "files" / "demo-1.0.tar.gz"), sha256=sha)
    assert archives.import_archive(settings(tmp_path / "other"), local)[1] == commit
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple/")  # nothing listens: the memo answers
    assert archives.import_archive(s, Source("demo", "pypi", pypi="demo==1.0"))[1] == commit


def test_pypi_pin_mismatch_and_missing_version(tmp_path, index, monkeypatch):
    url, _sha = index
    monkeypatch.setenv("PIP_INDEX_URL", url)
    with pytest.raises(SourceError, match="stack.toml pins"):
        archives.import_archive(settings(tmp_path), Source("demo", "pypi", pypi="demo==1.0", sha256="1" * 64))
    with pytest.raises(SourceError, match="no sdist of demo 2.0"):
        archives.import_archive(settings(tmp_path), Source("demo", "pypi", pypi="demo==2.0"))
    with pytest.raises(SourceError, match="no project 'absent'"):
        archives.import_archive(settings(tmp_path), Source("absent", "pypi", pypi="absent==1"))
