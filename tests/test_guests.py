"""The demo's guests and their probes (issue [5]).

Unit tests: the stats schema against messages shaped as both reporters send them, what a probe finds wrong in a
message, the default probes a host's guests imply, the domain's addresses and DNS names.
VM tests (each on a private copy of the demo): every probe green on both images, each with its latency in the
manifest; a subscriber of our own sees the statistics message on the wire while the image runs, and it shows each
guest in its own PID namespace with its own hostname; a broken guest fails exactly the probes that need it.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path
from typing import Any

import jsonschema
import nats
import pytest
from cimtest.demo import DEMO, ROOT, DoitRunner, needs_demo
from click.testing import CliRunner

from pipeline import probes
from pipeline.boot import boot_probes, boot_spec, make_blank_disks
from pipeline.cli import cli
from pipeline.domain import Artifact, DomainError, Format, ProbeKind, System, load_domain, parse_domain
from pipeline.qemu import Vm

SCHEMA = json.loads((ROOT / "pipeline" / "schemas" / "stats.json").read_text())
# What the host's own PID namespace may hold: init, the guests' supervisors (the sh script and its unshare), the
# reporters (statistics, and the hardware report until it is acknowledged; with the subshells they fork while they
# build a message) and the short-lived tools those reporters run (nc for NATS, sleep between messages).
# The provisioner's host also mirrors its provisioner guest's log lines on the console (cim-lan watch: tail).
HOST_PROCESSES = {"init", "cim-guest", "unshare", "cim-stats", "cim-inventory", "cim-lan", "tail", "dropbear"}
REPORTERS_TOOLS = {"nc", "sleep", "timeout"}


def demo_message() -> dict[str, Any]:
    """A message as the demo's busybox reporter sends it."""
    guest = {
        "name": "nats",
        "state": "running",
        "pid": 261,
        "cpu_seconds": 1.539801,
        "memory_bytes": 3837952,
        "hostname": "nats",
        "pid_namespace": "pid:[4026532268]",
    }
    return {
        "host": "vhost-dev",
        "system": "x86_64-linux",
        "time": 1795802073,
        "uptime_s": 21.93,
        "load": [0.76, 0.18, 0.06],
        "memory": {"total_kib": 983744, "available_kib": 812300},
        "pid_namespace": "pid:[4026531836]",
        "processes": [{"pid": 1, "name": "init"}],
        "guests": [guest],
    }


def cim_message() -> dict[str, Any]:
    """A message as configs/cim's cim-stats (jq) sends it: no namespaces, a stopped guest has no PID."""
    return {
        "host": "vhost-dev",
        "system": "x86_64-linux",
        "time": 1795802634,
        "uptime_s": 123.4,
        "load": [0.1, 0.2, 0.3],
        "memory": {"total_kib": 1000, "available_kib": 500},
        "guests": [
            {"name": "nats", "state": "running", "pid": 1234, "cpu_seconds": 1.5, "memory_bytes": 52428800},
            {"name": "dns", "state": "stopped", "pid": None, "cpu_seconds": 0, "memory_bytes": 0},
        ],
    }


def test_both_reporters_messages_validate_against_the_committed_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    assert probes.stats_schema() == SCHEMA  # the packaged copy is the committed one, and `cim schema stats` prints it
    printed = CliRunner().invoke(cli, ["schema", "stats"])
    assert printed.exit_code == 0 and json.loads(printed.output) == SCHEMA
    jsonschema.validate(demo_message(), SCHEMA)
    jsonschema.validate(cim_message(), SCHEMA)


def test_stats_problems_name_what_is_wrong() -> None:
    assert probes.stats_problems(demo_message(), "vhost-dev", ["nats"]) == []
    assert probes.stats_problems(cim_message(), "vhost-dev", ["nats", "dns"]) == ["lists guest 'dns' as stopped"]
    assert probes.stats_problems(demo_message(), "vhost-pi", ["nats", "dev"]) == [
        "comes from host 'vhost-dev', not 'vhost-pi'",
        "does not list guest 'dev'",
    ]
    bad = demo_message()
    bad["guests"][0]["cpu_ns"] = 5  # the old cim reporter's field
    del bad["uptime_s"]
    problems = probes.stats_problems(bad, "vhost-dev", ["nats"])
    assert any("uptime_s" in p for p in problems) and any("cpu_ns" in p for p in problems), problems


