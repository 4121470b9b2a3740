"""Do a precompiled wheel's compiled ops match the source built over it?

vLLM's python-only build copies the compiled extension (`vllm/_C.abi3.so`) out of a released
wheel and keeps the Python of the source being built. When the two were cut at different points,
the Python calls ops whose signature the binary does not have, and vLLM only finds out at the
first request (`_C::cpu_attn_reshape_and_cache() expected at most 6 argument(s) but received 9`):
`/health` already said 200.

Both sides write their op schemas down as text. The source registers every op with a schema
literal in its bindings (`ops.def("cpu_attn_reshape_and_cache(Tensor key, …) -> ()")` in
csrc/cpu/torch_bindings.cpp), and the compiler keeps those literals as NUL-terminated strings in
the binary, which is what torch parses when the library loads. Comparing the two sets needs no
torch, no container and no install: the wheel is read from the wheelhouse, the bindings from the
stack's applied tree, in memory. An op whose schema text differs is a mismatch; an op the source
registers and the binary lacks is named too (it may be behind an `#ifdef` of another ISA, so it is
reported, not failed on its own).
"""

from __future__ import annotations

import fnmatch
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .doctor import FAIL, OK, WARN, Check
from .errors import ConfigError

if TYPE_CHECKING:
    from .config import Config
    from .settings import Settings

# A schema: op name, its argument list, `->`, its returns (torch's function-schema grammar).
_SCHEMA = re.compile(r"^([A-Za-z_][A-Za-z0-9_.]*)\((.*)\)\s*->\s*(.+)$", re.S)
_BINARY_SCHEMA = re.compile(rb"(?<=\x00)([A-Za-z_][A-Za-z0-9_.]*\([\x20-\x7e]*\) -> [\x20-\x7e]+)(?=\x00)")
# `.def(` then one or more adjacent C++ string literals (the compiler concatenates them).
_DEF = re.compile(r"\.def\(\s*((?:\"(?:[^\"\\]|\\.)*\"\s*)+)")
_LITERAL = re.compile(r"\"((?:[^\"\\]|\\.)*)\"")
_LINE_COMMENT = re.compile(r"//[^\n]*")


def normalize(schema: str) -> str:
    """Whitespace as torch ignores it: literals split over lines must compare equal."""
    text = re.sub(r"\s+", " ", schema).strip()
    text = re.sub(r"\(\s+", "(", re.sub(r"\s+\)", ")", text))
    return re.sub(r"\s*->\s*", " -> ", re.sub(r"\s*,\s*", ", ", text))


def _split(schema: str) -> tuple[str, str] | None:
    m = _SCHEMA.match(schema)
    return (m.group(1), normalize(schema)) if m else None


def source_schemas(text: str) -> dict[str, str]:
    """Op name -> schema of every `.def("…")` with a schema literal in a C++ bindings file."""
    out: dict[str, str] = {}
    for m in _DEF.finditer(_LINE_COMMENT.sub("", text)):
        literal = "".join(bytes(p, "ascii", "backslashreplace").decode("unicode_escape")
                          for p in _LITERAL.findall(m.group(1)))
        parsed = _split(literal)
        if parsed:
            out[parsed[0]] = parsed[1]
    return out


def binary_schemas(data: bytes) -> dict[str, str]:
    """Op name -> schema of every schema string a compiled library carries."""
    out: dict[str, str] = {}
    for m in _BINARY_SCHEMA.finditer(data):
        parsed = _split(m.group(1).decode("ascii"))
        if parsed:
            out.setdefault(parsed[0], parsed[1])
    return out


@dataclass(frozen=True)
class Mismatch:
    op: str
    source: str
    binary: str | None   # None: the binary does not register the op


@dataclass(frozen=True)
class ProbeResult:
    wheel: str
    library: str
    checked: int                  # ops both sides register
    differ: tuple[Mismatch, ...]  # same op, another schema: the first call of it fails
    missing: tuple[Mismatch, ...]

    @property
    def ok(self) -> bool:
        return not self.differ


