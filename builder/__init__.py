"""stackbuild: patch stacks over pinned upstream sources, applied, built and smoke-served."""

__version__ = "0.1.0"
