"""The boot test of one image: QEMU boots it as its format boots on real hardware, then the probes run against it.

  ISO   SeaBIOS → isolinux → kernel, the ISO as a CD-ROM
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
from pathlib import Path
from typing import Any

from pipeline import inventory, probes
from pipeline.artifacts import (
    BootResult,
    InventoryDifference,
    InventoryResult,
    InventoryUnchecked,
    ProbeResult,
    atomic_write_text,
    publish_log,
    utc_now,
)
from pipeline.domain import Artifact, Format, GuestKind, Host, InventoryPolicy, Probe, ProbeKind
from pipeline.hashing import xxh3_text
from pipeline.log import say, step
from pipeline.qemu import Drive, Firmware, Vm, VmError, VmSpec, choose_accel, free_port

INVENTORY_LOG_MARK = "=== cim-pipeline: hardware inventory ==="


def boot_spec(artifact: Artifact, host: Host, image: Path, workdir: Path, forwards: dict[int, int],
              published_log: Path) -> VmSpec:
    """The boot test's VM; `forwards` maps guest ports to host ports on 127.0.0.1."""
    machine = inventory.boot_machine(host)
    if artifact.format is Format.iso:
        drives: tuple[Drive, ...] = (Drive(image, media="cdrom"),)
        firmware, order = Firmware.bios, "d"
    else:
        drives = (Drive(image, snapshot=True),)  # the guest writes to its root fs; the artifact stays as built
        firmware, order = Firmware.uboot, ""
    # The declared disks (or boot.disks) as sparse blank images, in order: the guest names them vda, vdb, … after
    # the boot medium, as the inventory declares them.
    drives += tuple(Drive(blank_disk_path(workdir, i), bus=d.bus.value, serial=f"cim-disk{i}")
                    for i, d in enumerate(machine.disks))
    return VmSpec(name=f"{artifact.name}-boot", system=artifact.system, workdir=workdir,
                  console_log=workdir / "console.log", memory_mib=machine.memory_mib, cpus=machine.cpus,
                  published_log=published_log, firmware=firmware, drives=drives, boot_order=order,
                  displays=tuple(d.value for d in machine.displays),
                  port_forwards=tuple(sorted((hp, gp) for gp, hp in forwards.items())))


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


def boot_probes(host_name: str, host: Host) -> list[Probe]:
    """The host's declared probes, else the defaults its guests imply."""
    return list(host.boot.probes) or probes.default_probes(host_name, host)


def spec(artifact: Artifact, host: Host, policy: InventoryPolicy = InventoryPolicy.record) -> dict[str, Any]:
    """What, besides the image, decides a boot test, keyed as in domain.json so that a change can be named
    (`hosts.vhost-dev.boot.memory_mib`): the VM (`boot`, as resolved from the declared hardware), the effective probes
    (declared, else the defaults), and what the hardware report is reconciled with (`hardware`, `inventory`)."""
    machine = inventory.boot_machine(host)
    return {"hosts": {artifact.host: {
        "boot": {"memory_mib": machine.memory_mib, "cpus": machine.cpus,
                 "disks": [{"size_gib": d.size_gib, "bus": d.bus.value} for d in machine.disks],
                 "displays": [d.value for d in machine.displays], "inventory_report": reports_inventory(host),
                 "probes": [p.model_dump(mode="json") for p in boot_probes(artifact.host, host)]},
        "hardware": host.hardware.model_dump(mode="json")}},
        "format": artifact.format.value, "inventory": policy.value}


def fingerprint(artifact: Artifact, host: Host) -> str:
    """The VM part of `spec` (not the policy or the declared hardware): a pass with the same image and fingerprint
    is reused, its kept hardware report reconciled again, without a VM."""
    vm = spec(artifact, host)
    return xxh3_text(json.dumps([vm["format"], vm["hosts"][artifact.host]["boot"]], sort_keys=True))


