"""stack.toml -> frozen dataclasses.

Every error names the file, the line where it can be found, and the TOML key. Tables that later
stages own (`build`, `smoke`) are kept as read-only mappings here and parsed by their modules
with `Where` so their errors point at the same file and line.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Collection, Mapping

from . import schema
from .errors import ConfigError
from .schema import Where
from .settings import env_value
from .variants import Precompiled, Variant, apply_variant

SHA_RE = re.compile(r"^[0-9a-f]{40}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
PYPI_PIN_RE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!_-]+)$")
DEFAULT_STACK_FILE = "stack.toml"


def freeze(value: Any) -> Any:
    """Deep read-only copy of a TOML value, so the model stays immutable."""
    if isinstance(value, dict):
        return MappingProxyType({k: freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(freeze(v) for v in value)
    return value


def thaw(value: Any) -> Any:
    """Plain dicts and lists again, for JSON output and for merging."""
    if isinstance(value, Mapping):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [thaw(v) for v in value]
    return value


def deep_merge(base: Mapping, over: Mapping) -> dict:
    """Tables merge key by key; anything else in `over` replaces what `base` had."""
    out = thaw(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = thaw(value)
    return out


@dataclass(frozen=True)
class Source:
    """One upstream: a git repository pinned at a commit, or a release archive pinned by hash."""

    name: str
    kind: str  # "git" | "archive" | "pypi"
    url: str | None = None
    commit: str | None = None
    archive: str | None = None
    pypi: str | None = None
    sha256: str | None = None
    submodules: bool = False
    build: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def pin(self) -> str:
        """What identifies the exact upstream content: the commit, or the archive's hash."""
        if self.kind == "git":
            return str(self.commit)
        if self.kind == "archive":
            return f"sha256:{self.sha256}"
        return f"{self.pypi}@sha256:{self.sha256}" if self.sha256 else str(self.pypi)

    @property
    def location(self) -> str:
        return str(self.url or self.archive or self.pypi)


@dataclass(frozen=True)
class PatchRef:
    """One entry of a series: a local file, or a remote URL with the sha256 of its decoded bytes."""

    name: str
    strip: int | None = None
    url: str | None = None
    sha256: str | None = None
    where: str = ""

    @property
    def remote(self) -> bool:
        return self.url is not None


@dataclass(frozen=True)
class Series:
    name: str
    source: str
    patch_dir: Path
    directory: str = ""
    strip: int = 1
    fuzz: int = 0
    inline: tuple[PatchRef, ...] | None = None  # `patches = [...]` in stack.toml; else the series file

    @property
    def series_file(self) -> Path:
        return self.patch_dir / "series"


@dataclass(frozen=True)
class Stack:
    name: str
    series: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()
    extends: str | None = None
    build: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    smoke: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    variant: str | None = None


@dataclass(frozen=True)
class ResolvedStack:
    """A stack with `extends` flattened: series in apply order, every source it touches."""

    name: str
    chain: tuple[str, ...]
    series: tuple[Series, ...]
    sources: tuple[Source, ...]
    build: Mapping[str, Any]
    smoke: Mapping[str, Any]
    variant: Variant | None = None   # builder/variants.py: built for another target than the main build

    def series_for(self, source: str) -> tuple[Series, ...]:
        return tuple(s for s in self.series if s.source == source)

    def restricted(self, names: Collection[str]) -> ResolvedStack:
        """The same stack holding only the sources NAMES and their series (a partial build)."""
        return replace(self, series=tuple(s for s in self.series if s.source in names),
                       sources=tuple(s for s in self.sources if s.name in names))


@dataclass(frozen=True)
class Config:
    path: Path
    root: Path
    sources: Mapping[str, Source]
    series: Mapping[str, Series]
    stacks: Mapping[str, Stack]
    build: Mapping[str, Any]
    smoke: Mapping[str, Any]
    mirrors: Mapping[str, str]
    where: Where = field(repr=False, compare=False, default=None)  # type: ignore[assignment]
    variants: Mapping[str, Variant] = field(default_factory=lambda: MappingProxyType({}))

    def stack(self, name: str) -> ResolvedStack:
        return resolve_stack(self, name)


TOP_KEYS = {"sources", "series", "stacks", "build", "smoke", "mirrors", "stackbuild", "variants"}
SOURCE_KEYS = {"url", "commit", "archive", "pypi", "sha256", "submodules", "build"}
SERIES_KEYS = {"source", "directory", "strip", "patch_dir", "fuzz", "patches"}
STACK_KEYS = {"series", "sources", "extends", "build", "smoke", "variant"}
PATCH_KEYS = {"url", "sha256", "name", "strip", "file"}


