"""One run of the pipeline: its paths and domain (`Context`), the state directories, what doit command the argv runs,
the run lock and the sweep of what a killed run left, and the run's batched host evaluations.

No subprocess runs here at load time; `Evaluations.of` is where the one `nix eval` of a run happens.
"""

from __future__ import annotations

import functools
import gc
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from doit.reporter import ConsoleReporter

from pipeline import nix
from pipeline.artifacts import Records, sweep_temps
from pipeline.domain import Domain
from pipeline.errors import CimError
from pipeline.evaljobs import Pool, describe, open_pool
from pipeline.hashing import xxh3_text
from pipeline.log import progress, say, step
from pipeline.paths import state_root
from pipeline.results import PassStore
from pipeline.runlock import RunLock
from pipeline.validate import flake_files, load_checked


@dataclass(frozen=True)
class Context:
    """One run's paths and domain."""

    root: Path
    domain_dir: Path
    domain: Domain
    artifacts_dir: Path
    state_dir: Path
    results_dir: Path
    deploy_variant: str = "next"  # deploy:<host>'s generation: next (the default run's) or broken (asked for)

    @functools.cached_property
    def records(self) -> Records:
        return Records(
            self.state_dir,
            self.artifacts_dir,
            {"domain": self.domain.name, "fqdn": self.domain.fqdn, "domain_dir": str(self.domain_dir)},
        )

    @functools.cached_property
    def passes(self) -> PassStore:
        """Boots and installs that passed, by image digest and spec: shared by every domain of this checkout."""
        return PassStore(self.results_dir)

    @functools.cached_property
    def files(self) -> list[str]:
        """The domain's flake files, walked once per run (validate and every eval depend on them)."""
        return flake_files(self.domain_dir)

    @functools.cached_property
    def evaluations(self) -> Evaluations:
        return Evaluations(self.domain_dir)

    @property
    def dep_file(self) -> Path:
        """doit's dependency DB (sqlite3) for this domain."""
        return self.state_dir / "doit.sqlite3"

    @property
    def machine_state(self) -> Path:
        """State shared by every domain of this checkout (the KVM verdict)."""
        return state_root(self.root)

    @property
    def gcroots(self) -> Path:
        """The Nix GC roots of this run's published images, one symlink per artifact."""
        return self.state_dir / "gcroots"

    def artifact_dir(self, artifact: str) -> Path:
        return self.artifacts_dir / artifact

    def vm_dir(self, name: str) -> Path:
        """A fresh, unique working directory for one VM run (sockets, firmware variables, raw console log)."""
        path = self.state_dir / "vm" / f"{name}-{os.getpid()}-{time.monotonic_ns()}"
        path.mkdir(parents=True)
        return path


def state_dir_for(root: Path, domain_dir: Path) -> Path:
    """Everything a domain's runs keep: .cim/state/<dir name>-<hash of its path> (one sub-directory per artifacts
    directory, see `run_state_dir`)."""
    domain_dir = (root / domain_dir).resolve()
    return state_root(root) / "state" / f"{domain_dir.name}-{xxh3_text(str(domain_dir))[:12]}"


def run_state_dir(root: Path, domain_dir: Path, artifacts_dir: Path) -> Path:
    """Where the doit DB, records, GC roots and VM work dirs of one domain *into one artifacts directory* live.

    State says what is published where, so it is keyed by both: `doit artifacts=NEW_DIR` after a run into artifacts/
    starts from nothing and publishes everything into NEW_DIR (the builds themselves are in the Nix store already).
    """
    artifacts_dir = (root / artifacts_dir).resolve()
    key = f"{artifacts_dir.name}-{xxh3_text(str(artifacts_dir))[:12]}"
    return state_dir_for(root, domain_dir) / "artifacts" / key


