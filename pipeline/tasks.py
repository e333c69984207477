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
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypedDict

from doit.exceptions import TaskFailed
from doit.tools import config_changed

from pipeline import boot, deploy, install, netboot, netinstall, nix, process, reproduce
from pipeline.artifacts import (
    JUNIT,
    MANIFEST,
    SUMS,
    ArtifactError,
    ArtifactRecord,
    BootResult,
    BuildInfo,
    DeployResult,
    ImagePart,
    InstallResult,
    ReproducibilityCheck,
    atomic_write_text,
    publish_file,
    utc_now,
)
from pipeline.context import Context
from pipeline.domain import Artifact, Format, Host, Sandbox
from pipeline.errors import CimError
from pipeline.hashing import xxh3_files, xxh3_text
from pipeline.log import last_line_of, progress, say, step
from pipeline.paths import state_root
from pipeline.uptodate import flake_dep, outputs_intact, records_unchanged, spec_dep, value_dep
from pipeline.validate import validate


class BuiltImage(TypedDict):
    """What build:<artifact> hands boot, install and check (doit's saved values, through getargs)."""

    drvPath: str
    outPath: str
    path: str
    file: str  # relative to the artifacts directory
    size: int
    xxh3: str
    sha256: str
    strategy: str
    outputs: list[str]
    files: dict[str, str]  # hydra product type -> file, relative to the artifacts directory (netboot: three)


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
    # The one fact every eval:<host> consumes: the digest of the flake's inputs and of what is asked of them (the
    # image attributes the pipeline evaluates: a pipeline that knows a new format evaluates again).
    flake = xxh3_text(xxh3_files([Path(f) for f in ctx.files], ctx.domain_dir), nix.EVALUATED_ATTRIBUTES)
    return {"hosts": sorted(ctx.domain.hosts), "nix_files": len(checked.nix_files), "flake": flake}


def task_validate(ctx: Context) -> dict[str, Any]:
    return {
        "doc": "validate domain.json (pydantic) and parse-check every .nix file",
        "actions": [(validate_action, [ctx])],
        "file_dep": ctx.files,
        "uptodate": [config_changed(nix.EVALUATED_ATTRIBUTES)],
        "verbosity": 2,
    }


@user_errors
def eval_action(ctx: Context, host: str) -> dict[str, str]:
    drvs = ctx.evaluations.of(host)
    for attr, drv in sorted(drvs.items()):
        say(f"eval:{host}", f"{attr} = {drv}")
    return drvs


def task_eval(ctx: Context) -> Iterator[dict[str, Any]]:
    flake = flake_dep(ctx.evaluations)  # one check serves every host: it keeps nothing of the task it checks
    for host in ctx.domain.hosts:
        yield {
            "name": host,
            "doc": f"nix eval the derivation paths of {host}",
            "actions": [(eval_action, [ctx, host])],
            "uptodate": [flake],
            # Its lines go straight to the terminal (log.say); doit's tee, which wraps whatever sys.stdout is when an
            # action starts, would nest once per overlapping eval action (10,000 deep for 10,000 hosts).
            "verbosity": 0,
        }


# -- build ------------------------------------------------------------------------------------------------------------


@user_errors
def build_action(ctx: Context, artifact: Artifact, drvs: dict[str, str]) -> BuiltImage:
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
    dest_dir = ctx.artifact_dir(name)
    # Every file of the image (one, or a netboot's kernel, initrd and iPXE script), the entry file last.
    published: list[tuple[Path, str, str, int]] = []
    for product_type in artifact.format.product_types:
        product = nix.hydra_product(out, product_type)
        published.append((dest_dir / product.name, *publish_file(product, dest_dir / product.name)))
    dest, sha256, entry_xxh3, size = published[-1]
    parts = [
        ImagePart(file=str(path.relative_to(ctx.artifacts_dir)), size=psize, sha256=psha, xxh3=pxxh)
        for path, psha, pxxh, psize in published[:-1]
    ]
    # The image's digest: its file's, or that of all its files together (a boot re-runs when any of them changes).
    xxh3 = entry_xxh3 if not parts else xxh3_text(" ".join(f"{p[0].name}:{p[2]}" for p in published))
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
            parts=parts or None,
        ),
    )
    say(name, f"published {rel} ({size / 2**20:.1f} MiB, sha256 {sha256[:16]}…)")
    return BuiltImage(
        drvPath=drv,
        outPath=str(out),
        path=str(dest),
        file=rel,
        size=size,
        xxh3=xxh3,
        sha256=sha256,
        strategy=plan.strategy.value,
        outputs=relative_outputs(ctx, *(p[0] for p in published), build_log),
        files={
            t: str(p[0].relative_to(ctx.artifacts_dir))
            for t, p in zip(artifact.format.product_types, published, strict=True)
        },
    )


