"""The replayer: patches become commits without touching a worktree or moving a ref.

Blobs are read through one `git cat-file --batch`, hunks are applied in Python (hunks.py, git
apply's matching rules), and every commit goes through one `git fast-import` stream. Patches our
applier does not decide — binary, copies, and anything needing a three-way merge — are handed to
git itself on a temporary index. `replay` only writes objects, so `check`, `bisect`, `horizon`,
`rebase` and `build` can run it freely; moving branches and worktrees is worktrees.py's.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Sequence

from .errors import ApplyError, PatchError
from .git import EMAIL, EPOCH, IDENTITY, TRAILER, CatFile, fast_import, git, out
from .gitnames import invalid_path
from .patches import FileDiff, Patch, split_lf
from .hunks import FailedHunk, FileState, Overlap, apply_hunks, reverse_diff

CLEAN, OFFSET, FUZZ, THREEWAY, ALREADY, CONFLICT = "clean", "offset", "fuzz", "3way", "already-applied", "conflict"
MALFORMED = "malformed"  # the patch cannot be read, or no tree may hold what it writes: no git would take it
OUTCOMES = (CLEAN, OFFSET, FUZZ, THREEWAY, ALREADY, CONFLICT, MALFORMED)
ENGINE_VERSION = "1"  # part of every digest: a change in how commits are made must not reuse old ones
DEFAULT_FUZZ = 2


@dataclass(frozen=True)
class PatchResult:
    patch: Patch
    outcome: str
    ok: bool
    commit: str | None = None
    failed: tuple[FailedHunk, ...] = ()
    files: tuple[str, ...] = ()
    detail: str = ""
    error: PatchError | None = None  # why a `malformed` patch is refused, as `apply` reports it

    def to_json(self) -> dict:
        return {
            "patch": self.patch.label,
            "outcome": self.outcome,
            "ok": self.ok,
            "commit": self.commit,
            "sha256": self.patch.sha256,
            "files": list(self.files),
            "failed": [vars(f) for f in self.failed],
            "detail": self.detail,
        }


@dataclass(frozen=True)
class Replay:
    base: str
    head: str
    results: tuple[PatchResult, ...]
    overlaps: tuple[Overlap, ...] = ()

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    @property
    def first_failure(self) -> PatchResult | None:
        return next((r for r in self.results if not r.ok), None)


@dataclass
class _Entry:
    mode: str
    sha: str | None = None
    data: bytes | None = None


@dataclass
class _PendingCommit:
    patch: Patch
    message: bytes
    author: str
    changes: dict[str, _Entry | None]


def _is_link(mode: str) -> bool:
    return mode == "120000"


def _fi_path(path: str) -> bytes:
    raw = path.encode("utf-8", "surrogateescape")
    if any(c < 0x20 for c in raw) or raw.startswith(b'"') or b"\\" in raw:
        escaped = raw.replace(b"\\", b"\\\\").replace(b'"', b'\\"').replace(b"\n", b"\\n")
        return b'"' + escaped + b'"'
    return raw


def commit_message(patch: Patch) -> str:
    text = patch.header.message.strip() or f"Apply {patch.name}"
    return f"{text}\n\n{TRAILER}: {patch.label}\n"


def author_line(patch: Patch) -> str:
    h = patch.header
    name = (h.author or IDENTITY).replace("<", "").replace(">", "").strip() or IDENTITY
    email = (h.email or EMAIL).replace("<", "").replace(">", "")
    return f"{name} <{email}> {h.date or EPOCH}"


class Replayer:
    """One replay of patches over one base commit in one repository."""

    def __init__(self, git_dir: Path, base: str, *, fuzz: int = 0, overlaps: bool = False,
                 paths: Iterable[str] = ()):
        self.git_dir = git_dir
        self.base = out(["rev-parse", f"{base}^{{commit}}"], git_dir=git_dir, error=ApplyError)
        self.head = self.base
        self.fuzz = fuzz
        self.cat = CatFile(git_dir)
        self.entries: dict[str, _Entry] = {}
        self.dirs: set[str] = set()
        self._list(paths)
        self.files: dict[str, FileState] = {}
        self.pending: list[_PendingCommit] = []
        self.commits: dict[int, str] = {}  # id(patch) -> its commit, once written
        self.overlaps: list[Overlap] | None = [] if overlaps else None

    def close(self) -> None:
        self.cat.close()

    def _list(self, paths: Iterable[str]) -> None:
        """Modes and blobs of just the paths the patches name, and of every folder above them.

        Listing a vLLM-size tree whole costs more than applying 200 patches; a listing by
        pathspec also tells which prefixes are folders and which are symlinks.
        """
        named = set(paths)
        specs: set[str] = set()
        for path in named:
            parts = path.split("/")
            specs.update("/".join(parts[:i]) for i in range(1, len(parts) + 1))
        ordered = sorted(specs)
        for start in range(0, len(ordered), 1000):
            chunk = ordered[start:start + 1000]
            listing = git(["--literal-pathspecs", "ls-tree", "-z", "--full-tree", self.base, "--", *chunk],
                          git_dir=self.git_dir).stdout
            for item in listing.split(b"\0"):
                if item:
                    meta, raw = item.split(b"\t", 1)
                    mode, _kind, sha = meta.split()
                    path = raw.decode("utf-8", "surrogateescape")
                    # ls-tree descends into a folder a deeper pathspec names and lists its siblings
                    # too, without listing the folder itself: folders are also known by what is in them.
                    parent = path.rpartition("/")[0]
                    if parent and parent not in self.dirs:
                        self._add_dirs(path)
                    if mode == b"040000":
                        self.dirs.add(path)
                    else:
                        self.entries[path] = _Entry(mode.decode(), sha.decode())
        wanted = [self.entries[p] for p in named if p in self.entries and self.entries[p].mode != "160000"]
        blobs = self.cat.read_many(sorted({str(e.sha) for e in wanted}))
        for entry in wanted:
            entry.data = blobs.get(str(entry.sha)) or b""

    # -- reading the current tree

    def _content(self, path: str, entry: _Entry) -> bytes:
        if entry.data is None:
            data = self.cat.read(str(entry.sha))
            entry.data = b"" if data is None else data
        return entry.data

    def _state(self, path: str, writes: dict[str, FileState | None]) -> FileState | None:
        if path in writes:
            return writes[path]
        if path in self.files:
            return self.files[path]
        entry = self.entries.get(path)
        if entry is None:
            return None
        lines = split_lf(self._content(path, entry))
        state = FileState(entry.mode, lines, [None] * len(lines))
        self.files[path] = state
        return state

    def _check_safe(self, patch: Patch, diff: FileDiff, path: str, writes: dict[str, FileState | None]) -> None:
        """apply.c check_patch's path_is_beyond_symlink: no path may lie under a symlink, in the
        tree or made earlier in the same patch; read-cache.c verify_path for the mode it gets."""
        where = f"{patch.path or patch.url or patch.label}:{diff.line}"
        parts = path.split("/")
        for i in range(1, len(parts)):
            prefix = "/".join(parts[:i])
            if prefix in writes:
                state = writes[prefix]
                mode = state.mode if state is not None else None
            else:
                entry = self.entries.get(prefix)
                mode = entry.mode if entry is not None else None
            if mode == "120000":
                raise PatchError(f"affected file '{path}' is beyond a symbolic link", where=where,
                                 hint="a patch may not reach outside its tree through a symlink; remove that file diff")

    def _check_tree(self, patch: Patch, writes: dict[str, FileState | None]) -> None:
        """What the patch leaves must be a tree git can hold: no file below a symlink it made
        (whatever the order of its file diffs), no symlink named .gitmodules."""
        by_path = {f.path: f for f in patch.files}
        for path, state in writes.items():
            diff = by_path.get(path, patch.files[0])
            if state is not None:
                self._check_safe(patch, diff, path, writes)
                if invalid_path(path, state.mode):
                    raise PatchError(f"invalid path '{path}'", where=f"{patch.path or patch.url or patch.label}:{diff.line}",
                                     hint="git refuses a symbolic link named .gitmodules; make it a file")

    # -- one patch, in Python

    def _try(self, patch: Patch, diffs: Iterable[FileDiff], fuzz: int, track: bool):
        writes: dict[str, FileState | None] = {}
        failed: list[FailedHunk] = []
        max_offset = used_fuzz = 0
        for diff in diffs:
            for p in (diff.old_path, diff.new_path):
                if p:
                    self._check_safe(patch, diff, p, writes)
            old = self._state(diff.old_path, writes) if diff.old_path else None
            if diff.old_path and old is None:
                failed.append(FailedHunk(diff.old_path, 0, "", diff.line, "file does not exist"))
                continue
            if diff.old_path is None:
                if self._state(str(diff.new_path), writes) is not None or diff.new_path in self.dirs:
                    failed.append(FailedHunk(str(diff.new_path), 0, "", diff.line, "file already exists"))
                    continue
                parts = str(diff.new_path).split("/")
                blocking = next((q for q in ("/".join(parts[:i]) for i in range(1, len(parts)))
                                 if self._state(q, writes) is not None), None)
                if blocking:
                    failed.append(FailedHunk(str(diff.new_path), 0, "", diff.line, f"'{blocking}' is a file"))
                    continue
                old = FileState(diff.new_mode or "100644", [], [])
            elif diff.rename and diff.new_path and self._state(diff.new_path, writes) is not None:
                failed.append(FailedHunk(diff.new_path, 0, "", diff.line, "rename target already exists"))
                continue
            elif old is not None:
                # apply.c check_preimage: a mode the patch gives the old file must be of its type;
                # check_patch: the new mode (the patch's, else the file's) of the old one's type.
                old_path, old_mode = diff.old_path, diff.old_mode or old.mode
                if _is_link(old_mode) != _is_link(old.mode):
                    failed.append(FailedHunk(old_path, 0, "", diff.line, f"wrong type: the patch says {old_mode}, "
                                                                           f"the file is {old.mode}"))
                    continue
                if diff.new_path and _is_link(diff.new_mode or old.mode) != _is_link(old_mode):
                    failed.append(FailedHunk(diff.path, 0, "", diff.line, f"new mode {diff.new_mode} does not "
                                                                           f"match old mode {old_mode}"))
                    continue
            assert old is not None
            new, offset, fz, bad = apply_hunks(old, diff.hunks, fuzz, patch.label, diff.path,
                                               self.overlaps if track else None)
            if new is None:
                failed.extend(bad)
                continue
            max_offset, used_fuzz = max(max_offset, offset), max(used_fuzz, fz)
            if diff.new_path is None:
                if new.lines:
                    failed.append(FailedHunk(str(diff.old_path), 0, "", diff.line, "deletion leaves content behind"))
                    continue
                writes[str(diff.old_path)] = None
                continue
            if diff.new_mode:
                new.mode = diff.new_mode
            if diff.rename and diff.old_path:
                writes[diff.old_path] = None
            writes[diff.new_path] = new
        if not failed:
            self._check_tree(patch, writes)
        return writes, failed, max_offset, used_fuzz

    def _record(self, patch: Patch, writes: dict[str, FileState | None]) -> None:
        changes: dict[str, _Entry | None] = {}
        for path, state in writes.items():
            if state is None:
                self.files.pop(path, None)
                self.entries.pop(path, None)
                changes[path] = None
            else:
                self.files[path] = state
                entry = _Entry(state.mode, None, b"".join(state.lines))
                self.entries[path] = entry
                changes[path] = entry
                self._add_dirs(path)
        self._queue(patch, changes)

    def _queue(self, patch: Patch, changes: dict[str, _Entry | None]) -> None:
        self.pending.append(_PendingCommit(patch, commit_message(patch).encode(), author_line(patch), changes))

    # -- committing through fast-import

    def flush(self) -> list[str]:
        """Write pending commits; returns their SHAs in order."""
        if not self.pending:
            return []
        ref = f"refs/stackbuild/scratch/{os.getpid()}-{id(self)}"
        chunks: list[bytes] = []
        parent = self.head
        for mark, pc in enumerate(self.pending, 1):
            chunks.append(b"commit %s\nmark :%d\n" % (ref.encode(), mark))
            chunks.append(b"author %s\ncommitter %s <%s> %s\n" % (pc.author.encode(), IDENTITY.encode(), EMAIL.encode(), EPOCH.encode()))
            chunks.append(b"data %d\n%s\n" % (len(pc.message), pc.message))
            chunks.append(b"from %s\n" % (parent.encode() if mark == 1 else b":%d" % (mark - 1)))
            for path in sorted(pc.changes):
                entry = pc.changes[path]
                p = _fi_path(path)
                if entry is None:
                    chunks.append(b"D %s\n" % p)
                elif entry.data is not None:
                    chunks.append(b"M %s inline %s\ndata %d\n" % (entry.mode.encode(), p, len(entry.data)))
                    chunks.append(entry.data)
                    chunks.append(b"\n")
                else:
                    chunks.append(b"M %s %s %s\n" % (entry.mode.encode(), str(entry.sha).encode(), p))
            chunks.append(b"\n")
        chunks.append(b"done\n")
        with tempfile.NamedTemporaryFile(prefix="stackbuild-marks-") as marks:
            proc = fast_import(self.git_dir, ["-c", "core.compression=1", "fast-import", "--quiet", "--done", "--depth=1",
                                              f"--export-marks={marks.name}"], b"".join(chunks))
            if proc.returncode != 0:
                raise ApplyError(f"git fast-import failed: {proc.stderr.decode(errors='replace').strip()[-300:]}",
                                 where=str(self.git_dir), hint="check disk space and the repository's health (git fsck)")
            table = dict(line.split() for line in Path(marks.name).read_text().splitlines())
        git(["update-ref", "-d", ref], git_dir=self.git_dir, check=False)
        shas = [table[f":{i}"] for i in range(1, len(self.pending) + 1)]
        for pc, sha in zip(self.pending, shas):
            self.commits[id(pc.patch)] = sha
        self.pending.clear()
        self.head = shas[-1]
        return shas

    # -- patches git decides

    def _via_git(self, patch: Patch, threeway: bool) -> tuple[bool, dict[str, _Entry | None], str]:
        self.flush()
        with tempfile.TemporaryDirectory(prefix="stackbuild-idx-") as tmp:
            env = {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
            git(["read-tree", self.head], git_dir=self.git_dir, env=env, error=ApplyError)
            args = ["apply", "--cached", f"-p{patch.strip}", "--whitespace=nowarn"]
            if patch.directory:
                args.append(f"--directory={patch.directory}")
            if threeway:
                args.append("--3way")
            # From an empty folder: with --3way git 2.39 writes merge results into its cwd even
            # with --cached, and a check must never write files where it was started.
            work = Path(tmp) / "cwd"
            work.mkdir()
            proc = git(args, git_dir=self.git_dir, cwd=work, env=env, input=patch.data, check=False)
            unmerged = git(["ls-files", "-u"], git_dir=self.git_dir, env=env).stdout.strip()
            message = proc.stderr.decode(errors="replace").strip()
            if proc.returncode != 0 or unmerged:
                return False, {}, message
            tree = out(["write-tree"], git_dir=self.git_dir, env=env, error=ApplyError)
        diff = git(["diff-tree", "-r", "-z", "--no-renames", f"{self.head}^{{tree}}", tree], git_dir=self.git_dir).stdout
        fields = diff.split(b"\0")
        changes: dict[str, _Entry | None] = {}
        for i in range(0, len(fields) - 1, 2):
            meta, path = fields[i].decode(), fields[i + 1].decode("utf-8", "surrogateescape")
            _old_mode, new_mode, _old_sha, new_sha, status = meta.lstrip(":").split()
            changes[path] = None if status == "D" else _Entry(new_mode, new_sha)
        return True, changes, message

    def _record_git(self, patch: Patch, changes: dict[str, _Entry | None]) -> None:
        for path, entry in changes.items():
            self.files.pop(path, None)
            if entry is None:
                self.entries.pop(path, None)
            else:
                self.entries[path] = entry
                self._add_dirs(path)
        self._queue(patch, changes)

    def _add_dirs(self, path: str) -> None:
        parts = path.split("/")
        self.dirs.update("/".join(parts[:i]) for i in range(1, len(parts)))

    # -- the public steps

    def probe(self, patch: Patch) -> bool:
        """Does PATCH apply as it is (clean or at an offset)? Kept in memory when it does; nothing
        is written and no three-way merge is tried, which keeps bisect probes cheap."""
        if any(f.needs_git for f in patch.files):
            return self.step(patch, track=False).outcome in (CLEAN, OFFSET)
        writes, failed, _, _ = self._try(patch, patch.files, 0, False)
        if not failed:
            self._record(patch, writes)
        return not failed

    def step(self, patch: Patch, *, fuzz: int | None = None, track: bool = True) -> PatchResult:
        if patch.error is not None:
            return PatchResult(patch, MALFORMED, False, detail=str(patch.error), error=patch.error)
        try:
            return self._step(patch, fuzz, track)
        except PatchError as exc:
            return PatchResult(patch, MALFORMED, False, files=tuple(dict.fromkeys(f.path for f in patch.files)),
                               detail=str(exc), error=exc)

    def _upstream_removed(self, patch: Patch) -> bool:
        """A deletion of a missing file is upstream's own only if the file the patch deleted is
        known here (its preimage blob is in the object store); else the path is simply wrong."""
        for f in patch.files:
            if f.new_path is None and f.old_path and self._state(f.old_path, {}) is None:
                if not f.old_blob or self.cat.read(f"{f.old_blob}^{{blob}}") is None:
                    return False
        return True

    def _step(self, patch: Patch, fuzz: int | None, track: bool) -> PatchResult:
        allowed = self.fuzz if fuzz is None else fuzz
        files = tuple(dict.fromkeys(f.path for f in patch.files))
        if any(f.needs_git for f in patch.files):
            ok, changes, message = self._via_git(patch, threeway=False)
            if ok:
                self._record_git(patch, changes)
                return PatchResult(patch, CLEAN, True, files=files)
            ok, changes, message3 = self._via_git(patch, threeway=True)
            if ok:
                self._record_git(patch, changes)
                return PatchResult(patch, THREEWAY, True, files=files)
            lines = (message3 or message).splitlines()
            return PatchResult(patch, CONFLICT, False, files=files, detail=lines[-1] if lines else "")
        writes, failed, offset, _ = self._try(patch, patch.files, 0, track)
        if not failed:
            self._record(patch, writes)
            return PatchResult(patch, OFFSET if offset else CLEAN, True, files=files,
                               detail=f"offset {offset} lines" if offset else "")
        _, rfailed, _, _ = self._try(patch, [reverse_diff(f) for f in reversed(patch.files)], 0, False)
        if not rfailed and self._upstream_removed(patch):
            return PatchResult(patch, ALREADY, True, files=files, detail="applies in reverse: upstream already has it")
        if any(f.old_blob for f in patch.files):
            ok, changes, message = self._via_git(patch, threeway=True)
            if ok:
                self._record_git(patch, changes)
                return PatchResult(patch, THREEWAY, True, files=files, detail="applied by three-way merge")
        fwrites, ffailed, _, used = self._try(patch, patch.files, max(DEFAULT_FUZZ, allowed), False)
        if not ffailed:
            accepted = allowed >= used
            if accepted:
                self._record(patch, fwrites)
            return PatchResult(patch, FUZZ, accepted, files=files, failed=() if accepted else tuple(failed),
                               detail=f"applies only with fuzz {used}" + ("" if accepted else " (refused)"))
        return PatchResult(patch, CONFLICT, False, files=files, failed=tuple(failed))


def replay(git_dir: Path, base: str, patches: Sequence[Patch], *, fuzz: int = 0, stop_at_failure: bool = True,
           overlaps: bool = False, fuzz_for: Callable[[Patch], int] | None = None, write: bool = True) -> Replay:
    """Apply PATCHES over BASE as commits, in memory; only objects are written, no ref moves.

    With WRITE false only verdicts are wanted (check): commits are written only where a patch
    has to go through git (three-way, binary), and the head is then the last one written.
    """
    replayer = Replayer(git_dir, base, fuzz=fuzz, overlaps=overlaps, paths={p for patch in patches for p in patch.paths})
    try:
        results: list[PatchResult] = []
        for patch in patches:
            result = replayer.step(patch, fuzz=max(fuzz, fuzz_for(patch)) if fuzz_for else None)
            results.append(result)
            if not result.ok and stop_at_failure:
                break
        if write:
            replayer.flush()
        results = [replace(r, commit=replayer.commits.get(id(r.patch))) for r in results]
        return Replay(replayer.base, replayer.head, tuple(results), tuple(_merge_overlaps(replayer.overlaps or [])))
    finally:
        replayer.close()


def _merge_overlaps(found: list[Overlap]) -> list[Overlap]:
    """Adjacent lines of the same pair and kind become one range."""
    merged: list[Overlap] = []
    for o in found:
        last = merged[-1] if merged else None
        if last and (last.path, last.earlier, last.later, last.kind) == (o.path, o.earlier, o.later, o.kind) \
                and o.first_line <= last.last_line + 1:
            merged[-1] = replace(last, last_line=max(last.last_line, o.last_line))
        else:
            merged.append(o)
    return merged
