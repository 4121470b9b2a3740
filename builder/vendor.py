"""Vendoring remote patches: from `patches = [{url, sha256}, ...]` in stack.toml to files in the
series' patch folder listed by a quilt `series` file, so a rebase can write them back.

Each remote patch is fetched (or taken from the cache) and verified against its pinned sha256,
written as a plain `.patch` (or in its original encoding), and listed in a new `series` file with
its URL and sha256 as a comment: the provenance. stack.toml loses the `patches` key, which stays
in the file as a commented-out copy (every comment inside it kept), so the series reads its new
`series` file. Patch files and the series file are written first, stack.toml last: a vendor killed
in between is finished by running it again, which finds its own files and accepts them. A file
already there with other bytes (a local edit) is never overwritten.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .config import Config, PatchRef, Series, thaw
from .errors import ConfigError, SeriesError
from .export import commit_files, plain_name
from .fsutil import atomic_write
from .patches import encoding_of, read_patch_file
from .series import fetch_remote, parse_series_text
from .settings import Settings


@dataclass(frozen=True)
class VendoredPatch:
    series: str
    name: str  # the entry in the new series file
    url: str
    sha256: str  # of the decoded patch, as pinned
    path: str  # relative to the project
    action: str  # written | unchanged (already there, same bytes: a re-run)


@dataclass(frozen=True)
class VendorResult:
    series: tuple[str, ...]  # series vendored by this run
    already_local: tuple[str, ...]  # series named that have no remote entry: nothing to do
    patches: tuple[VendoredPatch, ...]
    stack_file_changed: bool

    def to_json(self) -> dict:
        return {"series": list(self.series), "already_local": list(self.already_local),
                "patches": [vars(p).copy() for p in self.patches], "stack_file_changed": self.stack_file_changed}


@dataclass(frozen=True)
class _Planned:
    """Everything one series' vendoring writes, computed before anything is."""

    series: Series
    files: dict[Path, bytes]
    patches: tuple[VendoredPatch, ...]


def chosen_series(cfg: Config, names: Sequence[str], stack: str | None) -> list[Series]:
    if bool(names) == bool(stack):
        raise ConfigError("name the series to vendor, or a stack with --stack (not both)",
                          hint="stackbuild vendor SERIES… | stackbuild vendor --stack STACK")
    if stack:
        return [s for s in cfg.stack(stack).series if s.inline is not None and any(r.remote for r in s.inline)]
    for name in names:
        if name not in cfg.series:
            raise ConfigError(f"no series named '{name}'", where=str(cfg.path),
                              hint=f"defined series: {', '.join(sorted(cfg.series)) or 'none'}")
    return [cfg.series[n] for n in dict.fromkeys(names)]


def _verified(settings: Settings, series: Series, ref: PatchRef) -> tuple[bytes, bytes]:
    """The raw file as fetched and its decoded bytes, read the way a stack reads a remote patch:
    the pinned sha256 checked (the cache is trusted no more than the network) and the patch parsed."""
    path = fetch_remote(settings, ref)
    patch = read_patch_file(path, series=series.name, name=ref.name, strip=ref.strip if ref.strip is not None
                            else series.strip, directory=series.directory, expect_sha256=ref.sha256, url=ref.url)
    return path.read_bytes(), patch.data


def _plan(settings: Settings, cfg: Config, series: Series, keep_encoding: bool) -> _Planned:
    assert series.inline is not None
    files: dict[Path, bytes] = {}
    lines = [f"# {series.name}: entries with a URL were vendored by `stackbuild vendor` (sha256 of the decoded patch)\n"]
    done: list[VendoredPatch] = []
    names: set[str] = set()
    for ref in series.inline:
        option = f" -p{ref.strip}" if ref.strip is not None else ""
        if not ref.remote:
            if not (series.patch_dir / ref.name).is_file():
                raise SeriesError(f"patch file '{ref.name}' does not exist in {series.patch_dir}", where=ref.where,
                                  hint="fix the name, or add the file")
            name = ref.name
            lines.append(f"{name}{option}\n")
        else:
            raw, decoded = _verified(settings, series, ref)
            name = ref.name if keep_encoding or not encoding_of(ref.name) else plain_name(ref.name)
            data = raw if keep_encoding else decoded
            if "#" in str(ref.url) or "\n" in str(ref.url):
                raise ConfigError(f"the URL {ref.url} cannot be kept as a comment in a series file", where=ref.where,
                                  hint="vendor this patch by hand")
            lines.append(f"{name}{option}  # vendored from {ref.url} sha256 {ref.sha256}\n")
            path = series.patch_dir / name
            present = path.read_bytes() if path.is_file() else None
            if present is not None and present != data:
                raise SeriesError(f"{os.path.relpath(path, cfg.root)} exists with other content (a local edit?)",
                                  where=str(path),
                                  hint="stackbuild never overwrites a patch file it did not write: move it away, "
                                       "or list it in stack.toml as a local entry instead of the URL")
            if present is None:
                files[path] = data
            done.append(VendoredPatch(series.name, name, str(ref.url), str(ref.sha256),
                                      os.path.relpath(path, cfg.root), "written" if present is None else "unchanged"))
        if name in names:
            raise SeriesError(f"two entries of series '{series.name}' would both be the file '{name}'", where=ref.where,
                              hint="give one of them another name (the `name` key of a remote entry)")
        names.add(name)
    text = "".join(lines)
    parse_series_text(text, str(series.series_file))  # the file we write must be one the loader reads
    if series.series_file.is_file() and series.series_file.read_text(encoding="utf-8") != text:
        raise SeriesError(f"series '{series.name}' lists its patches in stack.toml, but {series.series_file.name} "
                          "exists beside them with other content", where=str(series.series_file),
                          hint="move the old series file away (stackbuild never overwrites one it did not write)")
    if not series.series_file.is_file():
        files[series.series_file] = text.encode()
    return _Planned(series, files, tuple(done))


