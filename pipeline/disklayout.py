"""A disk-config.nix as disko has it → the layout a machine must show once installed, whatever disko types it uses.

`pipeline.diskplan` is the demo installer's plan (gpt, vfat/ext4, swap on one disk).  This module reads every disko
type (disk with gpt / table / mbr, filesystem, swap, luks, lvm_pv / lvm_vg, mdraid / mdadm, btrfs and its subvolumes,
nodev, zfs / zpool, bcachefs) into what can be checked from inside the booted system (partitions by label, file
systems by mount point and type, swap, the LUKS / LVM / RAID layers by type) and what cannot, with the reason.  It
also says how the install VM presents each disk so that the name the config uses exists inside it (QEMU's serial=,
model=, wwn= give the /dev/disk/by-id names udev makes), and refuses, in one paragraph, a name QEMU cannot produce.

Planning never asks whether an installer can make the layout: that is `demo_refusal`, for the demo's installer.
disko itself (configs/cim) installs every type here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.diskplan import DiskPlanError, evaluate_devices, is_absolute_size, parse_size

KNOWN_TOP = ("disk", "mdadm", "lvm_vg", "zpool", "nodev", "bcachefs_filesystems")


@dataclass(frozen=True)
class Presented:
    """How the install VM attaches a disk so that its disko device name exists inside the machine."""

    device: str
    bus: str  # virtio, sata, nvme, scsi
    index: int = 0  # its place among disks of its bus (vdb: 1)
    serial: str = ""
    model: str = ""
    wwn: str = ""
    slot: int | None = None  # its PCI slot on the root bus (by-path names), as QEMU's addr=

    def describe(self) -> str:
        extra = ", ".join(
            f"{k}={v}"
            for k, v in (
                ("serial", self.serial),
                ("model", self.model),
                ("wwn", self.wwn),
                ("PCI slot", f"0x{self.slot:02x}" if self.slot is not None else ""),
            )
            if v
        )
        return f"{self.bus} disk" + (f" ({extra})" if extra else f" #{self.index + 1}")


@dataclass
class Layout:
    """What a disk-config lays out, as checks and as things that cannot be checked here."""

    source: str
    disks: dict[str, Presented] = field(default_factory=dict)
    layers: list[str] = field(default_factory=list)  # "luks crypted on disk-main-luks", …
    mounts: dict[str, str] = field(default_factory=dict)  # mount point → "ext4 on …"
    swaps: list[str] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)
    unchecked: list[tuple[str, str]] = field(default_factory=list)  # (what, why)
    types: set[str] = field(default_factory=set)
    # What the installed system's report is compared with (pipeline.install.check_layout).
    partlabels: list[str] = field(default_factory=list)
    bios_boot: list[str] = field(default_factory=list)  # BIOS boot partitions (EF02): where GRUB embeds itself
    fstypes: dict[str, str] = field(default_factory=dict)  # mount point → file system type
    subvolumes: dict[str, str] = field(default_factory=dict)  # mount point → btrfs subvolume
    luks: list[str] = field(default_factory=list)  # /dev/mapper names
    lvs: list[str] = field(default_factory=list)  # "vg-lv", as device-mapper names them
    lv_types: dict[str, str] = field(default_factory=dict)  # "vg-lv" → disko's lvm_type (thin-pool, mirror, raid1, …)
    arrays: dict[str, int] = field(default_factory=dict)  # md name → RAID level

    def describe(self) -> list[str]:
        out = [f"disk {name}: {p.device} → {p.describe()}" for name, p in self.disks.items()]
        out += [f"layer: {line}" for line in self.layers]
        out += [f"check: {line}" for line in self.checks]
        out += [f"unchecked: {what} ({why})" for what, why in self.unchecked]
        return out


# -- device names --------------------------------------------------------------------------------------------------

_BY_ID = "/dev/disk/by-id/"
FORMS = (
    "/dev/vdX (virtio), /dev/sdX (SATA), /dev/nvmeNn1 (NVMe), /dev/disk/by-id/virtio-SERIAL, "
    "/dev/disk/by-id/ata-MODEL_SERIAL, /dev/disk/by-id/nvme-QEMU_NVMe_Ctrl_SERIAL, /dev/disk/by-id/wwn-0xHEX, "
    "/dev/disk/by-diskseq/N, and on the root PCI bus /dev/disk/by-path/pci-0000:00:SS.0 (virtio; also virtio-pci-…) "
    "and /dev/disk/by-path/pci-0000:00:SS.0-nvme-1 (SS a free slot, 03 to 1f)"
)
# Slots of the install VM's root PCI bus that hold something else (host bridge, PIIX3 functions, VGA).
_TAKEN_SLOTS = {0, 1, 2}


def present(device: str, where: str, source: str) -> Presented:
    """The QEMU disk whose name inside the machine is `device`; DiskPlanError naming the forms QEMU can give."""
    if m := re.fullmatch(r"/dev/vd([a-z])", device):
        return Presented(device, "virtio", ord(m.group(1)) - ord("a"))
    if m := re.fullmatch(r"/dev/sd([a-z])", device):
        return Presented(device, "sata", ord(m.group(1)) - ord("a"))
    if m := re.fullmatch(r"/dev/nvme(\d+)n1", device):
        return Presented(device, "nvme", int(m.group(1)))
    if m := re.fullmatch(r"/dev/disk/by-diskseq/(\d+)", device):
        return Presented(device, "virtio", int(m.group(1)) - 1)
    if m := re.fullmatch(r"/dev/disk/by-path/(?:virtio-)?pci-0000:00:([0-9a-f]{2})\.0(-nvme-1)?", device):
        # udev's path_id: the PCI address of the disk's controller (a virtio-blk or NVMe device on the root bus).
        slot = int(m.group(1), 16)
        if slot not in _TAKEN_SLOTS and slot < 0x20:
            return Presented(device, "nvme" if m.group(2) else "virtio", slot=slot)
    if device.startswith(_BY_ID):
        name = device.removeprefix(_BY_ID)
        if m := re.fullmatch(r"virtio-([\w.-]{1,20})", name):
            return Presented(device, "virtio", serial=m.group(1))
        if m := re.fullmatch(r"ata-([\w.-]+?)(?:_([A-Za-z0-9.-]{1,20}))?", name):
            # udev joins the model and the serial with "_" (spaces too become "_"), the model alone when the serial
            # is empty: any split of the name gives it back.
            return Presented(device, "sata", serial=m.group(2) or "", model=m.group(1).replace("_", " "))
        if m := re.fullmatch(r"nvme-QEMU_NVMe_Ctrl_([\w.-]{1,20})", name):
            return Presented(device, "nvme", serial=m.group(1))
        if m := re.fullmatch(r"wwn-(0x[0-9a-f]{16})", name):
            return Presented(device, "scsi", wwn=m.group(1))
    raise DiskPlanError(
        f"{source}: {where} = {device!r} is a name no disk of the install VM can have: QEMU gives {FORMS}.",
        hint="Name the disk in one of those forms (on the real machine, `ls -l /dev/disk/by-id` shows its names).",
    )


# -- reading the tree ----------------------------------------------------------------------------------------------


def read(devices: dict[str, Any], source: str) -> Layout:
    """Every device of an evaluated `disko.devices` → a Layout; DiskPlanError for what disko itself would refuse."""
    layout = Layout(source)
    for kind in devices:
        if kind not in KNOWN_TOP and devices[kind]:
            raise DiskPlanError(f"{source}: disko.devices.{kind} is not a disko device type ({', '.join(KNOWN_TOP)}).")
    for name, spec in sorted((devices.get("disk") or {}).items()):
        where = f"disko.devices.disk.{name}"
        device = str(spec.get("device", ""))
        if not device:
            raise DiskPlanError(f"{source}: {where}.device is missing.")
        layout.disks[name] = present(device, f"{where}.device", source)
        _content(layout, spec.get("content"), f"{where}.content", f"disk {name}", name)
    for name, spec in sorted((devices.get("mdadm") or {}).items()):
        level = spec.get("level", 1)
        layout.types.add("mdadm")
        layout.layers.append(f"mdadm {name}: RAID level {level}")
        layout.arrays[name] = int(level)
        layout.checks.append(f"/dev/md/{name} is an active RAID{level} array")
        _content(layout, spec.get("content"), f"disko.devices.mdadm.{name}.content", f"/dev/md/{name}", name)
    for name, spec in sorted((devices.get("lvm_vg") or {}).items()):
        layout.types.add("lvm_vg")
        lvs = spec.get("lvs") or {}
        layout.layers.append(f"lvm_vg {name}: logical volumes {', '.join(sorted(lvs)) or '(none)'}")
        layout.checks.append(f"volume group {name} with {len(lvs)} logical volume(s)")
        for lv, lvspec in sorted(lvs.items()):
            lwhere = f"disko.devices.lvm_vg.{name}.lvs.{lv}"
            if lvspec.get("lvm_type") == "thinlv" and not is_absolute_size(lvspec.get("size")):
                raise DiskPlanError(
                    f"{source}: {lwhere}.size = {lvspec.get('size')!r}: a thin volume's size is its virtual size "
                    '(lvcreate -V), which takes no share of free space: give one, e.g. "10G".'
                )
            if "size" in lvspec:
                _size(lvspec["size"], f"{lwhere}.size", source, percent_ok=True)
            dm_name = f"{name.replace('-', '--')}-{lv.replace('-', '--')}"
            layout.lvs.append(dm_name)
            kind = lvspec.get("lvm_type")
            if kind:
                layout.layers.append(f"lv {name}/{lv}: {kind}")
                layout.lv_types[dm_name] = str(kind)
            _content(layout, lvspec.get("content"), f"{lwhere}.content", f"/dev/{name}/{lv}", lv)
    for name, spec in sorted((devices.get("zpool") or {}).items()):
        layout.types.add("zpool")
        layout.layers.append(f"zpool {name}" + (f" ({spec.get('mode')})" if isinstance(spec.get("mode"), str) else ""))
        layout.unchecked.append((f"zpool {name}", "ZFS is not in this machine's kernel (Debian ships it out of tree)"))
        for ds, dspec in sorted((spec.get("datasets") or {}).items()):
            mp = dspec.get("mountpoint")
            if mp and mp != "none":
                layout.mounts[str(mp)] = f"zfs {name}/{ds}"
                layout.unchecked.append((f"{mp} on zfs {name}/{ds}", "ZFS is not in this machine's kernel"))
        if spec.get("mountpoint"):
            layout.mounts[str(spec["mountpoint"])] = f"zfs {name}"
    for mp, spec in sorted((devices.get("nodev") or {}).items()):
        fs = spec.get("fsType", "tmpfs")
        mountpoint = str(spec.get("mountpoint") or mp)
        layout.types.add("nodev")
        layout.mounts[mountpoint] = f"{fs} (no device)"
        layout.fstypes[mountpoint] = str(fs)
        layout.checks.append(f"{mountpoint} is {fs}")
    for name, spec in sorted((devices.get("bcachefs_filesystems") or {}).items()):
        layout.types.add("bcachefs")
        mounts = [(str(spec["mountpoint"]), "")] if spec.get("mountpoint") else []
        mounts += [
            (str(v["mountpoint"]), f" subvolume {k}")
            for k, v in (spec.get("subvolumes") or {}).items()
            if v and v.get("mountpoint")
        ]
        for mp, sub in mounts:
            layout.mounts[mp] = f"bcachefs {name}{sub}"
        layout.unchecked.append((f"bcachefs {name}", "bcachefs is not in this machine's kernel (Linux 6.1)"))
    if "/" not in layout.mounts:
        layout.unchecked.append(("/", "nothing in this layout is mounted on /: a layout for data disks, not a host's"))
    return layout


def _size(value: Any, where: str, source: str, percent_ok: bool = False) -> None:
    text = str(value)
    if percent_ok and re.fullmatch(r"\d+%(FREE|VG)?", text):
        return
    if re.fullmatch(r"-?\d+(\.\d+)?[KMGT]?", text):  # disko's sgdisk sizes, a negative `end` included
        return
    parse_size(text.lstrip("+"), f"{source}: {where}")


def _content(layout: Layout, content: Any, where: str, on: str, name: str) -> None:
    """One content node (recursively): what it makes and how the booted system shows it."""
    source = layout.source
    if content is None:
        layout.unchecked.append((f"{on} (no content)", "left unformatted: nothing to look at once booted"))
        return
    ctype = content.get("type")
    layout.types.add(str(ctype))
    if ctype == "gpt":
        _gpt(layout, content, where, on, name)
    elif ctype == "table":
        fmt = content.get("format", "gpt")
        if fmt == "msdos":
            layout.bios_boot.append(f"{on} (after its MBR)")  # where GRUB embeds itself on an msdos disk
        for index, part in enumerate(content.get("partitions") or [], start=1):
            pwhere = f"{where}.partitions[{index - 1}]"
            for key in ("start", "end"):
                if key in part:
                    _size(part[key], f"{pwhere}.{key}", source, percent_ok=True)
            label = str(part.get("name") or f"{on} #{index}")
            if fmt == "gpt" and part.get("name"):
                layout.partlabels.append(label)  # parted's mkpart NAME: the partition's GPT name
            layout.checks.append(f"{fmt} partition {index} of {on} ({part.get('part-type', 'primary')})")
            _content(layout, part.get("content"), f"{pwhere}.content", f"{on} partition {index}", label)
    elif ctype == "filesystem":
        fmt = content.get("format")
        if not fmt:
            raise DiskPlanError(f"{source}: {where}.format is missing.")
        mp = content.get("mountpoint")
        if mp:
            layout.mounts[str(mp)] = f"{fmt} on {on}"
            layout.fstypes[str(mp)] = str(fmt)
            layout.checks.append(f"{mp} is {fmt} on {on}")
        else:
            layout.checks.append(f"{on} holds {fmt}")
    elif ctype == "swap":
        layout.swaps.append(on)
        if content.get("randomEncryption"):
            layout.checks.append(f"swap on {on} (random encryption: a dm-crypt device) is active")
        else:
            layout.checks.append(f"swap on {on} is active")
    elif ctype == "luks":
        cname = str(content.get("name") or name)
        layout.layers.append(f"luks {cname} on {on}")
        layout.luks.append(cname)
        layout.checks.append(f"/dev/mapper/{cname} is an open LUKS device on {on}")
        settings = content.get("settings") or {}
        if not (content.get("passwordFile") or settings.get("keyFile") or content.get("keyFile")):
            layout.unchecked.append(
                (f"luks {cname}: its passphrase", "asked at boot (askPassword): no key file to open it unattended")
            )
        _content(layout, content.get("content"), f"{where}.content", f"/dev/mapper/{cname}", cname)
    elif ctype == "lvm_pv":
        vg = content.get("vg")
        if not vg:
            raise DiskPlanError(f"{source}: {where}.vg is missing (the volume group this PV joins).")
        layout.layers.append(f"lvm_pv of {vg} on {on}")
        layout.checks.append(f"{on} is a physical volume of {vg}")
    elif ctype == "mdraid":
        layout.layers.append(f"mdraid member of {content.get('name')} on {on}")
    elif ctype == "btrfs":
        _btrfs(layout, content, where, on)
    elif ctype == "zfs":
        layout.layers.append(f"zfs member of pool {content.get('pool')} on {on}")
        layout.unchecked.append((f"zfs member {on}", "ZFS is not in this machine's kernel"))
    elif ctype in ("bcachefs",):
        layout.layers.append(f"bcachefs member of {content.get('filesystem')} on {on}")
        layout.unchecked.append((f"bcachefs member {on}", "bcachefs is not in this machine's kernel (Linux 6.1)"))
    else:
        raise DiskPlanError(
            f"{source}: {where}.type = {ctype!r} is not a disko content type (gpt, table, filesystem, swap, luks, "
            "lvm_pv, mdraid, btrfs, zfs, bcachefs)."
        )


def _gpt(layout: Layout, content: dict[str, Any], where: str, on: str, name: str) -> None:
    source = layout.source
    parts = content.get("partitions") or {}
    rest = 0
    for pname, part in sorted(parts.items()):
        pwhere = f"{where}.partitions.{pname}"
        for key in ("size", "start", "end"):
            if key in part:
                _size(part[key], f"{pwhere}.{key}", source, percent_ok=key == "size")
        if part.get("size") == "100%" or ("size" not in part and "end" not in part):
            rest += 1  # disko's default: the largest free block
        label = str(part.get("label") or f"{'disk' if on.startswith('disk ') else 'mdadm'}-{name}-{pname}")
        layout.partlabels.append(label)
        if str(part.get("type", "")).upper() == "EF02":
            layout.bios_boot.append(label)
        extras = []
        if part.get("attributes"):
            extras.append(f"GPT attributes {part['attributes']}")
        if part.get("hybrid"):
            extras.append("also in the hybrid MBR")
            layout.unchecked.append(
                (f"{label} in the hybrid MBR", "the MBR's copy of a GPT partition is not visible from Linux")
            )
        default_type = "8200" if (part.get("content") or {}).get("type") == "swap" else "8300"
        layout.checks.append(
            f"partition {label} ({part.get('type', default_type)}"
            + (f", {part['size']}" if "size" in part and part["size"] != "100%" else "")
            + ")"
            + (f" with {', '.join(extras)}" if extras else "")
        )
        _content(layout, part.get("content"), f"{pwhere}.content", f"partition {label}", pname)
    if rest > 1:
        raise DiskPlanError(
            f'{source}: {where}.partitions: only one partition can take the rest of the disk ("100%" or no size); '
            f"{rest} do."
        )


def _btrfs(layout: Layout, content: dict[str, Any], where: str, on: str) -> None:
    subvolumes = content.get("subvolumes") or {}
    layout.layers.append(f"btrfs on {on}" + (f": subvolumes {', '.join(sorted(subvolumes))}" if subvolumes else ""))
    if content.get("mountpoint"):
        layout.mounts[str(content["mountpoint"])] = f"btrfs on {on}"
        layout.fstypes[str(content["mountpoint"])] = "btrfs"
        layout.subvolumes[str(content["mountpoint"])] = "/"
        layout.checks.append(f"{content['mountpoint']} is btrfs on {on}")
    for sub, spec in sorted(subvolumes.items()):
        spec = spec or {}
        if spec.get("mountpoint"):
            layout.mounts[str(spec["mountpoint"])] = f"btrfs subvolume {sub} on {on}"
            layout.fstypes[str(spec["mountpoint"])] = "btrfs"
            layout.subvolumes[str(spec["mountpoint"])] = "/" + str(sub).strip("/")
            layout.checks.append(f"{spec['mountpoint']} is btrfs subvolume {sub} on {on}")
        else:
            layout.checks.append(f"btrfs subvolume {sub} exists on {on}")
        for swap in sorted(spec.get("swap") or {}):
            layout.swaps.append(f"{sub}/{swap}")
            layout.checks.append(f"swap file {swap} in subvolume {sub} is active")
    for swap in sorted(content.get("swap") or {}):
        layout.swaps.append(f"{on}/{swap}")
        layout.checks.append(f"swap file {swap} on {on} is active")


# -- the demo installer ---------------------------------------------------------------------------------------------

DEMO_TYPES = {"gpt", "table", "filesystem", "swap", "lvm_pv", "lvm_vg", "mdraid", "mdadm", "btrfs", "luks", "nodev"}
DEMO_FORMATS = {"vfat", "ext4", "btrfs", "xfs", "f2fs", "tmpfs"}
# disko's lvm_type values the demo makes, with Debian's lvm2 and the kernel's dm-thin-pool, dm-mirror and dm-raid
# (whose RAID levels 0, 1, 4, 5 and 6 come from the md personalities raid0, raid1 and raid456 it loads).
DEMO_LV_TYPES = {"thin-pool", "thinlv", "mirror", "raid0", "raid1", "raid4", "raid5", "raid6"}


def demo_refusal(layout: Layout, devices: dict[str, Any], firmware: str = "uefi") -> str | None:
    """Why the demo's installer cannot make this layout (None: it can).  It makes gpt and legacy table disks of vfat,
    ext4, btrfs (subvolumes, swap files), xfs and f2fs file systems, swap, tmpfs (a tmpfs root too, with /nix on a
    disk), LUKS, LVM (linear, thin and RAID volumes) and md RAID, with Debian's tools, and boots them as the machine's
    `firmware` does: systemd-boot from a vfat /boot (UEFI), GRUB from the disks' BIOS boot partitions or MBR gap
    (BIOS).  The cim installer (disko) makes every layout here."""
    missing = sorted(layout.types - DEMO_TYPES)
    disko = "the cim installer, disko, installs this layout"
    made = (
        "it makes gpt and msdos disks of vfat, ext4, btrfs, xfs and f2fs file systems, swap, tmpfs, LUKS, LVM and "
        "md RAID"
    )
    if "/" not in layout.mounts:
        return 'nothing in it is mounted on "/": a host installed from it would have no root file system'
    if missing:
        return f"it uses {', '.join(missing)}, which the demo installer does not make ({made}); {disko}"
    other = sorted(set(layout.fstypes.values()) - DEMO_FORMATS)
    if other:
        return f"it formats {', '.join(other)}; the demo installer makes {', '.join(sorted(DEMO_FORMATS))}; {disko}"
    if layout.mounts["/"].endswith("(no device)") and "/nix" not in layout.fstypes:
        return (
            f"its root is {layout.mounts['/']} (disko's nodev) and no /nix on a disk holds the system (a root that "
            f"starts empty at every boot needs one, as NixOS's does); {disko}"
        )
    if firmware == "uefi" and layout.fstypes.get("/boot") != "vfat":
        return (
            "it has no vfat file system on /boot (an ESP), which systemd-boot needs on this UEFI machine (a BIOS "
            'boot partition is GRUB\'s: give the host hardware.firmware "bios" in domain.json for a BIOS machine)'
        )
    if firmware == "bios" and not layout.bios_boot:
        return (
            "it has no BIOS boot partition (type EF02) nor an msdos table for GRUB on this BIOS machine (an ESP is "
            'UEFI\'s: give the host hardware.firmware "uefi" in domain.json)'
        )
    for vg in (devices.get("lvm_vg") or {}).values():
        for lv, spec in (vg.get("lvs") or {}).items():
            if spec.get("lvm_type") and spec["lvm_type"] not in DEMO_LV_TYPES:
                return (
                    f"its logical volume {lv} is lvm_type {spec['lvm_type']}; the demo makes linear, "
                    f"{', '.join(sorted(DEMO_LV_TYPES))} volumes; {disko}"
                )
    return None


def layout_of(disk_config: Path) -> tuple[Layout, dict[str, Any]]:
    devices = evaluate_devices(disk_config)
    return read(devices, str(disk_config)), devices
