"""Reading, decoding and parsing patch files, byte for byte.

The parser works on bytes, not text: patches carry CRLF content, files without a final newline
and non-UTF-8 bytes, and the applier must agree with `git apply` on every one of them. It parses
unified diffs, `git diff` extended headers (new/deleted files, modes, renames, copies, binary)
and `git format-patch` mails, whose author, date and message are kept.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import re
import zlib
from dataclasses import dataclass, field, replace
from email.header import decode_header, make_header
from email.utils import parseaddr, parsedate_to_datetime
from itertools import accumulate
from pathlib import Path

from .errors import PatchError
from .gitnames import GIT_SPACE, MODE_RE, canonical_mode, find_name, git_header_name, invalid_path, split_git_names, unquote
from .fsutil import sha256

ENCODINGS = (".gz.b64", ".b64", ".gz")
HUNK_RE = re.compile(rb"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@(.*)$")
MAIL_FROM_RE = re.compile(rb"^From [0-9a-f]{40} ")
INDEX_RE = re.compile(rb"^index ([0-9a-f]+)\.\.([0-9a-f]+)(?: ([0-7]{6}))?$")
NULL = "/dev/null"


def split_lf(data: bytes) -> list[bytes]:
    """Lines end at LF only, with their LF kept: a CR inside a line is content, as git sees it."""
    if b"\r" not in data:
        return data.splitlines(keepends=True)  # the same split without CRs, done in C
    parts = data.split(b"\n")
    lines = [p + b"\n" for p in parts[:-1]]
    if parts[-1]:
        lines.append(parts[-1])
    return lines


def encoding_of(name: str) -> str:
    for suffix in ENCODINGS:
        if name.endswith(suffix):
            return suffix[1:]
    return ""


def decode(raw: bytes, encoding: str, where: str) -> bytes:
    """Undo `.b64`, `.gz` and `.gz.b64` wrapping; corrupt input is an error, never garbage."""
    data = raw
    try:
        if encoding in ("b64", "gz.b64"):
            data = base64.b64decode(b"".join(data.split()), validate=True)
        if encoding in ("gz", "gz.b64"):
            data = gzip.decompress(data)
    except (binascii.Error, ValueError) as exc:
        raise PatchError(f"corrupt base64 in .{encoding} patch: {exc}", where=where,
                         hint="re-download or re-encode it: gzip -c X.patch | base64 > X.patch.gz.b64") from None
    except (OSError, EOFError, zlib.error) as exc:
        raise PatchError(f"corrupt gzip data in .{encoding} patch: {exc}", where=where,
                         hint="re-download or re-create the file; check it with gzip -t") from None
    return data


def encode(data: bytes, encoding: str) -> bytes:
    """The inverse of `decode`, deterministic (gzip mtime 0) so exports do not churn."""
    if encoding in ("gz", "gz.b64"):
        data = gzip.compress(data, compresslevel=9, mtime=0)
    if encoding in ("b64", "gz.b64"):
        raw = base64.b64encode(data)
        data = b"\n".join(raw[i:i + 76] for i in range(0, len(raw), 76)) + b"\n"
    return data


@dataclass(frozen=True)
class Header:
    """Who wrote a patch and why: from a mail's headers, or the text before a quilt diff."""

    subject: str = ""
    body: str = ""
    author: str | None = None
    email: str | None = None
    date: str | None = None  # git's raw form: "<epoch> <+hhmm>"

    @property
    def message(self) -> str:
        return self.subject + (f"\n\n{self.body}" if self.body else "")


@dataclass(frozen=True)
class Hunk:
    old_start: int
    old_count: int
    new_start: int
    new_count: int
    lines: tuple[bytes, ...]  # each with its ' ', '-', '+' marker and its line ending
    old_eof_newline: bool = True  # False after "\ No newline at end of file" on the old side
    new_eof_newline: bool = True
    line: int = 0  # where the hunk header is in the patch file
    unusual: bool = False  # a '\\ No newline' marker where git's own reading must decide

    @property
    def header(self) -> str:
        return f"@@ -{self.old_start},{self.old_count} +{self.new_start},{self.new_count} @@"

    def old_lines(self) -> list[bytes]:
        return _side(self.lines, b"-", self.old_eof_newline)

    def new_lines(self) -> list[bytes]:
        return _side(self.lines, b"+", self.new_eof_newline)

    def leading(self) -> int:
        n = 0
        for ln in self.lines:
            if ln[:1] != b" ":
                break
            n += 1
        return n

    def trailing(self) -> int:
        n = 0
        for ln in reversed(self.lines):
            if ln[:1] != b" ":
                break
            n += 1
        return n


