"""The doit task graph of a domain: validate → eval:<host> → build:<artifact> → boot:<artifact> / install:<host> →
release.

Loading the graph runs no subprocess.  Each stage hands the next a small content-addressed fact through doit's saved
values: eval's derivation paths, build's image digest.  A stage re-runs only when the fact it consumes changed:
  eval:<host>        the digest of the flake's files (file_dep, checked by xxh3)
  build:<artifact>   its drvPath (from eval), or the published file no longer matching its digest
  boot:<artifact>    the image digest (from build) and the VM/probe spec
  install:<host>     the ISO digest, the disk-config digest and the install spec
  check:<artifact>   its drvPath (not in the default run: it rebuilds the image to prove it reproducible)
A boot or install that passed is kept in .cim/results by image digest and spec (pipeline.results): when its
published log is gone the task runs, finds the pass and re-publishes it without a VM.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from doit.exceptions import TaskFailed
from doit.task import UptodateCalculator
from doit.tools import config_changed

from pipeline import nix, probes, reproduce
from pipeline.artifacts import ArtifactError, Records, publish_file, publish_log
from pipeline.diskplan import DiskPlanError
from pipeline.domain import Artifact, Domain, DomainError, Format, ProbeKind, System, load_domain
from pipeline.hashing import XXH3Checker, xxh3_text
from pipeline.process import ProcessTimeout, run
from pipeline.qemu import Drive, Firmware, Vm, VmError, VmSpec, choose_accel, free_port
from pipeline.results import PassStore

# Errors whose message is for the user: a task that hits one fails with that message and no traceback.
USER_ERRORS: tuple[type[Exception], ...] = (DomainError, nix.NixError, VmError, ArtifactError, ProcessTimeout,
                                            DiskPlanError)


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
        return Records(self.state_dir, self.artifacts_dir,
                       {"domain": self.domain.name, "fqdn": self.domain.fqdn, "domain_dir": str(self.domain_dir)})

    @functools.cached_property
    def passes(self) -> PassStore:
        """Boots and installs that passed, by image digest and spec: shared by every domain of this checkout."""
        return PassStore(self.results_dir)

    @functools.cached_property
    def files(self) -> list[str]:
        """The domain's flake files, walked once per run (validate and every eval depend on them)."""
        return domain_files(self.domain_dir)

    def artifact_dir(self, artifact: str) -> Path:
        return self.artifacts_dir / artifact

    def vm_dir(self, name: str) -> Path:
        """A fresh, unique working directory for one VM run (sockets, firmware variables, raw console log)."""
        path = self.state_dir / "vm" / f"{name}-{os.getpid()}-{time.monotonic_ns()}"
        path.mkdir(parents=True)
        return path


def state_dir_for(root: Path, domain_dir: Path) -> Path:
    """Where a domain's doit DB, records and VM work dirs live: .cim/state/<dir name>-<hash of its path>."""
    domain_dir = (root / domain_dir).resolve()
    return root / ".cim" / "state" / f"{domain_dir.name}-{xxh3_text(str(domain_dir))[:12]}"


def make_context(root: Path, domain_dir: Path, artifacts_dir: Path | None = None,
                 results_dir: Path | None = None) -> Context:
    """Load and validate the domain; raises DomainError with the user's message.

    State (the doit DB, records, VM work dirs) lives in .cim/state/<domain>-<hash of its path>, so two domains, or
    two copies of one, never share cached facts.  `artifacts_dir` defaults to <root>/artifacts.  Passed boots and
    installs are content-addressed, so they are shared: `results_dir` defaults to <root>/.cim/results.
    """
    domain_dir = (root / domain_dir).resolve()  # an absolute domain_dir stays as it is
    domain = load_domain(domain_dir)
    if not (domain_dir / "flake.nix").is_file():
        raise DomainError(
            f"{domain_dir / 'flake.nix'}: file not found. A domain directory needs a flake.nix exposing "
            "nixosConfigurations.<host> for every host in domain.json (see configs/demo/flake.nix)."
        )
    for name, host in domain.hosts.items():
        if host.install and not (domain_dir / host.install.disk_config).is_file():
            raise DomainError(
                f"{domain_dir / 'domain.json'}: field 'hosts.{name}.install.disk_config' names "
                f"{host.install.disk_config}, which does not exist in {domain_dir}. Add the disko file or fix the name."
            )
    return Context(root=root, domain_dir=domain_dir, domain=domain, artifacts_dir=root / (artifacts_dir or "artifacts"),
                   state_dir=state_dir_for(root, domain_dir),
                   results_dir=root / (results_dir or Path(".cim") / "results"))


