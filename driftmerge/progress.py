"""The progress callback every long job takes: ``progress(done, total, name)`` after each item."""

from collections.abc import Callable

Progress = Callable[[int, int, str], None]  # (done, total, tensor name or what was just finished)
