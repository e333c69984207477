"""The one way this project runs a program: an argument list, a deadline, its process group killed on the way out."""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import subprocess
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO

from pipeline.errors import CimError


class ProcessTimeout(CimError):
    """A program ran past its deadline and was killed with its process group."""

    def __init__(self, argv: Sequence[str], timeout: float, output: str) -> None:
        self.argv = list(argv)
        self.timeout = timeout
        self.output = output
        super().__init__(f"{argv[0]} did not finish within {timeout:g} s and was stopped")


_live: set[subprocess.Popen[bytes] | subprocess.Popen[str]] = set()
_live_lock = threading.Lock()


def track(proc: subprocess.Popen[bytes] | subprocess.Popen[str]) -> None:
    """Remember a started process group until `kill_group` ends it, so that `_kill_leftovers` can end it at exit.

    Tasks run in doit's worker threads (parallel by default), and doit's workers are daemon threads: on ^C only the
    main thread unwinds, so a worker's `with` block that would stop its QEMU or nix never finishes.  At interpreter
    exit every group still tracked is killed instead of being left running in its own session.
    """
    with _live_lock:
        _live.add(proc)


@atexit.register
def _kill_leftovers() -> None:
    with _live_lock:
        leftovers = list(_live)
    for proc in leftovers:
        kill_group(proc, grace=2.0)


def kill_group(proc: subprocess.Popen[bytes] | subprocess.Popen[str], grace: float = 5.0) -> None:
    """SIGTERM the process group, wait up to `grace` seconds, then SIGKILL it."""
    if proc.poll() is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # stragglers the leader left behind
        with _live_lock:
            _live.discard(proc)
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)
    with _live_lock:
        _live.discard(proc)


@contextlib.contextmanager
def spawn(
    argv: Sequence[str],
    *,
    stdout: IO[bytes] | int | None = subprocess.DEVNULL,
    stderr: IO[bytes] | int | None = subprocess.STDOUT,
    stdin: int | None = subprocess.DEVNULL,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """Start a long-lived program in its own session; its whole process group dies when the block ends."""
    proc = subprocess.Popen(
        list(argv), stdout=stdout, stderr=stderr, stdin=stdin, env=dict(env) if env else None, cwd=cwd,
        start_new_session=True,
    )
    track(proc)
    try:
        yield proc
    finally:
        kill_group(proc)


def run(
    argv: Sequence[str],
    *,
    timeout: float,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    input_text: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run to completion and capture stdout/stderr as text; raises ProcessTimeout past `timeout` seconds."""
    proc = subprocess.Popen(
        list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        stdin=subprocess.PIPE if input_text is not None else subprocess.DEVNULL,
        env=dict(env) if env else None, cwd=cwd, start_new_session=True,
    )
    track(proc)
    try:
        out, err = proc.communicate(input=input_text, timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, err = proc.communicate()
        raise ProcessTimeout(argv, timeout, (out or "") + (err or "")) from None
    finally:
        kill_group(proc)
    return subprocess.CompletedProcess(list(argv), proc.returncode, out, err)
