"""The doit task graph of a domain: validate → eval:<host> → build:<artifact> → boot:<artifact> / install:<host> →
release.  Every `task_*` generator lives here; the stages' work lives in the library (nix, boot, install, artifacts).

Loading the graph runs no subprocess.  Each stage hands the next a small content-addressed fact through doit's saved
values: eval's derivation paths, build's image digest.  A stage re-runs only when the fact it consumes changed:
  eval:<host>        the digest of the flake's files (validate's saved value `flake`; validate alone has them as
                     file_dep, checked by xxh3, so a 1,000-host graph checks each file once, not once per host)
  build:<artifact>   its drvPath (from eval), or the published file no longer matching its digest
  boot:<artifact>    the image digest (from build) and the VM/probe spec
  install:<host>     the ISO digest, the disk-config digest and the install spec
  check:<artifact>   its drvPath (not in the default run: it rebuilds the image to prove it reproducible)
A boot or install that passed is kept in the state root's results/ (.cim/results) by image digest and spec
(pipeline.results): when its published log is gone the task runs, finds the pass and re-publishes it without a VM.
"""

from __future__ import annotations

import functools
import json
import os
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from doit.exceptions import TaskFailed
from doit.reporter import ConsoleReporter
from doit.task import UptodateCalculator

from pipeline import boot, install, nix, process, reproduce
from pipeline.artifacts import (
    JUNIT,
    MANIFEST,
    SUMS,
    ArtifactError,
    ArtifactRecord,
    BootResult,
    BuildInfo,
    InstallResult,
    Records,
    ReproducibilityCheck,
    atomic_write_text,
    publish_file,
    sweep_temps,
    utc_now,
)
from pipeline.domain import Artifact, Domain, Host, Sandbox
from pipeline.errors import CimError
from pipeline.hashing import XXH3Checker, xxh3_file, xxh3_files, xxh3_text
from pipeline.log import last_line_of, progress, say, step
from pipeline.paths import state_root
from pipeline.results import PassStore
from pipeline.runlock import RunLock
from pipeline.validate import flake_files, load_checked, validate


@dataclass(frozen=True)
class Context:
    """One run's paths and domain."""

    root: Path
    domain_dir: Path
    domain: Domain
    artifacts_dir: Path
    state_dir: Path
    results_dir: Path

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
    root: Path, domain_dir: Path, artifacts_dir: Path | None = None, results_dir: Path | None = None
) -> Context:
    """Load and check the domain directory (no subprocess: `validate.load_checked`); raises DomainError.

    State (the doit DB, records, VM work dirs) lives in `run_state_dir`: keyed by the domain's path and the artifacts
    directory, so two domains, two copies of one, or one domain into two directories never share cached facts.
    `artifacts_dir` defaults to <root>/artifacts.  Passed boots and installs are content-addressed, so they are
    shared: `results_dir` defaults to results/ in the state root (pipeline.paths: $CIM_STATE or <root>/.cim).
    """
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
    )


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


