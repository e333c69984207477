"""The boot test of one image: QEMU boots it as its format boots on real hardware, then the probes run against it.

  ISO   SeaBIOS → the ISO's El Torito boot loader → kernel, the ISO as a CD-ROM
  SD    U-Boot (`-M virt`) → extlinux.conf → kernel, the image as a disk whose writes go to a throw-away overlay
The whole serial console is kept (published as artifacts/<artifact>/boot.log) whatever the outcome.  No doit here:
`pipeline.tasks` wraps `boot_test` into the `boot:<artifact>` task and keeps its result in the artifact's record.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pipeline import inventory, probes
from pipeline.artifacts import (
    BootResult,
    InventoryResult,
    InventoryUnchecked,
    ProbeResult,
    atomic_write_text,
    publish_log,
    utc_now,
)
from pipeline.domain import Artifact, Domain, Format, GuestKind, Host, InventoryPolicy, Probe, ProbeKind
from pipeline.hashing import xxh3_text
from pipeline.log import say, step
from pipeline.qemu import Drive, Firmware, Forward, Vm, VmError, VmSpec, choose_accel

INVENTORY_LOG_MARK = "=== cim-pipeline: hardware inventory ==="


class BootFailed(VmError):
    """The image booted (or not) but some probes failed; the record lists every probe's result."""


def boot_spec(
    artifact: Artifact, host: Host, image: Path, workdir: Path, forwards: tuple[Forward, ...], published_log: Path
) -> VmSpec:
    """The boot test's VM; `forwards` reach the probes' guests from 127.0.0.1 (QEMU picks the ports)."""
    machine = inventory.boot_machine(host)
    if artifact.format is Format.iso:
        drives: tuple[Drive, ...] = (Drive(image, media="cdrom"),)
        firmware, order = Firmware.bios, "d"
    else:
        drives = (Drive(image, snapshot=True),)  # the guest writes to its root fs; the artifact stays as built
        firmware, order = Firmware.uboot, ""
    # The declared disks (or boot.disks) as sparse blank images, in order: the guest names them vda, vdb, … after
    # the boot medium, as the inventory declares them.
    drives += tuple(
        Drive(blank_disk_path(workdir, i), bus=d.bus.value, serial=f"cim-disk{i}") for i, d in enumerate(machine.disks)
    )
    return VmSpec(
        name=f"{artifact.name}-boot",
        system=artifact.system,
        workdir=workdir,
        console_log=workdir / "console.log",
        memory_mib=machine.memory_mib,
        cpus=machine.cpus,
        published_log=published_log,
        firmware=firmware,
        drives=drives,
        boot_order=order,
        displays=tuple(d.value for d in machine.displays),
        port_forwards=forwards,
    )


def blank_disk_path(workdir: Path, index: int) -> Path:
    return workdir / f"blank-disk{index}.img"


def make_blank_disks(host: Host, workdir: Path) -> None:
    """Create the boot VM's blank disks: sparse files (no space is used until the guest writes)."""
    workdir.mkdir(parents=True, exist_ok=True)
    for index, disk in enumerate(inventory.boot_machine(host).disks):
        with blank_disk_path(workdir, index).open("wb") as f:
            f.truncate(int(disk.size_gib * inventory.GIB))


def reports_inventory(host: Host) -> bool:
    """The host publishes its hardware report on NATS: it has a nats guest the boot test can reach."""
    return any(g.kind is GuestKind.nats for g in host.guests)


def boot_probes(domain: Domain, host_name: str, domain_dir: Path) -> list[Probe]:
    """The host's declared probes, else the defaults its guests imply."""
    return list(domain.hosts[host_name].boot.probes) or probes.default_probes(domain, host_name, domain_dir)


def inventory_forward(host: Host) -> Forward | None:
    """Where the hardware report is received: the host's nats guest, on the contract's NATS port."""
    nats = next((g for g in host.guests if g.kind is GuestKind.nats), None)
    return Forward("tcp", probes.PORTS.nats, str(nats.address)) if nats is not None else None


def spec(
    artifact: Artifact, domain: Domain, domain_dir: Path, policy: InventoryPolicy = InventoryPolicy.record
) -> dict[str, Any]:
    """What, besides the image, decides a boot test, keyed as in domain.json so that a change can be named
    (`hosts.vhost-dev.boot.memory_mib`): the VM (`boot`, as resolved from the declared hardware), the effective probes
    (declared, else the defaults) and the names and addresses the dns probe checks, and what the hardware report is
    reconciled with (`hardware`, `inventory`)."""
    host = domain.hosts[artifact.host]
    machine = inventory.boot_machine(host)
    checks = boot_probes(domain, artifact.host, domain_dir)
    names = (
        {name: str(address) for name, address in domain.records().items()}
        if any(p.kind is ProbeKind.dns for p in checks)
        else {}
    )
    return {
        "hosts": {
            artifact.host: {
                "boot": {
                    "memory_mib": machine.memory_mib,
                    "cpus": machine.cpus,
                    "disks": [{"size_gib": d.size_gib, "bus": d.bus.value} for d in machine.disks],
                    "displays": [d.value for d in machine.displays],
                    "inventory_report": reports_inventory(host),
                    "probes": [p.model_dump(mode="json") for p in checks],
                    "dns_names": names,
                },
                "hardware": host.hardware.model_dump(mode="json"),
            }
        },
        "format": artifact.format.value,
        "inventory": policy.value,
    }


