"""Install verification: the plan from disk-config.nix (unit), and the real installer ISO → disk → disk-only boot."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from cimtest.demo import DoitRunner, executed, needs_demo

from pipeline.diskplan import DiskPlanError, evaluate, parse_size, plan_from_devices
from pipeline.install import InstallError, check_installed


def devices(partitions: dict, content_type: str = "gpt", **extra: dict) -> dict:
    return {
        "disk": {
            "main": {"type": "disk", "device": "/dev/vda", "content": {"type": content_type, "partitions": partitions}}
        },
        **extra,
    }


ESP = {"size": "64M", "type": "EF00", "content": {"type": "filesystem", "format": "vfat", "mountpoint": "/boot"}}
SWAP = {"size": "32M", "content": {"type": "swap"}}
ROOT = {"size": "100%", "content": {"type": "filesystem", "format": "ext4", "mountpoint": "/"}}


# -- the plan (pure) ----------------------------------------------------------------------------------------------


def test_plan_orders_partitions_as_disko_does() -> None:
    # Nix hands attrsets over alphabetically (ESP, root, swap); disko puts the ESP first and "100%" last.
    plan = plan_from_devices(devices({"ESP": ESP, "root": ROOT, "swap": SWAP}), "main", 1024, "dc.nix")
    assert [(p.number, p.label, p.format) for p in plan.partitions] == [
        (1, "disk-main-ESP", "vfat"),
        (2, "disk-main-swap", "swap"),
        (3, "disk-main-root", "ext4"),
    ]
    assert plan.partition_mib(plan.partitions[2]) == 1024 - 1 - 64 - 32 - 1
    script = plan.sfdisk_script()
    assert script.startswith("label: gpt\n")
    assert 'size=64MiB, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name="disk-main-ESP"' in script
    assert "fs 3 ext4 / disk-main-root" in plan.installer_text()


def test_sizes() -> None:
    assert parse_size("512M", "x") == 512
    assert parse_size("16G", "x") == 16384
    assert parse_size("100%", "x") is None
    with pytest.raises(DiskPlanError, match=r"x = 'lots'"):
        parse_size("lots", "x")


@pytest.mark.parametrize(
    ("devs", "attribute"),
    [
        (
            devices({"root": {"size": "100%", "content": {"type": "btrfs"}}}),
            "disko.devices.disk.main.content.partitions.root.content.type",
        ),
        (
            devices({"root": {"size": "100%", "content": {"type": "filesystem", "format": "xfs", "mountpoint": "/"}}}),
            "disko.devices.disk.main.content.partitions.root.content.format",
        ),
        (devices({"root": ROOT}, content_type="table"), "disko.devices.disk.main.content.type"),
        (devices({"root": ROOT}, zpool={"tank": {"type": "zpool"}}), "disko.devices.zpool"),
        (
            devices({"ESP": {**ESP, "size": "900M"}, "root": ROOT, "swap": {**SWAP, "size": "200M"}}),
            "disko.devices.disk.main.content.partitions need",
        ),
        (devices({"ESP": ESP, "swap": SWAP}), 'mounted on "/"'),
    ],
)
def test_plan_refuses_what_cannot_be_installed(devs: dict, attribute: str) -> None:
    with pytest.raises(DiskPlanError) as err:
        plan_from_devices(devs, "main", 1024, "disk-config.nix")
    assert attribute in str(err.value)
    assert str(err.value).startswith("disk-config.nix: ")


def test_check_installed_compares_console_with_plan() -> None:
    plan = plan_from_devices(devices({"ESP": ESP, "root": ROOT, "swap": SWAP}), "main", 1024, "dc.nix")
    console = (
        "cim-fs: / /dev/vda3 ext4 914620K\ncim-fs: /boot /dev/vda1 vfat 64496K\n"
        "cim-part: /dev/vda1 disk-main-ESP 64MiB\ncim-part: /dev/vda2 disk-main-swap 32MiB\n"
        "cim-part: /dev/vda3 disk-main-root 926MiB\ncim-swap: /dev/vda2 32764K\n"
    )
    assert len(check_installed(plan, console)) == 3
    with pytest.raises(InstallError, match=r"/boot is /dev/vda3 \(ext4\), declared /dev/vda1 \(vfat\)"):
        check_installed(plan, console.replace("cim-fs: /boot /dev/vda1 vfat", "cim-fs: /boot /dev/vda3 ext4"))
    with pytest.raises(InstallError, match="swap /dev/vda2 is not active"):
        check_installed(plan, console.replace("cim-swap: /dev/vda2 32764K\n", ""))


def test_check_installed_names_partitions_from_the_planned_device() -> None:
    # An NVMe disk's partitions are nvme0n1p1…: the checks take the device from the disk-config.
    devs = devices({"ESP": ESP, "root": ROOT, "swap": SWAP})
    devs["disk"]["main"]["device"] = "/dev/nvme0n1"
    plan = plan_from_devices(devs, "main", 1024, "dc.nix")
    console = (
        "cim-fs: / /dev/nvme0n1p3 ext4 914620K\ncim-fs: /boot /dev/nvme0n1p1 vfat 64496K\n"
        "cim-part: /dev/nvme0n1p1 disk-main-ESP 64MiB\ncim-part: /dev/nvme0n1p2 disk-main-swap 32MiB\n"
        "cim-part: /dev/nvme0n1p3 disk-main-root 926MiB\ncim-swap: /dev/nvme0n1p2 32764K\n"
    )
    assert check_installed(plan, console)[-1] == "/ on /dev/nvme0n1p3 disk-main-root 926 MiB ext4"
    with pytest.raises(InstallError, match="partition /dev/nvme0n1p1 \\(disk-main-ESP\\) is missing"):
        check_installed(plan, console.replace("nvme0n1", "vda").replace("vdap", "vda"))


@pytest.mark.nix
@needs_demo
def test_demo_disk_config_evaluates_with_nix() -> None:
    plan = evaluate(Path(__file__).parent.parent / "configs/demo/disk-config.nix", "main", 1024)
    assert [p.mountpoint for p in plan.partitions] == ["/boot", None, "/"]


# -- the real thing -----------------------------------------------------------------------------------------------


def set_disk_config(domain: Path, old: str, new: str) -> None:
    path = domain / "disk-config.nix"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


@pytest.mark.nix
@pytest.mark.vm
@needs_demo
def test_install_then_resize_reruns_only_install(demo_domain: Path, artifacts_dir: Path, doit: DoitRunner) -> None:
    first = doit(demo_domain, "install:vhost-dev", check=True)
    log = (artifacts_dir / "vhost-dev-iso" / "install.log").read_text()
    # Requested with the credential (no boot prompt), started and done per the contract, then powered off.
    assert re.search(r"^cim-install: started vhost-dev onto /dev/vda", log, re.M)
    assert "cim-install: partitioned /dev/vda (GPT)" in log
    assert re.search(r"^cim-install: done vhost-dev: .*powering off", log, re.M)
    assert "reboot: Power down" in log
    assert not re.search(r"^boot:", log.split("=== phase disk-boot")[0], re.M)  # isolinux showed no prompt
    assert "=== phase disk-boot" in log
    assert re.search(r"^cim-fs: / /dev/vda3 ext4", log, re.M)
    assert "cim-part: /dev/vda1 disk-main-ESP 256MiB" in log
    record = json.loads((artifacts_dir / "manifest.json").read_text())["artifacts"]["vhost-dev-iso"]["install"]
    assert record["result"] == "pass" and record["seconds"] > 0
    assert set(record["phases"]) == {"installer", "disk-boot"}
    assert "install:vhost-dev" in executed(first.stdout)

    # A bigger ESP: the plan is built into the ISO, so the ISO is rebuilt (the system closure is not: its drv is the
    # same) and the install re-runs; the disk shows the new size.
    set_disk_config(demo_domain, 'size = "256M";', 'size = "288M";')
    second = doit(demo_domain, "install:vhost-dev", check=True)
    ran = executed(second.stdout)
    assert "install:vhost-dev" in ran
    assert "build:vhost-dev-iso" in ran
    log = (artifacts_dir / "vhost-dev-iso" / "install.log").read_text()
    assert "cim-part: /dev/vda1 disk-main-ESP 288MiB" in log
    assert "cim-part: /dev/vda3 disk-main-root 702MiB" in log

    # Unchanged: nothing runs at all.
    assert executed(doit(demo_domain, "install:vhost-dev", check=True).stdout) == []


@pytest.mark.nix
@needs_demo
@pytest.mark.parametrize(
    ("old", "new", "attribute"),
    [
        ('size = "32M";', 'size = "2G";', "disko.devices.disk.main.content.partitions need"),
        ('format = "ext4";', 'format = "jfs";', "it formats jfs; the demo installer makes btrfs, ext4, f2fs"),
        ('content.type = "swap";', 'content = { type = "zfs"; pool = "tank"; };', "it uses zfs, which the demo"),
    ],
)
def test_bad_disk_config_fails_before_any_vm(
    demo_domain: Path, artifacts_dir: Path, doit: DoitRunner, old: str, new: str, attribute: str
) -> None:
    doit(demo_domain, "build:vhost-dev-iso", check=True)
    set_disk_config(demo_domain, old, new)
    proc = doit(demo_domain, "install:vhost-dev", timeout=120)  # refused before any VM: well within this
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert attribute in output
    assert "Traceback" not in output
    assert "phase installer" not in output  # no VM was started
    assert not (artifacts_dir / "vhost-dev-iso" / "install.log").exists()


@pytest.mark.nix
@pytest.mark.vm
@needs_demo
def test_hanging_installer_is_stopped_at_the_phase_timeout(
    demo_domain: Path, artifacts_dir: Path, doit: DoitRunner
) -> None:
    # A real ISO whose installer hangs after its started line.
    (demo_domain / "rootfs/sbin/cim-install").write_text(
        "#!/bin/sh\necho 'cim-install: started vhost-dev (this installer hangs on purpose)'\nexec sleep 100000\n"
    )
    domain = json.loads((demo_domain / "domain.json").read_text())
    domain["hosts"]["vhost-dev"]["install"]["timeout_s"] = 45
    (demo_domain / "domain.json").write_text(json.dumps(domain))

    proc = doit(demo_domain, "install:vhost-dev")
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "install phase 'installer' stalled" in output
    assert "Traceback" not in output
    log = artifacts_dir / "vhost-dev-iso" / "install.log"
    assert str(log) in output
    assert "this installer hangs on purpose" in log.read_text()
    # The VM is gone: no QEMU process names this test's ISO (under its private artifacts dir).
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, timeout=10).stdout
    assert not [line for line in ps.splitlines() if "qemu-system" in line and str(artifacts_dir) in line]


@pytest.mark.nix
@pytest.mark.vm
@needs_demo
def test_install_onto_a_declared_nvme_disk(demo_domain: Path, artifacts_dir: Path, doit: DoitRunner) -> None:
    # The host declares its disk as NVMe in domain.json and in disk-config.nix: the install VM attaches an NVMe
    # controller, the installer lays out /dev/nvme0n1, and the checks name its partitions nvme0n1p1…p3.
    domain = json.loads((demo_domain / "domain.json").read_text())
    domain["hosts"]["vhost-dev"]["hardware"]["disks"] = [
        {"name": "main", "device": "/dev/nvme0n1", "size_gib": 1, "kind": "nvme"}
    ]
    (demo_domain / "domain.json").write_text(json.dumps(domain))
    set_disk_config(demo_domain, 'device = "/dev/vda";', 'device = "/dev/nvme0n1";')

    proc = doit(demo_domain, "install:vhost-dev", check=True)
    assert "attached as nvme (/dev/nvme0n1)" in proc.stdout
    assert "check: / on /dev/nvme0n1p3 disk-main-root 734 MiB ext4" in proc.stdout
    log = (artifacts_dir / "vhost-dev-iso" / "install.log").read_text()
    assert re.search(r"^cim-install: started vhost-dev onto /dev/nvme0n1", log, re.M)
    assert re.search(r"^cim-fs: / /dev/nvme0n1p3 ext4", log, re.M)
    record = json.loads((artifacts_dir / "manifest.json").read_text())["artifacts"]["vhost-dev-iso"]["install"]
    assert record["result"] == "pass"
    assert "/ on /dev/nvme0n1p3 disk-main-root 734 MiB ext4" in record["checks"]


@pytest.mark.nix
@needs_demo
def test_disk_config_elsewhere_than_the_declared_disk_fails_before_any_vm(
    demo_domain: Path, artifacts_dir: Path, doit: DoitRunner
) -> None:
    set_disk_config(demo_domain, 'device = "/dev/vda";', 'device = "/dev/nvme0n1";')  # domain.json still says vda
    proc = doit(demo_domain, "install:vhost-dev", timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "disko.devices.disk.main.device = '/dev/nvme0n1', but domain.json hosts.vhost-dev.hardware.disks" in output
    assert "Traceback" not in output and "phase installer" not in output


@pytest.mark.nix
@pytest.mark.vm
@needs_demo
def test_failed_installer_reports_its_reason(demo_domain: Path, artifacts_dir: Path, doit: DoitRunner) -> None:
    # A real ISO whose installer gives up: the contract's failed line carries the reason, and it powers off.
    (demo_domain / "rootfs/sbin/cim-install").write_text(
        '#!/bin/sh\n. /etc/cim/contract.sh\necho "$CIM_INSTALL_STARTED"\nsleep 1\n'
        'echo "$CIM_INSTALL_FAILED no room on the target (this installer fails on purpose)"\npoweroff -f\n'
    )
    proc = doit(demo_domain, "install:vhost-dev")
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert (
        "install phase 'installer' failed: cim-install: failed vhost-dev: no room on the target (this installer "
        "fails on purpose)"
    ) in output
    assert "Traceback" not in output and "phase disk-boot" not in output
    record = json.loads((artifacts_dir / "manifest.json").read_text())["artifacts"]["vhost-dev-iso"]["install"]
    assert record["result"] == "fail" and "no room on the target" in record["error"]


@pytest.mark.nix
@pytest.mark.vm
@needs_demo
def test_an_install_credential_other_than_1_installs_nothing(
    demo_domain: Path, artifacts_dir: Path, doit: DoitRunner, tmp_path: Path
) -> None:
    """`cim.install=0` is a credential that exists: the ISO says so, boots its live system and leaves the disk alone
    (systemd's ConditionCredential tests existence only; the installer reads the value)."""
    from pipeline import netinstall
    from pipeline.domain import System
    from pipeline.install import blank_disk
    from pipeline.qemu import Drive, Firmware, Vm, VmSpec

    doit(demo_domain, "build:vhost-dev-iso", check=True)
    iso = next((artifacts_dir / "vhost-dev-iso").glob("*.iso"))
    disk = blank_disk(tmp_path / "vm", 1024)
    spec = VmSpec(
        name="cim-credential-0",
        system=System.x86_64_linux,
        workdir=tmp_path / "vm",
        console_log=tmp_path / "console.log",
        firmware=Firmware.uefi,
        drives=(Drive(iso, media="cdrom", bootindex=1), Drive(disk, format="qcow2", bootindex=2)),
        extra=("-smbios", "type=11,value=io.systemd.credential:cim.install=0"),
    )
    with Vm(spec) as vm:
        vm.wait_for_console(r"^cim: vhost-dev boot complete", 240, "the live system's boot-complete line")
        console = vm.console
    assert "cim-install: credential cim.install=0 is not 1: nothing is installed" in console
    assert "cim-install: started" not in console
    assert netinstall.disk_untouched(disk)


# -- disko's layered layouts, made by the demo installer with Debian's tools -------------------------------------

LUKS_LVM_BY_ID = """{
  disko.devices = {
    disk.system = {
      type = "disk";
      device = "/dev/disk/by-id/ata-QEMU_SSD_Model_7_CIM0001";
      content = {
        type = "gpt";
        partitions = {
          boot = { size = "200M"; type = "EF00";
                   content = { type = "filesystem"; format = "vfat"; mountpoint = "/boot"; }; };
          vault = { size = "100%";
                    content = { type = "luks"; name = "vault"; settings.keyFile = "/tmp/vault.key";
                                content = { type = "lvm_pv"; vg = "sys"; }; }; };
        };
      };
    };
    lvm_vg.sys = {
      type = "lvm_vg";
      lvs = {
        swap = { size = "16M"; content.type = "swap"; };
        root = { size = "100%FREE"; content = { type = "filesystem"; format = "ext4"; mountpoint = "/"; }; };
      };
    };
  };
}
"""

RAID_BTRFS_BIOS = """{
  disko.devices = {
    disk = {
      left = { type = "disk"; device = "/dev/disk/by-id/virtio-CIMLEFT";
        content = { type = "gpt"; partitions = {
          grub = { size = "1M"; type = "EF02"; };
          member = { size = "100%"; content = { type = "mdraid"; name = "mirror"; }; };
        }; }; };
      right = { type = "disk"; device = "/dev/disk/by-id/virtio-CIMRIGHT";
        content = { type = "gpt"; partitions = {
          grub = { size = "1M"; type = "EF02"; };
          member = { size = "100%"; content = { type = "mdraid"; name = "mirror"; }; };
        }; }; };
    };
    mdadm.mirror = {
      type = "mdadm";
      level = 1;
      content = {
        type = "btrfs";
        subvolumes = {
          "@" = { mountpoint = "/"; };
          "@nix" = { mountpoint = "/nix"; mountOptions = [ "noatime" ]; };
        };
      };
    };
  };
}
"""


@pytest.mark.nix
@pytest.mark.vm
@needs_demo
def test_install_luks_on_lvm_on_a_disk_named_by_id(demo_domain: Path, artifacts_dir: Path, doit: DoitRunner) -> None:
    # A SATA disk named by its udev by-id name (model and serial as QEMU gives them), LUKS2 holding an LVM volume
    # group: the installer formats with cryptsetup and lvm, stage 1 asks for the passphrase, the pipeline types it.
    (demo_domain / "disk-config.nix").write_text(LUKS_LVM_BY_ID)
    proc = doit(demo_domain, "install:vhost-dev", check=True)
    assert "sata disk (serial=CIM0001, model=QEMU SSD Model 7)" in proc.stdout
    for check in [
        "check: /dev/mapper/vault: an open LUKS device",
        "check: LVM logical volume sys-root is active",
        "check: / on /dev/sys/root: ext4",
        "check: swap active: /dev/mapper/sys-swap",
    ]:
        assert check in proc.stdout
    log = (artifacts_dir / "vhost-dev-iso" / "install.log").read_text(errors="replace")
    assert "cim-install: disk system: /dev/disk/by-id/ata-QEMU_SSD_Model_7_CIM0001 -> /dev/sda" in log
    assert "Passphrase for vault (/dev/sda2): " in log and "cim stage 1: LUKS vault open" in log


@pytest.mark.nix
@pytest.mark.vm
@needs_demo
def test_install_btrfs_on_md_raid1_on_a_bios_machine(demo_domain: Path, artifacts_dir: Path, doit: DoitRunner) -> None:
    # Two disks mirrored by md (RAID1) holding btrfs subvolumes, on a BIOS machine: GRUB in both disks' EF02
    # partitions reads the kernel through md and btrfs; stage 1 assembles the array and mounts the /nix subvolume.
    (demo_domain / "disk-config.nix").write_text(RAID_BTRFS_BIOS)
    domain = json.loads((demo_domain / "domain.json").read_text())
    domain["hosts"]["vhost-dev"]["hardware"]["firmware"] = "bios"
    (demo_domain / "domain.json").write_text(json.dumps(domain))
    proc = doit(demo_domain, "install:vhost-dev", check=True)
    assert "phase disk-boot: the disk alone (BIOS → the installed boot loader)" in proc.stdout
    for check in [
        "check: md array mirror: raid1, clean, 2 devices",
        "check: / on /dev/md/mirror: btrfs subvolume /@",
        "check: /nix on /dev/md/mirror: btrfs subvolume /@nix",
    ]:
        assert check in proc.stdout
    log = (artifacts_dir / "vhost-dev-iso" / "install.log").read_text(errors="replace")
    assert "cim-install: installing GRUB (BIOS) on /dev/disk/by-id/virtio-CIMLEFT" in log
    assert "cim-install: installing GRUB (BIOS) on /dev/disk/by-id/virtio-CIMRIGHT" in log
    assert "Booting `NixOS - Generation 1 (vhost-dev)'" in log
    assert "cim stage 1: /nix mounted" in log
