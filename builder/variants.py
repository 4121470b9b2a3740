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
    from .config import Config, ResolvedStack, Source

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
