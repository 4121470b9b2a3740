"""Sources that are release archives: a tar/zip by URL or path, or a PyPI sdist.

Each archive becomes ONE git commit with a fixed identity and date, made from the unpacked tree
(a single top-level folder stripped), so the same archive always gives the same commit SHA and
patches apply to it like to any git source. Imports are cached by the archive's sha256.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import tempfile
import zipfile
from pathlib import Path
from urllib.parse import urlparse

import requests

from . import httpclient as http
from .config import PYPI_PIN_RE, Source
from .errors import SourceError
from .fsutil import atomic_write, locked, sha256_file
from .git import git
from .httpclient import pip_setting  # smoke reads the index URL through it too
from .settings import Settings

CHUNK = 1 << 20


def _git(args: list[str], *, env: dict | None = None) -> str:
    """The git runner's fixed identity and date make the import commit the same on every machine."""
    return git(args, env=env, hint="check disk space and that git is installed").stdout.decode().strip()


def index_url() -> str:
    from pypi_simple import PYPI_SIMPLE_ENDPOINT

    return pip_setting("index-url") or PYPI_SIMPLE_ENDPOINT


def _download(url: str, dest: Path, sha256: str, what: str) -> Path:
    """Fetches to a temp file beside `dest` and renames only after the hash checked out."""
    if dest.is_file() and sha256_file(dest) == sha256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    parsed = urlparse(url)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=".part-")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            if parsed.scheme in ("", "file"):
                with open(parsed.path if parsed.scheme else url, "rb") as src:
                    shutil.copyfileobj(src, out, CHUNK)
            else:
                with http.get(url, stream=True) as resp:
                    for block in resp.iter_content(CHUNK):
                        out.write(block)
        got = sha256_file(tmp)
        if got != sha256:
            raise SourceError(
                f"{what}: sha256 is {got}, expected {sha256}",
                where=url,
                hint="the file changed upstream or the pin is wrong; check it before updating sha256",
            )
        os.replace(tmp, dest)
        return dest
    except (OSError, requests.RequestException) as exc:
        raise SourceError(f"{what}: cannot fetch: {exc}", where=url, hint="check the URL/path and the network") from None
    finally:
        tmp.unlink(missing_ok=True)


def _pypi_sdist(settings: Settings, source: Source) -> tuple[str, str, str]:
    """(url, filename, sha256) of the pinned sdist, remembered so later calls need no network."""
    match = PYPI_PIN_RE.match(str(source.pypi))
    if not match:
        raise SourceError(f"'{source.pypi}' is not name==version", where=f"sources.{source.name}.pypi")
    project, version = match.groups()
    memo = settings.cache_dir / "archives" / "pypi" / f"{project}-{version}.json"
    if memo.is_file():
        data = json.loads(memo.read_text())
        if source.sha256 in (None, data["sha256"]):
            return data["url"], data["filename"], data["sha256"]
    from pypi_simple import NoSuchProjectError, PyPISimple

    endpoint = index_url()
    try:
        # Not `with`: leaving the client would close the shared session.
        page = PyPISimple(endpoint, session=http.session()).get_project_page(project, timeout=60)
    except NoSuchProjectError:
        raise SourceError(f"no project '{project}' on the index", where=f"{endpoint} (sources.{source.name})") from None
    except requests.RequestException as exc:
        raise SourceError(f"cannot read the index: {exc}", where=endpoint,
                          hint="check PIP_INDEX_URL / `pip config list` and the network") from None
    for package in page.packages:
        if package.package_type == "sdist" and package.version == version:
            sha = package.digests.get("sha256")
            if not sha:
                raise SourceError(f"the index gives no sha256 for {package.filename}", where=endpoint,
                                  hint=f"pin it: sha256 = ... in [sources.{source.name}]")
            if source.sha256 and source.sha256 != sha:
                raise SourceError(
                    f"{package.filename}: the index says sha256 {sha}, stack.toml pins {source.sha256}",
                    where=f"sources.{source.name}.sha256", hint="the release was replaced or the pin is wrong",
                )
            memo.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(memo, json.dumps({"url": package.url, "filename": package.filename, "sha256": sha}).encode())
            return package.url, package.filename, sha
    raise SourceError(f"no sdist of {project} {version} on the index", where=endpoint,
                      hint="check the version; only source releases (sdists) can be patched")


