"""The version a git source is built as, since the tree a container gets has no `.git`.

setuptools-scm (vLLM's version source) reads the version from git metadata; `git archive` leaves
none, so without help a build dies at "unable to detect version". The version is derived on the
host from the pin, the same on every machine whose mirror holds the same tags:

- `version = "…"` in `[sources.NAME.build]`: that string, as given;
- a tag reachable from the pin (`git describe --tags`, tags named with a digit, as setuptools-scm
  matches them): the tag's version when the pin is the tagged commit, else the next version's dev
  release — `v1.2.0` + 3 commits → `1.2.1.dev3+g<sha12>`, `1.0rc1` + 3 → `1.0rc2.dev3+g<sha12>`,
  `1.0.post1` + 3 → `1.0.post2.dev3+g<sha12>` (setuptools-scm's guess-next-dev, with 12 hex
  digits of the pin so the string does not depend on the repository's size);
- no tag: `0.0.0+g<sha12>`.

The build gets it as SETUPTOOLS_SCM_PRETEND_VERSION_FOR_<DIST> and SETUPTOOLS_SCM_PRETEND_VERSION.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .config import Source
from .errors import SourceError
from .git import git
from .settings import Settings
from .sources import record_tags, tags_marker

# A public PEP 440 version; local parts come only from us (+g<sha12>).
PUBLIC_RE = re.compile(r"^(?P<release>\d+(?:\.\d+)*)(?:(?P<pre>a|b|rc)(?P<pre_n>\d+))?"
                       r"(?:\.post(?P<post>\d+))?(?:\.dev(?P<dev>\d+))?$")
VERSION_RE = re.compile(r"^\d+(?:\.\d+)*(?:(?:a|b|rc)\d+)?(?:\.post\d+)?(?:\.dev\d+)?(?:\+[a-z0-9]+(?:\.[a-z0-9]+)*)?$")
# setuptools-scm's default tag shapes: an optional `name-` prefix, an optional v.
TAG_RE = re.compile(r"^(?:[\w.-]+-)?[vV]?(?P<version>\d.*)$")
DESCRIBED_RE = re.compile(r"^(?P<tag>.+)-(?P<distance>\d+)-g[0-9a-f]+$")
PRETEND = "SETUPTOOLS_SCM_PRETEND_VERSION"


@dataclass(frozen=True)
class SourceVersion:
    value: str
    origin: str  # "stack.toml", "tag <name> + <n> commits", "untagged"

    def to_json(self) -> dict:
        return {"value": self.value, "origin": self.origin}


def check_version(value: str) -> str | None:
    """Why VALUE is not a version a wheel can carry, or None when it is one."""
    if not VERSION_RE.match(value):
        return f"'{value}' is not a PEP 440 version (like 1.2.3, 1.2.3.dev4+gabc123)"
    return None


def next_dev(tag_version: str, distance: int, sha12: str) -> str | None:
    """setuptools-scm's guess-next-dev for a tag DISTANCE commits back; None when the tag is not a
    public version (a dev release, a local part) we can count on from."""
    m = PUBLIC_RE.match(tag_version)
    if not m or m.group("dev") is not None:
        return None
    if distance == 0:
        return tag_version
    if m.group("post") is not None:
        base = f"{tag_version.rsplit('.post', 1)[0]}.post{int(m.group('post')) + 1}"
    elif m.group("pre") is not None:
        base = f"{m.group('release')}{m.group('pre')}{int(m.group('pre_n')) + 1}"
    else:
        parts = m.group("release").split(".")
        parts[-1] = str(int(parts[-1]) + 1)
        base = ".".join(parts)
    return f"{base}.dev{distance}+g{sha12}"


def derive(git_dir: Path, commit: str, *, source: str) -> SourceVersion:
    """The version of the pinned COMMIT from the tags the mirror holds (see the module doc)."""
    sha12 = commit[:12]
    # --always: an untagged pin prints its abbreviated SHA instead of failing; --long: a tagged one
    # always ends in -<distance>-g<sha>, so a tag name with dashes cannot be misread.
    described = git(["describe", "--tags", "--long", "--always", "--abbrev=12", "--match", "*[0-9]*", commit],
                    git_dir=git_dir, where=f"source {source}").stdout.decode().strip()
    m = DESCRIBED_RE.match(described)
    if not m:
        return SourceVersion(f"0.0.0+g{sha12}", "untagged")
    tag, distance = m.group("tag"), int(m.group("distance"))
    parsed = TAG_RE.match(tag)
    value = next_dev(parsed.group("version"), distance, sha12) if parsed else None
    if value is None:
        raise SourceError(f"the nearest tag of {sha12}, '{tag}', is not a release version to count from",
                          where=f"source {source}", hint=f'set version = "…" in [sources.{source}.build]')
    return SourceVersion(value, f"tag {tag} + {distance} commits")


def dist_env_name(dist: str) -> str:
    """setuptools-scm's spelling of a distribution in SETUPTOOLS_SCM_PRETEND_VERSION_FOR_<DIST>."""
    return re.sub(r"[-_.]+", "_", dist).upper()


def pretend_env(dist: str, version: SourceVersion) -> dict[str, str]:
    return {f"{PRETEND}_FOR_{dist_env_name(dist)}": version.value, PRETEND: version.value}


def for_source(settings: Settings, source: Source, git_dir: Path, commit: str, given: str | None, *,
               lookup: bool = True) -> SourceVersion | None:
    """GIVEN (`version` in stack.toml) wins; archives and sdists carry their own version (PKG-INFO)
    and get none; a git source's comes from its mirror's tags, listed once per pin. Without LOOKUP
    (planning offline) a pin whose tags were never listed has no version yet: None."""
    if given is not None:
        return SourceVersion(given, "stack.toml")
    if source.kind != "git":
        return None
    if not tags_marker(git_dir, commit).is_file():
        if not lookup:
            return None
        record_tags(settings, source, git_dir, commit)
    return derive(git_dir, commit, source=source.name)
