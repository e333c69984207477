"""The install test of a netboot host: `install:<host>` with no ISO and no USB.

The provisioner's ISO boots on a private LAN (netboot.ProvisionerLan, shared by the tests of one run).  The new
machine, its declared MAC, memory and CPUs and a blank disk attached as the host declares it, tries its disk first,
then the network (as real fleets are set up), under its firmware (OVMF for a UEFI host, SeaBIOS for a BIOS one),
which finds the disk blank and runs the NIC's iPXE ROM (EFI or BIOS iPXE).  Netboot
stage 1 takes its lease, sees the blank install disk, publishes its hardware report on the provisioner's NATS and
checks it against domain.json's declaration before it writes anything (the domain's `inventory: enforce` stops it
there, the disk untouched), fetches the system over HTTP, installs it per the host's disk-config.nix and powers off.
The same machine then comes up from its disk (UEFI: the installed systemd-boot; BIOS: GRUB) with the provisioner
still on the LAN: it takes its lease again, prints its boot-complete line and its report lines (checked against the
plan), and its probes run through its management NIC.  No doit here.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from pipeline import boot, contract, install, netboot, probes
from pipeline.artifacts import (
    InstallResult,
    NetbootFetch,
    NetInstallFacts,
    ProbeResult,
    publish_log,
    utc_now,
)
from pipeline.contract import CONTRACT
from pipeline.diskplan import DiskPlan, DiskPlanError
from pipeline.domain import Domain
from pipeline.errors import CimError
from pipeline.inventory import boot_machine
from pipeline.log import say, step
from pipeline.process import run
from pipeline.qemu import Drive, LanPort, Vm, VmError, VmSpec

SYSTEM_OVER_LAN = r"^cim netboot: the system came over the LAN: (\d+) bytes in ([\d.]+) s"
HWCHECK = r"^cim-hwcheck: (.*?)\r?$"


def verify(
    host_name: str,
    run: netboot.LanRun,
    plan: install.InstallPlan,
    record: Callable[[InstallResult], None],
    report_keep: Path,
    keep_disk: Path | None = None,
) -> InstallResult:
    """Install `host_name` from the LAN onto a blank disk, boot the disk, check it; `record` gets the result (pass
    or fail) before this returns or raises.  The hardware report the installer published is kept in `report_keep`,
    the installed disk of a pass in `keep_disk` (deploy:<host> boots it)."""
    domain, domain_dir, files, workdir, logs, log_names = (
        run.domain,
        run.domain_dir,
        run.files,
        run.workdir,
        run.logs,
        run.log_names,
    )
    host = domain.hosts[host_name]
    assert host.install is not None and host.lan_mac is not None
    task = f"install:{host_name}"
    # `plan` is the host's disk-config evaluated once by the task (refused there, before any VM, if it cannot work).
    if not isinstance(plan, DiskPlan):
        raise DiskPlanError(
            f"{domain_dir / host.install.disk_config}: install:{host_name} from the LAN makes one plain gpt disk (as "
            "its system is fetched, with no storage tools for stage 1); this layout needs the ISO's installer.",
            hint=f"Give hosts.{host_name} an iso image to install from, or a one-disk gpt disk-config.",
        )
    kind = install.target_kind(domain_dir, host_name, host, plan)
    for line in plan.describe():
        say(task, f"plan: {line}")
    timeout = host.install.timeout_s
    disk = install.blank_disk(workdir, plan.disk_mib)
    # The other disks the machine has (the boot VM's, after the install disk): blank, so the hardware check sees
    # them as the machine has them.
    others = boot_machine(host).disks[1:]
    extra = tuple(
        Drive(_sparse(workdir / f"disk{i}.img", d.size_gib), bus=d.bus.value, serial=f"cim-disk{i}")
        for i, d in enumerate(others, start=1)
    )
    say(task, f"blank {plan.disk_mib} MiB disk {disk.name} (qcow2), attached as {kind.value} ({kind.device})")
    declared = boot.boot_probes(domain, host_name, domain_dir)
    forwards = probes.forwards_for(declared, host)
    started = time.monotonic()
    phases: dict[str, float] = {}
    checks: list[str] = []
    results: list[ProbeResult] = []
    facts = NetInstallFacts(mac=host.lan_mac, initrd_bytes=files["initrd"].stat().st_size)
    error: str | None = None
    specs: dict[str, VmSpec] = {}
    try:
        with run.lan(task) as lan, lan.machine(host.lan_mac, task):
            target = Drive(disk, format="qcow2", serial="cim-target", bus=kind.value, bootindex=1)
            specs["installer"] = dataclasses.replace(
                netboot.lan_machine(
                    f"{host_name}-netinstall",
                    host,
                    host.lan_mac,
                    lan.hub,
                    workdir / "installer",
                    logs["install"],
                    management=False,
                    bootindex=2,
                    drives=(target, *extra),
                ),
                accel=lan.accel,
            )
            specs["disk"] = VmSpec(
                name=f"{host_name}-disk",
                system=host.system,
                workdir=workdir / "disk-boot",
                console_log=workdir / "disk-boot.log",
                memory_mib=specs["installer"].memory_mib,
                cpus=specs["installer"].cpus,
                accel=specs["installer"].accel,
                firmware=specs["installer"].firmware,
                drives=(Drive(disk, format="qcow2", bus=kind.value, bootindex=1), *extra),
                published_log=logs["install"],
                port_forwards=forwards,
                lan=LanPort(lan.hub, host.lan_mac),
            )
            facts, failure = _install(
                specs["installer"], lan, host_name, domain, files, timeout, facts, phases, report_keep
            )
            if failure is not None:
                lan.publish_log(logs["provisioner"])
                raise install.InstallError(failure)
            phases["disk-boot"], console, results = _boot_disk(specs["disk"], domain, host_name, domain_dir, timeout)
            checks = install.check_installed(plan, console)
            for line in checks:
                say(task, f"check: {line}")
            lan.publish_log(logs["provisioner"])
        failed = [r for r in results if not r.ok]
        if failed:
            error = f"{task}: {len(failed)} probe(s) of the installed system failed: " + "; ".join(
                r.detail for r in failed
            )
            raise install.InstallError(f"{error}. Log {logs['install']}.")
    except CimError as exc:
        error = error or str(exc).splitlines()[0]
        raise
    finally:
        outcome = InstallResult(
            result="fail" if error is not None or not checks else "pass",
            log=log_names["install"],
            image_xxh3=run.image_xxh3,
            disk_mib=plan.disk_mib,
            plan=plan.describe(),
            seconds=round(time.monotonic() - started, 1),
            phases=phases,
            checks=checks,
            error=error,
            at=utc_now(),
            network=facts.model_copy(update={"probes": results, "provisioner_log": log_names["provisioner"]}),
        )
        _publish(specs, logs["install"])
        record(outcome)
    install.keep_installed(disk, keep_disk)
    shutil.rmtree(workdir, ignore_errors=True)
    say(task, f"installed from the LAN and verified in {outcome.seconds} s; log {logs['install']}")
    return outcome


def disk_untouched(disk: Path) -> bool:
    """Whether the installer wrote nothing at all to `disk` (qemu-img map: no cluster holds data)."""
    proc = run(["qemu-img", "map", "--output=json", str(disk)], timeout=60)
    if proc.returncode != 0:
        raise install.InstallError(f"qemu-img could not read {disk}: {proc.stderr.strip()}")
    return all(not extent.get("data") for extent in json.loads(proc.stdout))


def _sparse(path: Path, size_gib: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        f.truncate(int(size_gib * 2**30))
    return path


def _install(
    spec: VmSpec,
    lan: netboot.ProvisionerLan,
    host_name: str,
    domain: Domain,
    files: dict[str, Path],
    timeout: float,
    facts: NetInstallFacts,
    phases: dict[str, float],
    report_keep: Path,
) -> tuple[NetInstallFacts, str | None]:
    """Phases lease, fetch, report (and check), install: the machine from its first power-on to its power-off;
    what it got and sent, and why the install failed (None: it did not)."""
    task = f"install:{host_name}"
    names = CONTRACT.install
    started_re = contract.line_pattern(names.started, host_name) + ".*$"
    failed_re = contract.line_pattern(names.failed, host_name) + r".*\r?\n"
    done_re = contract.line_pattern(names.done, host_name)
    begun = time.monotonic()
    with (
        step(task, "phase lease+fetch: the blank machine boots from the LAN (disk first, then network)") as phase,
        Vm(spec) as vm,
    ):
        try:
            lease, fetches, mark = netboot.watch_firmware(vm, domain, host_name, files, begun, task, timeout)
            phases["lease+fetch"] = round(time.monotonic() - begun, 1)
            first = vm.wait_for_console(f"{started_re}|{failed_re}", timeout, "the installer's started line", mark)
            say(task, f"installer: {first.group(0).strip()}")
            report = lan.nats_port
            if report is not None and not re.match(failed_re, first.group(0)):
                # Its hardware report, published before it writes anything (kept for the record).
                t = time.monotonic()
                received = boot.receive_report(vm, host_name, report, t + 60, report_keep)
                phases["report"] = round(time.monotonic() - t, 1)
                say(task, f"hardware report received: {received.detail}")
            vm.wait_for_exit(max(1.0, timeout - phase.seconds), "the installer's power-off")
        except VmError as exc:
            raise install.InstallError(f"install phase 'installer' failed: {exc}") from None
        console = vm.console.replace("\r", "")
    phases["install"] = round(phase.seconds - phases.get("lease+fetch", 0.0) - phases.get("report", 0.0), 1)
    hwcheck = [m.group(1).strip() for m in re.finditer(HWCHECK, console, re.M)]
    system = re.search(SYSTEM_OVER_LAN, console, re.M)
    facts = facts.model_copy(
        update={
            "lease": lease,
            "fetches": fetches
            + [
                NetbootFetch(url=m.group(1), size=int(m.group(2)), seconds=float(m.group(3)))
                for m in re.finditer(netboot.FETCHED, console, re.M)
            ],
            "hardware_check": hwcheck,
            "system_bytes": int(system.group(1)) if system else None,
            "system_seconds": float(system.group(2)) if system else None,
            "report": str(report_keep.name) if report_keep.exists() else None,
        }
    )
    failed = re.search(contract.line_pattern(names.failed, host_name) + ".*$", console, re.M)
    if failed or not re.search(done_re, console, re.M):
        target = next(d.path for d in spec.drives if d.serial == "cim-target")
        untouched = disk_untouched(target)
        facts = facts.model_copy(update={"disk_untouched": untouched})
        return facts, (
            f"install phase 'installer' failed: "
            f"{failed.group(0) if failed else 'powered off without the done line'}; the install disk "
            f"{'was not written (all zeros)' if untouched else 'was written'}; log {spec.shown_log}"
        )
    say(task, f"the system came over the LAN: {facts.system_bytes} bytes in {facts.system_seconds} s")
    return facts, None


def _boot_disk(
    spec: VmSpec, domain: Domain, host_name: str, domain_dir: Path, timeout: float
) -> tuple[float, str, list[ProbeResult]]:
    """Phase disk-boot: the same machine from its disk (UEFI), the provisioner still on the LAN; its probes."""
    task = f"install:{host_name}"
    declared = boot.boot_probes(domain, host_name, domain_dir)
    consoles = [p for p in declared if p.kind.value == "console"]
    services = [p for p in declared if p.kind.value != "console"]
    with (
        step(task, "phase disk-boot: the machine from its disk (UEFI → the installed systemd-boot)") as phase,
        Vm(spec) as vm,
    ):
        try:
            vm.wait_for_console(probes.boot_complete_pattern(host_name), timeout, "the boot-complete line")
            lease = vm.wait_for_console(netboot.SYSTEM_LEASE, 30, "its lease line")
            say(task, f"installed system: {lease.group(0).strip()}")
            ports = vm.forwarded_ports()
            ctx = probes.ProbeContext(domain=domain, host_name=host_name, domain_dir=domain_dir, ports=ports)
            results = boot.run_probes(vm, ctx, consoles, services, time.monotonic() + 120, task)
        except VmError as exc:
            raise install.InstallError(f"install phase 'disk-boot' failed: {exc}") from None
        console = vm.console
    return phase.seconds, console, results


def _publish(specs: dict[str, VmSpec], dest: Path) -> None:
    """One install log: the installer's console, then the installed disk's first boot."""
    parts = []
    for key, title in (("installer", "the machine booting from the LAN and installing"), ("disk", "its disk")):
        if key in specs and specs[key].console_log.exists():
            parts.append((title, specs[key].console_log))
    tmp = dest.with_name(f".{dest.name}.parts")
    with tmp.open("wb") as out:
        for title, path in parts:
            out.write(f"=== cim-pipeline: {title} ===\n".encode())
            out.write(path.read_bytes())
    publish_log(tmp, dest)
    tmp.unlink(missing_ok=True)