def fingerprint(artifact: Artifact, domain: Domain, domain_dir: Path) -> str:
    """The VM part of `spec` (not the policy or the declared hardware): a pass with the same image and fingerprint
    is reused, its kept hardware report reconciled again, without a VM."""
    vm = spec(artifact, domain, domain_dir)
    return xxh3_text(json.dumps([vm["format"], vm["hosts"][artifact.host]["boot"]], sort_keys=True))


def boot_test(
    artifact: Artifact,
    domain: Domain,
    domain_dir: Path,
    image: Path,
    image_xxh3: str,
    *,
    workdir: Path,
    log_dest: Path,
    log_name: str,
    machine_state: Path,
    record: Callable[[BootResult], None],
    report_keep: Path | None = None,
) -> BootResult:
    """Boot `image`, run the probes, receive the host's hardware report into `report_keep` (when it publishes one);
    `record` gets the result (pass or fail) before this returns or raises.

    The console probe (boot complete) comes first and may use the whole boot budget; then the service probes run
    side by side, each within its own deadline, so one failing guest never hides another's result.
    """
    name = artifact.name
    host = domain.hosts[artifact.host]
    declared = boot_probes(domain, artifact.host, domain_dir)
    consoles = [p for p in declared if p.kind is ProbeKind.console]
    services = [p for p in declared if p.kind is not ProbeKind.console]
    checks = consoles + services  # the order they run and are recorded in
    report_forward = inventory_forward(host)
    report_guest = next((g.name for g in host.guests if g.kind is GuestKind.nats), None)
    inventory_planned = report_keep is not None and reports_inventory(host) and report_forward is not None
    forwards = probes.forwards_for(checks, host)
    if inventory_planned and report_forward not in forwards:
        assert report_forward is not None
        forwards += (report_forward,)
    spec = boot_spec(artifact, host, image, workdir, forwards, log_dest)
    make_blank_disks(host, workdir)
    accel, why = choose_accel(spec, machine_state)
    spec = dataclasses.replace(spec, accel=accel)
    say(name, f"booting {image.name} in {spec.system.qemu_binary} ({accel}: {why})")
    started = time.monotonic()
    results: list[ProbeResult] = []
    error: str | None = None
    tail = ""
    try:
        with Vm(spec) as vm:
            ports = vm.forwarded_ports()
            ctx = probes.ProbeContext(domain=domain, host_name=artifact.host, domain_dir=domain_dir, ports=ports)
            deadline = started + host.boot.timeout_s
            results += run_probes(vm, ctx, consoles, services, deadline, name)
            if inventory_planned:
                assert report_keep is not None and report_forward is not None
                results.append(
                    _inventory_probe(vm, artifact.host, ports[report_forward], report_guest, deadline, report_keep)
                )
                say(name, _said(results[-1]))
            tail = vm.tail()
        failed = [r for r in results if not r.ok]
        if failed:
            error = f"{name}: {len(failed)} of {len(results)} probe(s) failed: " + "; ".join(r.detail for r in failed)
            raise BootFailed(
                f"{error}. Console log {log_dest}; its last lines:\n{tail}",
                hint="Each probe's result is in the artifact's record (cim status / manifest.json).",
            )
    except VmError as exc:
        error = error or str(exc).splitlines()[0]
        raise
    finally:
        complete = len(results) == len(checks) + inventory_planned
        outcome = BootResult(
            result="fail" if error is not None or not complete else "pass",
            accel=accel,
            log=log_name,
            image_xxh3=image_xxh3,
            seconds=round(time.monotonic() - started, 1),
            probes=results,
            planned=[*map(probes.label, checks), *(["inventory"] if inventory_planned else [])],
            error=error,
            at=utc_now(),
            fingerprint=fingerprint(artifact, domain, domain_dir),
        )
        publish_log(spec.console_log, log_dest)
        record(outcome)
    shutil.rmtree(workdir, ignore_errors=True)
    say(name, f"boot test passed in {outcome.seconds} s; console log {log_dest}")
    return outcome


def run_probes(
    vm: Vm, ctx: probes.ProbeContext, consoles: list[Probe], services: list[Probe], deadline: float, name: str
) -> list[ProbeResult]:
    """The console probes first (they may use the whole budget up to `deadline`), then the service probes side by
    side, each within its own deadline, so one failing guest never hides another's result."""

    def run(probe: Probe) -> ProbeResult:
        remaining = max(1.0, deadline - time.monotonic())
        timeout = remaining if probe.kind is ProbeKind.console else min(probe.timeout_s, remaining)
        result = probes.run_probe(vm, probe.model_copy(update={"timeout_s": timeout}), ctx)
        say(name, _said(result))
        return result

    results = [run(p) for p in consoles]
    with ThreadPoolExecutor(max_workers=max(1, len(services))) as pool:
        results += list(pool.map(run, services))
    return results


