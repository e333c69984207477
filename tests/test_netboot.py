"""Network boot for real: vhost-dev's ISO provisions the LAN, vhost-2 boots from it with no disk, an undeclared MAC
beside it gets nothing (three QEMU VMs on a VDE hub of unix sockets)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cimtest.demo import DoitRunner, executed, needs_demo
from test_pipeline import manifest, set_json, sha256sum_check

from pipeline import netboot

pytestmark = [pytest.mark.nix, needs_demo]

HOST_MAC = "52:54:00:23:00:12"


def machine_network() -> dict[str, str]:
    """This machine's links, addresses and routes: a netboot test must add none."""
    return {
        what: subprocess.run(["ip", "-o", *args], capture_output=True, text=True, timeout=30).stdout
        for what, args in (("links", ["link"]), ("addresses", ["addr"]), ("routes", ["route", "show", "table", "all"]))
    }


def links(text: str) -> set[str]:
    return {line.split(":")[1].strip().split("@")[0] for line in text.splitlines() if ":" in line}


def netboot_record(artifacts_dir: Path) -> dict[str, Any]:
    record: dict[str, Any] = manifest(artifacts_dir)["artifacts"]["vhost-2-netboot"]
    return record


@pytest.mark.vm
def test_a_declared_machine_boots_from_the_lan_and_an_undeclared_one_is_kept_out(
    demo_domain: Path, artifacts_dir: Path, doit: DoitRunner
) -> None:
    before = machine_network()
    proc = doit(demo_domain, "boot:vhost-2-netboot", check=True)
    ran = executed(proc.stdout)
    assert {"build:vhost-2-netboot", "build:vhost-dev-iso", "boot:vhost-2-netboot"} <= set(ran), proc.stdout
    assert not {"boot:vhost-dev-iso", "install:vhost-dev", "build:vhost-pi-sd"} & set(ran), proc.stdout

    # No packet left the unix sockets: no new link (tap, bridge), address or route on this machine.
    after = machine_network()
    assert links(after["links"]) <= links(before["links"]), after["links"]
    assert after["routes"] == before["routes"] and after["addresses"].count("inet") == before["addresses"].count("inet")

    record = netboot_record(artifacts_dir)
    nb_dir = artifacts_dir / "vhost-2-netboot"
    assert record["file"] == "vhost-2-netboot/netboot.ipxe"
    assert sorted(p["file"] for p in record["parts"]) == ["vhost-2-netboot/bzImage", "vhost-2-netboot/initrd"]
    assert "vhost-2-netboot/initrd: OK" in sha256sum_check(artifacts_dir)
    boot = record["boot"]
    assert boot["result"] == "pass", boot
    assert [(p["probe"], p["ok"]) for p in boot["probes"]] == [
        ("lease", True),
        ("console", True),
        ("nats", True),
        ("stats", True),
        ("intruder", True),
    ]
    facts = boot["netboot"]
    # The lease: vhost-2's declared address from the provisioner guest, and the iPXE script it names.
    assert facts["lease"]["mac"] == HOST_MAC and facts["lease"]["address"] == "192.168.23.12"
    assert facts["lease"]["server"] == "192.168.23.2"
    assert facts["lease"]["bootfile"] == "http://192.168.23.2/vhost-2/netboot.ipxe"
    sizes = {p.name: p.stat().st_size for p in nb_dir.iterdir()}
    assert [(Path(f["url"]).name, f["size"]) for f in facts["fetches"][:3]] == [
        ("netboot.ipxe", sizes["netboot.ipxe"]),
        ("bzImage", sizes["bzImage"]),
        ("initrd", sizes["initrd"]),
    ]
    # The system is not in the netboot initrd: stage 1 fetches it over the LAN, and it is the larger.
    system = facts["fetches"][3]
    assert system["url"] == "http://192.168.23.2/vhost-2/system/initrd" and system["size"] > sizes["initrd"]
    assert facts["os_lease"].startswith(f"cim-lan: lease 192.168.23.12/24 for {HOST_MAC}")
    assert any(f"DHCPACK(eth0) 192.168.23.12 {HOST_MAC} vhost-2" in line for line in facts["provisioner_lines"])
    console = (nb_dir / "boot.log").read_text(errors="replace")
    assert re.search(rf"Configuring \(net0 {HOST_MAC}\)[.\s]*ok", console)
    assert "cim: vhost-2 boot complete" in console
    assert "cim-lan: provisioner on lan0" in (nb_dir / "provisioner.log").read_text(errors="replace")

    # The intruder: no lease, and with a static address no answer from the provisioner's DHCP, DNS or NATS; the
    # provisioner's console names its MAC as refused.
    intruder = facts["intruder"]
    assert intruder["mac"] == netboot.INTRUDER_MAC and intruder["lease"] is False
    assert intruder["answered"] == {"dhcp": False, "dns": False, "nats": False}, intruder["details"]
    assert intruder["refused_logged"] is True
    refused = [
        line
        for line in (nb_dir / "provisioner.log").read_text(errors="replace").splitlines()
        if "cim-lan: refused" in line
    ]
    assert refused and all(netboot.INTRUDER_MAC in line for line in refused)
    assert "No configuration methods" in (nb_dir / "intruder.log").read_text(errors="replace")

    # A comment-only edit runs nothing; the netboot VM's memory re-runs its netboot test alone.
    with (demo_domain / "lib" / "host.nix").open("a") as f:
        f.write("# a comment changes no derivation\n")
    proc = doit(demo_domain, "boot:vhost-2-netboot", check=True)
    assert not [t for t in executed(proc.stdout) if t.startswith(("build:", "boot:"))], proc.stdout
    set_json(demo_domain / "domain.json", ["hosts", "vhost-2", "boot", "memory_mib"], 768)
    proc = doit(demo_domain, "boot:vhost-2-netboot", check=True)
    ran = executed(proc.stdout)
    assert "boot:vhost-2-netboot" in ran and not [t for t in ran if t.startswith("build:")], proc.stdout
    assert netboot_record(artifacts_dir)["boot"]["result"] == "pass"
    memtotal = re.search(r"MemTotal: (\d+) kB", (nb_dir / "boot.log").read_text(errors="replace"))
    assert memtotal and 600_000 < int(memtotal.group(1)) < 786_432, "booted with 768 MiB"