def make_context(
    root: Path,
    domain_dir: Path,
    artifacts_dir: Path | None = None,
    results_dir: Path | None = None,
    deploy_variant: str = "next",
) -> Context:
    """Load and check the domain directory (no subprocess: `validate.load_checked`); raises DomainError.

    State (the doit DB, records, VM work dirs) lives in `run_state_dir`: keyed by the domain's path and the artifacts
    directory, so two domains, two copies of one, or one domain into two directories never share cached facts.
    `artifacts_dir` defaults to <root>/artifacts.  Passed boots and installs are content-addressed, so they are
    shared: `results_dir` defaults to results/ in the state root (pipeline.paths: $CIM_STATE or <root>/.cim).
    """
    if deploy_variant not in DEPLOY_VARIANTS:
        raise CimError(
            f"generation={deploy_variant!r} is not a generation deploy:<host> knows.",
            hint=f"Use one of {', '.join(DEPLOY_VARIANTS)} (broken: a generation whose boot never completes, to see "
            "the rollback).",
        )
    domain_dir = (root / domain_dir).resolve()  # an absolute domain_dir stays as it is
    domain = load_checked(domain_dir)
    artifacts = (root / (artifacts_dir or "artifacts")).resolve()
    return Context(
        root=root,
        domain_dir=domain_dir,
        domain=domain,
        artifacts_dir=artifacts,
        state_dir=run_state_dir(root, domain_dir, artifacts),
        results_dir=root / results_dir if results_dir else state_root(root) / "results",
        deploy_variant=deploy_variant,
    )


DEPLOY_VARIANTS = ("next", "broken")  # pipeline.deploy.VARIANTS (context imports no stage module)

# doit commands that only read the graph or its state: they take no run lock and never wait.
READ_ONLY_COMMANDS = frozenset({"list", "info", "help", "dumpdb", "tabcompletion"})
_DOIT_COMMANDS = READ_ONLY_COMMANDS | {"run", "clean", "forget", "ignore", "strace", "reset-dep", "auto"}
_LOADER_OPTIONS_WITH_VALUE = frozenset({"-f", "--file", "-d", "--dir"})


def doit_command(argv: list[str]) -> str:
    """The doit command an argument list runs, found as doit finds it (loader options and NAME=VALUE skipped).

    >>> doit_command(["domain=configs/demo", "list", "--all"]), doit_command(["-n", "2", "boot"])
    ('list', 'run')
    """
    args = list(argv)
    while args and args[0] in _LOADER_OPTIONS_WITH_VALUE | {"-k", "--seek-file"}:
        args = args[2:] if args[0] in _LOADER_OPTIONS_WITH_VALUE else args[1:]
    args = [a for a in args if a.startswith("-") or "=" not in a]
    return args[0] if args and args[0] in _DOIT_COMMANDS else "run"


def begin_run(ctx: Context, wait: float) -> RunLock:
    """Before doit opens the state: take the artifacts directory's run lock (waiting up to `wait` s for another run
    of this domain), then clear what a killed run left (named temporary files, VM disks of dead processes)."""
    lock = RunLock(ctx.root, ctx.domain_dir, ctx.artifacts_dir)
    lock.acquire(wait)
    for path in sweep_temps(ctx.artifacts_dir):
        say("cim", f"removed {path}, a temporary file a killed run left")
    _sweep_vm_dirs(ctx.state_dir / "vm")
    return lock


def _sweep_vm_dirs(vm_root: Path) -> None:
    """Remove the disks and sockets of VM work dirs whose run is gone (killed); their console logs stay."""
    if not vm_root.is_dir():
        return
    for workdir in vm_root.iterdir():
        pid = workdir.name.rsplit("-", 2)[-2] if workdir.name.count("-") >= 2 else ""
        if not pid.isdigit() or Path(f"/proc/{pid}").exists():
            continue
        for path in workdir.rglob("*"):
            if path.is_file() and not path.name.endswith(".log"):
                path.unlink(missing_ok=True)


