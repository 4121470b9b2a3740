"""The one precedence table of environment overrides, and the one dialect's locations."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from builder import recipes, settings
from builder.config import parse_config
from builder.errors import ConfigError

PACKAGE = Path(__file__).resolve().parent.parent / "builder"
DOC = Path(__file__).resolve().parent.parent / "docs" / "architecture.md"


def _stackbuild_names_read(path: Path) -> set[str]:
    """Every STACKBUILD_* string literal in a module: the names it could read."""
    tree = ast.parse(path.read_text())
    return {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and re.fullmatch(r"STACKBUILD_[A-Z_]+", n.value)}


def test_every_variable_builder_reads_is_in_the_table_and_the_table_is_documented():
    declared = {o.name for o in settings.OVERRIDES}
    for path in PACKAGE.rglob("*.py"):
        assert _stackbuild_names_read(path) <= declared, path
        # Only settings.py reads them from the environment; everyone else asks it.
        if path.name != "settings.py":
            assert not re.search(r"environ(?:\.get)?\(?\[?\s*[\"']STACKBUILD_", path.read_text()), path
    documented = set(re.findall(r"^\| `(STACKBUILD_[A-Z_]+)", DOC.read_text(), re.M))
    assert documented == declared


def test_overrides_are_read_from_the_mapping_given(tmp_path):
    env = {"STACKBUILD_CACHE": str(tmp_path / "c"), "STACKBUILD_DIST": str(tmp_path / "d"), "STACKBUILD_WORK": ""}
    got = settings.load_settings(None, env=env)
    assert got.cache_dir == tmp_path / "c" and got.dist_dir == tmp_path / "d"
    assert got.work_dir == (Path.cwd() / "work").resolve()  # empty is unset
    assert settings.env_prefixed("STACKBUILD_BUILD_ARG_", {"STACKBUILD_BUILD_ARG_A": "1", "STACKBUILD_BUILD_ARG_B": "",
                                                           "STACKBUILD_BUILD_ARG_": "x"}) == {"A": "1"}


STACK = """\
[build]
recipe = "cpu"
timeout = 600

[stacks.base]

[stacks.fast]
extends = "base"

[stacks.fast.build]
base = "example/base:1"
timeout = "soon"
"""


def test_environment_beats_the_stack_file_and_errors_name_the_layer_written(tmp_path):
    path = tmp_path / "stack.toml"
    path.write_text(STACK)
    cfg = parse_config(STACK, path)
    with pytest.raises(ConfigError) as err:
        recipes.stack_recipe(cfg, cfg.stack("fast"), env={})
    # The merged table's bad key is found where it was written: the stack's own table, line 12.
    assert err.value.where == f"{path}:12 (stacks.fast.build.timeout)"
    good = STACK.replace('timeout = "soon"\n', "")
    cfg = parse_config(good, path)
    assert recipes.stack_recipe(cfg, cfg.stack("fast"), env={}).base == "example/base:1"
    assert recipes.stack_recipe(cfg, cfg.stack("fast"), env={}).timeout == 600
    over = recipes.stack_recipe(cfg, cfg.stack("fast"), env={"STACKBUILD_BASE_IMAGE": "local/base:2"})
    assert over.base == "local/base:2"
    with pytest.raises(ConfigError) as err:
        bad = parse_config(good + "\n[stacks.base.build]\nnope = 1\n", path)
        recipes.stack_recipe(bad, bad.stack("fast"), env={})
    assert "unknown key 'nope' in [build]" in str(err.value) and err.value.where == f"{path}:14 (stacks.base.build.nope)"
