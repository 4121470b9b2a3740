"""Is this host ready to build? One line per check; a failed required check fails the run.

Memory is checked as RAM + swap against what the recipe declares (`memory_gb`): one SYCL compiler
process of the XPU kernels can pass 120 GB RSS, and running out of both kills the build hours in.
"""

from __future__ import annotations

import grp
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import docker.errors
import requests.exceptions

from . import engine as engines
from .recipes import Recipe
from .errors import EngineError

OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"
GB = 1024 ** 3


@dataclass(frozen=True)
class Check:
    name: str
    status: str
    detail: str
    required: bool


def meminfo(path: Path = Path("/proc/meminfo")) -> dict[str, int]:
    """Bytes per /proc/meminfo field."""
    out = {}
    for line in path.read_text().splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts:
            out[key] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return out


def check_memory(needed_gb: float, info: dict[str, int]) -> Check:
    ram, swap = info.get("MemTotal", 0) / GB, info.get("SwapTotal", 0) / GB
    detail = f"RAM {ram:.1f} GB + swap {swap:.1f} GB = {ram + swap:.1f} GB, recipe declares {needed_gb:g} GB"
    if ram + swap >= needed_gb:
        return Check("memory", OK, detail, False)
    return Check("memory", WARN, detail + "; add swap or lower MAX_JOBS, or compilers get killed", False)


def check_disk(path: Path, needed_gb: float) -> Check:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free / GB
    detail = f"{free:.1f} GB free at {probe}, recipe declares {needed_gb:g} GB"
    return Check("disk", OK if free >= needed_gb else FAIL, detail, True)


def check_engine(url: str | None) -> tuple[Check, engines.Engine | None]:
    try:
        eng = engines.connect(url, timeout=15)
        v = eng.version()
    except EngineError as exc:
        return Check("docker", FAIL, str(exc), True), None
    return Check("docker", OK, f"Docker Engine {v.get('Version')} (API {v.get('ApiVersion')}) at {eng.name}", True), eng


def check_base_image(eng: engines.Engine | None, recipe: Recipe) -> Check:
    name = f"base image ({recipe.name})"
    if eng is None:
        return Check(name, SKIP, "no engine", True)
    image_id = eng.image_id(recipe.base)
    if image_id:
        return Check(name, OK, f"{recipe.base} is on the engine ({image_id[:19]})", True)
    try:
        eng.client.images.get_registry_data(recipe.base)
    except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return Check(name, FAIL, f"{recipe.base} is neither on the engine nor reachable: {reason}; "
                                 f"make it with stackbuild setup --image {recipe.base} (as root)", True)
    return Check(name, OK, f"{recipe.base} is reachable in its registry", True)


def check_render_nodes(dri: Path = Path("/dev/dri")) -> Check:
    nodes = sorted(p.name for p in dri.glob("renderD*")) if dri.is_dir() else []
    if nodes:
        return Check("render nodes", OK, f"{', '.join(nodes)} in {dri}", True)
    return Check("render nodes", FAIL, f"no renderD* node in {dri}", True)


def check_groups(groups: Callable[[], list[int]] = os.getgroups, euid: Callable[[], int] = os.geteuid) -> Check:
    if euid() == 0:
        return Check("gpu groups", OK, "root: render nodes are open to it", True)
    mine = set(groups())
    missing = []
    for group in ("render", "video"):
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            missing.append(f"{group} (no such group)")
            continue
        if gid not in mine:
            missing.append(group)
    if missing:
        return Check("gpu groups", FAIL, f"not in: {', '.join(missing)}; sudo usermod -aG render,video $USER", True)
    return Check("gpu groups", OK, "member of render and video", True)


def run_checks(recipes: list[Recipe], *, engine_url: str | None, disk_path: Path, extra: Sequence[Check] = ()) -> dict:
    """EXTRA: checks the caller made itself (a variant's precompiled ops, builder/opsprobe.py)."""
    checks: list[Check] = []
    engine_check, eng = check_engine(engine_url)
    checks.append(engine_check)
    checks.append(check_disk(disk_path, max((r.disk_gb for r in recipes), default=10)))
    checks.append(check_memory(max((r.memory_gb for r in recipes), default=4), meminfo()))
    seen = set()
    for recipe in recipes:
        if (recipe.name, recipe.base) in seen:
            continue
        seen.add((recipe.name, recipe.base))
        checks.append(check_base_image(eng, recipe))
        if recipe.name == "xpu":
            checks.append(check_render_nodes())
            checks.append(check_groups())
    checks.extend(extra)
    ok = not any(c.required and c.status == FAIL for c in checks)
    return {"ok": ok, "checks": [asdict(c) for c in checks]}
