"""Install verification: the installer ISO + a blank disk → install per the host's disk-config → the disk boots alone.

Every image is driven the same way, through the image contract (pipeline.contract, docs/contract.md):
  plan       evaluate disk-config.nix (disko's format) into partitions; refused before any VM if it cannot work or
             if its device is not where the host's declared disk kind appears (nvme /dev/nvme0n1, virtio /dev/vda, …)
  installer  the ISO, booted as the machine boots (UEFI by default, BIOS where hardware.firmware says so), beside a
             blank qcow2 disk attached as the host declares it; the install is requested
             with the `cim.install` credential as an SMBIOS type 11 string; the image carries its own disk plan (built
             from the same disk-config.nix); wait for the contract's started line, then its clean power-off, then
             its done line (or its failed line and the reason)
  disk-boot  the disk alone under OVMF (UEFI → the installed boot loader → kernel): boot-complete line, then `/` and
             `/boot` mounted from the declared partitions with the declared file systems and sizes, swap active
Both consoles go to artifacts/<host>-iso/install.log.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import contract, probes
from pipeline.artifacts import InstallResult, atomic_write_text, utc_now
from pipeline.contract import CONTRACT
from pipeline.disklayout import Layout, demo_refusal, read
from pipeline.diskplan import (
    FORMATS,
    GPT_BACKUP_MIB,
    PARTITION_KEYS,
    DiskPlan,
    DiskPlanError,
    check_fits,
    evaluate_devices,
    is_absolute_size,
    parse_size,
    plan_from_devices,
)
from pipeline.domain import DiskBus, Domain, Format, Host, System
from pipeline.errors import CimError
from pipeline.inventory import boot_machine
from pipeline.log import say, step
from pipeline.process import run
from pipeline.qemu import Drive, Firmware, Vm, VmError, VmSpec, VmTimeout, choose_accel

# An image that booted its live system instead of installing gets this long to print the started line (an installer
# may be ordered after the live system's boot-complete line, as a systemd unit after multi-user.target is).
LIVE_GRACE_S = 120.0


class InstallError(VmError):
    """The install did not produce a disk that boots as declared; the message names the phase and the log."""


def installable_hosts(domain: Domain) -> list[str]:
    """Hosts with an install section and an image to install from, an ISO or a netboot image (each has an
    install:<host> task; a netboot host installs from the LAN, pipeline.netinstall)."""
    return [
        name
        for name, host in domain.hosts.items()
        if host.install and (Format.iso in host.images or Format.netboot in host.images)
    ]


def install_format(host: Host) -> Format:
    """What a host installs from: its ISO, else its netboot image."""
    return Format.iso if Format.iso in host.images else Format.netboot


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
    declared = next((d for d in host.hardware.disks if d.name == host.install.disk), None)
    attached = (
        {"hardware": {"disks": {declared.name: {"kind": declared.bus.value if declared.bus else None}}}}
        if declared is not None
        else {}
    )
    return {
        "hosts": {
            host_name: {
                "install": {"disk": host.install.disk, "disk_mib": disk_mib(host)},
                "boot": {"memory_mib": vm_size(host)[0]},
                **attached,
            }
        }
    }


@dataclass(frozen=True)
class LayoutPlan:
    """A layout beyond one plain gpt disk (several disks, stable device names, LUKS, LVM, md RAID, btrfs): the disks
    as the install VM presents them, each a blank disk of the install disk's size, checked by layout once booted."""

    layout: Layout
    devices: dict[str, Any]
    disk_mib: int

    def describe(self) -> list[str]:
        return self.layout.describe()

    def installer_text(self) -> str:
        """What the installer is handed, for the install's cache key: the evaluated `disko.devices`."""
        return json.dumps(self.devices, sort_keys=True)


InstallPlan = DiskPlan | LayoutPlan


