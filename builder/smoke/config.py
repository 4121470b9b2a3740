"""The smoke schema: [smoke] tables, profiles, canaries, bench, gates and containers, validated."""

from __future__ import annotations

import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping, Sequence
from .. import tinymodel
from .. import schema
from ..config import Config, ResolvedStack, deep_merge, located, thaw
from ..errors import ConfigError


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


def _str_map(k: schema.Layered, key: str, value: Any) -> Mapping[str, str]:
    return MappingProxyType(schema.str_map(k, key, value))


def _check_template(k: schema.Layered, key: str, items: Sequence[str]) -> None:
    dummy = {name: "x" for name in PLACEHOLDERS}
    for item in items:
        try:
            item.format_map(dummy)
        except (KeyError, ValueError, IndexError) as exc:
            raise k.error(key, f"'{item}' has an unknown placeholder or a stray brace ({exc})",
                          hint=f"placeholders: {', '.join('{' + p + '}' for p in PLACEHOLDERS)}; write {{{{ for a brace") from exc


def _parse_canary(k: schema.Layered, index: int, raw: Any) -> Canary:
    raw = schema.table(k, "canaries", raw)
    schema.check_keys(k, "canaries", raw, CANARY_KEYS, title="[smoke.canaries]")
    name = schema.string(k, "canaries", raw.get("name", f"canary-{index + 1}"))
    expect_regex = raw.get("expect_regex")
    if expect_regex is not None:
        try:
            re.compile(schema.string(k, "canaries", expect_regex))
        except re.error as exc:
            raise k.error("canaries", f"canary '{name}': expect_regex is not a valid regex: {exc}") from None
    sha = raw.get("expect_sha256")
    if sha is not None and not (isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha)):
        raise k.error("canaries", f"canary '{name}': expect_sha256 must be 64 lowercase hex digits",
                      hint="copy it from a results file: checks[].figures.sha256")
    expect = raw.get("expect")
    if expect is not None:
        expect = str(expect) if isinstance(expect, (int, float)) and not isinstance(expect, bool) else schema.string(k, "canaries", expect)
    tokens = raw.get("expect_tokens")
    return Canary(
        name=name,
        prompt=schema.string(k, "canaries", raw.get("prompt")),
        chat=schema.boolean(k, "canaries", raw.get("chat", False)),
        stream=schema.boolean(k, "canaries", raw.get("stream", False)),
        max_tokens=schema.integer(k, "canaries", raw.get("max_tokens", 16), 1, 1 << 20),
        ignore_eos=schema.boolean(k, "canaries", raw.get("ignore_eos", False)),
        expect=expect,
        expect_regex=expect_regex,
        expect_sha256=sha,
        expect_tokens=None if tokens is None else schema.integer(k, "canaries", tokens, 1, 1 << 20),
    )


def _parse_bench(k: schema.Layered, key: str, raw: Mapping) -> Bench:
    schema.check_keys(k, key, raw, BENCH_KEYS, title=f"[smoke.{key}]")
    base = Bench()
    return Bench(
        requests=schema.integer(k, f"{key}.requests", raw.get("requests", base.requests), 1, 100000),
        concurrency=schema.integer(k, f"{key}.concurrency", raw.get("concurrency", base.concurrency), 1, 4096),
        prompt_tokens=schema.integer(k, f"{key}.prompt_tokens", raw.get("prompt_tokens", base.prompt_tokens), 1, 1 << 22),
        max_tokens=schema.integer(k, f"{key}.max_tokens", raw.get("max_tokens", base.max_tokens), 1, 1 << 22),
        prompt=schema.string(k, f"{key}.prompt", raw.get("prompt", base.prompt)),
        rounds=schema.integer(k, f"{key}.rounds", raw.get("rounds", base.rounds), 1, 1000),
    )


