"""Versions of git sources, derived on the host from real mirrors (no .git reaches a container)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from builder import build as B
from builder import recipes as R
from builder import versions as V
from builder.config import Source, load_config
from builder.errors import ConfigError, SourceError
from builder.settings import load_settings
from builder.sources import sync, tags_marker
from conftest import Upstream, sh, write_project


@pytest.mark.parametrize("tag, distance, expected", [
    ("1.2.0", 0, "1.2.0"),
    ("1.2.0", 3, "1.2.1.dev3+gabcdef012345"),
    ("0.20", 7, "0.21.dev7+gabcdef012345"),
    ("1.0rc1", 3, "1.0rc2.dev3+gabcdef012345"),
    ("1.0.post1", 2, "1.0.post2.dev2+gabcdef012345"),
    ("1.0.dev4", 1, None),
    ("1.0+local", 1, None),
])
def test_next_dev(tag, distance, expected):
    assert V.next_dev(tag, distance, "abcdef012345") == expected


def test_check_version():
    assert V.check_version("0.20.2.dev0+gc51df4300") is None
    assert V.check_version("1.0rc1") is None
    assert "not a PEP 440 version" in V.check_version("1.0 beta")
    assert V.check_version("$(reboot)") is not None


def test_pretend_env_spells_the_dist_as_setuptools_scm_does():
    env = V.pretend_env("vllm-xpu.kernels", V.SourceVersion("1.0", "stack.toml"))
    assert env == {"SETUPTOOLS_SCM_PRETEND_VERSION_FOR_VLLM_XPU_KERNELS": "1.0", "SETUPTOOLS_SCM_PRETEND_VERSION": "1.0"}


def _settings(tmp_path: Path, upstream: Upstream, commit: str, build: str = ""):
    stack = write_project(tmp_path / "proj", f"""
