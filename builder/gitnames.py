"""How git reads and checks the names and modes of a patch's headers, byte for byte.

Each function follows the apply.c or read-cache.c function its docstring names, so the parser
(patches.py) takes a name from a line exactly where `git apply` takes it, and refuses the paths
and modes git refuses.
"""

from __future__ import annotations

import re

def unquote(raw: bytes) -> bytes:
    """git's C-style quoting of unusual path names ("a/t\\303\\244b")."""
    if not raw.startswith(b'"'):
        return raw
    out = bytearray()
    i = 1
    escapes = {ord("n"): 10, ord("t"): 9, ord('"'): 34, ord("\\"): 92, ord("a"): 7, ord("b"): 8,
               ord("f"): 12, ord("r"): 13, ord("v"): 11}
    while i < len(raw) and raw[i] != ord('"'):
        c = raw[i]
        if c == ord("\\") and i + 1 < len(raw):
            nxt = raw[i + 1]
            if 48 <= nxt <= 55:
                digits = re.match(rb"[0-7]{1,3}", raw[i + 1:i + 4])
                out.append(int(digits.group(), 8) & 0xFF)  # type: ignore[union-attr]
                i += 1 + len(digits.group())  # type: ignore[union-attr]
                continue
            out.append(escapes.get(nxt, nxt))
            i += 2
            continue
        out.append(c)
        i += 1
    return bytes(out)


def _closing_quote(raw: bytes) -> int:
    """Where the C-quoted name RAW (starting with '"') ends, or -1 when it does not."""
    i = 1
    while i < len(raw):
        if raw[i] == 92:
            i += 2
            continue
        if raw[i] == 34:
            return i
        i += 1
    return -1


def split_git_names(rest: bytes) -> tuple[bytes, bytes] | None:
    """`diff --git a/X b/Y`: X and Y may contain spaces; when equal, split in the middle."""
    if rest.startswith(b'"'):
        end = _closing_quote(rest)
        if end < 0:
            return None
        return unquote(rest[:end + 1]), unquote(rest[end + 2:].strip())
    if b' "' in rest:
        a, b = rest.split(b' "', 1)
        return a, unquote(b'"' + b)
    half = len(rest) // 2
    if len(rest) % 2 == 1 and rest[half:half + 1] == b" " and rest[:half].split(b"/", 1)[-1] == rest[half + 1:].split(b"/", 1)[-1]:
        return rest[:half], rest[half + 1:]
    parts = rest.split(b" ")
    if len(parts) == 2:
        return parts[0], parts[1]
    return None



_QUOTE_STOP = re.compile(rb'["\\\0]')
_C_ESCAPES = {ord("a"): 7, ord("b"): 8, ord("f"): 12, ord("n"): 10, ord("r"): 13, ord("t"): 9, ord("v"): 11,
              ord("\\"): 92, ord('"'): 34}
GIT_SPACE = b" \t\n\r"  # git's sane_ctype isspace (ctype.c): no \v or \f


def unquote_c(buf: bytes, pos: int) -> tuple[bytes, int] | None:
    """quote.c unquote_c_style on BUF from POS (a '"'): the name and where its closing quote
    ends, or None where git fails. Like git it reads on past the end of the line: to git the
    patch is one C string, ended by a NUL."""
    out = bytearray()
    i = pos + 1
    while True:
        m = _QUOTE_STOP.search(buf, i)
        if m is None:
            return None
        j = m.start()
        out += buf[i:j]
        if buf[j] == 34:
            return bytes(out), j + 1
        if buf[j] == 0:
            return None
        ch = buf[j + 1] if j + 1 < len(buf) else 0
        if ch in _C_ESCAPES:
            out.append(_C_ESCAPES[ch])
            i = j + 2
        elif 48 <= ch <= 51 and all(48 <= c <= 55 for c in buf[j + 2:j + 4]) and len(buf) >= j + 4:
            out.append(int(buf[j + 1:j + 4], 8))
            i = j + 4
        else:
            return None


def _skip_tree_prefix(p: int, name: bytes) -> bytes | None:
    """apply.c skip_tree_prefix: NAME without its first P components; None for an absolute
    name or one with fewer components."""
    if not p:
        return None if name[:1] == b"/" else name
    count = p
    for i, c in enumerate(name):
        if c == 47:
            count -= 1
            if count <= 0:
                return None if i == 0 else name[i + 1:]
    return None


def _strncmp_equal(a: bytes, b: bytes, n: int) -> bool:
    a, b = a[:n].split(b"\0", 1)[0], b[:n].split(b"\0", 1)[0]
    return a == b


