"""[build] and [sources.NAME.build], read: the recipe a stack builds with and how each source
becomes a wheel. Read with the one configuration dialect (schema.py), so an error names the
file, line and key it came from, also in a table merged over `extends` and a variant; host
inputs may be overridden from the environment (settings.OVERRIDES).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

from . import schema, versions
from .config import Config, ResolvedStack, Source, located
from .errors import ConfigError
from .schema import UNLOCATED, Locator, Unlocated
from .settings import env_prefixed, env_value

BUILD_KEYS = {"recipe", "base", "args", "env", "wheelhouse", "ca_bundle", "index_url", "extra_index_urls",
              "caches", "memory_gb", "disk_gb", "engines", "timeout"}
SOURCE_BUILD_KEYS = {"command", "env", "requires", "needs", "directory", "skip", "version", "compile_check",
                     "import_check"}
# What a --recipe override drops from the stack's [build]: they describe the stack's own recipe.
RECIPE_BOUND_KEYS = ("base", "args", "memory_gb", "disk_gb")
IMPORT_MODES = ("auto", "strict", "off")
CACHE_KINDS = ("pip", "ccache")
DEFAULT_COMMAND = 'python -m pip wheel --no-deps --use-pep517 -w "$OUT" .'
CONTAINERS = Path(__file__).resolve().parent.parent / "containers"


@dataclass(frozen=True)
class Recipe:
    """The [build] table of a stack, resolved: what image, which host inputs, which engines."""

    name: str
    dockerfile: Path
    base: str
    args: Mapping[str, str]
    env: Mapping[str, str]
    wheelhouse: Path | None
    ca_bundle: Path | None
    index_url: str | None
    extra_index_urls: tuple[str, ...]
    caches: Mapping[str, Path]
    memory_gb: float
    disk_gb: float
    engines: tuple[str, ...]
    timeout: int

    @property
    def dockerfile_bytes(self) -> bytes:
        return self.dockerfile.read_bytes()


@dataclass(frozen=True)
class SourceBuild:
    """How one source becomes a wheel: [sources.NAME.build]."""

    command: str = DEFAULT_COMMAND
    env: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    requires: tuple[str, ...] = ()
    needs: tuple[str, ...] = ()
    directory: str = ""
    skip: bool = False
    version: str | None = None  # overrides the version derived from a git pin (builder/versions.py)
    compile_check: bool = True  # every module of the wheel byte-compiles (builder/wheelcheck.py)
    import_check: str = "auto"  # auto | strict | off: importing the wheel's top packages


def find_dockerfile(name: str, root: Path) -> Path:
    """`recipe = "cpu"` is containers/Dockerfile.cpu of the project, else the one stackbuild ships;
    anything with a slash is a path relative to stack.toml."""
    if "/" in name or name.startswith("Dockerfile"):
        candidates = [root / name]
    else:
        candidates = [root / "containers" / f"Dockerfile.{name}", CONTAINERS / f"Dockerfile.{name}"]
    for path in candidates:
        if path.is_file():
            return path.resolve()
    raise ConfigError(f"no Dockerfile for recipe '{name}'", where="build.recipe",
                      hint=f"looked at {', '.join(str(c) for c in candidates)}")


def dockerfile_defaults(path: Path) -> dict[str, str]:
    """What a recipe declares about itself: `ARG BASE=...` and `# stackbuild: memory_gb=N disk_gb=N`."""
    out: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        m = re.match(r"^\s*ARG\s+BASE=(\S+)", line)
        if m and "base" not in out:
            out["base"] = m.group(1)
        m = re.match(r"^#\s*stackbuild:\s*(.+)$", line)
        if m:
            out.update(dict(pair.split("=", 1) for pair in m.group(1).split() if "=" in pair))
    return out


def _path(root: Path, value: str) -> Path:
    path = Path(os.path.expanduser(value))
    return (path if path.is_absolute() else root / path).resolve()


def parse_recipe(table: Mapping[str, Any], root: Path, loc: Locator = UNLOCATED, prefix: str = "build",
                 env: Mapping[str, str] | None = None) -> Recipe:
    """The merged [build] table, with the environment's overrides of host-specific inputs."""
    def key(name: str) -> str:
        return f"{prefix}.{name}" if isinstance(loc, Unlocated) else name

    schema.check_keys(loc, "" if not isinstance(loc, Unlocated) else prefix, table, BUILD_KEYS, title=f"[{prefix}]")
    name = schema.string(loc, key("recipe"), table.get("recipe", "cpu"))
    dockerfile = find_dockerfile(name, root)
    declared = dockerfile_defaults(dockerfile)
    base = env_value("STACKBUILD_BASE_IMAGE", env) or table.get("base") or declared.get("base")
    if not base:
        raise loc.error(key("base"), "the build needs a base image", hint='set base = "stackbuild/base:bookworm" in [build]')
    wheelhouse = env_value("STACKBUILD_WHEELHOUSE", env) or table.get("wheelhouse")
    ca = env_value("STACKBUILD_CA_BUNDLE", env) or table.get("ca_bundle")
    caches = schema.str_map(loc, key("caches"), table.get("caches", {}))
    for kind in caches:
        if kind not in CACHE_KINDS:
            raise loc.error(f"{key('caches')}.{kind}", f"unknown cache '{kind}'", hint="caches are 'pip' and 'ccache'")
    env_engines = [e for e in (env_value("STACKBUILD_ENGINES", env) or "").split(",") if e.strip()]
    index_url = env_value("STACKBUILD_INDEX_URL", env) or table.get("index_url")
    recipe = Recipe(
        name=name,
        dockerfile=dockerfile,
        base=schema.string(loc, key("base"), base),
        args=MappingProxyType({**schema.str_map(loc, key("args"), table.get("args", {})),
                               **env_prefixed("STACKBUILD_BUILD_ARG_", env)}),
        env=MappingProxyType(schema.str_map(loc, key("env"), table.get("env", {}))),
        wheelhouse=_path(root, schema.string(loc, key("wheelhouse"), wheelhouse)) if wheelhouse else None,
        ca_bundle=_path(root, schema.string(loc, key("ca_bundle"), ca)) if ca else None,
        index_url=schema.string(loc, key("index_url"), index_url) if index_url else None,
        extra_index_urls=schema.strings(loc, key("extra_index_urls"), table.get("extra_index_urls", [])),
        caches=MappingProxyType({k: _path(root, v) for k, v in caches.items()}),
        memory_gb=_declared_number(loc, key("memory_gb"), table, declared, "memory_gb", 4),
        disk_gb=_declared_number(loc, key("disk_gb"), table, declared, "disk_gb", 10),
        engines=tuple(env_engines) or schema.strings(loc, key("engines"), table.get("engines", [])),
        timeout=schema.integer(loc, key("timeout"), table.get("timeout", 7200), 1, 7 * 24 * 3600),
    )
    if recipe.wheelhouse is not None and not recipe.wheelhouse.is_dir():
        raise loc.error(key("wheelhouse"), f"wheelhouse {recipe.wheelhouse} is not a folder",
                        hint="create it, or unset STACKBUILD_WHEELHOUSE / build.wheelhouse")
    if recipe.ca_bundle is not None and not recipe.ca_bundle.is_file():
        raise loc.error(key("ca_bundle"), f"CA bundle {recipe.ca_bundle} does not exist")
    return recipe


