"""Docker Engines reached only through the Engine API.

Inputs go into a container and wheels come out of it by the API's archive copy, never by bind
mounts, so the same code drives a local socket, `ssh://` or `tcp://` engines. Bind-mounted caches
are an optional speed-up on engines that share the host's filesystem.
"""

from __future__ import annotations

import io
import os
import tarfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import docker
import docker.errors
import requests.exceptions

from .errors import EngineError

LogSink = Callable[[str], None]
LOCAL = "local"


def _engine_error(name: str, what: str, exc: BaseException) -> EngineError:
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return EngineError(
        f"{what}: {detail}",
        where=f"engine {name}",
        hint="check that the engine runs (`docker info`), DOCKER_HOST and --engine",
    )


@dataclass
class Engine:
    """One Docker Engine. `url` None means the environment's (DOCKER_HOST or the local socket)."""

    name: str
    url: str | None
    client: docker.DockerClient = field(repr=False)
    _active: dict = field(default_factory=dict, repr=False)

    def cancel(self) -> None:
        """Removes the containers this process still runs here (Ctrl-C must not leave builds behind)."""
        for container in list(self._active.values()):
            try:
                container.remove(force=True)
            except (docker.errors.DockerException, requests.exceptions.RequestException):
                pass  # already gone, or the engine is: nothing left to clean here

    def version(self) -> dict:
        try:
            return self.client.version()
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            raise _engine_error(self.name, "cannot ask the engine its version", exc) from None

    def image_id(self, ref: str) -> str | None:
        """The id of an image the engine holds, or None; never pulls."""
        try:
            return self.client.images.get(ref).id
        except docker.errors.ImageNotFound:
            return None
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            raise _engine_error(self.name, f"cannot inspect image {ref}", exc) from None

    def build_image(
        self,
        context: Mapping[str, bytes],
        tag: str,
        buildargs: Mapping[str, str],
        log: LogSink,
    ) -> str:
        """Builds from in-memory files (the Dockerfile among them) and returns the image id."""
        blob = tar_bytes(context)
        try:
            stream = self.client.api.build(
                fileobj=io.BytesIO(blob),
                custom_context=True,
                tag=tag,
                buildargs=dict(buildargs),
                rm=True,
                forcerm=True,
                decode=True,
                pull=False,
            )
            for chunk in stream:
                if "stream" in chunk:
                    for line in chunk["stream"].splitlines():
                        if line.strip():
                            log(line)
                if "error" in chunk:
                    raise EngineError(
                        f"image build failed: {chunk['error'].strip()}",
                        where=f"engine {self.name}, image {tag}",
                        hint="read the build log above; the base image must exist on this engine",
                    )
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            raise _engine_error(self.name, f"cannot build image {tag}", exc) from None
        found = self.image_id(tag)
        if found is None:
            raise EngineError(f"image {tag} missing right after its build", where=f"engine {self.name}")
        return found

    def run(
        self,
        image: str,
        command: list[str],
        *,
        env: Mapping[str, str],
        inputs: bytes,
        output: str,
        log: LogSink,
        mounts: Mapping[str, str] | None = None,
        workdir: str = "/",
        timeout: float | None = None,
    ) -> tuple[int, bytes]:
        """Creates a container, copies `inputs` (a tar) into /, runs, streams the log, then copies
        `output` out as a tar. Returns (exit code, tar bytes); the container is always removed.
        After `timeout` seconds the container is killed and the result is TimeoutError."""
        volumes = {host: {"bind": inside, "mode": "rw"} for host, inside in (mounts or {}).items()}
        try:
            container = self.client.containers.create(
                image, command, environment=dict(env), volumes=volumes or None, working_dir=workdir, detach=True
            )
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            raise _engine_error(self.name, f"cannot create a container from {image}", exc) from None
        self._active[container.id] = container
        expired = threading.Event()

        def expire() -> None:
            expired.set()
            try:
                container.kill()
            except (docker.errors.DockerException, requests.exceptions.RequestException):
                pass  # it ended on its own meanwhile
        timer = threading.Timer(timeout, expire) if timeout else None
        try:
            if not container.put_archive("/", inputs):
                raise EngineError("copying the inputs into the container failed", where=f"engine {self.name}")
            container.start()
            if timer is not None:
                timer.daemon = True
                timer.start()
            _follow(container, log)
            code = int(container.wait().get("StatusCode", 1))
            if expired.is_set():
                raise TimeoutError(f"killed after {timeout:g} s")
            try:
                bits, _stat = container.get_archive(output)
                blob = b"".join(bits)
            except docker.errors.NotFound:
                blob = b""
            return code, blob
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            raise _engine_error(self.name, f"container from {image} failed", exc) from None
        finally:
            if timer is not None:
                timer.cancel()
            self._active.pop(container.id, None)
            try:
                container.remove(force=True)
            except (docker.errors.DockerException, requests.exceptions.RequestException):
                pass  # the engine may be gone; its own error was already raised above