# builder/variants.py holds the model; its tables are parsed here, with the validators every other
# table uses (one configuration layer, and no import back from variants into config).
VARIANT_KEYS = {"description", "skip", "series", "build", "smoke", "sources", "precompiled"}
PRECOMPILED_KEYS = {"source", "wheel", "library", "bindings", "accept"}


def _variant_names(w: Where, key: str, value: Any, known: Mapping[str, Any], what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise w.error(key, f"'{key}' must be a list of {what} names")
    for name in value:
        if name not in known:
            raise w.error(key, f"'{key}' names unknown {what} '{name}'",
                          hint=f"defined: {', '.join(sorted(known)) or 'none'}")
    if len(set(value)) != len(value):
        raise w.error(key, f"'{key}' lists a {what} twice")
    return tuple(value)


def parse_variants(w: Where, raw: Any, sources: Mapping[str, Source], series: Mapping[str, Any]) -> dict[str, Variant]:
    out: dict[str, Variant] = {}
    for name, table in schema.table(w, "variants", raw).items():
        key = f"variants.{name}"
        table = schema.table(w, key, table)
        schema.name(w, key, name)
        schema.check_keys(w, key, table, VARIANT_KEYS)
        description = table.get("description", "")
        if not isinstance(description, str):
            raise w.error(f"{key}.description", "'description' must be a string")
        skip = _variant_names(w, f"{key}.skip", table.get("skip", []), sources, "source")
        added = _variant_names(w, f"{key}.series", table.get("series", []), series, "series")
        for s in added:
            if series[s].source in skip:
                raise w.error(f"{key}.series", f"series '{s}' patches '{series[s].source}', which the variant skips")
        overrides = schema.table(w, f"{key}.sources", table.get("sources", {}))
        for src, build in overrides.items():
            if src not in sources:
                raise w.error(f"{key}.sources.{src}", f"variant '{name}' overrides the build of unknown source '{src}'",
                              hint=f"sources: {', '.join(sorted(sources))}")
            if src in skip:
                raise w.error(f"{key}.sources.{src}", f"variant '{name}' both skips and builds source '{src}'")
            schema.table(w, f"{key}.sources.{src}", build)
        precompiled = (_parse_precompiled(w, f"{key}.precompiled", table["precompiled"], sources, skip)
                       if "precompiled" in table else None)
        out[name] = Variant(
            name=name, description=description, skip=skip, series=added, precompiled=precompiled,
            build=freeze(schema.table(w, f"{key}.build", table["build"])) if "build" in table else None,
            smoke=freeze(schema.table(w, f"{key}.smoke", table["smoke"])) if "smoke" in table else None,
            sources=MappingProxyType({k: freeze(v) for k, v in overrides.items()}),
        )
    return out


def _parse_precompiled(w: Where, key: str, raw: Any, sources: Mapping[str, Source], skip: tuple[str, ...]) -> Precompiled:
    raw = schema.table(w, key, raw)
    schema.check_keys(w, key, raw, PRECOMPILED_KEYS)
    source = schema.string(w, f"{key}.source", raw.get("source"))
    if source not in sources or source in skip:
        raise w.error(f"{key}.source", f"'{key}.source' must name a source the variant builds, not {source!r}")
    bindings = raw.get("bindings")
    if not isinstance(bindings, list) or not bindings or not all(isinstance(b, str) and b for b in bindings):
        raise w.error(f"{key}.bindings", f"'{key}.bindings' must be a list of the source's C++ files that register the ops",
                      hint='e.g. bindings = ["csrc/cpu/torch_bindings.cpp"]')
    accept = raw.get("accept", [])
    if not isinstance(accept, list) or not all(isinstance(a, str) for a in accept):
        raise w.error(f"{key}.accept", f"'{key}.accept' must be a list of op names")
    wheel = schema.string(w, f"{key}.wheel", raw.get("wheel"))
    if "/" in wheel:
        raise w.error(f"{key}.wheel", f"'{key}.wheel' is a file name pattern in the wheelhouse, not a path")
    return Precompiled(source=source, wheel=wheel,
                       library=schema.safe_relative(w, f"{key}.library", schema.string(w, f"{key}.library", raw.get("library"))),
                       bindings=tuple(schema.safe_relative(w, f"{key}.bindings", b) for b in bindings), accept=tuple(accept))


def check_stack_variant(w: Where, stack_name: str, variant: Any, variants: Mapping[str, Variant]) -> str | None:
    if variant is None:
        return None
    key = f"stacks.{stack_name}.variant"
    if not isinstance(variant, str) or variant not in variants:
        raise w.error(key, f"stack '{stack_name}' names unknown variant {variant!r}",
                      hint=f"define [variants.{variant}] or use one of: {', '.join(sorted(variants)) or 'none defined'}")
    return variant


def _parse_source(w: Where, name: str, raw: Any) -> Source:
    key = f"sources.{name}"
    raw = schema.table(w, key, raw)
    schema.name(w, key, name)
    schema.check_keys(w, key, raw, SOURCE_KEYS)
    kinds = [k for k in ("commit", "archive", "pypi") if k in raw]
    if len(kinds) != 1:
        raise w.error(
            key,
            f"source '{name}' needs exactly one of 'commit' (with 'url'), 'archive' or 'pypi'"
            + (f", not {' and '.join(kinds)}" if kinds else ""),
            hint='e.g. url = "https://…/repo.git" and commit = "<40-hex sha>"',
        )
    build = freeze(schema.table(w, f"{key}.build", raw.get("build", {})))
    submodules = raw.get("submodules", False)
    if not isinstance(submodules, bool):
        raise w.error(f"{key}.submodules", "'submodules' must be true or false")
    sha256 = raw.get("sha256")
    if sha256 is not None and not (isinstance(sha256, str) and SHA256_RE.match(sha256)):
        raise w.error(f"{key}.sha256", f"sha256 must be 64 lowercase hex digits, got {sha256!r}")
    if kinds[0] == "commit":
        url = schema.url(w, f"{key}.url", raw.get("url"))
        commit = raw["commit"]
        if not isinstance(commit, str) or not SHA_RE.match(commit):
            raise w.error(
                f"{key}.commit",
                f"commit must be a full 40-hex SHA, got {commit!r}",
                hint="pin the exact commit: git rev-parse <ref>",
            )
        if sha256 is not None:
            raise w.error(f"{key}.sha256", "'sha256' belongs to archive sources; a git source is pinned by 'commit'")
        return Source(name, "git", url=url, commit=commit, submodules=submodules, build=build)
    if "url" in raw:
        raise w.error(f"{key}.url", f"'url' is for git sources; an {kinds[0]} source names its file in '{kinds[0]}'")
    if kinds[0] == "archive":
        archive = schema.url(w, f"{key}.archive", raw["archive"])
        if sha256 is None:
            raise w.error(f"{key}.sha256", "an archive source needs 'sha256' of the archive file", hint="sha256sum FILE")
        return Source(name, "archive", archive=archive, sha256=sha256, submodules=False, build=build)
    pypi = schema.string(w, f"{key}.pypi", raw["pypi"])
    if not PYPI_PIN_RE.match(pypi):
        raise w.error(f"{key}.pypi", f"'{pypi}' must pin one exact release", hint='e.g. pypi = "vllm==0.32.0"')
    return Source(name, "pypi", pypi=pypi, sha256=sha256, build=build)


def _parse_patch_ref(w: Where, key: str, raw: Any) -> PatchRef:
    if isinstance(raw, str):
        return PatchRef(name=schema.safe_relative(w, key, raw), where=w.at(key))
    raw = schema.table(w, key, raw)
    schema.check_keys(w, key, raw, PATCH_KEYS)
    strip = schema.integer(w, f"{key}.strip", raw["strip"], 0, 20) if "strip" in raw else None
    if "url" in raw:
        url = schema.url(w, f"{key}.url", raw["url"])
        sha = raw.get("sha256")
        if not isinstance(sha, str) or not SHA256_RE.match(sha):
            raise w.error(
                f"{key}.sha256",
                f"remote patch {url} needs 'sha256' (64 lowercase hex) of its decoded content",
                hint="fetch it once and run sha256sum on the decoded patch",
            )
        name = raw.get("name") or url.rstrip("/").rsplit("/", 1)[-1]
        return PatchRef(name=schema.safe_relative(w, f"{key}.name", name), strip=strip, url=url, sha256=sha, where=w.at(key))
    if "file" not in raw:
        raise w.error(key, "a patch entry needs 'file' (local) or 'url' and 'sha256' (remote)")
    return PatchRef(name=schema.safe_relative(w, f"{key}.file", schema.string(w, f"{key}.file", raw["file"])), strip=strip, where=w.at(key))


def _parse_series(w: Where, root: Path, name: str, raw: Any, sources: Mapping[str, Source]) -> Series:
    key = f"series.{name}"
    raw = schema.table(w, key, raw)
    schema.name(w, key, name)
    schema.check_keys(w, key, raw, SERIES_KEYS)
    source = schema.string(w, f"{key}.source", raw.get("source"))
    if source not in sources:
        raise w.error(
            f"{key}.source", f"series '{name}' names unknown source '{source}'",
            hint=f"define [sources.{source}] or use one of: {', '.join(sorted(sources)) or 'none defined'}",
        )
    directory = schema.safe_relative(w, f"{key}.directory", raw["directory"]) if raw.get("directory") else ""
    patch_dir = root / schema.safe_relative(w, f"{key}.patch_dir", raw.get("patch_dir", f"patches/{name}"))
    inline = None
    if "patches" in raw:
        items = raw["patches"]
        if not isinstance(items, list):
            raise w.error(f"{key}.patches", "'patches' must be a list of file names or {url, sha256} tables")
        inline = tuple(_parse_patch_ref(w, f"{key}.patches", item) for item in items)
    return Series(
        name=name,
        source=source,
        patch_dir=patch_dir,
        directory=directory,
        strip=schema.integer(w, f"{key}.strip", raw.get("strip", 1), 0, 20),
        fuzz=schema.integer(w, f"{key}.fuzz", raw.get("fuzz", 0), 0, 3),
        inline=inline,
    )


def _parse_stack(w: Where, name: str, raw: Any, series: Mapping[str, Series], sources: Mapping[str, Source],
                 variants: Mapping[str, Variant]) -> Stack:
    key = f"stacks.{name}"
    raw = schema.table(w, key, raw)
    schema.name(w, key, name)
    schema.check_keys(w, key, raw, STACK_KEYS)
    names = raw.get("series", [])
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise w.error(f"{key}.series", "'series' must be a list of series names")
    for n in names:
        if n not in series:
            raise w.error(
                f"{key}.series", f"stack '{name}' names unknown series '{n}'",
                hint=f"define [series.{n}] or use one of: {', '.join(sorted(series)) or 'none defined'}",
            )
    if len(set(names)) != len(names):
        raise w.error(f"{key}.series", f"stack '{name}' lists a series twice")
    extra = raw.get("sources", [])
    if not isinstance(extra, list) or not all(isinstance(n, str) for n in extra):
        raise w.error(f"{key}.sources", "'sources' must be a list of source names")
    for n in extra:
        if n not in sources:
            raise w.error(f"{key}.sources", f"stack '{name}' names unknown source '{n}'")
    extends = raw.get("extends")
    if extends is not None:
        schema.string(w, f"{key}.extends", extends)
    return Stack(
        name=name,
        series=tuple(names),
        sources=tuple(extra),
        extends=extends,
        build=freeze(schema.table(w, f"{key}.build", raw.get("build", {}))),
        smoke=freeze(schema.table(w, f"{key}.smoke", raw.get("smoke", {}))),
        variant=check_stack_variant(w, name, raw.get("variant"), variants),
    )


def parse_config(text: str, path: Path) -> Config:
    w = Where(path, text)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}", where=str(path), hint="fix the syntax at the line named") from None
    schema.check_keys(w, "(top level)", data, TOP_KEYS)
    root = path.parent
    sources = {n: _parse_source(w, n, v) for n, v in schema.table(w, "sources", data.get("sources", {})).items()}
    series = {n: _parse_series(w, root, n, v, sources) for n, v in schema.table(w, "series", data.get("series", {})).items()}
    variants = parse_variants(w, data.get("variants", {}), sources, series)
    stacks = {n: _parse_stack(w, n, v, series, sources, variants)
              for n, v in schema.table(w, "stacks", data.get("stacks", {})).items()}
    mirrors = schema.table(w, "mirrors", data.get("mirrors", {}))
    for prefix, target in mirrors.items():
        schema.url(w, f"mirrors.{prefix}", target)
    config = Config(
        path=path,
        root=root,
        sources=MappingProxyType(sources),
        series=MappingProxyType(series),
        stacks=MappingProxyType(stacks),
        build=freeze(schema.table(w, "build", data.get("build", {}))),
        smoke=freeze(schema.table(w, "smoke", data.get("smoke", {}))),
        mirrors=MappingProxyType(dict(mirrors)),
        where=w,
        variants=MappingProxyType(variants),
    )
    for name in stacks:
        resolve_stack(config, name)  # cycles and unknown parents are config errors, found at load time
    return config


