"""The patch engine against `git apply --cached`, on adversarial patches: the parity gate.

Seeds are real `git format-patch` mails and `git diff`s of random changes to a small repository
(edits, new and deleted files, renames, copies, mode flips, symlinks, binary files, files
without a final newline, CRLF files) plus hand-made diffs git never writes (traditional
`---`/`+++` diffs, `.git` path variants, deletions of missing files, writes through symlinks).
Each case mutates a seed a few times (lines dropped, duplicated or corrupted, hunk counts ±1,
newlines and `\\ No newline` markers moved, CRLF, names swapped, mode/rename/copy lines added,
binary literals corrupted) and applies it to the seed's base or to a drifted variant of it,
once through stackbuild's `replay` (what `check` and `apply` run) and once through
`git apply --cached` on a temporary index. The invariant:

  * stackbuild accepts  =>  git accepts (plainly, or with --3way where stackbuild merged)
                            and the trees are byte-identical;
  * stackbuild says already-applied  =>  git applies the patch in reverse;
  * stackbuild refuses while git accepts  =>  only for a case in ALLOWED below;
  * stackbuild refuses with a one-line error (PatchError) or a verdict, never with an
    ApplyError after `check` would have said clean, never with a traceback.

Usage:  python bench/fuzz_apply.py [--cases 3000] [--seed 1] [--json]
Exit 1 when any case disagrees; each disagreement class is printed once, minimized.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from builder.replay import ALREADY, THREEWAY, replay  # noqa: E402
from builder.errors import PatchError, StackbuildError  # noqa: E402
from builder.patches import parse_patch  # noqa: E402


@dataclass(frozen=True)
class Allowance:
    """A case where stackbuild refuses what git accepts, on purpose (docs/patches.md lists it)."""

    name: str
    reason: str
    matches: Callable[[bytes, str, str], bool]  # (patch, stackbuild's refusal, git's stderr) -> this case


def _ignored_header_name(patch: bytes, ours: str) -> bool:
    """Our refusal names an invalid path of a 'diff --git' line whose names git does not use:
    the line names two different files, ---/+++ lines name the file, or a skipped 'diff --git'
    line right before it left its names behind."""
    m = re.match(r"[^:]*:(\d+): invalid path '([^']*)'", ours)
    if not m:
        return False
    lines = patch.splitlines()
    k = int(m.group(1)) - 1
    line = lines[k] if k < len(lines) else b""
    name = m.group(2).encode("utf-8", "surrogateescape")
    if not line.startswith(b"diff --git ") or name not in line:
        return False
    return (line.count(name) == 1 or (b"\n--- " in patch and b"\n+++ " in patch)
            or (k > 0 and lines[k - 1].startswith(b"diff --git ")))


HFS_IGNORABLE = ("\u200c", "\u200d", "\u200e", "\u200f", "\u202a", "\u202b", "\u202c", "\u202d", "\u202e",
                 "\u206a", "\u206b", "\u206c", "\u206d", "\u206e", "\u206f", "\ufeff")

# The one place stackbuild is allowed to be stricter than git.
ALLOWED: tuple[Allowance, ...] = (
    Allowance("crlf-headers",
              "a patch whose diff headers end in CRLF was converted to DOS line endings; git strips the CR from "
              "headers but keeps it in hunk lines, so what it applies depends on the target's endings",
              lambda patch, ours, git: "CRLF line endings in its diff headers" in ours),
    Allowance("hfs-dotgit",
              "a '.git' spelled with characters HFS+ ignores names the repository's own folder on a Mac; git "
              "refuses it only with core.protectHFS, which is off on Linux",
              lambda patch, ours, git: "invalid path" in ours
              and any(c in patch.decode("utf-8", "replace") for c in HFS_IGNORABLE)),
    Allowance("invalid-fallback-name",
              "a 'diff --git' name git's verify_path refuses is refused even where git takes the file's name "
              "from elsewhere (the ---/+++ lines, or the names a skipped 'diff --git' line left behind): the "
              "header contradicts itself, and a name that invalid is never a typo",
              lambda patch, ours, git: _ignored_header_name(patch, ours)),
    Allowance("corrupt-binary-exit-0",
              "git prints 'corrupt binary patch' for a damaged binary section yet exits 0 and drops that "
              "file's change; a patch that silently loses a file is malformed",
              lambda patch, ours, git: "binary patch" in ours
              and ("corrupt binary patch" in git or "unrecognized binary patch" in git)),
)

ENV = {
    "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_AUTHOR_NAME": "Fuzz", "GIT_AUTHOR_EMAIL": "fuzz@example.invalid",
    "GIT_COMMITTER_NAME": "Fuzz", "GIT_COMMITTER_EMAIL": "fuzz@example.invalid",
    "GIT_AUTHOR_DATE": "1700000000 +0000", "GIT_COMMITTER_DATE": "1700000000 +0000",
}


def _git(repo: Path, *args: str, input: bytes | None = None, env: dict | None = None,
         check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["git", *args], cwd=repo, input=input, capture_output=True,
                          env={**os.environ, **ENV, **(env or {})})
    if check and proc.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)}: {proc.stderr.decode(errors='replace')}")
    return proc


# --------------------------------------------------------------------------- the repository

LINES10 = b"".join(b"line %d\n" % i for i in range(1, 11))
ALPHA = [b"a\n", b"b\n", b"c\n", b"{\n", b"}\n", b"x = 1\n", b"\n"]

BASE_FILES: dict[str, tuple[str, bytes]] = {
    "a.txt": ("100644", LINES10),
    "b.txt": ("100644", b"alpha\nbeta\ngamma\n"),
    "sub/c.txt": ("100644", b"".join(ALPHA[i % 7] for i in range(20))),
    "run.sh": ("100755", b"#!/bin/sh\necho hi\nexit 0\n"),
    "noeol.txt": ("100644", b"one\ntwo\nthree"),
    "crlf.txt": ("100644", b"one\r\ntwo\r\nthree\r\nfour\r\n"),
    "link": ("120000", b"a.txt"),
    "bin.dat": ("100644", bytes(range(256)) * 2),
    "d/f.txt": ("100644", b"f1\nf2\nf3\n"),
}


def _write_tree(work: Path, files: dict[str, tuple[str, bytes]]) -> None:
    for child in work.iterdir():
        if child.name != ".git":
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    for name, (mode, data) in files.items():
        path = work / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if mode == "120000":
            os.symlink(data.decode(), path)
        else:
            path.write_bytes(data)
            path.chmod(0o755 if mode == "100755" else 0o644)


def _commit(work: Path, files: dict[str, tuple[str, bytes]], message: str, parent: str | None) -> str:
    if parent:
        _git(work, "reset", "-q", "--hard", parent)
    _write_tree(work, files)
    _git(work, "add", "-A")
    _git(work, "commit", "-q", "--allow-empty", "--no-verify", "-m", message)
    return _git(work, "rev-parse", "HEAD").stdout.decode().strip()


def _edit_lines(rng: random.Random, data: bytes) -> bytes:
    lines = data.splitlines(keepends=True)
    for _ in range(rng.randint(1, 3)):
        pos = rng.randint(0, len(lines))
        op = rng.choice(["insert", "delete", "replace"])
        if op == "insert" or not lines or pos == len(lines):
            lines[pos:pos] = [rng.choice(ALPHA + [b"new %d\n" % rng.randint(0, 99)]) for _ in range(rng.randint(1, 3))]
        elif op == "delete":
            del lines[pos]
        else:
            lines[pos] = b"changed %d\n" % rng.randint(0, 99)
    out = b"".join(lines)
    if rng.random() < 0.15:
        out = out.rstrip(b"\n") if out.endswith(b"\n") else out + b"\n"
    return out


def _change(rng: random.Random, files: dict[str, tuple[str, bytes]]) -> dict[str, tuple[str, bytes]]:
    new = dict(files)
    for _ in range(rng.randint(1, 3)):
        op = rng.choice(["edit", "edit", "edit", "add", "delete", "rename", "copy", "chmod", "binary", "symlink",
                         "crlf", "noeol"])
        texts = [n for n, (m, _) in new.items() if m != "120000" and n != "bin.dat"]
        if op == "edit" and texts:
            name = rng.choice(texts)
            new[name] = (new[name][0], _edit_lines(rng, new[name][1]))
        elif op == "add":
            new[rng.choice(["new.txt", "sub/new.txt", "e/g/h.txt"])] = ("100644", _edit_lines(rng, b"n1\nn2\n"))
        elif op == "delete" and texts:
            del new[rng.choice(texts)]
        elif op in ("rename", "copy") and texts:
            name = rng.choice(texts)
            mode, data = new[name]
            if op == "rename":
                del new[name]
            new[rng.choice(["moved.txt", "sub/moved.txt", "z/" + name])] = (
                mode, _edit_lines(rng, data) if rng.random() < 0.5 else data)
        elif op == "chmod" and texts:
            name = rng.choice(texts)
            mode, data = new[name]
            new[name] = ("100644" if mode == "100755" else "100755", data)
        elif op == "binary":
            data = bytearray(new.get("bin.dat", ("100644", bytes(64)))[1])
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            new["bin.dat"] = ("100644", bytes(data))
        elif op == "symlink":
            new[rng.choice(["link", "link2", "sub/l"])] = ("120000", rng.choice([b"a.txt", b"b.txt", b"../run.sh"]))
        elif op == "crlf" and "crlf.txt" in new:
            new["crlf.txt"] = ("100644", new["crlf.txt"][1].replace(b"two\r\n", b"TWO\r\n2\r\n"))
        elif op == "noeol" and "noeol.txt" in new:
            new["noeol.txt"] = ("100644", _edit_lines(rng, new["noeol.txt"][1]))
    return new


def _drift(rng: random.Random, files: dict[str, tuple[str, bytes]]) -> dict[str, tuple[str, bytes]]:
    """A neighbouring upstream: lines inserted (offsets), some changed (conflicts), a file gone."""
    new = dict(files)
    for name in rng.sample(sorted(n for n, (m, _) in files.items() if m != "120000" and n != "bin.dat"), 3):
        mode, data = new[name]
        lines = data.splitlines(keepends=True)
        if rng.random() < 0.6:
            lines[0:0] = [b"top %d\n" % i for i in range(rng.randint(1, 4))]
        else:
            pos = rng.randrange(max(1, len(lines)))
            lines[pos:pos + 1] = [b"drifted\n"]
        new[name] = (mode, b"".join(lines))
    if rng.random() < 0.5:
        new.pop(rng.choice(["b.txt", "d/f.txt", "noeol.txt"]), None)
    if rng.random() < 0.3:
        new.pop("d/f.txt", None)
        new["d"] = ("120000", b"sub")
    return new


# --------------------------------------------------------------------------- seeds and mutations

PATH_POOL = ["a.txt", "b.txt", "sub/c.txt", "missing.txt", "a.txt.new", "a.txt.orig", ".git/config", ".GIT/config",
             "GIT~1/x", ".git /x", ".git./x", ".gitmodules", "sub/.git/x", "/tmp/x", "../x", "a/../x", "d", "d/f.txt",
             "link/x", "sp ace.txt", "\"q\\tuote\"", "dir/", ".Git/HEAD", "git~1/config", ".git\u200c/x"]
MODE_POOL = ["100644", "100755", "120000", "100777", "100664", "160000", "040000", "abc", "", "0100644", "10064"]


def _seed_patches(rng: random.Random, work: Path, base: str, files: dict[str, tuple[str, bytes]], count: int) -> list[bytes]:
    seeds = []
    for i in range(count):
        new = _change(rng, files)
        commit = _commit(work, new, f"change {i}\n\nbody line", base)
        kind = rng.random()
        if kind < 0.6:
            seeds.append(_git(work, "format-patch", "--stdout", "--binary", "-M", "-C" if i % 3 == 0 else "-M",
                              f"{base}..{commit}").stdout)
        elif kind < 0.8:
            seeds.append(_git(work, "diff", "--binary", "-M", f"-U{rng.randint(0, 3)}", base, commit).stdout)
        else:
            seeds.append(_git(work, "diff", "--no-renames", base, commit).stdout)
    return [s for s in seeds if s.strip()]


def _handmade(rng: random.Random) -> bytes:
    p = rng.choice(PATH_POOL)
    q = rng.choice(PATH_POOL)
    kind = rng.randrange(9)
    if kind == 0:  # creation
        return (b"diff --git a/%s b/%s\nnew file mode %s\n--- /dev/null\n+++ b/%s\n@@ -0,0 +1,2 @@\n+x\n+y\n"
                % (p.encode(), p.encode(), rng.choice(MODE_POOL).encode(), p.encode()))
    if kind == 1:  # deletion, of an existing or a missing file
        body = rng.choice([LINES10, b"alpha\nbeta\ngamma\n", b"gone\n"])
        n = body.count(b"\n")
        return (b"diff --git a/%s b/%s\ndeleted file mode 100644\n--- a/%s\n+++ /dev/null\n@@ -1,%d +0,0 @@\n%s"
                % (p.encode(), p.encode(), p.encode(), n, b"".join(b"-" + ln for ln in body.splitlines(True))))
    if kind == 2:  # traditional diff with possibly different names
        return (b"--- a/%s\n+++ b/%s\n@@ -1,3 +1,3 @@\n line 1\n-line 2\n+LINE 2\n line 3\n"
                % (rng.choice([b"a.txt", p.encode()]), rng.choice([b"a.txt", q.encode(), b"a.txt.new"])))
    if kind == 3:  # rename / copy without content
        verb = rng.choice([b"rename", b"copy"])
        return (b"diff --git a/%s b/%s\nsimilarity index 100%%\n%s from %s\n%s to %s\n"
                % (p.encode(), q.encode(), verb, rng.choice([b"a.txt", p.encode()]), verb, q.encode()))
    if kind == 4:  # mode change only
        return b"diff --git a/%s b/%s\nold mode %s\nnew mode %s\n" % (
            p.encode(), p.encode(), rng.choice(MODE_POOL).encode(), rng.choice(MODE_POOL).encode())
    if kind == 5:  # a file, then a symlink over its folder, in one patch
        return (b"diff --git a/d/g.txt b/d/g.txt\nnew file mode 100644\n--- /dev/null\n+++ b/d/g.txt\n@@ -0,0 +1 @@\n+g\n"
                b"diff --git a/d/f.txt b/d/f.txt\ndeleted file mode 100644\n--- a/d/f.txt\n+++ /dev/null\n"
                b"@@ -1,3 +0,0 @@\n-f1\n-f2\n-f3\n"
                b"diff --git a/d b/d\nnew file mode 120000\n--- /dev/null\n+++ b/d\n@@ -0,0 +1 @@\n+sub\n"
                b"\\ No newline at end of file\n")
    if kind == 6:  # write through the symlink 'link'
        return (b"diff --git a/link/x b/link/x\nnew file mode 100644\n--- /dev/null\n+++ b/link/x\n@@ -0,0 +1 @@\n+x\n")
    if kind == 7:  # a symlink created or retargeted
        return (b"diff --git a/%s b/%s\nnew file mode 120000\n--- /dev/null\n+++ b/%s\n@@ -0,0 +1 @@\n+%s\n"
                b"\\ No newline at end of file\n" % (p.encode(), p.encode(), p.encode(), q.encode()))
    # a plain edit of a.txt with its names taken from the pool
    return (b"diff --git a/%s b/%s\nindex 0000000..1111111 100644\n--- a/%s\n+++ b/%s\n"
            b"@@ -1,3 +1,3 @@\n line 1\n-line 2\n+LINE 2\n line 3\n"
            % (rng.choice([b"a.txt", p.encode()]), rng.choice([b"a.txt", q.encode()]),
               rng.choice([b"a.txt", p.encode()]), rng.choice([b"a.txt", q.encode()])))


HEADER_PREFIXES = (b"diff --git ", b"index ", b"--- ", b"+++ ", b"@@", b"old mode", b"new mode", b"new file mode",
                   b"deleted file mode", b"rename ", b"copy ", b"similarity", b"GIT binary", b"literal ", b"delta ")


def _mutate(rng: random.Random, patch: bytes) -> tuple[bytes, str]:
    lines = patch.splitlines(keepends=True)
    if not lines:
        return patch, "none"
    i = rng.randrange(len(lines))
    headers = [k for k, ln in enumerate(lines) if ln.startswith(HEADER_PREFIXES)]
    hunks = [k for k, ln in enumerate(lines) if ln.startswith(b"@@ ")]
    body = [k for k, ln in enumerate(lines) if ln[:1] in (b" ", b"+", b"-") and not ln.startswith((b"--- ", b"+++ "))]
    binary = [k for k, ln in enumerate(lines) if re.match(rb"^[A-Za-z][0-9A-Za-z!#$%&()*+;<=>?@^_`{|}~-]+\n$", ln)]
    op = rng.choice(["drop", "dup", "header", "header", "count", "count", "hunkform", "eof", "blank", "crlf",
                     "crlf-all", "noeol", "names", "names", "mode", "rename", "binary", "tag", "body-eol", "swap"])
    if op == "drop":
        del lines[rng.choice(headers or [i])]
    elif op == "dup":
        lines.insert(i, lines[i])
    elif op == "header" and headers:
        k = rng.choice(headers)
        ln = lines[k]
        how = rng.randrange(4)
        if how == 0:
            lines[k] = ln[:rng.randint(0, max(0, len(ln) - 2))] + b"\n"
        elif how == 1:
            j = rng.randrange(max(1, len(ln) - 1))
            lines[k] = ln[:j] + bytes([rng.choice(b" /.-+@0aZ\t\\\"")]) + ln[j + 1:]
        elif how == 2:
            lines[k] = ln.replace(b" ", b"", 1)
        else:
            lines[k] = ln.rstrip(b"\n") + rng.choice([b" ", b"\t", b"x", b" 100644"]) + b"\n"
    elif op == "count" and hunks:
        k = rng.choice(hunks)
        nums = list(re.finditer(rb"\d+", lines[k]))
        if nums:
            m = rng.choice(nums[:4])
            value = max(0, int(m.group()) + rng.choice([-1, 1]))
            lines[k] = lines[k][:m.start()] + str(value).encode() + lines[k][m.end():]
    elif op == "hunkform" and hunks:
        k = rng.choice(hunks)
        lines[k] = rng.choice([b"@@\n", lines[k].replace(b"@@ ", b"@@", 1), b"@@ -1 +1 @@\n", b"@@ -0,0 +0,0 @@\n",
                               re.sub(rb",\d+", b"", lines[k]), lines[k].replace(b" @@", b"", 1)])
    elif op == "eof":
        patch = b"".join(lines)
        return (patch.rstrip(b"\n") if rng.random() < 0.7 else patch + b"\n"), op
    elif op == "blank":
        lines.insert(i, rng.choice([b"\n", b" \n", b"\r\n"]))
    elif op == "crlf":
        lines[i] = lines[i].rstrip(b"\n") + b"\r\n"
    elif op == "crlf-all":
        lines = [ln.rstrip(b"\n") + b"\r\n" if ln.endswith(b"\n") and not ln.endswith(b"\r\n") else ln for ln in lines]
    elif op == "noeol":
        lines.insert(rng.choice(body or [i]) + rng.randint(0, 1), b"\\ No newline at end of file\n")
    elif op == "names" and headers:
        k = rng.choice([h for h in headers if lines[h].startswith((b"diff --git", b"--- ", b"+++ ", b"rename", b"copy"))]
                       or headers)
        new = rng.choice(PATH_POOL).encode()
        ln = lines[k]
        if ln.startswith(b"diff --git "):
            parts = ln[11:].rstrip(b"\n").split(b" ")
            side = rng.randrange(2)
            lines[k] = b"diff --git " + (b"a/" + new + b" " + parts[-1] if side == 0 else parts[0] + b" b/" + new) + b"\n"
        elif ln.startswith((b"--- ", b"+++ ")):
            lines[k] = ln[:4] + rng.choice([b"a/", b"b/", b"", b"/"]) + (b"/dev/null" if rng.random() < 0.2 else new) + b"\n"
        else:
            lines[k] = ln.rsplit(b" ", 1)[0] + b" " + new + b"\n"
    elif op == "mode":
        starts = [k for k, ln in enumerate(lines) if ln.startswith(b"diff --git ")] or [0]
        k = rng.choice(starts) + 1
        verb = rng.choice([b"old mode ", b"new mode ", b"new file mode ", b"deleted file mode "])
        lines.insert(min(k, len(lines)), verb + rng.choice(MODE_POOL).encode() + b"\n")
    elif op == "rename":
        starts = [k for k, ln in enumerate(lines) if ln.startswith(b"diff --git ")] or [0]
        k = rng.choice(starts) + 1
        verb = rng.choice([b"rename", b"copy"])
        lines[k:k] = [verb + b" from " + rng.choice(PATH_POOL).encode() + b"\n",
                      verb + b" to " + rng.choice(PATH_POOL).encode() + b"\n"][:rng.randint(1, 2)]
    elif op == "binary" and binary:
        k = rng.choice(binary)
        how = rng.randrange(3)
        if how == 0:
            ln = bytearray(lines[k])
            ln[rng.randrange(len(ln) - 1)] = rng.choice(b"0aZ~!\"")
            lines[k] = bytes(ln)
        elif how == 1:
            del lines[k:]
        else:
            lines[k] = lines[k][:1] + lines[k][len(lines[k]) // 2:]
    elif op == "tag" and body:
        k = rng.choice(body)
        lines[k] = rng.choice([b" ", b"+", b"-", b"", b"\t", b"#"]) + lines[k][1:]
    elif op == "body-eol" and body:
        k = rng.choice(body)
        lines[k] = lines[k].rstrip(b"\n")
    elif op == "swap" and len(lines) > 1:
        j = rng.randrange(len(lines) - 1)
        lines[j], lines[j + 1] = lines[j + 1], lines[j]
    else:
        return patch, "none"
    return b"".join(lines), op


# --------------------------------------------------------------------------- the oracle


@dataclass(frozen=True)
class Verdict:
    accepted: bool
    tree: str | None = None
    detail: str = ""


@dataclass(frozen=True)
class Disagreement:
    kind: str  # accept-refuse | tree-differs | already-refused | refuse-accept | late | crash | worktree
    patch: bytes
    target: str
    ours: str
    git: str

    def key(self) -> tuple[str, str]:
        if self.kind == "tree-differs":  # our outcome and how the trees differ (M/A/D/T per path)
            said = self.ours.split()[0] + " " + " ".join(w for w in self.git.split("ours differs:")[-1].split()
                                                          if len(w) == 1)
        elif self.kind == "refuse-accept":  # git said nothing: our reason tells the classes apart
            said = self.ours.split(" (hint:")[0].split(": ", 1)[-1]
        else:
            said = (self.git.splitlines() or [""])[-1]
        return self.kind, re.sub(r"'[^']*'|\b[0-9a-f]{7,40}\b|\d+", "_", said)[:80]


class Oracle:
    """One repository holding every base and target, with a ready index per target."""

    def __init__(self, root: Path):
        self.root = root
        self.git_dir = root / "repo" / ".git"
        self.indexes: dict[str, Path] = {}
        self.n = 0

    def _index(self, target: str) -> Path:
        if target not in self.indexes:
            path = self.root / f"index-{target[:12]}"
            _git(self.git_dir.parent, "read-tree", target, env={"GIT_INDEX_FILE": str(path)})
            self.indexes[target] = path
        self.n += 1
        # A fresh name each time: a git that dies on a patch leaves its index.lock behind.
        work = self.root / f"work-index-{self.n}"
        shutil.copyfile(self.indexes[target], work)
        return work

    def git(self, patch: bytes, target: str, *args: str) -> Verdict:
        index = self._index(target)
        env = {"GIT_INDEX_FILE": str(index)}
        # From an empty folder: `apply --3way` writes conflicted files into the work tree it assumes.
        scratch = self.root / "git-cwd"
        scratch.mkdir(exist_ok=True)
        proc = _git(scratch, f"--git-dir={self.git_dir}", "apply", "--cached", "-p1", "--whitespace=nowarn", *args,
                    "-", input=patch, env=env, check=False)
        shutil.rmtree(scratch)
        detail = proc.stderr.decode(errors="replace").strip() or f"exit {proc.returncode}"
        try:
            if proc.returncode != 0 or "--check" in args:
                return Verdict(proc.returncode == 0, None, detail)
            if "--3way" in args and _git(self.git_dir.parent, "ls-files", "-u", env=env).stdout.strip():
                return Verdict(False, None, detail)
            tree = _git(self.git_dir.parent, "write-tree", env=env).stdout.decode().strip()
            return Verdict(True, tree, detail)
        finally:
            index.unlink()
            index.with_name(index.name + ".lock").unlink(missing_ok=True)

    def ours(self, patch: bytes, target: str) -> tuple[str, Verdict]:
        """('refused'|'accepted'|'already'|'threeway'|'late'|'crash'|'worktree', verdict)."""
        try:
            parsed = parse_patch(patch, series="fuzz", name="case.patch", where="case.patch")
        except PatchError as exc:
            return "refused", Verdict(False, None, str(exc))
        # The engine must write objects only: run it from an empty folder and look there after.
        scratch = self.root / "cwd"
        scratch.mkdir(exist_ok=True)
        here = os.getcwd()
        os.chdir(scratch)
        try:
            result = replay(self.git_dir, target, [parsed])
        except PatchError as exc:
            return "refused", Verdict(False, None, str(exc))
        except StackbuildError as exc:
            return "late", Verdict(False, None, f"{type(exc).__name__}: {exc}")
        except Exception as exc:  # noqa: BLE001 - a traceback is exactly what the gate looks for
            return "crash", Verdict(False, None, f"{type(exc).__name__}: {exc}")
        finally:
            os.chdir(here)
            written = sorted(p.name for p in scratch.iterdir())
            shutil.rmtree(scratch)
        if written:
            return "worktree", Verdict(False, None, f"wrote {written} into the current folder")
        (res,) = result.results
        detail = f"{res.outcome} {res.detail} {' '.join(f'{f.path}:{f.reason}' for f in res.failed)}".strip()
        if not res.ok:
            return "refused", Verdict(False, None, detail)
        if res.outcome == ALREADY:
            return "already", Verdict(True, None, detail)
        tree = _git(self.git_dir.parent, "rev-parse", f"{result.head}^{{tree}}").stdout.decode().strip()
        return ("threeway" if res.outcome == THREEWAY else "accepted"), Verdict(True, tree, detail)

    def _unproven_deletions(self, patch: bytes, target: str) -> list[str]:
        """Deleted paths missing from TARGET with no preimage blob to show upstream removed them:
        git -R "applies" those (it creates the file), but already-applied would hide a typo."""
        diffs = parse_patch(patch, series="fuzz", name="case.patch", where="case.patch").files
        unproven = []
        for diff in diffs:
            if diff.new_path is None and diff.old_path:
                listed = _git(self.git_dir.parent, "ls-tree", "--name-only", target, "--", diff.old_path).stdout
                blob = diff.old_blob and _git(self.git_dir.parent, "cat-file", "-e", f"{diff.old_blob}^{{blob}}",
                                              check=False).returncode == 0
                if not listed.strip() and not blob:
                    unproven.append(diff.old_path)
        return unproven

    def judge(self, patch: bytes, target: str) -> Disagreement | None:
        state, ours = self.ours(patch, target)
        if state in ("late", "crash", "worktree"):
            return Disagreement(state, patch, target, ours.detail, self.git(patch, target).detail)
        if state == "already":
            rev = self.git(patch, target, "-R", "--check")
            if not rev.accepted:
                return Disagreement("already-refused", patch, target, ours.detail, rev.detail)
            unproven = self._unproven_deletions(patch, target)
            return Disagreement("already-refused", patch, target, ours.detail,
                                f"deletes missing {unproven} whose preimage blob is not in the repository") if unproven else None
        theirs = self.git(patch, target)
        if state == "threeway" and not theirs.accepted:
            theirs = self.git(patch, target, "--3way")
        if state in ("accepted", "threeway"):
            if not theirs.accepted:
                return Disagreement("accept-refuse", patch, target, ours.detail, theirs.detail)
            if theirs.tree != ours.tree:
                delta = _git(self.git_dir.parent, "diff-tree", "-r", "--name-status", str(theirs.tree),
                             str(ours.tree)).stdout.decode(errors="replace").split()
                return Disagreement("tree-differs", patch, target, f"{ours.detail} tree {ours.tree}",
                                    f"tree {theirs.tree}; ours differs: {' '.join(delta)}")
            return None
        if theirs.accepted and not any(a.matches(patch, ours.detail, theirs.detail) for a in ALLOWED):
            return Disagreement("refuse-accept", patch, target, ours.detail, theirs.detail or "applies")
        return None

    def minimize(self, found: Disagreement, budget: int = 300) -> Disagreement:
        """Drop runs of lines, then single lines, while the same class of disagreement remains."""
        best = found
        step = 8
        while step >= 1 and budget > 0:
            lines = best.patch.splitlines(keepends=True)
            i = 0
            progressed = False
            while i < len(lines) and budget > 0:
                candidate = b"".join(lines[:i] + lines[i + step:])
                budget -= 1
                again = self.judge(candidate, best.target) if candidate.strip() else None
                if again is not None and again.key() == best.key():
                    best, lines, progressed = again, candidate.splitlines(keepends=True), True
                else:
                    i += step
            if not progressed:
                step //= 2
        return best


@dataclass
class Corpus:
    oracle: Oracle
    bases: list[tuple[str, list[str], list[bytes]]] = field(default_factory=list)  # base, targets, seeds

    def case(self, rng: random.Random) -> tuple[bytes, str, str]:
        base, targets, seeds = rng.choice(self.bases)
        if rng.random() < 0.25:
            patch = _handmade(rng)
            ops = ["handmade"]
        else:
            patch, ops = rng.choice(seeds), []
        for _ in range(rng.choice([0, 1, 1, 1, 2, 2, 3])):
            patch, op = _mutate(rng, patch)
            ops.append(op)
        target = base if rng.random() < 0.6 else rng.choice(targets)
        return patch, target, "+".join(ops) or "seed"


def build_corpus(root: Path, rng: random.Random, *, bases: int = 3, seeds: int = 25) -> Corpus:
    """BASES upstream commits (the same files, varied), each with drifted targets and SEEDS patches."""
    work = root / "repo"
    work.mkdir()
    _git(work, "init", "-q", "-b", "main")
    oracle = Oracle(root)
    corpus = Corpus(oracle)
    for b in range(bases):
        files = BASE_FILES if b == 0 else _change(rng, BASE_FILES)
        base = _commit(work, files, f"base {b}", None)
        targets = [_commit(work, _drift(rng, files), f"drift {b}.{t}", base) for t in range(3)]
        corpus.bases.append((base, targets, _seed_patches(rng, work, base, files, seeds)))
    return corpus


@dataclass(frozen=True)
class Report:
    cases: int
    seconds: float
    counts: dict[str, int]  # our state per case: accepted, refused, already, threeway
    classes: list[tuple[Disagreement, int, str]]  # minimized reproducer, how many cases, mutation ops

    @property
    def disagreements(self) -> int:
        return sum(n for _, n, _ in self.classes)


def run(cases: int, seed: int, *, minimize: bool = True, progress: bool = False) -> Report:
    rng = random.Random(seed)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="stackbuild-fuzz-") as tmp:
        old_env = {k: os.environ.get(k) for k in ENV}
        os.environ.update(ENV)
        try:
            corpus = build_corpus(Path(tmp), rng)
            found: dict[tuple[str, str], list] = {}
            counts: dict[str, int] = {}
            for n in range(cases):
                patch, target, ops = corpus.case(rng)
                verdict = corpus.oracle.judge(patch, target)
                if verdict is None:
                    state = "agree"
                else:
                    state = verdict.kind
                    entry = found.setdefault(verdict.key(), [verdict, 0, ops])
                    entry[1] += 1
                    if len(patch) < len(entry[0].patch):
                        entry[0], entry[2] = verdict, ops
                counts[state] = counts.get(state, 0) + 1
                if progress and (n + 1) % 1000 == 0:
                    print(f"{n + 1} cases, {time.monotonic() - start:.0f} s, {len(found)} classes", file=sys.stderr)
            classes = [(corpus.oracle.minimize(d) if minimize else d, count, ops) for d, count, ops in found.values()]
        finally:
            for k, v in old_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    return Report(cases, time.monotonic() - start, counts, sorted(classes, key=lambda c: -c[1]))


def describe(report: Report) -> str:
    out = [f"{report.cases} cases in {report.seconds:.1f} s: {report.counts}; "
           f"{report.disagreements} disagreements in {len(report.classes)} classes"]
    for d, count, ops in report.classes:
        out.append(f"\n== {d.kind} ({count} cases, mutations {ops}) on target {d.target[:12]}")
        out.append(f"stackbuild: {d.ours}")
        out.append(f"git:        {d.git}")
        out.append("patch:\n" + d.patch.decode("utf-8", "backslashreplace"))
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="counts and classes as JSON")
    parser.add_argument("--no-minimize", action="store_true")
    args = parser.parse_args()
    report = run(args.cases, args.seed, minimize=not args.no_minimize, progress=True)
    if args.json:
        print(json.dumps({"cases": report.cases, "seconds": round(report.seconds, 1), "counts": report.counts,
                          "classes": [{"kind": d.kind, "cases": n, "mutations": ops, "ours": d.ours, "git": d.git,
                                       "patch": d.patch.decode("utf-8", "backslashreplace")}
                                      for d, n, ops in report.classes]}, indent=2))
    else:
        print(describe(report))
    return 1 if report.classes else 0


if __name__ == "__main__":
    sys.exit(main())
