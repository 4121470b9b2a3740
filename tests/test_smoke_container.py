"""The smoke `container` runtime without an engine: the serving image's Dockerfile and key, the run
spec, and that every container is removed on every path (Ctrl-C between create and start, a failed
one-off run, a stop after the engine already lost it). A fake Docker client stands in for the SDK."""

from __future__ import annotations

from pathlib import Path

import docker.errors
import pytest

from builder.smoke import config as smoke_config
from builder.smoke import container as smoke_container
from builder.smoke import run as smoke_run
from builder.errors import ConfigError, EngineError, SmokeError
from smoketools import hermetic_env, load, settings_for

STACK = """
[build]
base = "stackbuild/base:bookworm"
wheelhouse = "wheelhouse"
ca_bundle = "ca.pem"

[smoke]
runtime = "container"
wheels = false
model = "/models/tiny"
requirements = ["torch==2.13.0+cpu"]
uninstall = ["triton"]
command = ["vllm", "serve", "{model}"]

[smoke.container]
image = "stackbuild/base:bookworm"
network_mode = "bridge"

[stacks.demo]
"""


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    for key, value in hermetic_env(tmp_path).items():
        monkeypatch.setenv(key, value)


def config(tmp_path: Path, text: str = STACK) -> smoke_config.SmokeConfig:
    (tmp_path / "wheelhouse").mkdir(exist_ok=True)
    (tmp_path / "wheelhouse" / "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl").write_bytes(b"t" * 10)
    (tmp_path / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    path = tmp_path / "stack.toml"
    path.write_text(text)
    cfg = load(path)
    return smoke_config.load_smoke_config(cfg, cfg.stack("demo"))


class FakeContainer:
    def __init__(self, engine: "FakeEngine", name: str):
        self.engine, self.name, self.status = engine, name, "running"
        self.attrs = {"State": {"ExitCode": 0}}

    def reload(self):
        if self.name not in self.engine.containers_by_name:
            raise docker.errors.NotFound("gone")

    def logs(self, stream=False, follow=False, tail=None):
        return iter([b"log line\n"]) if stream else b"boom: the last line\n"

    def wait(self):
        return {"StatusCode": self.engine.exit_code}

    def stop(self, timeout=None):
        self.engine.calls.append(("stop", self.name))
        self.status = "exited"

    def remove(self, force=False):
        self.engine.calls.append(("remove", self.name))
        self.engine.containers_by_name.pop(self.name, None)


class FakeEngine:
    """containers.run creates the container first, then may be interrupted, as the SDK's create+start."""

    def __init__(self, interrupt: BaseException | None = None, exit_code: int = 0):
        self.interrupt, self.exit_code = interrupt, exit_code
        self.containers_by_name: dict[str, FakeContainer] = {}
        self.calls: list[tuple] = []
        self.images_present = {"stackbuild/base:bookworm": "sha256:base1"}
        self.builds: list[dict] = []
        self.containers = self
        self.images = self
        self.api = self

    # containers
    def run(self, image=None, command=None, name=None, **kw):
        self.calls.append(("run", name, kw))
        self.containers_by_name[name] = FakeContainer(self, name)
        if self.interrupt is not None:
            raise self.interrupt
        return self.containers_by_name[name]

    def get(self, name):
        if name in self.containers_by_name:
            return self.containers_by_name[name]
        if name in self.images_present:
            return type("Image", (), {"id": self.images_present[name]})()
        raise docker.errors.ImageNotFound("no") if ":" in name else docker.errors.NotFound("no")

    # low-level build
    def build(self, path, tag, buildargs, **kw):
        self.builds.append({"tag": tag, "buildargs": buildargs, "files": sorted(
            str(p.relative_to(path)) for p in Path(path).rglob("*") if p.is_file())})
        self.images_present[tag] = "sha256:new"
        yield {"stream": "Step 1/9\n"}


def test_dockerfile_brings_certs_wheelhouse_and_venv_on_path(tmp_path):
    sc = config(tmp_path)
    text = smoke_container.container_dockerfile(sc, ["vllm-0.32.0+cpu-cp311-cp311-linux_x86_64.whl"])
    lines = text.splitlines()
    assert lines[:2] == ["FROM stackbuild/base:bookworm", "ARG PIP_INDEX_URL"]
    assert f"COPY ca.pem {smoke_container.CONTAINER_CA}" in lines and any(line.startswith("ENV PIP_CERT=") for line in lines)
    assert "ENV VIRTUAL_ENV=/opt/stackbuild/venv PATH=/opt/stackbuild/venv/bin:$PATH" in lines
    install = next(line for line in lines if "/pip install " in line)
    assert ("--find-links /opt/stackbuild/wheelhouse /opt/stackbuild/wheels/vllm-0.32.0+cpu-cp311-cp311-linux_x86_64.whl"
            " torch==2.13.0+cpu") in install
    assert "pip uninstall -y triton" in lines[-1]
    # No index is ever written into the image recipe: it is a build argument from the host's pip.
    assert "index-url" not in text and "http" not in text


def test_bridged_server_listens_inside_and_is_published_on_loopback_only(tmp_path):
    sc = config(tmp_path)
    prep = smoke_run.Prepared(sc, sc.profile(None), None, smoke_config.CONTAINER_PYTHON, "/models/tiny", None, "img:1", None)
    argv, env = smoke_run.render(prep, "127.0.0.1", 8123, tmp_path)
    assert argv[argv.index("--host") + 1] == "0.0.0.0" and env["VLLM_HOST_IP"] == "127.0.0.1"
    spec = smoke_container.container_run_spec(sc, "img:1", argv, env, "127.0.0.1", 8123, {"/models/tiny": "/models/tiny"})
    assert spec["ports"] == {"8123/tcp": ("127.0.0.1", 8123)} and spec["network_mode"] == "bridge"
    assert spec["volumes"] == {"/models/tiny": {"bind": "/models/tiny", "mode": "ro"}}
    host_net = config(tmp_path, STACK.replace('network_mode = "bridge"', 'network_mode = "host"'))
    prep2 = smoke_run.Prepared(host_net, host_net.profile(None), None, smoke_config.CONTAINER_PYTHON, "/m", None, "img:1", None)
    assert smoke_run.render(prep2, "127.0.0.1", 8123, tmp_path)[0][3:5] == ["--host", "127.0.0.1"]


def test_ctrl_c_between_create_and_start_removes_the_container(tmp_path, monkeypatch):
    sc = config(tmp_path)
    engine = FakeEngine(interrupt=KeyboardInterrupt())
    monkeypatch.setattr(smoke_container, "_docker", lambda: engine)
    with pytest.raises(KeyboardInterrupt):
        smoke_container.start_container(sc, {"image": "img:1", "command": ["x"]}, tmp_path / "log")
    assert engine.containers_by_name == {} and engine.calls[-1][0] == "remove"


def test_engine_refusing_to_start_is_one_smoke_error_and_leaves_nothing(tmp_path, monkeypatch):
    sc = config(tmp_path)
    engine = FakeEngine(interrupt=docker.errors.APIError("port is already allocated"))
    monkeypatch.setattr(smoke_container, "_docker", lambda: engine)
    with pytest.raises(SmokeError, match="cannot start the serving container: APIError: port is already allocated") as err:
        smoke_container.start_container(sc, {"image": "img:1", "command": ["x"]}, tmp_path / "log")
    assert engine.containers_by_name == {}
    assert isinstance(err.value.__cause__, docker.errors.APIError)  # kept for whoever debugs it


def test_no_engine_keeps_the_sdk_error_as_the_cause(monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/stackbuild-smoke.sock")
    with pytest.raises(EngineError, match="no Docker Engine reachable") as err:
        smoke_container._docker()
    assert isinstance(err.value.__cause__, docker.errors.DockerException)


def test_stop_removes_the_container_once_and_a_lost_container_counts_as_exited(tmp_path, monkeypatch):
    sc = config(tmp_path)
    engine = FakeEngine()
    monkeypatch.setattr(smoke_container, "_docker", lambda: engine)
    server = smoke_container.start_container(sc, {"image": "img:1", "command": ["x"]}, tmp_path / "log")
    assert server.exit_code() is None
    server.stop()
    server.stop()
    assert [c[0] for c in engine.calls] == ["run", "stop", "remove"] and engine.containers_by_name == {}
    assert server.exit_code() == -1


def test_one_off_container_is_removed_also_when_it_fails(tmp_path, monkeypatch):
    engine = FakeEngine(exit_code=3)
    monkeypatch.setattr(smoke_container, "_docker", lambda: engine)
    with pytest.raises(SmokeError, match=r"generating the model in the serving image failed \(exit 3\): boom"):
        smoke_container.run_in_image("img:1", ["python", "x"], {}, "generating the model")
    assert engine.containers_by_name == {}
    refusing = FakeEngine(interrupt=docker.errors.APIError("no such device /dev/dri"))
    monkeypatch.setattr(smoke_container, "_docker", lambda: refusing)
    with pytest.raises(SmokeError, match="generating the model in the serving image failed: APIError") as err:
        smoke_container.run_in_image("img:1", ["python", "x"], {}, "generating the model")
    assert isinstance(err.value.__cause__, docker.errors.APIError) and refusing.containers_by_name == {}


def test_serving_image_is_built_once_per_content_key(tmp_path, monkeypatch):
    sc = config(tmp_path)
    engine = FakeEngine()
    monkeypatch.setattr(smoke_container, "_docker", lambda: engine)
    monkeypatch.setenv("PIP_INDEX_URL", "https://index.invalid/simple")
    settings = settings_for(tmp_path)
    tag = smoke_container.prepare_image(settings, sc, None)
    assert tag.startswith("stackbuild-smoke:") and len(engine.builds) == 1
    build = engine.builds[0]
    assert build["buildargs"] == {"PIP_INDEX_URL": "https://index.invalid/simple"}  # the host's, at build time
    assert build["files"] == ["Dockerfile", "ca.pem", "tinymodel.py",
                              "wheelhouse/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"]
    assert smoke_container.prepare_image(settings, sc, None) == tag and len(engine.builds) == 1  # cached
    # A new base image (same tag, other id) or another wheelhouse file is another image.
    engine.images_present["stackbuild/base:bookworm"] = "sha256:base2"
    assert smoke_container.prepare_image(settings, sc, None) != tag
    (tmp_path / "wheelhouse" / "extra-1.0-py3-none-any.whl").write_bytes(b"e")
    assert len({tag, smoke_container.prepare_image(settings, sc, None)}) == 2 and len(engine.builds) == 3


def test_missing_base_image_is_a_clear_error(tmp_path, monkeypatch):
    sc = config(tmp_path)
    engine = FakeEngine()
    engine.images_present.clear()
    monkeypatch.setattr(smoke_container, "_docker", lambda: engine)
    with pytest.raises(SmokeError, match="the base image stackbuild/base:bookworm is not on the Docker Engine"):
        smoke_container.prepare_image(settings_for(tmp_path), sc, None)


def test_debian_packages_are_added_only_when_missing_and_names_are_checked(tmp_path):
    sc = config(tmp_path, STACK.replace('network_mode = "bridge"', 'network_mode = "bridge"\npackages = ["libnuma1"]'))
    line = smoke_container.container_dockerfile(sc, []).splitlines()[2]
    assert line.startswith("RUN dpkg -s libnuma1 >/dev/null 2>&1 || (apt-get update && apt-get install -y")
    with pytest.raises(ConfigError, match="'libnuma1; rm -rf /' is not a Debian package name") as info:
        config(tmp_path, STACK.replace('network_mode = "bridge"', 'network_mode = "bridge"\npackages = ["libnuma1; rm -rf /"]'))
    assert "smoke.container.packages" in str(info.value.where)
