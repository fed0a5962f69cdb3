"""The error a command raises for a user's mistake; ``epban.cli.main`` prints it as one line and exits with status 2.

Kept apart from ``epban/cli.py`` so that the command modules (``epban.metric.cli``,
``epban.sr.cli``), which ``epban/cli.py`` imports, import nothing from it.
"""
from __future__ import annotations


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


def one_line(exc: BaseException, prefixes: tuple[str, ...] = ()) -> CLIError:
    """``exc`` as a ``CLIError`` of one line: the last line of its message (an error raised in
    a DataLoader worker arrives wrapped in a traceback), without a leading ``prefixes`` entry."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    message = lines[-1] if lines else type(exc).__name__
    for prefix in prefixes:
        if message.startswith(prefix):
            message = message[len(prefix):]
    return CLIError(message)