def fetch_archive(settings: Settings, source: Source, root: Path | None = None) -> tuple[Path, str]:
    """(local file, sha256) of the source's archive, downloaded and verified once."""
    if source.kind == "pypi":
        url, filename, sha = _pypi_sdist(settings, source)
    elif source.kind == "archive":
        location = settings.rewrite(str(source.archive))
        if "://" not in location and root is not None and not os.path.isabs(location):
            location = str(root / location)
        url, filename, sha = location, os.path.basename(urlparse(location).path) or "archive", str(source.sha256)
    else:
        raise SourceError(f"source '{source.name}' is a git source, not an archive", where=f"sources.{source.name}")
    path = _download(url, settings.cache_dir / "archives" / "files" / sha / filename, sha, f"source {source.name}")
    return path, sha


def _unpack(archive: Path, into: Path) -> Path:
    """Unpacks safely (no absolute paths, no escaping links) and returns the tree's root."""
    name = archive.name.lower()
    try:
        if name.endswith(".zip") or name.endswith(".whl"):
            with zipfile.ZipFile(archive) as zf:
                for info in zf.infolist():
                    target = (into / info.filename).resolve()
                    if not str(target).startswith(str(into.resolve()) + os.sep) and target != into.resolve():
                        raise SourceError(f"unsafe path {info.filename!r} in archive", where=str(archive))
                zf.extractall(into)
        else:
            with tarfile.open(archive) as tf:
                tf.extractall(into, filter="data")
    except (tarfile.TarError, zipfile.BadZipFile, OSError) as exc:
        raise SourceError(f"cannot unpack: {exc}", where=str(archive), hint="is it a tar or zip file?") from None
    entries = list(into.iterdir())
    return entries[0] if len(entries) == 1 and entries[0].is_dir() else into


def imported_commit(settings: Settings, source: Source) -> str | None:
    """The import commit when this archive is already in the cache, found without any network."""
    sha = source.sha256
    if source.kind == "pypi" and sha is None:
        match = PYPI_PIN_RE.match(str(source.pypi))
        memo = settings.cache_dir / "archives" / "pypi" / (f"{match.group(1)}-{match.group(2)}.json" if match else "-")
        sha = json.loads(memo.read_text())["sha256"] if memo.is_file() else None
    marker = settings.cache_dir / "archives" / "git" / f"{sha}.git" / "stackbuild-import"
    return marker.read_text().strip() if sha and marker.is_file() else None


def import_archive(settings: Settings, source: Source, root: Path | None = None) -> tuple[Path, str]:
    """(bare git dir, commit) holding the archive as one deterministic commit; cached by sha256."""
    path, sha = fetch_archive(settings, source, root)
    git_dir = settings.cache_dir / "archives" / "git" / f"{sha}.git"
    marker = git_dir / "stackbuild-import"
    if marker.is_file():
        return git_dir, marker.read_text().strip()
    git_dir.parent.mkdir(parents=True, exist_ok=True)
    # The repository is filled in place and the marker written last; the lock keeps a second
    # work dir of the same stack from adding to it meanwhile (it waits, then finds the marker).
    with locked(git_dir.parent / f".{git_dir.name}.lock", f"the import of {path.name}", wait=True):
        if marker.is_file():
            return git_dir, marker.read_text().strip()
        return _import(path, sha, git_dir, marker)


def _import(path: Path, sha: str, git_dir: Path, marker: Path) -> tuple[Path, str]:
    staging = Path(tempfile.mkdtemp(prefix=".import-", dir=git_dir.parent))
    try:
        (staging / "tree").mkdir()
        tree_root = _unpack(path, staging / "tree")
        if not git_dir.exists():
            _git(["init", "-q", "--bare", "--", str(staging / "repo.git")])
            os.replace(staging / "repo.git", git_dir)
        env = {"GIT_DIR": str(git_dir), "GIT_WORK_TREE": str(tree_root),
               "GIT_INDEX_FILE": str(staging / "index")}
        # -f: archives carry their own .gitignore, yet every file of the release must be kept.
        _git(["add", "-A", "-f"], env=env)
        tree = _git(["write-tree"], env=env)
        commit = _git(["commit-tree", "-m", f"Import {path.name}", tree], env=env)
        _git(["update-ref", f"refs/stackbuild/import/{sha}", commit], env=env)
        tmp_marker = staging / "marker"
        tmp_marker.write_text(commit + "\n")
        os.replace(tmp_marker, marker)
        return git_dir, commit
    finally:
        shutil.rmtree(staging, ignore_errors=True)
