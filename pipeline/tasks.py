"""The doit task graph of a domain: validate → eval:<host> → build:<artifact> → boot:<artifact> / install:<host> →
release.  Every `task_*` generator lives here; the stages' work lives in the library (nix, boot, install, artifacts).

Loading the graph runs no subprocess.  Each stage hands the next a small content-addressed fact through doit's saved
values: eval's derivation paths, build's image digest.  A stage re-runs only when the fact it consumes changed:
  eval:<host>        the digest of the flake's files (file_dep, checked by xxh3)
  build:<artifact>   its drvPath (from eval), or the published file no longer matching its digest
  boot:<artifact>    the image digest (from build) and the VM/probe spec
  install:<host>     the ISO digest, the disk-config digest and the install spec
"""

from __future__ import annotations

import functools
import os
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from doit.exceptions import TaskFailed
from doit.task import UptodateCalculator
from doit.tools import config_changed

from pipeline import boot, install, nix, process
from pipeline.artifacts import (
    MANIFEST,
    SUMS,
    ArtifactError,
    ArtifactRecord,
    BuildInfo,
    Records,
    atomic_write_text,
    publish_file,
    sweep_temps,
)
from pipeline.domain import Artifact, Domain
from pipeline.errors import CimError
from pipeline.hashing import XXH3Checker, xxh3_file, xxh3_text
from pipeline.log import say, step
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

    @functools.cached_property
    def records(self) -> Records:
        return Records(self.state_dir, self.artifacts_dir,
                       {"domain": self.domain.name, "fqdn": self.domain.fqdn, "domain_dir": str(self.domain_dir)})

    @functools.cached_property
    def files(self) -> list[str]:
        """The domain's flake files, walked once per run (validate and every eval depend on them)."""
        return flake_files(self.domain_dir)

    @property
    def machine_state(self) -> Path:
        """State shared by every domain of this checkout (the KVM verdict)."""
        return self.root / ".cim"

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
    return root / ".cim" / "state" / f"{domain_dir.name}-{xxh3_text(str(domain_dir))[:12]}"


def run_state_dir(root: Path, domain_dir: Path, artifacts_dir: Path) -> Path:
    """Where the doit DB, records, GC roots and VM work dirs of one domain *into one artifacts directory* live.

    State says what is published where, so it is keyed by both: `doit artifacts=NEW_DIR` after a run into artifacts/
    starts from nothing and publishes everything into NEW_DIR (the builds themselves are in the Nix store already).
    """
    artifacts_dir = (root / artifacts_dir).resolve()
    key = f"{artifacts_dir.name}-{xxh3_text(str(artifacts_dir))[:12]}"
    return state_dir_for(root, domain_dir) / "artifacts" / key


def make_context(root: Path, domain_dir: Path, artifacts_dir: Path | None = None) -> Context:
    """Load and check the domain directory (no subprocess: `validate.load_checked`); raises DomainError.

    State (the doit DB, records, VM work dirs) lives in `run_state_dir`: keyed by the domain's path and the artifacts
    directory, so two domains, two copies of one, or one domain into two directories never share cached facts.
    `artifacts_dir` defaults to <root>/artifacts.
    """
    domain_dir = (root / domain_dir).resolve()  # an absolute domain_dir stays as it is
    domain = load_checked(domain_dir)
    artifacts = (root / (artifacts_dir or "artifacts")).resolve()
    return Context(root=root, domain_dir=domain_dir, domain=domain, artifacts_dir=artifacts,
                   state_dir=run_state_dir(root, domain_dir, artifacts))


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
            log = Path(__file__).resolve().parent.parent / ".cim" / "last-traceback.txt"
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