def test_default_probes_follow_the_guests() -> None:
    demo = load_domain(DEMO)
    dev = probes.default_probes(demo, "vhost-dev", DEMO)
    assert [(p.kind.value, p.guest) for p in dev] == [
        ("console", None),
        ("dns", "dns"),
        ("nats", "nats"),
        ("stats", "nats"),
        ("ssh", "dev"),
    ]
    ssh = dev[-1]
    assert (ssh.account, ssh.key) == ("cim", "keys/demo_ed25519")
    pi = probes.default_probes(demo, "vhost-pi", DEMO)
    assert [p.kind for p in pi] == [ProbeKind.console, ProbeKind.nats, ProbeKind.stats]
    # The cim domain carries no private key: no ssh probe, whatever its guests.
    cim_dir = ROOT / "configs" / "cim"
    cim = load_domain(cim_dir)
    assert ProbeKind.ssh not in {p.kind for p in probes.default_probes(cim, "vhost-dev", cim_dir)}
    assert not list(cim_dir.rglob("*_ed25519")) and not list(cim_dir.rglob("id_*"))


def test_forwards_reach_each_guest_address() -> None:
    demo = load_domain(DEMO)
    host = demo.hosts["vhost-dev"]
    forwards = probes.forwards_for(boot_probes(demo, "vhost-dev", DEMO), host)
    assert {(f.proto, f.address, f.guest_port, f.host_port) for f in forwards} == {
        ("tcp", "10.23.0.10", 22, 0),
        ("udp", "10.23.0.11", 53, 0),
        ("tcp", "10.23.0.12", 4222, 0),
    }
    spec = boot_spec(
        Artifact(host="vhost-dev", format=Format.iso, system=System.x86_64_linux),
        host,
        Path("/x.iso"),
        Path("/w"),
        forwards,
        Path("/w/boot.log"),
    )
    netdev = spec.argv()[spec.argv().index("-netdev") + 1]
    assert "hostfwd=udp:127.0.0.1:0-10.23.0.11:53" in netdev and "hostfwd=tcp:127.0.0.1:0-10.23.0.12:4222" in netdev


def test_dns_names_are_host_dot_fqdn_and_guest_dot_host_dot_fqdn() -> None:
    records = {name: str(address) for name, address in load_domain(DEMO).records().items()}
    assert records == {
        "vhost-dev.cim.local": "192.168.23.10",
        "dev.vhost-dev.cim.local": "10.23.0.10",
        "dns.vhost-dev.cim.local": "10.23.0.11",
        "nats.vhost-dev.cim.local": "10.23.0.12",
        "pxe.vhost-dev.cim.local": "192.168.23.2",
        "vhost-pi.cim.local": "192.168.23.11",
        "nats.vhost-pi.cim.local": "10.23.1.10",
        "vhost-2.cim.local": "192.168.23.12",
        "nats.vhost-2.cim.local": "10.23.2.10",
    }


@pytest.mark.parametrize(
    ("change", "expect"),
    [
        (
            lambda d: d["hosts"]["vhost-pi"].__setitem__("address", "192.168.23.10"),
            "vhost-dev and vhost-pi both have address 192.168.23.10",
        ),
        (lambda d: d["hosts"]["vhost-dev"]["guests"][2].__setitem__("address", "10.23.9.10"), "outside 10.23.0.0/24"),
        (lambda d: d["hosts"]["vhost-dev"]["guests"][0].__setitem__("address", "10.23.0.1"), ".1 (the host's bridge)"),
        (lambda d: d["hosts"]["vhost-dev"]["guests"][0].__setitem__("name", "developments"), "longer than 11"),
        (lambda d: d["hosts"]["vhost-dev"]["guests"][0].pop("address"), "guests.0.address' is required"),
        (
            lambda d: d["hosts"]["vhost-dev"]["boot"].__setitem__("probes", [{"kind": "nats", "guest": "mq"}]),
            "names guest 'mq'",
        ),
    ],
)
def test_bad_addresses_and_probe_guests_are_refused(change: Any, expect: str) -> None:
    data = json.loads((DEMO / "domain.json").read_text())
    change(data)
    with pytest.raises(DomainError) as err:
        parse_domain(data, "domain.json")
    assert expect in str(err.value)