def compare(source: dict[str, str], binary: dict[str, str], wheel: str, library: str) -> ProbeResult:
    both = sorted(set(source) & set(binary))
    return ProbeResult(
        wheel=wheel, library=library, checked=len(both),
        differ=tuple(Mismatch(op, source[op], binary[op]) for op in both if source[op] != binary[op]),
        missing=tuple(Mismatch(op, source[op], None) for op in sorted(set(source) - set(binary))),
    )


def find_wheel(wheelhouse: Path | None, pattern: str, where: str) -> Path:
    if wheelhouse is None:
        raise ConfigError(f"the precompiled wheel {pattern} is looked up in the wheelhouse, and none is set",
                          where=where, hint="set [build] wheelhouse or STACKBUILD_WHEELHOUSE")
    found = sorted(p for p in wheelhouse.iterdir() if p.is_file() and fnmatch.fnmatch(p.name, pattern))
    if not found:
        raise ConfigError(f"no wheel matching {pattern} in {wheelhouse}", where=where,
                          hint=f"pip download --no-deps -d {wheelhouse} <the release>")
    return found[-1]


def read_library(wheel: Path, member: str, where: str) -> bytes:
    try:
        with zipfile.ZipFile(wheel) as zf:
            return zf.read(member)
    except KeyError:
        raise ConfigError(f"{wheel.name} has no {member}", where=where,
                          hint="name the compiled library the python-only build copies (e.g. vllm/_C.abi3.so)") from None
    except (OSError, zipfile.BadZipFile) as exc:
        raise ConfigError(f"cannot read {wheel}: {exc}", where=where) from None


def probe(wheel: Path, library: str, bindings: dict[str, str], where: str) -> ProbeResult:
    """BINDINGS: path -> text of the source's bindings files (its applied tree)."""
    source: dict[str, str] = {}
    for text in bindings.values():
        source.update(source_schemas(text))
    if not source:
        raise ConfigError(f"no op schema found in {', '.join(bindings)}", where=where,
                          hint="name the C++ file that registers the ops with ops.def(\"…\")")
    return compare(source, binary_schemas(read_library(wheel, library, where)), wheel.name, library)


def check_stack(settings: Settings, cfg: Config, stack_name: str) -> tuple[Check, ProbeResult] | None:
    """The doctor's check of a variant stack that names a precompiled wheel: the wheel's op schemas
    against the bindings of the stack's source with its patches applied (in memory), or None."""
    from . import apply
    from .recipes import stack_recipe
    from .git import git

    resolved = cfg.stack(stack_name)
    variant = resolved.variant
    if variant is None or variant.precompiled is None:
        return None
    pre = variant.precompiled
    where = cfg.where.at(f"variants.{variant.name}.precompiled")
    wheel = find_wheel(stack_recipe(cfg, resolved).wheelhouse, pre.wheel, where)
    applied = apply.materialize(settings, cfg, stack_name)[pre.source]
    bindings = {}
    for path in pre.bindings:
        shown = git(["show", f"{applied.commit}:{path}"], git_dir=applied.git_dir, check=False)
        if shown.returncode != 0:
            raise ConfigError(f"source '{pre.source}' has no {path}", where=where, hint="fix precompiled.bindings")
        bindings[path] = shown.stdout.decode("utf-8", "replace")
    result = probe(wheel, pre.library, bindings, where)
    name = f"precompiled ops ({stack_name})"
    head = f"{result.wheel} {result.library}: {result.checked} ops compared with {', '.join(pre.bindings)}"
    refused = [m for m in result.differ if m.op not in pre.accept]
    accepted = [m.op for m in result.differ if m.op in pre.accept]
    notes = ([f"accepted as differing: {', '.join(accepted)}"] if accepted else []) + \
            ([f"not in the wheel: {', '.join(m.op for m in result.missing)}"] if result.missing else [])
    if refused:
        first = refused[0]
        detail = (f"{head}; {len(refused)} differ, their first call fails: "
                  + ", ".join(m.op for m in refused)
                  + f" (source: {first.source}; wheel: {first.binary})")
        return Check(name, FAIL, "; ".join([detail, *notes]), True), result
    return Check(name, WARN if result.missing else OK, "; ".join([head + ", all match", *notes]), True), result
