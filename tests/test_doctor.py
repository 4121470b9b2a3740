"""Host checks: each check alone with prepared inputs, then the whole doctor for real."""

from __future__ import annotations

import json
import os
from pathlib import Path

import docker.errors
import pytest
from click.testing import CliRunner

from builder import doctor as D
from builder.recipes import parse_recipe
from builder.cli import main
from builder.errors import DoctorError
from conftest import unavailable

DEAD = "unix:///nonexistent/stackbuild-doctor.sock"
GB_KB = 1024 * 1024


@pytest.fixture(autouse=True)
def hermetic(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("STACKBUILD_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("STACKBUILD_BASE_IMAGE", raising=False)


def test_meminfo_and_memory_check(tmp_path):
    (tmp_path / "meminfo").write_text(f"MemTotal: {24 * GB_KB} kB\nMemFree: 1 kB\nSwapTotal: {8 * GB_KB} kB\n")
    info = D.meminfo(tmp_path / "meminfo")
    assert D.check_memory(32, info).status == D.OK
    low = D.check_memory(160, info)
    assert low.status == D.WARN and "RAM 24.0 GB + swap 8.0 GB = 32.0 GB" in low.detail and not low.required


def test_disk_check(tmp_path):
    assert D.check_disk(tmp_path / "not" / "yet", 0.001).status == D.OK
    assert D.check_disk(tmp_path, 10 ** 9).status == D.FAIL


def test_render_nodes(tmp_path):
    assert D.check_render_nodes(tmp_path / "missing").status == D.FAIL
    (tmp_path / "renderD128").touch()
    (tmp_path / "card0").touch()
    check = D.check_render_nodes(tmp_path)
    assert check.status == D.OK and check.detail.startswith("renderD128")


def test_groups():
    import grp

    assert D.check_groups(lambda: [], lambda: 1000).status == D.FAIL
    assert D.check_groups(lambda: [], lambda: 0).status == D.OK
    # The host's own group database, whatever it holds: a member of every group that exists
    # passes only when both exist, and a group the host lacks is named, never passed over.
    # (A skip here would fail CI, whose machines have no render group.)
    present = {}
    for name in ("render", "video"):
        try:
            present[name] = grp.getgrnam(name).gr_gid
        except KeyError:
            pass
    check = D.check_groups(lambda: list(present.values()), lambda: 1000)
    absent = [name for name in ("render", "video") if name not in present]
    if absent:
        assert check.status == D.FAIL
        assert check.detail.startswith("not in: " + ", ".join(f"{name} (no such group)" for name in absent) + ";")
    else:
        assert check.status == D.OK


def test_dead_engine_fails_the_doctor(tmp_path):
    report = D.run_checks([parse_recipe({"recipe": "cpu"}, tmp_path)], engine_url=DEAD, disk_path=tmp_path)
    assert not report["ok"]
    docker = next(c for c in report["checks"] if c["name"] == "docker")
    assert docker["status"] == D.FAIL and "not reachable" in docker["detail"]


def test_doctor_cli_one_line_per_check(tmp_path):
    result = CliRunner(mix_stderr=False).invoke(main, ["doctor", "--recipe", "xpu", "--engine", DEAD])
    assert result.exit_code == DoctorError.exit_code
    lines = result.stdout.splitlines()
    names = [line[5:].split(":")[0] for line in lines]
    assert names == ["docker", "disk", "memory", "base image (xpu)", "render nodes", "gpu groups"]
    assert lines[0].startswith("FAIL docker")
    memory = next(line for line in lines if " memory:" in line)
    assert "recipe declares 160 GB" in memory


@pytest.mark.docker
def test_doctor_against_the_real_engine(tmp_path, monkeypatch):
    from builder import engine as E
    from builder.errors import EngineError

    try:
        E.connect()
    except EngineError as exc:
        unavailable("STACKBUILD_REQUIRE_DOCKER", f"no Docker Engine reachable: {exc}")
    base = os.environ.get("STACKBUILD_BASE_IMAGE", "stackbuild/base:bookworm")
    monkeypatch.setenv("STACKBUILD_BASE_IMAGE", base)
    result = CliRunner(mix_stderr=False).invoke(main, ["doctor", "--recipe", "cpu", "--json"])
    report = json.loads(result.stdout)
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["docker"]["status"] == D.OK and "Docker Engine 2" in checks["docker"]["detail"]
    assert checks["base image (cpu)"]["status"] == D.OK
    assert result.exit_code == (0 if report["ok"] else DoctorError.exit_code)


def test_doctor_takes_stack_names_beside_the_global_stack_file():
    """`--stack` is the stack file everywhere; doctor names stacks as arguments."""
    stack_file = str(Path(__file__).resolve().parent.parent / "stack.toml")
    result = CliRunner(mix_stderr=False).invoke(main, ["--stack", stack_file, "doctor", "baseline", "--engine", DEAD])
    assert result.exit_code == DoctorError.exit_code, result.stderr
    assert "render nodes" in result.stdout and "base image (xpu)" in result.stdout
    unknown = CliRunner(mix_stderr=False).invoke(main, ["--stack", stack_file, "doctor", "nope", "--engine", DEAD])
    assert unknown.exit_code == 2 and "nope" in unknown.stderr


def test_an_unreachable_base_image_message_is_whole():
    reason = "pull access denied for stackbuild/base, repository does not exist or may require 'docker login': " * 2

    class Images:
        def get_registry_data(self, _ref):
            raise docker.errors.APIError(reason + "denied")

    class Engine:
        client = type("Client", (), {"images": Images()})()

        def image_id(self, _ref):
            return None

    check = D.check_base_image(Engine(), parse_recipe({"recipe": "cpu"}, Path.cwd()))
    assert check.status == D.FAIL and "denied; make it with stackbuild setup --image" in check.detail