def _follow(container, log: LogSink) -> None:
    """Streams the container's output line by line as it is produced."""
    pending = b""
    for chunk in container.logs(stream=True, follow=True, stdout=True, stderr=True):
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            log(line.decode("utf-8", "replace").rstrip("\r"))
    if pending:
        log(pending.decode("utf-8", "replace"))


def connect(url: str | None = None, *, name: str | None = None, timeout: int = 600) -> Engine:
    """Reaches one engine and pings it; an unreachable engine is an EngineError, not a traceback."""
    label = name or url or os.environ.get("DOCKER_HOST") or LOCAL
    try:
        client = docker.DockerClient(base_url=url, timeout=timeout) if url else docker.from_env(timeout=timeout)
        client.ping()
    except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
        raise _engine_error(label, "Docker Engine not reachable", exc) from None
    return Engine(name=label, url=url, client=client)


def connect_many(urls: Iterable[str | None]) -> list[Engine | EngineError]:
    """Several engines; an unreachable one is returned as its error, so its jobs fail clearly
    while the others still build."""
    out: list[Engine | EngineError] = []
    for url in urls:
        try:
            out.append(connect(url))
        except EngineError as exc:
            out.append(exc)
    return out


def tar_bytes(files: Mapping[str, bytes], mode: int = 0o644) -> bytes:
    """A deterministic tar of in-memory files (fixed mtime and owner)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o755 if name.endswith(".sh") else mode
            info.mtime = 946684800
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def add_tree(tar: tarfile.TarFile, folder: Path, prefix: str) -> None:
    """Adds a host folder's regular files under `prefix` (symlinks followed: wheelhouses use them)."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            tar.add(str(path.resolve()), arcname=f"{prefix}/{path.relative_to(folder).as_posix()}", recursive=False)


def extract_files(blob: bytes, suffix: str) -> Iterator[tuple[str, bytes]]:
    """(base name, bytes) of each regular file in a tar whose name ends with `suffix`."""
    if not blob:
        return
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        for member in tar.getmembers():
            if member.isfile() and member.name.endswith(suffix):
                handle = tar.extractfile(member)
                if handle is not None:
                    yield os.path.basename(member.name), handle.read()


def schedule(
    jobs: list[str],
    needs: Mapping[str, Iterable[str]],
    engines: list[Engine | EngineError],
    work: Callable[[Engine, str], object],
) -> dict[str, object]:
    """Runs `work(engine, job)` for every job, job i on engine i mod n, one worker per engine,
    each job once everything it needs has finished on whichever engine. Returns {job: result or
    the exception}: an unreachable engine fails its own jobs, a failed job fails the jobs that
    need it, the rest finish."""
    if not engines:
        raise EngineError("no engine to build on", hint="start dockerd, or pass --engine URL")
    results: dict[str, object] = {}
    cond = threading.Condition()
    queues: list[list[str]] = [[] for _ in engines]
    for index, job in enumerate(jobs):
        queues[index % len(engines)].append(job)

    def wait_for(job: str) -> BaseException | None:
        with cond:
            while True:
                pending = [n for n in needs.get(job, ()) if n in jobs and n not in results]
                broken = [n for n in needs.get(job, ()) if isinstance(results.get(n), BaseException)]
                if broken:
                    return EngineError(f"{job} not built: {broken[0]}, which it needs, failed")
                if not pending:
                    return None
                cond.wait()

    def worker(engine: Engine | EngineError, queue: list[str]) -> None:
        for job in queue:
            problem: BaseException | None = engine if isinstance(engine, EngineError) else wait_for(job)
            if problem is None:
                try:
                    outcome: object = work(engine, job)  # type: ignore[arg-type]
                except BaseException as exc:  # noqa: BLE001 - every failure is reported per job
                    outcome = exc
            else:
                outcome = problem
            with cond:
                results[job] = outcome
                cond.notify_all()

    threads = [threading.Thread(target=worker, args=pair, daemon=True) for pair in zip(engines, queues)]
    for t in threads:
        t.start()
    try:
        for t in threads:
            while t.is_alive():
                t.join(timeout=0.5)
    except KeyboardInterrupt:
        for engine in engines:
            if isinstance(engine, Engine):
                engine.cancel()
        raise
    return results
