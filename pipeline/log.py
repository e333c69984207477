"""The lines a user reads while a run goes on: `say` one line, `step` a timed phase, `progress` a long wait.

Each line is prefixed by what it is about (a task or a machine) and written with one write, so that under `doit -n 2`
another task's output never lands inside it.

A wait that may last more than a few seconds (a VM's console, a power-off, a build) runs inside `progress()`, so that
it shows it is alive.  One ticker thread draws every wait under way: on a terminal as one live line redrawn in place
(phase, elapsed / deadline, the last console line); anywhere else (CI, a pipe) as a plain line per wait every
PLAIN_EVERY seconds.  `CIM_PROGRESS=live|plain` overrides the choice.  Progress goes to the process's stdout only,
never into a console log or any other file the pipeline writes.

`CIM_DEBUG=1` also shows every command the pipeline runs, as it starts it (`[debug] $ argv…  (in cwd)`).
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

PLAIN_EVERY = 10.0  # seconds between two plain progress lines of one wait
LIVE_EVERY = 0.5  # seconds between two redraws of the live line (and two looks at what is due)
_ESCAPES = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-_]|[\x00-\x1f\x7f]")

_lock = threading.RLock()  # one writer at a time: say, the ticker, the end of a wait
_waits: dict[int, Wait] = {}
# When each prefix's next plain line is due.  Back-to-back waits of one machine (prompt, installer, power-off) share
# it, so a phase made of several short waits still shows a line every PLAIN_EVERY seconds.
_next_plain: dict[str, float] = {}
_ticker: threading.Thread | None = None
_live_shown = False


def _stream() -> TextIO:
    """The process's own stdout: under doit, sys.stdout is a tee into the task's captured output."""
    return sys.__stdout__ or sys.stdout


def _clear_live() -> None:
    global _live_shown
    if _live_shown:
        _stream().write("\r\x1b[K")
        _stream().flush()
        _live_shown = False


def say(prefix: str, message: str) -> None:
    """One line of the run's log: `[prefix] message`."""
    with _lock:
        _clear_live()  # the live line is redrawn below it at the next tick
        # Under doit's thread pool, sys.stdout is a tee that wraps whatever sys.stdout was when each action started,
        # and actions overlap: the tees nest one inside another, and 10,000 eval actions nest them deeper than
        # Python's recursion limit.  The tasks print their output as it comes (verbosity 2), so the lines go straight
        # to the process's stdout.
        out = _stream() if type(sys.stdout).__module__.startswith("doit") else sys.stdout
        out.write(f"[{prefix}] {message}\n")
        out.flush()


def debugging() -> bool:
    """CIM_DEBUG set (to anything but 0): show the commands the pipeline runs."""
    return os.environ.get("CIM_DEBUG", "").strip() not in ("", "0")


def show_command(argv: Sequence[str], cwd: Path | str | None = None) -> None:
    """Under CIM_DEBUG, one line naming a command about to start, copy-pasteable into a shell, and where it runs."""
    if debugging():
        say("debug", f"$ {shlex.join(argv)}  (in {cwd or os.getcwd()})")


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


# -- progress ---------------------------------------------------------------------------------------------------------


def printable(text: str) -> str:
    """`text` without terminal escape sequences or control characters (a guest's console is full of them)."""
    return _ESCAPES.sub("", text).strip()


def live() -> bool:
    """A live line (a terminal) or plain lines (CI, a pipe)?  CIM_PROGRESS=live|plain decides when set."""
    mode = os.environ.get("CIM_PROGRESS", "")
    if mode in ("live", "plain"):
        return mode == "live"
    try:
        return _stream().isatty()
    except (AttributeError, ValueError):
        return False


def last_line_of(path: Path) -> str:
    """The last non-empty line of a file another process is writing (a console log, a build log), read from its
    end: safe to call from the progress thread, "" while there is none."""
    try:
        with path.open("rb") as f:
            f.seek(max(0, path.stat().st_size - 2048))
            tail = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    lines = [line for line in tail.replace("\r", "\n").splitlines() if printable(line)]
    return lines[-1] if lines else ""


@dataclass
class Wait:
    """One wait under way; its `phase` may change while it runs."""

    prefix: str
    phase: str
    deadline_s: float | None = None
    last_line: Callable[[], str] | None = None  # e.g. the VM's last console line
    started: float = field(default_factory=time.monotonic)
    next_plain: float = 0.0

    def __post_init__(self) -> None:
        due = _next_plain.get(self.prefix)
        follows = due is not None and due >= self.started - PLAIN_EVERY  # a wait of this prefix just ended
        self.next_plain = due if follows and due is not None else self.started + PLAIN_EVERY

    def describe(self) -> str:
        """`[prefix] phase: 12 s / 300 s — last console line`."""
        elapsed = time.monotonic() - self.started
        budget = f"{elapsed:.0f} s / {self.deadline_s:.0f} s" if self.deadline_s else f"{elapsed:.0f} s"
        text = f"[{self.prefix}] {self.phase}: {budget}"
        last = ""
        if self.last_line is not None:
            with contextlib.suppress(OSError):
                last = printable(self.last_line())
        return f"{text} — {last}" if last else text


def _tick() -> None:
    global _ticker, _live_shown
    is_live = live()
    while True:
        time.sleep(LIVE_EVERY)  # plain lines, too, are due on this beat
        with _lock:
            if not _waits:
                _clear_live()
                _ticker = None
                return
            stream = _stream()
            if is_live:
                width = max(20, shutil.get_terminal_size((100, 24)).columns - 1)
                line = "  ·  ".join(wait.describe() for wait in _waits.values())
                stream.write("\r\x1b[K" + line[:width])
                _live_shown = True
            else:
                now = time.monotonic()
                for wait in _waits.values():
                    if now >= wait.next_plain:
                        stream.write(wait.describe() + "\n")
                        wait.next_plain += PLAIN_EVERY
            stream.flush()


@contextlib.contextmanager
def progress(
    prefix: str, phase: str, deadline_s: float | None = None, last_line: Callable[[], str] | None = None
) -> Iterator[Wait]:
    """Show that the wait inside the block is alive (see the module's doc); yields the Wait (its phase may change)."""
    global _ticker
    with _lock:
        wait = Wait(prefix, phase, deadline_s, last_line)
        _waits[id(wait)] = wait
        if _ticker is None:
            _ticker = threading.Thread(target=_tick, name="cim-progress", daemon=True)
            _ticker.start()
    try:
        yield wait
    finally:
        with _lock:
            _waits.pop(id(wait), None)
            _next_plain[wait.prefix] = wait.next_plain
            _clear_live()