def task_build(ctx: Context) -> Iterator[dict[str, Any]]:
    intact = outputs_intact(ctx.artifacts_dir)  # one check serves every task: it keeps nothing of the task it checks
    for artifact in ctx.domain.artifacts():
        yield {
            "name": artifact.name,
            "doc": f"nix build the {artifact.format.value} image of {artifact.host} ({artifact.system.value})",
            "actions": [(build_action, [ctx, artifact])],
            "getargs": {"drvs": (f"eval:{artifact.host}", None)},
            "uptodate": [
                value_dep(f"eval:{artifact.host}", artifact.format.attribute),
                intact,
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
def boot_action(ctx: Context, artifact: Artifact, image: BuiltImage) -> dict[str, Any]:
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
    intact = outputs_intact(ctx.artifacts_dir)
    for artifact in ctx.domain.artifacts():
        if artifact.format is Format.netboot:
            yield netboot_task(ctx, artifact)
            continue
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
                intact,
            ],
            "verbosity": 2,
        }


NETBOOT_LOGS = {"host": "boot.log", "provisioner": "provisioner.log", "intruder": "intruder.log"}


def lan_run(
    ctx: Context, artifact: str, image: BuiltImage, provisioner: BuiltImage, logs: dict[str, str], vm: str
) -> netboot.LanRun:
    """What a test on the provisioner's LAN is handed, from the two builds' values."""
    return netboot.LanRun(
        domain=ctx.domain,
        domain_dir=ctx.domain_dir,
        files={t: ctx.artifacts_dir / f for t, f in image["files"].items()},
        image_xxh3=image["xxh3"],
        provisioner_image=ctx.artifacts_dir / provisioner["file"],
        provisioner_xxh3=provisioner["xxh3"],
        workdir=ctx.vm_dir(vm),
        logs={key: ctx.artifact_dir(artifact) / file for key, file in logs.items()},
        log_names={key: f"{artifact}/{file}" for key, file in logs.items()},
        machine_state=ctx.machine_state,
    )


@user_errors
def netboot_action(ctx: Context, artifact: Artifact, image: BuiltImage, provisioner: BuiltImage) -> dict[str, Any]:
    name = artifact.name
    prov = netboot.provisioner_artifact(ctx.domain)
    fingerprint = netboot.fingerprint(artifact, ctx.domain, ctx.domain_dir)
    run = lan_run(ctx, name, image, provisioner, NETBOOT_LOGS, name)
    published = {NETBOOT_LOGS[k]: path for k, path in run.logs.items()}
    kept = ctx.passes.find("netboot", run.both_xxh3, fingerprint, tuple(published))
    if kept:
        outcome = BootResult.model_validate(kept.restore(published))
        ctx.records.save_boot(name, outcome)
        say(name, f"these images passed this netboot test before: result and console logs from {kept.path}, no VM")
    else:
        outcome = netboot.netboot_test(artifact, run, functools.partial(ctx.records.save_boot, name))
        if outcome.result == "pass":
            ctx.passes.keep("netboot", run.both_xxh3, fingerprint, outcome.model_dump(mode="json"), published)
    say(name, f"provisioned by {prov.name}")
    return {
        "image_xxh3": image["xxh3"],
        "seconds": outcome.seconds,
        "outputs": relative_outputs(ctx, *run.logs.values()),
    }