_HEADER = re.compile(r"^\s*\[\s*series\s*\.\s*(\"[^\"]+\"|'[^']+'|[A-Za-z0-9_-]+)\s*\]\s*(#.*)?$")


def uninline(text: str, series: str, folder: str, where: Path) -> str:
    """stack.toml without `patches = [...]` in [series.NAME]: the key becomes a commented-out copy
    of itself (its comments, URLs and sha256s kept as provenance) under a line saying where the
    patches went (FOLDER, the series file). A line edit rather than tomlkit's: tomlkit can drop a
    key but not leave comments in its place, and the copy must keep the key's own comments, which
    tomlkit attaches to the array items it would remove. Checked by parsing both texts: everything
    else must read exactly as before."""
    lines = text.splitlines(keepends=True)
    header = next((i for i, line in enumerate(lines)
                   if (m := _HEADER.match(line)) and m.group(1).strip("\"'") == series), None)
    start = None
    if header is not None:
        for i in range(header + 1, len(lines)):
            if re.match(r"^\s*\[", lines[i]):
                break
            if re.match(r"^\s*patches\s*=", lines[i]):
                start = i
                break
    old = tomllib.loads(text)
    if start is None:
        raise ConfigError(f"cannot find `patches = [...]` under [series.{series}]", where=str(where),
                          hint="write it in its own [series.NAME] table, or vendor this series by hand")
    # The array ends where a parse of it ends: grow the slice until it is valid TOML.
    end = start
    while end < len(lines):
        try:
            tomllib.loads("".join(lines[start:end + 1]))
            break
        except tomllib.TOMLDecodeError:
            end += 1
    indent = re.match(r"^\s*", lines[start]).group(0)  # type: ignore[union-attr]
    block = [f"{indent}# patches vendored by `stackbuild vendor` into {folder} (see the series file); was:\n"]
    block += [f"{indent}# {line[len(indent):] if line.startswith(indent) else line.lstrip()}".rstrip() + "\n"
              for line in lines[start:end + 1]]
    new = "".join(lines[:start] + block + lines[end + 1:])
    expected = thaw(old)
    expected["series"][series].pop("patches", None)
    if tomllib.loads(new) != expected:
        raise ConfigError(f"rewriting [series.{series}] would change more than its `patches` key", where=str(where),
                          hint="vendor this series by hand")
    return new


def vendor(settings: Settings, cfg: Config, names: Sequence[str] = (), *, stack: str | None = None,
           keep_encoding: bool = False) -> VendorResult:
    chosen = chosen_series(cfg, names, stack)
    remote = [s for s in chosen if s.inline is not None and any(r.remote for r in s.inline)]
    local = tuple(s.name for s in chosen if s not in remote)
    plans = [_plan(settings, cfg, s, keep_encoding) for s in remote]  # every fetch and check before a write
    text = cfg.path.read_text(encoding="utf-8")
    new_text = text
    for plan in plans:
        new_text = uninline(new_text, plan.series.name, os.path.relpath(plan.series.series_file, cfg.root), cfg.path)
    commit_files({path: data for plan in plans for path, data in plan.files.items()})
    if new_text != text:
        atomic_write(cfg.path, new_text.encode())  # last: until it lands, the stack still reads the URLs
    return VendorResult(tuple(p.series.name for p in plans), local, tuple(v for p in plans for v in p.patches),
                        new_text != text)
