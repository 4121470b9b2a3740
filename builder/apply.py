"""The apply engine: patches become commits without touching a worktree, refs move last.

Blobs are read through one `git cat-file --batch`, hunks are applied in Python with `git apply`'s
own matching rules (exact context, offsets searched nearest-first, anchoring at the beginning and
end of files), and every commit goes through one `git fast-import` stream. Patches our applier
does not decide — binary, copies, and anything needing a three-way merge — are handed to git
itself on a temporary index. Nothing moves a ref: `replay` only writes objects, so `check`,
`bisect` and `build` can run it freely; `apply_stack` moves the branch and the worktree at the
very end, with interrupts held, so a failure leaves the previous state as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Collection, Iterable, Sequence

from .config import Config, ResolvedStack, Source
from .errors import ApplyError, LockError, PatchError, StackbuildError
from .fsutil import atomic_write, deferred_interrupts, locked, sha256
from .git import EMAIL, EPOCH, IDENTITY, CatFile, fast_import, git, hint_for, out
from .patches import FileDiff, Hunk, Patch, invalid_path, split_lf
from .series import load_stack_patches, stack_patch_digests
from .settings import Settings
from .sources import Synced, fetch_ref, sync

CLEAN, OFFSET, FUZZ, THREEWAY, ALREADY, CONFLICT = "clean", "offset", "fuzz", "3way", "already-applied", "conflict"
MALFORMED = "malformed"  # the patch cannot be read, or no tree may hold what it writes: no git would take it
OUTCOMES = (CLEAN, OFFSET, FUZZ, THREEWAY, ALREADY, CONFLICT, MALFORMED)
TRAILER = "Stackbuild-Patch"
ENGINE_VERSION = "1"  # part of every digest: a change in how commits are made must not reuse old ones
DEFAULT_FUZZ = 2


@dataclass(frozen=True)
class FailedHunk:
    path: str
    hunk: int  # 1-based within its file
    header: str
    line: int  # of the hunk header in the patch file
    reason: str = "context does not match"


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
class Overlap:
    path: str
    earlier: str
    later: str
    first_line: int
    last_line: int
    kind: str  # "rewrites": changes lines the earlier patch wrote; "context": leans on them as context

    def to_json(self) -> dict:
        return vars(self).copy()


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


# --------------------------------------------------------------------------- hunk matching


@dataclass
class _FileState:
    mode: str
    lines: list[bytes]
    owners: list[str | None]


def _find(img: list[bytes], pre: list[bytes], start: int, at_begin: bool, at_end: bool,
          patched: list[bool]) -> int | None:
    """git apply's find_pos: try START, then START+1, START-1, START+2, ... within the file.

    Lines an earlier hunk of the same file wrote are never matched again, as in git.
    """
    n, total = len(pre), len(img)
    if at_begin:
        start = 0
    elif at_end:
        start = total - n
    start = max(0, min(start, total))

    def fits(pos: int) -> bool:
        if pos < 0 or pos + n > total:
            return False
        if at_begin and pos != 0:
            return False
        if at_end and pos + n != total:
            return False
        if n == 0:
            return True
        if any(patched[pos:pos + n]) or img[pos:pos + n - 1] != pre[:-1]:
            return False
        last, mine = pre[-1], img[pos + n - 1]
        if last == mine:
            return True
        # git compares the preimage's bytes as a prefix of the image's: a last line without LF
        # (from "\ No newline at end of file") matches the same line followed by whitespace,
        # unless the hunk is anchored at the end of the file.
        return (not at_end and not last.endswith(b"\n") and mine.startswith(last)
                and not mine[len(last):].strip(b" \t\n\r\x0b\x0c"))

    if fits(start):
        return start
    if at_begin or at_end:
        return None
    back, fwd = start, start
    while back > 0 or fwd < total:
        if fwd < total:
            fwd += 1
            if fits(fwd):
                return fwd
        if back > 0:
            back -= 1
            if fits(back):
                return back
    return None


def _trim(hunk: Hunk, fuzz: int) -> tuple[list[tuple[bytes, bytes]], bool, bool]:
    """The hunk's tagged lines with up to FUZZ context lines dropped at each end (GNU patch's fuzz)."""
    tagged = [(ln[:1], ln[1:]) for ln in hunk.lines]
    if not hunk.old_eof_newline or not hunk.new_eof_newline:
        tagged = _strip_eof_newline(tagged, hunk)
    lead, trail = hunk.leading(), hunk.trailing()
    drop_lead, drop_trail = min(fuzz, lead), min(fuzz, trail)
    if drop_lead or drop_trail:
        tagged = tagged[drop_lead:len(tagged) - drop_trail]
    at_begin = (hunk.old_start == 0 or hunk.old_start == 1) and drop_lead == 0
    at_end = trail == 0
    return tagged, at_begin, at_end


def _strip_eof_newline(tagged: list[tuple[bytes, bytes]], hunk: Hunk) -> list[tuple[bytes, bytes]]:
    """Represent "\\ No newline at end of file": the last line of a side loses its LF."""
    out = list(tagged)
    for side_tag, keep in ((b"-", hunk.old_eof_newline), (b"+", hunk.new_eof_newline)):
        if keep:
            continue
        for i in range(len(out) - 1, -1, -1):
            tag, text = out[i]
            if tag in (b" ", side_tag):
                out[i] = (tag, text[:-1] if text.endswith(b"\n") else text)
                break
    return out


def apply_hunks(state: _FileState, hunks: Sequence[Hunk], fuzz: int, owner: str, path: str,
                overlaps: list[Overlap] | None) -> tuple[_FileState | None, int, int, list[FailedHunk]]:
    """Returns the new state (None on failure), the largest offset, the fuzz used, failed hunks."""
    lines, owners = list(state.lines), list(state.owners)
    patched = [False] * len(lines)
    max_offset, used_fuzz, failed = 0, 0, []
    for number, hunk in enumerate(hunks, 1):
        placed = None
        for level in range(0, fuzz + 1):
            tagged, at_begin, at_end = _trim(hunk, level)
            if level and len(tagged) == len(hunk.lines):
                break  # nothing left to drop: more fuzz cannot help
            pre = [t for tag, t in tagged if tag != b"+"]
            start = hunk.new_start - 1 if hunk.new_start else 0
            # Dropped leading context moves where the hunk is expected by as many lines.
            expected = start + min(level, hunk.leading())
            pos = _find(lines, pre, expected, at_begin, at_end, patched)
            if pos is not None:
                placed = (pos, tagged, level, expected)
                break
        if placed is None:
            failed.append(FailedHunk(path, number, hunk.header, hunk.line))
            continue
        pos, tagged, level, expected = placed
        used_fuzz = max(used_fuzz, level)
        max_offset = max(max_offset, abs(pos - expected))
        new_lines: list[bytes] = []
        new_owners: list[str | None] = []
        cursor = pos
        for tag, text in tagged:
            if tag == b"+":
                new_lines.append(text)
                new_owners.append(owner)
                continue
            prior = owners[cursor]
            if prior is not None and prior != owner and overlaps is not None:
                kind = "rewrites" if tag == b"-" else "context"
                overlaps.append(Overlap(path, prior, owner, cursor + 1, cursor + 1, kind))
            if tag == b" ":
                new_lines.append(text)
                new_owners.append(prior)
            cursor += 1
        n_pre = cursor - pos
        lines[pos:pos + n_pre] = new_lines
        owners[pos:pos + n_pre] = new_owners
        patched[pos:pos + n_pre] = [True] * len(new_lines)
    if failed:
        return None, max_offset, used_fuzz, failed
    return _FileState(state.mode, lines, owners), max_offset, used_fuzz, []


def reverse_diff(diff: FileDiff) -> FileDiff:
    swap = {b"+": b"-", b"-": b"+"}
    hunks = tuple(
        Hunk(h.new_start, h.new_count, h.old_start, h.old_count,
             tuple(swap.get(ln[:1], ln[:1]) + ln[1:] for ln in h.lines), h.new_eof_newline, h.old_eof_newline, h.line)
        for h in diff.hunks
    )
    return replace(diff, old_path=diff.new_path, new_path=diff.old_path, hunks=hunks, old_mode=diff.new_mode,
                   new_mode=diff.old_mode, old_blob=diff.new_blob, new_blob=diff.old_blob)


# --------------------------------------------------------------------------- the replay


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


class Engine:
    """One replay of patches over one base commit in one repository."""

    def __init__(self, git_dir: Path, base: str, *, fuzz: int = 0, overlaps: bool = False,
                 paths: Iterable[str] = ()):
        self.git_dir = git_dir
        self.base = out(["rev-parse", f"{base}^{{commit}}"], git_dir=git_dir, error=ApplyError)
        self.head = self.base
        self.fuzz = fuzz
        self.cat = CatFile(git_dir)
        self.entries: dict[str, _Entry] = {}
        self.entries: dict[str, _Entry] = {}
        self.dirs: set[str] = set()
        self._list(paths)
        self.files: dict[str, _FileState] = {}
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

    def _state(self, path: str, writes: dict[str, _FileState | None]) -> _FileState | None:
        if path in writes:
            return writes[path]
        if path in self.files:
            return self.files[path]
        entry = self.entries.get(path)
        if entry is None:
            return None
        lines = split_lf(self._content(path, entry))
        state = _FileState(entry.mode, lines, [None] * len(lines))
        self.files[path] = state
        return state

    def _check_safe(self, patch: Patch, diff: FileDiff, path: str, writes: dict[str, _FileState | None]) -> None:
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

    def _check_tree(self, patch: Patch, writes: dict[str, _FileState | None]) -> None:
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
        writes: dict[str, _FileState | None] = {}
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
                old = _FileState(diff.new_mode or "100644", [], [])
            elif diff.rename and diff.new_path and self._state(diff.new_path, writes) is not None:
                failed.append(FailedHunk(diff.new_path, 0, "", diff.line, "rename target already exists"))
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

    def _record(self, patch: Patch, writes: dict[str, _FileState | None]) -> None:
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
    engine = Engine(git_dir, base, fuzz=fuzz, overlaps=overlaps, paths={p for patch in patches for p in patch.paths})
    try:
        results: list[PatchResult] = []
        for patch in patches:
            result = engine.step(patch, fuzz=max(fuzz, fuzz_for(patch)) if fuzz_for else None)
            results.append(result)
            if not result.ok and stop_at_failure:
                break
        if write:
            engine.flush()
        results = [replace(r, commit=engine.commits.get(id(r.patch))) for r in results]
        return Replay(engine.base, engine.head, tuple(results), tuple(_merge_overlaps(engine.overlaps or [])))
    finally:
        engine.close()


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


# --------------------------------------------------------------------------- stacks


@dataclass(frozen=True)
class Prepared:
    """A stack's inputs, loaded and verified before anything is written."""

    stack: ResolvedStack
    patches: dict[str, tuple[Patch, ...]]
    synced: dict[str, Synced]
    fuzz: dict[str, int]

    def digest(self, source: str) -> str:
        """Names the applied result of one source: its pin and the exact patches, in order."""
        parts = [ENGINE_VERSION, self.synced[source].commit]
        for p in self.patches[source]:
            parts.append(f"{p.label}\0{p.strip}\0{p.directory}\0{p.sha256}\0{self.fuzz.get(p.series, 0)}")
        return sha256("\n".join(parts).encode())


