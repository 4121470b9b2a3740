"""Hunks applied to one file's lines in memory, by `git apply`'s own matching rules.

Pure: lines in, lines out, no git process. Exact context first, then offsets searched
nearest-first (apply.c's find_pos), anchoring at the beginning and end of a file, and lines an
earlier hunk of the same file wrote never matched again; fuzz trims context only when the
caller allows it. The replayer decides what a file's lines are and what becomes of the result.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

from .patches import FileDiff, Hunk


@dataclass(frozen=True)
class FailedHunk:
    path: str
    hunk: int  # 1-based within its file
    header: str
    line: int  # of the hunk header in the patch file
    reason: str = "context does not match"


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


@dataclass
class FileState:
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


def apply_hunks(state: FileState, hunks: Sequence[Hunk], fuzz: int, owner: str, path: str,
                overlaps: list[Overlap] | None) -> tuple[FileState | None, int, int, list[FailedHunk]]:
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
    return FileState(state.mode, lines, owners), max_offset, used_fuzz, []


def reverse_diff(diff: FileDiff) -> FileDiff:
    swap = {b"+": b"-", b"-": b"+"}
    hunks = tuple(
        Hunk(h.new_start, h.new_count, h.old_start, h.old_count,
             tuple(swap.get(ln[:1], ln[:1]) + ln[1:] for ln in h.lines), h.new_eof_newline, h.old_eof_newline, h.line)
        for h in diff.hunks
    )
    return replace(diff, old_path=diff.new_path, new_path=diff.old_path, hunks=hunks, old_mode=diff.new_mode,
                   new_mode=diff.old_mode, old_blob=diff.new_blob, new_blob=diff.old_blob)