def _parse_gates(k: schema.Layered, key: str, raw: Mapping) -> tuple[Gate, ...]:
    gates = []
    for metric, bound in raw.items():
        if metric not in METRICS:
            raise k.error(f"{key}.{metric}", f"unknown metric '{metric}' in gates",
                          hint=f"metrics: {', '.join(METRICS)}")
        if isinstance(bound, (int, float)) and not isinstance(bound, bool):
            bound = {"min": bound} if metric in HIGHER_IS_BETTER else {"max": bound}
        bound = schema.table(k, f"{key}.{metric}", bound)
        schema.check_keys(k, f"{key}.{metric}", bound, {"min", "max"}, title=f"[smoke.{key}.{metric}]")
        if not bound:
            raise k.error(f"{key}.{metric}", f"gate '{metric}' needs min or max")
        gates.append(Gate(metric,
                          None if "min" not in bound else float(schema.number(k, f"{key}.{metric}", bound["min"], -1e18, 1e18)),
                          None if "max" not in bound else float(schema.number(k, f"{key}.{metric}", bound["max"], -1e18, 1e18))))
    return tuple(gates)


def _parse_container(k: schema.Layered, raw: Any, cfg: Config, resolved: ResolvedStack) -> ContainerSpec:
    from ..recipes import stack_recipe

    raw = schema.table(k, "container", raw)
    schema.check_keys(k, "container", raw, CONTAINER_KEYS, title="[smoke.container]")
    shm = raw.get("shm_size")
    recipe = stack_recipe(cfg, resolved)
    return ContainerSpec(
        wheelhouse=recipe.wheelhouse,
        ca_bundle=recipe.ca_bundle,
        index_url=recipe.index_url,
        image=schema.string(k, "container.image", raw.get("image")),
        devices=schema.strings(k, "container.devices", raw.get("devices", [])),
        group_add=tuple(str(g) for g in _get_list_or_ints(k, "container.group_add", raw.get("group_add", []))),
        shm_size=None if shm is None else str(shm),
        ipc_mode=None if raw.get("ipc_mode") is None else schema.string(k, "container.ipc_mode", raw["ipc_mode"]),
        network_mode=schema.string(k, "container.network_mode", raw.get("network_mode", "host")),
        volumes=_str_map(k, "container.volumes", raw.get("volumes", {})),
        privileged=schema.boolean(k, "container.privileged", raw.get("privileged", False)),
        cap_add=schema.strings(k, "container.cap_add", raw.get("cap_add", [])),
        packages=_get_packages(k, raw.get("packages", [])),
    )


def _get_packages(k: schema.Layered, value: Any) -> tuple[str, ...]:
    packages = schema.strings(k, "container.packages", value)
    for name in packages:
        if not DEBIAN_PACKAGE.fullmatch(name):
            raise k.error("container.packages", f"'{name}' is not a Debian package name",
                          hint="lowercase letters, digits and + . - only, e.g. libnuma1")
    return packages


def _get_list_or_ints(k: schema.Layered, key: str, value: Any) -> tuple:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in value):
        raise k.error(key, f"'{key}' must be a list of group names or numeric ids")
    return tuple(value)