def user_errors(action: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the library's errors (CimError) into a doit failure carrying just their message and hint."""

    @functools.wraps(action)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with process.busy():  # a signal's clean stop waits for this thread to keep its logs and records
                return action(*args, **kwargs)
        except CimError as exc:
            return TaskFailed(exc.report())
        except KeyboardInterrupt:
            raise
        except Exception as exc:
            log = state_root(Path(__file__).resolve().parent.parent) / "last-traceback.txt"
            log.parent.mkdir(exist_ok=True)
            log.write_text(traceback.format_exc())
            return TaskFailed(f"internal error: {type(exc).__name__}: {exc} (traceback in {log}; please report it)")

    return wrapper


# -- uptodate calculators ---------------------------------------------------------------------------------------------


class value_dep(UptodateCalculator):  # type: ignore[misc]
    """Up to date while one saved value of another task (e.g. eval's drvPath) is what it was at our last success."""

    def __init__(self, dep_task: str, key: str) -> None:
        self.dep_task = dep_task
        self.key = key
        self.saved_as = f"_value:{dep_task}:{key}"

    def configure_task(self, task: Any) -> None:
        task.task_dep.append(self.dep_task)

    def _current(self) -> Any:
        return (self.get_val(self.dep_task, "_values_:") or {}).get(self.key)

    def __call__(self, task: Any, values: dict[str, Any]) -> bool:
        task.value_savers.append(lambda: {self.saved_as: self._current()})
        current = self._current()
        return current is not None and values.get(self.saved_as) == current


class spec_dep:
    """Up to date while a spec (what decides a test besides its image) is the one of our last success.

    Like doit's `config_changed`, but the spec itself is saved beside its digest, so that `cim explain` can name the
    field that changed and its old value: `hosts.vhost-dev.boot.memory_mib: 1024 → 2048`.  The spec is made when doit
    (or `cim explain`) checks the task, not when the graph loads: a 1,000-host graph would otherwise build 1,000 probe
    lists just to run `doit eval`.
    """

    def __init__(self, make: Callable[[], dict[str, Any]]) -> None:
        self.make = make

    @functools.cached_property
    def spec(self) -> dict[str, Any]:
        return self.make()

    @functools.cached_property
    def digest(self) -> str:
        return xxh3_text(json.dumps(self.spec, sort_keys=True))

    def __call__(self, task: Any, values: dict[str, Any]) -> bool:
        task.value_savers.append(lambda: {"spec_digest": self.digest, "spec": self.spec})
        return bool(values.get("spec_digest") == self.digest)


class outputs_intact:
    """Up to date while every file the task published under *this run's* artifacts directory is still there with the
    digest it was published with: a task whose output was replaced or removed runs again.

    The action returns the files it published as "outputs" (paths relative to the artifacts directory); their stamps
    ([mtime, size, xxh3]) are saved after it ran, as a separate value, so that re-publishing the same bytes changes
    nothing a later task's `getargs` compares (doit re-runs a task whose getargs source returned something else).
    """

    def __init__(self, artifacts_dir: Path) -> None:
        self.artifacts_dir = artifacts_dir

    def _stamps(self, task: Any) -> dict[str, Any]:
        stamps = {}
        for rel in task.values.get("outputs") or []:
            path = self.artifacts_dir / rel
            try:
                stat = path.stat()
                stamps[rel] = [stat.st_mtime, stat.st_size, xxh3_file(path)]
            except OSError:
                continue  # gone already: the next check finds it missing
        return {"stamps": stamps}

    def problems(self, values: dict[str, Any]) -> list[str]:
        """Why the outputs are not intact, in words (none when they are)."""
        stamps = values.get("stamps")
        outputs = values.get("outputs") or []
        if not isinstance(stamps, dict) or not stamps:
            return ["no published file is recorded for it"]
        found = [f"the published {rel} was not stamped at its last run" for rel in outputs if rel not in stamps]
        checker = XXH3Checker()
        for rel, (mtime, size, digest) in stamps.items():
            path = self.artifacts_dir / rel
            try:
                stat = os.stat(path)
            except OSError:
                found.append(f"the published {rel} is missing")
                continue
            if checker.check_modified(str(path), stat, (mtime, size, digest)):
                found.append(f"the published {rel} no longer has the digest it was published with")
        return found

    def __call__(self, task: Any, values: dict[str, Any]) -> bool:
        task.value_savers.append(lambda: self._stamps(task))
        return not self.problems(values)


def relative_outputs(ctx: Context, *paths: Path) -> list[str]:
    """The value "outputs" of a task: the files it published, relative to the artifacts directory."""
    return [str(p.relative_to(ctx.artifacts_dir)) for p in paths]


# -- validate ---------------------------------------------------------------------------------------------------------


@user_errors
def validate_action(ctx: Context) -> dict[str, Any]:
    checked = validate(ctx.domain_dir, ctx.files)
    say(
        "validate",
        f"{ctx.domain_dir / 'domain.json'}: {len(checked.domain.hosts)} host(s), "
        f"{len(checked.domain.artifacts())} image(s); {len(checked.nix_files)} .nix file(s) parse",
    )
    keep = {a.name for a in ctx.domain.artifacts()}
    ctx.records.drop(keep)
    nix.drop_gc_roots(ctx.gcroots, keep)
    # The one fact every eval:<host> consumes: the digest of the flake's inputs.
    flake = xxh3_files([Path(f) for f in ctx.files], ctx.domain_dir)
    return {"hosts": sorted(ctx.domain.hosts), "nix_files": len(checked.nix_files), "flake": flake}


def task_validate(ctx: Context) -> dict[str, Any]:
    return {
        "doc": "validate domain.json (pydantic) and parse-check every .nix file",
        "actions": [(validate_action, [ctx])],
        "file_dep": ctx.files,
        "verbosity": 2,
    }


# -- eval -------------------------------------------------------------------------------------------------------------


class Evaluations:
    """This run's host evaluations: one `nix eval` process for every host the run needs evaluated.

    The first `eval:<host>` action to run evaluates, in one batch, its own host and every host `plan()` named (the
    hosts whose eval task this run selected and whose flake digest is stale); later ones find their result here.
    Each `eval:<host>` still saves only its own drvPaths, so a change to one host rebuilds only that host, and a host
    whose evaluation failed fails only its own task.  doit's thread pool may run several eval actions at once: the lock
    makes them share the one evaluation.
    """

    def __init__(self, domain_dir: Path) -> None:
        self.domain_dir = domain_dir
        self._lock = threading.Lock()
        self._wanted: set[str] = set()
        self._planned = False
        self._results: dict[str, nix.EvalOutcome] = {}
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
        """The drvPaths of `host`, evaluated (with the rest of the batch) on first demand; raises its NixError."""
        with self._lock:
            if host not in self._results:
                # A host the plan did not expect runs when doit runs tasks regardless of their status (`doit -a`):
                # then every selected host is expected to run.
                wanted = self._wanted if self._planned and host in self._wanted else self.selected
                todo = sorted((wanted - self._results.keys()) | {host})
                what = f"evaluated {len(todo)} hosts in one nix eval" if len(todo) > 1 else "evaluated"
                prefix = "eval" if len(todo) > 1 else f"eval:{host}"
                with step(prefix, what, announce=False), progress(prefix, "nix eval", nix.EVAL_TIMEOUT):
                    self._results.update(nix.eval_hosts(self.domain_dir, todo))
            outcome = self._results[host]
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

    return Reporter


class flake_dep(value_dep):
    """eval:<host>'s uptodate: the flake digest validate saved.  Its first call plans the run's batch: every selected
    eval:<host> whose saved digest differs from the current one (what this check says of each of them)."""

    def __init__(self, ctx: Context) -> None:
        super().__init__("validate", "flake")
        self.ctx = ctx

    def __call__(self, task: Any, values: dict[str, Any]) -> bool:
        evaluations = self.ctx.evaluations
        if not evaluations.planned:
            current = self._current()
            stale = set()
            for host in evaluations.selected:
                saved = self.get_val(f"eval:{host}", "_values_:") or {}
                if current is None or saved.get(self.saved_as) != current:
                    stale.add(host)
            evaluations.plan(stale)
        return bool(super().__call__(task, values))


@user_errors
def eval_action(ctx: Context, host: str) -> dict[str, str]:
    drvs = ctx.evaluations.of(host)
    for attr, drv in sorted(drvs.items()):
        say(f"eval:{host}", f"{attr} = {drv}")
    return drvs


def task_eval(ctx: Context) -> Iterator[dict[str, Any]]:
    for host in ctx.domain.hosts:
        yield {
            "name": host,
            "doc": f"nix eval the derivation paths of {host}",
            "actions": [(eval_action, [ctx, host])],
            "uptodate": [flake_dep(ctx)],
            "verbosity": 2,
        }


# -- build ------------------------------------------------------------------------------------------------------------


@user_errors
def build_action(ctx: Context, artifact: Artifact, drvs: dict[str, str]) -> dict[str, Any]:
    name = artifact.name
    drv = drvs.get(artifact.format.attribute)
    if not drv:
        raise nix.NixError(
            f"nixosConfigurations.{artifact.host}.config.system.build.{artifact.format.attribute} does not exist in "
            f"{ctx.domain_dir / 'flake.nix'}, but domain.json asks for a {artifact.format.value} image of "
            f"{artifact.host}.",
            hint=f"Add it to the flake or remove '{artifact.format.value}' from hosts.{artifact.host}.images.",
        )
    sandbox, _ = nix.sandbox_settings()  # where Nix cannot sandbox, say so before anything is built
    if sandbox is not Sandbox.on:
        say(name, f"sandbox: {sandbox.value} ({nix.SANDBOX_VARIABLE}): this image is not built hermetically")
    plan = nix.plan_build(artifact.system, nix.local_facts(), ctx.domain.builders)
    say(name, f"building {drv}")
    say(name, f"strategy: {plan.describe()}")
    live_log = ctx.state_dir / "build" / f"{name}.log"  # nix's log as it comes: its last line shows in the progress
    with (
        step(name, "built", announce=False) as built,
        progress(name, "nix build", nix.BUILD_TIMEOUT, functools.partial(last_line_of, live_log)),
    ):
        result = nix.build(drv, options=plan.options, log_file=live_log)
    out = Path(result.outputs["out"])
    product = nix.hydra_product(out, artifact.format.product_type)
    dest_dir = ctx.artifact_dir(name)
    dest = dest_dir / product.name
    sha256, xxh3, size = publish_file(product, dest)
    build_log = dest_dir / "build.log"
    atomic_write_text(build_log, result.log)
    for stale in dest_dir.glob(f"*{artifact.format.extension}"):
        if stale != dest:
            stale.unlink()
    # The published image keeps its build in the Nix store: nix-collect-garbage frees older builds, not this one.
    nix.add_gc_root(out, ctx.gcroots / name)
    rel = str(dest.relative_to(ctx.artifacts_dir))
    # Boot and install results belong to the bytes they tested: save_build drops them for new bytes.
    ctx.records.save_build(
        name,
        ArtifactRecord(
            host=artifact.host,
            format=artifact.format.value,
            system=artifact.system.value,
            drvPath=drv,
            outPath=str(out),
            file=rel,
            size=size,
            sha256=sha256,
            xxh3=xxh3,
            build=BuildInfo(
                strategy=plan.strategy,
                sandbox=result.sandbox,
                reason=plan.reason,
                seconds=built.seconds,
                log=f"{name}/build.log",
                at=utc_now(),
            ),
        ),
    )
    say(name, f"published {rel} ({size / 2**20:.1f} MiB, sha256 {sha256[:16]}…)")
    return {
        "drvPath": drv,
        "outPath": str(out),
        "path": str(dest),
        "file": rel,
        "size": size,
        "xxh3": xxh3,
        "sha256": sha256,
        "strategy": plan.strategy.value,
        "outputs": relative_outputs(ctx, dest, build_log),
    }


def task_build(ctx: Context) -> Iterator[dict[str, Any]]:
    for artifact in ctx.domain.artifacts():
        yield {
            "name": artifact.name,
            "doc": f"nix build the {artifact.format.value} image of {artifact.host} ({artifact.system.value})",
            "actions": [(build_action, [ctx, artifact])],
            "getargs": {"drvs": (f"eval:{artifact.host}", None)},
            "uptodate": [
                value_dep(f"eval:{artifact.host}", artifact.format.attribute),
                outputs_intact(ctx.artifacts_dir),
            ],
            "verbosity": 2,
        }


# -- boot -------------------------------------------------------------------------------------------------------------


def boot_outputs(ctx: Context, artifact: str, host: Host) -> list[Path]:
    """What a boot publishes: the console log, and the hardware report where the host sends one."""
    outputs = [ctx.artifact_dir(artifact) / "boot.log"]
    if boot.reports_inventory(host):
        outputs.append(ctx.artifact_dir(artifact) / "inventory.json")
    return outputs


@user_errors
def boot_action(ctx: Context, artifact: Artifact, image: dict[str, Any]) -> dict[str, Any]:
    name = artifact.name
    host = ctx.domain.hosts[artifact.host]
    fingerprint = boot.fingerprint(artifact, ctx.domain, ctx.domain_dir)
    log_dest = ctx.artifact_dir(name) / "boot.log"
    report = ctx.state_dir / "inventory" / f"{name}.json"  # the hardware report this boot received
    kept_files = {"boot.log": log_dest, **({"inventory.json": report} if boot.reports_inventory(host) else {})}
    kept = ctx.passes.find("boot", image["xxh3"], fingerprint, tuple(kept_files))
    if kept:
        # These bytes passed this VM before (only the policy or the declared hardware may have changed): the
        # result, its console log and its hardware report come back from the pass store, no VM boots.
        outcome = BootResult.model_validate(kept.restore(kept_files))
        ctx.records.save_boot(name, outcome)
        say(
            name,
            f"these bytes passed this boot test before: result, console log and hardware report "
            f"re-published from {kept.path}, no VM",
        )
    else:
        report.unlink(missing_ok=True)
        outcome = boot.boot_test(
            artifact,
            ctx.domain,
            ctx.domain_dir,
            ctx.artifacts_dir / image["file"],
            image["xxh3"],
            workdir=ctx.vm_dir(name),
            log_dest=log_dest,
            log_name=f"{name}/boot.log",
            machine_state=ctx.machine_state,
            record=functools.partial(ctx.records.save_boot, name),
            report_keep=report,
        )
        if outcome.result == "pass":
            ctx.passes.keep(
                "boot",
                image["xxh3"],
                fingerprint,
                outcome.model_dump(mode="json"),
                {n: f for n, f in kept_files.items() if f.exists()},
            )
    if boot.reports_inventory(host):
        boot.reconcile_inventory(
            artifact,
            host,
            ctx.domain.inventory,
            report=report,
            published=ctx.artifact_dir(name) / "inventory.json",
            report_name=f"{name}/inventory.json",
            image_xxh3=image["xxh3"],
            accel=outcome.accel,
            log_dest=log_dest,
            log_name=f"{name}/boot.log",
            record=functools.partial(ctx.records.save_inventory, name),
        )
    return {
        "image_xxh3": image["xxh3"],
        "seconds": outcome.seconds,
        "outputs": relative_outputs(ctx, *boot_outputs(ctx, artifact.name, host)),
    }


def task_boot(ctx: Context) -> Iterator[dict[str, Any]]:
    for artifact in ctx.domain.artifacts():
        yield {
            "name": artifact.name,
            "doc": f"boot {artifact.name} in QEMU, run its probes and reconcile its hardware report",
            "actions": [(boot_action, [ctx, artifact])],
            "getargs": {"image": (f"build:{artifact.name}", None)},
            # The VM and probe spec decide the boot; the policy and the declared hardware only the reconcile,
            # which a change of them re-runs from the kept report without a VM (boot_action).
            "uptodate": [
                value_dep(f"build:{artifact.name}", "xxh3"),
                spec_dep(functools.partial(boot.spec, artifact, ctx.domain, ctx.domain_dir, ctx.domain.inventory)),
                outputs_intact(ctx.artifacts_dir),
            ],
            "verbosity": 2,
        }


# -- install ----------------------------------------------------------------------------------------------------------


@user_errors
def install_action(ctx: Context, host_name: str, image: dict[str, Any]) -> dict[str, Any]:
    artifact = f"{host_name}-iso"
    host = ctx.domain.hosts[host_name]
    log_dest = ctx.artifact_dir(artifact) / "install.log"
    # A pass is kept by the ISO's bytes and everything else that decides the install: the plan the installer is
    # handed (from disk-config.nix and the disk size), the disk it installs onto, the VM's memory.
    plan = install.plan_for(ctx.domain_dir, host_name, host)
    spec = xxh3_text(json.dumps(install.spec(host_name, host), sort_keys=True), plan.installer_text())
    kept = ctx.passes.find("install", image["xxh3"], spec, ("install.log",))
    if kept:
        reused = InstallResult.model_validate(kept.restore({"install.log": log_dest}))
        ctx.records.save_install(artifact, reused)
        say(
            f"install:{host_name}",
            f"this ISO passed this install before: result and log re-published from {kept.path}, no VM",
        )
        return {
            "iso_xxh3": image["xxh3"],
            "seconds": reused.seconds,
            "reused": True,
            "outputs": relative_outputs(ctx, log_dest),
        }
    outcome = install.verify(
        host_name,
        host,
        ctx.domain_dir,
        ctx.artifacts_dir / image["file"],
        image["xxh3"],
        workdir=ctx.vm_dir(f"{host_name}-install"),
        log_dest=log_dest,
        log_name=f"{artifact}/install.log",
        record=functools.partial(ctx.records.save_install, artifact),
        machine_state=ctx.machine_state,
    )
    if outcome.result == "pass":
        ctx.passes.keep("install", image["xxh3"], spec, outcome.model_dump(mode="json"), {"install.log": log_dest})
    return {"iso_xxh3": image["xxh3"], "seconds": outcome.seconds, "outputs": relative_outputs(ctx, log_dest)}


def task_install(ctx: Context) -> Iterator[dict[str, Any]]:
    for host_name in install.installable_hosts(ctx.domain):
        host = ctx.domain.hosts[host_name]
        assert host.install is not None
        yield {
            "name": host_name,
            "doc": f"install {host_name} from its ISO onto a blank disk, then boot the disk alone",
            "actions": [(install_action, [ctx, host_name])],
            "getargs": {"image": (f"build:{host_name}-iso", None)},
            "file_dep": [str(ctx.domain_dir / host.install.disk_config)],
            "uptodate": [
                value_dep(f"build:{host_name}-iso", "xxh3"),
                spec_dep(functools.partial(install.spec, host_name, host)),
                outputs_intact(ctx.artifacts_dir),
            ],
            "verbosity": 2,
        }


# -- check (reproducibility) ------------------------------------------------------------------------------------------


@user_errors
def check_action(ctx: Context, artifact: Artifact, image: dict[str, Any]) -> dict[str, Any] | TaskFailed:
    name, task = artifact.name, f"check:{artifact.name}"
    plan = nix.plan_build(artifact.system, nix.local_facts(), ctx.domain.builders)
    say(task, f"checking {image['drvPath']} and what it is made from ({plan.describe()})")
    result = reproduce.check(image["drvPath"], options=plan.options, progress=lambda line: say(task, line))
    ctx.records.save_check(
        name,
        ReproducibilityCheck(
            reproducible=result.reproducible,
            sha256=image["sha256"],
            derivations=result.derivations,
            seconds=result.seconds,
            derivation=result.derivation or None,
            differs=result.differs or None,
        ),
    )
    if not result.reproducible:
        return TaskFailed(
            f"{name} is not reproducible: {result.derivation} gave other bytes when rebuilt; first "
            f"difference: {result.differs}. Find what its builder takes from the clock, the build "
            "machine or chance, and fix it."
        )
    say(
        task,
        f"reproducible: {len(result.derivations)} derivation(s) rebuilt bit for bit in {result.seconds} s; "
        f"image sha256 {image['sha256']}",
    )
    return {"drvPath": image["drvPath"], "sha256": image["sha256"], "derivations": result.derivations}


def task_check(ctx: Context) -> Iterator[dict[str, Any]]:
    for artifact in ctx.domain.artifacts():
        yield {
            "name": artifact.name,
            "doc": f"rebuild {artifact.name} and the derivations it is made from; fail unless bit for bit the same",
            "actions": [(check_action, [ctx, artifact])],
            "getargs": {"image": (f"build:{artifact.name}", None)},
            "uptodate": [value_dep(f"build:{artifact.name}", "drvPath")],
            "verbosity": 2,
        }


# -- release ----------------------------------------------------------------------------------------------------------


@user_errors
def release_action(ctx: Context) -> dict[str, Any]:
    manifest = ctx.records.rebuild()
    problems = []
    for name, record in manifest.artifacts.items():
        # Content was checked by each build:<artifact> this run (outputs_intact); here only that it is there.
        path = ctx.artifacts_dir / record.file
        if not path.is_file() or path.stat().st_size != record.size:
            problems.append(f"{name}: {path} does not match its build record")
        if record.boot is None or record.boot.result != "pass":
            problems.append(f"{name}: boot test has not passed")
        if record.inventory is not None and record.inventory.result != "pass":
            problems.append(f"{name}: hardware inventory differs under policy 'enforce' ({record.inventory.summary})")
    if problems:
        raise ArtifactError(
            "release refused: " + "; ".join(problems) + ".", hint="Run `doit` again to rebuild and re-test them."
        )
    say(
        "release",
        f"{len(manifest.artifacts)} artifact(s) in {ctx.artifacts_dir / MANIFEST}, "
        f"checksums in {ctx.artifacts_dir / SUMS}",
    )
    return {
        "artifacts": sorted(manifest.artifacts),
        "outputs": relative_outputs(ctx, *(ctx.artifacts_dir / name for name in (MANIFEST, SUMS, JUNIT))),
    }


def records_unchanged(ctx: Context) -> Callable[[Any, dict[str, Any]], bool]:
    """Up to date while every artifact record (digests, boot and install results) is what the last release saw."""

    def digest() -> str:
        return xxh3_text(ctx.records.digest_source())

    def check(task: Any, values: dict[str, Any]) -> bool:
        task.value_savers.append(lambda: {"records": digest()})
        return values.get("records") == digest()

    return check


def task_release(ctx: Context) -> dict[str, Any]:
    deps = [f"boot:{a.name}" for a in ctx.domain.artifacts()]
    deps += [f"install:{h}" for h in install.installable_hosts(ctx.domain)]
    return {
        "doc": "write artifacts/manifest.json and SHA256SUMS for every tested image",
        "actions": [(release_action, [ctx])],
        "task_dep": deps,
        "uptodate": [records_unchanged(ctx), outputs_intact(ctx.artifacts_dir)],
        "verbosity": 2,
    }


def creators(ctx: Context) -> dict[str, Callable[[], Any]]:
    """The task creators of `ctx`'s graph by name, as doit loads them from dodo.py (and `cim status` from here)."""
    return {
        "task_validate": lambda: task_validate(ctx),
        "task_eval": lambda: task_eval(ctx),
        "task_build": lambda: task_build(ctx),
        "task_boot": lambda: task_boot(ctx),
        "task_install": lambda: task_install(ctx),
        "task_release": lambda: task_release(ctx),
    }
