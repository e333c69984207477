"""A host's plain disk-config.nix (disko's format) → an install plan: GPT partitions, file systems, swap, mount points.

The plain layout, checked partition by partition (size, label, file system): `disko.devices.disk.<name>` of
`type = "disk"` with a `gpt` table, whose partitions hold `filesystem` (vfat, ext4) or `swap`.  Any other layout is
pipeline.disklayout's, checked by layout (pipeline.install.LayoutPlan); here it is refused with the attribute path
named.  The demo image lays out the same partitions from the same file (configs/demo/lib/disklayout.nix; a test holds
its sfdisk script equal to `sfdisk_script`).  Partition order follows disko: explicit `priority`, else BIOS boot
(EF02) first, the ESP (EF00) next, other fixed sizes, and "100%" last; equal priorities keep Nix's (alphabetical)
order.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import nix
from pipeline.errors import CimError

FORMATS = {"vfat", "ext4"}
# GPT type codes (sgdisk's short form) → partition type GUIDs, as disko writes them.
TYPE_GUIDS = {
    "EF00": "C12A7328-F81F-11D2-BA4B-00A0C93EC93B",  # EFI system partition
    "EF02": "21686148-6449-6E6F-744E-656564454649",  # BIOS boot
    "8200": "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F",  # Linux swap
    "8300": "0FC63DAF-8483-4772-8E79-3D69D8477DE4",  # Linux file system
}
ALIGN_MIB = 1  # first partition at 1 MiB, as sgdisk/disko align
GPT_BACKUP_MIB = 1  # room for the backup GPT at the end of the disk


class DiskPlanError(CimError):
    """The disk-config cannot be installed; the message names the attribute."""


@dataclass(frozen=True)
class Partition:
    number: int
    name: str  # the disko partition name, e.g. "ESP"
    label: str  # the GPT partition label disko writes: disk-<disk>-<name>
    size_mib: int | None  # None: the rest of the disk ("100%")
    type_code: str
    format: str  # vfat, ext4 or swap
    mountpoint: str | None

    @property
    def type_guid(self) -> str:
        return TYPE_GUIDS[self.type_code]


@dataclass(frozen=True)
class DiskPlan:
    disk: str
    device: str
    disk_mib: int
    partitions: tuple[Partition, ...]

    def partition_mib(self, part: Partition) -> int:
        """A partition's size in MiB; the rest of the disk for a "100%" one."""
        if part.size_mib is not None:
            return part.size_mib
        fixed = sum(p.size_mib or 0 for p in self.partitions)
        return self.disk_mib - ALIGN_MIB - GPT_BACKUP_MIB - fixed

    def by_mountpoint(self, mountpoint: str) -> Partition | None:
        return next((p for p in self.partitions if p.mountpoint == mountpoint), None)

    def sfdisk_script(self) -> str:
        """The partition table as an sfdisk script (sizes in MiB, names as disko's partition labels)."""
        lines = ["label: gpt", f"first-lba: {ALIGN_MIB * 2048}"]
        for part in self.partitions:
            size = f"size={part.size_mib}MiB, " if part.size_mib is not None else ""
            lines.append(f'{size}type={part.type_guid}, name="{part.label}"')
        return "\n".join(lines) + "\n"

    def installer_text(self) -> str:
        """The plan as text (target device, sfdisk script, one line per file system): what keys a kept install."""
        out = [f"# cim install plan for disko disk '{self.disk}'", f"target {self.device}"]
        out += [f"sfdisk {line}" for line in self.sfdisk_script().splitlines()]
        for part in self.partitions:
            out.append(f"fs {part.number} {part.format} {part.mountpoint or '-'} {part.label}")
        return "\n".join(out) + "\n"

    def describe(self) -> list[str]:
        return [
            f"{p.number}: {p.label} {self.partition_mib(p)} MiB {p.format}"
            + (f" on {p.mountpoint}" if p.mountpoint else "")
            for p in self.partitions
        ]


_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B)?$", re.I)


def is_absolute_size(value: Any) -> bool:
    """A size as parse_size reads it ("512M", "16G"), not a share ("100%") or an offset from the end ("-1G")."""
    return bool(_SIZE.match(str(value)))


