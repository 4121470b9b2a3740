"""Quilt series files, remote patches, and the ordered patches of a stack.

A series file lists one patch per line, optionally followed by `-pN`; `#` starts a comment.
Remote patches (URL + sha256 of the decoded bytes) are fetched once into the cache and verified
on every use, through the mirror map, so an offline host can serve them from a local folder.
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import requests

from . import httpclient as http
from .config import Config, PatchRef, ResolvedStack, Series
from .errors import PatchError, SeriesError
from .fsutil import atomic_write, sha256
from .patches import Header, Patch, decode, encoding_of, read_patch_file
from .settings import Settings

STRIP_RE = re.compile(r"^-p(\d+)$")


@dataclass(frozen=True)
class SeriesEntry:
    name: str
    strip: int | None
    line: int


def inside_patch_dir(name: str) -> bool:
    """A series entry (or a trailer naming one) must stay in its patch folder."""
    return bool(name) and not name.startswith("/") and ".." not in Path(name).parts and "\0" not in name


def parse_series_text(text: str, where: str) -> list[SeriesEntry]:
    entries: list[SeriesEntry] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split(" #", 1)[0].split("\t#", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        name, *opts = line.split()
        strip = None
        for opt in opts:
            m = STRIP_RE.match(opt)
            if not m:
                raise SeriesError(f"unknown option '{opt}' after {name}", where=f"{where}:{number}",
                                  hint="quilt series lines take only '-pN'")
            strip = int(m.group(1))
        if not inside_patch_dir(name):
            raise SeriesError(f"'{name}' must be a path inside the patch folder", where=f"{where}:{number}",
                              hint="name the file relative to the series file's folder: no '..', no leading '/'")
        if name in seen:
            raise SeriesError(f"'{name}' is listed twice (first on line {seen[name]})", where=f"{where}:{number}",
                              hint="remove the duplicate line")
        seen[name] = number
        entries.append(SeriesEntry(name, strip, number))
    return entries


def read_series_file(series: Series) -> list[SeriesEntry]:
    path = series.series_file
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SeriesError(f"series '{series.name}' has no series file", where=str(path),
                          hint=f"create {path} listing its patches, or list them in stack.toml as patches = [...]") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SeriesError(f"cannot read series file: {exc}", where=str(path)) from None
    return parse_series_text(text, str(path))


def series_refs(series: Series) -> list[PatchRef]:
    """The entries of a series, from stack.toml's inline list or the quilt series file."""
    if series.inline is not None:
        return list(series.inline)
    return [
        PatchRef(name=e.name, strip=e.strip, where=f"{series.series_file}:{e.line}")
        for e in read_series_file(series)
    ]


def unused_patch_files(series: Series) -> list[str]:
    """Files in the patch folder that no series entry names: usually a forgotten or stale patch."""
    if not series.patch_dir.is_dir():
        return []
    named = {r.name for r in series_refs(series) if not r.remote}
    found = []
    for path in sorted(series.patch_dir.rglob("*")):
        rel = path.relative_to(series.patch_dir).as_posix()
        if path.is_file() and rel != "series" and not rel.startswith(".") and rel not in named:
            found.append(rel)
    return found


def _is_local(target: str) -> bool:
    scheme = urllib.parse.urlparse(target).scheme
    return scheme in ("", "file") or len(scheme) == 1  # a Windows drive letter is not a scheme


def fetch_remote(settings: Settings, ref: PatchRef) -> Path:
    """The cached raw file of a remote patch; fetched on first use, verified by the caller."""
    assert ref.url and ref.sha256
    cached = settings.patch_cache / ref.sha256 / Path(ref.name).name
    if cached.is_file():
        return cached
    target = settings.rewrite(ref.url)
    try:
        if _is_local(target):
            raw = Path(urllib.parse.urlparse(target).path if target.startswith("file:") else target).read_bytes()
        else:
            raw = http.get(target).content
    except (OSError, ValueError, requests.RequestException) as exc:
        raise PatchError(f"cannot fetch remote patch from {target}: {exc}", where=ref.where,
                         hint="check the network, or map the URL to a local copy with [mirrors] / STACKBUILD_MIRRORS") from None
    data = decode(raw, encoding_of(ref.name), ref.url)
    if sha256(data) != ref.sha256:
        raise PatchError(
            f"remote patch {ref.url} has sha256 {sha256(data)} after decoding, expected {ref.sha256}",
            where=ref.where,
            hint="refused: the file is not the one pinned; check the URL/mirror, update the sha256 only if you trust it",
        )
    atomic_write(cached, raw)
    return cached


