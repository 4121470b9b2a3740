"""Checks each built wheel inside the build container: every module byte-compiles, and the top
package imports where the container's runtime allows it.

Copied into the container as a script and run by the container's own Python (standard library
only), after the build command, over the wheels in $OUT. It writes a JSON report beside them and
exits 4 when a check fails, so the host can name the file and line instead of a log tail.

Byte-compiling is what `compileall` does to each file (the builtin `compile`, coding cookies
honoured), done in memory on the wheel's members, so nothing is written and every error is kept.
The import runs in a child process with the unpacked wheel first on sys.path, in a scratch folder. A build container is
not a serving runtime: it lacks the package's dependencies, GPUs and system libraries. So in
`auto` mode an import fails the build only when the cause is the wheel's own code — a NameError or
syntax error, or an import of a module or name of the wheel's own packages that is not there;
any other failure (a dependency not installed, a shared library missing, no device) is recorded
as skipped with its reason. `strict` fails on any import error; `off` does not import.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import traceback
import zipfile
from pathlib import Path

FAILED = 4
REPORT = "stackbuild-check.json"
MAX_ERRORS = 20
IMPORT_TIMEOUT = 600
CODE_ERRORS = ("NameError", "SyntaxError", "IndentationError", "TabError")
SHARED_OBJECT_HINTS = ("cannot open shared object file", "undefined symbol", "wrong ELF class")


def _compile_members(wheel: str, names: list[str]) -> list[dict]:
    errors: list[dict] = []
    with zipfile.ZipFile(wheel) as zf:
        for name in names:
            try:
                compile(zf.read(name), name, "exec", dont_inherit=True)
            except SyntaxError as exc:  # IndentationError and TabError are SyntaxErrors
                errors.append({"file": name, "line": exc.lineno, "type": type(exc).__name__,
                               "message": exc.msg, "text": (exc.text or "").strip()})
            except ValueError as exc:  # a NUL byte, an undecodable file
                errors.append({"file": name, "line": None, "type": type(exc).__name__, "message": str(exc), "text": ""})
    return errors


def compile_wheel(wheel: Path) -> tuple[int, list[dict]]:
    """(modules compiled, errors) for the .py members of WHEEL."""
    with zipfile.ZipFile(wheel) as zf:
        names = sorted(n for n in zf.namelist() if n.endswith(".py"))
    return len(names), _compile_members(str(wheel), names)


def top_names(names: list[str]) -> list[str]:
    """The packages and modules at a wheel's root."""
    found: dict[str, None] = {}
    for name in names:
        head, _, rest = name.partition("/")
        if head.endswith((".dist-info", ".data")):
            continue
        if not rest and head.endswith(".py"):
            found[head[:-3]] = None
        elif rest == "__init__.py":
            found[head] = None
    return sorted(found)


def wheel_tops(zf: zipfile.ZipFile) -> list[str]:
    """The public top-level names to import: top_level.txt when the wheel has one, else its root."""
    names = zf.namelist()
    listed = next((n for n in names if n.count("/") == 1 and n.split("/")[0].endswith(".dist-info")
                   and n.endswith("/top_level.txt")), None)
    if listed is not None:
        tops = [t.strip() for t in zf.read(listed).decode("utf-8", "replace").splitlines()]
        tops = [t for t in tops if t and not t.startswith("_") and t.isidentifier()]
        if tops:
            return tops
    return [t for t in top_names(names) if not t.startswith("_") and t.isidentifier()]


def _import_child(root: str, name: str) -> dict:
    """Runs in the child: import NAME from ROOT and describe what happened. ROOT takes the place
    of this script's own folder (/sb, beside the source tree) at the head of sys.path."""
    sys.path[0] = root
    try:
        __import__(name)
        return {"ok": True}
    except BaseException as exc:  # noqa: BLE001 - every failure is described, none escapes
        frames = traceback.extract_tb(exc.__traceback__)
        inside = [f for f in frames if f.filename.startswith(root + os.sep)]
        where = None
        if isinstance(exc, SyntaxError) and exc.filename and exc.filename.startswith(root + os.sep):
            where = {"file": os.path.relpath(exc.filename, root), "line": exc.lineno}
        elif inside:
            where = {"file": os.path.relpath(inside[-1].filename, root), "line": inside[-1].lineno}
        return {"ok": False, "type": type(exc).__name__, "message": str(exc).splitlines()[0] if str(exc) else "",
                "missing": getattr(exc, "name", None) if isinstance(exc, ImportError) else None, "where": where}