def find_stack_file(explicit: str | os.PathLike | None = None, env: Mapping[str, str] | None = None) -> Path:
    chosen = explicit or env_value("STACKBUILD_STACK", env)
    if chosen:
        path = Path(chosen)
        if path.is_dir():
            path = path / DEFAULT_STACK_FILE
        if not path.is_file():
            raise ConfigError(f"no stack file at {path}", where="--stack/STACKBUILD_STACK", hint="give the path of a stack.toml")
        return path.resolve()
    here = Path.cwd()
    for folder in (here, *here.parents):
        if (folder / DEFAULT_STACK_FILE).is_file():
            return (folder / DEFAULT_STACK_FILE).resolve()
    raise ConfigError(
        f"no {DEFAULT_STACK_FILE} in {here} or its parents", hint="run from the project, or pass --stack PATH"
    )


def load_config(path: str | os.PathLike | None = None) -> Config:
    stack_file = find_stack_file(path)
    try:
        text = stack_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read: {exc}", where=str(stack_file)) from None
    return parse_config(text, stack_file)


def located(config: Config, resolved: ResolvedStack, table: str) -> schema.Layered:
    """Where each key of the merged TABLE ("build" or "smoke") of RESOLVED was written, following
    resolve_stack's merge: the top level, replaced by a variant's table where a stack names one,
    refined by each stack of the chain."""
    layers: list[tuple[str, Mapping]] = [(table, getattr(config, table))]
    for name in resolved.chain:
        stack = config.stacks[name]
        if stack.variant is not None:
            own = getattr(config.variants[stack.variant], table)
            if own is not None:
                layers = [(f"variants.{stack.variant}.{table}", own)]
        layers.append((f"stacks.{name}.{table}", getattr(stack, table)))
    return schema.Layered(config.where, tuple(layers))


