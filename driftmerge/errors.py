"""Errors a user can act on. The CLI prints their message on one line and exits with their code."""

from __future__ import annotations


class DriftmergeError(Exception):
    """Base class: a clear, one-line message about what is wrong and what to do."""

    exit_code = 1


class InputError(DriftmergeError):
    """A base, checkpoint, adapter or option that cannot be used as given."""

    exit_code = 3


class OutputError(DriftmergeError):
    """The output folder exists, lies inside an input, or cannot be written."""

    exit_code = 4


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none), for one-line errors."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
