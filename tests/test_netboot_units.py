"""Network boot, the pure parts: what domain.json must say for a host to netboot (one paragraph per mistake, through
`cim validate`, nothing run), the intruder's MAC and address, and the VMs' command lines on a LAN of unix sockets."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cimtest.demo import DEMO

from pipeline import netboot
from pipeline.domain import Artifact, Format, System, load_domain, parse_domain
from pipeline.qemu import Firmware, LanPort, VmSpec

DEMO_DATA = json.loads((DEMO / "domain.json").read_text())


def demo_data() -> dict[str, Any]:
    return copy.deepcopy(DEMO_DATA)


def cim_validate(tmp_path: Path, data: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    domain = tmp_path / "d"
    domain.mkdir()
    (domain / "domain.json").write_text(json.dumps(data))
    return subprocess.run(
        [str(Path(sys.executable).with_name("cim")), "validate", str(domain)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def _twice(d: dict[str, Any]) -> None:
    d["hosts"]["vhost-2"]["hardware"]["nics"][0]["mac"] = "52:54:00:23:00:10"


def _malformed(d: dict[str, Any]) -> None:
    d["hosts"]["vhost-2"]["hardware"]["nics"][0]["mac"] = "52:54:00:23:00"


def _multicast(d: dict[str, Any]) -> None:
    d["hosts"]["vhost-2"]["hardware"]["nics"][0]["mac"] = "01:00:5e:00:00:01"


def _no_mac(d: dict[str, Any]) -> None:
    del d["hosts"]["vhost-2"]["hardware"]["nics"]


def _no_provisioner(d: dict[str, Any]) -> None:
    del d["provisioner"]


def _provisioner_unknown(d: dict[str, Any]) -> None:
    d["provisioner"] = "vhost-9"


def _provisioner_without_guest(d: dict[str, Any]) -> None:
    d["hosts"]["vhost-dev"]["guests"] = [g for g in d["hosts"]["vhost-dev"]["guests"] if g["kind"] != "provisioner"]


def _guest_off_the_lan(d: dict[str, Any]) -> None:
    d["hosts"]["vhost-dev"]["guests"][-1]["address"] = "10.23.0.13"


def _aarch64_netboot(d: dict[str, Any]) -> None:
    d["hosts"]["vhost-pi"]["images"] = ["sd", "netboot"]


@pytest.mark.parametrize(
    ("name", "change", "says"),
    [
        ("twice", _twice, ["52:54:00:23:00:10 is declared twice", "hosts.vhost-dev.hardware.nics 'lan'", "vhost-2"]),
        ("malformed", _malformed, ["'52:54:00:23:00' is not a MAC address", "nics.0.mac", "six hex bytes"]),
        ("multicast", _multicast, ["multicast", "unicast"]),
        ("no MAC", _no_mac, ["hosts.vhost-2.images holds 'netboot'", "declares no MAC", "hardware.nics"]),
        ("no provisioner", _no_provisioner, ["names no provisioner", "'provisioner'", "vhost-dev"]),
        ("unknown provisioner", _provisioner_unknown, ["'vhost-9' is not a host of the domain"]),
        ("no provisioner guest", _provisioner_without_guest, ["no guest of kind 'provisioner'"]),
        ("guest off the LAN", _guest_off_the_lan, ["must be in the host's LAN 192.168.23.0/24", "10.23.0.13"]),
        ("aarch64", _aarch64_netboot, ["iPXE ROM (x86_64)", "'sd' image"]),
    ],
)
def test_what_a_netboot_host_needs_is_said_in_one_paragraph(
    tmp_path: Path, name: str, change: Any, says: list[str]
) -> None:
    data = demo_data()
    change(data)
    proc = cim_validate(tmp_path, data)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    message = proc.stderr.strip()
    assert message.startswith("error: ") and str(tmp_path / "d" / "domain.json") in message
    assert "Traceback" not in message and len(message.splitlines()) <= 2  # the paragraph and its hint
    for words in says:
        assert words in message, f"{name}: {words!r} not in {message!r}"


def test_macs_are_kept_lower_case_and_with_colons() -> None:
    data = demo_data()
    data["hosts"]["vhost-2"]["hardware"]["nics"][0]["mac"] = "52-54-00-23-00-AB"
    domain = parse_domain(data, "domain.json")
    assert domain.hosts["vhost-2"].lan_mac == "52:54:00:23:00:ab"


def test_the_demo_netboots_vhost_2_from_vhost_dev() -> None:
    domain = load_domain(DEMO)
    assert domain.provisioner == "vhost-dev" and domain.netboot_hosts() == ["vhost-2"]
    assert [a.name for a in domain.artifacts()] == ["vhost-dev-iso", "vhost-pi-sd", "vhost-2-netboot"]
    assert Format.netboot.product_types == ("kernel", "initrd", "ipxe") and Format.netboot.attribute == "netboot"


def test_the_intruder_takes_a_mac_and_an_address_nobody_declares() -> None:
    domain = load_domain(DEMO)
    assert netboot.intruder_mac(domain) == netboot.INTRUDER_MAC
    assert netboot.intruder_address(domain) == "192.168.23.254"
    data = demo_data()
    data["hosts"]["vhost-2"]["hardware"]["nics"][0]["mac"] = netboot.INTRUDER_MAC
    data["hosts"]["vhost-2"]["address"] = "192.168.23.254"
    taken = parse_domain(data, "domain.json")
    assert netboot.intruder_mac(taken) == "52:54:00:0b:ad:02"
    assert netboot.intruder_address(taken) == "192.168.23.253"


def test_the_netboot_spec_names_what_decides_the_test() -> None:
    domain = load_domain(DEMO)
    artifact = Artifact(host="vhost-2", format=Format.netboot, system=System.x86_64_linux)
    spec = netboot.spec(artifact, domain, DEMO)
    assert spec["lan"]["provisioner"] == "vhost-dev"
    assert spec["lan"]["declared"] == ["52:54:00:23:00:10", "52:54:00:23:00:11", "52:54:00:23:00:12"]
    assert spec["hosts"]["vhost-2"]["boot"]["memory_mib"] == 1024
    data = demo_data()
    data["hosts"]["vhost-2"]["boot"]["memory_mib"] = 768
    changed = netboot.spec(artifact, parse_domain(data, "domain.json"), DEMO)
    assert changed["hosts"]["vhost-2"]["boot"]["memory_mib"] == 768
    assert netboot.fingerprint(artifact, domain, DEMO) != netboot.fingerprint(
        artifact, parse_domain(data, "domain.json"), DEMO
    )


def test_vms_on_the_lan_use_unix_sockets_only(tmp_path: Path) -> None:
    hub = tmp_path / "hub"
    booting = VmSpec(
        "nb",
        System.x86_64_linux,
        tmp_path,
        tmp_path / "log",
        firmware=Firmware.bios,
        lan=LanPort(hub, "52:54:00:23:00:12", boot=True),
    ).argv()
    text = " ".join(booting)
    # The booting NIC comes first (iPXE's net0), carries its ROM and boot index; the management NIC is restricted.
    assert f"-netdev vde,id=lan,sock={hub}" in text
    assert "virtio-net-pci,netdev=lan,mac=52:54:00:23:00:12,bootindex=1" in text
    assert text.index("netdev=lan") < text.index("netdev=net0")
    assert "user,id=net0,restrict=on" in text and "pc,accel=tcg,graphics=off" in text
    assert "tap" not in text and "bridge" not in text
    owner = VmSpec(
        "p", System.x86_64_linux, tmp_path, tmp_path / "log", lan=LanPort(hub, "52:54:00:23:00:10", owns=True)
    )
    text = " ".join(owner.argv())
    assert f"sock=hub://{hub}" in text and "mac=52:54:00:23:00:10,romfile=" in text and "graphics=off" not in text
    assert text.index("netdev=net0") < text.index("netdev=lan")
    alone = VmSpec(
        "i",
        System.x86_64_linux,
        tmp_path,
        tmp_path / "log",
        management=False,
        lan=LanPort(hub, "52:54:00:0b:ad:01", boot=True),
    )
    assert "net0" not in " ".join(alone.argv())
    plain = " ".join(VmSpec("b", System.x86_64_linux, tmp_path, tmp_path / "log").argv())
    assert "restrict" not in plain and "vde" not in plain  # a plain boot test is as it was