def domain_files(domain_dir: Path) -> list[str]:
    """The files that make up the flake: what the flake-input digest covers (flake.lock included)."""
    files = []
    for dirpath, dirnames, filenames in os.walk(domain_dir):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if name.startswith(".") or name.startswith("result") or path.is_symlink():
                continue
            files.append(str(path))
    return files


def say(task: str, message: str) -> None:
    """A line in the run's log, prefixed by the task (the machine, for VMs)."""
    # One write per line: under `doit -n 2` another task's output must not land inside it.
    sys.stdout.write(f"[{task}] {message}\n")
    sys.stdout.flush()


def user_errors(action: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the library's typed errors into a doit failure carrying just their message."""

    @functools.wraps(action)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return action(*args, **kwargs)
        except USER_ERRORS as exc:
            return TaskFailed(str(exc))
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


def published_intact(task: Any, values: dict[str, Any]) -> bool:
    """Up to date while the file a build published still has the digest it was published with."""
    path, digest, size, mtime = (values.get(k) for k in ("path", "xxh3", "size", "mtime"))
    if not path or not digest or size is None or mtime is None:
        return False
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return False
    return not XXH3Checker().check_modified(path, stat, (mtime, size, digest))


def published(*paths: Path) -> Callable[[Any, dict[str, Any]], bool]:
    """Up to date only while the files a task published are there: a deleted log makes its task run (and find its
    result in .cim/results rather than boot again)."""

    def check(task: Any, values: dict[str, Any]) -> bool:
        return all(path.is_file() for path in paths)

    return check


# -- validate ---------------------------------------------------------------------------------------------------------

@user_errors
def validate_action(ctx: Context) -> dict[str, Any]:
    nix_files = sorted(Path(f) for f in ctx.files if f.endswith(".nix"))
    for path in nix_files:
        try:
            proc = run(["nix-instantiate", "--parse", str(path)], timeout=60)
        except FileNotFoundError:
            raise nix.NixError("nix-instantiate is not installed.", hint="Run scripts/setup.sh.") from None
        if proc.returncode != 0:
            raise DomainError(f"{path}: Nix syntax error. Fix it and run again.\n{proc.stderr.strip()}")
    say("validate", f"{ctx.domain_dir / 'domain.json'}: {len(ctx.domain.hosts)} host(s), "
                    f"{len(ctx.domain.artifacts())} image(s); {len(nix_files)} .nix file(s) parse")
    ctx.records.drop({a.name for a in ctx.domain.artifacts()})
    return {"hosts": sorted(ctx.domain.hosts), "nix_files": len(nix_files)}


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
    started = time.monotonic()
    drvs = nix.eval_host(ctx.domain_dir, host)
    for attr, drv in sorted(drvs.items()):
        say(f"eval:{host}", f"{attr} = {drv}")
    say(f"eval:{host}", f"evaluated in {time.monotonic() - started:.1f} s")
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
            f"{artifact.host}. Add it to the flake or remove '{artifact.format.value}' from "
            f"hosts.{artifact.host}.images."
        )
    plan = nix.plan_build(artifact.system, nix.local_facts(), ctx.domain.builders)
    say(name, f"building {drv}")
    say(name, f"strategy: {plan.describe()}")
    started = time.monotonic()
    result = nix.build(drv, options=plan.options)
    seconds = round(time.monotonic() - started, 1)
    out = Path(result.outputs["out"])
    product = nix.hydra_product(out, artifact.format.product_type)
    dest_dir = ctx.artifact_dir(name)
    dest = dest_dir / product.name
    sha256, xxh3, size = publish_file(product, dest)
    for stale in dest_dir.glob(f"*{artifact.format.extension}"):
        if stale != dest:
            stale.unlink()
    (dest_dir / "build.log").write_text(result.log)
    stat = dest.stat()
    rel = str(dest.relative_to(ctx.artifacts_dir))
    # Boot and install results belong to the bytes they tested: a new image starts without them.
    outdated: tuple[str, ...] = (
        ("boot", "install", "check", "reproducible") if ctx.records.load(name).get("xxh3") != xxh3 else ())
    ctx.records.update(name, clear=outdated, host=artifact.host, format=artifact.format.value,
                       system=artifact.system.value, drvPath=drv, outPath=str(out), file=rel, size=size,
                       sha256=sha256, xxh3=xxh3,
                       build={"strategy": plan.strategy.value, "reason": plan.reason, "seconds": seconds,
                              "log": f"{name}/build.log"})
    say(name, f"published {rel} ({size / 2**20:.1f} MiB, sha256 {sha256[:16]}…) in {seconds} s")
    return {"drvPath": drv, "outPath": str(out), "path": str(dest), "file": rel, "size": size,
            "mtime": stat.st_mtime, "xxh3": xxh3, "sha256": sha256, "strategy": plan.strategy.value}


