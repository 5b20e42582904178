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
