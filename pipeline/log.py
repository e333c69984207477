"""The lines a user reads while a run goes on: `say` one line, `step` a timed phase.

Each line is prefixed by what it is about (a task or a machine) and written with one write, so that under `doit -n 2`
another task's output never lands inside it.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator


def say(prefix: str, message: str) -> None:
    """One line of the run's log: `[prefix] message`."""
    sys.stdout.write(f"[{prefix}] {message}\n")
    sys.stdout.flush()


class Step:
    """A phase under way; `seconds` is its elapsed time so far (its duration once it ended)."""

    def __init__(self, prefix: str, what: str) -> None:
        self.prefix = prefix
        self.what = what
        self.started = time.monotonic()
        self.ended: float | None = None

    @property
    def seconds(self) -> float:
        return round((self.ended or time.monotonic()) - self.started, 1)


@contextlib.contextmanager
def step(prefix: str, what: str, *, announce: bool = True) -> Iterator[Step]:
    """Log `what …` when a phase starts and `what in N s` (or `what failed after N s`) when it ends.

    >>> with step("example", "nothing to do", announce=False) as s:  # doctest: +ELLIPSIS
    ...     pass
    [example] nothing to do in 0.0 s
    """
    current = Step(prefix, what)
    if announce:
        say(prefix, f"{what} …")
    try:
        yield current
    except BaseException:
        current.ended = time.monotonic()
        say(prefix, f"{what} failed after {current.seconds} s")
        raise
    current.ended = time.monotonic()
    say(prefix, f"{what} in {current.seconds} s")
