"""The evaluator a run uses: nix-eval-jobs when it is installed, else the pipeline's own `nix repl` pool (evalpool).

nix-eval-jobs does what `pipeline.evalpool` does over Nix's CLI (N worker processes, each replaced once its resident
memory passes `--max-memory-size`, a JSON line per job as it finishes), but inside Nix.  A batch of hosts is one
`nix-eval-jobs` process over an expression that names exactly those hosts:

  job        one per host: the host's `toplevel` derivation, carrying the drvPaths of the image attributes the
             repl scheme evaluates (`nix.EVALUATED_ATTRIBUTES`); `--apply` prints them as the line's `extraValue`.
             One job, not one per attribute: nix-eval-jobs does not print the attrsets it recurses into, so a reader
             could not tell when a host's last attribute had come, and each attribute on another worker would
             evaluate the host's NixOS modules again.  The top level is recursed into without
             `recurseForDerivations` (nix-eval-jobs' rule for the root); a host's job is a derivation, so nothing
             below it is
  result     a host's future resolves when its line comes: `nix.host_drvs` of the extraValue (the repl scheme's
             result), or its `error` as the host's NixError; a host without `toplevel` prints no line (nix-eval-jobs
             skips what is not a derivation) and gets host_drvs' own error once the process ends; a process that
             ends early, or stays silent past its deadline, fails the hosts still pending
  choice     CIM_EVALUATOR = nix-eval-jobs | repl forces one; unset, nix-eval-jobs when `shutil.which` finds it

The output format was read in nix-community/nix-eval-jobs (src/worker.cc, src/nix-eval-jobs.cc, src/eval-args.cc,
59fa344, 2026-01): `--apply` and `extraValue` need nix-eval-jobs 2.26 or newer.
"""

from __future__ import annotations

import enum
import json
import os
import select
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future
from pathlib import Path

from pipeline import evalpool, nix, process
from pipeline.errors import CimError

VARIABLE = "CIM_EVALUATOR"
PROGRAM = "nix-eval-jobs"
# From the start (or the last host's line) to the next host's line: a worker loads the flake, then evaluates a host.
LINE_TIMEOUT = evalpool.START_TIMEOUT + evalpool.PER_HOST_TIMEOUT
SAMPLE_SECONDS = 0.2
APPLY = "job: job.cimDrvPaths"


class Backend(enum.Enum):
    """Which evaluator evaluates a run's hosts."""

    nix_eval_jobs = PROGRAM
    repl = "repl"


def choose(env: Mapping[str, str] | None = None, which: Callable[[str], str | None] = shutil.which) -> Backend:
    """CIM_EVALUATOR if set, else nix-eval-jobs when it is on PATH, else the repl pool; EvalPoolError if it cannot."""
    value = (os.environ if env is None else env).get(VARIABLE, "").strip().lower()
    if not value:
        return Backend.nix_eval_jobs if which(PROGRAM) else Backend.repl
    try:
        backend = Backend(value)
    except ValueError:
        raise evalpool.EvalPoolError(
            f"{VARIABLE}={value!r} is not an evaluator.",
            hint=f"Set it to {PROGRAM} or repl, or unset it: then {PROGRAM} evaluates when it is installed, and the "
            "pipeline's own `nix repl` evaluators when it is not.",
        ) from None
    if backend is Backend.nix_eval_jobs and which(PROGRAM) is None:
        raise evalpool.EvalPoolError(
            f"{VARIABLE}={PROGRAM}, but {PROGRAM} is not on PATH.",
            hint=f"Install it (e.g. nix profile install nixpkgs#{PROGRAM}), or unset {VARIABLE} to evaluate with the "
            "pipeline's own `nix repl` evaluators.",
        )
    return backend


def nix_string(text: str) -> str:
    """`text` as a Nix string literal (JSON's escapes, and `${` kept literal)."""
    return json.dumps(text, ensure_ascii=False).replace("${", "\\${")


