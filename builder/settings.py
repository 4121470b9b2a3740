"""Machine-level settings: where the cache, work trees and outputs live, and the mirror map.

These belong to the host, not to the stack: the same stack.toml works on the lab box, in CI and
on an offline machine because URLs are rewritten here, never in the stack file.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

from .config import Config
from .schema import looks_like_option
from .errors import ConfigError

MIRRORS_ENV = "STACKBUILD_MIRRORS"


def user_config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "stackbuild" / "config.toml"


def default_cache_dir() -> Path:
    if os.environ.get("STACKBUILD_CACHE"):
        return Path(os.environ["STACKBUILD_CACHE"]).resolve()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "stackbuild"


def _read_user_config(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read user config: {exc}", where=str(path), hint="fix or remove the file") from None


def parse_mirror_env(value: str) -> dict[str, str]:
    """`PREFIX=TARGET` pairs separated by ';' or newlines."""
    out: dict[str, str] = {}
    for number, item in enumerate(filter(None, (p.strip() for p in value.replace("\n", ";").split(";"))), 1):
        prefix, sep, target = item.partition("=")
        if not sep or not prefix.strip() or not target.strip():
            raise ConfigError(
                f"mirror entry {number} '{item}' is not PREFIX=TARGET",
                where=MIRRORS_ENV,
                hint="e.g. STACKBUILD_MIRRORS='https://github.com/=/srv/mirrors/'",
            )
        out[prefix.strip()] = target.strip()
    _refuse_options(out, MIRRORS_ENV)
    return out


def _refuse_options(mirrors: Mapping[str, str], where: str) -> None:
    """A rewritten URL reaches git: a target starting with '-' would be read as an option."""
    for prefix, target in mirrors.items():
        if looks_like_option(target):
            raise ConfigError(f"mirror target '{target}' of '{prefix}' starts with '-' and would be read as a git option",
                              where=where, hint="give a URL or an absolute path")


@dataclass(frozen=True)
class Settings:
    cache_dir: Path
    work_dir: Path
    dist_dir: Path
    results_dir: Path
    mirrors: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    def rewrite(self, url: str) -> str:
        """Longest matching prefix wins, so a specific repository can override a whole host."""
        best = max((p for p in self.mirrors if url.startswith(p)), key=len, default=None)
        return url if best is None else self.mirrors[best] + url[len(best):]

    @property
    def mirror_dir(self) -> Path:
        return self.cache_dir / "sources"

    @property
    def patch_cache(self) -> Path:
        return self.cache_dir / "patches"


def load_settings(config: Config | None = None, *, work_dir: str | os.PathLike | None = None) -> Settings:
    """Mirrors merge user config < project stack.toml < environment; later ones win per prefix."""
    user = _read_user_config(user_config_path())
    mirrors: dict[str, str] = {}
    user_mirrors = user.get("mirrors", {})
    if not isinstance(user_mirrors, dict) or not all(isinstance(v, str) for v in user_mirrors.values()):
        raise ConfigError("[mirrors] must map URL prefixes to strings", where=str(user_config_path()))
    _refuse_options(user_mirrors, f"{user_config_path()} (mirrors)")
    mirrors.update(user_mirrors)
    if config is not None:
        mirrors.update(config.mirrors)
    mirrors.update(parse_mirror_env(os.environ.get(MIRRORS_ENV, "")))
    root = config.root if config is not None else Path.cwd()
    chosen_work = work_dir or os.environ.get("STACKBUILD_WORK") or root / "work"
    return Settings(
        cache_dir=default_cache_dir(),
        work_dir=Path(chosen_work).resolve(),
        dist_dir=Path(os.environ.get("STACKBUILD_DIST") or root / "dist").resolve(),
        results_dir=Path(os.environ.get("STACKBUILD_RESULTS") or root / "results").resolve(),
        mirrors=MappingProxyType(mirrors),
    )