def plan_for(domain_dir: Path, host_name: str, host: Host, devices: dict[str, Any] | None = None) -> InstallPlan:
    """Evaluate the host's disk-config.nix into the install plan: one plain gpt disk named as the host's disk kind
    shows it → a DiskPlan (partition sizes checked); any other layout the demo installer makes → a LayoutPlan; a
    layout it cannot make → DiskPlanError naming why, before any VM.  `devices`: disko.devices already evaluated."""
    if host.install is None:
        raise DiskPlanError(f"{domain_dir / 'domain.json'}: host {host_name!r} has no install section")
    config = domain_dir / host.install.disk_config
    devices = devices if devices is not None else evaluate_devices(config)
    if _plain(devices):
        return plan_from_devices(devices, host.install.disk, disk_mib(host), str(config))
    layout = read(devices, str(config))
    refused = demo_refusal(layout, devices, host.hardware.firmware)
    if refused is not None:
        raise DiskPlanError(
            f"{config}: the demo installer does not make this layout: {refused}.",
            hint=f"`cim disk-plan {host_name}` shows the layout as disko has it.",
        )
    _check_fits(devices, disk_mib(host), str(config))
    return LayoutPlan(layout, devices, disk_mib(host))


def _plain(devices: dict[str, Any]) -> bool:
    """One disk, named as a disk kind shows it (/dev/vda, /dev/sda, /dev/nvme0n1), a gpt table of sized vfat/ext4
    file systems and swap with nothing else set: the layout a DiskPlan checks partition by partition."""
    disks = devices.get("disk") or {}
    if any(devices.get(kind) for kind in devices if kind != "disk") or len(disks) != 1:
        return False
    spec = next(iter(disks.values()))
    content = spec.get("content") or {}
    if DiskBus.for_device(str(spec.get("device", ""))) is None or content.get("type") != "gpt":
        return False
    return all(
        "size" in part
        and set(part) <= PARTITION_KEYS
        and (
            (part.get("content") or {}).get("type") == "swap"
            or ((part.get("content") or {}).get("type") == "filesystem" and part["content"].get("format") in FORMATS)
        )
        for part in (content.get("partitions") or {}).values()
    )


def _check_fits(devices: dict[str, Any], mib: int, source: str) -> None:
    """Each disk of a layout fits the install disk (every disk of a layout gets that size)."""
    for name, spec in (devices.get("disk") or {}).items():
        parts = (spec.get("content") or {}).get("partitions") or {}
        where = f"disko.devices.disk.{name}"
        if isinstance(parts, list):  # disko's legacy table: each partition from its start to its end
            ends = {
                f"partitions[{i}]": parse_size(str(part["end"]), f"{source}: {where}.content.partitions[{i}].end") or 0
                for i, part in enumerate(parts)
                if is_absolute_size(part.get("end", ""))
            }
            last = max(ends, key=lambda k: ends[k], default=None)
            if last is not None and ends[last] + GPT_BACKUP_MIB > mib:
                raise DiskPlanError(
                    f"{source}: {where}.content.{last} ends at {ends[last]} MiB, but the install disk is {mib} MiB. "
                    "Move its end or give the disk more room (domain.json install.size_gib or the hardware disk's "
                    "size_gib)."
                )
            continue
        sized = {p: part["size"] for p, part in parts.items() if part.get("size", "100%") != "100%"}
        fixed = {
            p: parse_size(size, f"{source}: {where}.content.partitions.{p}.size") or 0 for p, size in sized.items()
        }
        check_fits(fixed, [], mib, where, source)


def target_kind(domain_dir: Path, host_name: str, host: Host, plan: DiskPlan) -> DiskBus:
    """How the install VM attaches the target: as the host declares its disk, where the disk-config expects it."""
    assert host.install is not None
    config = domain_dir / host.install.disk_config
    where = f"disko.devices.disk.{plan.disk}.device"
    declared = next((d for d in host.hardware.disks if d.name == host.install.disk), None)
    kind = (declared.bus if declared else None) or DiskBus.for_device(plan.device)
    if kind is None:
        raise DiskPlanError(
            f"{config}: {where} = {plan.device!r} names no disk kind the install VM can attach "
            f"({', '.join(f'{k.value} {k.device}' for k in DiskBus)}).",
            hint=f"Give domain.json hosts.{host_name}.hardware.disks '{host.install.disk}' a 'kind' and the "
            "disk-config the device that kind appears as.",
        )
    if declared is not None and declared.device != plan.device:
        raise DiskPlanError(
            f"{config}: {where} = {plan.device!r}, but domain.json hosts.{host_name}.hardware.disks "
            f"'{declared.name}' is {declared.device!r}.",
            hint="Make the two name the same device.",
        )
    if plan.device != kind.device:
        raise DiskPlanError(
            f"{config}: {where} = {plan.device!r}, but the host's disk is {kind.value}, which the install VM (like "
            f"the real machine's first {kind.value} disk) shows as {kind.device}.",
            hint=f"Use {kind.device} in the disk-config, or change the disk's kind in domain.json.",
        )
    return kind


