"""The error a command raises for a user's mistake; ``epban.cli.main`` prints it as one line and exits with status 2.

Kept apart from ``epban/cli.py`` so that the command modules (``epban.metric.cli``,
``epban.sr.cli``), which ``epban/cli.py`` imports, import nothing from it.
"""
from __future__ import annotations

import re


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


# "module.ErrorName: " at the start of a traceback's last line
_EXCEPTION_NAME = re.compile(r"^(?:\w+\.)*\w*(?:Error|Exception): ")


def one_line(exc: BaseException) -> CLIError:
    """``exc`` as a ``CLIError`` of one line. An error raised in a DataLoader worker arrives
    wrapped in a traceback: its last line, without the exception's name, is the error. Any other
    message keeps all its lines (the first usually names the file), joined."""
    text = str(exc)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if "Traceback (most recent call last)" in text:
        lines = [_EXCEPTION_NAME.sub("", lines[-1], count=1)]
    return CLIError(" ".join(lines) if lines else type(exc).__name__)
