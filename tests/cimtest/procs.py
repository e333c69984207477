"""pytest plugin: what processes a test started, and whether any of them outlived it.

`descendants(pid)` takes a snapshot of a process tree (pid → start time, so a reused PID is not mistaken for the
same process); `survivors()` says which of a snapshot are still running; `mentioning(tag)` finds QEMU and nix
processes whose command line names a test's private directory; `nix_build_dirs(drv)` what a nix left in TMPDIR.
`wait_for_output` waits for a line in a log a
background run writes.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

Snapshot = dict[int, str]  # pid -> start time (field 22 of /proc/PID/stat)


def _stat(pid: int) -> tuple[str, int, str] | None:
    """(state, ppid, start time) of a process, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], int(fields[1]), fields[19]


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def descendants(root: int) -> Snapshot:
    """Every live process below `root` (not `root` itself)."""
    children: dict[int, list[int]] = {}
    starts: dict[int, str] = {}
    for pid in _all_pids():
        stat = _stat(pid)
        if stat is None or stat[0] == "Z":
            continue
        children.setdefault(stat[1], []).append(pid)
        starts[pid] = stat[2]
    found: Snapshot = {}
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        found[pid] = starts[pid]
        todo.extend(children.get(pid, []))
    return found


def survivors(snapshot: Snapshot) -> dict[int, str]:
    """The processes of `snapshot` still running (zombies count as gone): pid → command line."""
    alive = {}
    for pid, start in snapshot.items():
        stat = _stat(pid)
        if stat is not None and stat[0] != "Z" and stat[2] == start:
            alive[pid] = cmdline(pid)
    return alive


def mentioning(tag: str) -> dict[int, str]:
    """Running qemu-system-* and nix processes whose command line contains `tag`."""
    found = {}
    for pid in _all_pids():
        line = cmdline(pid)
        program = os.path.basename(line.split(" ", 1)[0]) if line else ""
        stat = _stat(pid)
        if tag in line and (program.startswith("qemu-system") or program.startswith("nix")) and stat and stat[0] != "Z":
            found[pid] = line
    return found


def wait_gone(snapshot: Snapshot, tag: str, deadline: float) -> dict[int, str]:
    """Wait until no process of `snapshot` and no QEMU/nix naming `tag` runs, up to `deadline` s; what is left."""
    until = time.monotonic() + deadline
    while True:
        left = {**survivors(snapshot), **mentioning(tag)}
        if not left or time.monotonic() > until:
            return left
        time.sleep(0.1)


def nix_build_dirs(drv: str) -> list[Path]:
    """The build directories Nix left for the derivation `drv`: TMPDIR/nix-build-NAME.drv-N, or inside the scratch
    directory a reaper gives its nix (TMPDIR/cim-nix-*/)."""
    tmp = Path(os.environ.get("TMPDIR", "/tmp"))
    name = f"nix-build-{drv.split('-', 1)[1]}-*"
    found = list(tmp.glob(name))
    for scratch in tmp.glob("cim-nix-*"):
        # Another run's reaper may remove its scratch directory between the listing and this look inside it.
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            found += scratch.glob(name)
    return found


def wait_for_output(path: Path, pattern: str, deadline: float) -> re.Match[str]:
    """Wait until the file `path` contains `pattern` (a regex); AssertionError with the text past the deadline."""
    regex = re.compile(pattern, re.M)
    until = time.monotonic() + deadline
    while True:
        text = path.read_text(errors="replace") if path.exists() else ""
        match = regex.search(text)
        if match:
            return match
        if time.monotonic() > until:
            raise AssertionError(f"{path} did not show {pattern!r} within {deadline} s:\n{text[-3000:]}")
        time.sleep(0.1)


def wait_for(condition: Callable[[], object], what: str, deadline: float) -> None:
    """Wait until `condition()` is true; AssertionError naming `what` past the deadline."""
    until = time.monotonic() + deadline
    while not condition():
        if time.monotonic() > until:
            raise AssertionError(f"{what} did not happen within {deadline} s")
        time.sleep(0.1)