def _side(lines: tuple[bytes, ...], marker: bytes, eof_newline: bool) -> list[bytes]:
    out = [ln[1:] for ln in lines if ln[:1] in (b" ", marker)]
    if not eof_newline and out and out[-1].endswith(b"\n"):
        out[-1] = out[-1][:-1]
    return out


@dataclass(frozen=True)
class FileDiff:
    old_path: str | None  # None for a new file
    new_path: str | None  # None for a deleted file
    hunks: tuple[Hunk, ...] = ()
    old_mode: str | None = None
    new_mode: str | None = None
    old_blob: str | None = None
    new_blob: str | None = None
    rename: bool = False
    copy: bool = False
    binary: bool = False
    line: int = 0
    unusual: bool = False  # outside the canonical subset our applier decides: git decides it

    @property
    def path(self) -> str:
        return self.new_path or self.old_path or ""

    @property
    def needs_git(self) -> bool:
        """Shapes our applier leaves to git itself, which handles them by definition."""
        return self.binary or self.copy or self.unusual

    @property
    def added(self) -> int:
        return sum(1 for h in self.hunks for ln in h.lines if ln[:1] == b"+")

    @property
    def removed(self) -> int:
        return sum(1 for h in self.hunks for ln in h.lines if ln[:1] == b"-")


@dataclass(frozen=True)
class Patch:
    series: str
    name: str
    data: bytes = field(repr=False)
    sha256: str
    encoding: str
    files: tuple[FileDiff, ...]
    header: Header
    strip: int = 1
    directory: str = ""
    path: Path | None = None
    url: str | None = None
    mail: bool = False
    error: PatchError | None = None  # set instead of files when check reads a patch it cannot parse

    @property
    def label(self) -> str:
        return f"{self.series}/{self.name}"

    @property
    def paths(self) -> tuple[str, ...]:
        seen: dict[str, None] = {}
        for f in self.files:
            for p in (f.old_path, f.new_path):
                if p:
                    seen[p] = None
        return tuple(seen)


# Every line apply.c's parse_git_diff_header reads as part of a git header.
# parse_git_diff_header's table, in its order: the first prefix a line starts with decides.
GIT_HEADER_OP = re.compile(rb"@@ -|--- |\+\+\+ |old mode |new mode |deleted file mode |new file mode |copy from |"
                           rb"copy to |rename old |rename new |rename from |rename to |similarity index |"
                           rb"dissimilarity index |index ")
GIT_EXTENSION_OPS = {b"deleted file mode ": b"deleted", b"new file mode ": b"new", b"copy from ": b"copy",
                     b"copy to ": b"copy", b"rename old ": b"rename", b"rename new ": b"rename",
                     b"rename from ": b"rename", b"rename to ": b"rename"}
GIT_HEADERS = (b"old mode ", b"new mode ", b"deleted file mode ", b"new file mode ", b"copy from ", b"copy to ",
               b"rename old ", b"rename new ", b"rename from ", b"rename to ", b"similarity index ",
               b"dissimilarity index ", b"index ")
EPOCH_RE = re.compile(rb"\t(?:1970-01-01 00:00:00|1969-12-31 \d\d:\d\d:\d\d|Thu Jan  1 00:00:00 1970)")



def _strtoul(raw: bytes) -> int:
    """C's strtoul(raw, NULL, 10): leading white space, a sign, the digits that follow; 0 when
    there are none, a negative number wrapped as an unsigned long."""
    m = re.match(rb"[ \t\n\v\f\r]*([+-]?)(\d*)", raw)
    assert m is not None  # every part of the pattern may be empty
    value = min(int(m.group(2) or b"0"), 2**64 - 1)
    return (2**64 - value) % 2**64 if m.group(1) == b"-" else value


def _b85_line(line: bytes) -> bytes | None:
    """One line of a binary literal (apply.c parse_binary_hunk): a length letter, base85 data."""
    n = len(line)
    if n < 7 or (n - 2) % 5 or not line.endswith(b"\n"):
        return None
    c = line[0]
    size = c - 64 if 65 <= c <= 90 else c - 70 if 97 <= c <= 122 else -1
    room = (n - 2) // 5 * 4
    if size < 0 or room < size or size <= room - 4:
        return None
    try:
        return base64.b85decode(line[1:-1])[:size]
    except ValueError:
        return None


def _repeats_to_git(files: list[FileDiff]) -> list[FileDiff]:
    """Sections naming a path an earlier section of the same patch named go to git, which reads
    them its own way (apply.c check_patch asks only the index whether a created path exists,
    and lets a path a later section deletes or renames away be written over; previous_patch
    reads renames and copies from the index, whatever came before). Our applier takes the
    repeats that read as a sequence: a change of the file an earlier section wrote, as in
    mails of a series in one file, and git's own type change, a deletion, then the creation of
    the same path."""
    last: dict[str, int] = {}
    odd: set[int] = set()
    for k, f in enumerate(files):
        for p in {f.old_path, f.new_path} - {None}:
            j = last.get(p)  # type: ignore[arg-type]
            if j is None:
                pass
            elif j == k - 1 and files[j].new_path is None and f.old_path is None:
                pass  # a type change
            elif not (f.old_path == f.new_path and not (f.rename or f.copy) and files[j].new_path == p):
                odd.update((j, k))
            last[p] = k  # type: ignore[index]
    return [replace(f, unusual=True) if k in odd else f for k, f in enumerate(files)] if odd else files


