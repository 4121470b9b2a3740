"""The module map in docs/architecture.md holds: no import cycle among builder's modules.

Imports inside `if TYPE_CHECKING:` are annotations only and do not count; imports inside
functions do (they run), so a lazy import cannot hide a cycle either.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "builder"


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
               and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING"
               for n in ast.walk(node)}
    here = _module(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level and id(node) not in skipped:
            base = package[:len(package) - node.level + 1]
            if node.module:
                found.add(".".join(base + [node.module]))
            else:
                found |= {".".join(base + [a.name]) for a in node.names}
    return found


def graph() -> dict[str, set[str]]:
    files = {_module(p): p for p in PACKAGE.rglob("*.py")}
    return {m: {d for d in _imports(p) if d in files and d != m} for m, p in files.items()}


def cycles(deps: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = "open"
        stack.append(m)
        for d in sorted(deps[m]):
            if state.get(d) == "open":
                found.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d, stack)
        stack.pop()
        state[m] = "done"

    for m in sorted(deps):
        if m not in state:
            visit(m, [])
    return found


def test_the_checker_sees_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_builder_has_no_import_cycle():
    deps = graph()
    assert "builder.replay" in deps["builder.apply"] and "builder.hunks" in deps["builder.replay"]
    assert cycles(deps) == []


def test_the_low_layers_import_nothing_above_them():
    deps = graph()
    for low, allowed in {"builder.hunks": {"builder.patches"}, "builder.errors": set(), "builder.httpclient": set()}.items():
        assert deps[low] <= allowed, (low, deps[low] - allowed)


def test_smoke_run_is_the_top_of_the_smoke_package():
    deps = graph()
    smoke = {m for m in deps if m.startswith("builder.smoke.")}
    assert {"builder.smoke.config", "builder.smoke.run"} <= smoke
    assert [m for m in smoke if "builder.smoke.run" in deps[m]] == []


def test_no_module_shadows_the_standard_library():
    # wheelcheck.py runs as a script with builder/ first on sys.path (see docs/architecture.md).
    import sys

    names = {p.stem for p in PACKAGE.glob("*.py")}
    assert names & set(sys.stdlib_module_names) == set()
