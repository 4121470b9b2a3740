"""The one error hierarchy of stackbuild.

Every error renders as one line: what is wrong, where (file:line or TOML key), what to do.
Each class has its own exit code so scripts can tell failures apart without parsing text.
"""

from __future__ import annotations

import re
from typing import Any

# The user-info of a URL (`https://user:token@host`, `https://token@host`): a secret wherever
# it is printed or recorded. A bare ssh user (`ssh://git@host`) names no secret and is kept.
_USERINFO_RE = re.compile(r"\b([A-Za-z][A-Za-z0-9+.-]*://)([^/@\s]+)@")
REDACTED = "<redacted>"


def redact_credentials(text: str) -> str:
    def hide(m: re.Match) -> str:
        scheme, info = m.group(1), m.group(2)
        keep = ":" not in info and not scheme.lower().startswith("http")
        return m.group(0) if keep else f"{scheme}{REDACTED}@"

    return _USERINFO_RE.sub(hide, text)


def redact_tree(value: Any) -> Any:
    """REDACT_CREDENTIALS over every string of a JSON-like value (a manifest, a plan)."""
    if isinstance(value, str):
        return redact_credentials(value)
    if isinstance(value, dict):
        return {k: redact_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_tree(v) for v in value]
    return value


class StackbuildError(Exception):
    exit_code = 1
    kind = "error"

    def __init__(self, message: str, *, where: str | None = None, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.where = where
        self.hint = hint

    def __str__(self) -> str:
        text = f"{self.where}: {self.message}" if self.where else self.message
        if self.hint:
            text += f" (hint: {self.hint})"
        return redact_credentials(text)

    def to_json(self) -> dict:
        return redact_tree({
            "error": self.kind,
            "message": self.message,
            "where": self.where,
            "hint": self.hint,
            "exit_code": self.exit_code,
        })


class ConfigError(StackbuildError):
    """stack.toml, a user config file or an environment setting is invalid."""

    exit_code = 2
    kind = "config"


class SeriesError(StackbuildError):
    """A series file is malformed or names a missing patch."""

    exit_code = 3
    kind = "series"


class PatchError(StackbuildError):
    """A patch file cannot be read, decoded, verified or parsed, or is unsafe."""

    exit_code = 4
    kind = "patch"


class SourceError(StackbuildError):
    """A source cannot be fetched, its pin is missing, or its archive does not verify."""

    exit_code = 5
    kind = "source"


class ApplyError(StackbuildError):
    """A patch does not apply (conflict, refused fuzz) or a worktree is not in a state to apply."""

    exit_code = 6
    kind = "apply"


class LockError(StackbuildError):
    """Another stackbuild process holds the work directory."""

    exit_code = 7
    kind = "lock"


class RebaseError(StackbuildError):
    """A rebase stopped (conflict) or was asked to do something its state does not allow."""

    exit_code = 8
    kind = "rebase"


class ExportError(StackbuildError):
    """Exported patches differ from the files on disk (export --check) or cannot be written."""

    exit_code = 9
    kind = "export"


class BuildError(StackbuildError):
    """A container build failed or its inputs are missing."""

    exit_code = 10
    kind = "build"


class EngineError(StackbuildError):
    """A Docker Engine is unreachable or refused a request."""

    exit_code = 11
    kind = "engine"


class VerifyError(StackbuildError):
    """A dist/ manifest does not match the files beside it."""

    exit_code = 12
    kind = "verify"


class SmokeError(StackbuildError):
    """The served stack failed a check, a gate, or never became ready."""

    exit_code = 13
    kind = "smoke"


class DoctorError(StackbuildError):
    """A required host check failed."""

    exit_code = 14
    kind = "doctor"


class SetupError(StackbuildError):
    """`stackbuild setup` could not make the host ready (engine, packages, base image)."""

    exit_code = 16
    kind = "setup"


class Interrupted(StackbuildError):
    """Ctrl-C: the operation stopped and its previous state was kept."""

    exit_code = 130
    kind = "interrupted"


class FileError(StackbuildError):
    """A file or folder cannot be read or written: permissions, a read-only or full disk, a file in the way."""

    exit_code = 15
    kind = "file"


def _os_hint(exc: OSError, path: str) -> str:
    import errno

    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"the disk holding {path} is full; free space and run the command again"
    if exc.errno == errno.EROFS:
        return ("the file system is read-only; point STACKBUILD_CACHE or --work-dir at a writable folder")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"check the permissions of {path} (and its folders), or use another STACKBUILD_CACHE / --work-dir"
    if exc.errno in (errno.ENOTDIR, errno.EEXIST, errno.EISDIR):
        return f"something of the wrong kind (a file where a folder belongs, or the reverse) is at {path}; move it away"
    if exc.errno in (errno.ENAMETOOLONG, errno.EINVAL, errno.EILSEQ):
        return "the path is not valid on this file system; shorten or rename it"
    if exc.errno == errno.ENOENT:
        return f"{path} or one of its folders is missing; create it or fix the setting naming it"
    return "check the path, its permissions and the free disk space"


def os_error(exc: OSError, path: object | None, doing: str, error: type[StackbuildError] = FileError) -> StackbuildError:
    """One line for an OSError: what failed, on which path, and what to do about that errno."""
    where = str(path if path is not None else exc.filename)
    return error(f"cannot {doing}: {exc.strerror or exc}", where=where, hint=_os_hint(exc, where))
