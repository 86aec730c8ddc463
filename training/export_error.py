"""The error every export step raises for a user-facing failure (`mmserve export` prints it as one line)."""
from __future__ import annotations


class ExportError(RuntimeError):
    """A user-facing export failure (printed as one line, exit status 1)."""