@pytest.mark.vm
def test_the_intruders_vm_boots_once_the_domain_declares_its_mac(
    demo_domain: Path, artifacts_dir: Path, doit: DoitRunner
) -> None:
    set_json(
        demo_domain / "domain.json",
        ["hosts", "vhost-2", "hardware", "nics"],
        [{"name": "lan", "mac": netboot.INTRUDER_MAC}],
    )
    proc = doit(demo_domain, "boot:vhost-2-netboot", check=True)
    facts = netboot_record(artifacts_dir)["boot"]["netboot"]
    assert facts["lease"]["mac"] == netboot.INTRUDER_MAC and facts["lease"]["address"] == "192.168.23.12", proc.stdout
    assert facts["intruder"]["mac"] == "52:54:00:0b:ad:02" and facts["intruder"]["lease"] is False
    console = (artifacts_dir / "vhost-2-netboot" / "boot.log").read_text(errors="replace")
    assert re.search(rf"Configuring \(net0 {netboot.INTRUDER_MAC}\)[.\s]*ok", console)
    assert "cim: vhost-2 boot complete" in console


def test_build_netboot_alone_and_check_it_reproducible(
    demo_domain: Path, artifacts_dir: Path, doit: DoitRunner
) -> None:
    proc = doit(demo_domain, "build:vhost-2-netboot", check=True)
    assert executed(proc.stdout) == ["validate", "eval:vhost-2", "build:vhost-2-netboot"]
    assert sorted(p.name for p in (artifacts_dir / "vhost-2-netboot").iterdir()) == [
        "build.log",
        "bzImage",
        "initrd",
        "netboot.ipxe",
    ]
    script = (artifacts_dir / "vhost-2-netboot" / "netboot.ipxe").read_text()
    assert script.startswith("#!ipxe") and "kernel bzImage" in script and "initrd initrd" in script
    checked = doit(demo_domain, "check:vhost-2-netboot", check=True)
    assert "reproducible:" in checked.stdout
    assert netboot_record(artifacts_dir)["reproducible"] is True


# -- [14] zero-touch install over the network --------------------------------------------------------------------------


