"""Install verification: the installer ISO + a blank disk → install per the host's disk-config → the disk boots alone.

Phases, each with its own deadline and a message naming it:
  plan       evaluate disk-config.nix (disko's format) into partitions; refused before any VM if it cannot work
  installer  BIOS boot of the ISO beside a blank qcow2 disk; `install` typed at the isolinux prompt; the plan handed
             over through QEMU fw_cfg; wait for the installer's clean power-off
  disk-boot  the disk alone under OVMF (UEFI → systemd-boot → kernel): boot-complete line, then `/` and `/boot`
             mounted from the declared partitions with the declared file systems and sizes, swap active
Both consoles go to artifacts/<host>-iso/install.log.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import probes
from pipeline.artifacts import InstallResult, atomic_write_text, utc_now
from pipeline.diskplan import DiskPlan, DiskPlanError
from pipeline.diskplan import evaluate as evaluate_plan
from pipeline.domain import Domain, Format, Host, System
from pipeline.errors import CimError
from pipeline.inventory import boot_machine
from pipeline.log import say, step
from pipeline.process import run
from pipeline.qemu import Drive, Firmware, Vm, VmError, VmSpec, VmTimeout


class InstallError(VmError):
    """The install did not produce a disk that boots as declared; the message names the phase and the log."""


def installable_hosts(domain: Domain) -> list[str]:
    """Hosts with an install section and an ISO to install from (each has an install:<host> task)."""
    return [name for name, host in domain.hosts.items() if host.install and Format.iso in host.images]


def disk_mib(host: Host) -> int:
    """The virtual disk's size: install.size_gib, else the hardware disk install.disk names."""
    assert host.install is not None
    if host.install.size_gib is not None:
        return int(host.install.size_gib * 1024)
    disk = next(d for d in host.hardware.disks if d.name == host.install.disk)
    return int(disk.size_gib * 1024)


def vm_size(host: Host) -> tuple[int, int]:
    """(memory MiB, CPUs) of the install VMs: those of the boot VM."""
    machine = boot_machine(host)
    return machine.memory_mib, machine.cpus


def spec(host_name: str, host: Host) -> dict[str, Any]:
    """What, besides the ISO and the disk-config file, decides an install test, keyed as in domain.json."""
    assert host.install is not None
    return {"hosts": {host_name: {"install": {"disk": host.install.disk, "disk_mib": disk_mib(host)},
                                  "boot": {"memory_mib": vm_size(host)[0]}}}}


def plan_for(domain_dir: Path, host_name: str, host: Host) -> DiskPlan:
    """Evaluate the host's disk-config.nix into the install plan for its install disk."""
    if host.install is None:
        raise DiskPlanError(f"{domain_dir / 'domain.json'}: host {host_name!r} has no install section")
    return evaluate_plan(domain_dir / host.install.disk_config, host.install.disk, disk_mib(host))


# -- checking the installed system from its console ---------------------------------------------------------------

@dataclass(frozen=True)
class Mounted:
    mountpoint: str
    device: str
    fstype: str


def parse_report(console: str) -> tuple[dict[str, Mounted], dict[str, tuple[str, int]], set[str]]:
    """The installed system's `cim-fs:`, `cim-part:` and `cim-swap:` lines → (mounts, partitions, swaps)."""
    text = console.replace("\r", "")
    mounts = {m[0]: Mounted(m[0], m[1], m[2]) for m in re.findall(r"^cim-fs: (\S+) (\S+) (\S+) \d+K$", text, re.M)}
    parts = {m[0]: (m[1], int(m[2])) for m in re.findall(r"^cim-part: (\S+) (\S*) (\d+)MiB$", text, re.M)}
    swaps = set(re.findall(r"^cim-swap: (\S+) \d+K$", text, re.M))
    return mounts, parts, swaps


def check_installed(plan: DiskPlan, console: str, disk_device: str = "/dev/vda") -> list[str]:
    """What the disk-only boot shows against the plan: one line per check; raises InstallError on a mismatch."""
    mounts, parts, swaps = parse_report(console)
    checks, problems = [], []
    for part in plan.partitions:
        dev = f"{disk_device}{part.number}"
        want_mib = plan.partition_mib(part)
        got = parts.get(dev)
        if got is None:
            problems.append(f"partition {dev} ({part.label}) is missing")
            continue
        label, mib = got
        if label != part.label or mib != want_mib:
            problems.append(f"{dev} is {label!r} {mib} MiB, declared {part.label!r} {want_mib} MiB")
            continue
        if part.format == "swap":
            if dev not in swaps:
                problems.append(f"swap {dev} is not active")
                continue
            checks.append(f"{dev} {part.label} {mib} MiB: swap active")
            continue
        mounted = mounts.get(part.mountpoint or "")
        if mounted is None:
            problems.append(f"{part.mountpoint} is not mounted")
        elif mounted.device != dev or mounted.fstype != part.format:
            problems.append(f"{part.mountpoint} is {mounted.device} ({mounted.fstype}), declared {dev} ({part.format})")
        else:
            checks.append(f"{part.mountpoint} on {dev} {part.label} {mib} MiB {part.format}")
    if problems:
        raise InstallError("the installed system does not match the disk-config: " + "; ".join(problems))
    return checks


# -- the flow ------------------------------------------------------------------------------------------------------