def prepare(settings: Settings, config: Config, name: str, *, progress: bool = False,
            tolerant: bool = False, sources: Collection[str] | None = None) -> Prepared:
    """TOLERANT (check): a patch that cannot be read becomes a `malformed` verdict in its place.
    SOURCES: only these sources are synced and their patches read (a partial build)."""
    stack = config.stack(name)
    if sources is not None:
        stack = stack.restricted(sources)
    patches = load_stack_patches(settings, config, stack, tolerant=tolerant)
    synced = {s.name: sync(settings, s, root=config.root, progress=progress) for s in stack.sources}
    return Prepared(stack, patches, synced, {s.name: s.fuzz for s in stack.series})


@dataclass(frozen=True)
class AppliedSource:
    source: Source
    git_dir: Path
    base: str
    commit: str
    patches: tuple[Patch, ...]
    replay: Replay


def _replay_source(prep: Prepared, source: str, base: str | None = None, *, allow_fuzz: int = 0,
                   stop_at_failure: bool = True, overlaps: bool = False, write: bool = True) -> Replay:
    synced = prep.synced[source]
    return replay(synced.git_dir, base or synced.commit, prep.patches[source], fuzz=allow_fuzz,
                  stop_at_failure=stop_at_failure, overlaps=overlaps,
                  fuzz_for=lambda p: prep.fuzz.get(p.series, 0), write=write)


