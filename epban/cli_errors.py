"""The error a command raises for a user's mistake; ``epban.cli.main`` prints it as one line and exits with status 2.

Kept apart from ``epban/cli.py`` so that the command modules (``epban.metric.cli``,
``epban.sr.cli``), which ``epban/cli.py`` imports, import nothing from it.
"""
from __future__ import annotations


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


def one_line(exc: BaseException, prefixes: tuple[str, ...] = ()) -> CLIError:
    """``exc`` as a ``CLIError`` of one line. An error raised in a DataLoader worker arrives
    wrapped in a traceback: its last line is the error. Any other message keeps all its lines
    (the first usually names the file), joined."""
    text = str(exc)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if "Traceback (most recent call last)" in text:
        lines = lines[-1:]
    message = " ".join(lines) if lines else type(exc).__name__
    for prefix in prefixes:
        if message.startswith(prefix):
            message = message[len(prefix):]
    return CLIError(message)
