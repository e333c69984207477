"""The one way this project runs a program: an argument list, a deadline, its process group killed on the way out.

Every child starts in a session of its own (so a signal to it reaches everything it started) and, through util-linux
`setpriv --pdeathsig KILL`, with the kernel's parent-death signal: if the pipeline itself is killed — even by
SIGKILL, which runs no cleanup — the kernel kills its QEMU and nix children.  (`preexec_fn` could set the same with
prctl, but it is unsafe in a threaded program such as `doit -n`; the death signal fires when the *thread* that started
the child exits, which is why a child is used only by the thread that started it.)

nix is started through `pipeline/reaper.py` instead: its sandboxed builders leave nix's process group and would
outlive a SIGKILLed nix; the reaper (a child subreaper) lets nix stop them and kills whatever is left.

Every live child is in a registry.  `stop_on_signals()` (called once by dodo.py, in the main thread) makes SIGINT,
SIGTERM and SIGHUP end a run alike: refuse new children, stop every registered process group (SIGTERM, then SIGKILL),
give the threads whose children died a moment to keep their console logs and records, then exit 128+signal.  That
also holds under `doit -n`, whose worker threads never see a KeyboardInterrupt.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, TypedDict, Unpack

from pipeline.errors import CimError
from pipeline.log import show_command

SETPRIV = "setpriv"  # util-linux; present wherever Debian's or Ubuntu's base system is
REAPER = [sys.executable, "-I", "-S", str(Path(__file__).with_name("reaper.py"))]  # then: PARENT_PID -- PROGRAM …
STOP_GRACE = 5.0  # seconds a stopped process group gets between SIGTERM and SIGKILL
CLEANUP_GRACE = 15.0  # seconds the threads of an interrupted run get to keep their logs and records
EXIT_GRACE = 5.0  # seconds doit gets after that to save its state before the process ends regardless
LEFTOVER_GRACE = 4.0  # seconds a child still registered at interpreter exit gets (more than a reaper needs)

_lock = threading.RLock()  # re-entrant: the signal handler runs in the main thread, which may hold it
_children: dict[int, subprocess.Popen[Any]] = {}
_reapers: set[int] = set()  # the registered children that are reapers (they stop their group's nix themselves)


@atexit.register
def _kill_leftovers() -> None:
    """At interpreter exit, end every program still registered: doit's workers are daemon threads, so a worker's
    `with` block that would stop its QEMU or nix may never finish (parallel runs are the default)."""
    with _lock:
        leftovers = list(_children.values())
    for proc in leftovers:
        kill_group(proc, grace=LEFTOVER_GRACE)


_busy: set[threading.Thread] = set()
_stopping: int | None = None  # the signal that ends this run, once one came


class ProcessTimeout(CimError):
    """A program ran past its deadline and was killed with its process group."""

    def __init__(self, argv: Sequence[str], timeout: float, output: str) -> None:
        self.argv = list(argv)
        self.timeout = timeout
        self.output = output
        super().__init__(f"{argv[0]} did not finish within {timeout:g} s and was stopped")


class Interrupted(CimError):
    """The run was told to stop (SIGINT, SIGTERM or SIGHUP): no new program starts."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(
            f"the run was interrupted by {signal.Signals(signum).name}; its VMs and nix processes were stopped",
            hint="Run it again: it continues from what completed.",
        )


def stopping() -> int | None:
    """The signal that ends this run, or None while it goes on."""
    return _stopping


def check_interrupted() -> None:
    """Raise `Interrupted` once the run was told to stop (waits call this between polls)."""
    if _stopping is not None:
        raise Interrupted(_stopping)


def is_nix(program: str) -> bool:
    """Nix's programs (nix, nix-store, nix-instantiate …): the ones whose children leave their process group."""
    return os.path.basename(program).startswith("nix")