[sources.pkg]
url = "{upstream.path}"
commit = "{commit}"
{build}
[stacks.s]
sources = ["pkg"]
""")
    cfg = load_config(stack)
    return load_settings(cfg), cfg


def _version(tmp_path, upstream, commit, build=""):
    settings, cfg = _settings(tmp_path, upstream, commit, build)
    source = cfg.sources["pkg"]
    synced = sync(settings, source)
    spec = R.parse_source_build(source, cfg.where)
    return V.for_source(settings, source, synced.git_dir, synced.commit, spec.version), synced


def test_untagged_pin(tmp_path, upstream):
    pin = upstream.commit({"a.py": "x = 1\n"})
    version, synced = _version(tmp_path, upstream, pin)
    assert version == V.SourceVersion(f"0.0.0+g{pin[:12]}", "untagged")
    assert tags_marker(synced.git_dir, pin).read_text() == "0\n"


def test_tag_reachable_from_the_pin(tmp_path, upstream):
    upstream.commit({"a.py": "x = 1\n"})
    sh("git", "tag", "-a", "-m", "release", "v1.2.0", cwd=upstream.path)
    upstream.commit({"a.py": "x = 2\n"})
    sh("git", "tag", "nightly", cwd=upstream.path)  # no digit: setuptools-scm ignores it, so do we
    upstream.commit({"a.py": "x = 3\n"})
    pin = upstream.commit({"a.py": "x = 4\n"})
    # A tag on a later commit, which the mirror never fetched, is not reachable from the pin.
    upstream.commit({"a.py": "x = 5\n"})
    sh("git", "tag", "v9.0.0", cwd=upstream.path)
    version, synced = _version(tmp_path, upstream, pin)
    assert version == V.SourceVersion(f"1.2.1.dev3+g{pin[:12]}", "tag v1.2.0 + 3 commits")
    # Nearer, but without a digit: stored, and passed over by describe.
    assert sh("git", f"--git-dir={synced.git_dir}", "tag", "--list").split() == ["nightly", "v1.2.0"]


def test_pin_at_a_tag_and_a_given_version(tmp_path, upstream):
    pin = upstream.commit({"a.py": "x = 1\n"})
    sh("git", "tag", "release-2.0", cwd=upstream.path)
    assert _version(tmp_path, upstream, pin)[0] == V.SourceVersion("2.0", "tag release-2.0 + 0 commits")
    given = _version(tmp_path / "given", upstream, pin, '[sources.pkg.build]\nversion = "7.0.dev1"\n')[0]
    assert given == V.SourceVersion("7.0.dev1", "stack.toml")


def test_a_tag_that_is_no_version_asks_for_one(tmp_path, upstream):
    upstream.commit({"a.py": "x = 1\n"})
    sh("git", "tag", "foo1bar", cwd=upstream.path)
    pin = upstream.commit({"a.py": "x = 2\n"})
    with pytest.raises(SourceError, match="nearest tag .*'foo1bar'.* is not a release version") as err:
        _version(tmp_path, upstream, pin)
    assert "[sources.pkg.build]" in err.value.hint


def test_unreachable_upstream_for_tags_names_the_source(tmp_path, upstream):
    pin = upstream.commit({"a.py": "x = 1\n"})
    settings, cfg = _settings(tmp_path, upstream, pin)
    synced = sync(settings, cfg.sources["pkg"])
    moved = upstream.path.with_name("moved")
    upstream.path.rename(moved)
    with pytest.raises(SourceError, match="cannot list the tags of source 'pkg'"):
        V.for_source(settings, cfg.sources["pkg"], synced.git_dir, pin, None)
    # Once listed, a pin's version needs no network.
    moved.rename(upstream.path)
    first = V.for_source(settings, cfg.sources["pkg"], synced.git_dir, pin, None)
    upstream.path.rename(moved)
    assert V.for_source(settings, cfg.sources["pkg"], synced.git_dir, pin, None) == first


def test_bad_version_key_is_a_config_error(tmp_path, upstream):
    pin = upstream.commit({"a.py": "x = 1\n"})
    settings, cfg = _settings(tmp_path, upstream, pin, '[sources.pkg.build]\nversion = "one point oh"\n')
    with pytest.raises(ConfigError, match="not a PEP 440 version") as err:
        R.parse_source_build(cfg.sources["pkg"], cfg.where)
    assert "stack.toml:6" in str(err.value)


def test_version_enters_key_script_and_plan(tmp_path, upstream, monkeypatch):
    pin = upstream.commit({"a.py": "x = 1\n"})
    recipe = R.parse_recipe({"recipe": "cpu"}, tmp_path)
    source = Source("pkg", "git", url="https://example.invalid/pkg.git", commit=pin)
    one = B.BuildInput(source, Path(), pin, version=V.SourceVersion("1.0", "stack.toml"))
    two = B.BuildInput(source, Path(), pin, version=V.SourceVersion("1.1", "stack.toml"))
    assert B.cache_key(one, R.SourceBuild(), recipe, "i", []) != B.cache_key(two, R.SourceBuild(), recipe, "i", [])
    spec = R.SourceBuild(requires=("setuptools-scm",))
    script = B.build_script(recipe, spec, False, version=one.version, dist="my-pkg")
    subprocess.run(["bash", "-n"], input=script.encode(), check=True)
    lines = script.splitlines()
    exported = next(i for i, ln in enumerate(lines) if "SETUPTOOLS_SCM_PRETEND_VERSION_FOR_MY_PKG=1.0" in ln)
    assert exported > next(i for i, ln in enumerate(lines) if "pip install setuptools-scm" in ln)
    # The plan knows the version once the mirror holds the pin and its tags were listed.
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/stackbuild-test.sock")
    settings, cfg = _settings(tmp_path, upstream, pin)
    before = B.plan_stack(settings, cfg, "s")["steps"][0]
    assert before["version"] is None and not before["key_resolved"]
    synced = sync(settings, cfg.sources["pkg"])
    V.for_source(settings, cfg.sources["pkg"], synced.git_dir, pin, None)
    after = B.plan_stack(settings, cfg, "s")["steps"][0]
    assert after["version"] == {"value": f"0.0.0+g{pin[:12]}", "origin": "untagged"}
    assert f"SETUPTOOLS_SCM_PRETEND_VERSION=0.0.0+g{pin[:12]}" in after["script"]