def task_build(ctx: Context) -> Iterator[dict[str, Any]]:
    for artifact in ctx.domain.artifacts():
        yield {
            "name": artifact.name,
            "doc": f"nix build the {artifact.format.value} image of {artifact.host} ({artifact.system.value})",
            "actions": [(build_action, [ctx, artifact])],
            "getargs": {"drvs": (f"eval:{artifact.host}", None)},
            "uptodate": [value_dep(f"eval:{artifact.host}", artifact.format.attribute), published_intact],
            "verbosity": 2,
        }


# -- boot -------------------------------------------------------------------------------------------------------------

def boot_spec(ctx: Context, artifact: Artifact, image: Path, workdir: Path, forwards: dict[int, int]) -> VmSpec:
    """The boot test's VM; its console log is published as artifacts/<artifact>/boot.log."""
    host = ctx.domain.hosts[artifact.host]
    if artifact.format is Format.iso:
        drives: tuple[Drive, ...] = (Drive(image, media="cdrom"),)
        firmware, order = Firmware.bios, "d"
    else:
        drives = (Drive(image, snapshot=True),)  # the guest writes to its root fs; the artifact stays as built
        firmware, order = Firmware.uboot, ""
    return VmSpec(name=f"{artifact.name}-boot", system=artifact.system, workdir=workdir,
                  console_log=workdir / "console.log", memory_mib=host.boot.memory_mib, cpus=host.boot.cpus,
                  published_log=ctx.artifact_dir(artifact.name) / "boot.log",
                  firmware=firmware, drives=drives, boot_order=order,
                  port_forwards=tuple(sorted((hp, gp) for gp, hp in forwards.items())))


def boot_probes(ctx: Context, artifact: Artifact) -> list[Any]:
    host = ctx.domain.hosts[artifact.host]
    return list(host.boot.probes) or probes.default_probes(artifact.host, host)


def boot_fingerprint(ctx: Context, artifact: Artifact) -> str:
    """What, besides the image, decides a boot test: VM size, firmware, probes."""
    host = ctx.domain.hosts[artifact.host]
    spec = {"memory": host.boot.memory_mib, "cpus": host.boot.cpus, "format": artifact.format.value,
            "probes": [p.model_dump(mode="json") for p in boot_probes(ctx, artifact)]}
    return xxh3_text(json.dumps(spec, sort_keys=True))


@user_errors
def boot_action(ctx: Context, artifact: Artifact, image: dict[str, Any]) -> dict[str, Any]:
    name = artifact.name
    path = Path(image["path"])
    host = ctx.domain.hosts[artifact.host]
    spec_digest = boot_fingerprint(ctx, artifact)
    log_dest = ctx.artifact_dir(name) / "boot.log"
    kept = ctx.passes.find("boot", image["xxh3"], spec_digest, ("boot.log",))
    if kept:
        reused = kept.restore({"boot.log": log_dest})
        ctx.records.update(name, boot=reused)
        say(name, f"these bytes passed this boot test before ({kept.path.name}): result and console log "
                  f"re-published from {kept.path}, no VM")
        return {"image_xxh3": image["xxh3"], "seconds": reused.get("seconds", 0.0), "reused": True}
    checks = boot_probes(ctx, artifact)
    forwards = {port: free_port() for port in probes.guest_ports(checks)}
    workdir = ctx.vm_dir(name)
    spec = boot_spec(ctx, artifact, path, workdir, forwards)
    accel, why = choose_accel(spec, ctx.root / ".cim")
    spec = dataclasses.replace(spec, accel=accel)
    say(name, f"booting {path.name} in {spec.system.qemu_binary} ({accel}: {why})")
    started = time.monotonic()
    results: list[dict[str, Any]] = []
    outcome: dict[str, Any] = {"result": "fail", "accel": accel, "log": f"{name}/boot.log",
                               "image_xxh3": image["xxh3"]}
    try:
        with Vm(spec) as vm:
            deadline = started + host.boot.timeout_s
            for probe in checks:
                # The boot-complete line may take the whole boot budget; service probes their own, within it.
                remaining = max(1.0, deadline - time.monotonic())
                timeout = remaining if probe.kind is ProbeKind.console else min(probe.timeout_s, remaining)
                result = probes.run_probe(vm, probe.model_copy(update={"timeout_s": timeout}), forwards)
                results.append(result.__dict__)
                say(name, f"probe {result.probe}: ok in {result.seconds} s — {result.detail}")
        outcome["result"] = "pass"
    except VmError as exc:
        outcome["error"] = str(exc).splitlines()[0]
        raise
    finally:
        outcome["seconds"] = round(time.monotonic() - started, 1)
        outcome["probes"] = results
        publish_log(spec.console_log, log_dest)
        ctx.records.update(name, boot=outcome)
    shutil.rmtree(workdir, ignore_errors=True)
    ctx.passes.keep("boot", image["xxh3"], spec_digest, outcome, {"boot.log": log_dest})
    say(name, f"boot test passed in {outcome['seconds']} s; console log {log_dest}")
    return {"image_xxh3": image["xxh3"], "seconds": outcome["seconds"]}


