"""Upstream sources: one bare mirror per source in the cache, holding just the pinned commits.

Git sources fetch their pin by SHA (falling back to all branches and tags for servers that refuse
fetching by SHA); the pin is kept alive by a ref under refs/stackbuild/pins/. Archive and PyPI
sources are imported as one deterministic commit by `archives.import_archive`.
"""

from __future__ import annotations

import hashlib
import io
import posixpath
import re
import tarfile
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .archives import import_archive, imported_commit
from .config import SHA_RE, Config, ResolvedStack, Source
from .schema import looks_like_option
from .errors import RebaseError, SourceError, redact_credentials
from .fsutil import atomic_write, locked
from .git import ALLOWED_PROTOCOLS, git, out
from .settings import Settings

@dataclass(frozen=True)
class Synced:
    source: Source
    git_dir: Path
    commit: str
    fetched: bool


def mirror_path(settings: Settings, source: Source) -> Path:
    digest = hashlib.sha256(source.location.encode()).hexdigest()[:10]
    return settings.mirror_dir / f"{source.name}-{digest}.git"


def has_commit(git_dir: Path, sha: str) -> bool:
    return git(["cat-file", "-e", f"{sha}^{{commit}}"], git_dir=git_dir, check=False).returncode == 0


def _init_mirror(git_dir: Path) -> None:
    if not (git_dir / "HEAD").is_file():
        git_dir.parent.mkdir(parents=True, exist_ok=True)
        git(["init", "--bare", "-q", "--", str(git_dir)])
        # Worktrees of a bare mirror must not inherit a user's hooks or auto-gc mid-transaction.
        git(["config", "gc.auto", "0"], git_dir=git_dir)
        git(["config", "core.hooksPath", "/dev/null"], git_dir=git_dir)


def _mirror_lock(settings: Settings, git_dir: Path, source: Source):
    return locked(settings.mirror_dir / f".{git_dir.name}.lock", f"the mirror of '{source.name}'")


def _fetch(git_dir: Path, url: str, refspecs: list[str], progress: bool) -> subprocess.CompletedProcess:
    """Callers hold the mirror's lock: a failed fetch's partial packs are removed here, and only
    a fetch of our own can be writing them."""
    proc = git(["fetch", "--no-tags", "--no-write-fetch-head", *(["--progress"] if progress else []), "--", url,
                *refspecs], git_dir=git_dir, check=False, progress=progress)
    if proc.returncode != 0:
        # git keeps an interrupted pack as tmp_pack_*; every retry would add another.
        for partial in (git_dir / "objects" / "pack").glob("tmp_*"):
            partial.unlink(missing_ok=True)
    return proc


def fetch_ref(settings: Settings, source: Source, git_dir: Path, ref: str, *, progress: bool = False) -> str:
    """Resolve REF in the mirror, fetching it from the source's URL when the mirror lacks it."""
    if looks_like_option(ref):
        raise SourceError(f"'{ref}' starts with '-' and would be read as a git option", where=f"sources.{source.name}",
                          hint="give a branch, tag or commit SHA")
    for candidate in (ref, f"refs/stackbuild/refs/{ref}"):
        found = git(["rev-parse", "--verify", "-q", f"{candidate}^{{commit}}"], git_dir=git_dir, check=False)
        if found.returncode == 0:
            return found.stdout.decode().strip()
    if source.kind != "git":
        raise SourceError(f"'{ref}' is not a commit of source '{source.name}'", where=f"sources.{source.name}",
                          hint="an archive source only knows its imported commit; give a commit SHA of the mirror")
    remote = ref.split("/", 1)[1] if ref.startswith("origin/") else ref
    url = settings.rewrite(source.url or "")
    with _mirror_lock(settings, git_dir, source):
        proc = _fetch(git_dir, url, [f"+{remote}:refs/stackbuild/refs/{ref}"], progress)
    if proc.returncode != 0:
        raise SourceError(f"cannot fetch '{ref}' of source '{source.name}' from {url}", where=f"sources.{source.name}",
                          hint="check the ref name (branch, tag or SHA) and the network or mirror map")
    return out(["rev-parse", f"refs/stackbuild/refs/{ref}^{{commit}}"], git_dir=git_dir)