def materialize(settings: Settings, config: Config, name: str, *, prep: Prepared | None = None,
                progress: bool = False) -> dict[str, AppliedSource]:
    """Every source of the stack with its patches applied as commits; no worktree, no ref moved.
    PREP, when the caller already loaded the stack's inputs, saves reading and syncing them again."""
    prep = prep or prepare(settings, config, name, progress=progress)
    out_: dict[str, AppliedSource] = {}
    for src in prep.stack.sources:
        result = _replay_source(prep, src.name)
        failure = result.first_failure
        if failure is not None:
            raise _failure_error(name, src.name, failure)
        synced = prep.synced[src.name]
        out_[src.name] = AppliedSource(src, synced.git_dir, synced.commit, result.head, prep.patches[src.name], result)
    return out_


def _failure_error(stack: str, source: str, failure: PatchResult) -> ApplyError | PatchError:
    where = str(failure.patch.path or failure.patch.url or failure.patch.label)
    if failure.error is not None:
        return failure.error
    if failure.outcome == FUZZ:
        return ApplyError(f"{failure.patch.label} applies to '{source}' only with reduced context ({failure.detail})",
                          where=where, hint=f"refresh the patch (stackbuild rebase {stack} then export), or allow it: "
                                            f"fuzz = N in [series.{failure.patch.series}] or --allow-fuzz")
    hunks = ", ".join(f"{f.path} hunk #{f.hunk} ({f.reason})" if f.hunk else f"{f.path} ({f.reason})"
                      for f in failure.failed[:6]) or failure.detail or "three-way merge left conflicts"
    return ApplyError(f"{failure.patch.label} does not apply to '{source}': {hunks}", where=where,
                      hint=f"fix the patch against the pin (the worktree holds the patches before it), or run "
                           f"'stackbuild rebase {stack} --source {source} --onto <ref>'")