def git_header_name(buf: bytes, pos: int, end: int, p: int) -> bytes | None:
    """apply.c git_header_name: the one name a 'diff --git' line (BUF[POS:END], its LF
    included, after 'diff --git ') gives both sides, or None. git takes a name only when it
    shows up twice in exactly the same form."""
    line = buf[pos:end]
    if line[:1] == b'"':
        got = unquote_c(buf, pos)
        if got is None:
            return None
        first = _skip_tree_prefix(p, got[0])
        if first is None:
            return None
        second = got[1]
        while second < end and buf[second] in GIT_SPACE:
            second += 1
        if end <= second:
            return None
        if buf[second] == 34:
            other = unquote_c(buf, second)
            if other is None:
                return None
            rest = _skip_tree_prefix(p, other[0])
            return first if rest is not None and rest.split(b"\0", 1)[0] == first.split(b"\0", 1)[0] else None
        rest = _skip_tree_prefix(p, buf[second:end])
        return first if rest == first else None  # the LF counts: as in git, this never matches a plain name
    name = _skip_tree_prefix(p, line)
    if name is None:
        return None
    quote = name.find(b'"')
    if quote >= 0:
        other = unquote_c(buf, end - len(name) + quote)
        if other is None:
            return None
        np = _skip_tree_prefix(p, other[0])
        if np is None:
            return None
        n = len(np)
        if n < quote and _strncmp_equal(np, name, n) and name[n] in GIT_SPACE:
            return np
        return None
    if b"\n" not in name:
        return None
    name = name[:name.index(b"\n")]
    for n, c in enumerate(name):
        if c in (9, 32):
            if n + 1 >= len(name):
                return None
            rest = _skip_tree_prefix(p, name[n + 1:])
            if rest is None:
                return None
            if rest == name[:n]:
                return name[:n]
    return None


def squash(name: bytes) -> bytes:
    """apply.c squash_slash: runs of slashes become one."""
    return SLASHES.sub(b"/", name) if b"//" in name else name


def find_name(buf: bytes, pos: int, end: int, p: int, term_tab: bool) -> bytes | None:
    """apply.c find_name without a default: a quoted name (find_name_gnu), else the text up to
    a LF, a CR or (TERM_TAB) a tab, without its first P components, slashes squashed."""
    if buf[pos:pos + 1] == b'"':
        got = unquote_c(buf, pos)
        if got is not None:
            parts = got[0].split(b"/", p)  # find_name_gnu: past the first P slashes, wherever they are
            if len(parts) > p:
                return squash(parts[p])
    line = buf[pos:end]
    stop = (NAME_END_TAB if term_tab else NAME_END).search(line)
    text = line[:stop.start()] if stop else line
    if p:
        parts = text.split(b"/", p)
        if len(parts) <= p:
            return None
        text = parts[p]
    return squash(text) or None


SLASHES = re.compile(rb"/+")
NAME_END_TAB = re.compile(rb"[\n\r\t]")
NAME_END = re.compile(rb"[\n\r]")

# Code points HFS+ ignores in names, so ".g\u200cit" is ".git" there (git's is_hfs_dotgit in utf8.c).
HFS_IGNORABLE = re.compile("[\u200c-\u200f\u202a-\u202e\u206a-\u206f\ufeff]")

MODE_RE = re.compile(rb"^([0-7]+)(?:\s|$)")


def _is_dot_name(component: str, word: str, short: re.Pattern[str]) -> bool:
    """NAME as NTFS or HFS+ would see it (git's is_ntfs_dot_generic, is_hfs_dot_generic): '.WORD'
    in any case, or its 8.3 short name, followed only by the spaces and dots NTFS drops or an
    alternate data stream (':'), or with HFS+'s ignorable code points inside."""
    low = HFS_IGNORABLE.sub("", component).lower()
    for m in (re.match(re.escape("." + word), low), short.match(low)):
        if m and not low[m.end():].split(":", 1)[0].strip(" ."):
            return True
    return False


DOTGIT_SHORT = re.compile(r"git~1")
DOTGITMODULES_SHORT = re.compile(r"gitmod~[1-4]")


def invalid_path(path: str, mode: str | None = None) -> bool:
    """read-cache.c's verify_path with core.protectNTFS (git's default) and core.protectHFS (off
    on Linux: refusing HFS+ spellings of .git is stricter than git there, see docs/patches.md)."""
    parts = path.split("/")
    if any(p in ("", ".", "..") or _is_dot_name(p, "git", DOTGIT_SHORT) for p in parts):
        return True
    return mode == "120000" and _is_dot_name(parts[-1], "gitmodules", DOTGITMODULES_SHORT)


def canonical_mode(raw: bytes) -> str | None:
    """apply.c's parse_mode_line + canon_mode: octal digits, regular files become 100644 or
    100755 by their owner's x bit. None for a valid mode our applier leaves to git."""
    m = MODE_RE.match(raw)
    if not m:
        raise ValueError(raw.decode("utf-8", "replace"))
    mode = int(m.group(1), 8)
    kind = mode & 0o170000
    if kind == 0o100000:
        return "100755" if mode & 0o100 else "100644"
    if kind == 0o120000:
        return "120000"
    return None