def sync(settings: Settings, source: Source, *, root: Path | None = None, progress: bool = False) -> Synced:
    """Make sure the mirror holds the pin. Cheap when it already does: one `cat-file -e`.

    ROOT is the stack file's folder: a relative archive path is read from there.
    """
    if source.kind != "git":
        known = imported_commit(settings, source)
        git_dir, commit = import_archive(settings, source, root=root)
        return Synced(source, git_dir, commit, fetched=known is None)
    git_dir = mirror_path(settings, source)
    sha = str(source.commit)
    # With submodules the pin is complete only once they all are: a sync that failed on one must
    # be retried by the next, not skipped because the superproject's commit is there.
    complete = f"refs/stackbuild/synced/{sha}" if source.submodules else sha
    if (git_dir / "HEAD").is_file() and has_commit(git_dir, complete):
        return Synced(source, git_dir, sha, fetched=False)
    with _mirror_lock(settings, git_dir, source):
        _init_mirror(git_dir)
        if not has_commit(git_dir, sha):
            url = settings.rewrite(str(source.url))
            if progress:
                print(f"fetching {source.name} {sha[:12]} from {redact_credentials(url)}", file=sys.stderr)
            proc = _fetch(git_dir, url, [f"+{sha}:refs/stackbuild/pins/{sha}"], progress)
            if proc.returncode != 0 or not has_commit(git_dir, sha):
                # Some servers refuse to serve a SHA that is not a ref tip: take the refs instead.
                _fetch(git_dir, url, ["+refs/heads/*:refs/stackbuild/heads/*", "+refs/tags/*:refs/tags/*"], progress)
            if not has_commit(git_dir, sha):
                detail = ""
                if proc.stderr:
                    lines = proc.stderr.decode(errors="replace").strip().splitlines()
                    detail = f": {lines[-1]}" if lines else ""
                raise SourceError(
                    f"commit {sha} of source '{source.name}' cannot be fetched from {url}{detail}",
                    where=f"sources.{source.name}.commit",
                    hint="check the URL and the pin, or map the URL to a local mirror with [mirrors] / STACKBUILD_MIRRORS",
                )
        git(["update-ref", f"refs/stackbuild/pins/{sha}", sha], git_dir=git_dir)
    if source.submodules:
        sync_submodules(settings, source, git_dir, sha, progress=progress)
        with _mirror_lock(settings, git_dir, source):
            git(["update-ref", complete, sha], git_dir=git_dir)
    return Synced(source, git_dir, sha, fetched=True)


# What `git check-ref-format` takes, narrowed: a tag name we cannot store is no version anyway.
_TAG_NAME_RE = re.compile(r"^(?!.*(?:\.\.|//|@\{|\.lock$|/\.))[A-Za-z0-9][A-Za-z0-9._/+-]*(?<![./])$")


def tags_marker(git_dir: Path, commit: str) -> Path:
    return git_dir / "stackbuild-tags" / commit


def record_tags(settings: Settings, source: Source, git_dir: Path, commit: str) -> int:
    """Stores as refs/tags/* every upstream tag whose commit the mirror already holds, so
    `git describe` can see the tags reachable from a pin. The pin is fetched by SHA without tags;
    `ls-remote` lists them without fetching a single object, and a tag on a commit we do not hold
    cannot be reachable from the pin. Returns how many tags were stored; a marker per pin says the
    lookup ran."""
    url = settings.rewrite(str(source.url))
    proc = git(["ls-remote", "--tags", "--", url], git_dir=git_dir, check=False)
    if proc.returncode != 0:
        lines = (proc.stderr or b"").decode(errors="replace").strip().splitlines()
        raise SourceError(f"cannot list the tags of source '{source.name}' at {redact_credentials(url)}"
                          + (f": {lines[-1]}" if lines else ""), where=f"sources.{source.name}",
                          hint=f'the version comes from the tags; reach the URL once, or set version = "…" in [sources.{source.name}.build]')
    target: dict[str, str] = {}
    for line in proc.stdout.decode(errors="replace").splitlines():
        sha, _, ref = line.partition("\t")
        if not ref.startswith("refs/tags/") or not SHA_RE.match(sha):
            continue
        name = ref[len("refs/tags/"):]
        if name.endswith("^{}"):
            target[name[:-3]] = sha  # an annotated tag's commit, listed after the tag object
        else:
            target.setdefault(name, sha)
    target = {n: s for n, s in target.items() if _TAG_NAME_RE.match(n)}
    held: set[str] = set()
    if target:
        listed = git(["cat-file", "--batch-check=%(objectname) %(objecttype)"], git_dir=git_dir,
                     input="".join(f"{s}\n" for s in sorted(set(target.values()))).encode()).stdout.decode()
        held = {line.split()[0] for line in listed.splitlines() if line.endswith(" commit")}
    updates = "".join(f"update refs/tags/{n} {s}\n" for n, s in sorted(target.items()) if s in held)
    with _mirror_lock(settings, git_dir, source):
        if updates:
            git(["update-ref", "--stdin"], git_dir=git_dir, input=updates.encode())
        atomic_write(tags_marker(git_dir, commit), f"{updates.count(chr(10))}\n".encode(), durable=False)
    return updates.count("\n")


@dataclass(frozen=True)
class Submodule:
    path: str
    url: str
    commit: str


