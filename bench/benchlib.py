"""What the benchmark scripts share: a doit run from the checkout that fails loudly, and which tasks it ran.

The scripts run as `python bench/NAME.py` (this directory is then on sys.path); importing this module also puts the
checkout on sys.path, so `pipeline` imports after it.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.process import run  # noqa: E402 - after the path set-up, so the scripts run from a checkout


class BenchError(Exception):
    """A measurement could not be taken (a doit run failed, a VM did not come up); the message says why."""


def doit(
    domain: Path, artifacts: Path, *args: str, timeout: float, env: Mapping[str, str] | None = None
) -> tuple[float, str]:
    """`doit ARGS domain=… artifacts=…` from the checkout; (wall seconds, stdout + stderr).  BenchError with the
    tail of its output when it fails."""
    argv = [sys.executable, "-m", "doit", *args, f"domain={domain}", f"artifacts={artifacts}"]
    started = time.monotonic()
    proc = run(argv, timeout=timeout, cwd=ROOT, env={**os.environ, **(env or {})})
    seconds = time.monotonic() - started
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        tail = "\n".join(output.splitlines()[-30:])
        raise BenchError(f"doit {' '.join(args)} failed (exit {proc.returncode}) after {seconds:.2f} s:\n{tail}")
    return seconds, output


def executed(output: str) -> list[str]:
    """The tasks doit ran ('.  name'), in order, not those it found up to date ('-- name').

    Searched anywhere in a line: under -n 2 doit's '.  boot:b' can land inside a line task a is printing.
    """
    return re.findall(r"\.  (\S+)$", output, re.M)