def _with_death_signal(argv: Sequence[str], path: str | None = None) -> list[str]:
    """`argv` started so that it dies when the thread that started it dies: nix through the reaper (see
    reaper.py), every other program through setpriv, which gives it SIGKILL.

    The program is looked up first, so a missing one is a FileNotFoundError here as it would be without either.
    """
    program = shutil.which(argv[0], path=path) if os.sep not in argv[0] else argv[0]
    if program is None or not os.access(program, os.X_OK):
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), argv[0])
    if is_nix(program):
        return [*REAPER, str(os.getpid()), "--", program, *argv[1:]]
    setpriv = shutil.which(SETPRIV)
    if setpriv is None:  # without util-linux the signal handlers still stop children; a SIGKILL would not
        return list(argv)
    return [setpriv, "--pdeathsig", "KILL", "--", program, *argv[1:]]


def _popen(argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
    with _lock:
        check_interrupted()
        env = kwargs.get("env")
        show_command(argv, kwargs.get("cwd"))  # CIM_DEBUG: the command as asked for, not the death-signal wrapper
        argv = _with_death_signal(argv, env.get("PATH") if env else None)
        proc: subprocess.Popen[Any] = subprocess.Popen(argv, start_new_session=True, **kwargs)
        _children[proc.pid] = proc
        if argv[: len(REAPER)] == REAPER:
            _reapers.add(proc.pid)
    return proc


def _forget(proc: subprocess.Popen[Any]) -> None:
    with _lock:
        _children.pop(proc.pid, None)
        _reapers.discard(proc.pid)


def kill_group(proc: subprocess.Popen[bytes] | subprocess.Popen[str], grace: float = STOP_GRACE) -> None:
    """SIGTERM the process group, wait up to `grace` seconds, then SIGKILL it."""
    try:
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
    finally:
        _forget(proc)


class Options(TypedDict, total=False):
    """How a long-lived program is started: its standard streams (default: no input, stderr into stdout, stdout
    discarded), environment and working directory."""

    stdout: IO[bytes] | int | None
    stderr: IO[bytes] | int | None
    stdin: int | None
    env: Mapping[str, str] | None
    cwd: Path | None


def start(argv: Sequence[str], **options: Unpack[Options]) -> subprocess.Popen[bytes]:
    """Start a long-lived program in its own session, registered; the caller ends it with `kill_group`.

    Raises FileNotFoundError when the program is not installed, `Interrupted` once the run is stopping.
    """
    env = options.get("env")
    proc: subprocess.Popen[bytes] = _popen(
        argv,
        stdout=options.get("stdout", subprocess.DEVNULL),
        stderr=options.get("stderr", subprocess.STDOUT),
        stdin=options.get("stdin", subprocess.DEVNULL),
        env=dict(env) if env else None,
        cwd=options.get("cwd"),
    )
    return proc


@contextlib.contextmanager
def spawn(argv: Sequence[str], **options: Unpack[Options]) -> Iterator[subprocess.Popen[bytes]]:
    """Start a long-lived program in its own session (as `start`); its whole process group dies when the block ends."""
    proc = start(argv, **options)
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
    stderr_file: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run to completion and capture stdout/stderr as text; raises ProcessTimeout past `timeout` seconds.

    With `stderr_file`, stderr is written there as it comes (a progress line can show its last line while a long
    build runs) and read back as the result's stderr.  A run stopped by a signal raises `Interrupted` (its output is
    incomplete and no caller should judge it).
    """
    with contextlib.ExitStack() as files:
        err_to: IO[str] | int = subprocess.PIPE
        if stderr_file is not None:
            stderr_file.parent.mkdir(parents=True, exist_ok=True)
            err_to = files.enter_context(stderr_file.open("w+", encoding="utf-8", errors="replace"))
        try:
            proc = _communicate(argv, timeout, env, cwd, input_text, err_to)
        except ProcessTimeout as exc:
            if not isinstance(err_to, int):
                err_to.seek(0)
                exc.output += err_to.read()
            raise
        if not isinstance(err_to, int):
            err_to.seek(0)
            proc.stderr = err_to.read()
        return proc


def _communicate(
    argv: Sequence[str],
    timeout: float,
    env: Mapping[str, str] | None,
    cwd: Path | None,
    input_text: str | None,
    stderr: IO[str] | int,
) -> subprocess.CompletedProcess[str]:
    proc: subprocess.Popen[str] = _popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        stdin=subprocess.PIPE if input_text is not None else subprocess.DEVNULL,
        env=dict(env) if env else None,
        cwd=cwd,
    )
    try:
        out, err = proc.communicate(input=input_text, timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        try:  # a process outside the group (setsid) may still hold the pipes: this read has a deadline too
            out, err = proc.communicate(timeout=STOP_GRACE)
        except subprocess.TimeoutExpired:
            out, err = "", "(its output could not be read: a process it started still holds the pipe)"
        raise ProcessTimeout(argv, timeout, (out or "") + (err or "")) from None
    finally:
        kill_group(proc)
    check_interrupted()
    return subprocess.CompletedProcess(list(argv), proc.returncode, out, err)


# -- ending a run on a signal -----------------------------------------------------------------------------------------


@contextlib.contextmanager
def busy() -> Iterator[None]:
    """Mark the current thread as doing a task's work: an interrupted run waits for it to keep its logs and records."""
    me = threading.current_thread()
    with _lock:
        _busy.add(me)
    try:
        yield
    finally:
        with _lock:
            _busy.discard(me)


