"""Git sources built in real containers (marker: docker): no `.git` goes in, yet setuptools-scm
finds the version stackbuild derived from the pin; wheels are checked inside the container."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from conftest import Upstream, sh
from test_build_docker import build, engine, env, session_dir  # noqa: F401  (the session fixtures)

pytestmark = pytest.mark.docker

PYPROJECT = """[build-system]
requires = ["setuptools>=68", "setuptools-scm>=8"]
build-backend = "setuptools.build_meta"

[project]
name = "tinypkg"
dynamic = ["version"]

[tool.setuptools.packages.find]
include = ["tinypkg*"]

[tool.setuptools_scm]
"""


def scm_upstream(path: Path) -> Upstream:
    """A setuptools-scm project in git, without any tag."""
    up = Upstream(path)
    up.commit({"pyproject.toml": PYPROJECT, "tinypkg/__init__.py": "from .core import answer\n",
               "tinypkg/core.py": "def answer():\n    return 42\n"}, "tinypkg")
    return up


def stack_for(root: Path, up: Upstream, pin: str, patches: dict[str, str] | None = None) -> Path:
    root.mkdir(parents=True)
    series = ""
    if patches:
        (root / "patches" / "tiny").mkdir(parents=True)
        (root / "patches" / "tiny" / "series").write_text("".join(f"{n}\n" for n in patches))
        for name, text in patches.items():
            (root / "patches" / "tiny" / name).write_text(text)
        series = '[series.tiny]\nsource = "tiny"\n'
    (root / "stack.toml").write_text(f"""
[build]
recipe = "cpu"
caches = {{ pip = "{root.parent / 'pip-cache'}" }}

[sources.tiny]
url = "{up.path}"
commit = "{pin}"

{series}
[stacks.t]
{'series = ["tiny"]' if patches else 'sources = ["tiny"]'}
""")
    return root / "stack.toml"


def test_untagged_git_source_builds_with_the_derived_version(engine, env):  # noqa: F811
    up = scm_upstream(env / "up")
    pin = up.head()
    manifest = build(stack_for(env / "p", up, pin), "t")
    [wheel] = manifest["wheels"]
    assert wheel["file"] == f"tinypkg-0.0.0+g{pin[:12]}-py3-none-any.whl"
    [source] = manifest["sources"]
    assert source["version"] == {"value": f"0.0.0+g{pin[:12]}", "origin": "untagged"}
    saved = json.loads((env / "dist" / "t" / "manifest.json").read_text())
    assert saved["sources"][0]["version"] == source["version"]
    with zipfile.ZipFile(env / "dist" / "t" / wheel["file"]) as zf:
        meta = zf.read(f"tinypkg-0.0.0+g{pin[:12]}.dist-info/METADATA").decode()
    assert f"Version: 0.0.0+g{pin[:12]}" in meta


def test_tagged_git_source_and_a_given_version(engine, env):  # noqa: F811
    up = scm_upstream(env / "up")
    sh("git", "tag", "-a", "-m", "r", "v0.3.0", cwd=up.path)
    pin = up.commit({"tinypkg/core.py": "def answer():\n    return 43\n"}, "later")
    stack = stack_for(env / "p", up, pin)
    assert build(stack, "t")["wheels"][0]["file"] == f"tinypkg-0.3.1.dev1+g{pin[:12]}-py3-none-any.whl"
    stack.write_text(stack.read_text().replace("[stacks.t]", '[sources.tiny.build]\nversion = "5.0"\n\n[stacks.t]'))
    again = build(stack, "t")
    assert again["summary"]["built"] == ["tiny"]  # a new version is a new key
    assert again["wheels"][0]["file"] == "tinypkg-5.0-py3-none-any.whl"
