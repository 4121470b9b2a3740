"""Variants: one stack built and served for another target, declared in the stack file.

A variant (`[variants.NAME]`) says what changes when a stack is built for a target its main build
does not aim at, e.g. the lab's XPU stacks on a CPU: which sources are skipped (those that need a
toolchain the target lacks), which series are added (fixes the target needs), the `[build]` and
`[smoke]` tables that replace the stack's, and per-source build tables that replace
`[sources.X.build]`. A stack takes one with `variant = "NAME"`; stacks extending it inherit it.

Replacing rather than merging is deliberate: an XPU stack's build args, profiles and gates mean
nothing on a CPU, and a merge would leave them half in place.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Mapping

from .errors import ConfigError

if TYPE_CHECKING:
    from .config import Config, ResolvedStack, Source, Where

VARIANT_KEYS = {"description", "skip", "series", "build", "smoke", "sources", "precompiled"}
PRECOMPILED_KEYS = {"source", "wheel", "library", "bindings", "accept"}


@dataclass(frozen=True)
class Precompiled:
    """The compiled wheel a python-only build takes its extension from, and where the source
    registers the ops that extension must provide (builder/opsprobe.py compares the two)."""

    source: str
    wheel: str                  # file name pattern in the wheelhouse
    library: str                # the extension inside the wheel, e.g. vllm/_C.abi3.so
    bindings: tuple[str, ...]   # C++ files of the source with the op schemas
    accept: tuple[str, ...] = ()  # ops known to differ that the variant's serving never calls


@dataclass(frozen=True)
class Variant:
    name: str
    description: str = ""
    skip: tuple[str, ...] = ()
    series: tuple[str, ...] = ()
    build: Mapping[str, Any] | None = None     # None: the stack's own [build] stays
    smoke: Mapping[str, Any] | None = None
    sources: Mapping[str, Mapping[str, Any]] = field(default_factory=lambda: MappingProxyType({}))
    precompiled: Precompiled | None = None

    def record(self) -> dict:
        """What a manifest and a smoke result say about the variant they were made for."""
        return {"name": self.name, "description": self.description, "skipped": list(self.skip),
                "series": list(self.series)}


def _names(w: Where, key: str, value: Any, known: Mapping[str, Any], what: str) -> tuple[str, ...]:
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
    from .config import _check_keys, _name, _table, freeze

    out: dict[str, Variant] = {}
    for name, table in _table(w, "variants", raw).items():
        key = f"variants.{name}"
        table = _table(w, key, table)
        _name(w, key, name)
        _check_keys(w, key, table, VARIANT_KEYS)
        description = table.get("description", "")
        if not isinstance(description, str):
            raise w.error(f"{key}.description", "'description' must be a string")
        skip = _names(w, f"{key}.skip", table.get("skip", []), sources, "source")
        added = _names(w, f"{key}.series", table.get("series", []), series, "series")
        for s in added:
            if series[s].source in skip:
                raise w.error(f"{key}.series", f"series '{s}' patches '{series[s].source}', which the variant skips")
        overrides = _table(w, f"{key}.sources", table.get("sources", {}))
        for src, build in overrides.items():
            if src not in sources:
                raise w.error(f"{key}.sources.{src}", f"variant '{name}' overrides the build of unknown source '{src}'",
                              hint=f"sources: {', '.join(sorted(sources))}")
            if src in skip:
                raise w.error(f"{key}.sources.{src}", f"variant '{name}' both skips and builds source '{src}'")
            _table(w, f"{key}.sources.{src}", build)
        precompiled = (_parse_precompiled(w, f"{key}.precompiled", table["precompiled"], sources, skip)
                       if "precompiled" in table else None)
        out[name] = Variant(
            name=name, description=description, skip=skip, series=added, precompiled=precompiled,
            build=freeze(_table(w, f"{key}.build", table["build"])) if "build" in table else None,
            smoke=freeze(_table(w, f"{key}.smoke", table["smoke"])) if "smoke" in table else None,
            sources=MappingProxyType({k: freeze(v) for k, v in overrides.items()}),
        )
    return out


def _parse_precompiled(w: Where, key: str, raw: Any, sources: Mapping[str, Source], skip: tuple[str, ...]) -> Precompiled:
    from .config import _check_keys, _safe_relative, _str, _table

    raw = _table(w, key, raw)
    _check_keys(w, key, raw, PRECOMPILED_KEYS)
    source = _str(w, f"{key}.source", raw.get("source"))
    if source not in sources or source in skip:
        raise w.error(f"{key}.source", f"'{key}.source' must name a source the variant builds, not {source!r}")
    bindings = raw.get("bindings")
    if not isinstance(bindings, list) or not bindings or not all(isinstance(b, str) and b for b in bindings):
        raise w.error(f"{key}.bindings", f"'{key}.bindings' must be a list of the source's C++ files that register the ops",
                      hint='e.g. bindings = ["csrc/cpu/torch_bindings.cpp"]')
    accept = raw.get("accept", [])
    if not isinstance(accept, list) or not all(isinstance(a, str) for a in accept):
        raise w.error(f"{key}.accept", f"'{key}.accept' must be a list of op names")
    wheel = _str(w, f"{key}.wheel", raw.get("wheel"))
    if "/" in wheel:
        raise w.error(f"{key}.wheel", f"'{key}.wheel' is a file name pattern in the wheelhouse, not a path")
    return Precompiled(source=source, wheel=wheel,
                       library=_safe_relative(w, f"{key}.library", _str(w, f"{key}.library", raw.get("library"))),
                       bindings=tuple(_safe_relative(w, f"{key}.bindings", b) for b in bindings), accept=tuple(accept))


def check_stack_variant(w: Where, stack_name: str, variant: Any, variants: Mapping[str, Variant]) -> str | None:
    if variant is None:
        return None
    key = f"stacks.{stack_name}.variant"
    if not isinstance(variant, str) or variant not in variants:
        raise w.error(key, f"stack '{stack_name}' names unknown variant {variant!r}",
                      hint=f"define [variants.{variant}] or use one of: {', '.join(sorted(variants)) or 'none defined'}")
    return variant


def apply_variant(config: Config, resolved: ResolvedStack, variant: Variant) -> ResolvedStack:
    """The stack as the variant builds it: skipped sources and their series gone, the variant's
    series last, its per-source build tables in place of the sources' own."""
    kept = tuple(s for s in resolved.series if s.source not in variant.skip)
    for name in variant.series:
        if any(s.name == name for s in kept):
            raise ConfigError(f"variant '{variant.name}' adds series '{name}', which stack '{resolved.name}' already has",
                              where=config.where.at(f"variants.{variant.name}.series"))
    series = kept + tuple(config.series[n] for n in variant.series)
    names = [s.name for s in resolved.sources if s.name not in variant.skip]
    for s in series:
        if s.source not in names:
            names.append(s.source)
    sources = tuple(_with_build(config.sources[n], variant) for n in names)
    return replace(resolved, series=series, sources=sources, variant=variant)


def _with_build(source: Source, variant: Variant) -> Source:
    override = variant.sources.get(source.name)
    return source if override is None else replace(source, build=override)
