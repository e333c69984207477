"""One run at a time per artifacts directory, and one domain per artifacts directory.

A run that executes tasks (`doit`, `doit run …`, `forget`, `ignore`, …; not `list`, `info` or `help`) takes an
exclusive `flock` on `.cim/locks/artifacts-<hash of the directory>.lock` before doit opens its state, and keeps it
until the process ends (the kernel drops it even on SIGKILL).  Since a run's state is keyed by its domain and its
artifacts directory, that is also one run per state: a second run of the same domain waits for the first — saying so,
with the other run's PID — and then finds what the first did up to date, so a VM is never booted twice for one image.
With `wait=no` (or CIM_WAIT=no) it refuses at once instead; `wait=SECONDS` bounds the wait (default six hours).

An artifacts directory holds one domain's release: its `manifest.json` names the domain directory.  A run of another
domain into it is refused with a message saying which domain owns it and how to choose another directory, rather
than the two taking turns overwriting one manifest and each other's same-named images.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from pipeline import process
from pipeline.artifacts import MANIFEST, Manifest
from pipeline.errors import CimError
from pipeline.hashing import xxh3_text
from pipeline.log import say
from pipeline.paths import state_root

DEFAULT_WAIT = 6 * 3600.0
POLL = 0.5
INTRODUCTION = 2.0  # seconds a lock's new holder gets to write who it is, between its flock and its write


class RunLockError(CimError):
    """Another run holds the artifacts directory, or it belongs to another domain."""


def parse_wait(value: str | None) -> float:
    """`wait=` / CIM_WAIT: "no" or "0" refuses at once, a number of seconds bounds the wait; default six hours."""
    if value is None or value.strip() == "":
        return DEFAULT_WAIT
    text = value.strip().lower()
    if text in {"no", "false", "0"}:
        return 0.0
    if text in {"yes", "true"}:
        return DEFAULT_WAIT
    try:
        seconds = float(text)
    except ValueError:
        raise RunLockError(
            f"wait={value!r} is neither 'no' nor a number of seconds.",
            hint="Use wait=no to refuse when another run is busy, or wait=SECONDS.",
        ) from None
    if seconds < 0:
        raise RunLockError(f"wait={value!r} is negative.", hint="Use wait=no or a number of seconds >= 0.")
    return seconds


def lock_path(root: Path, artifacts_dir: Path) -> Path:
    artifacts_dir = artifacts_dir.resolve()
    return state_root(root) / "locks" / f"artifacts-{artifacts_dir.name}-{xxh3_text(str(artifacts_dir))[:12]}.lock"


@dataclass(frozen=True)
class Holder:
    """Who holds a lock, as it wrote itself into the lock file."""

    pid: int
    domain_dir: str
    started: str

    def describe(self) -> str:
        return f"run {self.pid} (domain {self.domain_dir}, started {self.started})"


def _holder(handle: IO[str]) -> Holder | None:
    handle.seek(0)
    try:
        data: Any = json.loads(handle.read() or "null")
        return Holder(int(data["pid"]), str(data["domain_dir"]), str(data["started"]))
    except (ValueError, KeyError, TypeError):
        return None  # being written, or never written


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def current_holder(handle: IO[str], within: float = INTRODUCTION) -> Holder | None:
    """Who holds the lock now, waiting up to `within` seconds for a new holder to write itself in: between its flock
    and its write, the file is empty or still names the previous (ended) run."""
    until = time.monotonic() + within
    while True:
        holder = _holder(handle)
        if holder is not None and _alive(holder.pid):
            return holder
        if time.monotonic() >= until:
            return None
        time.sleep(0.05)


def owner_of(artifacts_dir: Path) -> str | None:
    """The domain directory whose release `artifacts_dir` holds (from its manifest), or None when unclaimed."""
    try:
        return Manifest.model_validate_json((artifacts_dir / MANIFEST).read_bytes()).domain_dir
    except (OSError, ValueError):
        return None


def _refuse_foreign(artifacts_dir: Path, domain_dir: Path, owner: str) -> RunLockError:
    return RunLockError(
        f"{artifacts_dir} holds the release of another domain ({owner}); this run is for {domain_dir}, and one "
        f"artifacts directory holds one domain's images and manifest (both domains can have an image named "
        f"vhost-dev-iso).",
        hint=f"Give this domain a directory of its own (`doit domain={domain_dir} artifacts=DIR`, or CIM_ARTIFACTS), "
        f"or, to hand {artifacts_dir} over, remove its {MANIFEST} first.",
    )


class RunLock:
    """The artifacts directory's run lock, held from `acquire()` until the process ends (or `release()`)."""

    def __init__(self, root: Path, domain_dir: Path, artifacts_dir: Path) -> None:
        self.path = lock_path(root, artifacts_dir)
        self.domain_dir = domain_dir.resolve()
        self.artifacts_dir = artifacts_dir
        self._handle: IO[str] | None = None

    def acquire(self, wait: float) -> None:
        """Take the lock, waiting up to `wait` seconds for a run of the same domain; RunLockError if not."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = self.path.open("a+")
        try:
            self._take(handle, wait)
        except BaseException:
            handle.close()
            raise
        handle.seek(0)  # who holds it, first: a run waiting for this one names it (see current_holder)
        handle.truncate()
        handle.write(
            json.dumps(
                {
                    "pid": os.getpid(),
                    "domain_dir": str(self.domain_dir),
                    "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                }
            )
        )
        handle.flush()
        owner = owner_of(self.artifacts_dir)
        if owner is not None and Path(owner).resolve() != self.domain_dir:
            handle.close()
            raise _refuse_foreign(self.artifacts_dir, self.domain_dir, owner)
        self._handle = handle

    def _take(self, handle: IO[str], wait: float) -> None:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        holder = current_holder(handle)
        who = holder.describe() if holder else "another run"
        if holder is not None and Path(holder.domain_dir).resolve() != self.domain_dir:
            raise _refuse_foreign(self.artifacts_dir, self.domain_dir, holder.domain_dir)
        if wait <= 0:
            raise RunLockError(
                f"{who} is using {self.artifacts_dir} and its state; wait=no, so this run stops.",
                hint="Run again when it has finished, or leave out wait=no to wait for it.",
            )
        say(
            "cim",
            f"waiting for {who} to finish with {self.artifacts_dir} (lock {self.path}; at most {wait:g} s; "
            "wait=no refuses instead) …",
        )
        started = time.monotonic()
        deadline = started + wait
        while True:
            process.check_interrupted()
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                say("cim", f"{who} finished; going on after {time.monotonic() - started:.1f} s")
                return
            except BlockingIOError:
                pass
            if time.monotonic() > deadline:
                raise RunLockError(
                    f"{who} still holds {self.artifacts_dir} after {wait:g} s.",
                    hint=f"Check that process (`ps -p {holder.pid if holder else '…'}`), or raise wait=SECONDS.",
                )
            time.sleep(POLL)

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()  # closing the descriptor drops the flock
            self._handle = None