def netboot_task(ctx: Context, artifact: Artifact) -> dict[str, Any]:
    """boot:<host>-netboot: the provisioner's ISO and the host's netboot image, on a LAN of their own (netboot.py)."""
    prov = netboot.provisioner_artifact(ctx.domain)
    return {
        "name": artifact.name,
        "doc": f"boot {artifact.host} from the LAN served by {prov.host}; an undeclared MAC beside it is kept out",
        "actions": [(netboot_action, [ctx, artifact])],
        "getargs": {"image": (f"build:{artifact.name}", None), "provisioner": (f"build:{prov.name}", None)},
        "uptodate": [
            value_dep(f"build:{artifact.name}", "xxh3"),
            value_dep(f"build:{prov.name}", "xxh3"),
            spec_dep(functools.partial(netboot.spec, artifact, ctx.domain, ctx.domain_dir)),
            outputs_intact(ctx.artifacts_dir),
        ],
        "verbosity": 2,
    }


# -- install ----------------------------------------------------------------------------------------------------------


@user_errors
def install_action(ctx: Context, host_name: str, image: BuiltImage) -> dict[str, Any]:
    return run_install(ctx, host_name, image)


def run_install(ctx: Context, host_name: str, image: BuiltImage, fresh: bool = False) -> dict[str, Any]:
    """install:<host> from its ISO (`fresh`: a VM install even where a pass is kept; deploy needs its disk)."""
    artifact = f"{host_name}-iso"
    host = ctx.domain.hosts[host_name]
    log_dest = ctx.artifact_dir(artifact) / "install.log"
    # A pass is kept by the ISO's bytes and everything else that decides the install: the plan the installer is
    # handed (from disk-config.nix and the disk size), the disk it installs onto, the VM's memory.
    plan = install.plan_for(ctx.domain_dir, host_name, host)
    spec = install_spec(ctx, host_name, plan, lan=False)
    disk = deploy.kept_disk(ctx.state_dir, host_name)  # the installed disk, for deploy:<host>
    kept = None if fresh else ctx.passes.find("install", image["xxh3"], spec, ("install.log",))
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
        plan=plan,  # evaluated once (a nix eval of disk-config.nix), for the spec above and the install
        keep_disk=disk,
    )
    if outcome.result == "pass":
        deploy.mark_kept(disk, f"{image['xxh3']}:{spec}")
        ctx.passes.keep("install", image["xxh3"], spec, outcome.model_dump(mode="json"), {"install.log": log_dest})
    return {"iso_xxh3": image["xxh3"], "seconds": outcome.seconds, "outputs": relative_outputs(ctx, log_dest)}


NETINSTALL_LOGS = {"install": "install.log", "provisioner": "install-provisioner.log"}


@user_errors
def netinstall_action(ctx: Context, host_name: str, image: BuiltImage, provisioner: BuiltImage) -> dict[str, Any]:
    return run_netinstall(ctx, host_name, image, provisioner)


def run_netinstall(
    ctx: Context, host_name: str, image: BuiltImage, provisioner: BuiltImage, fresh: bool = False
) -> dict[str, Any]:
    """install:<host> from the LAN (`fresh`: a VM install even where a pass is kept; deploy needs its disk)."""
    artifact = f"{host_name}-netboot"
    run = lan_run(ctx, artifact, image, provisioner, NETINSTALL_LOGS, f"{host_name}-netinstall")
    report = ctx.artifact_dir(artifact) / "install-inventory.json"
    plan = install.plan_for(ctx.domain_dir, host_name, ctx.domain.hosts[host_name])
    spec = install_spec(ctx, host_name, plan, lan=True)
    published = {NETINSTALL_LOGS[k]: path for k, path in run.logs.items()} | {report.name: report}
    outputs = relative_outputs(ctx, *published.values())
    kept = None if fresh else ctx.passes.find("netinstall", run.both_xxh3, spec, tuple(published))
    if kept:
        reused = InstallResult.model_validate(kept.restore(published))
        ctx.records.save_install(artifact, reused)
        say(f"install:{host_name}", f"these images passed this install before: re-published from {kept.path}, no VM")
        return {"image_xxh3": run.both_xxh3, "seconds": reused.seconds, "outputs": outputs}
    disk = deploy.kept_disk(ctx.state_dir, host_name)  # the installed disk, for deploy:<host>
    outcome = netinstall.verify(
        host_name, run, plan, functools.partial(ctx.records.save_install, artifact), report, keep_disk=disk
    )
    if outcome.result == "pass":
        deploy.mark_kept(disk, f"{run.both_xxh3}:{spec}")
        ctx.passes.keep("netinstall", run.both_xxh3, spec, outcome.model_dump(mode="json"), published)
    return {"image_xxh3": run.both_xxh3, "seconds": outcome.seconds, "outputs": outputs}