# ---- check


@dataclass(frozen=True)
class SourceCheck:
    source: str
    base: str
    at: str | None
    replay: Replay

    def to_json(self) -> dict:
        return {"source": self.source, "base": self.base, "at": self.at,
                "ok": self.replay.ok, "patches": [r.to_json() for r in self.replay.results],
                "overlaps": [o.to_json() for o in self.replay.overlaps]}


@dataclass(frozen=True)
class StackCheck:
    stack: str
    sources: tuple[SourceCheck, ...]

    @property
    def ok(self) -> bool:
        return all(s.replay.ok for s in self.sources)

    def to_json(self) -> dict:
        return {"stack": self.stack, "ok": self.ok, "sources": [s.to_json() for s in self.sources]}


def parse_at(values: Sequence[str]) -> dict[str | None, str]:
    """`--at REF` applies to every git source; `--at SOURCE=REF` to one."""
    at: dict[str | None, str] = {}
    for value in values:
        source, sep, ref = value.partition("=")
        if sep and "/" not in source and ":" not in source:
            at[source] = ref
        else:
            at[None] = value
    return at


def check_stacks(settings: Settings, config: Config, names: Sequence[str], *, at: Sequence[str] = (),
                 allow_fuzz: int = 0, progress: bool = False) -> tuple[StackCheck, ...]:
    """Verdicts for every patch of every stack against the pins (or AT), without any checkout."""
    refs = parse_at(at)
    for key in refs:
        if key is not None and key not in config.sources:
            raise ApplyError(f"--at names unknown source '{key}'", where="--at",
                             hint=f"sources: {', '.join(config.sources)}")
    reports = []
    for name in names or sorted(config.stacks):
        prep = prepare(settings, config, name, progress=progress, tolerant=True)
        checks = []
        for src in prep.stack.sources:
            ref = refs.get(src.name) or (refs.get(None) if src.kind == "git" else None)
            synced = prep.synced[src.name]
            base = fetch_ref(settings, src, synced.git_dir, ref, progress=progress) if ref else synced.commit
            result = _replay_source(prep, src.name, base, allow_fuzz=allow_fuzz, stop_at_failure=False, overlaps=True,
                                    write=False)
            checks.append(SourceCheck(src.name, base, ref, result))
        reports.append(StackCheck(name, tuple(checks)))
    return tuple(reports)


# ---- apply into worktrees


STATE_FILE = "stackbuild-state.json"


def stack_dir(settings: Settings, stack: str) -> Path:
    return settings.work_dir / stack


def branch_of(stack: str) -> str:
    return f"stackbuild/{stack}"


def read_state(settings: Settings, stack: str) -> dict:
    path = stack_dir(settings, stack) / STATE_FILE
    reset = f"delete it (rm {path}); the next apply rebuilds it from the worktrees"
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        return {"stack": stack, "sources": {}}
    except (OSError, ValueError) as exc:
        raise ApplyError(f"unreadable state file: {exc}", where=str(path), hint=reset) from None
    if not _state_shape_ok(state):
        raise ApplyError("the state file is not one stackbuild wrote (wrong JSON shape)", where=str(path), hint=reset)
    return state


def _state_shape_ok(state: object) -> bool:
    """What `apply` and `status` read from each record; anything else would fail deep inside them."""
    if not isinstance(state, dict) or not isinstance(state.get("sources"), dict):
        return False
    return all(isinstance(rec, dict) and isinstance(rec.get("head"), str) and isinstance(rec.get("base"), str)
               and isinstance(rec.get("patches"), list)
               and all(isinstance(p, dict) and isinstance(p.get("patch"), str) and isinstance(p.get("sha256"), str)
                       for p in rec["patches"])
               for rec in state["sources"].values())


@dataclass(frozen=True)
class SourceApply:
    source: str
    worktree: Path
    base: str
    head: str
    replay: Replay | None  # None when the worktree was already up to date
    action: str  # "created", "updated", "unchanged"
    backup: "Backup" = field(default_factory=lambda: Backup())

    def to_json(self) -> dict:
        return {"source": self.source, "worktree": str(self.worktree), "base": self.base, "head": self.head,
                "action": self.action, "ok": self.replay.ok if self.replay else True, "backup": self.backup.to_json(),
                "patches": [r.to_json() for r in self.replay.results] if self.replay else []}