def stop_all(grace: float = STOP_GRACE) -> int:
    """Stop every registered process group: SIGTERM all, wait up to `grace` s together, SIGKILL what is left.

    Returns how many groups there were.
    """
    with _lock:
        procs = list(_children.values())
    for proc in procs:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    for proc in procs:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    return len(procs)


def _wait_for_busy_threads(deadline: float) -> None:
    me = threading.current_thread()
    while time.monotonic() < deadline:
        with _lock:
            others = [t for t in _busy if t is not me and t.is_alive()]
        if not others:
            return
        others[0].join(timeout=min(0.2, max(0.0, deadline - time.monotonic())))


def _on_signal(signum: int, _frame: object) -> None:
    global _stopping
    if _stopping is not None:  # a second signal: no more patience
        with _lock:  # (a reaper is left to end its nix within its own short grace: SIGKILL would orphan builders)
            procs = [proc for proc in _children.values() if proc.pid not in _reapers]
        for proc in procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        return
    with _lock:
        _stopping = signum
    name = signal.Signals(signum).name
    sys.stderr.write(f"\n[cim] {name}: stopping the run's VMs and nix processes …\n")
    sys.stderr.flush()
    count = stop_all()
    _wait_for_busy_threads(time.monotonic() + CLEANUP_GRACE)
    sys.stderr.write(
        f"[cim] {name}: stopped {count} process group(s); console logs are kept, nothing "
        "half-published. Run again to continue.\n"
    )
    sys.stderr.flush()
    # A thread still blocked in a network wait (a probe of a VM that is gone) must not hold the exit: once doit has
    # had EXIT_GRACE seconds to save its state, the process ends with the signal's code whatever else still waits.
    threading.Thread(target=_exit_soon, args=(128 + signum,), daemon=True).start()
    # SystemExit unwinds the main thread (a task running there cleans up in its `finally` blocks, doit saves what
    # completed) and ends the process with the shell's code for that signal, without a traceback.
    raise SystemExit(128 + signum)


def _exit_soon(code: int) -> None:
    time.sleep(EXIT_GRACE)
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


def stop_on_signals() -> None:
    """Make SIGINT, SIGTERM and SIGHUP end the run cleanly (see the module's docstring).  Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        return  # only the main thread may set handlers (doit loads dodo.py there)
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _on_signal)