class Evaluations:
    """This run's host evaluations: nix-eval-jobs or N long-lived `nix repl` evaluators, fed every host the run needs
    evaluated (pipeline.evaljobs chooses, pipeline.evalpool).

    The first `eval:<host>` action to run queues its own host and every host `plan()` named (the hosts whose eval
    task this run selected and whose flake digest is stale); each `eval:<host>` then waits for its own host only, so a
    host's build can start while others still evaluate.  Each `eval:<host>` saves only its own drvPaths, so a change
    to one host rebuilds only that host, and a host whose evaluation failed fails only its own task.
    """

    def __init__(self, domain_dir: Path) -> None:
        self.domain_dir = domain_dir
        self._lock = threading.Lock()
        self._wanted: set[str] = set()
        self._planned = False
        self._pool: Pool | None = None
        self._refused: nix.NixError | None = None
        self.selected: set[str] = set()  # hosts whose eval:<host> this run selected (set by the reporter)

    def plan(self, hosts: set[str]) -> None:
        """The hosts this run will evaluate (called once, before any eval action runs)."""
        with self._lock:
            self._wanted |= hosts
            self._planned = True

    @property
    def planned(self) -> bool:
        return self._planned

    def of(self, host: str) -> dict[str, str]:
        """The drvPaths of `host` (queued with the rest of the run's hosts on first demand); raises its NixError."""
        with self._lock:
            if self._pool is None and self._refused is None:
                try:
                    nix.check_nix_for_flake(self.domain_dir)
                    self._pool = open_pool(self.domain_dir)
                except nix.NixError as exc:  # every eval:<host> says it, before any evaluation
                    self._refused = exc
            if self._refused is not None:
                raise CimError(self._refused.message, self._refused.hint, self._refused.detail)
            assert self._pool is not None
            # A host the plan did not expect runs when doit runs tasks regardless of their status (`doit -a`):
            # then every selected host is expected to run.
            if not self._pool.stats.hosts:  # the first eval action queues every host the run will evaluate
                wanted = self._wanted if self._planned and host in self._wanted else self.selected
                queued = self._pool.submit(sorted(wanted | {host}))
                say("eval", f"{len(queued)} host(s) to evaluate: {describe(self._pool)}")
            futures = self._pool.submit([host])  # one host: an eval action costs the same for 10 or 10,000 hosts
        with step(f"eval:{host}", "evaluated", announce=False), progress(f"eval:{host}", "nix eval", nix.EVAL_TIMEOUT):
            outcome = futures[host].result()
        if isinstance(outcome, CimError):
            raise CimError(outcome.message, outcome.hint, outcome.detail)
        return outcome


def needed_tasks(tasks: dict[str, Any], selected: list[str]) -> set[str]:
    """Every task a doit run with these selected tasks reaches through task_dep (getargs and value_dep add theirs)."""
    seen: set[str] = set()
    todo = list(selected)
    while todo:
        name = todo.pop()
        if name in seen or name not in tasks:
            continue
        seen.add(name)
        todo.extend(tasks[name].task_dep)
        todo.extend(tasks[name].setup_tasks)
    return seen


def reporter_for(ctx: Context) -> type:
    """doit's console reporter, which also tells `ctx.evaluations` which eval tasks this run selected."""

    class Reporter(ConsoleReporter):  # type: ignore[misc]
        def initialize(self, tasks: dict[str, Any], selected_tasks: list[str]) -> None:
            super().initialize(tasks, selected_tasks)
            needed = needed_tasks(tasks, selected_tasks)
            ctx.evaluations.selected = {n.removeprefix("eval:") for n in needed if n.startswith("eval:")}
            # The graph is loaded (dodo.py collected once before it, then turned the cyclic GC off): the graph, which
            # lives as long as the run, is moved out of the GC's sight without a scan of it (a collection here took
            # 0.6 s at 10,000 hosts).
            gc.freeze()

        def execute_task(self, task: Any) -> None:
            # The collector runs again once a task's actions run (a group task has none), and watches only what the
            # run makes from there.  Until then doit only checks what is up to date, keeping what it reads for the
            # whole run (every task's saved values, a node per task): collecting that as it grew took 0.1 s of a
            # 10,000-host no-op.
            if task.actions and not gc.isenabled():
                gc.enable()
            super().execute_task(task)

    return Reporter