def _declared_number(loc: Locator, key: str, table: Mapping[str, Any], declared: Mapping[str, str], name: str,
                     default: float) -> float:
    """The table's number, else the one the Dockerfile declares (`# stackbuild: memory_gb=16`)."""
    if name in table:
        return schema.number(loc, key, table[name], 0)
    try:
        return float(declared.get(name, default))
    except ValueError:
        raise ConfigError(f"the recipe declares {name}={declared[name]!r}, not a number",
                          where=key, hint="fix the '# stackbuild:' line of the Dockerfile") from None


def parse_source_build(source: Source, loc: Locator = UNLOCATED) -> SourceBuild:
    key = f"sources.{source.name}.build"
    table = source.build
    schema.check_keys(loc, key, table, SOURCE_BUILD_KEYS)
    directory = str(table.get("directory", "")).strip("/")
    if ".." in Path(directory).parts:
        raise loc.error(f"{key}.directory", "'directory' must stay inside the source")
    compile_check = schema.boolean(loc, f"{key}.compile_check", table.get("compile_check", True))
    import_check = table.get("import_check", "auto")
    if import_check not in IMPORT_MODES:
        raise loc.error(f"{key}.import_check", f"'import_check' must be one of {', '.join(IMPORT_MODES)}, not {import_check!r}")
    version = table.get("version")
    if version is not None:
        problem = versions.check_version(version) if isinstance(version, str) else "'version' must be a string"
        if problem:
            raise loc.error(f"{key}.version", problem, hint='e.g. version = "0.20.2.dev0+gc51df4300"')
    return SourceBuild(
        command=schema.string(loc, f"{key}.command", table.get("command", DEFAULT_COMMAND)),
        env=MappingProxyType(schema.str_map(loc, f"{key}.env", table.get("env", {}))),
        requires=schema.strings(loc, f"{key}.requires", table.get("requires", [])),
        needs=schema.strings(loc, f"{key}.needs", table.get("needs", [])),
        directory=directory,
        skip=schema.boolean(loc, f"{key}.skip", table.get("skip", False)),
        version=version,
        compile_check=compile_check,
        import_check=import_check,
    )


def stack_recipe(cfg: Config, resolved: ResolvedStack, recipe: str | None = None,
                 env: Mapping[str, str] | None = None) -> Recipe:
    """RECIPE (`--recipe`) replaces the stack's; its base image, build args and host needs then come
    from that recipe's Dockerfile (and STACKBUILD_BASE_IMAGE), not from the stack's [build]."""
    table = dict(resolved.build)
    if recipe is not None and recipe != table.get("recipe", "cpu"):
        table = {k: v for k, v in table.items() if k not in RECIPE_BOUND_KEYS}
        table["recipe"] = recipe
    return parse_recipe(table, cfg.root, located(cfg, resolved, "build"), env=env)