@dataclass(frozen=True)
class ApplyReport:
    stack: str
    sources: tuple[SourceApply, ...]
    error: ApplyError | PatchError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_json(self) -> dict:
        return {"stack": self.stack, "ok": self.ok, "sources": [s.to_json() for s in self.sources],
                "error": self.error.to_json() if self.error else None}


def _wt_git(wt: Path, args: Sequence[str], **kw) -> subprocess.CompletedProcess:
    return git(args, cwd=wt, error=ApplyError, where=str(wt), **kw)


def _inspect_worktree(wt: Path, branch: str, recorded: str | None, force: bool) -> str | None:
    """The worktree's current head, after making sure moving it loses nothing of the user's."""
    if not (wt / ".git").exists():
        if wt.exists() and any(wt.iterdir()):
            raise ApplyError("the worktree folder exists but is not a git worktree", where=str(wt),
                             hint="move it away; stackbuild will not overwrite files it did not create")
        return None
    head_ref = _wt_git(wt, ["symbolic-ref", "-q", "HEAD"], check=False).stdout.decode().strip()
    head = _wt_git(wt, ["rev-parse", "HEAD"]).stdout.decode().strip()
    if force:
        return head
    if head_ref != f"refs/heads/{branch}":
        raise ApplyError(f"the worktree is on '{head_ref or 'a detached HEAD'}', not {branch}", where=str(wt),
                         hint=f"git -C {wt} checkout {branch}, or re-run with --force to reset it (kept under a backup ref)")
    dirty = _wt_git(wt, ["status", "--porcelain", "--untracked-files=no"]).stdout.decode().strip()
    if dirty:
        raise ApplyError(f"the worktree has uncommitted changes ({len(dirty.splitlines())} files)", where=str(wt),
                         hint="commit and export them (stackbuild export), stash them, or re-run with --force "
                              "(they are kept under a backup ref)")
    if recorded and head != recorded:
        raise ApplyError("the worktree has commits that are not in the series", where=str(wt),
                         hint="export them first (stackbuild export), or re-run with --force (they are kept under a backup ref)")
    return head


# A move is journaled beside its worktree before anything of it changes, as git's sequencer and
# StGit's transaction log do: a process killed mid-move (or a disk that filled up) leaves the
# journal, and the next apply, holding the work directory's lock, finishes the move by itself.


@dataclass(frozen=True)
class Journal:
    path: Path
    start: str | None  # the head before the move; None: the worktree was being created
    to: str
    branch: str
    pid: int


def _journal_path(root: Path, source: str) -> Path:
    return root / f".{source}.move.json"


def _write_journal(root: Path, source: str, start: str | None, to: str, branch: str) -> Path:
    path = _journal_path(root, source)
    # No fsync: git does not sync the worktree files it writes either, so after a power cut no
    # journal could vouch for them; against a killed process the page cache is enough.
    atomic_write(path, json.dumps({"from": start, "to": to, "branch": branch, "pid": os.getpid()}).encode(),
                 durable=False)
    return path


def _read_journal(root: Path, source: str) -> Journal | None:
    path = _journal_path(root, source)
    try:
        data = json.loads(path.read_text())
        return Journal(path, data["from"], str(data["to"]), str(data["branch"]), int(data["pid"]))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ApplyError(f"unreadable move journal: {exc}", where=str(path),
                         hint="delete it and re-run with --force (the worktree's own changes are kept under a backup ref)") from None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie no one reaped yet writes nothing any more
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _settle(journal: Journal, wt: Path) -> None:
    """Make an interrupted move's worktree movable again. The lock we hold proves its writer is
    gone, and git children die with it (builder/git.py); a live PID is only checked to be sure."""
    if journal.pid != os.getpid() and _alive(journal.pid):
        raise LockError(f"stackbuild pid {journal.pid} was moving this worktree and is still running", where=str(journal.path),
                        hint="wait for it to end; if that process is not stackbuild, delete the journal and re-run")
    # Left by a git we ran and that was killed; nobody else writes a worktree we are moving.
    (wt / ".git" / "index.lock").unlink(missing_ok=True)
    if journal.start is None:
        # A first checkout that did not finish: the folder holds nothing but what we wrote.
        shutil.rmtree(wt, ignore_errors=True)


def _crash_point(moment: str) -> None:
    """Testing seam of tests/test_apply_crash.py: STACKBUILD_CRASH_AT=<moment> kills apply at that
    moment of a move, as a power cut or `kill -9` would, to prove the next run finishes it."""
    if os.environ.get("STACKBUILD_CRASH_AT") == moment:
        os.kill(os.getpid(), signal.SIGKILL)