def _phase_error(exc: VmError, phase: str) -> InstallError:
    kind = "stalled" if isinstance(exc, VmTimeout) else "failed"
    return InstallError(f"install phase '{phase}' {kind}: {exc}")


def verify(host_name: str, host: Host, domain_dir: Path, image: Path, image_xxh3: str, *, workdir: Path,
           log_dest: Path, log_name: str, record: Callable[[InstallResult], None]) -> InstallResult:
    """Install `image` onto a blank disk per the host's disk-config, boot the disk alone, check it.

    `record` gets the result (pass or fail) once a VM has run, before this returns or raises; a plan that cannot
    work is refused (DiskPlanError) before any VM.
    """
    assert host.install is not None
    task = f"install:{host_name}"
    plan = plan_for(domain_dir, host_name, host)  # refused here, before any VM, if it cannot work
    for line in plan.describe():
        say(task, f"plan: {line}")
    timeout = host.install.timeout_s
    workdir.mkdir(parents=True, exist_ok=True)
    plan_file = workdir / "install-plan.txt"
    plan_file.write_text(plan.installer_text())
    disk = workdir / "disk.qcow2"
    proc = run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), f"{plan.disk_mib}M"], timeout=60)
    if proc.returncode != 0:
        raise InstallError(f"qemu-img could not create the blank disk {disk}: {proc.stderr.strip()}")
    say(task, f"blank {plan.disk_mib} MiB disk {disk.name} (qcow2, sparse)")

    installer = VmSpec(
        name=f"{host_name}-installer", system=System.x86_64_linux, workdir=workdir / "installer",
        console_log=workdir / "installer.log", memory_mib=vm_size(host)[0], cpus=vm_size(host)[1],
        firmware=Firmware.bios, boot_order="d", published_log=log_dest,
        drives=(Drive(image, media="cdrom"), Drive(disk, format="qcow2", serial="cim-target")),
        extra=("-fw_cfg", f"name=opt/cim/install-plan,file={plan_file}"),
    )
    disk_boot = VmSpec(
        name=f"{host_name}-disk", system=System.x86_64_linux, workdir=workdir / "disk-boot",
        console_log=workdir / "disk-boot.log", memory_mib=vm_size(host)[0], cpus=vm_size(host)[1],
        firmware=Firmware.uefi, drives=(Drive(disk, format="qcow2"),), published_log=log_dest,
    )
    started = time.monotonic()
    phases: dict[str, float] = {}
    checks: list[str] = []
    error: str | None = None
    try:
        with step(task, f"phase installer: {image.name} (BIOS) beside the blank disk") as phase, \
                Vm(installer) as vm:
            try:
                vm.wait_for_console(r"boot:", timeout, "the isolinux boot: prompt")
                vm.type_console("install\r")
                first = vm.wait_for_console(rf"cim-install: installing|{probes.boot_complete_pattern(host_name)}",
                                            timeout, "the installer starting")
                if not first.group(0).startswith("cim-install"):
                    raise InstallError(
                        f"install phase 'installer' failed: the ISO booted its live system instead of the "
                        f"installer (the 'install' typed at the isolinux prompt was missed); log {log_dest}")
                say(task, "installer started; partitioning, formatting, copying, installing systemd-boot")
                remaining = max(1.0, timeout - phase.seconds)
                vm.wait_for_exit(remaining, "clean power-off after the install")
            except InstallError:
                raise
            except VmError as exc:
                raise _phase_error(exc, "installer") from None
            console = vm.console
            failed = re.search(r"^cim-install: FAILED: .*$", console, re.M)
            if failed or "cim-install: done" not in console:
                raise InstallError(f"install phase 'installer' failed: "
                                   f"{failed.group(0) if failed else 'no done line'}; log {log_dest}")
        phases["installer"] = phase.seconds

        with step(task, "phase disk-boot: the disk alone (UEFI/OVMF → systemd-boot)") as phase, Vm(disk_boot) as vm:
            try:
                vm.wait_for_console(probes.boot_complete_pattern(host_name), timeout, "the boot-complete line")
            except VmError as exc:
                raise _phase_error(exc, "disk-boot") from None
            console = vm.console
        phases["disk-boot"] = phase.seconds
        checks = check_installed(plan, console)
        for line in checks:
            say(task, f"check: {line}")
    except CimError as exc:
        error = str(exc).splitlines()[0]
        raise
    finally:
        outcome = InstallResult(result="fail" if error is not None or not checks else "pass", log=log_name,
                                image_xxh3=image_xxh3, disk_mib=plan.disk_mib, plan=plan.describe(),
                                seconds=round(time.monotonic() - started, 1), phases=phases, checks=checks,
                                error=error, at=utc_now())
        _publish_install_log(installer.console_log, disk_boot.console_log, log_dest)
        record(outcome)
    shutil.rmtree(workdir, ignore_errors=True)
    say(task, f"install verified in {outcome.seconds} s; log {log_dest}")
    return outcome


def _publish_install_log(installer_log: Path, disk_log: Path, dest: Path) -> None:
    parts = ["=== phase installer: installer ISO booted beside the blank disk ===\n"]
    parts.append(installer_log.read_text(errors="replace") if installer_log.exists() else "(no output)\n")
    if disk_log.exists():
        parts.append("\n=== phase disk-boot: second boot, from the installed disk alone (UEFI) ===\n")
        parts.append(disk_log.read_text(errors="replace"))
    atomic_write_text(dest, "".join(parts))