# -- VM tests ---------------------------------------------------------------------------------------------------------


def boot_record(artifacts: Path, artifact: str) -> dict[str, Any]:
    record: dict[str, Any] = json.loads((artifacts / "manifest.json").read_text())["artifacts"][artifact]["boot"]
    return record


def guest_lines(console: str) -> dict[str, tuple[str, str]]:
    """Each guest's own line on the console: name → (its PID namespace, its hostname), printed as its PID 1."""
    found = re.findall(r"cim: guest (\S+): pid 1 of its own namespace (pid:\[\d+\]), hostname (\S+),", console)
    return {name: (ns, hostname) for name, ns, hostname in found}


@pytest.mark.nix
@pytest.mark.vm
@needs_demo
@pytest.mark.parametrize(
    ("artifact", "expect"),
    [
        (
            "vhost-dev-iso",
            {"console": None, "dns": "dns", "nats": "nats", "stats": "nats", "ssh": "dev", "inventory": "nats"},
        ),
        ("vhost-pi-sd", {"console": None, "nats": "nats", "stats": "nats", "inventory": "nats"}),
    ],
)
def test_every_probe_green_with_its_latency(
    demo_domain: Path, artifacts_dir: Path, doit: DoitRunner, artifact: str, expect: dict[str, str | None]
) -> None:
    doit(demo_domain, f"boot:{artifact}", check=True)
    record = boot_record(artifacts_dir, artifact)
    assert record["result"] == "pass"
    assert {p["probe"]: p.get("guest") for p in record["probes"]} == expect  # None fields are left out
    for result in record["probes"]:
        assert result["ok"] and result["seconds"] > 0, result
        assert ("port" not in result) == (result["probe"] == "console"), result
    console = (artifacts_dir / artifact / "boot.log").read_text(errors="replace")
    guests = guest_lines(console)
    # vhost-dev also runs the LAN's provisioner guest, which no boot probe talks to (its test is the netboot's).
    assert set(guests) == {g for g in expect.values() if g} | ({"pxe"} if artifact == "vhost-dev-iso" else set())
    assert all(hostname == name for name, (_ns, hostname) in guests.items())
    assert len({ns for ns, _ in guests.values()}) == len(guests), "each guest has a PID namespace of its own"


def build_image(demo: Path, doit: DoitRunner, artifacts: Path, artifact: str) -> Path:
    doit(demo, f"build:{artifact}", check=True)
    record = json.loads((artifacts / "manifest.json").read_text())["artifacts"][artifact]
    return artifacts / record["file"]