def expression(domain_dir: Path, names: Path) -> str:
    """The attrset nix-eval-jobs evaluates: one job per host named in the JSON list `names`, the host's toplevel
    carrying its image drvPaths.  The names are read from a file: one argument may not pass 128 KiB (the kernel's
    MAX_ARG_STRLEN), some 4,000 host names."""
    return (
        f"let hosts = (builtins.getFlake {nix_string(nix.flake_ref(domain_dir))}).nixosConfigurations; "
        f"drvPaths = {nix.EVALUATED_ATTRIBUTES}; "
        "job = name: let build = hosts.${name}.config.system.build; in "
        "if build ? toplevel then build.toplevel // { cimDrvPaths = drvPaths build; } else null; "
        f"in builtins.listToAttrs (map (name: {{ inherit name; value = job name; }}) "
        f"(builtins.fromJSON (builtins.readFile {nix_string(str(names))})))"
    )


def memory_mib(max_memory: int, workers: int) -> int:
    """`--max-memory-size`: each worker's share of the pool's limit (bytes) in MiB, at least 1."""
    return max(1, max_memory // max(1, workers) // 2**20)


def command(domain_dir: Path, names: Path, hosts: int, workers: int, max_memory: int) -> list[str]:
    """The argv of one batch of `hosts` hosts named in `names`: no more workers than hosts; `--impure` because getFlake
    of a `path:` flake is unlocked (and the names file is outside the store)."""
    return [
        PROGRAM,
        *("--option", "extra-experimental-features", "nix-command flakes"),
        *("--workers", str(max(1, min(workers, hosts)))),
        *("--max-memory-size", str(memory_mib(max_memory, workers))),
        "--impure",
        *("--apply", APPLY),
        "--expr",
        expression(domain_dir, names),
    ]


def installable(domain_dir: Path, host: str) -> str:
    return f"{nix.flake_ref(domain_dir)}#nixosConfigurations.{host}.config.system.build"


def read_line(line: str, domain_dir: Path) -> tuple[str, nix.EvalOutcome] | None:
    """One line of nix-eval-jobs' output → (host, its result); ("", error) for an error of the whole expression;
    None for a line that is not a job's (a blank line, a log line)."""
    try:
        job = json.loads(line)
    except ValueError:
        return None
    if not isinstance(job, dict):
        return None
    path = job.get("attrPath")
    if not isinstance(path, list):
        attr = job.get("attr")
        path = [attr] if isinstance(attr, str) and attr else []
    if not path:
        if "error" in job:
            return "", nix.NixError(f"{PROGRAM} could not evaluate the hosts' expression.", str(job["error"]))
        return None
    host = str(path[0])
    where = installable(domain_dir, host)
    if "error" in job:
        return host, nix.NixError(f"nix eval of host '{host}' ({where}) failed.", str(job["error"]))
    value = job.get("extraValue")
    if not isinstance(value, dict):
        return host, nix.NixError(
            f"{PROGRAM} gave no extraValue for host '{host}' ({where}).",
            hint=f"It needs {PROGRAM} 2.26 or newer (--apply); or set {VARIABLE}=repl.",
        )
    try:
        return host, nix.host_drvs(host, value, where)
    except nix.NixError as exc:
        return host, exc


def split_lines(buffer: bytes, chunk: bytes) -> tuple[list[str], bytes]:
    """The complete lines of `buffer + chunk` (blank ones dropped) and the unfinished rest."""
    *complete, rest = (buffer + chunk).split(b"\n")
    return [line.decode(errors="replace") for line in complete if line.strip()], rest


class Batch:
    """The hosts of one nix-eval-jobs process, each resolved once: by its line, or by how the process ended."""

    def __init__(self, domain_dir: Path, hosts: Iterable[str]) -> None:
        self.domain_dir = domain_dir
        self.pending = dict.fromkeys(hosts)  # ordered, and a line resolves its host in O(1)

    def take(self, line: str) -> dict[str, nix.EvalOutcome]:
        """The hosts this line resolves: its own host (or none), or every pending host if the expression failed."""
        result = read_line(line, self.domain_dir)
        if result is None:
            return {}
        host, outcome = result
        if not host:
            assert isinstance(outcome, nix.NixError)
            return self._all(
                lambda h: nix.NixError(f"nix eval of host '{h}' failed: {outcome.message}", outcome.stderr)
            )
        if host not in self.pending:
            return {}
        del self.pending[host]
        return {host: outcome}

    def end(self, returncode: int | None, stderr: str, failure: CimError | None = None) -> dict[str, nix.EvalOutcome]:
        """The hosts still pending when the process ended (`returncode` None: it was stopped, for `failure`)."""
        if failure is not None:
            return self._all(
                lambda h: nix.NixError(f"nix eval of host '{h}' failed: {failure.message}", stderr, failure.hint)
            )
        if returncode == 0:  # no line: the host's value was no derivation (it has no toplevel)
            return self._all(self._no_line)
        how = "was stopped" if returncode is None else f"exited with status {returncode}"
        return self._all(
            lambda h: nix.NixError(
                f"nix eval of host '{h}' failed: {PROGRAM} {how} before the host was evaluated.", stderr
            )
        )

    def _no_line(self, host: str) -> nix.EvalOutcome:
        try:
            return nix.host_drvs(host, None, installable(self.domain_dir, host))
        except nix.NixError as exc:
            return exc

    def _all(self, outcome: Callable[[str], nix.EvalOutcome]) -> dict[str, nix.EvalOutcome]:
        done = {host: outcome(host) for host in self.pending}
        self.pending.clear()
        return done


class JobsPool:
    """Hosts evaluated by nix-eval-jobs: one process per `submit` of new hosts, their futures resolved line by line.

    The interface of `evalpool.EvalPool`: `submit`, `future`, `close` → PoolStats, `describe`.
    """

    def __init__(self, domain_dir: Path, workers: int | None = None, max_memory: int | None = None) -> None:
        self.domain_dir = domain_dir
        self.workers = workers or evalpool.workers_default()
        self.max_memory = max_memory or evalpool.max_memory_default()
        self.program = shutil.which(PROGRAM) or PROGRAM
        self.stats = evalpool.PoolStats(workers=self.workers, max_memory=self.max_memory)
        self._futures: dict[str, Future[nix.EvalOutcome]] = {}
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._started = 0.0
        self._cpu: dict[int, float] = {}  # the CPU seconds last seen per process of every batch

    def describe(self) -> str:
        return (
            f"{PROGRAM} ({self.program}) with {self.workers} worker(s), one process per batch of hosts, memory limit "
            f"{self.max_memory / 2**30:.1f} GiB for all of them ({memory_mib(self.max_memory, self.workers)} MiB "
            "per worker)"
        )

    def submit(self, hosts: Iterable[str]) -> dict[str, Future[nix.EvalOutcome]]:
        """The hosts' futures; those not asked for before are evaluated by a new nix-eval-jobs process, started by a
        thread of its own that reads its lines (the thread that starts a child is the one that ends it)."""
        hosts = list(hosts)
        with self._lock:
            new = [h for h in dict.fromkeys(hosts) if h not in self._futures]
            for host in new:
                self._futures[host] = Future()
            self.stats.hosts += len(new)
            if new:
                self._started = self._started or time.monotonic()
                thread = threading.Thread(target=self._batch, args=(new,), name="cim-eval-jobs", daemon=True)
                self._threads.append(thread)
                thread.start()
            return {host: self._futures[host] for host in hosts}

    def future(self, host: str) -> Future[nix.EvalOutcome]:
        return self.submit([host])[host]

    def close(self) -> evalpool.PoolStats:
        """Wait for every host; the pool's figures (replaced and growth stay 0: nix-eval-jobs keeps them to itself)."""
        for future in list(self._futures.values()):
            future.result()
        for thread in list(self._threads):
            thread.join()
        self.stats.cpu_seconds = round(sum(self._cpu.values()), 3)
        self.stats.seconds = round(time.monotonic() - self._started, 3) if self._started else 0.0
        return self.stats

    def _batch(self, hosts: list[str]) -> None:
        batch = Batch(self.domain_dir, hosts)
        try:
            self._run(batch)
        except CimError as exc:
            self._resolve(batch.end(None, exc.detail, exc))
        except Exception as exc:  # a future left unresolved would hang every eval:<host> waiting on it
            self._resolve(batch.end(None, "", evalpool.EvalPoolError(repr(exc))))
            raise

    def _resolve(self, outcomes: dict[str, nix.EvalOutcome]) -> None:
        for host, outcome in outcomes.items():
            self._futures[host].set_result(outcome)

    def _run(self, batch: Batch) -> None:
        with (
            tempfile.TemporaryDirectory(prefix="cim-eval-jobs-") as scratch,
            tempfile.TemporaryFile() as stderr,  # read once it ends: an unread pipe would stall nix-eval-jobs
        ):
            names = Path(scratch) / "hosts.json"
            names.write_text(json.dumps(list(batch.pending)))
            argv = command(self.domain_dir, names, len(batch.pending), self.workers, self.max_memory)
            try:
                proc = process.start(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr)
            except FileNotFoundError:
                raise evalpool.EvalPoolError(
                    f"{PROGRAM} is not installed.", hint=f"Install it, or set {VARIABLE}=repl."
                ) from None
            returncode: int | None = None
            failure: CimError | None = None  # silent past its deadline, or the run was interrupted
            try:
                for line in self._lines(proc):
                    self._resolve(batch.take(line))
                returncode = proc.wait(timeout=process.STOP_GRACE)
            except subprocess.TimeoutExpired:
                pass  # its output ended but it did not: stopped below, its hosts pending
            except CimError as exc:
                failure = exc
            finally:
                self._sample(proc)
                process.kill_group(proc)
                if proc.stdout is not None:
                    proc.stdout.close()
            stderr.seek(0)
            said = stderr.read().decode(errors="replace")
        self._resolve(batch.end(returncode, said, failure))

    def _lines(self, proc: subprocess.Popen[bytes]) -> Iterator[str]:
        """nix-eval-jobs' lines as they come; EvalPoolError when none comes within LINE_TIMEOUT."""
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        buffer = b""
        deadline = time.monotonic() + LINE_TIMEOUT
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise evalpool.EvalPoolError(f"{PROGRAM} gave no host's result within {LINE_TIMEOUT:g} s.")
            ready, _, _ = select.select([fd], [], [], min(left, SAMPLE_SECONDS))
            process.check_interrupted()
            self._sample(proc)
            if not ready:
                continue
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                if buffer.strip():
                    yield buffer.decode(errors="replace")
                return
            lines, buffer = split_lines(buffer, chunk)
            for line in lines:
                deadline = time.monotonic() + LINE_TIMEOUT
                yield line

    def _sample(self, proc: subprocess.Popen[bytes]) -> None:
        """The resident memory and CPU of the batch's processes (nix-eval-jobs, its workers, the reaper)."""
        members = evalpool.group(proc.pid)
        total = sum(evalpool.rss(pid) for pid in members)
        with self._lock:
            self.stats.peak_rss = max(self.stats.peak_rss, total)
            for pid in members:
                self._cpu[pid] = max(self._cpu.get(pid, 0.0), evalpool.cpu_seconds(pid))


Pool = evalpool.EvalPool | JobsPool


def open_pool(domain_dir: Path) -> Pool:
    """The pool this run evaluates with (see `choose`)."""
    if choose() is Backend.nix_eval_jobs:
        return JobsPool(domain_dir)
    return evalpool.EvalPool(domain_dir)


def describe(pool: Pool) -> str:
    """Which evaluator evaluates this run, for its log."""
    if isinstance(pool, JobsPool):
        return pool.describe()
    forced = os.environ.get(VARIABLE, "").strip().lower() == Backend.repl.value
    why = f"{VARIABLE}=repl" if forced else f"{PROGRAM} is not installed"
    return evalpool.describe(pool, why)
