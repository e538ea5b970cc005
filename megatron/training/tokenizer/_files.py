"""Checks on user-given tokenizer paths, so a typo fails early with the flag to fix."""

from __future__ import annotations

import os


class TokenizerFileError(FileNotFoundError, ValueError):
    """A tokenizer file or directory given on the command line is missing.

    Both a FileNotFoundError (it is about a path) and a ValueError (it is bad user input), so
    callers catching either see it.
    """


def require_file(path: str | os.PathLike | None, flag: str, what: str) -> str:
    """Return `path` as a string if it names an existing file, else raise naming `flag`."""
    if path is None or str(path) == "":
        raise ValueError(f"{flag} is required: the {what}")
    path = os.fspath(path)
    if os.path.isdir(path):
        raise TokenizerFileError(f"{flag} {path!r} is a directory, expected the {what} file")
    if not os.path.isfile(path):
        raise TokenizerFileError(f"{flag} {path!r}: {what} not found")
    return path


def require_dir(path: str | os.PathLike | None, flag: str, what: str) -> str:
    """Return `path` as a string if it names an existing directory, else raise naming `flag`."""
    if path is None or str(path) == "":
        raise ValueError(f"{flag} is required: the {what}")
    path = os.fspath(path)
    if not os.path.isdir(path):
        kind = "is a file, not a directory" if os.path.exists(path) else "not found"
        raise TokenizerFileError(f"{flag} {path!r}: {what} {kind}")
    return path
