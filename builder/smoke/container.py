"""Serving in a container: the image's Dockerfile, building and caching it, running the server in it."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence
from .. import tinymodel
from ..errors import SmokeError
from ..fsutil import sha256_file
from ..settings import Settings
from .client import short_error
from .config import BuildOutput, CONTAINER_PYTHON, SmokeConfig
from .runtime import Server, uninterruptible


# ---------------------------------------------------------------------------------------------
# Containers (Docker SDK)


CONTAINER_ROOT = "/opt/stackbuild"
CONTAINER_CA = f"{CONTAINER_ROOT}/certs/ca.pem"


def container_dockerfile(sc: SmokeConfig, wheel_files: Sequence[str]) -> str:
    """A serving image: the base image plus a venv holding the wheels and requirements.

    The stack's wheels and the wheelhouse are copied in and found by --find-links; the rest comes
    from the index the PIP_INDEX_URL build argument names (the host's, handed over at build time,
    so no index is ever written here) or pip's default.
    """
    c = sc.container
    assert c is not None
    venv = str(Path(CONTAINER_PYTHON).parent.parent)
    installs = [f"{CONTAINER_ROOT}/wheels/{name}" for name in wheel_files] + list(sc.requirements)
    lines = [f"FROM {c.image}", "ARG PIP_INDEX_URL"]
    if c.packages:
        # Skipped when the base already has them: the apt mirror may be out of reach.
        names = " ".join(c.packages)
        lines.append(f"RUN dpkg -s {names} >/dev/null 2>&1 || (apt-get update && apt-get install -y "
                     f"--no-install-recommends {names} && rm -rf /var/lib/apt/lists/*)")
    if c.ca_bundle is not None:
        lines += [f"COPY ca.pem {CONTAINER_CA}",
                  f"ENV PIP_CERT={CONTAINER_CA} SSL_CERT_FILE={CONTAINER_CA} REQUESTS_CA_BUNDLE={CONTAINER_CA}"]
    # Slow-changing inputs first, so the engine's layer cache keeps them when only the wheel changes.
    find_links = []
    if c.wheelhouse is not None:
        lines.append(f"COPY wheelhouse/ {CONTAINER_ROOT}/wheelhouse/")
        find_links = ["--find-links", f"{CONTAINER_ROOT}/wheelhouse"]
    lines += [f"RUN python3 -m venv {venv}", f"ENV VIRTUAL_ENV={venv} PATH={venv}/bin:$PATH",
              f"COPY tinymodel.py {CONTAINER_ROOT}/tinymodel.py"]
    if wheel_files:
        lines.append(f"COPY wheels/ {CONTAINER_ROOT}/wheels/")
    if installs:
        lines.append(f"RUN {venv}/bin/pip install --disable-pip-version-check --no-cache-dir "
                     + " ".join(_shell_quote(a) for a in (*find_links, *sc.pip_args, *installs)))
    if sc.uninstall:
        lines.append(f"RUN {venv}/bin/pip uninstall -y " + " ".join(_shell_quote(a) for a in sc.uninstall))
    return "\n".join(lines) + "\n"


def _shell_quote(arg: str) -> str:
    return arg if re.fullmatch(r"[A-Za-z0-9_.,:/=+@%-]+", arg) else "'" + arg.replace("'", "'\\''") + "'"


def _group_id(name: str) -> str:
    import grp

    if name.isdigit():
        return name
    try:
        return str(grp.getgrnam(name).gr_gid)
    except KeyError:
        raise SmokeError(f"group '{name}' does not exist on this host", where="[smoke.container] group_add",
                         hint="name a host group (e.g. render, video) or give its numeric id") from None


def container_run_spec(sc: SmokeConfig, image: str, argv: Sequence[str], env: Mapping[str, str], host: str,
                       port: int, mounts: Mapping[str, str]) -> dict[str, Any]:
    """Keyword arguments for docker's containers.run: devices, groups, shm and IPC from [smoke.container].

    Group names are resolved to ids on the host, because the device files carry the host's ids and
    the image rarely has a group of the same name.
    """
    c = sc.container
    assert c is not None
    volumes = {src: {"bind": dst, "mode": "ro"} for src, dst in {**mounts, **c.volumes}.items()}
    spec: dict[str, Any] = {
        "image": image,
        "command": list(argv),
        "environment": dict(env),
        "detach": True,
        "stdin_open": False,
        "labels": {"stackbuild.smoke": sc.stack},
        "devices": [f"{d}:{d}:rwm" if ":" not in d else d for d in c.devices],
        "group_add": [_group_id(g) for g in c.group_add],
        "volumes": volumes,
        "network_mode": c.network_mode,
        "privileged": c.privileged,
    }
    if c.bridged:
        # Published on the asked-for host address only (127.0.0.1 by default), never on all of them.
        spec["ports"] = {f"{port}/tcp": (host, port)}
    if c.shm_size:
        spec["shm_size"] = c.shm_size
    if c.ipc_mode:
        spec["ipc_mode"] = c.ipc_mode
    if c.cap_add:
        spec["cap_add"] = list(c.cap_add)
    return spec


def _docker():
    import docker

    try:
        client = docker.from_env()
        client.ping()
    except Exception as exc:  # the SDK raises several unrelated types for "no engine"
        from ..errors import EngineError

        raise EngineError(f"no Docker Engine reachable: {exc}", where="DOCKER_HOST",
                          hint="start dockerd, or use runtime = \"venv\"") from exc
    return client


def image_key(sc: SmokeConfig, build: BuildOutput | None, dockerfile: str, base_id: str) -> str:
    """Names the serving image by what decides its content: the Dockerfile (base, requirements, pip
    arguments), the base image's id, the wheels' sha256 and the wheelhouse's files."""
    c = sc.container
    assert c is not None
    wheelhouse = (sorted([p.name, p.stat().st_size] for p in c.wheelhouse.iterdir() if p.is_file())
                  if c.wheelhouse is not None else [])
    payload = {"dockerfile": dockerfile, "base_id": base_id, "tinymodel": sha256_file(Path(tinymodel.__file__)),
               "wheels": sorted(w.sha256 for w in build.wheels) if build else [], "wheelhouse": wheelhouse}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _image_id(client: Any, name: str) -> str | None:
    import docker.errors

    try:
        return client.images.get(name).id
    except docker.errors.ImageNotFound:
        return None