def deploy_bus(domain_dir: Path, host_name: str, host: Host, plan: InstallPlan) -> str:
    """The bus deploy:<host> attaches the kept installed disk on; DiskPlanError for a layout it cannot redeploy (the
    demo's deploy boots one kept disk, unattended)."""
    if isinstance(plan, DiskPlan):
        return target_kind(domain_dir, host_name, host, plan).value
    why = []
    if host.hardware.firmware != "uefi":
        why.append("GRUB as its boot loader (the demo's generations are systemd-boot entries)")
    if len(plan.layout.disks) > 1:
        why.append(f"{len(plan.layout.disks)} disks")
    if plan.layout.luks:
        why.append("a LUKS passphrase to type at every boot")
    if plan.layout.fstypes.get("/") == "tmpfs":
        why.append("a tmpfs root (the demo's deploy is made for a root that persists)")
    if why:
        assert host.install is not None
        raise DiskPlanError(
            f"{domain_dir / host.install.disk_config}: deploy:{host_name} in the demo boots one kept installed disk "
            f"unattended, and this layout has {' and '.join(why)}; install:{host_name} installs and checks it.",
            hint=f"Run install:{host_name} alone (`doit domain=… install:{host_name}`) for this layout.",
        )
    return next(iter(plan.layout.disks.values())).bus


# -- checking the installed system from its console ---------------------------------------------------------------


@dataclass(frozen=True)
class Mounted:
    mountpoint: str
    device: str
    fstype: str


def parse_report(console: str) -> tuple[dict[str, Mounted], dict[str, tuple[str, int]], set[str]]:
    """The installed system's report lines (contract `report`: fs, part, swap) → (mounts, partitions, swaps)."""
    text = console.replace("\r", "")
    fs, part, swap = (re.escape(p) for p in (CONTRACT.report.fs, CONTRACT.report.part, CONTRACT.report.swap))
    mounts = {m[0]: Mounted(m[0], m[1], m[2]) for m in re.findall(rf"^{fs} (\S+) (\S+) (\S+) \d+K$", text, re.M)}
    parts = {m[0]: (m[1], int(m[2])) for m in re.findall(rf"^{part} (\S+) (\S*) (\d+)MiB$", text, re.M)}
    swaps = set(re.findall(rf"^{swap} (\S+) \d+K$", text, re.M))
    return mounts, parts, swaps


def check_installed(plan: DiskPlan, console: str) -> list[str]:
    """What the disk-only boot shows against the plan: one line per check; raises InstallError on a mismatch."""
    mounts, parts, swaps = parse_report(console)
    checks, problems = [], []
    for part in plan.partitions:
        dev = contract.partition_device(plan.device, part.number)
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


def parse_layers(console: str) -> list[list[str]]:
    """The installed system's layer lines (contract `report.layer`): md, dm and subvol, each split into words."""
    layer = re.escape(CONTRACT.report.layer)
    return [m.split() for m in re.findall(rf"^{layer} (.+?)\s*$", console.replace("\r", ""), re.M)]