@pytest.mark.vm
def test_a_blank_machine_installs_itself_from_the_lan(demo_domain: Path, artifacts_dir: Path, doit: DoitRunner) -> None:
    proc = doit(demo_domain, "install:vhost-2", check=True)
    assert "install:vhost-2" in executed(proc.stdout)
    record = netboot_record(artifacts_dir)
    result = record["install"]
    assert result["result"] == "pass", result
    assert set(result["phases"]) == {"lease+fetch", "report", "install", "disk-boot"}
    assert [c.split(" ")[0] for c in result["checks"]] == ["/boot", "/dev/vda2", "/"]
    net = result["network"]
    assert net["lease"]["address"] == "192.168.23.12" and net["mac"] == HOST_MAC
    # The netboot initrd is a stage 1: the system is not in it, it comes over the LAN (bytes and seconds recorded).
    initrd = (artifacts_dir / "vhost-2-netboot" / "initrd").stat().st_size
    assert net["initrd_bytes"] == initrd and net["system_bytes"] > initrd and net["system_seconds"] > 0
    system = {Path(f["url"]).name: f["size"] for f in net["fetches"] if "/system/" in f["url"]}
    assert set(system) == {"bzImage", "initrd", "BOOTX64.EFI"} and sum(system.values()) == net["system_bytes"]
    assert net["hardware_check"] == ["ok memory 1024 MiB", "ok cpu cores 1", "ok disk /dev/vda 1024 MiB"]
    report = json.loads((artifacts_dir / "vhost-2-netboot" / "install-inventory.json").read_text())
    assert report["version"] and report["hardware"]["memory"]
    assert [(p["probe"], p["ok"]) for p in net["probes"]] == [("console", True), ("nats", True), ("stats", True)]
    log = (artifacts_dir / "vhost-2-netboot" / "install.log").read_text(errors="replace")
    assert "cim-install: done vhost-2" in log and "cim: vhost-2 boot complete" in log
    # The same images and spec again: nothing runs.
    again = doit(demo_domain, "install:vhost-2", check=True)
    assert "install:vhost-2" not in executed(again.stdout)


@pytest.mark.vm
def test_unknown_hardware_stops_the_install_before_any_write(
    demo_domain: Path, artifacts_dir: Path, doit: DoitRunner
) -> None:
    domain_json = demo_domain / "domain.json"
    set_json(domain_json, ["inventory"], "enforce")
    # vhost-2 declares 2 GiB and a second disk; its VM gets 1 GiB and one disk (boot.* sets what the VM has).
    set_json(domain_json, ["hosts", "vhost-2", "hardware", "memory_gib"], 2)
    disks = [
        {"name": "main", "device": "/dev/vda", "size_gib": 1, "kind": "virtio"},
        {"name": "data", "device": "/dev/vdb", "size_gib": 2, "kind": "virtio"},
    ]
    set_json(domain_json, ["hosts", "vhost-2", "hardware", "disks"], disks)
    set_json(domain_json, ["hosts", "vhost-2", "boot", "memory_mib"], 1024)
    set_json(domain_json, ["hosts", "vhost-2", "boot", "disks"], [{"size_gib": 1}])
    proc = doit(demo_domain, "install:vhost-2")
    assert proc.returncode != 0
    said = proc.stdout + proc.stderr
    assert "memory: declared 2048 MiB, detected 1024 MiB (differs)" in said, said
    assert "disks /dev/vdb: declared 2048 MiB, detected (none) (missing)" in said, said
    assert "was not written (all zeros)" in said and "Traceback" not in said
    result = netboot_record(artifacts_dir)["install"]
    assert result["result"] == "fail" and result["network"]["disk_untouched"] is True
    assert "disk-boot" not in result["phases"]

    # Under `record` the same machine installs, and the differences are in the manifest.
    set_json(domain_json, ["inventory"], "record")
    doit(demo_domain, "install:vhost-2", check=True)
    result = netboot_record(artifacts_dir)["install"]
    assert result["result"] == "pass"
    assert "memory: declared 2048 MiB, detected 1024 MiB (differs)" in result["network"]["hardware_check"]


@pytest.mark.vm
def test_one_provisioner_installs_two_machines_at_once(
    demo_domain: Path, artifacts_dir: Path, doit: DoitRunner
) -> None:
    data = json.loads((demo_domain / "domain.json").read_text())
    second = json.loads(json.dumps(data["hosts"]["vhost-2"]))
    second["address"] = "192.168.23.13"
    second["hardware"]["nics"] = [{"name": "lan", "mac": "52:54:00:23:00:13"}]
    second["guests"] = [{"name": "nats", "kind": "nats", "address": "10.23.3.10"}]
    data["hosts"]["vhost-3"] = second
    (demo_domain / "domain.json").write_text(json.dumps(data, indent=2))
    proc = doit(demo_domain, "-n", "2", "install:vhost-2", "install:vhost-3", check=True, timeout=1500)
    assert {"install:vhost-2", "install:vhost-3"} <= set(executed(proc.stdout))
    assert proc.stdout.count("provisioner vhost-dev up on the LAN in") == 1, "one provisioner for both"
    records = manifest(artifacts_dir)["artifacts"]
    for host, address in (("vhost-2", "192.168.23.12"), ("vhost-3", "192.168.23.13")):
        result = records[f"{host}-netboot"]["install"]
        assert result["result"] == "pass" and result["network"]["lease"]["address"] == address
