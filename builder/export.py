"""Export the commits of a worktree back into patch files, in one canonical, deterministic form.

Canonical form is what `git format-patch` prints with every option that could vary pinned on the
command line (so neither the user's git config nor the clock changes a byte), the full blob ids
kept (so a later three-way merge finds its base), and the `Stackbuild-Patch:` trailer removed (it
only maps a commit back to its series entry). A file whose patch only moved (new line numbers,
new blob ids, same change) is left alone unless the caller asks to refresh the context: exports
create no churn.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import tomlkit

from . import sources
from .config import Config, ResolvedStack
from .errors import ExportError
from .fsutil import commit_files
from .git import TRAILER, git, out
from .patches import Patch, encode, encoding_of
from .replay import replay
from .series import inside_patch_dir, load_stack_patches, parse_series_text, series_fuzz
from .settings import Settings
from .sources import git_source
from .worktrees import rebase_state_path, state_dir_for

TRAILER_RE = re.compile(rf"^{TRAILER}: *(\S+)\s*$", re.M)

# Every config key that changes format-patch output is fixed here, whatever ~/.gitconfig says.
_CANON_CONFIG = (
    "core.quotePath=true", "diff.noprefix=false", "diff.mnemonicPrefix=false", "diff.relative=false",
    "diff.suppressBlankEmpty=false", "diff.algorithm=myers", "diff.indentHeuristic=true",
    "diff.interHunkContext=0", "diff.context=3", "format.signature=",
    "format.headers=", "format.numbered=false", "format.coverLetter=false", "format.from=false",
    "format.forceInBodyFrom=false", "format.encodeEmailHeaders=true", "format.suffix=.patch",
    "format.signOff=false", "format.attach=false", "format.thread=false", "format.notes=false",
    "i18n.logOutputEncoding=UTF-8", "color.ui=false",
)
_FORMAT_ARGS = (
    "format-patch", "--stdout", "--zero-commit", "--full-index", "--no-signature", "--no-stat",
    "--no-numbered", "--always", "--find-renames", "--no-color", "--no-ext-diff", "--no-textconv", "--binary",
    "--unified=3", f"-O{os.devnull}", "--no-notes", "--no-attach", "--no-thread", "--encode-email-headers",
)


# ---------------------------------------------------------------------------------------------
# canonical text


def canonical_patch(git_dir: Path, commit: str, *, directory: str = "", strip: int = 1) -> bytes:
    """The patch of one commit, in canonical form, trailer removed."""
    return canonical_range(git_dir, f"{commit}^", commit, directory=directory, strip=strip)[0]


MAIL_START = re.compile(rb"^From 0{40} Mon Sep 17 00:00:00 2001\n", re.M)


def canonical_range(git_dir: Path, base: str, head: str, *, directory: str = "", strip: int = 1) -> list[bytes]:
    """The patches of base..head (a linear history), oldest first, from one git process."""
    if strip not in (0, 1):
        raise ExportError(f"cannot export a series with strip={strip}", hint="use strip 0 or 1 for exported series")
    cfg: list[str] = []
    for item in _CANON_CONFIG:
        cfg += ["-c", item]
    args = list(_FORMAT_ARGS)
    if strip == 0:
        args.append("--no-prefix")
    if directory:
        args.append(f"--relative={directory}")
    raw = git([*cfg, *args, f"{base}..{head}"], git_dir=git_dir, error=ExportError).stdout
    starts = [m.start() for m in MAIL_START.finditer(raw)] + [len(raw)]
    # Mails in one stream are separated by an empty line (a diff line is never empty).
    mails = [raw[a:b] for a, b in zip(starts, starts[1:])]
    mails = [m[:-1] if i < len(mails) - 1 and m.endswith(b"\n\n") else m for i, m in enumerate(mails)]
    return [strip_trailer(m) for m in mails]


def strip_trailer(mail: bytes) -> bytes:
    cut = _diff_start(mail)
    head, diff = mail[:cut], mail[cut:]
    lines = [ln for ln in head.split(b"\n") if not ln.startswith(TRAILER.encode() + b":")]
    head = b"\n".join(lines).rstrip(b"\n") + b"\n\n"
    return head + diff


def _diff_start(mail: bytes) -> int:
    m = re.search(rb"^(diff --git |---\n)", mail, re.M)
    return m.start() if m else len(mail)


def normalized(patch: bytes) -> bytes:
    """What stays when only the place of the change moved: no line numbers, no blob ids."""
    cut = _diff_start(patch)
    body = []
    for line in patch[cut:].split(b"\n"):
        if line.startswith(b"index "):
            continue
        if line.startswith(b"@@ "):
            line = b"@@"
        body.append(line)
    return patch[:cut] + b"\n".join(body)


def plain_name(name: str) -> str:
    enc = encoding_of(name)
    base = name[: -len(enc) - 1] if enc else name
    return base if base.endswith((".patch", ".diff")) else base + ".patch"


# ---------------------------------------------------------------------------------------------
# stack.toml and series files


def move_pin(text: str, source: str, commit: str) -> str:
    """The new pin, every comment and the layout of stack.toml kept (tomlkit round trip)."""
    doc: dict[str, Any] = tomlkit.parse(text)
    try:
        table = doc["sources"][source]
        table["commit"]  # noqa: B018 - a KeyError here means the source is not pinned by commit
    except KeyError:
        raise ExportError(f"source '{source}' has no 'commit' pin to move", where=f"stack.toml (sources.{source})") from None
    table["commit"] = commit
    return tomlkit.dumps(doc)


def _entry_token(line: str) -> str | None:
    stripped = line.strip()
    if not stripped or stripped.startswith("#"):
        return None
    return stripped.split()[0]


def edit_series_file(text: str, names: Sequence[str], renames: Mapping[str, str]) -> str:
    """Keeps comments, options (-pN) and order; drops entries not in `names`, renames, appends."""
    wanted = list(names)
    kept: list[str] = []
    seen: set[str] = set()
    for line in text.splitlines(keepends=True):
        token = _entry_token(line)
        if token is None:
            kept.append(line)
            continue
        new = renames.get(token, token)
        if new not in wanted:
            continue
        seen.add(new)
        kept.append(line.replace(token, new, 1))
    if kept and not kept[-1].endswith("\n"):
        kept[-1] += "\n"
    kept += [f"{n}\n" for n in wanted if n not in seen]
    return "".join(kept)


def series_entries(text: str) -> list[str]:
    return [e.name for e in parse_series_text(text, "series")]


# ---------------------------------------------------------------------------------------------
# the export itself


@dataclass(frozen=True)
class SeriesSpec:
    """What export needs of one series: where its files are and how paths are written."""

    name: str
    patch_dir: Path
    directory: str = ""
    strip: int = 1
    inline: bool = False  # entries listed in stack.toml (`patches = [...]`), not in a series file
    remote: frozenset[str] = frozenset()  # entries fetched by URL: never written

    @property
    def series_file(self) -> Path:
        return self.patch_dir / "series"


@dataclass(frozen=True)
class FileChange:
    series: str
    name: str
    action: str  # unchanged | kept | rewritten | created | renamed | deleted
    path: str
    previous: str | None = None


@dataclass(frozen=True)
class ExportResult:
    source: str
    changes: tuple[FileChange, ...]
    pin: str | None = None
    stack_file_changed: bool = False
    series_files_changed: tuple[str, ...] = ()
    writes: Mapping[Path, bytes | None] = field(default_factory=dict, repr=False, compare=False)

    def to_json(self) -> dict:
        return {
            "source": self.source,
            "pin": self.pin,
            "stack_file_changed": self.stack_file_changed,
            "series_files_changed": list(self.series_files_changed),
            "patches": [c.__dict__ for c in self.changes],
        }


def commits_between(git_dir: Path, base: str, head: str) -> list[tuple[str, str]]:
    """(sha, message) of the first-parent commits base..head, oldest first."""
    raw = git(["log", "--first-parent", "--reverse", "--format=%H%x00%B%x00", f"{base}..{head}"], git_dir=git_dir,
              error=ExportError).stdout
    parts = raw.decode("utf-8", errors="replace").split("\x00")
    return [(parts[i].strip(), parts[i + 1]) for i in range(0, len(parts) - 1, 2)]


def _slug(message: str) -> str:
    subject = message.strip().splitlines()[0] if message.strip() else "patch"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", subject).strip("-.").lower()[:52] or "patch"


def plan_export(
    *,
    git_dir: Path,
    base: str,
    head: str,
    root: Path,
    stack_file: Path,
    source: str,
    series: Sequence[SeriesSpec],
    current: Mapping[tuple[str, str], bytes],
    pin_to: str | None = None,
    decode_all: bool = False,
    refresh_context: bool = False,
    prune: bool = True,
) -> ExportResult:
    """Computes every file export would write; writes nothing (see `apply_export`).

    `current` maps (series, entry name) to the entry's decoded patch bytes as they are now. An
    entry with no commit is dropped (file and series line) only with `prune`: a rebase drops
    patches on purpose, while a worktree that simply lacks them (a failed apply) must not.
    """
    by_name = {s.name: s for s in series}
    order = [s.name for s in series]
    assigned: dict[str, list[tuple[str, str]]] = {s: [] for s in order}  # series -> [(entry, sha)]
    last_series = order[0] if order else None
    position = 0
    for sha, message in commits_between(git_dir, base, head):
        m = TRAILER_RE.search(message)
        if m:
            ser, _, name = m.group(1).partition("/")
            if ser not in by_name or not name:
                raise ExportError(
                    f"commit {sha[:12]} carries '{TRAILER}: {m.group(1)}' but series '{ser}' is not one of "
                    f"{', '.join(order)}", where=str(git_dir), hint="fix the trailer with git commit --amend")
            if not inside_patch_dir(name):
                raise ExportError(
                    f"commit {sha[:12]} carries '{TRAILER}: {m.group(1)}': '{name}' is not a path inside the patch folder",
                    where=str(git_dir), hint="fix the trailer with git commit --amend (no '..', no leading '/')")
        else:
            if last_series is None:
                raise ExportError(f"commit {sha[:12]} has no series to go to", where=str(git_dir))
            ser = last_series
            taken = {n for n, _ in assigned[ser]} | {k[1] for k in current if k[0] == ser}
            name, i = f"{_slug(message)}.patch", 2
            while name in taken:
                name, i = f"{_slug(message)}-{i}.patch", i + 1
        if order.index(ser) < position:
            raise ExportError(
                f"commit {sha[:12]} belongs to series '{ser}' but comes after commits of a later series",
                where=str(git_dir), hint="reorder the commits so each series stays together, in stack order")
        position = order.index(ser)
        last_series = ser
        assigned[ser].append((name, sha))

    commits = [sha for ser in order for _, sha in assigned[ser]]
    fresh_by: dict[tuple[str, int], dict[str, bytes]] = {}
    for spec in series:
        key = (spec.directory, spec.strip)
        if key not in fresh_by and commits:
            mails = canonical_range(git_dir, base, head, directory=spec.directory, strip=spec.strip)
            if len(mails) != len(commits):
                raise ExportError(f"{base[:12]}..{head[:12]} is not a linear history of {len(commits)} commits",
                                  where=str(git_dir), hint="export needs one commit per patch: no merge commits")
            fresh_by[key] = dict(zip(commits, mails))

    writes: dict[Path, bytes | None] = {}
    changes: list[FileChange] = []
    series_changed: list[str] = []
    inline_names: dict[str, tuple[list[str], dict[str, str]]] = {}
    for spec in series:
        names: list[str] = []
        renames: dict[str, str] = {}
        for name, sha in assigned[spec.name]:
            enc = encoding_of(name)
            target_name = plain_name(name) if (decode_all and enc) else name
            target_enc = "" if target_name != name else enc
            fresh = fresh_by[(spec.directory, spec.strip)][sha]
            if not re.search(rb"^diff --git ", fresh, re.M):
                continue  # an empty commit carries no change: nothing to export
            names.append(target_name)
            old = current.get((spec.name, name))
            path = spec.patch_dir / target_name
            rel = os.path.relpath(path, root)
            if name in spec.remote:
                if old is None or normalized(old) != normalized(fresh):
                    raise ExportError(
                        f"remote patch {spec.name}/{name} changed; it cannot be written back to its URL",
                        hint=f"vendor it first: `stackbuild vendor {spec.name}` copies it into "
                             f"{os.path.relpath(spec.patch_dir, root)} as a local entry")
                changes.append(FileChange(spec.name, name, "kept", rel))
                continue
            if target_name != name:
                renames[name] = target_name
                writes[path] = fresh
                writes[spec.patch_dir / name] = None
                changes.append(FileChange(spec.name, target_name, "renamed", rel, previous=name))
                continue
            if old is None:
                writes[path] = encode(fresh, target_enc)
                changes.append(FileChange(spec.name, name, "created", rel))
            elif old == fresh or (not refresh_context and normalized(old) == normalized(fresh)):
                changes.append(FileChange(spec.name, name, "unchanged" if old == fresh else "kept", rel))
            else:
                writes[path] = encode(fresh, target_enc)
                changes.append(FileChange(spec.name, name, "rewritten", rel))
        gone = [n for (s, n) in current if s == spec.name and n not in {a for a, _ in assigned[spec.name]}]
        if gone and not prune:
            raise ExportError(
                f"{len(gone)} patches of series '{spec.name}' have no commit in {base[:12]}..{head[:12]}: "
                f"{', '.join(gone[:5])}", where=str(git_dir),
                hint="re-apply the stack so the worktree holds every patch, or pass --prune to drop them")
        for name in gone:
            if name not in spec.remote:
                writes[spec.patch_dir / name] = None
            changes.append(FileChange(spec.name, name, "deleted", os.path.relpath(spec.patch_dir / name, root)))
        if spec.inline:
            inline_names[spec.name] = (names, renames)
            continue
        before = spec.series_file.read_text(encoding="utf-8") if spec.series_file.is_file() else ""
        after = edit_series_file(before, names, renames)
        if series_entries(before) != series_entries(after) or not spec.series_file.is_file():
            writes[spec.series_file] = after.encode()
            series_changed.append(os.path.relpath(spec.series_file, root))

    text = stack_file.read_text(encoding="utf-8")
    new_text = move_pin(text, source, pin_to) if pin_to else text
    if inline_names:
        new_text = _edit_inline(new_text, inline_names)
    if new_text != text:
        writes[stack_file] = new_text.encode()
    return ExportResult(
        source=source, changes=tuple(changes), pin=pin_to, stack_file_changed=new_text != text,
        series_files_changed=tuple(series_changed), writes=writes,
    )


def _inline_entry(item) -> str:
    if isinstance(item, str):
        return str(item)
    return str(item.get("file") or item.get("name") or str(item.get("url", "")).rstrip("/").rsplit("/", 1)[-1])


def _edit_inline(text: str, edits: Mapping[str, tuple[list[str], dict[str, str]]]) -> str:
    """Drops, renames and appends entries of `patches = [...]` in place, keeping comments."""
    doc: dict[str, Any] = tomlkit.parse(text)
    for series, (names, renames) in edits.items():
        items = doc["series"][series]["patches"]
        present = set()
        for i in range(len(items) - 1, -1, -1):
            item = items[i]
            old = _inline_entry(item)
            new = renames.get(old, old)
            local = isinstance(item, str) or "file" in item
            if local and new not in names:
                del items[i]
                continue
            if new != old:
                if isinstance(item, str):
                    items[i] = new
                else:
                    item["file"] = new
            present.add(new)
        for name in names:
            if name not in present:
                items.append(name)
    return tomlkit.dumps(doc)


def apply_export(result: ExportResult) -> None:
    commit_files(result.writes)


def check_failure(results: Iterable[ExportResult]) -> ExportError | None:
    """The CI check: any file export would touch means the tree is not in canonical, current form."""
    bad = [f"{c.series}/{c.name} ({c.action})" for r in results for c in r.changes if c.action not in ("unchanged", "kept")]
    extra = [f for r in results for f in r.series_files_changed] + [
        "stack.toml" for r in results if r.stack_file_changed]
    if not bad and not extra:
        return None
    return ExportError(
        f"patch files are not the canonical export of the worktree: {', '.join(bad + extra)}",
        hint="run `stackbuild export STACK` and commit the result")


def series_specs(resolved: ResolvedStack, source: str, patches: Sequence[Patch]) -> tuple[SeriesSpec, ...]:
    return tuple(
        SeriesSpec(name=s.name, patch_dir=s.patch_dir, directory=s.directory, strip=s.strip, inline=s.inline is not None,
                   remote=frozenset(p.name for p in patches if p.series == s.name and p.url))
        for s in resolved.series_for(source))


def export_stack(settings: Settings, cfg: Config, stack: str, source: str | None = None, *, check: bool = False,
                 decode: bool = False, refresh_context: bool = False, prune: bool = False) -> tuple[ExportResult, ...]:
    """Patch files from the worktree's commits (or, with no worktree, from an in-memory apply)."""
    resolved = cfg.stack(stack)
    chosen = [git_source(cfg, resolved, source)] if source else [
        s for s in resolved.sources if resolved.series_for(s.name) and s.kind == "git"]
    loaded = load_stack_patches(settings, cfg, resolved)
    results = []
    for src in chosen:
        state = rebase_state_path(state_dir_for(settings.work_dir, stack), src.name)
        if state.exists():
            raise ExportError(f"a rebase of '{src.name}' is in progress", where=str(state),
                              hint="finish it (`stackbuild rebase --continue`) or `--abort` it first")
        repo = sources.sync(settings, src).git_dir
        patches = loaded.get(src.name, ())
        worktree = settings.work_dir / stack / src.name
        if (worktree / ".git").exists():
            repo = worktree / ".git"  # commits made there (by hand, or a resolution) live only there
            head = out(["rev-parse", "HEAD"], cwd=worktree, error=ExportError)
            if git(["merge-base", "--is-ancestor", str(src.commit), head], cwd=worktree, check=False).returncode:
                raise ExportError(f"the worktree is not based on the pin {str(src.commit)[:12]}", where=str(worktree),
                                  hint="re-apply the stack, or finish the rebase that moved it")
            dirty = out(["status", "--porcelain", "--untracked-files=no"], cwd=worktree, error=ExportError)
            if dirty:
                # Export reads commits: edits not committed would be missing from the files, and
                # --check would call them canonical.
                raise ExportError(f"the worktree has uncommitted changes ({len(dirty.splitlines())} files)",
                                  where=str(worktree), hint="commit them (git commit, amend or fixup), or stash them")
        else:
            head = replay(repo, str(src.commit), patches, fuzz_for=lambda p: series_fuzz(resolved, p)).head
        results.append(plan_export(
            git_dir=repo, base=str(src.commit), head=head, root=cfg.root, stack_file=cfg.path, source=src.name,
            series=series_specs(resolved, src.name, patches), current={(p.series, p.name): p.data for p in patches},
            decode_all=decode, refresh_context=refresh_context, prune=prune))
    if check:
        failure = check_failure(results)
        if failure:
            raise failure
        return tuple(results)
    for result in results:
        apply_export(result)
    return tuple(results)