class _Parser:
    def __init__(self, data: bytes, where: str, strip: int, directory: str):
        self.data = data
        self.lines = split_lf(data)
        self._offsets: list[int] | None = None
        self.where = where
        self.strip = strip
        self.directory = directory
        self.i = 0
        self.after_skipped = False

    def error(self, message: str, line: int, hint: str | None = None) -> PatchError:
        return PatchError(message, where=f"{self.where}:{line}", hint=hint)

    def path(self, raw: bytes, line: int, strip: int | None = None, verify: bool = True,
             tab_ends: bool = True) -> str | None:
        """TAB_ENDS: a tab ends the name (find_name's TERM_TAB), as on ---/+++ lines but not on
        rename/copy lines, whose names run to the end of the line."""
        strip = self.strip if strip is None else strip
        if tab_ends and raw.startswith(b"/dev/null") and raw[9:10] in (b"", b" ", b"\t", b"\r", b"\n"):
            return None  # apply.c is_dev_null: '/dev/null' and any whitespace after it
        raw = unquote((raw.split(b"\t", 1)[0] if tab_ends else raw).rstrip(b"\r\n"))
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("utf-8", "surrogateescape")
        if text == NULL:
            return None
        # apply.c find_name_common: each '/' counts towards -pN; squash_slash then joins runs.
        parts = text.split("/")
        if len(parts) <= strip:
            raise self.error(f"path '{text}' has fewer than {strip + 1} components for -p{strip}", line,
                             hint="set the series' strip level (strip = N or '-pN' in the series file)")
        name = re.sub("/+", "/", "/".join(parts[strip:]))
        full = f"{self.directory}/{name}" if self.directory else name
        if verify:
            self.verify(full, line)
        return full

    def at(self, k: int, skip: int) -> tuple[bytes, int, int]:
        """Line K from column SKIP as git sees it: (buffer, start, end of the line). Only a quoted
        name needs the whole patch (git's unquoting reads on past the line), so only then is
        where each line starts worked out, once."""
        line = self.lines[k]
        if b'"' not in line:
            return line, skip, len(line)
        if self._offsets is None:
            self._offsets = list(accumulate(map(len, self.lines), initial=0))
        start = self._offsets[k]
        return self.data, start + skip, start + len(line)

    def find_name(self, k: int, skip: int, p: int, term_tab: bool = True) -> bytes | None:
        return find_name(*self.at(k, skip), p, term_tab)

    def git_header(self, k: int) -> bytes | None:
        """apply.c parse_git_diff_header's bookkeeping of names and extended header lines, for the
        'diff --git' line K and the header after it: where git refuses the header, refuse with
        its words; else the name git_header_name gives both sides (None: the lines must name it)."""
        p = self.strip
        def_name = git_header_name(*self.at(k, len(b"diff --git ")), p)
        old: bytes | None = None
        new: bytes | None = None
        kinds: set[bytes] = set()  # of creation, deletion, rename and copy, which lines said
        first_ext = 0
        j = k + 1
        n = len(self.lines)
        while j < n:
            raw = self.lines[j]
            m = GIT_HEADER_OP.match(raw)
            if m is None or not raw.endswith(b"\n"):
                break  # gitdiff_unrecognized ends the header, as does an unterminated line
            op = m.group()
            if op in (b"--- ", b"+++ "):
                # gitdiff_verify_name: the first name sets the side, any later one must agree.
                side = "old" if op == b"--- " else "new"
                known, isnull = (old, b"new" in kinds) if side == "old" else (new, b"deleted" in kinds)
                if known is None and not isnull:
                    known = self.find_name(j, 4, p)
                elif known is not None:
                    if isnull:
                        raise self.error(f"git apply: bad git-diff - expected /dev/null, got "
                                         f"{known.decode('utf-8', 'replace')} on line {j + 1}", j + 1)
                    if self.find_name(j, 4, p) != known:
                        raise self.error(f"git apply: bad git-diff - inconsistent {side} filename on line {j + 1}",
                                         j + 1, hint="the ---/+++ names disagree with the rest of the header")
                elif not (raw[4:13] == b"/dev/null" and raw[13:14] in GIT_SPACE):
                    raise self.error(f"git apply: bad git-diff - expected /dev/null on line {j + 1}", j + 1)
                if side == "old":
                    old = known
                else:
                    new = known
            elif op == b"@@ -":
                break
            elif op in GIT_EXTENSION_OPS:
                kind = GIT_EXTENSION_OPS[op]
                if op == b"deleted file mode ":
                    old = def_name
                elif op == b"new file mode ":
                    new = def_name
                elif op.endswith((b"from ", b"old ")):
                    old = self.find_name(j, len(op), max(0, p - 1), term_tab=False)
                else:
                    new = self.find_name(j, len(op), max(0, p - 1), term_tab=False)
                kinds.add(kind)
                # check_header_line: a section is at most one of creation, deletion, rename, copy.
                if len(kinds) > 1:
                    raise self.error(f"inconsistent header lines {first_ext} and {j + 1}", j + 1,
                                     hint="a file section may create, delete, rename or copy a file, only one of them")
                first_ext = first_ext or j + 1
            j += 1
        if old is None and new is None:
            if def_name is None:
                raise self.error(f"git diff header lacks filename information when removing {p} leading pathname "
                                 f"component{'' if p == 1 else 's'} (line {j + 1})", k + 1,
                                 hint="the 'diff --git' line names two different files and nothing after it says which")
            old = new = def_name
        if (new is None and b"deleted" not in kinds) or (old is None and b"new" not in kinds):
            raise self.error(f"git diff header lacks filename information (line {j + 1})", k + 1,
                             hint="the header names the file on one side only")
        return def_name

    def side_name(self, raw: bytes, line: int) -> str | None:
        """A traditional ---/+++ name: None for /dev/null, '' where it names nothing."""
        try:
            return self.path(raw[4:], line, verify=False)
        except PatchError:
            return ""

    def verify(self, full: str, line: int) -> None:
        name = full[len(self.directory) + 1:] if self.directory else full
        if invalid_path(name):
            raise self.error(f"invalid path '{name}'", line,
                             hint="patches may only touch files inside their source, never .git or outside it")

    def mode(self, raw: bytes, line: int, info: dict[str, object], key: str) -> bool:
        """Stores KEY's canonical mode in INFO (and its raw value: git compares those to tell a
        mode change); True when git must decide (a mode our applier does not write)."""
        try:
            mode = canonical_mode(raw)
        except ValueError as exc:
            raise self.error(f"invalid mode '{exc}'", line, hint="modes are octal: 100644, 100755 or 120000") from None
        info.setdefault(key, mode)
        info.setdefault(f"{key}_raw", int(MODE_RE.match(raw).group(1), 8))  # type: ignore[union-attr]
        return mode is None

    def header_crlf(self, line_no: int, raw: bytes) -> None:
        if raw.endswith(b"\r\n"):
            raise self.error("patch has CRLF line endings in its diff headers", line_no,
                             hint="the file was converted to DOS line endings; restore it with dos2unix")

    def garbage(self) -> PatchError:
        return self.error(f"patch with only garbage at line {self.i + 1}", self.i + 1,
                          hint="a file section needs a hunk ('@@ -START,COUNT +START,COUNT @@') or a real metadata change")

    def parse(self) -> list[FileDiff]:
        files: list[FileDiff] = []
        n = len(self.lines)
        while self.i < n:
            raw = self.lines[self.i]
            if raw.startswith(b"diff --git "):
                self.header_crlf(self.i + 1, raw)
                found = self.git_diff()
                if found is not None:
                    files.append(found)
            elif (raw.startswith(b"--- ") and self.i + 2 < n and self.lines[self.i + 1].startswith(b"+++ ")
                  and self.lines[self.i + 2].startswith(b"@@ -")):
                files.append(self.traditional())  # apply.c find_header: a ---/+++ pair counts before a hunk only
            elif raw.startswith(b"@@ -") and raw.endswith(b"\n") and HUNK_RE.match(raw.rstrip(b"\n")):
                # apply.c find_header: only a fragment header that parses is an error here; git
                # reads past any other line.
                raise self.error("hunk without a file header ('--- a/…' and '+++ b/…')", self.i + 1)
            else:
                self.i += 1
        return _repeats_to_git(files)

    def traditional(self) -> FileDiff:
        """apply.c parse_traditional_patch: one name for both sides; a /dev/null side (or git's
        epoch timestamp, left to git) makes a creation or deletion."""
        start = self.i + 1
        first, second = self.lines[self.i], self.lines[self.i + 1]
        self.header_crlf(start, first)
        unusual = bool(EPOCH_RE.search(first) or EPOCH_RE.search(second))
        # find_name_common: a side without enough components for -pN, or with nothing after
        # them ('+++ b/'), names nothing, and the other side decides alone; with neither, the
        # patch names no file.
        old, new = self.side_name(first, start), self.side_name(second, start + 1)
        if old is None or new is None:
            name = old if new is None else new  # the side that is not /dev/null
        else:
            # find_name_traditional: the second name, unless it only extends the first
            name = old if new == "" or (old and len(new) > len(old) and new.startswith(old)) else new
            old = new = name
        if name == "":
            raise self.error(f"unable to find filename in patch at line {start}", start,
                             hint="set the series' strip level (strip = N or '-pN' in the series file)")
        for name, line in ((old, start), (new, start + 1)):
            if name is not None:
                self.verify(name, line)
        if old is None and new is None:
            unusual = True
        self.i += 2
        hunks = self.hunks()
        if not hunks:
            raise self.garbage()
        if old is not None and new is not None and len(hunks) == 1 and hunks[0].old_count == 0:
            # parse_single_patch leaves such a patch's is_new open, and check_preimage makes it a
            # creation when the path is not in the index: git decides.
            unusual = True
        unusual |= self.after_skipped
        self.after_skipped = False
        return FileDiff(old, new, tuple(hunks), new_mode="100644" if old is None else None, line=start,
                        unusual=unusual or any(h.unusual for h in hunks))

    def git_diff(self) -> FileDiff | None:
        start = self.i + 1
        try:
            def_name: bytes | None = self.git_header(self.i)
        except PatchError:
            # apply.c find_header keeps what a skipped 'diff --git' header read (its names, its
            # rename or copy flag) for the next one: that section is git's to decide.
            if not self.after_skipped:
                raise
            def_name = None
        names = split_git_names(self.lines[self.i][len(b"diff --git "):].rstrip(b"\r\n"))
        info: dict[str, object] = {}
        # git_header_name: without two readable names the header lines must name the file,
        # and git decides; our applier takes only the plain shape.
        unusual = names is None
        # Checked once the section says which names it uses: git ignores a 'diff --git' line's
        # names when rename/copy lines give them.
        try:
            header_old = self.path(names[0], start, verify=False) if names else None
            header_new = self.path(names[1], start, verify=False) if names else None
        except PatchError:
            # git_header_name: names that -pN cannot strip give no name; the header lines decide.
            names, header_old, header_new, unusual = None, None, None, True
        renamed: dict[str, str | None] = {}
        self.i += 1
        n = len(self.lines)
        while self.i < n:
            if not self.lines[self.i].endswith(b"\n"):
                break  # apply.c parse_git_diff_header reads whole lines only
            raw = self.lines[self.i].rstrip(b"\n")
            line_no = self.i + 1
            if raw.startswith((b"diff --git ", b"@@ -", b"--- ", b"+++ ")):
                break
            if raw.startswith(b"old mode "):
                info.pop("old_mode", None), info.pop("old_mode_raw", None)
                unusual |= self.mode(raw[9:], line_no, info, "old_mode")
            elif raw.startswith(b"new mode "):
                info.pop("new_mode", None), info.pop("new_mode_raw", None)
                unusual |= self.mode(raw[9:], line_no, info, "new_mode")
            elif raw.startswith(b"deleted file mode "):
                info.pop("old_mode", None), info.pop("old_mode_raw", None)
                unusual |= self.mode(raw[18:], line_no, info, "old_mode")
                info["deleted"] = True
            elif raw.startswith(b"new file mode "):
                info.pop("new_mode", None), info.pop("new_mode_raw", None)
                unusual |= self.mode(raw[14:], line_no, info, "new_mode")
                info["created"] = True
            elif raw.startswith((b"rename from ", b"copy from ")):
                info["rename" if raw.startswith(b"rename") else "copy"] = True
                renamed["from"] = self.path(raw.split(b" ", 2)[2], line_no, max(0, self.strip - 1),
                                              verify=False, tab_ends=False)
            elif raw.startswith((b"rename to ", b"copy to ")):
                info["rename" if raw.startswith(b"rename") else "copy"] = True
                renamed["to"] = self.path(raw.split(b" ", 2)[2], line_no, max(0, self.strip - 1),
                                              verify=False, tab_ends=False)
            elif m := INDEX_RE.match(raw):
                info["old_blob"], info["new_blob"] = m.group(1).decode(), m.group(2).decode()
                if m.group(3):
                    # gitdiff_index: the mode is the old side's only; the new one stays the file's own
                    info.pop("old_mode", None), info.pop("old_mode_raw", None)
                    unusual |= self.mode(m.group(3), line_no, info, "old_mode")
            elif raw.startswith(b"GIT binary patch") or (raw.startswith(b"Binary files ") and raw.endswith(b" differ")):
                if self.i == start:
                    break  # parse_git_diff_header reads no header before it: find_header skips the section
                info["binary"] = True
                if raw.startswith(b"Binary files "):
                    raise self.error(
                        "binary change without its content ('Binary files … differ')", self.i + 1,
                        hint="re-create the patch with 'git diff --binary' or 'git format-patch' (which include it)",
                    )
                self.i += 1
                self.binary()
                break
            elif raw.startswith((b"similarity index", b"dissimilarity index")):
                pass
            elif raw.startswith(GIT_HEADERS):
                unusual = True  # a header line git reads in its own way ("index" without "..", "rename old")
            else:
                # parse_git_diff_header ends at an unrecognized line and what follows is read anew:
                # a shape git decides.
                unusual |= bool(raw.strip()) and not raw.startswith((b"-- ", b"From "))
                break
            self.i += 1
        old, new = header_old, header_new
        if self.i == start and not (self.i < n and self.lines[self.i].startswith((b"--- ", b"+++ "))):
            # apply.c find_header skips a 'diff --git' line with no header after it (git_header
            # made sure it names one file), but what it read stays in its state: git decides the
            # next section.
            self.after_skipped = True
            return None
        unusual |= bool((info.get("rename") or info.get("copy")) and (info.get("created") or info.get("deleted")))
        if info.get("rename") or info.get("copy"):
            # apply.c takes the names of rename/copy lines; anything but both lines, agreeing
            # with the 'diff --git' line, is left to git.
            unusual |= set(renamed) != {"from", "to"} or (renamed.get("from"), renamed.get("to")) != (header_old, header_new)
            old, new = renamed.get("from", header_old), renamed.get("to", header_new)
        else:
            # git_header_name finds no name (the two differ, or are not in exactly the same
            # form): ---/+++ decide.
            unusual |= header_old != header_new or def_name is None
        hunks: list[Hunk] = []
        if self.i < n and self.lines[self.i].startswith((b"--- ", b"+++ ")):
            self.header_crlf(self.i + 1, self.lines[self.i])
            run_end = self.i
            while run_end < n and self.lines[run_end].startswith((b"--- ", b"+++ ")):
                run_end += 1
            if run_end - self.i != 2 or not self.lines[self.i].startswith(b"--- ") \
                    or not self.lines[self.i + 1].startswith(b"+++ "):
                # git reads ---/+++ lines in any number and order as header lines: git decides.
                unusual = True
                self.i = run_end
                # parse_git_diff_header reads header lines in any order up to the first fragment.
                while self.i < n and self.lines[self.i].startswith((b"--- ", b"+++ ", b"index ", *GIT_HEADERS)):
                    self.i += 1
            else:
                # gitdiff_verify_name: these names win over the 'diff --git' line; when they differ
                # from it (or /dev/null disagrees with the file's creation or deletion) git decides.
                minus = self.path(self.lines[self.i][4:], self.i + 1)
                plus = self.path(self.lines[self.i + 1][4:], self.i + 2)
                unusual |= minus != (None if info.get("created") else old) or plus != (None if info.get("deleted") else new)
                self.i += 2
            hunks = self.hunks()
        elif self.i < n and self.lines[self.i].startswith(b"@@ -"):
            # apply.c: a git header that named the file needs no ---/+++ lines before its
            # fragments; a shape our applier does not take, so git decides.
            unusual = True
            hunks = self.hunks()
        if {"old_mode", "new_mode"} <= info.keys() and (str(info["old_mode"]) == "120000") != (str(info["new_mode"]) == "120000"):
            unusual = True  # a mode line changing a file's type: git refuses it against the index
        unusual |= self.after_skipped
        self.after_skipped = False
        metadata = bool(info.get("rename") or info.get("copy") or info.get("created") or info.get("deleted")
                        or ("old_mode_raw" in info and "new_mode_raw" in info
                            and info["old_mode_raw"] != info["new_mode_raw"]))
        if not hunks and not info.get("binary") and not metadata:
            raise self.garbage()  # apply.c parse_chunk: a text patch without change or metadata
        if info.get("created"):
            old = None
        if info.get("deleted"):
            new = None
        for name in {old, new} - {None}:
            self.verify(name, start)  # type: ignore[arg-type]
        return FileDiff(
            old_path=old,
            new_path=new,
            hunks=tuple(hunks),
            old_mode=info.get("old_mode"),  # type: ignore[arg-type]
            new_mode=info.get("new_mode"),  # type: ignore[arg-type]
            old_blob=info.get("old_blob"),  # type: ignore[arg-type]
            new_blob=info.get("new_blob"),  # type: ignore[arg-type]
            rename=bool(info.get("rename")),
            copy=bool(info.get("copy")),
            binary=bool(info.get("binary")),
            line=start,
            unusual=unusual or any(h.unusual for h in hunks),
        )

    def binary(self) -> None:
        """apply.c parse_binary: a forward 'literal N'/'delta N' block of base85 lines whose
        inflated size is N, ended by an empty line, then an optional reverse block."""
        n = len(self.lines)
        for block in range(2):
            head = self.lines[self.i] if self.i < n else b""
            method = next((w for w in (b"literal ", b"delta ") if head.startswith(w)), None)
            if method is None:
                if block == 0:
                    raise self.error(f"unrecognized binary patch at line {self.i}", self.i,
                                     hint="the binary part is damaged; re-create the patch with 'git diff --binary'")
                return
            size = _strtoul(head[len(method):])  # parse_binary_hunk reads the size with strtoul
            self.i += 1
            chunks = []
            while True:
                line = self.lines[self.i] if self.i < n else b""
                if line == b"\n":
                    self.i += 1
                    break
                data = _b85_line(line)
                if data is None:
                    raise self.corrupt_binary(line)
                chunks.append(data)
                self.i += 1
            try:
                inflated = zlib.decompress(b"".join(chunks))
            except zlib.error:
                inflated = None
            if inflated is None or len(inflated) != size:
                raise self.corrupt_binary(self.lines[self.i - 2] if self.i >= 2 else b"")

    def corrupt_binary(self, line: bytes) -> PatchError:
        text = line.rstrip(b"\n").decode("utf-8", "replace")
        return self.error(f"corrupt binary patch at line {self.i + 1}: {text}", self.i + 1,
                          hint="the binary part is truncated or damaged; re-create the patch with 'git diff --binary'")

    def corrupt(self, line_no: int, why: str) -> PatchError:
        return self.error(f"corrupt patch at line {line_no}", line_no, hint=why)

    def hunks(self) -> list[Hunk]:
        """apply.c parse_fragment: every line of a hunk ends in LF and is ' ', '-', '+', an empty
        context line or a '\\ No newline' marker, until the header's counts are used up."""
        hunks: list[Hunk] = []
        n = len(self.lines)
        while self.i < n and self.lines[self.i].startswith(b"@@ -"):
            line_no = self.i + 1
            self.header_crlf(line_no, self.lines[self.i])
            m = HUNK_RE.match(self.lines[self.i].rstrip(b"\n"))
            if not m:
                raise self.corrupt(line_no, "malformed hunk header: expected '@@ -START,COUNT +START,COUNT @@'")
            old_start, new_start = int(m.group(1)), int(m.group(3))
            old_count = int(m.group(2)) if m.group(2) is not None else 1
            new_count = int(m.group(4)) if m.group(4) is not None else 1
            self.i += 1
            body: list[bytes] = []
            old_left, new_left = old_count, new_count
            old_eof = new_eof = True
            unusual = after_marker = False
            marked: bytes | None = None  # the tag of the line a '\\ No newline' marker ended
            while old_left > 0 or new_left > 0 or (self.i < n and self.lines[self.i].startswith(b"\\")):
                if self.i >= n:
                    raise self.corrupt(self.i + 1, f"hunk at line {line_no} ends early: {old_left} old and {new_left} "
                                                   "new lines missing; the patch is truncated or was edited by hand")
                raw = self.lines[self.i]
                tag = raw[:1]
                if not raw.endswith(b"\n") and tag != b"\\":
                    raise self.corrupt(self.i + 1, "the patch's last line has no newline: the file is truncated")
                if tag == b"\\":
                    if len(raw) < 12:
                        raise self.corrupt(self.i + 1, "a '\\ No newline at end of file' marker cut short")
                    prev = body[-1][:1] if body and not after_marker else None
                    if prev is None or (marked is not None and not (marked == b"-" and prev == b"+")):
                        unusual = True
                    marked = prev
                    if prev in (b" ", b"-"):
                        old_eof = False
                    if prev in (b" ", b"+"):
                        new_eof = False
                    after_marker = True
                    self.i += 1
                    continue
                after_marker = False
                if raw == b"\n":
                    raw, tag = b" \n", b" "  # an empty context line whose space an editor removed
                if marked is not None and not (marked == b"-" and tag == b"+"):
                    # git strips the LF of any line before a marker, also inside a hunk: outside
                    # the one canonical place (end of a side) git decides.
                    unusual = True
                if tag == b" " and old_left > 0 and new_left > 0:
                    old_left -= 1
                    new_left -= 1
                elif tag == b"-" and old_left > 0:
                    old_left -= 1
                elif tag == b"+" and new_left > 0:
                    new_left -= 1
                else:
                    raise self.corrupt(self.i + 1, f"hunk at line {line_no}: this line does not match the counts "
                                                   "of its header; re-create the patch or fix the @@ counts")
                body.append(raw)
                self.i += 1
            if not any(ln[:1] in (b"+", b"-") for ln in body):
                raise self.corrupt(self.i + 1, f"hunk at line {line_no} changes nothing: it holds only context")
            hunks.append(Hunk(old_start, old_count, new_start, new_count, tuple(body), old_eof, new_eof, line_no,
                              unusual))
        return hunks