def netinstall_spec(ctx: Context, host_name: str) -> dict[str, Any]:
    """What, besides the two images and the disk-config, decides an install from the LAN: the install spec, the
    declared hardware and policy the machine checks, the LAN (MACs) and the installed system's probes."""
    host = ctx.domain.hosts[host_name]
    artifact = Artifact(host=host_name, format=Format.netboot, system=host.system)
    data = install.spec(host_name, host)
    data["hosts"][host_name]["hardware"] = host.hardware.model_dump(mode="json")
    data["inventory"] = ctx.domain.inventory.value
    data["lan"] = netboot.spec(artifact, ctx.domain, ctx.domain_dir)["lan"]
    return data


def task_install(ctx: Context) -> Iterator[dict[str, Any]]:
    for host_name in install.installable_hosts(ctx.domain):
        host = ctx.domain.hosts[host_name]
        assert host.install is not None
        if install.install_format(host) is Format.netboot:
            prov = netboot.provisioner_artifact(ctx.domain)
            yield {
                "name": host_name,
                "doc": f"install {host_name} from the LAN ({prov.host} provisions it) onto a blank disk, boot the disk",
                "actions": [(netinstall_action, [ctx, host_name])],
                "getargs": {"image": (f"build:{host_name}-netboot", None), "provisioner": (f"build:{prov.name}", None)},
                "file_dep": [str(ctx.domain_dir / host.install.disk_config)],
                "uptodate": [
                    value_dep(f"build:{host_name}-netboot", "xxh3"),
                    value_dep(f"build:{prov.name}", "xxh3"),
                    spec_dep(functools.partial(netinstall_spec, ctx, host_name)),
                    outputs_intact(ctx.artifacts_dir),
                ],
                "verbosity": 2,
            }
            continue
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


# -- deploy -----------------------------------------------------------------------------------------------------------


def install_key(
    ctx: Context, host_name: str, image: BuiltImage, provisioner: BuiltImage | None
) -> tuple[str, install.InstallPlan]:
    """What install:<host> keeps its installed disk under (the image(s) and the install spec, as its pass), and the
    host's disk plan it was computed from (one evaluation of disk-config.nix for both)."""
    plan = install.plan_for(ctx.domain_dir, host_name, ctx.domain.hosts[host_name])
    spec = install_spec(ctx, host_name, plan, lan=provisioner is not None)
    if provisioner is None:
        return f"{image['xxh3']}:{spec}", plan
    run = lan_run(ctx, f"{host_name}-netboot", image, provisioner, NETINSTALL_LOGS, f"{host_name}-netinstall")
    return f"{run.both_xxh3}:{spec}", plan


def install_spec(ctx: Context, host_name: str, plan: install.InstallPlan, lan: bool) -> str:
    """The digest an install's pass (and its kept disk) is filed under besides its image(s): the install spec (from
    the LAN: the hardware, policy and LAN it checks too) and the plan the installer is handed."""
    data = netinstall_spec(ctx, host_name) if lan else install.spec(host_name, ctx.domain.hosts[host_name])
    return xxh3_text(json.dumps(data, sort_keys=True), plan.installer_text())


