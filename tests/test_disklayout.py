"""disko's types as a layout to check once installed (pipeline.disklayout), the names QEMU can give a disk, and
`cim disk-plan` on configs that use them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cimtest.demo import DoitRunner, needs_demo

from pipeline.disklayout import demo_refusal, present, read
from pipeline.diskplan import DiskPlanError
from pipeline.install import InstallError, check_layout

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "configs" / "demo"
# nix-community/disko's example/*.nix, kept beside the steering notes (data fetched from GitHub is not committed here).
EXAMPLES = ROOT.parent / "shared" / "data" / "disko-examples"

ESP = {"size": "500M", "type": "EF00", "content": {"type": "filesystem", "format": "vfat", "mountpoint": "/boot"}}


def luks_lvm(device: str = "/dev/vda") -> dict:
    return {
        "disk": {
            "main": {
                "type": "disk",
                "device": device,
                "content": {
                    "type": "gpt",
                    "partitions": {
                        "ESP": ESP,
                        "luks": {
                            "size": "100%",
                            "content": {
                                "type": "luks",
                                "name": "crypted",
                                "settings": {"keyFile": "/tmp/secret.key"},
                                "content": {"type": "lvm_pv", "vg": "pool"},
                            },
                        },
                    },
                },
            }
        },
        "lvm_vg": {
            "pool": {
                "type": "lvm_vg",
                "lvs": {
                    "root": {
                        "size": "100%FREE",
                        "content": {"type": "filesystem", "format": "ext4", "mountpoint": "/"},
                    },
                    "swap": {"size": "64M", "content": {"type": "swap"}},
                },
            }
        },
    }


def test_luks_on_lvm_is_read_as_layers_and_checks() -> None:
    layout = read(luks_lvm(), "dc.nix")
    assert "luks crypted on partition disk-main-luks" in layout.layers
    assert "lvm_pv of pool on /dev/mapper/crypted" in layout.layers
    assert layout.mounts["/"] == "ext4 on /dev/pool/root"
    assert "swap on /dev/pool/swap is active" in layout.checks
    assert "/dev/mapper/crypted is an open LUKS device on partition disk-main-luks" in layout.checks
    assert layout.luks == ["crypted"] and layout.lvs == ["pool-root", "pool-swap"]
    assert demo_refusal(layout, luks_lvm()) is None  # the demo installer makes LUKS on LVM with Debian's tools


def test_raid_btrfs_tmpfs_and_what_cannot_be_checked() -> None:
    devices = {
        "disk": {
            name: {
                "type": "disk",
                "device": f"/dev/vd{letter}",
                "content": {
                    "type": "gpt",
                    "partitions": {"r": {"size": "100%", "content": {"type": "mdraid", "name": "md0"}}},
                },
            }
            for name, letter in (("a", "a"), ("b", "b"))
        },
        "mdadm": {
            "md0": {
                "type": "mdadm",
                "level": 1,
                "content": {
                    "type": "btrfs",
                    "subvolumes": {"/root": {"mountpoint": "/"}, "/nix": {"mountpoint": "/nix"}, "/snap": {}},
                },
            }
        },
        "nodev": {"/tmp": {"fsType": "tmpfs", "mountOptions": ["size=200M"]}},
        "zpool": {"tank": {"type": "zpool", "datasets": {"data": {"type": "zfs_fs", "mountpoint": "/data"}}}},
    }
    layout = read(devices, "dc.nix")
    assert "/dev/md/md0 is an active RAID1 array" in layout.checks
    assert layout.mounts["/"] == "btrfs subvolume /root on /dev/md/md0"
    assert "btrfs subvolume /snap exists on /dev/md/md0" in layout.checks
    assert "/tmp is tmpfs" in layout.checks
    assert any(what == "zpool tank" and "ZFS" in why for what, why in layout.unchecked)
    assert [p.index for p in layout.disks.values()] == [0, 1]


def test_partitions_without_size_with_start_end_attributes_and_hybrid_are_read() -> None:
    devices = {
        "disk": {
            "main": {
                "type": "disk",
                "device": "/dev/vda",
                "content": {
                    "type": "gpt",
                    "partitions": {
                        "ESP": {**ESP, "size": None, "start": "1M", "end": "128M"} | {"attributes": [0]},
                        "boot": {"size": "1M", "type": "EF02", "hybrid": {"mbrPartitionType": "0x0c"}},
                        "root": {"end": "-1G", "content": {"type": "filesystem", "format": "ext4", "mountpoint": "/"}},
                        "swap": {"content": {"type": "swap"}},
                    },
                },
            }
        }
    }
    del devices["disk"]["main"]["content"]["partitions"]["ESP"]["size"]
    layout = read(devices, "dc.nix")
    assert any("GPT attributes [0]" in c for c in layout.checks)
    assert any("hybrid MBR" in what for what, _ in layout.unchecked)
    # Two partitions that both take the rest of the disk cannot be laid out.
    devices["disk"]["main"]["content"]["partitions"]["other"] = {"content": {"type": "swap"}}
    with pytest.raises(DiskPlanError, match="only one partition can take the rest"):
        read(devices, "dc.nix")


@pytest.mark.parametrize(
    ("device", "bus", "serial", "model", "wwn"),
    [
        ("/dev/disk/by-id/virtio-root-disk", "virtio", "root-disk", "", ""),
        ("/dev/disk/by-id/ata-Samsung_SSD_850_EVO_250GB_S21PNXAGB12345", "sata", "S21PNXAGB12345",
         "Samsung SSD 850 EVO 250GB", ""),
        ("/dev/disk/by-id/ata-disk0", "sata", "", "disk0", ""),
        ("/dev/disk/by-id/nvme-QEMU_NVMe_Ctrl_nvme0", "nvme", "nvme0", "", ""),
        ("/dev/disk/by-id/wwn-0x5000c500a1b2c3d4", "scsi", "", "", "0x5000c500a1b2c3d4"),
        ("/dev/sdb", "sata", "", "", ""),
    ],
)  # fmt: skip
def test_stable_names_are_presented_as_qemu_gives_them(
    device: str, bus: str, serial: str, model: str, wwn: str
) -> None:
    presented = present(device, "disko.devices.disk.main.device", "dc.nix")
    assert (presented.bus, presented.serial, presented.model, presented.wwn) == (bus, serial, model, wwn)


def test_by_path_names_on_the_root_pci_bus_are_given_a_slot() -> None:
    for device, bus in [
        ("/dev/disk/by-path/pci-0000:00:05.0", "virtio"),
        ("/dev/disk/by-path/virtio-pci-0000:00:1f.0", "virtio"),
        ("/dev/disk/by-path/pci-0000:00:0a.0-nvme-1", "nvme"),
    ]:
        shown = present(device, "disko.devices.disk.main.device", "dc.nix")
        assert shown.bus == bus and shown.slot == int(device.split(":")[-1][:2], 16)
    for taken in ["/dev/disk/by-path/pci-0000:00:02.0", "/dev/disk/by-path/pci-0000:02:00.0-nvme-1"]:
        with pytest.raises(DiskPlanError, match=r"pci-0000:00:SS\.0-nvme-1"):
            present(taken, "disko.devices.disk.main.device", "dc.nix")


def test_a_name_qemu_cannot_give_is_one_paragraph_naming_the_forms() -> None:
    with pytest.raises(DiskPlanError) as caught:
        present("/dev/disk/by-id/some-disk-id", "disko.devices.disk.main.device", "dc.nix")
    text = caught.value.report()
    assert "dc.nix: disko.devices.disk.main.device = '/dev/disk/by-id/some-disk-id'" in text
    assert "/dev/disk/by-id/virtio-SERIAL" in text and "\n" not in text


def test_cim_disk_plan_shows_the_layout_and_the_demo_installers_refusal(tmp_path: Path) -> None:
    domain = tmp_path / "demo"
    shutil.copytree(DEMO, domain, ignore=shutil.ignore_patterns("result*"))
    (domain / "disk-config.nix").write_text("{ disko.devices = builtins.fromJSON (builtins.readFile ./layout.json); }")
    (domain / "layout.json").write_text(json.dumps(luks_lvm()))
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "disk-plan", "vhost-dev", "--domain", str(domain)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "layer: luks crypted on partition disk-main-luks" in proc.stdout
    assert "the demo installer: 1 blank 1024 MiB disk(s), as shown above" in proc.stdout


@pytest.mark.skipif(not EXAMPLES.is_dir(), reason=f"disko's examples are not in {EXAMPLES}")
def test_disko_examples_plan_or_are_refused_in_one_paragraph() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "disko_examples.py"), str(EXAMPLES)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    planned = int(last.split(" planned")[0].split(": ")[1])
    assert planned >= 30 and "0 crashed" in last, proc.stdout


def test_demo_refuses_what_debians_tools_do_not_make_and_a_layout_without_an_esp() -> None:
    no_esp = luks_lvm()
    del no_esp["disk"]["main"]["content"]["partitions"]["ESP"]
    refusal = demo_refusal(read(no_esp, "dc.nix"), no_esp) or ""
    assert "no vfat file system on /boot" in refusal and 'hardware.firmware "bios"' in refusal
    refusal = demo_refusal(read(no_esp, "dc.nix"), no_esp, "bios") or ""
    assert "no BIOS boot partition (type EF02) nor an msdos table for GRUB" in refusal
    no_esp["disk"]["main"]["content"]["partitions"]["bios"] = {"size": "1M", "type": "EF02"}
    assert demo_refusal(read(no_esp, "dc.nix"), no_esp, "bios") is None
    thin = luks_lvm()
    thin["lvm_vg"]["pool"]["lvs"]["pool"] = {"size": "200M", "lvm_type": "thin-pool"}
    thin["lvm_vg"]["pool"]["lvs"]["root"].update(lvm_type="thinlv", pool="pool", size="1G")
    assert demo_refusal(read(thin, "dc.nix"), thin) is None  # thin pools: lvm2 and dm-thin-pool
    thin["lvm_vg"]["pool"]["lvs"]["root"]["lvm_type"] = "raid10"
    assert "lvm_type raid10; the demo makes linear, mirror" in (demo_refusal(read(thin, "dc.nix"), thin) or "")
    zfs = luks_lvm()
    zfs["zpool"] = {"tank": {"type": "zpool", "datasets": {}}}
    assert "it uses zpool" in (demo_refusal(read(zfs, "dc.nix"), zfs) or "")


def test_demo_makes_tmpfs_and_legacy_tables_but_not_a_tmpfs_root_without_nix_on_disk() -> None:
    tmp = luks_lvm()
    tmp["nodev"] = {"/tmp": {"fsType": "tmpfs", "mountOptions": ["size=200M"]}}
    layout = read(tmp, "dc.nix")
    assert layout.fstypes["/tmp"] == "tmpfs" and demo_refusal(layout, tmp) is None
    tmp["nodev"] = {"/": {"fsType": "tmpfs"}}
    del tmp["lvm_vg"]["pool"]["lvs"]["root"]["content"]["mountpoint"]
    assert "its root is tmpfs (no device) (disko's nodev) and no /nix" in (demo_refusal(read(tmp, "dc.nix"), tmp) or "")
    tmp["lvm_vg"]["pool"]["lvs"]["root"]["content"]["mountpoint"] = "/nix"  # impermanence: the system on disk
    assert demo_refusal(read(tmp, "dc.nix"), tmp) is None
    mbr = {
        "disk": {
            "main": {
                "device": "/dev/vda",
                "content": {
                    "type": "table",
                    "format": "msdos",
                    "partitions": [
                        {"start": "1M", "end": "100%", "bootable": True,
                         "content": {"type": "filesystem", "format": "xfs", "mountpoint": "/"}},
                    ],
                },
            }
        }
    }  # fmt: skip
    layout = read(mbr, "dc.nix")
    assert layout.fstypes == {"/": "xfs"} and layout.partlabels == []
    assert demo_refusal(layout, mbr, "bios") is None  # GRUB embeds itself after the MBR
    assert "no vfat file system on /boot" in (demo_refusal(layout, mbr) or "")


def test_installed_layout_is_checked_from_its_report() -> None:
    layout = read(luks_lvm(), "dc.nix")
    console = "\n".join(
        [
            "cim-fs: / /dev/mapper/pool-root ext4 900000K",
            "cim-fs: /boot /dev/vda1 vfat 500000K",
            "cim-part: /dev/vda1 disk-main-ESP 500MiB",
            "cim-part: /dev/vda2 disk-main-luks 523MiB",
            "cim-swap: /dev/dm-2 65536K",
            "cim-layer: dm crypted luks",
            "cim-layer: dm pool-root lvm",
            "cim-layer: dm pool-swap lvm",
        ]
    )
    checks = check_layout(layout, console)
    assert "/dev/mapper/crypted: an open LUKS device" in checks
    assert "LVM logical volume pool-root is active" in checks
    assert "/ on /dev/mapper/pool-root: ext4" in checks
    with pytest.raises(InstallError, match="pool-swap is not active"):
        check_layout(layout, console.replace("cim-layer: dm pool-swap lvm", ""))
    with pytest.raises(InstallError, match="/ is btrfs on /dev/vda2, declared ext4"):
        check_layout(layout, console.replace("/ /dev/mapper/pool-root ext4", "/ /dev/vda2 btrfs"))


def test_a_layered_layout_that_does_not_fit_the_disk_is_refused_before_any_vm() -> None:
    from pipeline.install import _check_fits

    devices = luks_lvm()
    devices["disk"]["main"]["content"]["partitions"]["ESP"] = {**ESP, "size": "2G"}  # not the shared ESP
    with pytest.raises(DiskPlanError, match=r"disko.devices.disk.main.content.partitions need 2050 MiB"):
        _check_fits(devices, 1024, "dc.nix")
    _check_fits(luks_lvm(), 1024, "dc.nix")


THIN_AND_MBR = """{ disko.devices = {
  disk.main = { device = "/dev/disk/by-id/virtio-os"; content = { type = "table"; format = "msdos"; partitions = [
    { start = "1M"; end = "500M"; bootable = true;
      content = { type = "filesystem"; format = "vfat"; mountpoint = "/boot"; }; }
    { start = "500M"; end = "100%"; content = { type = "lvm_pv"; vg = "vg"; }; }
  ]; }; };
  lvm_vg.vg = { type = "lvm_vg"; lvs = {
    data = { size = "300M"; lvm_type = "thinlv"; pool = "pool"; content = { type = "filesystem"; format = "f2fs";
      mountpoint = "/srv"; }; };
    root = { size = "300M"; content = { type = "filesystem"; format = "xfs"; mountpoint = "/"; }; };
    pool = { size = "100M"; lvm_type = "thin-pool"; };
  }; };
  nodev."/tmp" = { fsType = "tmpfs"; mountOptions = [ "size=64M" ]; };
}; }
"""


@pytest.mark.nix
def test_layout_script_makes_legacy_tables_thin_pools_xfs_f2fs_and_tmpfs(tmp_path: Path) -> None:
    """lib/disklayout.nix: an msdos table partitioned by number (disko's deviceNumbering), GRUB's place after the
    MBR, thin pools before other volumes (disko's priorities), the dm and file-system modules stage 1 needs, tmpfs."""
    path = tmp_path / "disk-config.nix"
    path.write_text(THIN_AND_MBR)
    expr = f'(import {DEMO}/lib/disklayout.nix {{ diskConfig = import {path}; firmware = "bios"; }}).script'
    script = subprocess.run(
        ["nix", "--extra-experimental-features", "nix-command", "eval", "--impure", "--raw", "--expr", expr],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    lines = script.splitlines()
    assert "label: dos" in lines
    assert "start=1MiB, size=499MiB, type=ef, bootable" in lines and "start=500MiB, type=8e" in lines
    assert "partdev '/dev/disk/by-id/virtio-os-part2'" in lines and "biosboot '/dev/disk/by-id/virtio-os'" in lines
    lvs = [line for line in lines if line.startswith("lv ")]
    assert lvs == [
        "lv 'vg' 'pool' -L 100m 'thin-pool' -",
        "lv 'vg' 'data' -V 300m thinlv 'pool'",  # virtual size: more than the pool holds
        "lv 'vg' 'root' -L 300m - -",
    ]
    assert lines.count("module dm_thin_pool") == 2 and "module xfs" in lines and "module f2fs" in lines
    assert "mountfs 'none' '/tmp' 'tmpfs' 'size=64M' -" in lines


@pytest.mark.nix
@pytest.mark.vm
@needs_demo
def test_install_thin_lvm_xfs_f2fs_and_tmpfs_on_an_msdos_disk_on_a_bios_machine(
    demo_domain: Path, artifacts_dir: Path, doit: DoitRunner
) -> None:
    # The same layout, installed: GRUB in the gap after the MBR reads /boot (vfat), stage 1 loads what the layout
    # needs (cim.modules) and mounts the xfs / on LVM, stage 2 the f2fs thin volume and the tmpfs from fstab.
    (demo_domain / "disk-config.nix").write_text(THIN_AND_MBR)
    domain = json.loads((demo_domain / "domain.json").read_text())
    domain["hosts"]["vhost-dev"]["hardware"]["firmware"] = "bios"
    (demo_domain / "domain.json").write_text(json.dumps(domain))
    proc = doit(demo_domain, "install:vhost-dev", check=True)
    for check in [
        "check: / on /dev/vg/root: xfs",
        "check: /srv on /dev/vg/data: f2fs",
        "check: /tmp on none: tmpfs",
        "check: /boot on /dev/disk/by-id/virtio-os-part1: vfat",  # as fstab names it: disko numbers it so
        "check: LVM thin pool vg-pool is active (vg-pool-tpool)",
        "check: LVM logical volume vg-data is active",
    ]:
        assert check in proc.stdout, proc.stdout
    log = (artifacts_dir / "vhost-dev-iso" / "install.log").read_text(errors="replace")
    assert "cim-install: installing GRUB (BIOS) on /dev/disk/by-id/virtio-os" in log
    assert "cim.modules=dm_thin_pool,crc32_generic,f2fs,xfs" in log  # all the layout needs, as disko lists them


TMPFS_ROOT = """{ disko.devices = {
  disk.main = { device = "/dev/vda"; content = { type = "gpt"; partitions = {
    ESP = { size = "300M"; type = "EF00"; content = { type = "filesystem"; format = "vfat"; mountpoint = "/boot"; }; };
    nix = { size = "100%"; content = { type = "filesystem"; format = "ext4"; mountpoint = "/nix"; }; };
  }; }; };
  nodev."/" = { fsType = "tmpfs"; mountOptions = [ "size=512M" "mode=755" ]; };
}; }
"""


@pytest.mark.nix
@pytest.mark.vm
@needs_demo
def test_install_a_tmpfs_root_with_the_system_in_nix_on_disk(
    demo_domain: Path, artifacts_dir: Path, doit: DoitRunner
) -> None:
    # NixOS's impermanence: / is a fresh tmpfs at every boot; stage 1 mounts /nix from its disk (cim.nix), lays the
    # generation out on the tmpfs and takes the fstab the installer kept in /nix.
    (demo_domain / "disk-config.nix").write_text(TMPFS_ROOT)
    proc = doit(demo_domain, "install:vhost-dev", check=True)
    for check in ["check: / on tmpfs: tmpfs", "check: /nix on /dev/vda2: ext4", "check: /boot on /dev/vda1: vfat"]:
        assert check in proc.stdout, proc.stdout
    log = (artifacts_dir / "vhost-dev-iso" / "install.log").read_text(errors="replace")
    assert "root=tmpfs rootfstype=tmpfs rootflags=size=512M,mode=755 cim.nix=PARTLABEL=disk-main-nix" in log
    assert "cim stage 1: /nix mounted (/dev/vda2, ext4) under a tmpfs root" in log