def parse_size(value: Any, where: str) -> int | None:
    """disko sizes ("512M", "16G", "100%") → MiB; None for "100%"."""
    if value == "100%":
        return None
    match = _SIZE.match(str(value))
    if not match:
        raise DiskPlanError(
            f'{where} = {value!r}: not a size the installer understands (use e.g. "512M", "16G" or "100%")'
        )
    number, unit = float(match.group(1)), match.group(2).upper()
    mib = number * {"": 1 / 2**20, "K": 1 / 1024, "M": 1, "G": 1024, "T": 1024**2}[unit]
    if mib < 1:
        raise DiskPlanError(f"{where} = {value!r}: smaller than 1 MiB")
    return int(mib)


def _priority(name: str, part: dict[str, Any]) -> int:
    if "priority" in part:
        return int(part["priority"])
    if part.get("type") == "EF02":
        return 100
    if part.get("type") == "EF00":
        return 1000
    if part.get("size") == "100%":
        return 9001
    return 9000


def plan_from_devices(devices: dict[str, Any], disk: str, disk_mib: int, source: str) -> DiskPlan:
    """Turn evaluated `disko.devices` into a plan for the named disk, refusing what the installer cannot do."""
    spec, where = _the_disk(devices, disk, source)
    raw = spec["content"].get("partitions") or {}
    if not raw:
        raise DiskPlanError(f"{source}: {where}.content.partitions is empty.")
    ordered = sorted(raw.items(), key=lambda item: _priority(*item))  # stable: ties keep Nix's order
    parts = tuple(
        _partition(number, name, part, disk, f"{where}.content.partitions.{name}", source)
        for number, (name, part) in enumerate(ordered, start=1)
    )
    plan = DiskPlan(disk, str(spec.get("device", "")), disk_mib, parts)
    _check_fits(plan, where, source)
    if plan.by_mountpoint("/") is None:
        raise DiskPlanError(f'{source}: no partition of {where} is mounted on "/".')
    return plan


PARTITION_KEYS = frozenset(
    {"size", "type", "content", "priority", "label", "name", "start", "end", "alignment", "device", "_index"}
)


def _the_disk(devices: dict[str, Any], disk: str, source: str) -> tuple[dict[str, Any], str]:
    """The named disk's evaluated spec and its option path; refused unless it is a gpt `disk` and the only kind."""
    prefix = "disko.devices"
    for kind in devices:
        if kind != "disk" and devices[kind]:
            raise DiskPlanError(
                f"{source}: {prefix}.{kind} is not supported by the installer (only disk with gpt, "
                "filesystem and swap). Remove it or install this host with disko itself."
            )
    disks = devices.get("disk") or {}
    if disk not in disks:
        raise DiskPlanError(
            f"{source}: {prefix}.disk.{disk} is missing (domain.json install.disk names it); "
            f"the config has: {', '.join(sorted(disks)) or 'no disks'}."
        )
    spec = disks[disk]
    where = f"{prefix}.disk.{disk}"
    if spec.get("type", "disk") != "disk":
        raise DiskPlanError(f'{source}: {where}.type = {spec.get("type")!r} is not supported (use "disk").')
    content = spec.get("content") or {}
    if content.get("type") != "gpt":
        raise DiskPlanError(
            f'{source}: {where}.content.type = {content.get("type")!r} is not supported by the installer (use "gpt").'
        )
    return {**spec, "content": content}, where