@user_errors
def deploy_action(
    ctx: Context, host_name: str, image: BuiltImage, provisioner: BuiltImage | None = None
) -> dict[str, Any]:
    host = ctx.domain.hosts[host_name]
    artifact = f"{host_name}-{install.install_format(host).value}"
    task, variant = f"deploy:{host_name}", ctx.deploy_variant
    log_dest = ctx.artifact_dir(artifact) / "deploy.log"
    # The next generation: the host's system with one more module, a new store path.
    drv = deploy.next_system_drv(ctx.domain_dir, host_name, variant)
    build_plan = nix.plan_build(host.system, nix.local_facts(), ctx.domain.builders)
    with step(task, f"next generation built ({variant})"):
        system = nix.build(drv, options=build_plan.options).outputs["out"]
    spec_data = deploy.spec(host_name, host, variant)
    key, plan = install_key(ctx, host_name, image, provisioner)
    image_key, spec = deploy.key_of(key, system, spec_data)
    kept = ctx.passes.find("deploy", image_key, spec, ("deploy.log",))
    if kept:
        reused = DeployResult.model_validate(kept.restore({"deploy.log": log_dest}))
        ctx.records.save_deploy(artifact, reused)
        say(task, f"this installed image took this generation before: result and log from {kept.path}, no VM")
        return {"system": system, "seconds": reused.seconds, "outputs": relative_outputs(ctx, log_dest)}
    disk = deploy.kept_disk(ctx.state_dir, host_name)
    if not disk.is_file() or deploy.kept_key(disk) != key:
        say(task, f"no installed disk of this image is kept ({disk}): installing it first")
        if provisioner is None:
            run_install(ctx, host_name, image, fresh=True)
        else:
            run_netinstall(ctx, host_name, image, provisioner, fresh=True)
    outcome = deploy.deploy(
        deploy.DeployRun(
            domain=ctx.domain,
            domain_dir=ctx.domain_dir,
            host_name=host_name,
            base_disk=disk,
            disk_bus=install.deploy_bus(ctx.domain_dir, host_name, host, plan),
            system=system,
            variant=variant,
            image_xxh3=image["xxh3"],
            workdir=ctx.vm_dir(f"{host_name}-deploy"),
            log_dest=log_dest,
            log_name=f"{artifact}/deploy.log",
            machine_state=ctx.machine_state,
        ),
        functools.partial(ctx.records.save_deploy, artifact),
    )
    if outcome.result == "pass":
        ctx.passes.keep("deploy", image_key, spec, outcome.model_dump(mode="json"), {"deploy.log": log_dest})
    return {"system": system, "seconds": outcome.seconds, "outputs": relative_outputs(ctx, log_dest)}


def _deploy_spec(spec: Callable[[], Any], install_spec: Callable[[], Any]) -> dict[str, Any]:
    return {"deploy": spec(), "install": install_spec()}


def task_deploy(ctx: Context) -> Iterator[dict[str, Any]]:
    for host_name in install.installable_hosts(ctx.domain):
        host = ctx.domain.hosts[host_name]
        assert host.install is not None
        image = f"build:{host_name}-{install.install_format(host).value}"
        getargs = {"image": (image, None)}
        uptodate = [value_dep(image, "xxh3"), value_dep(f"eval:{host_name}", "toplevel")]
        spec: Callable[[], Any] = functools.partial(deploy.spec, host_name, host, ctx.deploy_variant)
        install_spec: Callable[[], Any] = functools.partial(install.spec, host_name, host)
        if install.install_format(host) is Format.netboot:
            prov = netboot.provisioner_artifact(ctx.domain)
            getargs["provisioner"] = (f"build:{prov.name}", None)
            uptodate.append(value_dep(f"build:{prov.name}", "xxh3"))
            install_spec = functools.partial(netinstall_spec, ctx, host_name)
        yield {
            "name": host_name,
            "doc": f"boot {host_name}'s installed disk, deploy its next generation over SSH, reboot into it",
            "actions": [(deploy_action, [ctx, host_name])],
            "getargs": getargs,
            "task_dep": [f"install:{host_name}", f"eval:{host_name}"],
            "file_dep": [str(ctx.domain_dir / host.install.disk_config)],
            "uptodate": [
                *uptodate,
                spec_dep(functools.partial(_deploy_spec, spec, install_spec)),
                outputs_intact(ctx.artifacts_dir),
            ],
            "verbosity": 2,
        }


# -- check (reproducibility) ------------------------------------------------------------------------------------------


@user_errors
def check_action(ctx: Context, artifact: Artifact, image: BuiltImage) -> dict[str, Any] | TaskFailed:
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


def task_release(ctx: Context) -> dict[str, Any]:
    deps = [f"boot:{a.name}" for a in ctx.domain.artifacts()]
    deps += [f"install:{h}" for h in install.installable_hosts(ctx.domain)]
    deps += [f"deploy:{h}" for h in install.installable_hosts(ctx.domain)]
    return {
        "doc": "write artifacts/manifest.json and SHA256SUMS for every tested image",
        "actions": [(release_action, [ctx])],
        "task_dep": deps,
        "uptodate": [records_unchanged(ctx.records), outputs_intact(ctx.artifacts_dir)],
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
        "task_deploy": lambda: task_deploy(ctx),
        "task_release": lambda: task_release(ctx),
    }
