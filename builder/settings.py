"""Machine-level settings: where the cache, work trees and outputs live, the mirror map, and
every `STACKBUILD_*` environment override.

These belong to the host, not to the stack: the same stack.toml works on the lab box, in CI and
on an offline machine because URLs are rewritten here, never in the stack file.

Precedence, highest first (cibuildwheel's order): a command-line option; the environment
(`OVERRIDES` below, the only `STACKBUILD_*` names stackbuild reads); the stack file (a stack's
own table over the stacks it extends, over a variant's, over the top level); the user config
file (mirrors only); what a recipe's Dockerfile declares; the built-in default. Functions that
read the environment take it as a mapping (default `os.environ`), so callers and tests can pass
their own.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

from typing import TYPE_CHECKING

from .errors import ConfigError
from .schema import looks_like_option

if TYPE_CHECKING:
    from .config import Config

MIRRORS_ENV = "STACKBUILD_MIRRORS"


@dataclass(frozen=True)
class Override:
    name: str  # the variable; one ending in "_" is a prefix (NAME_<X>)
    replaces: str  # what it takes precedence over
    meaning: str


OVERRIDES = (
    Override("STACKBUILD_STACK", "the stack.toml found from the working directory up", "the stack file, or its folder"),
    Override("STACKBUILD_CACHE", "$XDG_CACHE_HOME/stackbuild", "the cache: mirrors, archives, wheels, venvs, the tiny model"),
    Override("STACKBUILD_WORK", "work/ beside stack.toml", "worktrees and states"),
    Override("STACKBUILD_DIST", "dist/ beside stack.toml", "built stacks"),
    Override("STACKBUILD_RESULTS", "results/ beside stack.toml", "smoke results records"),
    Override(MIRRORS_ENV, "[mirrors] of stack.toml and of the user config", "URL prefix rewrites, PREFIX=TARGET;..."),
    Override("STACKBUILD_BASE_IMAGE", "build.base; the recipe's ARG BASE", "the build's base image"),
    Override("STACKBUILD_WHEELHOUSE", "build.wheelhouse", "a folder of wheels the build and serving installs use"),
    Override("STACKBUILD_CA_BUNDLE", "build.ca_bundle", "the CA bundle given to builds and serving images"),
    Override("STACKBUILD_INDEX_URL", "build.index_url", "the package index of builds and serving images"),
    Override("STACKBUILD_ENGINES", "build.engines", "Docker Engine URLs, comma-separated"),
    Override("STACKBUILD_BUILD_ARG_", "build.args.<NAME>", "build argument <NAME> (repository and index URLs)"),
    Override("STACKBUILD_DOCKERD_LOG", "/var/log/stackbuild-dockerd.log", "the log of the dockerd `stackbuild setup` starts"),
    Override("STACKBUILD_CRASH_AT", "nothing (tests only)", "kill the process at a named moment of a move"),
)
_NAMES = {o.name for o in OVERRIDES}


def env_value(name: str, env: Mapping[str, str] | None = None) -> str | None:
    """The override NAME (one of OVERRIDES) when it is set and not empty."""
    assert name in _NAMES, f"{name} is not in settings.OVERRIDES"
    value = (os.environ if env is None else env).get(name)
    return value or None


def env_prefixed(prefix: str, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The set, non-empty overrides PREFIX<X> (a prefix of OVERRIDES), keyed by <X>."""
    assert prefix in _NAMES and prefix.endswith("_"), f"{prefix} is not a prefix in settings.OVERRIDES"
    items = (os.environ if env is None else env).items()
    return {k[len(prefix):]: v for k, v in items if k.startswith(prefix) and k != prefix and v}


def user_config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "stackbuild" / "config.toml"


def default_cache_dir(env: Mapping[str, str] | None = None) -> Path:
    chosen = env_value("STACKBUILD_CACHE", env)
    if chosen:
        return Path(chosen).resolve()
    base = (os.environ if env is None else env).get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
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


def load_settings(config: Config | None = None, *, work_dir: str | os.PathLike | None = None,
                  env: Mapping[str, str] | None = None) -> Settings:
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
    mirrors.update(parse_mirror_env(env_value(MIRRORS_ENV, env) or ""))
    root = config.root if config is not None else Path.cwd()
    chosen_work = work_dir or env_value("STACKBUILD_WORK", env) or root / "work"
    return Settings(
        cache_dir=default_cache_dir(env),
        work_dir=Path(chosen_work).resolve(),
        dist_dir=Path(env_value("STACKBUILD_DIST", env) or root / "dist").resolve(),
        results_dir=Path(env_value("STACKBUILD_RESULTS", env) or root / "results").resolve(),
        mirrors=MappingProxyType(mirrors),
    )