def _partition(number: int, name: str, part: dict[str, Any], disk: str, pwhere: str, source: str) -> Partition:
    """One gpt partition of the plan: a file system or swap, its GPT type and size."""
    unknown = set(part) - PARTITION_KEYS
    if unknown:
        raise DiskPlanError(f"{source}: {pwhere}.{sorted(unknown)[0]} is not supported by the installer.")
    pcontent = part.get("content") or {}
    ctype = pcontent.get("type")
    if ctype == "filesystem":
        fmt = pcontent.get("format")
        if fmt not in FORMATS:
            raise DiskPlanError(
                f"{source}: {pwhere}.content.format = {fmt!r} is not supported by the installer "
                f"(supported: {', '.join(sorted(FORMATS))})."
            )
        mountpoint = pcontent.get("mountpoint")
        default_type = "EF00" if mountpoint == "/boot" and fmt == "vfat" else "8300"
    elif ctype == "swap":
        fmt, mountpoint, default_type = "swap", None, "8200"
    else:
        raise DiskPlanError(
            f"{source}: {pwhere}.content.type = {ctype!r} is not supported by the installer "
            "(supported: filesystem, swap)."
        )
    type_code = str(part.get("type", default_type)).upper()
    if type_code not in TYPE_GUIDS:
        raise DiskPlanError(
            f"{source}: {pwhere}.type = {type_code!r} is not a GPT type the installer knows ({', '.join(TYPE_GUIDS)})."
        )
    if "size" not in part:
        raise DiskPlanError(f'{source}: {pwhere}.size is required (e.g. "512M" or "100%").')
    size = parse_size(part["size"], f"{pwhere}.size")
    label = str(part.get("label") or f"disk-{disk}-{name}")
    return Partition(number, name, label, size, type_code, fmt, mountpoint)


def _check_fits(plan: DiskPlan, where: str, source: str) -> None:
    rest = [p.name for p in plan.partitions if p.size_mib is None]
    fixed = {p.name: p.size_mib for p in plan.partitions if p.size_mib is not None}
    check_fits(fixed, rest, plan.disk_mib, where, source)


def check_fits(fixed: dict[str, int], rest: list[str], disk_mib: int, where: str, source: str) -> None:
    """At most one partition of a gpt table takes the rest, and the fixed sizes (MiB, by partition name) plus the
    GPT fit a disk of `disk_mib` (the plain plan's disk, and each disk of a layout)."""
    if len(rest) > 1:
        raise DiskPlanError(
            f'{source}: {where}.content.partitions: only one partition can take "100%" ({", ".join(rest)} do).'
        )
    need = ALIGN_MIB + sum(fixed.values()) + GPT_BACKUP_MIB + (1 if rest else 0)
    if need > disk_mib:
        raise DiskPlanError(
            f"{source}: {where}.content.partitions need {need} MiB "
            f"({' + '.join(f'{name} {mib}' for name, mib in fixed.items())} MiB plus the GPT), "
            f"but the install disk is {disk_mib} MiB. Shrink a partition or give the disk more room "
            "(domain.json install.size_gib or the hardware disk's size_gib)."
        )


# Accept both a plain attrset and a disko-style function ({ lib, ... }: { disko.devices = …; }), handed a stand-in for
# the few nixpkgs lib functions disko configs call (evaluated offline: no nixpkgs here).
LIB = (
    "{ genAttrs = names: f: builtins.listToAttrs (map (n: { name = n; value = f n; }) names);"
    " replaceStrings = builtins.replaceStrings; mkDefault = x: x; mkForce = x: x; optionalAttrs = c: a: if c then a"
    " else { }; optional = c: x: if c then [ x ] else [ ]; }"
)
APPLY = (
    f"c: let lib = {LIB}; v = if builtins.isFunction c then c {{ inherit lib; }} else c; "
    'in v.disko.devices or (throw "no disko.devices")'
)


def evaluate(disk_config: Path, disk: str, disk_mib: int) -> DiskPlan:
    """Evaluate a disk-config.nix with nix and plan the install of `disk`."""
    return plan_from_devices(evaluate_devices(disk_config), disk, disk_mib, str(disk_config))


def evaluate_devices(disk_config: Path) -> dict[str, Any]:
    """`disko.devices` of a disk-config.nix (a plain attrset or a function of `{ lib, … }`), evaluated by nix."""
    if not disk_config.is_file():
        raise DiskPlanError(f"{disk_config}: file not found (domain.json install.disk_config names it).")
    try:
        devices = nix.eval_file_json(disk_config, apply=APPLY)
    except nix.NixError as exc:
        raise DiskPlanError(
            f"{disk_config}: cannot be evaluated as a disko config. {exc}", exc.hint, exc.detail
        ) from None
    if not isinstance(devices, dict):
        raise DiskPlanError(f"{disk_config}: disko.devices is not an attribute set.")
    return devices
