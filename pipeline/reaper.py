"""Run nix so that nothing it starts outlives the run: `python -I -S reaper.py PARENT_PID -- nix ARGS…`.

Why nix needs more than the parent-death signal every other child gets (process.py): a sandboxed Nix build clones
its builder with CLONE_PARENT into new namespaces, and the builder calls setsid().  It is nix's child but in no
process group of ours, so when nix is SIGKILLed (by its death signal, after the pipeline itself was SIGKILLed) the
builder is re-parented to init and goes on building — measured here: a sleeping builder outlived a killed run by
minutes.  Nix kills its own builders only when it is allowed to stop (SIGTERM).

So this small process stands between the pipeline and nix:

* its parent-death signal is SIGTERM, and it is a *child subreaper* (PR_SET_CHILD_SUBREAPER): a builder whose nix
  died is re-parented to it instead of init;
* nix runs as its child (same process group, so the pipeline's group signals reach both) with a parent-death
  signal of SIGKILL;
* told to stop (SIGTERM, SIGINT or SIGHUP, or its parent died), it passes SIGTERM to nix, gives it NIX_GRACE
  seconds to kill its builders and remove its build directories, then SIGKILLs nix and every process that is left
  below it (a setsid'd builder with its group; a builder that is PID 1 of its namespace takes the namespace with
  it).  Further signals change nothing: a SIGKILLed multi-threaded parent sends the death signal once per thread
  the reaper is handed to on the way to init.  It always ends within NIX_GRACE + KILL_GRACE seconds, which stays
  under process.STOP_GRACE and its at-exit grace, so the pipeline's own SIGKILL of the group never comes first;
* when nix ends by itself it does the same sweep and ends with nix's status (exit code or signal);
* nix's scratch (TMPDIR: its build directories) is a directory of the reaper's own, `cim-nix-<random>` in the TMPDIR
  it was given, removed when it ends.  Nix 2.8 removes a build directory on SIGTERM while the dying builder still
  writes into it, fails ("cannot unlink …: Directory not empty", ignored) and leaves it — measured 3 of 3 times,
  x86_64 and aarch64 alike — and a SIGKILLed nix removes nothing.

tini and dumb-init (Debian packages) are subreapers too, but on exit they leave orphans outside the child's process
group running, which is exactly the builder's case; hence these few lines.  It imports only the standard library
and runs with `-I -S`, so it starts in a few milliseconds and needs no virtualenv.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import time

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
NIX_GRACE = 3.0  # seconds nix gets after SIGTERM to stop its builders itself (measured: 0.1 s idle, 1.2 s loaded)
KILL_GRACE = 0.5  # seconds the sweep of what is left may take
STOP = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
WATCHED = STOP | {signal.SIGCHLD}

_libc = ctypes.CDLL(None, use_errno=True)


def _prctl(option: int, value: int) -> None:
    if _libc.prctl(option, value, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}): {os.strerror(err)}")


def children() -> list[int]:
    """The PIDs whose parent is this process (nix, and builders re-parented here)."""
    me = os.getpid()
    # (open, not pathlib: the reaper imports as little as it can.)  Single-threaded, so the main thread's list is all
    # of its children (CONFIG_PROC_CHILDREN); else every process's parent is read.
    try:
        with open(f"/proc/{me}/task/{me}/children") as listing:
            return [int(pid) for pid in listing.read().split()]
    except FileNotFoundError:
        pass
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as stat:
                text = stat.read()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        if int(fields[1]) == me and fields[0] != "Z":
            found.append(int(name))
    return found


def _reap() -> dict[int, int]:
    """Collect every child that ended: pid → wait status."""
    ended: dict[int, int] = {}
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return ended
        if pid == 0:
            return ended
        ended[pid] = status


def sweep(deadline: float) -> dict[int, int]:
    """SIGKILL every process below this one (with its group, when it leads one) until none is left or `deadline`.

    Returns the wait status of each child collected on the way.
    """
    own_group = os.getpgid(0)
    ended: dict[int, int] = {}
    while time.monotonic() < deadline:
        ended.update(_reap())
        left = children()
        if not left:
            return ended
        for pid in left:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if os.getpgid(pid) == pid and pid != own_group:
                    os.killpg(pid, signal.SIGKILL)
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.01)
    ended.update(_reap())
    return ended


def _scratch() -> str | None:
    """A new private directory for nix's TMPDIR, `cim-nix-<random>` in the TMPDIR given (short: nix puts ssh sockets
    there), made as tempfile.mkdtemp would: mode 0700, a name nobody else holds (mkdir never follows a symlink).
    None when that TMPDIR takes no directory: nix then meets the same TMPDIR and says so in its own words."""
    base = os.environ.get("TMPDIR") or "/tmp"
    while True:
        path = os.path.join(base, f"cim-nix-{os.urandom(6).hex()}")
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            continue
        except OSError:
            return None
        return path


def _remove(path: str) -> None:
    try:
        os.rmdir(path)  # what nix cleaned up after itself: an empty directory
    except FileNotFoundError:
        pass
    except OSError:
        import shutil  # only when there is something left (start-up time)

        shutil.rmtree(path, ignore_errors=True)


def _start(argv: list[str]) -> int:
    pid = os.fork()
    if pid == 0:  # the child: nix
        try:
            _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            signal.pthread_sigmask(signal.SIG_SETMASK, set())
            signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # Python ignores it; nix should not
            os.execvp(argv[0], argv)
        except OSError as exc:
            os.write(2, f"cim reaper: cannot run {argv[0]}: {exc.strerror}\n".encode())
        os._exit(127)
    return pid


def _end_like(status: int) -> None:
    """Leave with nix's wait status: its exit code, or the signal that ended it."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {sig})
        os.kill(os.getpid(), sig)
        os._exit(128 + sig)
    os._exit(os.waitstatus_to_exitcode(status))


def main(args: list[str]) -> None:
    if len(args) < 3 or args[1] != "--":
        sys.stderr.write("usage: reaper.py PARENT_PID -- PROGRAM [ARGS…]\n")
        os._exit(2)
    parent = int(args[0])
    signal.pthread_sigmask(signal.SIG_BLOCK, WATCHED)  # taken with sigtimedwait below, never by a handler
    _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before the death signal was armed
        os._exit(128 + signal.SIGTERM)
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    scratch = _scratch()
    if scratch:
        os.environ["TMPDIR"] = scratch
    nix = _start(args[2:])
    status: int | None = None
    stop_at: float | None = None  # when nix's grace ends, once a stop was asked for
    while True:
        ended = _reap()
        if nix in ended:
            status = ended[nix]
            break
        if stop_at is not None and time.monotonic() >= stop_at:
            break
        wait = 0.5 if stop_at is None else max(0.0, stop_at - time.monotonic())
        info = signal.sigtimedwait(WATCHED, wait)
        if info is None or info.si_signo == signal.SIGCHLD or stop_at is not None:
            continue
        stop_at = time.monotonic() + NIX_GRACE
        with contextlib.suppress(ProcessLookupError):
            os.kill(nix, signal.SIGTERM)
    ended = sweep(time.monotonic() + KILL_GRACE)
    if scratch:
        _remove(scratch)
    if status is None:  # stopped before nix ended: end as nix did, or by the stop signal
        status = ended.get(nix, signal.SIGTERM)
    _end_like(status)


if __name__ == "__main__":
    main(sys.argv[1:])