def parse_header(data: bytes) -> tuple[Header, bool]:
    """A format-patch mail's author, date and message, or a quilt header's free text."""
    first_diff = len(data)
    for marker in (b"\ndiff --git ", b"\n--- ", b"\nIndex: "):
        pos = data.find(marker)
        if pos != -1:
            first_diff = min(first_diff, pos + 1)
    if data.startswith((b"diff --git ", b"--- ", b"Index: ")):
        first_diff = 0
    head = data[:first_diff]
    if MAIL_FROM_RE.match(head) or head.startswith((b"From: ", b"Subject: ")):
        return _parse_mail(head), True
    text = head.decode("utf-8", "replace").strip()
    subject, _, body = text.partition("\n")
    return Header(subject=subject.strip(), body=body.strip()), False


def _mail_headers(block: str) -> dict[str, str]:
    """RFC 5322 headers with folded lines unfolded; the email package is 10x slower for this."""
    headers: dict[str, str] = {}
    key = None
    for line in block.split("\n"):
        if line[:1] in (" ", "\t") and key:
            headers[key] += " " + line.strip()
        elif ":" in line:
            key, _, value = line.partition(":")
            key = key.strip().lower()
            headers.setdefault(key, value.strip())
    return headers


def _decode_words(value: str) -> str:
    return str(make_header(decode_header(value))) if "=?" in value else value


