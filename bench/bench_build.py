"""Build cache benchmark: no-op rerun and one-patch rebuild, each against a full rebuild.

A stack of N small C-extension packages (each its own source, the first one patched) is built
on a real Docker Engine. Reported, as medians of --repeat runs in the same session:
  full      every wheel rebuilt (--force)
  one-patch the first package's patch changed: only its wheel is rebuilt
  no-op     nothing changed: keys computed, nothing built, dist/ left as it is
  no-op CLI the same through `stackbuild build` in a fresh process (what a user waits for)
With --vllm, also the no-op rerun of examples/cpu (vLLM python-only; needs a wheelhouse, see
docs/build.md), after one real build.

    python bench/bench_build.py [--packages 4] [--repeat 3] [--vllm] [--json]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from builder import build as B  # noqa: E402
from builder.config import load_config  # noqa: E402
from builder.settings import load_settings  # noqa: E402

C_TEMPLATE = """#include <Python.h>
static PyObject *answer(PyObject *self, PyObject *args) {{ return PyLong_FromLong({value}); }}
static PyMethodDef methods[] = {{{{"answer", answer, METH_NOARGS, "answer"}}, {{NULL, NULL, 0, NULL}}}};
static struct PyModuleDef mod = {{PyModuleDef_HEAD_INIT, "{name}", NULL, -1, methods}};
PyMODINIT_FUNC PyInit_{name}(void) {{ return PyModule_Create(&mod); }}
"""


def package(root: Path, name: str) -> tuple[Path, str]:
    files = {
        f"{name}-1.0/setup.py": (f"from setuptools import setup, Extension\nsetup(name={name!r}, version='1.0', "
                                 f"ext_modules=[Extension({name!r}, ['{name}.c'])])\n").encode(),
        f"{name}-1.0/{name}.c": C_TEMPLATE.format(name=name, value=0).encode(),
    }
    path = root / f"{name}-1.0.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for member, data in files.items():
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def patch_text(value: int) -> str:
    return ("--- a/pkg0.c\n+++ b/pkg0.c\n@@ -1,3 +1,3 @@\n #include <Python.h>\n"
            "-static PyObject *answer(PyObject *self, PyObject *args) { return PyLong_FromLong(0); }\n"
            f"+static PyObject *answer(PyObject *self, PyObject *args) {{ return PyLong_FromLong({value}); }}\n"
            ' static PyMethodDef methods[] = {{"answer", answer, METH_NOARGS, "answer"}, {NULL, NULL, 0, NULL}};\n')


def project(root: Path, count: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    lines = ['[build]\nrecipe = "cpu"\n']
    names = []
    for i in range(count):
        path, sha = package(root, f"pkg{i}")
        lines.append(f'[sources.pkg{i}]\narchive = "{path}"\nsha256 = "{sha}"\n')
        names.append(f'"pkg{i}"')
    lines.append('[series.pkg0]\nsource = "pkg0"\n')
    lines.append(f'[stacks.bench]\nseries = ["pkg0"]\nsources = [{", ".join(names)}]\n')
    (root / "patches" / "pkg0").mkdir(parents=True)
    (root / "patches" / "pkg0" / "series").write_text("answer.patch\n")
    (root / "patches" / "pkg0" / "answer.patch").write_text(patch_text(1))
    (root / "stack.toml").write_text("\n".join(lines))
    return root / "stack.toml"


def timed(stack_file: Path, stack: str, **kw) -> tuple[float, dict]:
    cfg = load_config(stack_file)
    t0 = time.perf_counter()
    manifest = B.build_stack(load_settings(cfg), cfg, stack, **kw)
    return time.perf_counter() - t0, manifest


def cli_noop(stack_file: Path, stack: str) -> float:
    code = "import builder.cli.build; from builder.cli import main; main()"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, "--stack", str(stack_file), "build", stack, "--quiet"],
                   check=True, stdout=subprocess.DEVNULL, cwd=REPO)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--packages", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--vllm", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="stackbuild-bench-"))
    os.environ.update({"STACKBUILD_CACHE": str(work / "cache"), "STACKBUILD_WORK": str(work / "work"),
                       "STACKBUILD_DIST": str(work / "dist")})
    if os.path.isfile("/etc/ssl/certs/ca-certificates.crt"):
        os.environ.setdefault("STACKBUILD_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")
    try:
        stack_file = project(work / "p", args.packages)
        timed(stack_file, "bench")  # warm: recipe image, pip cache of build requirements
        full, one, noop, noop_cli = [], [], [], []
        for i in range(args.repeat):
            full.append(timed(stack_file, "bench", force=True)[0])
            (work / "p" / "patches" / "pkg0" / "answer.patch").write_text(patch_text(100 + i))
            seconds, manifest = timed(stack_file, "bench")
            assert manifest["summary"]["built"] == ["pkg0"], manifest["summary"]
            one.append(seconds)
            seconds, manifest = timed(stack_file, "bench")
            assert manifest["summary"]["built"] == [], manifest["summary"]
            noop.append(seconds)
            noop_cli.append(cli_noop(stack_file, "bench"))
        m = {k: statistics.median(v) for k, v in
             {"full": full, "one_patch": one, "noop": noop, "noop_cli": noop_cli}.items()}
        result = {
            "packages": args.packages, "repeat": args.repeat, "median_seconds": m,
            "one_patch_vs_full": m["one_patch"] / m["full"], "noop_vs_full": m["noop"] / m["full"],
        }
        if args.vllm:
            example = REPO / "examples" / "cpu" / "stack.toml"
            build_s, _ = timed(example, "cpu-demo")
            result["vllm"] = {"first_build": build_s,
                              "noop": statistics.median(timed(example, "cpu-demo")[0] for _ in range(args.repeat)),
                              "noop_cli": statistics.median(cli_noop(example, "cpu-demo") for _ in range(args.repeat))}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{args.packages} C-extension sources, medians of {args.repeat}:")
    print(f"  full rebuild      {m['full']:7.2f} s")
    print(f"  one-patch rebuild {m['one_patch']:7.2f} s  ({result['one_patch_vs_full']:.0%} of full)")
    print(f"  no-op rerun       {m['noop']:7.3f} s  ({result['noop_vs_full']:.1%} of full)")
    print(f"  no-op via CLI     {m['noop_cli']:7.3f} s  (fresh process)")
    if "vllm" in result:
        v = result["vllm"]
        print(f"vLLM cpu-demo: first build {v['first_build']:.1f} s, no-op {v['noop']:.3f} s, "
              f"no-op via CLI {v['noop_cli']:.3f} s")


if __name__ == "__main__":
    main()