def submodules_of(git_dir: Path, commit: str) -> list[Submodule]:
    """The gitlinks of a commit with their URLs from its .gitmodules."""
    modules = git(["show", f"{commit}:.gitmodules"], git_dir=git_dir, check=False)
    if modules.returncode != 0:
        return []
    listed = git(["config", "--blob", f"{commit}:.gitmodules", "--get-regexp", r"^submodule\..*\.(path|url)$"],
                 git_dir=git_dir, check=False).stdout.decode()
    by_name: dict[str, dict[str, str]] = {}
    for line in listed.splitlines():
        key, _, value = line.partition(" ")
        m = re.match(r"^submodule\.(.*)\.(path|url)$", key)
        if m:
            by_name.setdefault(m.group(1), {})[m.group(2)] = value
    links = {}
    for line in out(["ls-tree", "-r", "-z", commit], git_dir=git_dir).split("\0"):
        if line.startswith("160000 commit "):
            meta, path = line.split("\t", 1)
            links[path] = meta.split()[2]
    found = [Submodule(v["path"], v["url"], links[v["path"]]) for v in by_name.values()
             if "path" in v and "url" in v and v["path"] in links]
    for name, v in by_name.items():
        _check_submodule(commit, name, v.get("url", ""), v.get("path", ""))
    return found


# `ext::` and its kin name a command, not a repository; git's allowlist blocks them as well.
_TRANSPORT_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)::")


def _check_submodule(commit: str, name: str, url: str, path: str) -> None:
    """The checks git makes before it trusts a .gitmodules entry (submodule-config.c, fsck.c): an
    upstream's file is as untrusted as a stack file, and we parse it ourselves."""
    where = f".gitmodules of {commit[:12]} (submodule.{name})"
    bad = None
    if looks_like_option(url) or looks_like_option(path):
        bad = "starts with '-' and would be read as a git option"
    elif "\n" in url or "\n" in path:
        bad = "contains a newline"
    elif (m := _TRANSPORT_RE.match(url)) and m.group(1) not in ALLOWED_PROTOCOLS.split(":"):
        bad = f"uses the transport '{m.group(1)}::', which runs a command"
    elif path.startswith("/") or any(part in ("..", ".git") for part in path.split("/")):
        bad = "has a path leaving the tree or into .git"
    elif ".." in name.split("/"):
        bad = "has a name with '..'"
    if bad:
        raise SourceError(f"submodule '{name}' {bad}: url {url!r}, path {path!r}", where=where,
                          hint="the upstream's .gitmodules is unsafe; set submodules = false or pin another commit")


def _child(source: Source, sub: Submodule) -> Source:
    url = sub.url
    if url.startswith(("./", "../")):  # relative to the superproject's own URL, as git resolves it
        url = posixpath.normpath(posixpath.join(str(source.url).rstrip("/"), url)).replace(":/", "://", 1)
    return Source(name=f"{source.name}.{sub.path.replace('/', '.')}", kind="git", url=url, commit=sub.commit,
                  submodules=True)


def sync_submodules(settings: Settings, source: Source, git_dir: Path, commit: str, *, progress: bool = False) -> None:
    for sub in submodules_of(git_dir, commit):
        sync(settings, _child(source, sub), progress=progress)


def tree_archive(settings: Settings, source: Source, git_dir: Path, commit: str) -> bytes:
    """The tree of COMMIT as a tar, with the source's submodules (recursively) at their paths:
    `git archive` alone leaves submodule folders empty, and a build needs their files."""
    data = git(["archive", "--format=tar", commit], git_dir=git_dir).stdout
    if not source.submodules:
        return data
    subs = submodules_of(git_dir, commit)
    if not subs:
        return data
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as merged:
        for blob, prefix in [(data, ""), *((tree_archive(settings, _child(source, sub),
                                                          mirror_path(settings, _child(source, sub)), sub.commit),
                                            sub.path + "/") for sub in subs)]:
            with tarfile.open(fileobj=io.BytesIO(blob), mode="r") as part:
                for member in part.getmembers():
                    if member.name == "pax_global_header" or member.type == tarfile.XGLTYPE:
                        continue
                    member.name = prefix + member.name
                    merged.addfile(member, part.extractfile(member) if member.isfile() else None)
    return out.getvalue()


def git_source(cfg: Config, resolved: ResolvedStack, name: str | None) -> Source:
    git_sources = [s for s in resolved.sources if resolved.series_for(s.name)]
    if name is None:
        if len(git_sources) != 1:
            raise RebaseError(f"stack '{resolved.name}' patches {len(git_sources)} sources; say which",
                              hint=f"--source {' or --source '.join(s.name for s in git_sources) or 'NAME'}")
        return git_sources[0]
    found = [s for s in resolved.sources if s.name == name]
    if not found or not resolved.series_for(name):
        raise RebaseError(f"stack '{resolved.name}' has no series for source '{name}'", where=str(cfg.path),
                          hint=f"sources with series: {', '.join(s.name for s in git_sources) or 'none'}")
    if found[0].kind != "git":
        raise RebaseError(f"source '{name}' is an {found[0].kind} pin; only git sources can be rebased",
                          where=cfg.where.at(f"sources.{name}"), hint="point it at a git url + commit to rebase it")
    return found[0]
