"""The one dialect every stack.toml table is read in: where a key is, and what its value must be.

`Where` points at a key of one file; `Layered` names which of several merged tables (the top
level, then each stack of an `extends` chain) a merged value came from, so an error in a merged
[build] or [smoke] table still names the file, line and key the user wrote. Every validator takes
either, returns the checked value, and raises a `ConfigError` that says what to write instead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Protocol

from .errors import ConfigError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class Locator(Protocol):
    def at(self, dotted: str) -> str: ...

    def error(self, dotted: str, message: str, hint: str | None = None) -> ConfigError: ...


@dataclass(frozen=True)
class Where:
    """Points an error at a key of a TOML file, with the line it is on when it can be found."""

    path: Path
    text: str = field(repr=False, compare=False, default="")

    def line_of(self, dotted: str) -> int | None:
        parts = dotted.split(".")
        # Longest table prefix with a header of its own, then the first remaining key in it.
        for cut in range(len(parts), 0, -1):
            table, rest = parts[:cut], parts[cut:]
            line = _find_header(self.text, table)
            if line is None:
                continue
            if not rest:
                return line
            found = _find_key(self.text, line, rest[0])
            return found or line
        return _find_key(self.text, 0, parts[0]) if parts else None

    def at(self, dotted: str) -> str:
        line = self.line_of(dotted)
        loc = f"{self.path}:{line}" if line else str(self.path)
        return f"{loc} ({dotted})"

    def error(self, dotted: str, message: str, hint: str | None = None) -> ConfigError:
        return ConfigError(message, where=self.at(dotted), hint=hint)


@dataclass(frozen=True)
class Layered:
    """Keys of a table merged from layers (lowest precedence first): each layer is the dotted
    prefix it lives under and its raw table. A key is located in the last layer that sets it;
    keys given relative to the merged table read as they would in the lowest layer."""

    where: Where
    layers: tuple[tuple[str, Mapping[str, Any]], ...]

    def absolute(self, dotted: str) -> str:
        head = dotted.split(".")[0]
        for prefix, table in reversed(self.layers):
            if head in table:
                return f"{prefix}.{dotted}" if prefix else dotted
        prefix = self.layers[0][0] if self.layers else ""
        return f"{prefix}.{dotted}" if prefix else dotted

    def at(self, dotted: str) -> str:
        return self.where.at(self.absolute(dotted))

    def error(self, dotted: str, message: str, hint: str | None = None) -> ConfigError:
        return self.where.error(self.absolute(dotted), message, hint=hint)


@dataclass(frozen=True)
class Unlocated:
    """For tables that come from no file (tests, a recipe given on the command line): the key alone."""

    def at(self, dotted: str) -> str:
        return dotted

    def error(self, dotted: str, message: str, hint: str | None = None) -> ConfigError:
        return ConfigError(message, where=dotted, hint=hint)


UNLOCATED = Unlocated()


def _header_names(table: list[str]) -> set[str]:
    quoted = ".".join(f'"{p}"' if not re.fullmatch(r"[A-Za-z0-9_-]+", p) else p for p in table)
    return {".".join(table), quoted}


def _find_header(text: str, table: list[str]) -> int | None:
    names = _header_names(table)
    for number, line in enumerate(text.splitlines(), 1):
        m = re.match(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?", line)
        if m and re.sub(r"\s*\.\s*", ".", m.group(1)) in names:
            return number
    return None


def _find_key(text: str, after: int, key: str) -> int | None:
    lines = text.splitlines()
    for number in range(after + 1, len(lines) + 1):
        line = lines[number - 1]
        if number > after + 1 and re.match(r"^\s*\[", line):
            return None
        if re.match(rf'^\s*"?{re.escape(key)}"?\s*=', line):
            return number
    return None


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def check_keys(loc: Locator, prefix: str, table: Mapping, allowed: set[str], *, title: str | None = None) -> None:
    """Unknown keys are refused, not ignored: a misspelt key would otherwise do nothing silently.
    TITLE is the table as the message names it (default `[PREFIX]`)."""
    for key in table:
        if key not in allowed:
            raise loc.error(
                _join(prefix, key),
                f"unknown key '{key}' in {title or f'[{prefix}]'}",
                hint=f"allowed keys: {', '.join(sorted(allowed))}",
            )


def table(loc: Locator, key: str, value: Any) -> Mapping:
    if not isinstance(value, Mapping):
        raise loc.error(key, f"'{key}' must be a table, not {type(value).__name__}")
    return value


def string(loc: Locator, key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise loc.error(key, f"'{key}' must be a non-empty string, not {value!r}")
    return value


def boolean(loc: Locator, key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise loc.error(key, f"'{key}' must be true or false, not {value!r}")
    return value


def integer(loc: Locator, key: str, value: Any, low: int = 0, high: int = 100) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise loc.error(key, f"'{key}' must be an integer from {low} to {high}, not {value!r}")
    return value


def number(loc: Locator, key: str, value: Any, low: float = float("-inf"), high: float = float("inf")) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        span = f" from {low:g} to {high:g}" if (low, high) != (float("-inf"), float("inf")) else ""
        raise loc.error(key, f"'{key}' must be a number{span}, not {value!r}")
    return float(value)


def strings(loc: Locator, key: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise loc.error(key, f"'{key}' must be a list of strings")
    return tuple(value)


def str_map(loc: Locator, key: str, value: Any) -> dict[str, str]:
    """A table of strings; numbers are taken as their text (`MAX_JOBS = 4`), booleans are not."""
    for k, v in table(loc, key, value).items():
        if isinstance(v, bool) or not isinstance(v, (str, int, float)):
            raise loc.error(f"{key}.{k}", f"'{key}.{k}' must be a string or number")
    return {str(k): str(v) for k, v in value.items()}


def looks_like_option(value: str) -> bool:
    """git's own test (submodule-config.c): a URL or path starting with '-' would reach git as an option."""
    return value.startswith("-")


def url(loc: Locator, key: str, value: Any) -> str:
    text = string(loc, key, value)
    if looks_like_option(text):
        raise loc.error(key, f"'{text}' starts with '-' and would be read as a git option",
                        hint="give a URL (https://…, ssh://…) or a path; write ./-name for a folder named like an option")
    return text


def name(loc: Locator, key: str, value: str) -> str:
    if not NAME_RE.match(value):
        raise loc.error(key, f"'{value}' is not a valid name", hint="use letters, digits, '.', '_' and '-'")
    return value


def safe_relative(loc: Locator, key: str, value: str) -> str:
    parts = Path(value).parts
    if value.startswith("/") or ".." in parts:
        raise loc.error(key, f"'{value}' must be a relative path inside the tree", hint="remove '..' and leading '/'")
    return value.strip("/")