def check_layout(layout: Layout, console: str) -> list[str]:
    """What the disk-only boot shows against a LayoutPlan: partitions by label, every mount point's file system type
    (and btrfs subvolume), swap, LUKS, LVM volumes and md arrays; raises InstallError on a mismatch."""
    mounts, parts, swaps = parse_report(console)
    layers = parse_layers(console)
    dm = {words[1]: words[2] for words in layers if words[0] == "dm" and len(words) >= 3}
    md = {words[1]: words[2:] for words in layers if words[0] == "md" and len(words) >= 5}
    subvols = {words[1]: words[2] for words in layers if words[0] == "subvol" and len(words) >= 3}
    labels = {label: dev for dev, (label, _) in parts.items()}
    checks, problems = [], []
    for label in layout.partlabels:
        if label in labels:
            checks.append(f"partition {label}: {labels[label]} ({parts[labels[label]][1]} MiB)")
        else:
            problems.append(f"no partition is labelled {label}")
    for mp, fstype in sorted(layout.fstypes.items()):
        got = mounts.get(mp)
        if got is None:
            problems.append(f"{mp} is not mounted")
        elif got.fstype != fstype:
            problems.append(f"{mp} is {got.fstype} on {got.device}, declared {fstype}")
        elif mp in layout.subvolumes and subvols.get(mp) != layout.subvolumes[mp]:
            problems.append(f"{mp} is btrfs subvolume {subvols.get(mp)}, declared {layout.subvolumes[mp]}")
        else:
            sub = f" subvolume {layout.subvolumes[mp]}" if mp in layout.subvolumes else ""
            checks.append(f"{mp} on {got.device}: {fstype}{sub}")
    if len(swaps) < len(layout.swaps):
        problems.append(f"{len(swaps)} swap area(s) active, declared {len(layout.swaps)}")
    elif layout.swaps:
        checks.append(f"swap active: {', '.join(sorted(swaps))}")
    # Device-mapper devices by name and kind: (name, kind, as a check, as a problem).
    mapped = [(n, "luks", f"/dev/mapper/{n}: an open LUKS device", f"/dev/mapper/{n} is not an open LUKS device")
              for n in layout.luks]  # fmt: skip
    mapped += [(lv, "lvm", f"LVM logical volume {lv} is active", f"LVM logical volume {lv} is not active")
               for lv in layout.lvs if layout.lv_types.get(lv) != "thin-pool"]  # fmt: skip
    # A thin pool is active as its pool target (-tpool); a mirror or RAID volume has its images (sub-LVs) active.
    mapped += [(f"{lv}-tpool", "lvm", f"LVM thin pool {lv} is active ({lv}-tpool)", f"LVM thin pool {lv} is not active")
               for lv, kind in layout.lv_types.items() if kind == "thin-pool"]  # fmt: skip
    for name, kind, ok, missing in mapped:
        if dm.get(name) == kind:
            checks.append(ok)
        else:
            problems.append(missing)
    for lv, kind in sorted(layout.lv_types.items()):
        image = {"mirror": "_mimage_"}.get(kind, "_rimage_" if kind.startswith("raid") else None)
        if image is None:
            continue
        images = sorted(n for n in dm if n.startswith(f"{lv}{image}"))
        if len(images) >= 2:
            checks.append(f"LVM logical volume {lv} is {kind} of {len(images)} images ({', '.join(images)})")
        else:
            problems.append(f"LVM logical volume {lv} has {len(images)} {kind} image(s) active, not two or more")
    for name, level in sorted(layout.arrays.items()):
        got_md = md.get(name)
        if got_md is None:
            problems.append(f"md array {name} is not assembled")
        elif got_md[0] != f"raid{level}" or got_md[1] not in ("clean", "active"):
            problems.append(f"md array {name} is {got_md[0]} {got_md[1]}, declared raid{level}")
        else:
            checks.append(f"md array {name}: {got_md[0]}, {got_md[1]}, {got_md[2]} devices")
    if problems:
        raise InstallError("the installed system does not match the disk-config: " + "; ".join(problems))
    return checks


def check_plan(plan: InstallPlan, console: str) -> list[str]:
    return check_layout(plan.layout, console) if isinstance(plan, LayoutPlan) else check_installed(plan, console)


# -- the flow ------------------------------------------------------------------------------------------------------


def _phase_error(exc: VmError, phase: str) -> InstallError:
    kind = "stalled" if isinstance(exc, VmTimeout) else "failed"
    return InstallError(f"install phase '{phase}' {kind}: {exc}")


