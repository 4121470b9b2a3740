"""Git sources built in real containers (marker: docker): no `.git` goes in, yet setuptools-scm
finds the version stackbuild derived from the pin; wheels are checked inside the container."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from builder.cli import main
from builder.errors import BuildError, SourceError, VerifyError
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


def test_only_builds_a_partial_dist_that_verify_refuses(engine, env):  # noqa: F811
    """The other source's upstream does not even exist: a partial build never touches it."""
    up = scm_upstream(env / "up")
    stack = stack_for(env / "p", up, up.head())
    stack.write_text(stack.read_text().replace("[stacks.t]", f"""[sources.tiny.build]
needs = ["kernels"]

[sources.kernels]
url = "{env / 'no-such-repo'}"
commit = "{'c' * 40}"

[stacks.t]""").replace('sources = ["tiny"]', 'sources = ["tiny", "kernels"]'))
    runner = CliRunner(mix_stderr=False)
    result = runner.invoke(main, ["--stack", str(stack), "build", "t", "--only", "tiny", "--quiet"])
    assert result.exit_code == 0, result.stderr
    assert "partial build: skipped kernels (not in --only); verify and smoke refuse it" in result.stdout
    dist = env / "dist" / "t"
    manifest = json.loads((dist / "manifest.json").read_text())
    assert manifest["partial"] is True and manifest["skipped"] == [{"source": "kernels", "reason": "not in --only"}]
    assert [s["name"] for s in manifest["sources"]] == ["tiny"]
    assert manifest["sources"][0]["needs_skipped"] == ["kernels"] and manifest["sources"][0]["recipe"]["needs"] == []
    refused = runner.invoke(main, ["verify", str(dist)])
    assert refused.exit_code == VerifyError.exit_code
    [line] = refused.stderr.strip().splitlines()
    assert "manifest.json: verify refuses a partial build of 't' (skipped: kernels)" in line
    # The same partial build again is a no-op; a full build still needs the missing upstream.
    again = runner.invoke(main, ["--stack", str(stack), "--json", "build", "t", "--only", "tiny"])
    assert json.loads(again.stdout)["summary"]["dist_reused"] is True
    full = runner.invoke(main, ["--stack", str(stack), "build", "t"])
    assert full.exit_code == SourceError.exit_code and "kernels" in full.stderr


def test_a_patch_leaving_a_syntax_error_fails_naming_file_and_line(engine, env):  # noqa: F811
    up = scm_upstream(env / "up")
    pin = up.head()
    broken = up.format_patch({"tinypkg/core.py": "def answer():\n    return 42\n\ndef more(:\n    return 1\n"},
                             "tinypkg: add more()").decode()
    stack = stack_for(env / "p", up, pin, {"0001-more.patch": broken})
    result = CliRunner(mix_stderr=False).invoke(main, ["--stack", str(stack), "build", "t", "--quiet"])
    assert result.exit_code == BuildError.exit_code, result.output
    [line] = result.stderr.strip().splitlines()
    assert "tiny: tinypkg/core.py:4: SyntaxError:" in line, line
    assert "does not byte-compile" in line and "tiny/0001-more.patch" in line
    assert not (env / "dist" / "t").exists()
    # The fixed patch builds, and the manifest says what was checked.
    fixed = up.format_patch({"tinypkg/core.py": "def answer():\n    return 42\n\ndef more():\n    return 1\n"},
                            "tinypkg: add more()").decode()
    (env / "p" / "patches" / "tiny" / "0001-more.patch").write_text(fixed)
    manifest = build(stack, "t")
    [checks] = manifest["sources"][0]["checks"]
    assert checks["compiled"] == 2 and checks["imports"] == [{"module": "tinypkg", "status": "ok"}]
