"""Probes run against a booted VM, from outside as a user would: the console, and each guest through a port that
QEMU forwards from 127.0.0.1 to the guest's address behind the VM's NIC.

  console  the boot-complete line (or any pattern) on the serial console
  tcp      a port answers
  dns      dnspython: every host and guest name of the domain resolves to its declared address; an outside name
           gets NXDOMAIN
  nats     nats-py: a publish/subscribe round-trip through the guest's nats-server
  stats    nats-py: the host's cim.<host>.stats message arrives, validates against the committed JSON Schema
           (jsonschema), and lists every declared guest running
  ssh      paramiko: the account logs in to the guest with its key, and `hostname` prints the guest's name

Each probe has its own deadline and retries until it; a failing probe reports the last failure, naming the probe,
the guest, the forwarded port and the last console lines, and never stops the others (`run_probe` returns a result
whatever happens).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from pipeline import contract, process
from pipeline.artifacts import ProbeResult
from pipeline.domain import Domain, GuestKind, Host, Probe, ProbeKind
from pipeline.errors import CimError
from pipeline.log import progress
from pipeline.qemu import Forward, Vm

T = TypeVar("T")
OUTSIDE_NAME = "cim-probe.example.com"  # a name no domain of ours holds: its dns guest must say NXDOMAIN


class ProbeFailed(CimError):
    """One probe did not succeed within its deadline."""


class StatsRejected(ProbeFailed):
    """A statistics message arrived but is not what it must be (schema, host, guests)."""


PORTS = contract.CONTRACT.ports


def boot_complete_pattern(host: str) -> str:
    """The line every image prints when it has booted (the contract's boot_complete)."""
    return contract.boot_complete_pattern(host)


@cache
def stats_schema() -> dict[str, Any]:
    """The JSON Schema of the cim.<host>.stats message (`cim schema stats`)."""
    text = resources.files("pipeline").joinpath("schemas/stats.json").read_text(encoding="utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


def demo_key(domain: Domain, domain_dir: Path) -> tuple[str, str] | None:
    """(account, key path relative to the domain dir) when the domain carries a private key whose public half is
    an account's key: only a demo domain does (configs/demo/keys, snake-oil like nixpkgs' test keys)."""
    keys = domain_dir / "keys"
    if not keys.is_dir():
        return None
    for public in sorted(keys.glob("*.pub")):
        private = public.with_suffix("")
        words = public.read_text(encoding="utf-8", errors="replace").split()
        if not private.is_file() or len(words) < 2:
            continue
        for account in domain.accounts:
            if any(k.split()[:2] == words[:2] for k in account.ssh_keys):
                return account.name, str(private.relative_to(domain_dir))
    return None


def default_probes(domain: Domain, host_name: str, domain_dir: Path) -> list[Probe]:
    """The boot-complete line, then one probe per service the host's guests offer: dns, nats and the host's own
    statistics (through its nats guest), and ssh into dev when the domain carries a key to log in with."""
    host = domain.hosts[host_name]
    probes = [Probe(kind=ProbeKind.console, pattern=boot_complete_pattern(host_name))]
    kinds = {g.kind: g.name for g in reversed(host.guests)}  # the first guest of each kind
    if GuestKind.dns in kinds:
        probes.append(Probe(kind=ProbeKind.dns, guest=kinds[GuestKind.dns]))
    if GuestKind.nats in kinds:
        probes.append(Probe(kind=ProbeKind.nats, guest=kinds[GuestKind.nats]))
        probes.append(
            Probe(kind=ProbeKind.stats, guest=kinds[GuestKind.nats], timeout_s=max(60.0, 4.0 * host.stats_interval_s))
        )
    key = demo_key(domain, domain_dir)
    if GuestKind.dev in kinds and key is not None:
        probes.append(Probe(kind=ProbeKind.ssh, guest=kinds[GuestKind.dev], account=key[0], key=key[1]))
    return probes


def label(probe: Probe) -> str:
    """A probe's name in records and junit.xml: its kind, and its port or DNS name when there may be several."""
    if probe.kind is ProbeKind.tcp:
        return f"tcp {probe.port}"
    if probe.kind is ProbeKind.dns and probe.name:
        return f"dns {probe.name}"
    return probe.kind.value


def probe_guest(probe: Probe, host: Host) -> str | None:
    """The guest `probe` talks to: the one it names, else the host's first guest of its kind (None: the host)."""
    if probe.guest is not None or probe.kind.guest_kind is None:
        return probe.guest
    return next((g.name for g in host.guests if g.kind is probe.kind.guest_kind), None)


def probe_forward(probe: Probe, host: Host) -> Forward | None:
    """The forward that reaches what `probe` talks to (None for the console)."""
    port = probe.port or probe.kind.default_port
    if port is None:
        return None
    guest = probe_guest(probe, host)
    address = next((str(g.address) for g in host.guests if g.name == guest), "")
    return Forward(proto=probe.kind.protocol, guest_port=port, address=address)


def forwards_for(probes: list[Probe], host: Host) -> tuple[Forward, ...]:
    """Every forward the probes need, once each."""
    found = {f for f in (probe_forward(p, host) for p in probes) if f is not None}
    return tuple(sorted(found, key=lambda f: (f.address, f.guest_port, f.proto)))


def retry(attempt: Callable[[], str], timeout: float, interval: float = 0.5) -> str:
    """Call `attempt` until it returns (its detail) or the deadline passes; ProbeFailed with the last error."""
    deadline = time.monotonic() + timeout
    last = "never tried"
    while True:
        try:
            return attempt()
        except Exception as exc:  # any failure is retried until the deadline; the last one is reported
            last = str(exc) if isinstance(exc, ProbeFailed) else f"{type(exc).__name__}: {exc}"
        process.check_interrupted()
        if time.monotonic() > deadline:
            raise ProbeFailed(f"did not succeed within {timeout:g} s; last error: {last}")
        time.sleep(interval)


# -- the checks: each one try, raising on failure -------------------------------------------------------------------


def tcp_connect(port: int) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=3) as sock:
        sock.settimeout(3)
        banner = sock.recv(64)
        if not banner:
            raise ProbeFailed("connection closed before any byte (port forward up, guest service not)")
    return f"port answered: {banner[:40]!r}"


async def _quiet(_exc: Exception) -> None:
    """Connection errors are retried, and the last one reported; nats-py would log each."""


ATTEMPT_SLACK = 10.0  # seconds one NATS attempt may take beyond its own wait (connect, subscribe, close)


def _bounded(coroutine: Coroutine[Any, Any, T], seconds: float) -> T:
    """Run one NATS attempt with a deadline of its own (TimeoutError past it), stopped at once when the run is
    interrupted (process.Interrupted): nats-py's connect to a port nobody answers (a VM that was stopped) does not
    return by itself, and `retry` can only give up between attempts."""

    async def watched() -> T:
        task = asyncio.ensure_future(coroutine)
        deadline = time.monotonic() + seconds
        while True:
            done, _pending = await asyncio.wait({task}, timeout=0.2)
            if done:
                return task.result()
            if process.stopping() is not None or time.monotonic() > deadline:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
                process.check_interrupted()
                raise TimeoutError(f"no answer within {seconds:g} s")

    return asyncio.run(watched())


async def _nats_connect(port: int) -> Any:
    import nats  # nats-py

    return await nats.connect(
        f"nats://127.0.0.1:{port}", connect_timeout=3, max_reconnect_attempts=0, allow_reconnect=False, error_cb=_quiet
    )


def nats_round_trip(port: int, subject: str) -> str:
    """Publish and receive one message through the guest's nats-server with the official client."""

    async def go() -> str:
        nc = await _nats_connect(port)
        try:
            sub = await nc.subscribe(subject)
            await nc.publish(subject, b"cim-probe")
            msg = await sub.next_msg(timeout=3)
            return f"round-trip on {subject}: {msg.data.decode()} (server {nc.connected_server_version})"
        finally:
            await nc.close()

    return _bounded(go(), ATTEMPT_SLACK)


def stats_problems(message: Any, host_name: str, guests: list[str]) -> list[str]:
    """What is wrong with one statistics message: schema violations, another host, declared guests not running."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(stats_schema())
    problems = [
        f"{'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
        for e in sorted(validator.iter_errors(message), key=lambda e: list(map(str, e.absolute_path)))
    ]
    if problems:
        return [f"does not validate against pipeline/schemas/stats.json: {p}" for p in problems[:3]]
    if message["host"] != host_name:
        problems.append(f"comes from host {message['host']!r}, not {host_name!r}")
    listed = {g["name"]: g for g in message["guests"]}
    for name in guests:
        if name not in listed:
            problems.append(f"does not list guest {name!r}")
        elif listed[name]["state"] != "running":
            problems.append(f"lists guest {name!r} as {listed[name]['state']}")
    return problems


def inventory_subject(host: str) -> str:
    """Where a host publishes its hardware report (the contract's inventory subject); the ack subject adds `.ack`."""
    return contract.inventory_subject(host)


def receive_inventory(port: int, host: str, wait: float) -> bytes:
    """Wait up to `wait` s for the host's hardware report on NATS, then acknowledge it so the host stops re-publishing.

    Core NATS keeps nothing: the host re-publishes every few seconds until this acknowledgement arrives.
    """
    import nats  # nats-py

    async def quiet(_exc: Exception) -> None:
        """Connection errors are retried by `retry`."""

    async def go() -> bytes:
        nc = await nats.connect(
            f"nats://127.0.0.1:{port}",
            connect_timeout=3,
            max_reconnect_attempts=0,
            allow_reconnect=False,
            error_cb=quiet,
        )
        try:
            sub = await nc.subscribe(inventory_subject(host))
            msg = await sub.next_msg(timeout=wait)
            await nc.publish(f"{inventory_subject(host)}.ack", b"received")
            await nc.flush(timeout=3)
            return bytes(msg.data)
        finally:
            await nc.close()

    return _bounded(go(), wait + ATTEMPT_SLACK)


def receive_stats(port: int, subject: str, timeout: float) -> Any:
    """The next message on `subject` within `timeout` seconds, parsed from JSON (ProbeFailed otherwise)."""

    async def go() -> Any:
        nc = await _nats_connect(port)
        try:
            sub = await nc.subscribe(subject)
            msg = await sub.next_msg(timeout=timeout)
        finally:
            await nc.close()
        try:
            return json.loads(msg.data)
        except ValueError as exc:
            raise ProbeFailed(f"a message on {subject} is not JSON: {exc}: {msg.data[:200]!r}") from None

    try:
        return _bounded(go(), timeout + ATTEMPT_SLACK)
    except TimeoutError:
        raise ProbeFailed(f"no message on {subject} within {timeout:g} s") from None


def stats_check(port: int, host_name: str, guests: list[str], timeout: float) -> str:
    """A statistics message arrives on cim.<host>.stats, validates, and lists every declared guest running."""
    subject = contract.stats_subject(host_name)
    message = receive_stats(port, subject, timeout)
    problems = stats_problems(message, host_name, guests)
    if problems:
        raise StatsRejected(f"the message on {subject} {'; '.join(problems)}")
    running = ", ".join(
        f"{g['name']} (pid {g['pid']}, {g.get('pid_namespace', '?')}, hostname {g.get('hostname', '?')})"
        for g in message["guests"]
    )
    return f"{subject}: valid, guests running: {running or 'none declared'}"


def dns_check(port: int, records: dict[str, str], outside: str) -> str:
    """Every name in `records` resolves to its address (any, where none is given); `outside` gets NXDOMAIN."""
    import dns.exception
    import dns.resolver

    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = ["127.0.0.1"]
    resolver.port = port
    resolver.lifetime = 3
    for name, address in records.items():
        try:
            got = sorted(r.to_text() for r in resolver.resolve(name, "A", search=False))
        except dns.exception.DNSException as exc:
            raise ProbeFailed(f"{name} did not resolve: {exc}") from None
        if address and got != [address]:
            raise ProbeFailed(f"{name} resolved to {', '.join(got)}, not its declared {address}")
    try:
        answer = resolver.resolve(outside, "A", search=False)
    except dns.resolver.NXDOMAIN:
        pass
    except dns.exception.DNSException as exc:
        raise ProbeFailed(f"{outside} (outside the domain) should be NXDOMAIN; the server said: {exc}") from None
    else:
        raise ProbeFailed(f"{outside} is outside the domain but resolved to {answer[0].to_text()}")
    return f"{len(records)} name(s) resolve to their declared addresses; {outside}: NXDOMAIN"


def ssh_connect(port: int, account: str, key: Path) -> Any:
    """A paramiko client logged in to 127.0.0.1:`port` as `account` with `key` (paramiko's exceptions as they come).

    The machine made its host key at this boot: there is nothing to check it against, and only loopback is dialled.
    """
    import paramiko

    # A machine not up yet resets the connection: paramiko's transport thread would print a traceback for each try,
    # where the callers report only their last failure.
    quiet = logging.getLogger("paramiko")
    quiet.propagate = False
    if not quiet.handlers:
        quiet.addHandler(logging.NullHandler())
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
    try:
        client.connect(
            "127.0.0.1",
            port=port,
            username=account,
            key_filename=str(key),
            timeout=5,
            banner_timeout=10,
            auth_timeout=10,
            look_for_keys=False,
            allow_agent=False,
        )
    except BaseException:
        client.close()
        raise
    return client


def ssh_check(port: int, account: str, key: Path, expect: str) -> str:
    """`account` logs in with `key`; `hostname` prints `expect`."""
    client = ssh_connect(port, account, key)
    try:
        _stdin, stdout, stderr = client.exec_command("hostname", timeout=10)
        name = stdout.read().decode(errors="replace").strip()
        status = stdout.channel.recv_exit_status()
        if status != 0 or name != expect:
            said = stderr.read().decode(errors="replace").strip()
            raise ProbeFailed(
                f"`hostname` as {account} printed {name!r} (exit {status}{', ' + said if said else ''}), not {expect!r}"
            )
    finally:
        client.close()
    return f"{account} logged in with {key.name}; hostname: {name}"


# -- running one probe ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeContext:
    """What a probe needs beyond the VM: the domain (names, addresses, keys) and the forwarded ports."""

    domain: Domain
    host_name: str
    domain_dir: Path
    ports: dict[Forward, int]

    @property
    def host(self) -> Host:
        return self.domain.hosts[self.host_name]


def _check(vm: Vm, probe: Probe, ctx: ProbeContext, port: int) -> str:
    """One probe, retried until its deadline; its detail, or ProbeFailed."""
    host = ctx.host
    guest = probe_guest(probe, host)
    if probe.kind is ProbeKind.console:
        assert probe.pattern is not None
        match = vm.wait_for_console(probe.pattern, probe.timeout_s, f"console /{probe.pattern}/")
        return f"console: {match.group(0)!r}"
    if probe.kind is ProbeKind.tcp:
        return retry(lambda: tcp_connect(port), probe.timeout_s)
    if probe.kind is ProbeKind.nats:
        return retry(lambda: nats_round_trip(port, f"cim.probe.{vm.spec.name}"), probe.timeout_s)
    if probe.kind is ProbeKind.dns:
        every = {name: str(address) for name, address in ctx.domain.records().items()}
        records = {probe.name: every.get(probe.name, "")} if probe.name else every
        return retry(lambda: dns_check(port, records, OUTSIDE_NAME), probe.timeout_s)
    if probe.kind is ProbeKind.stats:
        deadline = time.monotonic() + probe.timeout_s
        guests = [g.name for g in host.guests]
        rejected: list[str] = []

        def attempt() -> str:
            try:
                return stats_check(port, ctx.host_name, guests, max(1.0, deadline - time.monotonic()))
            except StatsRejected as exc:
                rejected.append(str(exc))
                raise

        try:
            return retry(attempt, probe.timeout_s)
        except ProbeFailed:
            if not rejected:
                raise
            # A message that came but was wrong says more than the last wait that saw none.
            raise ProbeFailed(f"no good message within {probe.timeout_s:g} s; the last: {rejected[-1]}") from None
    assert probe.kind is ProbeKind.ssh and probe.account and probe.key
    key = ctx.domain_dir / probe.key
    if not key.is_file():
        raise ProbeFailed(f"its key {key} does not exist (boot.probes key is relative to the domain directory)")
    return retry(lambda: ssh_check(port, probe.account or "", key, guest or ctx.host_name), probe.timeout_s)


def run_probe(vm: Vm, probe: Probe, ctx: ProbeContext) -> ProbeResult:
    """Run one probe against `vm`; a result whatever happens (a failure's detail names the probe, the guest, the
    forwarded port and the last console lines)."""
    started = time.monotonic()
    guest = probe_guest(probe, ctx.host)
    forward = probe_forward(probe, ctx.host)
    port = ctx.ports.get(forward) if forward is not None else None
    try:
        if forward is not None and port is None:
            raise ProbeFailed(f"no port was forwarded to {forward.address or 'the VM'}:{forward.guest_port}")
        if probe.kind is ProbeKind.console:
            detail, ok = _check(vm, probe, ctx, port or 0), True  # wait_for_console shows its own progress
        else:
            with progress(vm.spec.name, f"probe {label(probe)}", probe.timeout_s, vm.last_console_line):
                detail, ok = _check(vm, probe, ctx, port or 0), True
    except CimError as exc:  # ProbeFailed, or the VM's own errors (QEMU gone, console timeout)
        where = f"guest {guest}" if guest else f"host {ctx.host_name}"
        via = (
            f" at {forward.address or 'the VM'}:{forward.guest_port}/{forward.proto}, forwarded from 127.0.0.1:{port}"
            if forward is not None
            else ""
        )
        first = str(exc).split("\n")[0]
        detail, ok = f"probe {label(probe)} ({where}{via}) failed: {first}", False
    return ProbeResult(
        probe=label(probe), ok=ok, seconds=round(time.monotonic() - started, 2), detail=detail, guest=guest, port=port
    )