def classify(outcome: dict, tops: list[str], mode: str) -> str:
    """ok, skipped or failed (see the module doc)."""
    if outcome.get("ok"):
        return "ok"
    if mode == "strict":
        return "failed"
    kind, message, module = outcome.get("type"), outcome.get("message", ""), outcome.get("missing")
    if kind in CODE_ERRORS:
        return "failed"
    if kind in ("ImportError", "ModuleNotFoundError") and module and module.split(".")[0] in tops:
        if any(hint in message for hint in SHARED_OBJECT_HINTS):
            return "skipped"
        if kind == "ModuleNotFoundError" or message.startswith("cannot import name"):
            return "failed"
    return "skipped"


def import_wheel(wheel: Path, mode: str) -> list[dict]:
    with zipfile.ZipFile(wheel) as zf, tempfile.TemporaryDirectory(prefix="stackbuild-import-") as scratch:
        tops = wheel_tops(zf)
        root = os.path.join(scratch, "wheel")
        zf.extractall(root)
        results = []
        for name in tops:
            report = os.path.join(scratch, f"{name}.json")
            try:
                proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", root, name, report],
                                      cwd=scratch, capture_output=True, text=True, timeout=IMPORT_TIMEOUT)
                if os.path.isfile(report):
                    with open(report, encoding="utf-8") as handle:
                        outcome = json.load(handle)
                else:  # the import killed the interpreter itself (a crash in a shared library)
                    tail = (proc.stderr or "").strip().splitlines()
                    outcome = {"ok": False, "type": "crash", "message": tail[-1] if tail else f"exit {proc.returncode}",
                               "missing": None, "where": None}
            except subprocess.TimeoutExpired:
                outcome = {"ok": False, "type": "timeout", "message": f"no result after {IMPORT_TIMEOUT} s",
                           "missing": None, "where": None}
            results.append({"module": name, "status": classify(outcome, tops, mode), **outcome})
        return results


def check(out_dir: Path, *, compile_modules: bool, import_mode: str) -> dict:
    report: dict = {"wheels": [], "ok": True}
    for wheel in sorted(out_dir.glob("*.whl")):
        entry: dict = {"file": wheel.name}
        if compile_modules:
            entry["compiled"], entry["compile_errors"] = compile_wheel(wheel)
            if entry["compile_errors"]:
                report["ok"] = False
        if import_mode != "off" and not entry.get("compile_errors"):
            entry["imports"] = import_wheel(wheel, import_mode)
            if any(i["status"] == "failed" for i in entry["imports"]):
                report["ok"] = False
        report["wheels"].append(entry)
    return report


def describe(report: dict) -> list[str]:
    """One line per finding, for the build log."""
    lines = []
    for entry in report["wheels"]:
        if "compiled" in entry:
            bad = entry["compile_errors"]
            lines.append(f"stackbuild: {entry['file']}: {entry['compiled']} modules byte-compile"
                         + (f", {len(bad)} do not" if bad else ""))
            for e in bad[:MAX_ERRORS]:
                lines.append(f"stackbuild:   {e['file']}:{e['line']}: {e['type']}: {e['message']}")
        for i in entry.get("imports", []):
            detail = "" if i["status"] == "ok" else f" ({i['type']}: {i['message']})"
            lines.append(f"stackbuild: {entry['file']}: import {i['module']}: {i['status']}{detail}")
    return lines


def main(argv: list[str]) -> int:
    if argv[:1] == ["--child"]:
        root, name, target = argv[1:4]
        outcome = _import_child(root, name)
        with open(target, "w", encoding="utf-8") as handle:
            json.dump(outcome, handle)
        return 0
    out_dir, compile_flag, import_mode = Path(argv[0]), argv[1], argv[2]
    report = check(out_dir, compile_modules=compile_flag == "compile", import_mode=import_mode)
    for line in describe(report):
        print(line, flush=True)
    with open(out_dir / REPORT, "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=1)
    return 0 if report["ok"] else FAILED


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