async def next_message(port: int, subject: str, timeout: float) -> tuple[bytes, float]:
    """The next message on `subject` through the VM's forwarded NATS port, retrying the connection meanwhile."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            nc = await nats.connect(
                f"nats://127.0.0.1:{port}", connect_timeout=2, allow_reconnect=False, max_reconnect_attempts=0
            )
            break
        except Exception:  # the nats guest is not up yet
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)
    try:
        sub = await nc.subscribe(subject)
        msg = await sub.next_msg(timeout=max(1.0, deadline - time.monotonic()))
        return msg.data, time.monotonic()
    finally:
        await nc.close()


@pytest.mark.nix
@pytest.mark.vm
@needs_demo
def test_stats_on_the_wire_show_isolated_guests(
    demo_domain: Path, artifacts_dir: Path, doit: DoitRunner, tmp_path: Path
) -> None:
    """Our own nats-py subscriber, while the image runs: the message validates against the committed schema and
    shows every guest running in its own PID namespace under its own hostname, and a host that runs only init, the
    guests' supervisors and the reporter."""
    image = build_image(demo_domain, doit, artifacts_dir, "vhost-dev-iso")
    domain = load_domain(demo_domain)
    host = domain.hosts["vhost-dev"]
    nats_probe = next(p for p in boot_probes(domain, "vhost-dev", demo_domain) if p.kind is ProbeKind.stats)
    forward = probes.probe_forward(nats_probe, host)
    assert forward is not None
    spec = boot_spec(
        Artifact(host="vhost-dev", format=Format.iso, system=System.x86_64_linux),
        host,
        image,
        tmp_path / "vm",
        (forward,),
        tmp_path / "boot.log",
    )
    make_blank_disks(host, tmp_path / "vm")  # the declared disks the boot VM carries beside the ISO
    with Vm(spec) as vm:
        port = vm.forwarded_ports()[forward]
        vm.wait_for_console(probes.boot_complete_pattern("vhost-dev"), 240)
        first, first_at = asyncio.run(next_message(port, "cim.vhost-dev.stats", 90))
        second, second_at = asyncio.run(next_message(port, "cim.vhost-dev.stats", 30))
        console = vm.console
    for raw in (first, second):
        jsonschema.validate(json.loads(raw), SCHEMA)
    message = json.loads(second)
    assert message["host"] == "vhost-dev"
    assert [g["name"] for g in message["guests"]] == ["dev", "dns", "nats", "pxe"]
    namespaces = {message["pid_namespace"]}
    for guest in message["guests"]:
        assert guest["state"] == "running" and guest["hostname"] == guest["name"], guest
        assert guest["pid"] > 1 and guest["memory_bytes"] > 0 and guest["cpu_seconds"] > 0, guest
        namespaces.add(guest["pid_namespace"])
    assert len(namespaces) == 5, f"host and four guests, each its own PID namespace: {namespaces}"
    names = {p["name"] for p in message["processes"]} - REPORTERS_TOOLS
    assert names <= HOST_PROCESSES and {"init", "cim-guest", "unshare", "cim-stats"} <= names, message["processes"]
    # The console says the same: each guest's PID 1 named its own namespace and hostname.
    lines = guest_lines(console)
    assert {name: ns for name, (ns, _) in lines.items()} == {g["name"]: g["pid_namespace"] for g in message["guests"]}
    assert second_at - first_at < 3 * host.stats_interval_s + 5, "one message per interval"


@pytest.mark.nix
@pytest.mark.vm
@needs_demo
def test_a_broken_guest_fails_exactly_its_probes(demo_domain: Path, artifacts_dir: Path, doit: DoitRunner) -> None:
    """dnsmasq refuses to start in this copy: dns (it answers nothing) and stats (it lists dns stopped) fail and
    name the guest; console, nats and ssh still pass and report."""
    builder = demo_domain / "builders" / "guest.sh"
    text = builder.read_text()
    assert "--local=/#/" in text
    builder.write_text(text.replace("--local=/#/", "--local=/#/ --no-such-dnsmasq-option", 1))
    proc = doit(demo_domain, "boot:vhost-dev-iso")
    assert proc.returncode != 0
    record = boot_record(artifacts_dir, "vhost-dev-iso")
    assert record["result"] == "fail"
    results = {p["probe"]: p for p in record["probes"]}
    assert set(results) == {"console", "dns", "nats", "stats", "ssh", "inventory"}, "every probe reports"
    assert {name for name, r in results.items() if not r["ok"]} == {"dns", "stats"}
    dns = results["dns"]
    assert dns["guest"] == "dns" and "guest dns" in dns["detail"] and "10.23.0.11:53/udp" in dns["detail"]
    assert f"127.0.0.1:{dns['port']}" in dns["detail"]
    assert "lists guest 'dns' as stopped" in results["stats"]["detail"]
    # The failure names the probes, the guest and the port, and shows the last console lines.
    assert "probe dns (guest dns at 10.23.0.11:53/udp" in proc.stderr + proc.stdout
    assert "cim: guest dns stopped" in (artifacts_dir / "vhost-dev-iso" / "boot.log").read_text(errors="replace")
    assert "Traceback" not in proc.stderr