def resolve_stack(config: Config, name: str) -> ResolvedStack:
    if name not in config.stacks:
        raise ConfigError(
            f"no stack named '{name}'",
            where=str(config.path),
            hint=f"defined stacks: {', '.join(sorted(config.stacks)) or 'none'}",
        )
    chain: list[Stack] = []
    seen: list[str] = []
    current: str | None = name
    while current is not None:
        if current in seen:
            raise config.where.error(
                f"stacks.{seen[-1]}.extends", f"stacks extend each other in a cycle: {' -> '.join(seen + [current])}",
                hint="remove 'extends' from one of the stacks in the cycle",
            )
        if current not in config.stacks:
            raise config.where.error(f"stacks.{seen[-1]}.extends", f"stack '{seen[-1]}' extends unknown stack '{current}'",
                                     hint=f"defined stacks: {', '.join(sorted(config.stacks))}; fix the name or add [stacks.{current}]")
        seen.append(current)
        chain.append(config.stacks[current])
        current = config.stacks[current].extends
    chain.reverse()
    series_names: list[str] = []
    source_names: list[str] = []
    build: Mapping = {}
    smoke: Mapping = {}
    top_build, top_smoke = config.build, config.smoke
    build, smoke = thaw(top_build), thaw(top_smoke)
    variant: Variant | None = None
    for stack in chain:
        for s in stack.series:
            if s in series_names:
                raise config.where.error(
                    f"stacks.{stack.name}.series", f"series '{s}' is already in the stack '{stack.name}' extends"
                )
            series_names.append(s)
            src = config.series[s].source
            if src not in source_names:
                source_names.append(src)
        for src in stack.sources:
            if src not in source_names:
                source_names.append(src)
        if stack.variant is not None:
            # The variant's tables replace what the chain merged so far; the stacks from here on
            # still refine them.
            variant = config.variants[stack.variant]
            build = thaw(variant.build) if variant.build is not None else build
            smoke = thaw(variant.smoke) if variant.smoke is not None else smoke
        build = deep_merge(build, stack.build)
        smoke = deep_merge(smoke, stack.smoke)
    resolved = ResolvedStack(
        name=name,
        chain=tuple(s.name for s in chain),
        series=tuple(config.series[s] for s in series_names),
        sources=tuple(config.sources[s] for s in source_names),
        build=freeze(build),
        smoke=freeze(smoke),
    )
    return resolved if variant is None else apply_variant(config, resolved, variant)
