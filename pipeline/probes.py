"""Probes run against a booted VM: a console pattern, a TCP port, a DNS answer, a NATS round-trip.

Each probe has a deadline and retries until it; the last failure is what the error reports.
"""

from __future__ import annotations

import asyncio
import re
import socket
import struct
import time
from collections.abc import Callable

from pipeline.artifacts import ProbeResult
from pipeline.domain import GuestKind, Host, Probe, ProbeKind
from pipeline.log import progress
from pipeline.qemu import Vm, VmError


class ProbeFailed(VmError):
    pass


def boot_complete_pattern(host: str) -> str:
    """The line every image of ours prints when it has booted (demo rcS, cim's cim-boot-complete unit)."""
    return rf"cim: {re.escape(host)} boot complete"


def default_probes(host_name: str, host: Host) -> list[Probe]:
    """The boot-complete line, then the host's guests that answer on the network."""
    probes = [Probe(kind=ProbeKind.console, pattern=boot_complete_pattern(host_name))]
    if any(g.kind is GuestKind.nats for g in host.guests):
        probes.append(Probe(kind=ProbeKind.nats, port=4222))
    return probes


def label(probe: Probe) -> str:
    """A probe's name in records and junit.xml: its kind, and its port or DNS name when there may be several."""
    if probe.kind is ProbeKind.tcp:
        return f"tcp {probe.port}"
    if probe.kind is ProbeKind.dns:
        return f"dns {probe.name}"
    return probe.kind.value


def guest_ports(probes: list[Probe]) -> set[int]:
    """Guest ports the probes need forwarded to the host."""
    ports = set()
    for probe in probes:
        if probe.kind is ProbeKind.tcp and probe.port:
            ports.add(probe.port)
        elif probe.kind is ProbeKind.nats:
            ports.add(probe.port or 4222)
        elif probe.kind is ProbeKind.dns:
            ports.add(probe.port or 53)
    return ports


def retry(what: str, attempt: Callable[[], str], timeout: float, interval: float = 0.5) -> str:
    """Call `attempt` until it returns (its detail) or the deadline passes; the last error is reported."""
    deadline = time.monotonic() + timeout
    last = "never tried"
    while True:
        try:
            return attempt()
        except Exception as exc:  # any failure is retried until the deadline; the last one is reported
            last = f"{type(exc).__name__}: {exc}"
        if time.monotonic() > deadline:
            raise ProbeFailed(f"{what} did not succeed within {timeout:g} s; last error: {last}")
        time.sleep(interval)


def tcp_connect(port: int) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=3) as sock:
        sock.settimeout(3)
        banner = sock.recv(64)
        if not banner:
            raise ProbeFailed("connection closed before any byte (port forward up, guest service not)")
    return f"port answered: {banner[:40]!r}"


def nats_round_trip(port: int, subject: str) -> str:
    """Publish and receive one message through the guest's nats-server with the official client."""
    import nats  # nats-py

    async def quiet(_exc: Exception) -> None:
        """Connection errors are retried by `retry`, which reports the last one; nats-py would log each."""

    async def go() -> str:
        nc = await nats.connect(f"nats://127.0.0.1:{port}", connect_timeout=3, max_reconnect_attempts=0,
                                allow_reconnect=False, error_cb=quiet)
        try:
            sub = await nc.subscribe(subject)
            await nc.publish(subject, b"cim-probe")
            msg = await sub.next_msg(timeout=3)
            return f"round-trip on {subject}: {msg.data.decode()} (server {nc.connected_server_version})"
        finally:
            await nc.close()

    return asyncio.run(go())


def inventory_subject(host: str) -> str:
    """Where a host publishes its hardware report (DESIGN: `cim.<host>.inventory`); the ack subject adds `.ack`."""
    return f"cim.{host}.inventory"


def receive_inventory(port: int, host: str, wait: float) -> bytes:
    """Wait up to `wait` s for the host's hardware report on NATS, then acknowledge it so the host stops re-publishing.

    Core NATS keeps nothing: the host re-publishes every few seconds until this acknowledgement arrives.
    """
    import nats  # nats-py

    async def quiet(_exc: Exception) -> None:
        """Connection errors are retried by `retry`."""

    async def go() -> bytes:
        nc = await nats.connect(f"nats://127.0.0.1:{port}", connect_timeout=3, max_reconnect_attempts=0,
                                allow_reconnect=False, error_cb=quiet)
        try:
            sub = await nc.subscribe(inventory_subject(host))
            msg = await sub.next_msg(timeout=wait)
            await nc.publish(f"{inventory_subject(host)}.ack", b"received")
            await nc.flush(timeout=3)
            return bytes(msg.data)
        finally:
            await nc.close()

    return asyncio.run(go())


def dns_query(port: int, name: str) -> str:
    """One A query over UDP; the answer's first address."""
    query = struct.pack(">HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)
    query += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0" + struct.pack(">HH", 1, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(3)
        sock.sendto(query, ("127.0.0.1", port))
        data = sock.recv(512)
    answers = struct.unpack(">H", data[6:8])[0]
    if answers == 0:
        raise ProbeFailed(f"no answer for {name}")
    return f"{name} answered ({answers} record(s))"


def run_probe(vm: Vm, probe: Probe, forwards: dict[int, int]) -> ProbeResult:
    """Run one probe against `vm`; `forwards` maps guest ports to host ports."""
    started = time.monotonic()
    if probe.kind is ProbeKind.console:
        assert probe.pattern is not None
        match = vm.wait_for_console(probe.pattern, probe.timeout_s, f"console /{probe.pattern}/")  # with progress
        detail = f"console: {match.group(0)!r}"
    else:
        with progress(vm.spec.name, f"probe {probe.kind.value}", probe.timeout_s, vm.last_console_line):
            detail = _network_probe(vm, probe, forwards)
    return ProbeResult(probe=label(probe), ok=True, seconds=round(time.monotonic() - started, 2), detail=detail)


def _network_probe(vm: Vm, probe: Probe, forwards: dict[int, int]) -> str:
    """A TCP, NATS or DNS probe through its port forward, retried until its deadline; the detail it found."""
    if probe.kind is ProbeKind.tcp:
        assert probe.port is not None
        return retry(f"{vm.spec.name}: TCP port {probe.port}", lambda: tcp_connect(forwards[probe.port or 0]),
                     probe.timeout_s)
    if probe.kind is ProbeKind.nats:
        port = forwards[probe.port or 4222]
        return retry(f"{vm.spec.name}: NATS round-trip", lambda: nats_round_trip(port, f"cim.probe.{vm.spec.name}"),
                     probe.timeout_s)
    assert probe.name is not None
    port = forwards[probe.port or 53]
    return retry(f"{vm.spec.name}: DNS {probe.name}", lambda: dns_query(port, probe.name or ""), probe.timeout_s)