def verify(
    host_name: str,
    host: Host,
    domain_dir: Path,
    image: Path,
    image_xxh3: str,
    *,
    workdir: Path,
    log_dest: Path,
    log_name: str,
    record: Callable[[InstallResult], None],
    machine_state: Path | None = None,
    plan: InstallPlan | None = None,
    keep_disk: Path | None = None,
) -> InstallResult:
    """Install `image` onto a blank disk per the host's disk-config, boot the disk alone, check it (`plan`: the
    disk-config already evaluated by the caller; else it is evaluated here).

    `record` gets the result (pass or fail) once a VM has run, before this returns or raises; a plan that cannot
    work is refused (DiskPlanError) before any VM.  With `machine_state`, both VMs use KVM where the machine's canary
    says it works (a NixOS install under TCG takes hours), else TCG.  With `keep_disk`, the installed disk of a pass
    is moved there (deploy:<host> boots it).
    """
    assert host.install is not None
    task = f"install:{host_name}"
    plan = plan or plan_for(domain_dir, host_name, host)  # refused here, before any VM, if it cannot work
    for line in plan.describe():
        say(task, f"plan: {line}")
    timeout = host.install.timeout_s
    targets, disk = target_drives(domain_dir, host_name, host, plan, workdir)
    installer, disk_boot = _vm_specs(host_name, host, image, targets, workdir, log_dest)
    luks: list[str] = plan.layout.luks if isinstance(plan, LayoutPlan) else []
    passphrase = secrets.token_hex(8) if luks else ""
    if luks:
        # The LUKS key file disko would be given, handed to this install only (a fresh one each run); the disk boot
        # is asked for it on the console, as NixOS's stage 1 asks, and the pipeline types it there.
        credential = f"type={CONTRACT.install.smbios_type},value=io.systemd.credential:cim.luks-key={passphrase}"
        installer = dataclasses.replace(installer, extra=(*installer.extra, "-smbios", credential))
        say(task, f"LUKS {', '.join(luks)}: a passphrase for this install, typed at the disk boot's prompt")
    if machine_state is not None:
        # The canary (when this machine boot has no verdict yet) boots the ISO alone: no target disk, no request.
        accel, why = choose_accel(dataclasses.replace(installer, drives=installer.drives[:1], extra=()), machine_state)
        installer = dataclasses.replace(installer, accel=accel)
        disk_boot = dataclasses.replace(disk_boot, accel=accel)
        say(task, f"both VMs run under {accel}: {why}")
    started = time.monotonic()
    phases: dict[str, float] = {}
    checks: list[str] = []
    error: str | None = None
    try:
        phases["installer"] = _run_installer(installer, host_name, image.name, timeout, log_dest)
        phases["disk-boot"], console = _boot_disk(disk_boot, host_name, timeout, passphrase)
        checks = check_plan(plan, console)
        for line in checks:
            say(task, f"check: {line}")
    except CimError as exc:
        error = str(exc).splitlines()[0]
        raise
    finally:
        outcome = InstallResult(
            result="fail" if error is not None or not checks else "pass",
            log=log_name,
            image_xxh3=image_xxh3,
            disk_mib=plan.disk_mib,
            plan=plan.describe(),
            seconds=round(time.monotonic() - started, 1),
            phases=phases,
            checks=checks,
            error=error,
            at=utc_now(),
        )
        _publish_install_log(installer.console_log, disk_boot.console_log, log_dest)
        record(outcome)
    keep_installed(disk, keep_disk)
    shutil.rmtree(workdir, ignore_errors=True)
    say(task, f"install verified in {outcome.seconds} s; log {log_dest}")
    return outcome


def keep_installed(disk: Path, keep: Path | None) -> None:
    """Move the disk of a passed install to `keep` (one rename: a later run finds it whole or not at all)."""
    if keep is not None:
        keep.parent.mkdir(parents=True, exist_ok=True)
        os.replace(disk, keep)