def outputs_intact(ctx: Context) -> Callable[[Any, dict[str, Any]], bool]:
    """Up to date while every file the task published under *this run's* artifacts directory is still there with the
    digest it was published with: a task whose output was replaced or removed runs again.

    The action returns the files it published as "outputs" (paths relative to the artifacts directory); their stamps
    ([mtime, size, xxh3]) are saved after it ran, as a separate value, so that re-publishing the same bytes changes
    nothing a later task's `getargs` compares (doit re-runs a task whose getargs source returned something else).
    """

    def saved_stamps(task: Any) -> dict[str, Any]:
        stamps = {}
        for rel in task.values.get("outputs") or []:
            path = ctx.artifacts_dir / rel
            try:
                stat = path.stat()
                stamps[rel] = [stat.st_mtime, stat.st_size, xxh3_file(path)]
            except OSError:
                continue  # gone already: the next check finds it missing
        return {"stamps": stamps}

    def check(task: Any, values: dict[str, Any]) -> bool:
        task.value_savers.append(lambda: saved_stamps(task))
        stamps = values.get("stamps")
        if not isinstance(stamps, dict) or not stamps or set(stamps) != set(values.get("outputs") or []):
            return False
        checker = XXH3Checker()
        for rel, (mtime, size, digest) in stamps.items():
            path = ctx.artifacts_dir / rel
            try:
                stat = os.stat(path)
            except OSError:
                return False
            if checker.check_modified(str(path), stat, (mtime, size, digest)):
                return False
        return True

    return check


def published(ctx: Context, *paths: Path) -> list[str]:
    """The value "outputs" of a task: the files it published, relative to the artifacts directory."""
    return [str(p.relative_to(ctx.artifacts_dir)) for p in paths]


# -- validate ---------------------------------------------------------------------------------------------------------

@user_errors
def validate_action(ctx: Context) -> dict[str, Any]:
    checked = validate(ctx.domain_dir, ctx.files)
    say("validate", f"{ctx.domain_dir / 'domain.json'}: {len(checked.domain.hosts)} host(s), "
                    f"{len(checked.domain.artifacts())} image(s); {len(checked.nix_files)} .nix file(s) parse")
    keep = {a.name for a in ctx.domain.artifacts()}
    ctx.records.drop(keep)
    nix.drop_gc_roots(ctx.gcroots, keep)
    return {"hosts": sorted(ctx.domain.hosts), "nix_files": len(checked.nix_files)}


def task_validate(ctx: Context) -> dict[str, Any]:
    return {
        "doc": "validate domain.json (pydantic) and parse-check every .nix file",
        "actions": [(validate_action, [ctx])],
        "file_dep": ctx.files,
        "verbosity": 2,
    }


# -- eval -------------------------------------------------------------------------------------------------------------

@user_errors
def eval_action(ctx: Context, host: str) -> dict[str, str]:
    with step(f"eval:{host}", "evaluated", announce=False):
        drvs = nix.eval_host(ctx.domain_dir, host)
        for attr, drv in sorted(drvs.items()):
            say(f"eval:{host}", f"{attr} = {drv}")
    return drvs


