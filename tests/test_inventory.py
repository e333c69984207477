"""Hardware inventory, pure parts: a facter.json read as facter writes it, the boot VM that follows the declared
hardware, declared vs detected, the policies, and `cim inventory` (--facter, --write) on copies of the domains."""

from __future__ import annotations

import datetime
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pipeline import inventory
from pipeline.artifacts import InventoryDifference
from pipeline.artifacts import InventoryKind as Kind
from pipeline.domain import DiskBus, Display, Hardware, InventoryPolicy, load_domain, parse_domain

ROOT = Path(__file__).resolve().parent.parent
FACTER = Path(__file__).parent / "data" / "facter-precision-7920.json"  # written from nixos-facter's documented format
DEMO = ROOT / "configs" / "demo"
CIM = ROOT / "configs" / "cim"


def report() -> Any:
    return json.loads(FACTER.read_text())


def cim(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


def qemu_pc_report(
    memory_mib: int = 1024, disks: tuple[tuple[str, int], ...] = (("vda", 1024),), gpus: tuple[str, ...] = ()
) -> dict[str, Any]:
    """A report as the demo's cim-inventory writes it in a QEMU `pc` VM (shape as in artifacts/*/inventory.json)."""
    return {
        "version": 1,
        "system": "x86_64-linux",
        "virtualisation": "qemu",
        "hardware": {
            "cpu": [
                {
                    "architecture": "x86_64",
                    "vendor_name": "AuthenticAMD",
                    "model_name": "QEMU Virtual CPU version 2.5+",
                    "physical_id": 0,
                    "cores": 1,
                    "siblings": 1,
                }
            ],
            "memory": [{"model": "Main Memory", "resources": [{"type": "phys_mem", "range": memory_mib << 20}]}],
            "disk": [
                {
                    "unix_device_name": f"/dev/{name}",
                    "model": "",
                    "serial": f"cim-disk{i}",
                    "driver": "virtio_blk",
                    "resources": [{"type": "size", "unit": "sectors", "value_1": mib * 2048, "value_2": 512}],
                }
                for i, (name, mib) in enumerate(disks)
            ],
            "graphics_card": [
                {
                    "vendor": {"hex": pci.split(":")[0], "value": int(pci.split(":")[0], 16)},
                    "device": {"hex": pci.split(":")[1], "value": int(pci.split(":")[1], 16)},
                    "model": "QEMU Standard VGA",
                    "sysfs_bus_id": "0000:00:04.0",
                    "driver": "",
                    "sysfs_iommu_group_id": None,
                }
                for pci in gpus
            ],
            "network_interface": [
                {
                    "unix_device_names": ["eth0"],
                    "driver": "virtio_net",
                    "resources": [{"type": "hwaddr", "address": "52:54:00:12:34:56"}],
                }
            ],
        },
        "smbios": {
            "system": {"manufacturer": "QEMU", "product": "Standard PC (i440FX + PIIX, 1996)"},
            "memory_device": [{"size": memory_mib * 1024}],
        },
        "firmware": {"type": "bios"},
    }


def test_a_facter_report_reads_as_facter_writes_it() -> None:
    found = inventory.parse_report(report(), str(FACTER))
    assert (found.system, found.virtualisation) == ("x86_64-linux", "none")
    assert (found.vendor, found.model) == ("Dell Inc.", "Precision 7920 Tower")
    assert (found.cpu_model, found.cpu_cores, found.cpu_threads) == ("Intel(R) Xeon(R) Gold 6230 CPU @ 2.10GHz", 20, 40)
    assert found.memory_bytes == 128 << 30  # the four DIMMs of smbios.memory_device, not phys_mem
    (disk,) = found.disks
    assert (disk.name, disk.size_bytes, disk.serial, disk.driver) == (
        "nvme0n1",
        1953525168 * 512,
        "S6B0NL0T123456A",
        "nvme",
    )
    assert [(g.pci_id, g.bus_id, g.driver, g.iommu_group) for g in found.gpus] == [
        ("10de:2206", "0000:65:00.0", "vfio-pci", 42),
        ("102b:0536", "0000:03:00.0", "mgag200", 17),
    ]
    assert [n.name for n in found.nics] == ["eno1"]  # lo is not hardware


def test_memory_falls_back_to_phys_mem_without_smbios_devices() -> None:
    data = report()
    del data["smbios"]["memory_device"]
    assert inventory.parse_report(data, "x").memory_bytes == 137438953472


NOT_REPORTS = [[], {"version": 1}, {"hardware": {}}, {"version": 1, "hardware": {"cpu": [{"cores": "x"}]}}]


@pytest.mark.parametrize("bad", NOT_REPORTS)
def test_what_is_not_a_report_is_refused_with_the_file_named(bad: object) -> None:
    with pytest.raises(inventory.InventoryError, match=r"^facter\.json: "):
        inventory.parse_report(bad, "facter.json")


def test_the_demo_declares_what_its_vms_are() -> None:
    domain = load_domain(DEMO)
    dev = domain.hosts["vhost-dev"]
    machine = inventory.boot_machine(dev)
    assert (machine.memory_mib, machine.cpus, machine.unchecked) == (1024, 1, ())
    assert machine.disks == (inventory.VmDisk(1.0, DiskBus.virtio),)
    result = inventory.verdict(dev.hardware, inventory.parse_report(qemu_pc_report(), "r"), domain.inventory, machine)
    assert result.matches and result.passed, result.lines()
    pi = inventory.boot_machine(domain.hosts["vhost-pi"])
    assert [u.field for u in pi.unchecked] == ["disks.sd.size_gib"]  # the SD card is the image itself


def test_what_a_vm_cannot_be_is_unchecked_never_a_match() -> None:
    host = load_domain(CIM).hosts["vhost-dev"]
    machine = inventory.boot_machine(host)
    reasons = {u.field: u.reason for u in machine.unchecked}
    assert set(reasons) == {"memory_gib", "cpu.cores", "model", "cpu.model", "gpus[0]"}
    assert "passed-through" in reasons["gpus[0]"] and "16 GiB" in reasons["memory_gib"]
    assert machine.memory_mib == host.boot.memory_mib == 4096  # what the boot VM really gets
    assert machine.disks == (inventory.VmDisk(1024.0, DiskBus.nvme),)  # the declared 1 TiB NVMe disk, sparse
    # A QEMU VM's report against the workstation: the unchecked facts are not compared, and not called a match.
    vm = inventory.parse_report(qemu_pc_report(memory_mib=4096, disks=(("nvme0n1", 1024 << 10),)), "r")
    result = inventory.verdict(host.hardware, vm, InventoryPolicy.record, machine)
    assert result.matches and len(result.unchecked) == 5
    assert "5 fact(s) unchecked" in result.summary()
    rows = {r[0]: r[3] for r in inventory.side_by_side(host.hardware, vm, result)}
    assert rows["memory_gib"] == "unchecked" and rows["gpus[0]"] == "unchecked" and rows["cpu.model"] == "unchecked"


def hardware(**changes: object) -> Hardware:
    base = load_domain(DEMO).hosts["vhost-dev"].hardware.model_dump(mode="json")
    return Hardware.model_validate({**base, **changes})


def test_differences_name_field_declared_detected_and_kind() -> None:
    found = inventory.parse_report(
        qemu_pc_report(memory_mib=2048, disks=(("vda", 1024), ("vdb", 1024)), gpus=("1234:1111",)), "r"
    )
    diffs = {d.field: d for d in inventory.reconcile(hardware(), found)}
    assert diffs["memory_gib"] == InventoryDifference(
        field="memory_gib", declared="1 GiB", detected="2 GiB", kind=Kind.differs
    )
    assert diffs["disks.vdb"].kind is Kind.unexpected and diffs["disks.vdb"].declared == "(none)"
    assert diffs["gpus"].kind is Kind.unexpected and "[1234:1111]" in diffs["gpus"].detected
    assert len(diffs) == 3


def test_memory_within_the_stated_tolerance_matches() -> None:
    within = inventory.parse_report(qemu_pc_report(memory_mib=1000), "r")  # 2.3 % under
    beyond = inventory.parse_report(qemu_pc_report(memory_mib=960), "r")  # 6.25 % under
    assert inventory.MEMORY_TOLERANCE == 0.05
    assert inventory.reconcile(hardware(), within) == []
    assert [d.field for d in inventory.reconcile(hardware(), beyond)] == ["memory_gib"]


def test_missing_disk_and_gpu_by_pci_id_and_by_model() -> None:
    found = inventory.parse_report(qemu_pc_report(disks=(), gpus=("1234:1111",)), "r")
    by_id = hardware(gpus=[{"model": "QEMU Standard VGA", "pci_id": "1234:1111"}])
    assert [(d.field, d.kind) for d in inventory.reconcile(by_id, found)] == [("disks.main", Kind.missing)]
    wrong_id = hardware(disks=[], gpus=[{"model": "QEMU Standard VGA", "pci_id": "1af4:1050"}])
    kinds = {d.field: d.kind for d in inventory.reconcile(wrong_id, found)}
    assert kinds == {"gpus[0]": Kind.missing, "gpus": Kind.unexpected}
    by_model = hardware(disks=[], gpus=[{"model": "QEMU VGA"}])
    assert inventory.reconcile(by_model, found) == []


def test_model_words() -> None:
    assert inventory.model_matches("Intel Xeon Gold 6230", "Intel(R) Xeon(R) Gold 6230 CPU @ 2.10GHz")
    assert inventory.model_matches("NVIDIA GeForce RTX 3080", "NVIDIA GA102 [GeForce RTX 3080]")
    assert not inventory.model_matches("Intel Xeon Gold 6230", "Intel(R) Xeon(R) Gold 6248 CPU @ 2.50GHz")


@pytest.mark.parametrize("policy", list(InventoryPolicy))
def test_policies(policy: InventoryPolicy) -> None:
    found = inventory.parse_report(qemu_pc_report(memory_mib=2048, disks=(("vda", 1024), ("vdb", 1024))), "r")
    result = inventory.verdict(hardware(), found, policy)
    assert not result.matches
    assert result.passed is (policy is not InventoryPolicy.enforce)
    message = str(inventory.enforce_error("vhost-dev", result))
    assert "memory_gib: declared 1 GiB, detected 2 GiB (differs)" in message
    assert "disks.vdb: declared (none), detected /dev/vdb 1 GiB (unexpected)" in message


def test_boot_settings_override_the_declared_hardware() -> None:
    data = json.loads((DEMO / "domain.json").read_text())
    data["hosts"]["vhost-dev"]["boot"].update(
        memory_mib=2048, disks=[{"size_gib": 1}, {"size_gib": 1}], displays=["std"]
    )
    machine = inventory.boot_machine(parse_domain(data, "x").hosts["vhost-dev"])
    assert (machine.memory_mib, len(machine.disks), machine.displays) == (2048, 2, (Display.std,))
    assert machine.unchecked == ()  # QEMU can give all of it: the differences are checked, not excused


def test_cim_inventory_facter_shows_the_workstation_side_by_side(tmp_path: Path) -> None:
    proc = cim("inventory", "vhost-dev", "--domain", str(CIM), "--facter", str(FACTER))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "Intel(R) Xeon(R) Gold 6230 CPU @ 2.10GHz" in out and "Precision 7920 Tower" in out
    # The video card that is not in the spec, and the 1 TB disk the inventory calls 1024 GiB.
    assert "Matrox" in out and "unexpected" in out
    assert "differs" in out and "931.51 GiB" in out
    assert "unchecked" not in out  # a real machine's report: every fact is compared
    assert "2 difference(s) from the inventory (policy record)" in out


def test_cim_inventory_write_brings_domain_json_in_line(tmp_path: Path) -> None:
    domain = tmp_path / "cim"
    shutil.copytree(CIM, domain)
    before = json.loads((domain / "domain.json").read_text())
    proc = cim("inventory", "vhost-dev", "--domain", str(domain), "--facter", str(FACTER), "--write")
    assert proc.returncode == 0, proc.stderr
    assert "now it matches the inventory" in proc.stdout
    after = json.loads((domain / "domain.json").read_text())
    # Other fields and their order are kept; the hardware is what was detected.
    assert list(after) == list(before) and list(after["hosts"]) == list(before["hosts"])
    assert list(after["hosts"]["vhost-dev"]) == list(before["hosts"]["vhost-dev"])
    assert after["hosts"]["vhost-pi"] == before["hosts"]["vhost-pi"]
    hw = after["hosts"]["vhost-dev"]["hardware"]
    assert hw["disks"] == [{"name": "main", "device": "/dev/nvme0n1", "size_gib": 931.51, "kind": "nvme"}]
    assert [g.get("pci_id") for g in hw["gpus"]] == ["10de:2206", "102b:0536"]
    assert hw["gpus"][0]["passthrough_to"] == ["dev"]
    # It validates, and reconciles with no difference.
    assert cim("validate", str(domain)).returncode == 0
    again = cim("inventory", "vhost-dev", "--domain", str(domain), "--facter", str(FACTER))
    assert "vhost-dev: matches the inventory" in again.stdout, again.stdout


def test_write_refuses_a_report_from_another_kind_of_machine(tmp_path: Path) -> None:
    domain = tmp_path / "cim"
    shutil.copytree(CIM, domain)
    before = (domain / "domain.json").read_bytes()
    proc = cim("inventory", "vhost-pi", "--domain", str(domain), "--facter", str(FACTER), "--write")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "aarch64-linux" in proc.stderr and "x86_64-linux" in proc.stderr
    assert (domain / "domain.json").read_bytes() == before


def test_cim_inventory_without_a_report_says_how_to_get_one(tmp_path: Path) -> None:
    proc = cim("inventory", "vhost-dev", "--domain", str(DEMO), "--artifacts", str(tmp_path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "boot:vhost-dev-iso" in proc.stderr and "--facter" in proc.stderr
    bad = tmp_path / "facter.json"
    bad.write_text("{not json")
    proc = cim("inventory", "vhost-dev", "--domain", str(DEMO), "--facter", str(bad))
    assert proc.returncode == 2 and str(bad) in proc.stderr and "Traceback" not in proc.stderr


def test_the_boot_vm_gets_the_declared_disks_and_display_adapters(tmp_path: Path) -> None:
    from pipeline import boot
    from pipeline.domain import Artifact, Format, System

    data = json.loads((DEMO / "domain.json").read_text())
    data["hosts"]["vhost-dev"]["hardware"]["gpus"] = [{"model": "QEMU Standard VGA", "pci_id": "1234:1111"}]
    host = parse_domain(data, "x").hosts["vhost-dev"]
    artifact = Artifact(host="vhost-dev", format=Format.iso, system=System.x86_64_linux)
    argv = boot.boot_spec(artifact, host, tmp_path / "x.iso", tmp_path, {}, tmp_path / "boot.log").argv()
    assert argv[argv.index("-m") + 1] == "1024" and argv[argv.index("-smp") + 1] == "1"
    devices = [argv[i + 1] for i, a in enumerate(argv) if a == "-device"]
    assert "virtio-blk-pci,drive=drive1,serial=cim-disk0" in devices and "VGA" in devices
    boot.make_blank_disks(host, tmp_path)
    blank = boot.blank_disk_path(tmp_path, 0)
    assert blank.stat().st_size == 1 << 30 and blank.stat().st_blocks == 0  # sparse: no space used

    workstation = load_domain(CIM).hosts["vhost-dev"]  # its 1 TiB NVMe disk, on an NVMe controller
    argv = boot.boot_spec(artifact, workstation, tmp_path / "x.iso", tmp_path, {}, tmp_path / "boot.log").argv()
    assert "nvme,drive=drive1,serial=cim-disk0" in argv and argv[argv.index("-m") + 1] == "4096"


def test_an_enforced_difference_is_a_failed_inventory_case_in_junit(tmp_path: Path) -> None:
    from pipeline.artifacts import ArtifactRecord, BuildInfo, InventoryDifference, InventoryResult, junit_xml

    message = "vhost-dev: the detected hardware is not what domain.json declares: memory_gib: declared 1 GiB, …"
    record = ArtifactRecord(
        host="vhost-dev",
        format="iso",
        system="x86_64-linux",
        drvPath="/nix/store/x.drv",
        outPath="/nix/store/x",
        file="vhost-dev-iso/x.iso",
        size=1,
        sha256="0" * 64,
        xxh3="0" * 32,
        build=BuildInfo(strategy="native", reason="", seconds=1.0, log="vhost-dev-iso/build.log"),
        inventory=InventoryResult(
            result="fail",
            verdict="differs",
            policy="enforce",
            report="vhost-dev-iso/inventory.json",
            image_xxh3="0" * 32,
            summary="1 difference(s)",
            log="vhost-dev-iso/boot.log",
            error=message,
            differences=[InventoryDifference(field="memory_gib", declared="1 GiB", detected="2 GiB", kind="differs")],
        ),
    )
    xml = junit_xml({"vhost-dev-iso": record}, tmp_path, datetime.datetime(2026, 11, 27, tzinfo=datetime.UTC))
    assert 'classname="vhost-dev-iso.inventory" name="inventory"' in xml
    assert "memory_gib: declared 1 GiB" in xml and 'failures="1"' in xml


# A report as nixos-facter (version 2) writes one for a QEMU guest: hwinfo's CPU without a model name (vendor, family,
# model), SMBIOS processor fields that name the VM's machine type, a floppy drive hwinfo lists as a disk, and an
# interface whose hwaddr is an index, not a MAC (nixos-facter #155).
QEMU_GUEST_REPORT = {
    "version": 2,
    "system": "x86_64-linux",
    "virtualisation": "kvm",
    "hardware": {
        "cpu": [{"architecture": "x86_64", "vendor_name": "AuthenticAMD", "family": 25, "model": 33, "cores": 2}],
        "disk": [
            {
                "unix_device_name": "/dev/fd0",
                "driver": "floppy",
                "resources": [{"type": "size", "unit": "sectors", "value_1": 8, "value_2": 512}],
                "is": {"not_ready": True},
            },
            {
                "unix_device_name": "/dev/vda",
                "driver": "virtio-blk",
                "model": "Disk",
                "resources": [{"type": "size", "unit": "sectors", "value_1": 2097152, "value_2": 512}],
            },
        ],
        "network_interface": [
            {"unix_device_names": ["lo"], "resources": []},
            {
                "unix_device_names": ["eth0"],
                "driver": "virtio_net",
                "resources": [{"type": "hwaddr", "address": 53}, {"type": "phwaddr", "address": 53}],
            },
        ],
    },
    "smbios": {"processor": [{"manufacturer": "QEMU", "version": "pc-i440fx-9.0"}]},
}


def test_a_qemu_guests_facter_report_names_the_cpu_and_keeps_floppies_and_made_up_macs_out() -> None:
    detected = inventory.parse_report(QEMU_GUEST_REPORT, "report.json")
    assert detected.cpu_model == "AMD CPU (AuthenticAMD, family 25, model 33)"
    assert [d.name for d in detected.disks] == ["vda"]
    assert [(n.name, n.mac) for n in detected.nics] == [("eth0", "")]
    # A real CPU name in the SMBIOS version is taken when hwinfo has none; hwinfo's model name wins over both.
    named = json.loads(json.dumps(QEMU_GUEST_REPORT))
    named["smbios"]["processor"][0]["version"] = "AMD EPYC 7763 64-Core Processor"
    assert inventory.parse_report(named, "r").cpu_model == "AMD EPYC 7763 64-Core Processor"
    named["hardware"]["cpu"][0]["model_name"] = "AMD Ryzen 9 5950X 16-Core Processor"
    assert inventory.parse_report(named, "r").cpu_model == "AMD Ryzen 9 5950X 16-Core Processor"
    # A MAC where a report has one is read as one.
    named["hardware"]["network_interface"][1]["resources"][0]["address"] = "52:54:00:AB:CD:EF"
    assert inventory.parse_report(named, "r").nics[0].mac == "52:54:00:ab:cd:ef"


def test_cim_inventory_shows_a_qemu_guests_report_without_a_floppy_or_a_made_up_mac(tmp_path: Path) -> None:
    path = tmp_path / "report.json"
    path.write_text(json.dumps(QEMU_GUEST_REPORT))
    proc = cim("inventory", "vhost-dev", "--domain", str(DEMO), "--facter", str(path))
    assert proc.returncode == 0, proc.stderr
    assert "AMD CPU (AuthenticAMD" in proc.stdout and "fd0" not in proc.stdout
    assert "virtio_net MAC not in the report" in proc.stdout and " 53 " not in proc.stdout