def _local_file(series: Series, ref: PatchRef) -> Path:
    path = series.patch_dir / ref.name
    if not path.is_file():
        raise SeriesError(f"patch file '{ref.name}' does not exist in {series.patch_dir}", where=ref.where,
                          hint="fix the name, or add the file")
    return path


def load_series(settings: Settings, series: Series, *, tolerant: bool = False) -> tuple[Patch, ...]:
    """TOLERANT: a patch that does not parse is kept, with its error, for `check` to report."""
    patches = []
    for ref in series_refs(series):
        strip = ref.strip if ref.strip is not None else series.strip
        if ref.remote:
            path = fetch_remote(settings, ref)
            url, expect = ref.url, ref.sha256
        else:
            path, url, expect = _local_file(series, ref), None, None
        try:
            patch = read_patch_file(path, series=series.name, name=ref.name, strip=strip, directory=series.directory,
                                    expect_sha256=expect, url=url)
        except PatchError as exc:
            if not tolerant:
                raise
            patch = Patch(series=series.name, name=ref.name, data=b"", sha256="", encoding=encoding_of(ref.name),
                          files=(), header=Header(), strip=strip, directory=series.directory, path=path, url=url,
                          error=exc)
        patches.append(patch)
    return tuple(patches)


def describe_series(settings: Settings, series: Series) -> list[dict]:
    """Each entry of a series as a listing shows it; remote patches are not fetched for this."""
    rows: list[dict] = []
    for ref in series_refs(series):
        if ref.remote:
            cached = settings.patch_cache / str(ref.sha256) / Path(ref.name).name
            rows.append({"name": ref.name, "url": ref.url, "sha256": ref.sha256, "remote": True,
                         "cached": cached.is_file(), "encoding": encoding_of(ref.name)})
            continue
        try:
            patch = read_patch_file(_local_file(series, ref), series=series.name, name=ref.name,
                                    strip=ref.strip if ref.strip is not None else series.strip, directory=series.directory)
        except PatchError as exc:  # listed with its error: one bad file must not hide the others
            rows.append({"name": ref.name, "remote": False, "encoding": encoding_of(ref.name), "error": str(exc)})
            continue
        rows.append({"name": ref.name, "sha256": patch.sha256, "remote": False, "encoding": patch.encoding,
                     "files": len(patch.files), "subject": patch.header.subject})
    return rows


def load_stack_patches(settings: Settings, config: Config, stack: ResolvedStack, *,
                       tolerant: bool = False) -> dict[str, tuple[Patch, ...]]:
    """Every source of the stack with its patches in apply order (series order, then file order)."""
    out: dict[str, list[Patch]] = {s.name: [] for s in stack.sources}
    for series in stack.series:
        out[series.source].extend(load_series(settings, series, tolerant=tolerant))
    return {name: tuple(p) for name, p in out.items()}


@dataclass(frozen=True)
class PatchDigest:
    label: str
    sha256: str
    strip: int
    directory: str


def stack_patch_digests(config: Config, stack: ResolvedStack) -> dict[str, tuple[PatchDigest, ...]]:
    """What identifies each source's patches, without fetching: a remote patch is named by its
    pinned sha256 (it is verified against exactly that on every use), a local one is read."""
    out: dict[str, list[PatchDigest]] = {s.name: [] for s in stack.sources}
    for series in stack.series:
        for ref in series_refs(series):
            strip = ref.strip if ref.strip is not None else series.strip
            if ref.remote:
                digest = str(ref.sha256)
            else:
                path = _local_file(series, ref)
                digest = sha256(decode(path.read_bytes(), encoding_of(path.name), str(path)))
            out[series.source].append(PatchDigest(f"{series.name}/{ref.name}", digest, strip, series.directory))
    return {name: tuple(items) for name, items in out.items()}


def series_fuzz(resolved: ResolvedStack, patch: Patch) -> int:
    return next((s.fuzz for s in resolved.series if s.name == patch.series), 0)