def task_eval(ctx: Context) -> Iterator[dict[str, Any]]:
    for host in ctx.domain.hosts:
        yield {
            "name": host,
            "doc": f"nix eval the derivation paths of {host}",
            "actions": [(eval_action, [ctx, host])],
            "file_dep": ctx.files,
            "task_dep": ["validate"],
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
    plan = nix.plan_build(artifact.system, nix.local_facts(), ctx.domain.builders)
    say(name, f"building {drv}")
    say(name, f"strategy: {plan.describe()}")
    with step(name, "built", announce=False) as built:
        result = nix.build(drv, options=plan.options)
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
    ctx.records.save_build(name, ArtifactRecord(
        host=artifact.host, format=artifact.format.value, system=artifact.system.value, drvPath=drv,
        outPath=str(out), file=rel, size=size, sha256=sha256, xxh3=xxh3,
        build=BuildInfo(strategy=plan.strategy.value, reason=plan.reason, seconds=built.seconds,
                        log=f"{name}/build.log")))
    say(name, f"published {rel} ({size / 2**20:.1f} MiB, sha256 {sha256[:16]}…)")
    return {"drvPath": drv, "outPath": str(out), "path": str(dest), "file": rel, "size": size,
            "xxh3": xxh3, "sha256": sha256, "strategy": plan.strategy.value, "outputs": published(ctx, dest, build_log)}


def task_build(ctx: Context) -> Iterator[dict[str, Any]]:
    for artifact in ctx.domain.artifacts():
        yield {
            "name": artifact.name,
            "doc": f"nix build the {artifact.format.value} image of {artifact.host} ({artifact.system.value})",
            "actions": [(build_action, [ctx, artifact])],
            "getargs": {"drvs": (f"eval:{artifact.host}", None)},
            "uptodate": [value_dep(f"eval:{artifact.host}", artifact.format.attribute), outputs_intact(ctx)],
            "verbosity": 2,
        }


# -- boot -------------------------------------------------------------------------------------------------------------

@user_errors
def boot_action(ctx: Context, artifact: Artifact, image: dict[str, Any]) -> dict[str, Any]:
    name = artifact.name
    log = ctx.artifact_dir(name) / "boot.log"
    outcome = boot.boot_test(
        artifact, ctx.domain.hosts[artifact.host], ctx.artifacts_dir / image["file"], image["xxh3"],
        workdir=ctx.vm_dir(name), log_dest=log, log_name=f"{name}/boot.log",
        machine_state=ctx.machine_state, record=functools.partial(ctx.records.save_boot, name))
    return {"image_xxh3": image["xxh3"], "seconds": outcome.seconds, "outputs": published(ctx, log)}


def task_boot(ctx: Context) -> Iterator[dict[str, Any]]:
    for artifact in ctx.domain.artifacts():
        host = ctx.domain.hosts[artifact.host]
        yield {
            "name": artifact.name,
            "doc": f"boot {artifact.name} in QEMU and run its probes",
            "actions": [(boot_action, [ctx, artifact])],
            "getargs": {"image": (f"build:{artifact.name}", None)},
            "uptodate": [value_dep(f"build:{artifact.name}", "xxh3"),
                         config_changed(boot.fingerprint(artifact, host)), outputs_intact(ctx)],
            "verbosity": 2,
        }


# -- install ----------------------------------------------------------------------------------------------------------

@user_errors
def install_action(ctx: Context, host_name: str, image: dict[str, Any]) -> dict[str, Any]:
    artifact = f"{host_name}-iso"
    log = ctx.artifact_dir(artifact) / "install.log"
    outcome = install.verify(
        host_name, ctx.domain.hosts[host_name], ctx.domain_dir, ctx.artifacts_dir / image["file"], image["xxh3"],
        workdir=ctx.vm_dir(f"{host_name}-install"), log_dest=log,
        log_name=f"{artifact}/install.log", record=functools.partial(ctx.records.save_install, artifact))
    return {"iso_xxh3": image["xxh3"], "seconds": outcome.seconds, "outputs": published(ctx, log)}


def install_fingerprint(ctx: Context, host_name: str) -> str:
    """What, besides the ISO and the disk-config file, decides an install test."""
    host = ctx.domain.hosts[host_name]
    assert host.install is not None
    return xxh3_text(host.install.disk, str(install.disk_mib(host)), str(host.boot.memory_mib))


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
            "uptodate": [value_dep(f"build:{host_name}-iso", "xxh3"),
                         config_changed(install_fingerprint(ctx, host_name)), outputs_intact(ctx)],
            "verbosity": 2,
        }


# -- release ----------------------------------------------------------------------------------------------------------

@user_errors
def release_action(ctx: Context) -> dict[str, Any]:
    manifest = ctx.records.rebuild()
    problems = []
    for name, record in manifest.artifacts.items():
        # Content was checked by each build:<artifact> this run (published_intact); here only that it is there.
        path = ctx.artifacts_dir / record.file
        if not path.is_file() or path.stat().st_size != record.size:
            problems.append(f"{name}: {path} does not match its build record")
        if record.boot is None or record.boot.result != "pass":
            problems.append(f"{name}: boot test has not passed")
    if problems:
        raise ArtifactError("release refused: " + "; ".join(problems) + ".",
                            hint="Run `doit` again to rebuild and re-test them.")
    say("release", f"{len(manifest.artifacts)} artifact(s) in {ctx.artifacts_dir / MANIFEST}, "
                   f"checksums in {ctx.artifacts_dir / SUMS}")
    return {"artifacts": sorted(manifest.artifacts),
            "outputs": published(ctx, ctx.artifacts_dir / MANIFEST, ctx.artifacts_dir / SUMS)}


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
        "uptodate": [records_unchanged(ctx), outputs_intact(ctx)],
        "verbosity": 2,
    }
