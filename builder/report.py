"""Rendering results for people (rich tables) and for tools (JUnit XML, Markdown)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Iterable, Sequence

from rich.console import Console, ConsoleDimensions
from rich.table import Table

STYLE = {"clean": "green", "offset": "green", "3way": "yellow", "fuzz": "yellow", "already-applied": "cyan",
         "conflict": "bold red", "malformed": "bold red", "unchanged": "green", "moved": "green", "merged": "yellow", "upstream": "cyan"}

# Wider than any row: piped output (logs, CI, grep) keeps every table row and path on one line.
UNWRAPPED = 100_000


class _Console(Console):
    """A terminal's own width; anything else is never wrapped (rich would assume 80 columns).
    Decided at each print: the stream may be swapped after import (tests, redirection)."""

    @property  # type: ignore[misc]  # read-only on purpose: nothing here sets a console's size
    def size(self) -> ConsoleDimensions:
        if self.is_terminal:
            return super().size
        return ConsoleDimensions(UNWRAPPED, super().size.height)


console = _Console(highlight=False)


def outcome_text(outcome: str, ok: bool = True) -> str:
    style = STYLE.get(outcome, "white") if ok else "bold red"
    return f"[{style}]{outcome}[/{style}]"


def patch_table(title: str, rows: Iterable[dict]) -> Table:
    table = Table(title=title, title_justify="left", show_lines=False)
    for col in ("patch", "outcome", "files", "detail"):
        table.add_column(col, overflow="fold")
    for r in rows:
        detail = r.get("detail") or ""
        if r.get("failed"):
            detail = "; ".join(
                f"{f['path']} hunk #{f['hunk']} {f['header']} ({f['reason']})" if f["hunk"] else f"{f['path']} ({f['reason']})"
                for f in r["failed"][:5])
        table.add_row(r["patch"], outcome_text(r["outcome"], r.get("ok", True)), str(len(r.get("files", []))), detail)
    return table


def simple_table(title: str, columns: Sequence[str], rows: Iterable[Sequence[object]]) -> Table:
    table = Table(title=title, title_justify="left")
    for col in columns:
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(*("" if v is None else str(v) for v in row))
    return table


def junit(suite_name: str, cases: Iterable[tuple[str, str, str, bool, str]]) -> str:
    """CASES: (classname, name, outcome, ok, message). One <testcase> per patch."""
    suite = ET.Element("testsuite", name=suite_name)
    total = failures = 0
    for classname, name, outcome, ok, message in cases:
        total += 1
        case = ET.SubElement(suite, "testcase", classname=classname, name=name)
        ET.SubElement(case, "system-out").text = outcome
        if not ok:
            failures += 1
            ET.SubElement(case, "failure", message=f"{outcome}: {message}"[:500], type=outcome)
    suite.set("tests", str(total))
    suite.set("failures", str(failures))
    return ET.tostring(suite, encoding="unicode", xml_declaration=True) + "\n"