def create_worktree(git_dir: Path, wt: Path, error: type[StackbuildError]) -> None:
    """A clone sharing the mirror's objects, so several work dirs can hold one stack; no checkout."""
    wt.parent.mkdir(parents=True, exist_ok=True)
    git(["clone", "-q", "--shared", "--no-checkout", "--", str(git_dir), str(wt)], error=error,
        hint="check disk space and permissions of the work directory")
    git(["config", "core.hooksPath", os.devnull], cwd=wt, error=error, where=str(wt))


@dataclass(frozen=True)
class Backup:
    """What a forced move replaced, kept: refs in the worktree's repository, files in a folder."""

    refs: tuple[str, ...] = ()
    folder: Path | None = None
    files: tuple[str, ...] = ()

    def to_json(self) -> dict:
        return {"refs": list(self.refs), "folder": str(self.folder) if self.folder else None, "files": list(self.files)}


def _stamp() -> str:
    return f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{os.getpid()}"


def _set_aside(root: Path, wt: Path, stamp: str, paths: Sequence[str]) -> Path | None:
    """Moves PATHS of the worktree into <work>/<stack>/.backup/<stamp>/<source>/, keeping their layout."""
    if not paths:
        return None
    folder = root / ".backup" / stamp / wt.name
    for p in paths:
        (folder / p).parent.mkdir(parents=True, exist_ok=True)
        os.replace(wt / p, folder / p)
    return folder


def _back_up(root: Path, wt: Path, branch: str, recorded: str | None, new: str, *, commits: bool) -> Backup:
    """Before a worktree is reset (`--force`, or finishing an interrupted move): with COMMITS, its
    own commits and uncommitted changes under refs/stackbuild/backup/<stamp>/; always, untracked
    files NEW's files would overwrite, set aside."""
    stamp = _stamp()
    refs = []
    if commits:
        keep = {recorded, new, None, ""}
        heads = {"head": _wt_git(wt, ["rev-parse", "-q", "--verify", "HEAD"], check=False).stdout.decode().strip(),
                 "branch": _wt_git(wt, ["rev-parse", "-q", "--verify", f"refs/heads/{branch}"], check=False).stdout.decode().strip(),
                 "uncommitted": _wt_git(wt, ["stash", "create"], check=False).stdout.decode().strip()}
        for what, sha in heads.items():
            if sha not in keep:
                ref = f"refs/stackbuild/backup/{stamp}/{what}"
                _wt_git(wt, ["update-ref", ref, sha])
                refs.append(ref)
                keep.add(sha)
    untracked = _paths(_wt_git(wt, ["ls-files", "-z", "--others"]))
    files: list[str] = []
    if untracked:
        tracked = _paths(_wt_git(wt, ["ls-tree", "-r", "-z", "--name-only", new]))
        names = set(tracked)
        dirs = {str(q) for p in tracked for q in Path(p).parents}
        files = [p for p in untracked if p in names or p in dirs or {str(q) for q in Path(p).parents} & names]
    return Backup(tuple(refs), _set_aside(root, wt, stamp, files), tuple(files))


def _paths(proc: subprocess.CompletedProcess) -> list[str]:
    """NUL-separated paths as git prints them; bytes that are not UTF-8 survive the round trip."""
    return [os.fsdecode(p) for p in proc.stdout.split(b"\0") if p]


def _leftovers(root: Path, wt: Path, journal: Journal, backup: Backup) -> Backup:
    """Files an interrupted `read-tree` may have written for a target the stack no longer wants:
    untracked now. Set aside rather than deleted: the user's own file may sit there."""
    assert journal.start is not None
    added = set(_paths(_wt_git(wt, ["diff-tree", "-r", "-z", "--name-only", "--diff-filter=A", journal.start, journal.to])))
    files = [p for p in _paths(_wt_git(wt, ["ls-files", "-z", "--others"])) if p in added]
    if not files:
        return backup
    folder = _set_aside(root, wt, backup.folder.parent.name if backup.folder else _stamp(), files)
    return Backup(backup.refs, folder, backup.files + tuple(files))