def load_smoke_config(cfg: Config, resolved: ResolvedStack) -> SmokeConfig:
    """The merged [smoke] tables of a stack (top level <- extends chain) as a frozen model."""
    k = located(cfg, resolved, "smoke")
    raw = thaw(resolved.smoke)
    schema.check_keys(k, "", raw, SMOKE_KEYS, title="[smoke]")
    runtime = raw.get("runtime", "venv")
    if runtime not in RUNTIMES:
        raise k.error("runtime", f"runtime must be one of {', '.join(RUNTIMES)}, not {runtime!r}")
    container = _parse_container(k, raw["container"], cfg, resolved) if "container" in raw else None
    if runtime == "container" and container is None:
        raise k.error("runtime", "runtime 'container' needs a [smoke.container] table with 'image'")
    model = schema.string(k, "model", raw.get("model", tinymodel.TINY))
    if tinymodel.is_builtin(model) and model != tinymodel.TINY:
        raise k.error("model", f"unknown builtin model '{model}'", hint=f"the builtin model is '{tinymodel.TINY}'")

    base_command = schema.strings(k, "command", raw.get("command", list(DEFAULT_COMMAND)))
    base_args = schema.strings(k, "args", raw.get("args", []))
    base_env = _str_map(k, "env", raw.get("env", {}))
    for key, items in (("command", base_command), ("args", base_args), ("env", tuple(base_env.values()))):
        _check_template(k, key, items)
    base_bench = _parse_bench(k, "bench", schema.table(k, "bench", raw.get("bench", {})))
    base_gates = schema.table(k, "gates", raw.get("gates", {}))
    defaults = {
        "max_model_len": schema.integer(k, "max_model_len", raw.get("max_model_len", 256), 1, 1 << 24),
        "ready_timeout": schema.number(k, "ready_timeout", raw.get("ready_timeout", 600), 1, 86400),
        "concurrency": schema.integer(k, "concurrency", raw.get("concurrency", 4), 0, 4096),
    }
    raw_profiles = schema.table(k, "profiles", raw.get("profiles", {})) or {"default": {}}
    profiles: dict[str, Profile] = {}
    for name, praw in raw_profiles.items():
        key = f"profiles.{name}"
        praw = schema.table(k, key, praw)
        schema.check_keys(k, key, praw, PROFILE_KEYS, title=f"[smoke.{key}]")
        command = schema.strings(k, f"{key}.command", praw["command"]) if "command" in praw else base_command
        args = schema.strings(k, f"{key}.args", praw.get("args", []))
        env = _str_map(k, f"{key}.env", praw.get("env", {}))
        for sub, items in (("command", command), ("args", args), ("env", tuple(env.values()))):
            _check_template(k, f"{key}.{sub}", items)
        bench_raw = deep_merge(asdict(base_bench), schema.table(k, f"{key}.bench", praw.get("bench", {})))
        gates_raw = deep_merge(base_gates, schema.table(k, f"{key}.gates", praw.get("gates", {})))
        profiles[name] = Profile(
            name=name,
            description=schema.string(k, f"{key}.description", praw["description"]) if "description" in praw else "",
            command=command,
            args=base_args + args,
            env=MappingProxyType({**DEFAULT_ENV, **base_env, **env}),
            max_model_len=schema.integer(k, f"{key}.max_model_len", praw.get("max_model_len", defaults["max_model_len"]), 1, 1 << 24),
            ready_timeout=float(schema.number(k, f"{key}.ready_timeout", praw.get("ready_timeout", defaults["ready_timeout"]), 1, 86400)),
            concurrency=schema.integer(k, f"{key}.concurrency", praw.get("concurrency", defaults["concurrency"]), 0, 4096),
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
    baseline_metrics = schema.strings(k, "baseline_metrics", raw.get("baseline_metrics", ["output_throughput", "total_token_throughput"]))
    for metric in baseline_metrics:
        if metric not in METRICS:
            raise k.error("baseline_metrics", f"unknown metric '{metric}'", hint=f"metrics: {', '.join(METRICS)}")
    header_paths = schema.strings(k, "header_paths", raw.get("header_paths", ["/version"]))
    for path in header_paths:
        if not path.startswith("/"):
            raise k.error("header_paths", f"'{path}' must be a URL path starting with '/'")
    port = schema.integer(k, "port", raw.get("port", 0), 0, 65535)
    return SmokeConfig(
        stack=resolved.name,
        model=model,
        served_model_name=schema.string(k, "served_model_name", raw.get("served_model_name", model)),
        runtime=runtime,
        python=schema.string(k, "python", raw.get("python", sys.executable if runtime == "host" else "python3")),
        host=schema.string(k, "host", raw.get("host", "127.0.0.1")),
        port=port,
        requirements=schema.strings(k, "requirements", raw.get("requirements", [])),
        pip_args=schema.strings(k, "pip_args", raw.get("pip_args", [])),
        uninstall=schema.strings(k, "uninstall", raw.get("uninstall", [])),
        wheels=schema.boolean(k, "wheels", raw.get("wheels", True)),
        request_timeout=float(schema.number(k, "request_timeout", raw.get("request_timeout", 300), 1, 86400)),
        canaries=canaries,
        determinism=schema.boolean(k, "determinism", raw.get("determinism", True)),
        expect_version=_str_map(k, "expect_version", raw.get("expect_version", {})),
        expect_headers=_str_map(k, "expect_headers", raw.get("expect_headers", {})),
        header_paths=header_paths,
        baseline=None if baseline is None else (cfg.root / schema.string(k, "baseline", baseline)),
        tolerance=float(schema.number(k, "tolerance", raw.get("tolerance", 0.10), 0, 100)),
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