def boot_test(artifact: Artifact, host: Host, image: Path, image_xxh3: str, *, workdir: Path, log_dest: Path,
              log_name: str, machine_state: Path, record: Callable[[BootResult], None],
              report_keep: Path | None = None) -> BootResult:
    """Boot `image`, run the probes, receive the host's hardware report into `report_keep` (when it publishes one);
    `record` gets the result (pass or fail) before this returns or raises."""
    name = artifact.name
    checks = boot_probes(artifact.host, host)
    inventory_planned = report_keep is not None and reports_inventory(host)
    ports = probes.guest_ports(checks) | ({4222} if inventory_planned else set())
    forwards = {port: free_port() for port in ports}
    spec = boot_spec(artifact, host, image, workdir, forwards, log_dest)
    make_blank_disks(host, workdir)
    accel, why = choose_accel(spec, machine_state)
    spec = dataclasses.replace(spec, accel=accel)
    say(name, f"booting {image.name} in {spec.system.qemu_binary} ({accel}: {why})")
    started = time.monotonic()
    results: list[ProbeResult] = []
    error: str | None = None
    try:
        with Vm(spec) as vm:
            deadline = started + host.boot.timeout_s
            for probe in checks:
                # The boot-complete line may take the whole boot budget; service probes their own, within it.
                remaining = max(1.0, deadline - time.monotonic())
                timeout = remaining if probe.kind is ProbeKind.console else min(probe.timeout_s, remaining)
                result = probes.run_probe(vm, probe.model_copy(update={"timeout_s": timeout}), forwards)
                results.append(result)
                say(name, f"probe {result.probe}: ok in {result.seconds} s — {result.detail}")
            if inventory_planned:
                assert report_keep is not None
                results.append(_receive_report(vm, artifact.host, forwards[4222], deadline, report_keep))
                say(name, f"probe inventory: ok in {results[-1].seconds} s — {results[-1].detail}")
    except VmError as exc:
        error = str(exc).splitlines()[0]
        raise
    finally:
        complete = len(results) == len(checks) + inventory_planned
        outcome = BootResult(result="fail" if error is not None or not complete else "pass",
                             accel=accel, log=log_name, image_xxh3=image_xxh3,
                             seconds=round(time.monotonic() - started, 1), probes=results,
                             planned=[*map(probes.label, checks), *(["inventory"] if inventory_planned else [])],
                             error=error, at=utc_now(), fingerprint=fingerprint(artifact, host))
        publish_log(spec.console_log, log_dest)
        record(outcome)
    shutil.rmtree(workdir, ignore_errors=True)
    say(name, f"boot test passed in {outcome.seconds} s; console log {log_dest}")
    return outcome


def _receive_report(vm: Vm, host_name: str, port: int, deadline: float, keep: Path) -> ProbeResult:
    """The host's hardware report from NATS (acknowledged), checked to be a report, kept atomically in `keep`."""
    started = time.monotonic()
    subject = probes.inventory_subject(host_name)

    def attempt() -> str:
        data = probes.receive_inventory(port, host_name, wait=min(10.0, max(1.0, deadline - time.monotonic())))
        detected = inventory.parse_report(json.loads(data), f"the report on {subject}")
        atomic_write_text(keep, data.decode())
        return (f"{len(data)} bytes on {subject}: {detected.cpu_model}, {detected.memory_gib:.2f} GiB, "
                f"{len(detected.disks)} disk(s), {len(detected.gpus)} GPU(s)")

    detail = probes.retry(f"{vm.spec.name}: hardware report on {subject}", attempt,
                          max(1.0, deadline - time.monotonic()))
    return ProbeResult(probe="inventory", ok=True, seconds=round(time.monotonic() - started, 2), detail=detail)


def reconcile_inventory(artifact: Artifact, host: Host, policy: InventoryPolicy, *, report: Path, published: Path,
                        report_name: str, image_xxh3: str, accel: str, log_dest: Path, log_name: str,
                        record: Callable[[InventoryResult], None]) -> InventoryResult:
    """Reconcile the kept report with the declared hardware; publish inventory.json, the verdict in boot.log and the
    record; under `enforce` a difference raises InventoryError naming each (after the record is kept)."""
    name = artifact.name
    with step(name, "inventory reconciled", announce=False) as reconciled:
        text = report.read_text()
        detected = inventory.parse_report(json.loads(text), str(report))
        atomic_write_text(published, text)
        machine = inventory.boot_machine(host)
        if accel == "kvm" and "cpu.model" not in machine.unchecked_fields:
            machine = dataclasses.replace(machine, unchecked=(*machine.unchecked, inventory.Unchecked(
                "cpu.model", host.hardware.cpu.model, "under KVM the boot VM's CPU is the build machine's")))
        result = inventory.verdict(host.hardware, detected, policy, machine)
    say(name, f"inventory: {result.summary()}; report {published}")
    for line in result.lines():
        say(name, f"inventory: {line}")
    _log_verdict(log_dest, result)
    failure = None if result.passed else inventory.enforce_error(artifact.host, result)
    outcome = InventoryResult(
        result="pass" if result.passed else "fail", verdict="match" if result.matches else "differs",
        policy=policy.value, report=report_name, image_xxh3=image_xxh3, summary=result.summary(), log=log_name,
        seconds=reconciled.seconds, error=failure.message if failure else None, at=utc_now(),
        differences=[InventoryDifference(field=d.field, declared=d.declared, detected=d.detected, kind=d.kind.value)
                     for d in result.differences],
        unchecked=[InventoryUnchecked(field=u.field, declared=u.declared, reason=u.reason) for u in result.unchecked])
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