def move_worktree(git_dir: Path, wt: Path, branch: str, current: str | None, new: str, *,
                  force: bool = False, journal: Journal | None = None) -> str:
    """Moves WT from CURRENT (None: not there yet) to NEW on BRANCH. JOURNAL, when given, is the
    record of an interrupted move: the worktree is ours mid-way and is reset to NEW."""
    if current is None:
        try:
            create_worktree(git_dir, wt, ApplyError)
            _crash_point("cloned")
            _wt_git(wt, ["-c", "checkout.workers=0", "checkout", "-q", "-B", branch, new])
        except ApplyError:
            shutil.rmtree(wt, ignore_errors=True)  # a failure we saw (a kill leaves the journal)
            raise
        action = "created"
    elif force or journal is not None:
        _wt_git(wt, ["-c", "checkout.workers=0", "checkout", "-q", "-f", "-B", branch, new],
                hint="free disk space (or fix what git names), then re-run: the move is journaled and finishes by itself")
        action = "updated"
    else:
        # Parallel checkout: writing the changed files is most of an apply's wall time.
        proc = _wt_git(wt, ["-c", "checkout.workers=0", "read-tree", "-m", "-u", current, new], check=False)
        if proc.returncode != 0:
            err = proc.stderr.decode(errors="replace")
            if "would be overwritten" in err or "would be removed" in err:
                # read-tree checks every path before writing one: nothing moved.
                raise _MoveRefused(f"git read-tree refused: {err.strip().splitlines()[0]}", where=str(wt),
                                   hint="an untracked file in the worktree is in the way; move it and re-run")
            cause = hint_for(proc.stderr, wt) or "fix what git names"
            raise ApplyError(f"git read-tree failed: {err.strip().splitlines()[-1] if err.strip() else proc.returncode}",
                             where=str(wt), hint=f"{cause}; the move is journaled: a re-run finishes it by itself")
        _crash_point("read-tree")
        _wt_git(wt, ["update-ref", f"refs/heads/{branch}", new, current])
        action = "updated"
    _crash_point("moved")
    keep_alive(git_dir, wt, new)
    return action


class _MoveRefused(ApplyError):
    """A move git refused before writing anything: there is nothing to finish."""


# The worktree borrows the mirror's objects: a ref there keeps `git gc` from pruning them. One
# ref per worktree, named by a hash of its absolute path, so two work dirs of one stack never
# share (or overwrite) one; the map beside them names the paths, to drop refs of deleted ones.
APPLIED_MAP = "stackbuild-worktrees.json"


def applied_ref(wt: Path) -> str:
    return f"refs/stackbuild/applied/{sha256(str(wt.absolute()).encode())[:32]}"


def keep_alive(git_dir: Path, wt: Path, head: str) -> None:
    git(["update-ref", applied_ref(wt), head], git_dir=git_dir, check=False)
    path = git_dir / APPLIED_MAP
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if not isinstance(known, dict):
        known = {}
    gone = [ref for ref, where in known.items() if not (Path(str(where)) / ".git").exists()]
    for ref in gone:
        git(["update-ref", "-d", ref], git_dir=git_dir, check=False)
        del known[ref]
    if gone or known.get(applied_ref(wt)) != str(wt.absolute()):
        known[applied_ref(wt)] = str(wt.absolute())
        atomic_write(path, json.dumps(known, indent=1, sort_keys=True).encode(), durable=False)  # a lost entry only keeps a ref


def journaled_move(root: Path, source: str, git_dir: Path, wt: Path, branch: str, current: str | None, new: str, *,
                   force: bool = False, journal: Journal | None = None, recorded: str | None = None,
                   record: Callable[[], None]) -> tuple[str, Backup]:
    """One worktree move of apply, journaled in ROOT: the journal is written before the worktree
    changes and removed once RECORD has noted the new head, so a kill anywhere in between leaves
    the journal for the next run to finish from. JOURNAL: the one an interrupted move left."""
    backup = Backup()
    if current is not None and (force or journal is not None):
        backup = _back_up(root, wt, branch, recorded, new, commits=journal is None)
    path = _write_journal(root, source, current, new, branch)
    _crash_point("journaled")
    try:
        action = move_worktree(git_dir, wt, branch, current, new, force=force, journal=journal)
    except _MoveRefused:
        path.unlink()
        raise
    except ApplyError:
        if current is None:  # the half-made worktree is gone already
            path.unlink()
        raise
    if journal is not None and journal.start is not None and journal.to != new:
        backup = _leftovers(root, wt, journal, backup)
    record()
    _crash_point("recorded")
    path.unlink()
    return action, backup


def _refuse_during_rebase(root: Path, stack: str, source: str) -> None:
    from .rebase import sources_in_progress, state_dir_for  # rebase builds on this module
    state_dir = state_dir_for(root.parent, stack)
    if source in sources_in_progress(state_dir):
        raise ApplyError(f"a rebase of '{source}' is in progress in this work directory", where=str(state_dir / f"{source}.json"),
                         hint=f"finish it (`stackbuild rebase --continue`) or undo it (`stackbuild rebase --abort`) "
                              f"before applying '{stack}'")