def _said(result: ProbeResult) -> str:
    return f"probe {result.probe}: {'ok' if result.ok else 'FAILED'} in {result.seconds} s — {result.detail}"


def _inventory_probe(vm: Vm, host_name: str, port: int, guest: str | None, deadline: float, keep: Path) -> ProbeResult:
    """The hardware report as a probe: received (and kept in `keep`) before the deadline, or failed saying why."""
    received = time.monotonic()
    try:
        report = receive_report(vm, host_name, port, deadline, keep)
        return report.model_copy(update={"guest": guest, "port": port})
    except probes.ProbeFailed as exc:
        return ProbeResult(
            probe="inventory",
            ok=False,
            guest=guest,
            port=port,
            detail=f"probe inventory failed: {exc}",
            seconds=round(time.monotonic() - received, 2),
        )


def receive_report(vm: Vm, host_name: str, port: int, deadline: float, keep: Path) -> ProbeResult:
    """The host's hardware report from NATS (acknowledged), checked to be a report, kept atomically in `keep`."""
    started = time.monotonic()
    subject = probes.inventory_subject(host_name)

    def attempt() -> str:
        data = probes.receive_inventory(port, host_name, wait=min(10.0, max(1.0, deadline - time.monotonic())))
        detected = inventory.parse_report(json.loads(data), f"the report on {subject}")
        atomic_write_text(keep, data.decode())
        return (
            f"{len(data)} bytes on {subject}: {detected.cpu_model}, {detected.memory_gib:.2f} GiB, "
            f"{len(detected.disks)} disk(s), {len(detected.gpus)} GPU(s)"
        )

    try:
        detail = probes.retry(attempt, max(1.0, deadline - time.monotonic()))
    except probes.ProbeFailed as exc:
        raise probes.ProbeFailed(f"{vm.spec.name}: hardware report on {subject} {exc}") from None
    return ProbeResult(probe="inventory", ok=True, seconds=round(time.monotonic() - started, 2), detail=detail)


def reconcile_inventory(
    artifact: Artifact,
    host: Host,
    policy: InventoryPolicy,
    *,
    report: Path,
    published: Path,
    report_name: str,
    image_xxh3: str,
    accel: str,
    log_dest: Path,
    log_name: str,
    record: Callable[[InventoryResult], None],
) -> InventoryResult:
    """Reconcile the kept report with the declared hardware; publish inventory.json, the verdict in boot.log and the
    record; under `enforce` a difference raises InventoryError naming each (after the record is kept)."""
    name = artifact.name
    with step(name, "inventory reconciled", announce=False) as reconciled:
        text = report.read_text()
        detected = inventory.parse_report(json.loads(text), str(report))
        atomic_write_text(published, text)
        machine = inventory.boot_machine(host)
        if accel == "kvm" and "cpu.model" not in machine.unchecked_fields:
            machine = dataclasses.replace(
                machine,
                unchecked=(
                    *machine.unchecked,
                    InventoryUnchecked(
                        field="cpu.model",
                        declared=host.hardware.cpu.model,
                        reason="under KVM the boot VM's CPU is the build machine's",
                    ),
                ),
            )
        result = inventory.verdict(host.hardware, detected, policy, machine)
    say(name, f"inventory: {result.summary()}; report {published}")
    for line in result.lines():
        say(name, f"inventory: {line}")
    _log_verdict(log_dest, result)
    failure = None if result.passed else inventory.enforce_error(artifact.host, result)
    outcome = InventoryResult(
        result="pass" if result.passed else "fail",
        verdict="match" if result.matches else "differs",
        policy=policy.value,
        report=report_name,
        image_xxh3=image_xxh3,
        summary=result.summary(),
        log=log_name,
        seconds=reconciled.seconds,
        error=failure.message if failure else None,
        at=utc_now(),
        differences=list(result.differences),
        unchecked=list(result.unchecked),
    )
    record(outcome)
    if failure is not None:
        raise failure
    if policy is InventoryPolicy.warn:
        for diff in result.differences:
            say(name, f"warning: inventory: {diff.describe()}")
    return outcome


def _log_verdict(log: Path, result: inventory.Verdict) -> None:
    """boot.log ends with the inventory's verdict (replacing an earlier one: a policy change re-reconciles)."""
    text = log.read_text(errors="replace") if log.exists() else ""
    text = text.split(f"\n{INVENTORY_LOG_MARK}\n")[0].rstrip("\n")
    lines = [INVENTORY_LOG_MARK, f"verdict: {result.summary()}", *result.lines()]
    atomic_write_text(log, text + "\n" + "\n".join(lines) + "\n")
