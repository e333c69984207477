"""The one way this project runs a program: an argument list, a deadline, its process group killed on the way out."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
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


def kill_group(proc: subprocess.Popen[bytes] | subprocess.Popen[str], grace: float = 5.0) -> None:
    """SIGTERM the process group, wait up to `grace` seconds, then SIGKILL it."""
    if proc.poll() is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # stragglers the leader left behind
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)


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
    try:
        out, err = proc.communicate(input=input_text, timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, err = proc.communicate()
        raise ProcessTimeout(argv, timeout, (out or "") + (err or "")) from None
    finally:
        kill_group(proc)
    return subprocess.CompletedProcess(list(argv), proc.returncode, out, err)