def _parse_mail(head: bytes) -> Header:
    if MAIL_FROM_RE.match(head):
        head = head.split(b"\n", 1)[1] if b"\n" in head else b""
    text = head.decode("utf-8", "replace")
    block, _, payload = text.partition("\n\n")
    headers = _mail_headers(block)
    # format-patch puts the diffstat after a '---' line; the message ends there.
    body_lines = []
    for line in payload.splitlines():
        if line == "---":
            break
        body_lines.append(line)
    subject = _decode_words(headers.get("subject", ""))
    subject = re.sub(r"\s+", " ", re.sub(r"^\[PATCH[^\]]*\]\s*", "", subject)).strip()
    sender = _decode_words(headers.get("from", ""))
    m = re.match(r'^\s*"?(.*?)"?\s*<([^>]*)>\s*$', sender)
    name, email = (m.group(1), m.group(2)) if m else parseaddr(sender)
    date = None
    if headers.get("date"):
        try:
            dt = parsedate_to_datetime(headers["date"])
            offset = dt.utcoffset()
            minutes = int(offset.total_seconds() // 60) if offset else 0
            sign = "-" if minutes < 0 else "+"
            date = f"{int(dt.timestamp())} {sign}{abs(minutes) // 60:02d}{abs(minutes) % 60:02d}"
        except (TypeError, ValueError):
            date = None
    return Header(subject=subject, body="\n".join(body_lines).strip(), author=name or None, email=email or None, date=date)


def parse_patch(data: bytes, *, series: str, name: str, where: str, strip: int = 1, directory: str = "",
                encoding: str = "", path: Path | None = None, url: str | None = None) -> Patch:
    if not data.strip():
        raise PatchError("patch is empty", where=where, hint="remove it from the series or fill it")
    if b"\0" in data[:8000] and not data.startswith(b"From "):
        raise PatchError("patch file is binary, not a diff", where=where,
                         hint="if it is compressed, give it a .gz/.b64/.gz.b64 name")
    files = _Parser(data, where, strip, directory).parse()
    if not files:
        raise PatchError("patch contains no diff", where=where,
                         hint="a patch needs at least one '--- a/…' / '+++ b/…' section; check the file or its encoding")
    header, mail = parse_header(data)
    return Patch(series=series, name=name, data=data, sha256=sha256(data), encoding=encoding, files=tuple(files),
                 header=header, strip=strip, directory=directory, path=path, url=url, mail=mail)


def read_patch_file(path: Path, *, series: str, name: str, strip: int = 1, directory: str = "",
                    expect_sha256: str | None = None, url: str | None = None) -> Patch:
    where = str(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise PatchError(f"cannot read patch: {exc.strerror}", where=where,
                         hint="check the series file names an existing file") from None
    enc = encoding_of(name if url else path.name)
    data = decode(raw, enc, where)
    digest = sha256(data)
    if expect_sha256 and digest != expect_sha256:
        raise PatchError(
            f"sha256 of the decoded patch is {digest}, expected {expect_sha256}",
            where=url or where,
            hint="the file changed upstream or in transit; verify the source and update the pinned sha256 only if you trust it",
        )
    return parse_patch(data, series=series, name=name, where=url or where, strip=strip, directory=directory,
                       encoding=enc, path=path, url=url)