def apply_stack(settings: Settings, config: Config, name: str, *, allow_fuzz: int = 0, force: bool = False,
                progress: bool = False) -> ApplyReport:
    """Worktrees at work/<stack>/<source> on branch stackbuild/<stack>, one commit per patch.

    Everything is computed first (patches read and verified, sources synced, commits written as
    objects); the worktrees and branches move last, with Ctrl-C held and each move journaled, so
    a failure or an interrupt leaves every worktree as it was or finishable by a plain re-run. A
    patch that does not apply stops its source at the last good commit.
    """
    root = stack_dir(settings, name)
    with locked(root / ".lock", f"the work directory of stack '{name}'"):
        prep = prepare(settings, config, name, progress=progress)
        state = read_state(settings, name)
        branch = branch_of(name)
        plans = []
        for src in prep.stack.sources:
            wt = root / src.name
            _refuse_during_rebase(root, name, src.name)
            journal = _read_journal(root, src.name)
            if journal is not None:
                _settle(journal, wt)
            recorded = state["sources"].get(src.name, {})
            current = _inspect_worktree(wt, branch, recorded.get("head"), force or journal is not None)
            digest = prep.digest(src.name)
            if (current is not None and current == recorded.get("head") and recorded.get("digest") == digest
                    and not force and journal is None):
                plans.append((src, wt, current, None, digest, None, recorded.get("head")))
                continue
            result = _replay_source(prep, src.name, allow_fuzz=allow_fuzz)
            plans.append((src, wt, current, result, digest, journal, recorded.get("head")))
        reports = []
        error = None
        with deferred_interrupts():
            for src, wt, current, result, digest, journal, recorded in plans:
                synced = prep.synced[src.name]
                head = current if result is None else result.head
                complete = result is None or result.ok
                state["sources"][src.name] = {
                    "git_dir": str(synced.git_dir), "base": synced.commit, "head": head,
                    "digest": digest if complete else None,
                    "patches": [{"patch": p.label, "sha256": p.sha256} for p in prep.patches[src.name]],
                }

                def record() -> None:
                    # Recorded as each worktree moves: if a later one fails, the next apply still
                    # recognises this one as its own and does not ask for --force.
                    atomic_write(root / STATE_FILE, json.dumps(state, indent=2).encode())

                if result is None:
                    action, backup = "unchanged", Backup()
                    record()
                else:
                    action, backup = journaled_move(root, src.name, synced.git_dir, wt, branch, current, head, force=force,
                                                    journal=journal, recorded=recorded, record=record)
                reports.append(SourceApply(src.name, wt, synced.commit, str(head), result, action, backup))
                if result is not None and error is None and result.first_failure is not None:
                    error = _failure_error(name, src.name, result.first_failure)
        return ApplyReport(name, tuple(reports), error)


def record_worktree(root: Path, source: str, *, git_dir: Path, base: str, head: str) -> None:
    """Note a worktree's new head made outside `apply` (a finished rebase) in the stack's work
    folder ROOT, so the next apply moves it without --force. No digest: that apply replays the
    exported files."""
    path = root / STATE_FILE
    state = json.loads(path.read_text()) if path.is_file() else {"stack": root.name, "sources": {}}
    state["sources"][source] = {"git_dir": str(git_dir), "base": base, "head": head, "digest": None, "patches": []}
    atomic_write(path, json.dumps(state, indent=2).encode())


# ---- status


def status(settings: Settings, config: Config, names: Sequence[str]) -> list[dict]:
    """What is applied where, and what is stale: patch files changed since the worktree was made."""
    rows = []
    for name in names or sorted(config.stacks):
        stack = config.stack(name)
        state = read_state(settings, name)
        current = {src: {d.label: d.sha256 for d in digests}
                   for src, digests in stack_patch_digests(config, stack).items()}
        for src in stack.sources:
            wt = stack_dir(settings, name) / src.name
            rec = state["sources"].get(src.name)
            row = {"stack": name, "source": src.name, "worktree": str(wt), "applied": bool(rec and (wt / ".git").exists())}
            if row["applied"]:
                recorded = {p["patch"]: p["sha256"] for p in rec["patches"]}
                now = current.get(src.name, {})
                changed = sorted(k for k in now if recorded.get(k) not in (None, now[k]))
                added = sorted(k for k in now if k not in recorded)
                removed = sorted(k for k in recorded if k not in now)
                head = _wt_git(wt, ["rev-parse", "HEAD"]).stdout.decode().strip()
                dirty = bool(_wt_git(wt, ["status", "--porcelain", "--untracked-files=no"]).stdout.strip())
                row.update({
                    "head": head, "pin": src.pin, "base": rec["base"], "complete": rec.get("digest") is not None,
                    "stale": bool(changed or added or removed) or rec["base"] != (src.commit or rec["base"]),
                    "changed": changed, "added": added, "removed": removed,
                    "moved": head != rec["head"], "dirty": dirty,
                })
            rows.append(row)
    return rows