def target_drives(
    domain_dir: Path, host_name: str, host: Host, plan: InstallPlan, workdir: Path
) -> tuple[list[Drive], Path]:
    """The blank disks the install VM gets, in the order the machine numbers them, each attached so that the name
    the disk-config gives it exists inside the machine; and the layout's first disk (kept for deploy)."""
    task = f"install:{host_name}"
    if isinstance(plan, DiskPlan):
        kind = target_kind(domain_dir, host_name, host, plan)
        disk = blank_disk(workdir, plan.disk_mib)
        say(
            task,
            f"blank {plan.disk_mib} MiB disk {disk.name} (qcow2, sparse), attached as {kind.value} ({kind.device})",
        )
        return [Drive(disk, format="qcow2", serial="cim-target", bus=kind.value)], disk
    drives = []
    for index, (name, shown) in enumerate(plan.layout.disks.items()):
        disk = blank_disk(workdir, plan.disk_mib, "disk.qcow2" if index == 0 else f"disk-{name}.qcow2")
        say(task, f"blank {plan.disk_mib} MiB disk {disk.name} for {name} ({shown.device}): {shown.describe()}")
        serial = shown.serial or ("" if shown.model or shown.wwn else f"cim-{name}")  # a name of its own, else ours
        drives.append(
            Drive(disk, format="qcow2", serial=serial, bus=shown.bus, model=shown.model, wwn=shown.wwn, slot=shown.slot)
        )
    # A disk named by its place (vdb, sdb) gets it: the disks of a bus are attached in that order, and a place the
    # layout leaves empty (only /dev/vdb named) holds a small blank disk it does not use, as a machine's other disk.
    placed = sorted(zip(plan.layout.disks.values(), drives, strict=True), key=lambda pd: (pd[0].bus, pd[0].index))
    out: list[Drive] = []
    for bus in sorted({shown.bus for shown, _ in placed}):
        on_bus = [(shown, drive) for shown, drive in placed if shown.bus == bus]
        for position in range(max(shown.index for shown, _ in on_bus) + 1):
            here = [drive for shown, drive in on_bus if shown.index == position]
            if here:
                out += here
            elif not any(shown.serial or shown.model or shown.wwn or shown.slot is not None for shown, _ in on_bus):
                filler = blank_disk(workdir, 16, f"unused-{bus}{position}.qcow2")
                say(
                    task,
                    f"blank 16 MiB disk {filler.name} in {bus} place {position + 1}, which the layout leaves empty",
                )
                out.append(Drive(filler, format="qcow2", serial=f"cim-unused-{position}", bus=bus))
    return out, drives[0].path


def blank_disk(workdir: Path, mib: int, name: str = "disk.qcow2") -> Path:
    """A sparse blank qcow2 disk of `mib` MiB in `workdir`."""
    workdir.mkdir(parents=True, exist_ok=True)
    disk = workdir / name
    proc = run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), f"{mib}M"], timeout=60)
    if proc.returncode != 0:
        raise InstallError(f"qemu-img could not create the blank disk {disk}: {proc.stderr.strip()}")
    return disk


def _vm_specs(
    host_name: str, host: Host, image: Path, targets: list[Drive], workdir: Path, log_dest: Path
) -> tuple[VmSpec, VmSpec]:
    """The installer VM (the ISO under BIOS beside the blank disk, install requested) and the disk-only VM (UEFI)."""
    memory_mib, cpus = vm_size(host)
    installer = VmSpec(
        name=f"{host_name}-installer",
        system=System.x86_64_linux,
        workdir=workdir / "installer",
        console_log=workdir / "installer.log",
        memory_mib=memory_mib,
        cpus=cpus,
        # As the machine boots (domain.json hardware.firmware): a UEFI machine's installer runs under UEFI, where
        # `bootctl install` can write the EFI variables that systemd-boot's install with canTouchEfiVariables needs.
        firmware=Firmware.uefi if host.hardware.firmware == "uefi" else Firmware.bios,
        boot_order="d",
        published_log=log_dest,
        drives=(
            Drive(image, media="cdrom", bootindex=1),
            dataclasses.replace(targets[0], bootindex=2),
            *targets[1:],
        ),
        extra=tuple(contract.install_request()),
    )
    disk_boot = VmSpec(
        name=f"{host_name}-disk",
        system=System.x86_64_linux,
        workdir=workdir / "disk-boot",
        console_log=workdir / "disk-boot.log",
        memory_mib=memory_mib,
        cpus=cpus,
        firmware=Firmware.uefi if host.hardware.firmware == "uefi" else Firmware.bios,
        drives=tuple(targets),
        published_log=log_dest,
    )
    return installer, disk_boot


