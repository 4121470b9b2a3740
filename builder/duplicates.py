"""Patches of one source that carry the same change to a file: a prototype patch repeating part of
the bundle it sits on, say. The overlap report of `check` only sees lines a patch writes over
another's, which needs the later patch to apply; a repeated change does not apply as is on top of
the first (its old lines are gone) and at best goes in by three-way merge, so it is found here
from the patches' text instead: equal hunks, whatever happens when they are applied.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .patches import Hunk, Patch


@dataclass(frozen=True)
class Duplicate:
    """The later patch's hunks FIRST..LAST (1-based, in its diff of PATH) repeat the earlier's."""

    path: str
    earlier: str
    later: str
    first_hunk: int
    last_hunk: int

    @property
    def text(self) -> str:
        hunks = f"hunk {self.first_hunk}" if self.first_hunk == self.last_hunk else f"hunks {self.first_hunk}..{self.last_hunk}"
        return f"duplicate: {self.later} repeats {self.earlier}'s change to {self.path}, {hunks}"

    def to_json(self) -> dict:
        return {**vars(self), "text": self.text}


def _change(hunk: Hunk) -> tuple | None:
    """The hunk's change without its outer context lines: two patches made on bases a few lines
    apart still carry the same change. None when there is nothing but context."""
    rows = list(hunk.lines)
    while rows and rows[0][:1] == b" ":
        rows.pop(0)
    while rows and rows[-1][:1] == b" ":
        rows.pop()
    return (tuple(rows), hunk.old_eof_newline, hunk.new_eof_newline) if rows else None


def find_duplicates(patches: Sequence[Patch]) -> tuple[Duplicate, ...]:
    """Every hunk that repeats the change of a hunk of an earlier patch to the same file, in runs of
    consecutive hunks per pair of patches."""
    seen: dict[tuple[str, tuple], str] = {}  # (path, change) -> the first patch carrying it
    found: list[Duplicate] = []
    for patch in patches:
        mine: dict[tuple[str, tuple], str] = {}
        for diff in patch.files:
            for number, hunk in enumerate(diff.hunks, 1):
                change = _change(hunk)
                if change is None:
                    continue
                key = (diff.path, change)
                first = seen.get(key)
                if first is not None and first != patch.label:
                    last = found[-1] if found else None
                    if last and (last.path, last.earlier, last.later) == (diff.path, first, patch.label) \
                            and last.last_hunk == number - 1:
                        found[-1] = Duplicate(diff.path, first, patch.label, last.first_hunk, number)
                    else:
                        found.append(Duplicate(diff.path, first, patch.label, number, number))
                mine.setdefault(key, patch.label)
        for key, label in mine.items():
            seen.setdefault(key, label)
    return tuple(found)
