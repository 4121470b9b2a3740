"""The in-container wheel check, run here as the container runs it: a script over a folder of wheels."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from builder import build as B
from builder import recipes as R
from builder import wheelcheck as W

SCRIPT = Path(W.__file__)


def wheel(folder: Path, name: str, files: dict[str, str], top_level: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for member, text in files.items():
            zf.writestr(member, text)
        zf.writestr(f"{name}-1.0.dist-info/METADATA", f"Name: {name}\nVersion: 1.0\n")
        if top_level is not None:
            zf.writestr(f"{name}-1.0.dist-info/top_level.txt", top_level)
    return path


def run(out: Path, *args: str) -> tuple[int, dict, str]:
    proc = subprocess.run([sys.executable, str(SCRIPT), str(out), *args], capture_output=True, text=True,
                          cwd=out.parent)
    return proc.returncode, json.loads((out / W.REPORT).read_text()), proc.stdout


def test_clean_wheel_compiles_and_imports(tmp_path):
    wheel(tmp_path / "out", "good", {"good/__init__.py": "from .core import answer\n",
                                     "good/core.py": "# -*- coding: latin-1 -*-\nanswer = 42  # \xe9\n"})
    code, report, stdout = run(tmp_path / "out", "compile", "auto")
    assert code == 0 and report["ok"]
    [entry] = report["wheels"]
    assert entry["compiled"] == 2 and entry["compile_errors"] == []
    assert [(i["module"], i["status"]) for i in entry["imports"]] == [("good", "ok")]
    assert "2 modules byte-compile" in stdout


def test_syntax_error_names_every_file_and_line(tmp_path):
    wheel(tmp_path / "out", "bad", {"bad/__init__.py": "x = 1\n", "bad/a.py": "def f(:\n    pass\n",
                                    "bad/b.py": "if True:\n        x = 1\n    y = 2\n"})
    code, report, stdout = run(tmp_path / "out", "compile", "auto")
    assert code == W.FAILED and not report["ok"]
    errors = {(e["file"], e["line"], e["type"]) for e in report["wheels"][0]["compile_errors"]}
    assert errors == {("bad/a.py", 1, "SyntaxError"), ("bad/b.py", 3, "IndentationError")}
    assert "imports" not in report["wheels"][0]  # nothing to import from a wheel that does not compile
    assert "bad/a.py:1: SyntaxError" in stdout


@pytest.mark.parametrize("init, status, kind", [
    ("import numpy_that_is_not_installed_here\n", "skipped", "ModuleNotFoundError"),
    ("raise RuntimeError('no XPU device')\n", "skipped", "RuntimeError"),
    ("x = undefined_name\n", "failed", "NameError"),
    ("from . import missing_module\n", "failed", "ImportError"),
    ("import pkg.gone\n", "failed", "ModuleNotFoundError"),
    ("from .core import nothing\n", "failed", "ImportError"),
])
def test_import_outcomes(tmp_path, init, status, kind):
    wheel(tmp_path / "out", "pkg", {"pkg/__init__.py": init, "pkg/core.py": "answer = 1\n"})
    code, report, _ = run(tmp_path / "out", "compile", "auto")
    [imp] = report["wheels"][0]["imports"]
    assert (imp["module"], imp["status"], imp["type"]) == ("pkg", status, kind), imp
    assert code == (W.FAILED if status == "failed" else 0)
    if status == "failed" and kind == "NameError":
        assert imp["where"] == {"file": "pkg/__init__.py", "line": 1}
    strict = run(tmp_path / "out", "compile", "strict")
    assert strict[0] == W.FAILED


def test_a_wheel_that_is_no_zip_fails(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x-1-py3-none-any.whl").write_text("not a zip")
    code, report, stdout = run(tmp_path / "out", "no-compile", "off")
    assert code == W.FAILED and report["wheels"][0]["compile_errors"][0]["type"] == "BadZipFile"
    assert "  x-1-py3-none-any.whl: BadZipFile: the wheel is not a zip archive" in stdout


def test_import_only(tmp_path):
    wheel(tmp_path / "out", "pkg", {"pkg/__init__.py": "x = 1\n", "pkg/broken_but_unimported.py": "def (\n"})
    code, report, _ = run(tmp_path / "out", "no-compile", "auto")
    assert code == 0 and report["wheels"][0]["imports"][0]["status"] == "ok"
    assert "compiled" not in report["wheels"][0]


def test_top_level_names():
    assert W.top_names(["a/__init__.py", "a/b.py", "m.py", "a-1.dist-info/RECORD", "a-1.data/scripts/x.py",
                        "ns/x.py"]) == ["a", "m"]


def test_check_failure_names_file_line_and_the_patch():
    report = {"ok": False, "wheels": [{"file": "t-1-py3-none-any.whl", "compiled": 3, "compile_errors": [
        {"file": "t/core.py", "line": 2, "type": "SyntaxError", "message": "invalid syntax", "text": ""}]}]}
    src = B.Source("t", "git", url="https://example.invalid/t.git", commit="a" * 40)
    item = B.BuildInput(src, Path(), "a" * 40, (B.PatchInput("t/0001-x.patch", "0" * 64, paths=("t/core.py",)),))
    err = B._check_failure("t", report, item, Path("/logs/t.log"))
    assert str(err).startswith("/logs/t.log: t: t/core.py:2: SyntaxError: invalid syntax")
    assert "t/0001-x.patch" in err.hint


def test_check_keys_are_validated_and_enter_the_key(tmp_path):
    src = B.Source("p", "pypi", pypi="p==1", build={"import_check": "sometimes"})
    with pytest.raises(B.ConfigError, match="'import_check' must be one of auto, strict, off"):
        R.parse_source_build(src)
    recipe = R.parse_recipe({"recipe": "cpu"}, tmp_path)
    item = B.BuildInput(B.Source("p", "pypi", pypi="p==1"), Path(), "c" * 40)
    assert B.cache_key(item, R.SourceBuild(), recipe, "i", []) != B.cache_key(
        item, R.SourceBuild(import_check="off"), recipe, "i", [])
    script = B.build_script(recipe, R.SourceBuild(), False)
    assert 'python /sb/wheelcheck.py "$OUT" compile auto' in script
    assert "wheelcheck" not in B.build_script(recipe, R.SourceBuild(compile_check=False, import_check="off"), False)