def _run_installer(spec: VmSpec, host_name: str, image_name: str, timeout: float, log_dest: Path) -> float:
    """Phase 'installer': boot the installer, wait for its started line, its power-off and its done line; the
    phase's seconds.  Raises InstallError with the failed line's reason, or when the image ignores the request."""
    task = f"install:{host_name}"
    names = CONTRACT.install
    started_re = contract.line_pattern(names.started, host_name) + ".*$"
    failed_re = contract.line_pattern(names.failed, host_name) + ".*$"
    done_re = contract.line_pattern(names.done, host_name)
    with (
        step(
            task,
            f"phase installer: {image_name} ({spec.firmware.value.upper()}) beside the blank disk, install requested "
            f"({names.credential} credential)",
        ) as phase,
        Vm(spec) as vm,
    ):
        try:
            first = vm.wait_for_console(
                f"{started_re}|{failed_re}|{probes.boot_complete_pattern(host_name)}",
                timeout,
                "the installer's started line",
            )
            if re.match(probes.boot_complete_pattern(host_name), first.group(0)):
                first = _started_after_live_boot(vm, started_re, failed_re, timeout - phase.seconds, log_dest)
            remaining = max(1.0, timeout - phase.seconds)
            if re.match(failed_re, first.group(0), re.M):
                # The reason may still be on its way: give the installer its power-off, then read the line.
                with contextlib.suppress(VmError):
                    vm.wait_for_exit(min(30.0, remaining), "power-off after the failed line")
            else:
                say(task, f"installer started: {first.group(0).strip()}")
                vm.wait_for_exit(remaining, "clean power-off after the install")
        except InstallError:
            raise
        except VmError as exc:
            raise _phase_error(exc, "installer") from None
        console = vm.console.replace("\r", "")
        failed = re.search(failed_re, console, re.M)
        if failed or not re.search(done_re, console, re.M):
            raise InstallError(
                f"install phase 'installer' failed: "
                f"{failed.group(0) if failed else 'powered off without the done line'}; "
                f"log {log_dest}"
            )
    return phase.seconds


def _started_after_live_boot(vm: Vm, started_re: str, failed_re: str, left: float, log_dest: Path) -> re.Match[str]:
    """An installer ordered after the live system's boot-complete line: its started (or failed) line, within
    LIVE_GRACE_S of that line."""
    names = CONTRACT.install
    grace = min(LIVE_GRACE_S, max(1.0, left))
    try:
        return vm.wait_for_console(f"{started_re}|{failed_re}", grace, "the installer's started line")
    except VmTimeout:
        raise InstallError(
            f"install phase 'installer' failed: the ISO booted its live system and no installer "
            f"started within {grace:g} s of its boot-complete line: the image does not act on the "
            f"install request (SMBIOS type {names.smbios_type} '{names.smbios_value}'); log "
            f"{log_dest}"
        ) from None


def _boot_disk(spec: VmSpec, host_name: str, timeout: float, passphrase: str = "") -> tuple[float, str]:
    """Phase 'disk-boot': the installed disk alone until its boot-complete line (typing `passphrase` at each LUKS
    prompt on the way); the phase's seconds and console."""
    done = probes.boot_complete_pattern(host_name)
    with (
        step(
            f"install:{host_name}",
            f"phase disk-boot: the disk alone ({spec.firmware.value.upper()} → the installed boot loader)",
        ) as phase,
        Vm(spec) as vm,
    ):
        try:
            after = 0
            while passphrase:
                seen = vm.wait_for_console(
                    f"{done}|Passphrase for \\S+ \\(\\S+\\): ",
                    max(1.0, timeout - phase.seconds),
                    "the boot-complete line",
                    after,
                )
                if not seen.group(0).startswith("Passphrase"):
                    break
                say(f"install:{host_name}", f"disk-boot: {seen.group(0).strip()} (typing this install's passphrase)")
                vm.type_text(passphrase + "\n")
                after = seen.end()
            vm.wait_for_console(done, max(1.0, timeout - phase.seconds), "the boot-complete line")
        except VmError as exc:
            raise _phase_error(exc, "disk-boot") from None
        console = vm.console
    return phase.seconds, console


def _publish_install_log(installer_log: Path, disk_log: Path, dest: Path) -> None:
    parts = ["=== phase installer: installer ISO booted beside the blank disk ===\n"]
    parts.append(installer_log.read_text(errors="replace") if installer_log.exists() else "(no output)\n")
    if disk_log.exists():
        parts.append("\n=== phase disk-boot: second boot, from the installed disk alone ===\n")
        parts.append(disk_log.read_text(errors="replace"))
    atomic_write_text(dest, "".join(parts))
