"""The `stackbuild` console script: Ctrl-C is handled before the CLI's imports start.

Importing the CLI takes a few hundred milliseconds; an interrupt in that window would otherwise
print a traceback from whichever module was loading.
"""

from __future__ import annotations

import os
import signal

INTERRUPTED_LINE = b"stackbuild: interrupted error: interrupted (hint: nothing was started; run the command again)\n"


def _interrupted_while_loading(_signum: int, _frame: object) -> None:
    # Nothing has been touched yet, so there is nothing to clean up: leave at once.
    os.write(2, INTERRUPTED_LINE)
    os._exit(130)


# At import, not in main(): the console script imports this module first, so the handler is in
# place from the first line of stackbuild's own code (the interpreter's start is out of reach).
signal.signal(signal.SIGINT, _interrupted_while_loading)


def main() -> None:
    from .cli import main as cli

    signal.signal(signal.SIGINT, signal.default_int_handler)
    cli(prog_name="stackbuild")


if __name__ == "__main__":
    main()
