"""The one error hierarchy of stackbuild.

Every error renders as one line: what is wrong, where (file:line or TOML key), what to do.
Each class has its own exit code so scripts can tell failures apart without parsing text.
"""

from __future__ import annotations


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
        return text

    def to_json(self) -> dict:
        return {
            "error": self.kind,
            "message": self.message,
            "where": self.where,
            "hint": self.hint,
            "exit_code": self.exit_code,
        }


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

    exit_code = 15
    kind = "setup"


class Interrupted(StackbuildError):
    """Ctrl-C: the operation stopped and its previous state was kept."""

    exit_code = 130
    kind = "interrupted"
