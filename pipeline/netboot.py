"""The netboot test of one host: `boot:<host>-netboot`.

Three VMs on one private LAN, QEMU's own VDE hub on a unix socket (no tap device, no bridge, no address or route on
this machine; the hub lives in the provisioner's QEMU and dies with it):
  provisioner  the provisioner host's ISO, booted as in its own boot test, with a second NIC on the LAN carrying its
               declared MAC; its provisioner guest leases to declared MACs only and serves the netboot images
  host         the netboot host's declared MAC, memory and CPUs, no disk: its firmware (OVMF for a UEFI host,
               SeaBIOS for a BIOS one) runs the NIC's iPXE ROM, which
               takes its lease, fetches the iPXE script, the kernel and the initrd, and boots them; its probes then
               reach its guests through a second, management NIC (QEMU user networking, `restrict=on`, forwards from
               127.0.0.1), never through the LAN
  intruder     an undeclared MAC on the same LAN: its iPXE must get no lease; then, in its shell, with a static
               address in the LAN, no answer from the provisioner's DHCP, DNS or NATS, and the provisioner's console
               must name its MAC as refused
Every console is kept: artifacts/<host>-netboot/boot.log, provisioner.log, intruder.log.  No doit here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import json
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pipeline import boot, probes
from pipeline.artifacts import (
    BootResult,
    IntruderCheck,
    NetbootFacts,
    NetbootFetch,
    NetbootLease,
    ProbeResult,
    publish_log,
    utc_now,
)
from pipeline.domain import Accel, Artifact, Domain, Format, GuestKind, Host
from pipeline.errors import CimError
from pipeline.hashing import xxh3_text
from pipeline.inventory import boot_machine
from pipeline.log import say, step
from pipeline.qemu import Drive, Firmware, Forward, LanPort, Vm, VmError, VmSpec, choose_accel

# The intruder's MAC: QEMU's prefix, a host part no demo declares; the next free one if a domain declares it.
INTRUDER_MAC = "52:54:00:0b:ad:01"
INTRUDER_MEMORY_MIB = 256
PROVISIONER_READY = r"^cim-lan: provisioner on lan0 .*$"
# Netboot stage 1 (configs/demo/netboot/init) says each file of the system it fetched.
# A booted system's own lease line (sbin/cim-lan-lease), a whole line.
SYSTEM_LEASE = r"^cim-lan: (lease|no lease)[^\n]*\r?\n"
FETCHED = r"^cim netboot: fetched (\S+) \((\d+) bytes in ([\d.]+) s\)"
# iPXE's words (the Debian ipxe-qemu ROM, 1.0.0+git-20190125) on the serial console.
IPXE_SHELL_PROMPT = "Press Ctrl-B for the iPXE command line"
IPXE_PROMPT = "iPXE> "
IPXE_NO_LEASE = "No configuration methods"
IPXE_TIMED_OUT = "Connection timed out"
IPXE_WAIT_S = 90.0  # one iPXE command: its DHCP gives up after about 35 s, a TCP connection after about 20 s
MACHINE_WAIT_S = 3600.0  # the longest a test waits for another's machine with the same MAC to leave the LAN


# The provisioners this process runs, by image: the one place a VM outlives a task (see ProvisionerLan.shared).
_RUNNING: dict[str, ProvisionerLan] = {}
_RUNNING_LOCK = threading.Lock()


class NetbootFailed(VmError):
    """The netboot test ran and something on the LAN was not as it must be; the record says what."""


def intruder_mac(domain: Domain) -> str:
    """A MAC no host of the domain declares (the intruder's)."""
    declared = {nic.mac for host in domain.hosts.values() for nic in host.hardware.nics}
    base = int(INTRUDER_MAC.replace(":", ""), 16)
    for offset in range(256):
        text = f"{base + offset:012x}"
        mac = ":".join(text[i : i + 2] for i in range(0, 12, 2))
        if mac not in declared:
            return mac
    raise CimError("no free intruder MAC in 52:54:00:0b:ad:01 to 52:54:00:0b:ae:00: the domain declares them all")


def intruder_address(domain: Domain) -> str:
    """A static address in the provisioner's LAN that no host or guest of the domain has."""
    assert domain.provisioner is not None
    lan = ipaddress.IPv4Network(f"{domain.hosts[domain.provisioner].address}/24", strict=False)
    taken = set(domain.records().values())
    return str(next(a for a in reversed(list(lan.hosts())) if a not in taken))


def provisioner_artifact(domain: Domain) -> Artifact:
    assert domain.provisioner is not None
    host = domain.hosts[domain.provisioner]
    return Artifact(host=domain.provisioner, format=Format.iso, system=host.system)


def spec(artifact: Artifact, domain: Domain, domain_dir: Path) -> dict[str, Any]:
    """What, besides the two images, decides a netboot test: the host's VM and probes (as its boot spec), the
    provisioner's VM, and the LAN (who is declared, the intruder's MAC and address)."""
    assert domain.provisioner is not None
    prov = domain.hosts[domain.provisioner]
    prov_machine = boot_machine(prov)
    host_spec = boot.spec(artifact, domain, domain_dir)
    host_spec["hosts"][domain.provisioner] = {
        "boot": {"memory_mib": prov_machine.memory_mib, "cpus": prov_machine.cpus},
        "hardware": {"nics": [n.model_dump(mode="json") for n in prov.hardware.nics]},
    }
    host_spec["lan"] = {
        "provisioner": domain.provisioner,
        "declared": sorted(nic.mac for h in domain.hosts.values() for nic in h.hardware.nics),
        "intruder": {"mac": intruder_mac(domain), "address": intruder_address(domain)},
    }
    return host_spec


def fingerprint(artifact: Artifact, domain: Domain, domain_dir: Path) -> str:
    """The spec as one digest: a pass with the same images and fingerprint is reused without a VM."""
    return xxh3_text(json.dumps(spec(artifact, domain, domain_dir), sort_keys=True))


@dataclasses.dataclass(frozen=True)
class LanRun:
    """What a test on the LAN is handed: the domain, the netboot image's published files (by hydra product type:
    kernel, initrd, ipxe) and digest, the provisioner's ISO and digest, where its VMs work and where their consoles
    are published (key -> path, and the name the record gives each)."""

    domain: Domain
    domain_dir: Path
    files: dict[str, Path]
    image_xxh3: str
    provisioner_image: Path
    provisioner_xxh3: str
    workdir: Path
    logs: dict[str, Path]
    log_names: dict[str, str]
    machine_state: Path

    @property
    def both_xxh3(self) -> str:
        """The digest a pass is kept by: both images' bytes (the netboot image and the provisioner that served it)."""
        return xxh3_text(f"{self.image_xxh3} {self.provisioner_xxh3}")

    def lan(self, name: str) -> contextlib.AbstractContextManager[ProvisionerLan]:
        """The provisioner's LAN, booted by the first test of the run that needs it."""
        return ProvisionerLan.shared(
            self.domain, self.provisioner_image, self.provisioner_xxh3, self.machine_state, name
        )


class ProvisionerLan:
    """The provisioner's VM and the LAN it owns (a VDE hub inside its QEMU), shared by every test of one run that
    needs the same provisioner image: the first to ask boots it, the last to leave stops it.  doit's workers are
    threads of one process, so `doit -n 2 install` installs two machines from the one provisioner."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.users = 0
        self.ready = threading.Lock()
        self.vm: Vm | None = None
        self.lan_dir = Path(tempfile.mkdtemp(prefix="cim-lan-"))  # short: a unix socket path holds ~107 bytes
        self.accel: Accel = "tcg"
        self.why = ""
        self.nats_port: int | None = None
        self.macs: dict[str, threading.Lock] = {}

    @property
    def hub(self) -> Path:
        return self.lan_dir / "hub"

    @classmethod
    @contextlib.contextmanager
    def shared(
        cls, domain: Domain, image: Path, image_xxh3: str, machine_state: Path, name: str
    ) -> Iterator[ProvisionerLan]:
        key = f"{image}:{image_xxh3}"
        with _RUNNING_LOCK:
            lan = _RUNNING.get(key) or _RUNNING.setdefault(key, ProvisionerLan(key))
            lan.users += 1
        try:
            with lan.ready:
                if lan.vm is None or not lan.vm.running:
                    lan._start(domain, image, machine_state, name)
            yield lan
        finally:
            with _RUNNING_LOCK:
                lan.users -= 1
                last = lan.users == 0
                if last:
                    del _RUNNING[key]
            if last:
                if lan.vm is not None:
                    lan.vm.stop()
                shutil.rmtree(lan.lan_dir, ignore_errors=True)

    def _start(self, domain: Domain, image: Path, machine_state: Path, name: str) -> None:
        assert domain.provisioner is not None
        prov = domain.hosts[domain.provisioner]
        machine = boot_machine(prov)
        assert prov.lan_mac is not None
        nats = next((g for g in prov.guests if g.kind is GuestKind.nats), None)
        report = (Forward("tcp", probes.PORTS.nats, str(nats.address)),) if nats is not None else ()
        # Its own work dir, beside the hub: it outlives the test that booted it (another may still be using it),
        # and each test publishes a copy of its console.
        spec = VmSpec(
            name=f"{domain.provisioner}-provisioner",
            system=prov.system,
            workdir=self.lan_dir / "provisioner",
            console_log=self.lan_dir / "provisioner.log",
            memory_mib=machine.memory_mib,
            cpus=machine.cpus,
            firmware=Firmware.bios,
            boot_order="d",
            drives=(Drive(image, media="cdrom"),),
            port_forwards=report,
            lan=LanPort(self.hub, prov.lan_mac, owns=True),
        )
        # The KVM canary (when this machine boot has no verdict yet) boots the provisioner's ISO off the LAN: a
        # hub it made would stand in the real one's way.
        accel, self.why = choose_accel(dataclasses.replace(spec, lan=None, port_forwards=()), machine_state)
        self.accel = accel
        say(name, f"LAN: a VDE hub on {self.hub} (unix sockets only); VMs under {accel}: {self.why}")
        self.vm = Vm(dataclasses.replace(spec, accel=accel))
        self.vm.start()
        timeout = prov.boot.timeout_s
        with step(name, f"provisioner {domain.provisioner} up on the LAN"):
            self.vm.wait_for_console(PROVISIONER_READY, timeout, "the provisioner's LAN line")
            self.vm.wait_for_console(probes.boot_complete_pattern(domain.provisioner), timeout, "its boot-complete")
        if report:
            self.nats_port = self.vm.forwarded_ports()[report[0]]

    @contextlib.contextmanager
    def machine(self, mac: str, name: str) -> Iterator[None]:
        """While a test has a machine with `mac` on this LAN, no other test puts one there: one MAC, one machine (a
        netboot test and an install of the same host, run side by side, take turns)."""
        with _RUNNING_LOCK:
            lock = self.macs.setdefault(mac, threading.Lock())
        if not lock.acquire(blocking=False):
            say(name, f"waiting for the LAN: another test has the machine with {mac} on it")
            if not lock.acquire(timeout=MACHINE_WAIT_S):
                raise NetbootFailed(f"{name}: the machine with {mac} stayed on the LAN for {MACHINE_WAIT_S:g} s")
        try:
            yield
        finally:
            lock.release()

    def publish_log(self, dest: Path) -> None:
        if self.vm is not None:
            publish_log(self.vm.spec.console_log, dest)


def lan_machine(name: str, host: Host, mac: str, hub: Path, workdir: Path, published: Path, **more: Any) -> VmSpec:
    """A machine on the LAN that boots from it (its NIC's iPXE ROM), with the host's memory and CPUs, under the
    host's firmware (`firmware=` to choose): OVMF runs the ROM's EFI iPXE, SeaBIOS its BIOS one."""
    machine = boot_machine(host)
    firmware = more.pop("firmware", Firmware.uefi if host.hardware.firmware == "uefi" else Firmware.bios)
    return VmSpec(
        name=name,
        system=host.system,
        workdir=workdir,
        console_log=workdir / "console.log",
        memory_mib=more.pop("memory_mib", machine.memory_mib),
        cpus=machine.cpus,
        firmware=firmware,
        published_log=published,
        lan=LanPort(hub, mac, boot=True, bootindex=more.pop("bootindex", 1)),
        **more,
    )


def netboot_test(artifact: Artifact, run: LanRun, record: Callable[[BootResult], None]) -> BootResult:
    """Boot the provisioner, then the host from the LAN and the intruder beside it; the host's probes; `record`
    gets the result (pass or fail) before this returns or raises."""
    name = artifact.name
    domain, domain_dir, files, workdir, logs, log_names = (
        run.domain,
        run.domain_dir,
        run.files,
        run.workdir,
        run.logs,
        run.log_names,
    )
    host = domain.hosts[artifact.host]
    declared = boot.boot_probes(domain, artifact.host, domain_dir)
    consoles = [p for p in declared if p.kind.value == "console"]
    services = [p for p in declared if p.kind.value != "console"]
    forwards = probes.forwards_for(consoles + services, host)
    started = time.monotonic()
    results: list[ProbeResult] = []
    facts: NetbootFacts | None = None
    error: str | None = None
    accel: Accel = "tcg"
    specs: dict[str, VmSpec] = {}
    lan: ProvisionerLan | None = None
    try:
        assert host.lan_mac is not None
        intruder_at = intruder_mac(domain)
        with run.lan(name) as lan, lan.machine(host.lan_mac, name), lan.machine(intruder_at, name):
            started = time.monotonic()  # deadlines count from here, not from a wait for the LAN
            accel = lan.accel
            specs["host"] = lan_machine(
                f"{name}-boot", host, host.lan_mac, lan.hub, workdir / "host", logs["host"], port_forwards=forwards
            )
            specs["intruder"] = lan_machine(
                f"{name}-intruder",
                host,
                intruder_at,
                lan.hub,
                workdir / "intruder",
                logs["intruder"],
                management=False,
                memory_mib=INTRUDER_MEMORY_MIB,
                firmware=Firmware.bios,  # an undeclared machine: its iPXE shell is typed into under SeaBIOS
            )
            specs = {k: dataclasses.replace(v, accel=accel) for k, v in specs.items()}
            with Vm(specs["host"]) as host_vm, Vm(specs["intruder"]) as intruder_vm, ThreadPoolExecutor(2) as pool:
                intruder_future = pool.submit(_intruder, intruder_vm, domain, name, started)
                lease, fetches, os_lease = _watch_netboot(host_vm, domain, artifact.host, files, started, name)
                results.append(_lease_probe(lease))
                ports = host_vm.forwarded_ports()
                ctx = probes.ProbeContext(domain=domain, host_name=artifact.host, domain_dir=domain_dir, ports=ports)
                results += boot.run_probes(host_vm, ctx, consoles, services, started + host.boot.timeout_s, name)
                intruder = intruder_future.result()
            assert lan.vm is not None
            intruder = _refusals(lan.vm, intruder)
            facts = NetbootFacts(
                provisioner=provisioner_artifact(domain).name,
                provisioner_xxh3=run.provisioner_xxh3,
                provisioner_log=log_names["provisioner"],
                lease=lease,
                fetches=fetches,
                os_lease=os_lease,
                provisioner_lines=_provisioner_lines(lan.vm, host.lan_mac),
                intruder=intruder.model_copy(update={"log": log_names["intruder"]}),
            )
            results.append(_intruder_probe(intruder))
            lan.publish_log(logs["provisioner"])
        failed = [r for r in results if not r.ok]
        if failed:
            error = f"{name}: {len(failed)} of {len(results)} check(s) failed: " + "; ".join(r.detail for r in failed)
            raise NetbootFailed(
                f"{error}. Console logs: {logs['host']}, {logs['provisioner']}, {logs['intruder']}.",
                hint="The record (cim status / manifest.json) holds the lease, the fetches and the intruder's checks.",
            )
    except CimError as exc:
        error = error or str(exc).splitlines()[0]
        raise
    finally:
        outcome = BootResult(
            result="fail" if error is not None else "pass",
            accel=accel,
            log=log_names["host"],
            image_xxh3=run.image_xxh3,
            seconds=round(time.monotonic() - started, 1),
            probes=results,
            planned=["lease", *map(probes.label, consoles + services), "intruder"],
            error=error,
            at=utc_now(),
            fingerprint=fingerprint(artifact, domain, domain_dir),
            netboot=facts,
        )
        for key in ("host", "intruder"):
            if key in specs:
                publish_log(specs[key].console_log, logs[key])
        if lan is not None and not logs["provisioner"].exists():
            lan.publish_log(logs["provisioner"])
        record(outcome)
    shutil.rmtree(workdir, ignore_errors=True)
    say(name, f"netboot test passed in {outcome.seconds} s; console logs {logs['host']}, {logs['provisioner']}")
    return outcome


def watch_firmware(
    vm: Vm, domain: Domain, host_name: str, files: dict[str, Path], started: float, name: str, timeout: float
) -> tuple[NetbootLease, list[NetbootFetch], int]:
    """The machine's firmware (the NIC's iPXE ROM) takes its lease and fetches the script, the kernel and the
    initrd, each timed as it shows on the console; the console offset after the last fetch."""
    host = domain.hosts[host_name]
    mac = host.lan_mac or ""
    deadline = started + timeout

    def left() -> float:
        return max(1.0, deadline - time.monotonic())

    configured = vm.wait_for_console(
        rf"Configuring \(net0 {re.escape(mac)}\)[.\s]*(ok|{IPXE_NO_LEASE}[^\n]*)", left(), "its lease (iPXE DHCP)"
    )
    if not configured.group(1).startswith("ok"):
        raise NetbootFailed(
            f"{name}: the machine's NIC ({mac}) got no lease from the provisioner: iPXE said "
            f"{configured.group(1).strip()!r}. Check that the provisioner's guest runs (its console log) and that "
            "domain.json declares this MAC.",
        )
    address = vm.wait_for_console(r"net0: (\d+\.\d+\.\d+\.\d+)/", left(), "its address", configured.end())
    # Whole lines only: the console is read as QEMU writes it, a line may still be on its way.
    server = vm.wait_for_console(r"Next server: (\S+)\r?\n", left(), "the next server", address.end())
    bootfile = vm.wait_for_console(r"Filename: (\S+)\r?\n", left(), "the boot file", server.end())
    lease = NetbootLease(
        mac=mac,
        address=address.group(1),
        server=server.group(1),
        bootfile=bootfile.group(1),
        seconds=round(time.monotonic() - started, 1),
    )
    say(name, f"lease: {lease.address} for {mac} from {lease.server}; boot file {lease.bootfile}")
    fetches: list[NetbootFetch] = []
    last, mark = time.monotonic(), bootfile.end()
    sizes = {p.name: p.stat().st_size for p in files.values()}
    for wanted in (Path(lease.bootfile or "").name, files["kernel"].name, files["initrd"].name):
        got = vm.wait_for_console(
            rf"(\S*{re.escape(wanted)})\.\.\.[^\n]*?\b(ok|failed|error)\b", left(), f"{wanted}", mark
        )
        if got.group(2) != "ok":
            raise NetbootFailed(f"{name}: fetching {got.group(1)} from the provisioner failed: {got.group(0)!r}")
        now = time.monotonic()
        fetches.append(NetbootFetch(url=got.group(1), size=sizes.get(wanted), seconds=round(now - last, 2)))
        say(name, f"fetched {got.group(1)} ({sizes.get(wanted, '?')} bytes) in {now - last:.1f} s")
        last, mark = now, got.end()
    return lease, fetches, mark


def _watch_netboot(
    vm: Vm, domain: Domain, host_name: str, files: dict[str, Path], started: float, name: str
) -> tuple[NetbootLease, list[NetbootFetch], str | None]:
    """The firmware's lease and fetches, then stage 1's fetch of the system, then the system's own lease."""
    timeout = domain.hosts[host_name].boot.timeout_s
    lease, fetches, mark = watch_firmware(vm, domain, host_name, files, started, name, timeout)

    def left() -> float:
        return max(1.0, started + timeout - time.monotonic())

    # The demo's stage 1 fetches the system over HTTP and says so (its netboot initrd does not hold the system); a
    # NixOS netboot initrd carries its store and goes straight on to the system's own lease.
    os_lease_re = SYSTEM_LEASE
    found = vm.wait_for_console(f"{FETCHED}|{os_lease_re}", left(), "the system (its fetch, or its lease)", mark)
    system = re.match(FETCHED, found.group(0))
    if system:
        fetches.append(NetbootFetch(url=system.group(1), size=int(system.group(2)), seconds=float(system.group(3))))
        say(name, f"stage 1 fetched {system.group(1)} ({system.group(2)} bytes) in {system.group(3)} s")
        found = vm.wait_for_console(os_lease_re, left(), "the system's own lease", found.end())
    os_lease = found
    return lease, fetches, os_lease.group(0).strip()


def _lease_probe(lease: NetbootLease) -> ProbeResult:
    return ProbeResult(
        probe="lease",
        ok=lease.address is not None,
        seconds=lease.seconds,
        detail=f"lease {lease.address} for {lease.mac} from {lease.server}, boot file {lease.bootfile}",
    )


def _ipxe(vm: Vm, command: str, timeout: float = IPXE_WAIT_S) -> str:
    """Run one command in iPXE's shell; what it printed before the next prompt."""
    mark = len(vm.console)
    vm.type_text(command)
    vm.type_text("\r")
    prompt = vm.wait_for_console(re.escape(IPXE_PROMPT), timeout, f"iPXE's prompt after {command!r}", mark)
    said = re.sub(r"\s+", " ", re.sub(r"[\x08\r]", "", vm.console[mark : prompt.start()])).strip()
    said = said.removeprefix(command).strip()
    # iPXE's verdict is the last sentence: "… ok", or an error with its ipxe.org code ("Connection timed out (…)").
    verdict = re.search(r"(?:\.\.\. ?ok|[A-Z][A-Za-z ]+ \(http://ipxe\. ?org/ ?[0-9a-f]+\))$", said)
    return verdict.group(0).replace(". org", ".org").replace("org/ ", "org/") if verdict else said[-200:]


def _intruder(vm: Vm, domain: Domain, name: str, started: float) -> IntruderCheck:
    """The undeclared machine: a DHCP attempt, then a static address in the LAN and the provisioner's DNS and
    NATS asked for an answer, from iPXE's own shell (the firmware every netboot machine has)."""
    assert domain.provisioner is not None
    prov = domain.hosts[domain.provisioner]
    pxe = prov.provisioner_guest
    nats = next((g for g in prov.guests if g.kind is GuestKind.nats), None)
    assert pxe is not None
    mac, address = vm.spec.lan.mac if vm.spec.lan else "", intruder_address(domain)
    answered: dict[str, bool] = {}
    details: dict[str, str] = {}
    with step(name, f"intruder {mac} ({address}) on the LAN"):
        vm.wait_for_console(re.escape(IPXE_SHELL_PROMPT), IPXE_WAIT_S, "iPXE's Ctrl-B prompt")
        vm.type_text("\x02")
        vm.wait_for_console(re.escape(IPXE_PROMPT), 30, "iPXE's shell")
        said = _ipxe(vm, "dhcp")
        lease = IPXE_NO_LEASE not in said
        answered["dhcp"], details["dhcp"] = lease, said
        say(name, f"intruder: dhcp: {said}")
        for command in (
            f"set net0/ip {address}",
            "set net0/netmask 255.255.255.0",
            f"set net0/gateway {prov.address}",
            f"set dns {pxe.address}",
            "ifopen net0",
        ):
            _ipxe(vm, command, 30)
        # DNS: a name of the domain, asked of the provisioner's resolver; NATS: the provisioner host's nats guest
        # through its LAN address.  iPXE's "Connection timed out" is no answer; anything else is one.
        asks = {"dns": f"imgfetch http://{domain.provisioner}.{domain.fqdn}/"}
        if nats is not None:
            asks["nats"] = f"imgfetch http://{nats.address}:{probes.PORTS.nats}/"
        for service, command in asks.items():
            said = _ipxe(vm, command)
            answered[service], details[service] = IPXE_TIMED_OUT not in said, said
            say(name, f"intruder: {service}: {said}")
    return IntruderCheck(
        mac=mac,
        address=address,
        lease=lease,
        answered=answered,
        details=details,
        seconds=round(time.monotonic() - started, 1),
    )


def _refusals(vm: Vm, intruder: IntruderCheck) -> IntruderCheck:
    """Whether the provisioner's console names the intruder's MAC as refused (its netdev filter's log)."""
    logged = any(
        intruder.mac in line for line in vm.console.splitlines() if "cim-lan: refused" in line and "MAC=" in line
    )
    return intruder.model_copy(update={"refused_logged": logged})


def _provisioner_lines(vm: Vm, mac: str) -> list[str]:
    """The provisioner's DHCP and HTTP lines for this host (its lease, its fetches), as its console shows them."""
    out = []
    for line in vm.console.replace("\r", "").splitlines():
        if line.startswith("cim-lan: ") and (mac in line or "url:" in line):
            out.append(line.strip())
    return out[:40]


def _intruder_probe(intruder: IntruderCheck) -> ProbeResult:
    got = [s for s, ok in intruder.answered.items() if ok]
    problems = [f"it got an answer from {', '.join(got)}"] if got else []
    if not intruder.refused_logged:
        problems.append("the provisioner's console does not name its MAC as refused")
    detail = (
        f"intruder {intruder.mac} at {intruder.address}: no lease, no answer from "
        f"{', '.join(intruder.answered)}; the provisioner logged it as refused"
        if not problems
        else f"intruder {intruder.mac} was not kept out: " + "; ".join(problems)
    )
    return ProbeResult(probe="intruder", ok=not problems, seconds=intruder.seconds, detail=detail)