def task_boot(ctx: Context) -> Iterator[dict[str, Any]]:
    for artifact in ctx.domain.artifacts():
        yield {
            "name": artifact.name,
            "doc": f"boot {artifact.name} in QEMU and run its probes",
            "actions": [(boot_action, [ctx, artifact])],
            "getargs": {"image": (f"build:{artifact.name}", None)},
            "uptodate": [value_dep(f"build:{artifact.name}", "xxh3"),
                         config_changed(boot_fingerprint(ctx, artifact)),
                         published(ctx.artifact_dir(artifact.name) / "boot.log")],
            "verbosity": 2,
        }


# -- check (reproducibility) ------------------------------------------------------------------------------------------

@user_errors
def check_action(ctx: Context, artifact: Artifact, image: dict[str, Any]) -> dict[str, Any] | TaskFailed:
    name = artifact.name
    plan = nix.plan_build(artifact.system, nix.local_facts(), ctx.domain.builders)
    say(f"check:{name}", f"checking {image['drvPath']} and what it is made from ({plan.describe()})")
    result = reproduce.check(image["drvPath"], options=plan.options,
                             progress=lambda line: say(f"check:{name}", line))
    ctx.records.update(name, reproducible=result.reproducible, check=result.record(image["sha256"]))
    if not result.reproducible:
        return TaskFailed(f"{name} is not reproducible: {result.derivation} gave other bytes when rebuilt; first "
                          f"difference: {result.differs}. Find what the builder takes from the clock, the build "
                          "machine or chance (configs/demo/builders) and fix it.")
    say(f"check:{name}", f"reproducible: {len(result.derivations)} derivation(s) rebuilt bit for bit in "
                         f"{result.seconds} s; image sha256 {image['sha256']}")
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
    for name, record in manifest["artifacts"].items():
        # Content was checked by each build:<artifact> this run (published_intact); here only that it is there.
        path = ctx.artifacts_dir / record.get("file", "")
        if not path.is_file() or path.stat().st_size != record.get("size"):
            problems.append(f"{name}: {path} does not match its build record")
        if record.get("boot", {}).get("result") != "pass":
            problems.append(f"{name}: boot test has not passed")
    if problems:
        raise ArtifactError("release refused: " + "; ".join(problems) + ". Run `doit` again to rebuild them.")
    say("release", f"{len(manifest['artifacts'])} artifact(s) in {ctx.artifacts_dir / 'manifest.json'}, "
                   f"checksums in {ctx.artifacts_dir / 'SHA256SUMS'}")
    return {"artifacts": sorted(manifest["artifacts"])}


def records_unchanged(ctx: Context) -> Callable[[Any, dict[str, Any]], bool]:
    """Up to date while every artifact record (digests, boot and install results) is what the last release saw."""

    def digest() -> str:
        records = ctx.records.all()
        return xxh3_text(json.dumps(records, sort_keys=True))

    def check(task: Any, values: dict[str, Any]) -> bool:
        task.value_savers.append(lambda: {"records": digest()})
        manifest = ctx.artifacts_dir / "manifest.json"
        return manifest.is_file() and (ctx.artifacts_dir / "SHA256SUMS").is_file() and values.get("records") == digest()

    return check


def task_release(ctx: Context) -> dict[str, Any]:
    from pipeline import install

    deps = [f"boot:{a.name}" for a in ctx.domain.artifacts()]
    deps += [f"install:{h}" for h in install.installable_hosts(ctx)]
    return {
        "doc": "write artifacts/manifest.json and SHA256SUMS for every tested image",
        "actions": [(release_action, [ctx])],
        "task_dep": deps,
        "uptodate": [records_unchanged(ctx)],
        "verbosity": 2,
    }


__all__ = ["Context", "System", "make_context", "task_boot", "task_build", "task_check", "task_eval", "task_release",
           "task_validate"]