def prepare_image(settings: Settings, sc: SmokeConfig, build: BuildOutput | None,
                  say: Callable[[str], None] = lambda _m: None) -> str:
    """The cached serving image `stackbuild-smoke:<key>`; built once per content key."""
    from ..archives import pip_setting

    c = sc.container
    assert c is not None
    client = _docker()
    base_id = _image_id(client, c.image)
    if base_id is None:
        raise SmokeError(f"the base image {c.image} is not on the Docker Engine", where="[smoke.container] image",
                         hint="build or load it first (`stackbuild doctor` names the base image steps)")
    names = [w.file.name for w in build.wheels] if build else []
    dockerfile = container_dockerfile(sc, names)
    tag = f"stackbuild-smoke:{image_key(sc, build, dockerfile, base_id)}"
    if _image_id(client, tag) is not None:
        return tag
    log = settings.cache_dir / "smoke" / "images" / f"{tag.split(':')[1]}.build.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    say(f"building serving image {tag} from {c.image} (log: {log})")
    index = c.index_url or pip_setting("index-url")
    with tempfile.TemporaryDirectory(prefix="stackbuild-smoke-ctx-") as ctx:
        ctx_path = Path(ctx)
        shutil.copy2(tinymodel.__file__, ctx_path / "tinymodel.py")
        if c.ca_bundle is not None:
            shutil.copy2(c.ca_bundle, ctx_path / "ca.pem")
        for folder, files in (("wheels", [w.file for w in build.wheels] if build else []),
                              ("wheelhouse", [p for p in c.wheelhouse.iterdir() if p.is_file()] if c.wheelhouse else [])):
            (ctx_path / folder).mkdir()
            for path in files:
                shutil.copy2(path, ctx_path / folder / path.name)
        (ctx_path / "Dockerfile").write_text(dockerfile)
        error = _build_image(client, ctx, tag, {"PIP_INDEX_URL": index} if index else {}, log)
    if error:
        raise SmokeError(f"building the serving image failed: {error}", where=str(log),
                         hint="see the build log; the base image needs python3 with venv, pip settings go in [smoke] pip_args")
    return tag


