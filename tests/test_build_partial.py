"""Partial builds without an engine: `--only`, `--recipe`, and the refusals of verify and smoke."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from builder import build as B
from builder import recipes as R
from builder.cli import main
from builder.config import load_config
from builder.errors import ConfigError, SourceError, VerifyError
from builder.settings import load_settings
from builder.smoke.run import read_build
from conftest import Upstream, write_project

REPO = Path(__file__).resolve().parent.parent
DEAD = "unix:///nonexistent/stackbuild-test.sock"


def test_only_vllm_with_the_cpu_recipe_plans_the_lab_stack_without_its_kernels(monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", DEAD)
    runner = CliRunner(mix_stderr=False)
    result = runner.invoke(main, ["--stack", str(REPO / "stack.toml"), "build", "research", "--plan", "--json",
                                  "--only", "vllm", "--recipe", "cpu"])
    assert result.exit_code == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["partial"] and plan["skipped"] == ["llm-scaler", "vllm-xpu-kernels"]
    assert plan["recipe"] == "cpu" and plan["base"] == "stackbuild/base:bookworm"
    assert "TORCH_VERSION" not in plan["build_args"]  # the xpu recipe's argument stays with it
    [step] = plan["steps"]
    assert step["source"] == "vllm" and step["needs"] == []
    assert step["env"]["VLLM_TARGET_DEVICE"] == "xpu" and step["env"]["MAX_JOBS"] == "2"
    assert '"$DEPS"/*.whl' not in step["script"]
    full = json.loads(runner.invoke(main, ["--stack", str(REPO / "stack.toml"), "build", "research", "--plan",
                                           "--json"]).stdout)
    assert not full["partial"] and full["recipe"] == "xpu"
    assert {s["source"]: s["key"] for s in full["steps"]}["vllm"] != step["key"]
    text = runner.invoke(main, ["--stack", str(REPO / "stack.toml"), "build", "research", "--plan",
                                "--only", "vllm,llm-scaler"])
    assert text.exit_code == 0 and "partial: skipped vllm-xpu-kernels" in text.stdout


def test_only_names_a_source_the_stack_builds():
    cfg = load_config(REPO / "stack.toml")
    resolved = cfg.stack("baseline")
    specs = {s.name: R.parse_source_build(s, cfg.where) for s in resolved.sources}
    with pytest.raises(ConfigError, match="--only vlm: 'vlm' is not a source of stack 'baseline'") as err:
        B.select_only(resolved, specs, ["vlm"])
    assert "vllm" in err.value.hint
    assert B.select_only(resolved, specs, []) == B.Selection()
    result = CliRunner(mix_stderr=False).invoke(main, ["--stack", str(REPO / "stack.toml"), "build", "baseline",
                                                       "--only", "nope", "--plan"])
    assert result.exit_code == ConfigError.exit_code and len(result.stderr.strip().splitlines()) <= 2


def test_skipped_sources_are_never_synced(tmp_path, upstream: Upstream):
    pin = upstream.commit({"a.py": "x = 1\n"})
    stack = write_project(tmp_path / "p", f"""
[sources.good]
url = "{upstream.path}"
commit = "{pin}"

[sources.gone]
url = "{tmp_path / 'no-such-repo'}"
commit = "{'b' * 40}"

[stacks.s]
sources = ["good", "gone"]
""")
    cfg = load_config(stack)
    settings = load_settings(cfg)
    with pytest.raises(SourceError, match="gone"):
        B.stack_inputs(settings, cfg, "s")
    items, _resolve = B.stack_inputs(settings, cfg, "s", skipped={"gone": "not in --only"})
    assert [i.source.name for i in items] == ["good"]


def partial_dist(folder: Path) -> Path:
    folder.mkdir(parents=True)
    data = b"wheel bytes"
    (folder / "p-1-py3-none-any.whl").write_bytes(data)
    manifest = {"schema": 1, "stack": "s", "digest": B.stack_digest(["k1"]), "partial": True,
                "skipped": [{"source": "kernels", "reason": "not in --only"}], "sources": [{"key": "k1"}],
                "wheels": [{"source": "p", "file": "p-1-py3-none-any.whl", "name": "p", "version": "1",
                            "sha256": hashlib.sha256(data).hexdigest()}]}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_verify_and_smoke_refuse_a_partial_dist(tmp_path, monkeypatch):
    dist = partial_dist(tmp_path / "dist" / "s")
    result = CliRunner(mix_stderr=False).invoke(main, ["verify", str(dist)])
    assert result.exit_code == VerifyError.exit_code
    first = result.stderr.strip().splitlines()[0]
    assert "verify refuses a partial build of 's' (skipped: kernels)" in first
    assert "stackbuild build s (without --only)" in result.stderr
    monkeypatch.setenv("STACKBUILD_DIST", str(tmp_path / "dist"))
    stack = write_project(tmp_path / "p", '[sources.p]\npypi = "p==1"\n\n[stacks.s]\nsources = ["p"]\n')
    with pytest.raises(VerifyError, match="smoke refuses a partial build of 's'"):
        read_build(load_settings(load_config(stack)), "s")
