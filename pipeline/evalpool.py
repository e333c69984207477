"""Parallel, memory-bounded evaluation of many hosts: N long-lived evaluators, each replaced past its memory share.

A real NixOS host costs seconds of CPU and hundreds of MB of heap to evaluate, and Nix evaluates on one thread: one
`nix eval` for all hosts is one busy core and a heap that only grows.  This is what nix-eval-jobs does (workers, a
memory limit past which a worker is replaced, a result per attribute as it finishes); it is not packaged for Debian
12, so the same scheme runs over Nix's own CLI when nix-eval-jobs is not installed (pipeline.evaljobs runs
nix-eval-jobs when it is, and chooses):

  evaluator  one `nix repl` with the flake loaded (`builtins.getFlake`), fed one host at a time; each answer ends with
             a sentinel string, so the pipe carries one host's drvPaths (as JSON) or its error
  pool       N threads, each owning an evaluator, take hosts from one queue; a host's result resolves its future at
             once (eval:<host> waits for its own host only); an evaluator whose resident memory plus the largest
             growth one host has caused would pass its share of the limit is replaced before its next host
  watch      every 25 ms the evaluators' resident memory is summed; a host starts only while that sum plus the most
             one host has grown an evaluator stays under the limit (one always may), and when hosts already running
             would pass it (the first hosts, whose cost nobody knows yet), the one that started last is stopped and
             its host queued again: the oldest always goes on, so every host is evaluated
  limit      CIM_EVAL_MAX_MEMORY (bytes, or with K/M/G) for all evaluators together, default half the machine's
             available memory; CIM_EVAL_WORKERS, default the usable cores

A host's failure stays its own: its future holds its NixError, the evaluator goes on (or is replaced if it died).
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import queue
import re
import select
import signal
import subprocess
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent import futures
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

from pipeline import nix, process

ANSI = re.compile(r"\x1b\[[0-9;]*m")
PER_HOST_TIMEOUT = nix.EVAL_TIMEOUT
START_TIMEOUT = 120.0
STOP_TIMEOUT = 5.0  # seconds a killed evaluator has to be gone
WATCH_INTERVAL = 0.025  # seconds between two looks at the evaluators' memory


class EvalPoolError(nix.NixError):
    """An evaluator that did not start or answer."""


def workers_default() -> int:
    value = os.environ.get("CIM_EVAL_WORKERS", "").strip()
    if value:
        if not value.isdigit() or int(value) < 1:
            raise EvalPoolError(f"CIM_EVAL_WORKERS={value!r} is not a number of workers.", hint="Set it to 1 or more.")
        return int(value)
    return max(1, len(os.sched_getaffinity(0)))


def parse_bytes(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", text, re.I)
    if not match:
        raise EvalPoolError(
            f"CIM_EVAL_MAX_MEMORY={text!r} is not a size.", hint="Give bytes, or a number with K, M or G (e.g. 4G)."
        )
    return int(float(match.group(1)) * 1024 ** "KMGT".find(match.group(2).upper()) * (1024 if match.group(2) else 1))


def max_memory_default() -> int:
    """CIM_EVAL_MAX_MEMORY, else half of the memory available now (MemAvailable)."""
    value = os.environ.get("CIM_EVAL_MAX_MEMORY", "").strip()
    if value:
        return parse_bytes(value)
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 // 2
    return 4 * 2**30


def rss(pid: int) -> int:
    """A process's resident memory in bytes (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def group(pgid: int) -> list[int]:
    """The processes of a process group (an evaluator is nix under the pipeline's reaper, one group)."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid:
                members.append(int(entry.name))
    return members


def cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of a live process (from /proc/PID/stat)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


class Evaluator:
    """One `nix repl` with the domain's flake loaded; `evaluate(host)` → drvPaths or the NixError naming the host."""

    def __init__(self, domain_dir: Path) -> None:
        self.domain_dir = domain_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.sequence = 0
        self.cpu = 0.0  # CPU seconds, counted when it stops
        self.peak = 0  # its largest resident memory seen
        self.members: list[int] = []  # its processes (nix under the reaper), found once it runs
        self.host = ""  # the host it evaluates now ("" between hosts)
        self.since = 0.0  # when it took that host
        self.before = 0  # its resident memory then
        self.preempted = False  # stopped by the pool's watch: its host is queued again, not failed

    def start(self) -> None:
        argv = ["nix", *nix.FEATURES, "repl"]
        try:
            self.proc = process.start(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        except FileNotFoundError:
            raise EvalPoolError("nix is not installed.", hint="Run scripts/setup.sh and try again.") from None
        flake = json.dumps(nix.flake_ref(self.domain_dir))
        said = self._ask(f"cimHosts = (builtins.getFlake {flake}).nixosConfigurations", START_TIMEOUT)
        if "error:" in said:
            raise EvalPoolError(f"nix repl could not load {self.domain_dir / 'flake.nix'}.", said.strip())

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc else 0

    def rss(self) -> int:
        """The resident memory of the evaluator's processes together."""
        if not self.members:
            self.members = group(self.pid) if self.pid else []
        now = sum(rss(pid) for pid in self.members)
        self.peak = max(self.peak, now)
        return now

    def _ask(self, line: str, timeout: float) -> str:
        """Send one line, then a sentinel; everything nix printed for the line (ANSI colours stripped)."""
        assert self.proc is not None and self.proc.stdin is not None and self.proc.stdout is not None
        self.sequence += 1
        sentinel = f'"cim-end-{self.sequence}"'
        try:
            self.proc.stdin.write(f"{line}\n{sentinel}\n".encode())
            self.proc.stdin.flush()
        except OSError:
            raise EvalPoolError("the nix repl evaluator is gone.") from None
        data = b""
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while True:
            text = ANSI.sub("", data.decode(errors="replace"))
            lines = text.splitlines()
            if sentinel in lines:  # the sentinel's value, alone on its line (its echo follows the prompt)
                return "\n".join(lines[: lines.index(sentinel)])
            left = deadline - time.monotonic()
            if left <= 0:
                raise EvalPoolError(f"nix repl gave no answer within {timeout:g} s.", text[-2000:])
            ready, _, _ = select.select([fd], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    raise EvalPoolError("the nix repl evaluator exited.", text[-2000:])
                data += chunk
            process.check_interrupted()

    def evaluate(self, host: str) -> nix.EvalOutcome:
        expr = f"builtins.toJSON (({nix.EVALUATED_ATTRIBUTES}) cimHosts.{json.dumps(host)}.config.system.build)"
        said = self._ask(expr, PER_HOST_TIMEOUT)
        self.rss()
        installable = f"{nix.flake_ref(self.domain_dir)}#nixosConfigurations.{host}.config.system.build"
        for line in said.splitlines():
            if line.startswith('"{'):  # the JSON, as a Nix string literal
                literal = line.replace("\\$", "$")
                value = json.loads(json.loads(literal))
                try:
                    return nix.host_drvs(host, value, installable)
                except nix.NixError as exc:
                    return exc
        error = said[said.find("error:") :] if "error:" in said else said
        error = "\n".join(line for line in error.splitlines() if not line.startswith("nix-repl> "))  # the echo
        return nix.NixError(f"nix eval of host '{host}' ({installable}) failed.", error.strip())

    def preempt(self) -> None:
        """Stop it now, from the watch (its worker sees the pipe end and queues the host again)."""
        self.preempted = True
        self.cpu += sum(cpu_seconds(pid) for pid in self.members)
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)

    def stop(self) -> None:
        if self.proc is None:
            return
        if not self.preempted:  # a preempted one's CPU was counted before it was killed
            self.rss()
            self.cpu += sum(cpu_seconds(pid) for pid in self.members)
        # Its heap is what it is replaced for: no orderly exit is needed, and `nix repl` took the whole grace to
        # answer SIGTERM (0.5 s a host when every host gets a fresh evaluator).  SIGKILL, then reap it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        process.kill_group(self.proc, grace=STOP_TIMEOUT)
        with contextlib.suppress(OSError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        self.proc = None


@dataclass
class PoolStats:
    workers: int = 0
    max_memory: int = 0
    hosts: int = 0
    replaced: int = 0  # evaluators stopped past their memory share (or dead) and started afresh
    peak_rss: int = 0  # the largest resident memory of all evaluators together, sampled
    cpu_seconds: float = 0.0
    seconds: float = 0.0
    growth: int = 0  # the largest growth one host caused in an evaluator
    base: int = 0  # the largest resident memory of an evaluator that has just loaded the flake
    preempted: int = 0  # hosts stopped part-way because the evaluators together would pass the limit, then redone


class EvalPool:
    """Evaluate hosts with `workers` evaluators whose resident memory together stays under `max_memory`."""

    def __init__(self, domain_dir: Path, workers: int | None = None, max_memory: int | None = None) -> None:
        self.domain_dir = domain_dir
        self.workers = workers or workers_default()
        self.max_memory = max_memory or max_memory_default()
        self.share = self.max_memory // self.workers
        self.stats = PoolStats(workers=self.workers, max_memory=self.max_memory)
        self._queue: queue.Queue[str] = queue.Queue()
        self._futures: dict[str, Future[nix.EvalOutcome]] = {}
        self._lock = threading.Lock()
        self._live: list[Evaluator] = []
        self._threads: list[threading.Thread] = []
        self._started = 0.0
        self._watching = False  # the watch's thread runs
        self._done = threading.Event()
        self._gate = threading.Condition()
        self._busy = 0  # evaluators evaluating a host right now
        self._measured = False  # a host has been evaluated whole: the growth it caused is known
        self._step = 0  # what one running host may add between two of the watch's looks (the watch measures it)
        self._starting = 0  # evaluators admitted and still starting (not live yet)

    def submit(self, hosts: Iterable[str]) -> dict[str, Future[nix.EvalOutcome]]:
        """Queue the hosts not queued yet; their futures (each resolves as soon as its host is evaluated).  Workers run
        while there are hosts to take (their evaluators stop when the queue is empty: no memory held during builds)."""
        hosts = list(hosts)
        with self._lock:
            for host in hosts:
                if host not in self._futures:
                    self._futures[host] = Future()
                    self._queue.put(host)
                    self.stats.hosts += 1
            if not self._started:
                self._started = time.monotonic()
            if not self._watching:  # the watch runs while there are hosts to evaluate
                self._watching = True
                threading.Thread(target=self._monitor, name="cim-eval-monitor", daemon=True).start()
            self._threads = [t for t in self._threads if t.is_alive()]
            wanted = min(self.workers, len(self._threads) + self._queue.qsize())  # counted before any starts
            while len(self._threads) < wanted:
                thread = threading.Thread(target=self._work, name="cim-eval-worker", daemon=True)
                self._threads.append(thread)
                thread.start()
            return {host: self._futures[host] for host in hosts}

    def future(self, host: str) -> Future[nix.EvalOutcome]:
        return self.submit([host])[host]

    def close(self) -> PoolStats:
        """Wait for every queued host; the pool's figures."""
        futures.wait(list(self._futures.values()))
        for thread in list(self._threads):
            thread.join()
        self._done.set()
        self.stats.seconds = round(time.monotonic() - self._started, 3) if self._started else 0.0
        self.stats.cpu_seconds = round(self.stats.cpu_seconds, 3)
        return self.stats

    def _monitor(self) -> None:
        """The watch: the evaluators' memory together, the growth hosts cause as they run, and the stop of the newest
        host when the running ones would pass the limit before the next look."""
        last: dict[Evaluator, int] = {}
        looked = time.monotonic()
        rate = 0.0  # the fastest one evaluator has grown between two looks (bytes a second)
        gaps = collections.deque([WATCH_INTERVAL], maxlen=40)  # the last second's times between two looks
        while not self._done.wait(WATCH_INTERVAL):
            with self._lock:
                if not self._live and not any(t.is_alive() for t in self._threads):  # every host done: rest
                    self._watching = False
                    return
                sizes = {e: e.rss() for e in self._live}
                now = time.monotonic()
                total = sum(sizes.values())
                self.stats.peak_rss = max(self.stats.peak_rss, total)
                grown = max((size - last[e] for e, size in sizes.items() if e in last), default=0)
                rate = max(rate, grown / max(now - looked, 1e-3))
                gaps.append(now - looked)  # longer on a loaded machine
                self._step = int(rate * max(gaps))  # what one running host may add before the next look
                last, looked = sizes, now
                running = [e for e in sizes if e.host and not e.preempted]
                for e in running:
                    self.stats.growth = max(self.stats.growth, sizes[e] - e.before)
                staying = sum(size for e, size in sizes.items() if not e.preempted)  # a stopped one is going
                if len(running) > 1 and staying + self._step * len(running) > self.max_memory:
                    max(running, key=lambda e: e.since).preempt()
                    self.stats.preempted += 1

    def _work(self) -> None:
        evaluator: Evaluator | None = None
        try:
            while True:
                try:
                    host = self._queue.get_nowait()
                except queue.Empty:
                    return
                future = self._futures[host]
                try:
                    if evaluator is not None and evaluator.rss() + self.stats.growth > self.share:
                        self._retire(evaluator, replaced=True)
                        evaluator = None
                    # A worker waiting to be admitted holds no evaluator: a fresh one starts once admitted.
                    with self._admitted(fresh=evaluator is None):
                        if evaluator is None:
                            evaluator = self._spawn()
                        with self._running(evaluator, host):
                            outcome = evaluator.evaluate(host)
                        self.stats.growth = max(self.stats.growth, evaluator.rss() - evaluator.before)
                        self._measured = True
                except EvalPoolError as exc:  # the evaluator died or hung on this host: the host fails alone
                    preempted = evaluator is not None and evaluator.preempted
                    if evaluator is not None:
                        self._retire(evaluator, replaced=not preempted)
                        evaluator = None
                    if preempted:  # stopped by the watch, not by the host: evaluated again, by a fresh evaluator
                        self._queue.put(host)
                        continue
                    outcome = nix.NixError(f"nix eval of host '{host}' failed: {exc.message}", exc.detail)
                except Exception as exc:  # a fault of the pool itself: the host's eval fails with it instead of waiting
                    future.set_exception(exc)
                    if evaluator is not None:
                        self._retire(evaluator, replaced=True)
                        evaluator = None
                    continue
                if evaluator is not None and evaluator.preempted:  # stopped just after it answered: the answer stands
                    self._retire(evaluator, replaced=False)
                    evaluator = None
                future.set_result(outcome)
        finally:
            if evaluator is not None:
                self._retire(evaluator, replaced=False)

    @contextlib.contextmanager
    def _admitted(self, fresh: bool) -> Iterator[None]:
        """Start a host (on a `fresh` evaluator, or the worker's own) only while the evaluators together would stay
        under the limit once the running hosts and this one have grown as much as the most one host has grown an
        evaluator, with a look's growth to spare for each: with a limit too small for every worker at once, fewer
        evaluate at a time (one always may)."""
        with self._gate:
            # Before any host is measured each worker is trusted to fit its share (a host's cost is not known yet, and
            # a fast host must not wait behind a slow one); the watch measures hosts as they grow and stops the newest
            # if together they would pass the limit.  From then on the measured growth decides.
            # Once the watch has had to stop a host, none starts beside a running one until a host's whole cost is
            # known (growth seen so far is only part of it, and a host started on it would be stopped again).
            while self._busy and (
                self._projected() + self.stats.base * fresh + self.stats.growth + self._step * (self._busy + 1)
                > self.max_memory
                or (self.stats.preempted and not self._measured)
            ):
                self._gate.wait(0.2)
            self._busy += 1
            self._starting += fresh
        try:
            yield
        finally:
            with self._gate:
                self._busy -= 1
                self._gate.notify_all()

    @contextlib.contextmanager
    def _running(self, evaluator: Evaluator, host: str) -> Iterator[None]:
        """`evaluator` evaluates `host`: what the watch reads (its host, since when, its memory before)."""
        with self._lock:
            evaluator.host, evaluator.since, evaluator.before = host, time.monotonic(), evaluator.rss()
        try:
            yield
        finally:
            with self._lock:
                evaluator.host = ""

    def _projected(self) -> int:
        """The evaluators' memory together once each running host has grown as much as the most one host has (an
        evaluator admitted but still starting counts as much as a fresh one has held)."""
        with self._lock:
            held = sum(max(e.rss(), e.before + self.stats.growth) if e.host else e.rss() for e in self._live)
            return held + self._starting * self.stats.base

    def _spawn(self) -> Evaluator:
        """A fresh evaluator (admitted: `_starting` counted it until it is live)."""
        evaluator = Evaluator(self.domain_dir)
        try:
            evaluator.start()
        except BaseException:
            evaluator.stop()  # one that could not load the flake is not left running
            raise
        finally:
            with self._lock:
                self._starting -= 1
        with self._lock:
            self._live.append(evaluator)
            self.stats.base = max(self.stats.base, evaluator.rss())
        return evaluator

    def _retire(self, evaluator: Evaluator, replaced: bool) -> None:
        with self._lock:
            if evaluator in self._live:
                self._live.remove(evaluator)
        evaluator.stop()
        self.stats.cpu_seconds += evaluator.cpu
        if replaced:
            self.stats.replaced += 1


def describe(pool: EvalPool, why: str = "nix-eval-jobs is not installed") -> str:
    """What evaluates this run, for its log; `why` says why not nix-eval-jobs (pipeline.evaljobs chooses)."""
    return (
        f"{pool.workers} evaluator(s), each a long-lived `nix repl` ({why}: the pipeline's own scheme over Nix's CLI), "
        f"memory limit {pool.max_memory / 2**30:.1f} GiB for all of them"
    )