def _build_image(client: Any, ctx: str, tag: str, buildargs: Mapping[str, str], log: Path) -> str | None:
    """Streams the engine's build output into the log; the last error line, or None."""
    error = None
    with log.open("w", encoding="utf-8") as out:
        try:
            for chunk in client.api.build(path=ctx, tag=tag, rm=True, forcerm=True, decode=True,
                                          buildargs=dict(buildargs)):
                if "stream" in chunk:
                    out.write(chunk["stream"])
                    out.flush()
                if "error" in chunk:
                    error = str(chunk["error"]).strip()
                    out.write(f"ERROR: {error}\n")
        except Exception as exc:  # the SDK's transport errors share no base class with its API errors
            error = short_error(exc)
    return error


def _remove_container(client: Any, name: str) -> None:
    """Gone, whatever state it is in; a container that does not exist is already gone."""
    import docker.errors

    try:
        client.containers.get(name).remove(force=True)
    except docker.errors.NotFound:
        pass


def run_in_image(image: str, command: Sequence[str], volumes: Mapping[str, Mapping[str, str]], what: str) -> None:
    """A one-off container (e.g. generating the tiny model), removed on every path."""
    client = _docker()
    name = f"stackbuild-smoke-{os.getpid()}-{time.monotonic_ns()}"
    try:
        container = client.containers.run(image, list(command), name=name, detach=True, volumes=dict(volumes),
                                          user=f"{os.getuid()}:{os.getgid()}", environment={"HOME": "/tmp", "PYTHONHASHSEED": "0"},
                                          labels={"stackbuild.smoke": what})
        code = int(container.wait().get("StatusCode", 1))
        if code != 0:
            tail = container.logs(tail=5).decode("utf-8", "replace").strip().splitlines()[-1:]
            raise SmokeError(f"{what} in the serving image failed (exit {code}): {' '.join(tail)}", where=image)
    except SmokeError:
        raise
    except Exception as exc:
        raise SmokeError(f"{what} in the serving image failed: {short_error(exc)}", where=image) from exc
    finally:
        with uninterruptible():
            _remove_container(client, name)


def start_container(sc: SmokeConfig, spec: Mapping[str, Any], log: Path | None) -> Server:
    """Runs the server container; it and everything in it are removed when the run ends, also when
    a Ctrl-C lands between the engine's create and start (the name finds it then)."""
    client = _docker()
    name = f"stackbuild-smoke-{sc.stack}-{os.getpid()}-{time.monotonic_ns()}"
    try:
        container = client.containers.run(**spec, name=name)
    except BaseException as exc:
        with uninterruptible():
            _remove_container(client, name)
        if isinstance(exc, Exception):
            raise SmokeError(f"cannot start the serving container: {short_error(exc)}", where="[smoke.container]",
                             hint="check devices, groups, the port and the image") from exc
        raise

    def pump() -> None:
        try:
            out = log.open("ab") if log is not None else sys.stdout.buffer
            for chunk in container.logs(stream=True, follow=True):
                out.write(chunk)
                out.flush()
        except Exception:  # the container was removed under the stream: the run is over
            return

    threading.Thread(target=pump, daemon=True).start()
    stopped = threading.Event()

    def exit_code() -> int | None:
        import docker.errors

        try:
            container.reload()
        except docker.errors.NotFound:
            return -1
        return None if container.status in ("created", "running", "restarting") else int(container.attrs["State"]["ExitCode"])

    def stop() -> None:
        if stopped.is_set():
            return
        stopped.set()
        with uninterruptible():
            try:
                container.stop(timeout=15)
            except Exception:  # already gone or the engine refused: removal below forces it
                pass
            _remove_container(client, name)

    return Server(None, log, exit_code, stop)
