"""What running nix under pipeline/reaper.py costs per call: `nix --version` through process.run (reaper) against the
same call through setpriv (what every other program gets) and against subprocess.run with no death signal at all.

    .venv/bin/python bench/reaper.py [--calls 40]

It prints the mean milliseconds per call for each way, the ratios, and the extra cost in ms; a default demo run makes
16 nix calls (measured with a logging PATH wrapper), each an evaluation or build of 50 ms to tens of seconds.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline import process  # noqa: E402 - after the path set-up, so the script runs from a checkout


def mean_ms(call: Callable[[], object], calls: int) -> float:
    call()  # warm-up: page cache, nix's own start-up files
    started = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - started) / calls * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=40)
    args = parser.parse_args()
    nix = shutil.which("nix")
    setpriv = shutil.which(process.SETPRIV)
    if nix is None or setpriv is None:
        sys.exit("bench/reaper.py needs nix and setpriv (scripts/setup.sh installs both)")
    argv = [nix, "--version"]
    ways = {
        "reaper": lambda: process.run(argv, timeout=60),
        "setpriv": lambda: subprocess.run(
            [setpriv, "--pdeathsig", "KILL", "--", *argv],
            capture_output=True,
            timeout=60,
            check=True,
            start_new_session=True,
        ),
        "bare": lambda: subprocess.run(argv, capture_output=True, timeout=60, check=True, start_new_session=True),
    }
    print(f"load average {os.getloadavg()[0]:.2f}; mean of {args.calls} calls after one warm-up")
    times = {name: mean_ms(call, args.calls) for name, call in ways.items()}
    for name, ms in times.items():
        print(f"{name:8} {ms:7.1f} ms per `nix --version`")
    print(
        f"reaper/setpriv {times['reaper'] / times['setpriv']:.2f}x  "
        f"reaper/bare {times['reaper'] / times['bare']:.2f}x  "
        f"extra {times['reaper'] - times['setpriv']:.1f} ms per nix call"
    )


if __name__ == "__main__":
    main()
