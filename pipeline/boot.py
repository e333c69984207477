"""The boot test of one image: QEMU boots it as its format boots on real hardware, then the probes run against it.

  ISO   SeaBIOS → isolinux → kernel, the ISO as a CD-ROM
  SD    U-Boot (`-M virt`) → extlinux.conf → kernel, the image as a disk whose writes go to a throw-away overlay
The whole serial console is kept (published as artifacts/<artifact>/boot.log) whatever the outcome.  No doit here:
`pipeline.tasks` wraps `boot_test` into the `boot:<artifact>` task and keeps its result in the artifact's record.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pipeline import probes
from pipeline.artifacts import BootResult, ProbeResult, publish_log, utc_now
from pipeline.domain import Artifact, Domain, Format, Host, Probe, ProbeKind
from pipeline.log import say
from pipeline.qemu import Drive, Firmware, Forward, Vm, VmError, VmSpec, choose_accel


class BootFailed(VmError):
    """The image booted (or not) but some probes failed; the record lists every probe's result."""


def boot_spec(artifact: Artifact, host: Host, image: Path, workdir: Path, forwards: tuple[Forward, ...],
              published_log: Path) -> VmSpec:
    """The boot test's VM; `forwards` reach the probes' guests from 127.0.0.1 (QEMU picks the ports)."""
    if artifact.format is Format.iso:
        drives: tuple[Drive, ...] = (Drive(image, media="cdrom"),)
        firmware, order = Firmware.bios, "d"
    else:
        drives = (Drive(image, snapshot=True),)  # the guest writes to its root fs; the artifact stays as built
        firmware, order = Firmware.uboot, ""
    return VmSpec(name=f"{artifact.name}-boot", system=artifact.system, workdir=workdir,
                  console_log=workdir / "console.log", memory_mib=host.boot.memory_mib, cpus=host.boot.cpus,
                  published_log=published_log, firmware=firmware, drives=drives, boot_order=order,
                  port_forwards=forwards)


def boot_probes(domain: Domain, host_name: str, domain_dir: Path) -> list[Probe]:
    """The host's declared probes, else the defaults its guests imply."""
    return list(domain.hosts[host_name].boot.probes) or probes.default_probes(domain, host_name, domain_dir)


def spec(artifact: Artifact, domain: Domain, domain_dir: Path) -> dict[str, Any]:
    """What, besides the image, decides a boot test (VM size, probes, and the addresses the dns probe checks), keyed
    as in domain.json so that a change can be named: `hosts.vhost-dev.boot.memory_mib`.  The probes are the
    effective ones (declared, else the defaults)."""
    host = domain.hosts[artifact.host]
    hosts: dict[str, dict[str, Any]] = {
        name: {"address": str(other.address),
               "guests": [{"name": g.name, "address": str(g.address)} for g in other.guests]}
        for name, other in domain.hosts.items()}
    hosts[artifact.host]["boot"] = {
        "memory_mib": host.boot.memory_mib, "cpus": host.boot.cpus,
        "probes": [p.model_dump(mode="json") for p in boot_probes(domain, artifact.host, domain_dir)]}
    return {"hosts": hosts, "format": artifact.format.value}


def boot_test(artifact: Artifact, domain: Domain, domain_dir: Path, image: Path, image_xxh3: str, *, workdir: Path,
              log_dest: Path, log_name: str, machine_state: Path,
              record: Callable[[BootResult], None]) -> BootResult:
    """Boot `image`, run the probes; `record` gets the result (pass or fail) before this returns or raises.

    The console probe (boot complete) comes first and may use the whole boot budget; then the service probes run
    side by side, each within its own deadline, so one failing guest never hides another's result.
    """
    name = artifact.name
    host = domain.hosts[artifact.host]
    declared = boot_probes(domain, artifact.host, domain_dir)
    consoles = [p for p in declared if p.kind is ProbeKind.console]
    services = [p for p in declared if p.kind is not ProbeKind.console]
    checks = consoles + services  # the order they run and are recorded in
    spec = boot_spec(artifact, host, image, workdir, probes.forwards_for(checks, host), log_dest)
    accel, why = choose_accel(spec, machine_state)
    spec = dataclasses.replace(spec, accel=accel)
    say(name, f"booting {image.name} in {spec.system.qemu_binary} ({accel}: {why})")
    started = time.monotonic()
    results: list[ProbeResult] = []
    error: str | None = None
    tail = ""
    try:
        with Vm(spec) as vm:
            ctx = probes.ProbeContext(domain=domain, host_name=artifact.host, domain_dir=domain_dir,
                                      ports=vm.forwarded_ports())
            deadline = started + host.boot.timeout_s

            def run(probe: Probe) -> ProbeResult:
                remaining = max(1.0, deadline - time.monotonic())
                timeout = remaining if probe.kind is ProbeKind.console else min(probe.timeout_s, remaining)
                result = probes.run_probe(vm, probe.model_copy(update={"timeout_s": timeout}), ctx)
                say(name, f"probe {result.probe}: {'ok' if result.ok else 'FAILED'} in {result.seconds} s — "
                          f"{result.detail}")
                return result

            results += [run(p) for p in consoles]
            with ThreadPoolExecutor(max_workers=max(1, len(services))) as pool:
                results += list(pool.map(run, services))
            tail = vm.tail()
        failed = [r for r in results if not r.ok]
        if failed:
            error = f"{name}: {len(failed)} of {len(results)} probe(s) failed: " + "; ".join(r.detail for r in failed)
            raise BootFailed(f"{error}. Console log {log_dest}; its last lines:\n{tail}",
                             hint="Each probe's result is in the artifact's record (cim status / manifest.json).")
    except VmError as exc:
        error = error or str(exc).splitlines()[0]
        raise
    finally:
        outcome = BootResult(result="fail" if error is not None or len(results) < len(checks) else "pass",
                             accel=accel, log=log_name, image_xxh3=image_xxh3,
                             seconds=round(time.monotonic() - started, 1), probes=results,
                             planned=[probes.label(p) for p in checks], error=error, at=utc_now())
        publish_log(spec.console_log, log_dest)
        record(outcome)
    shutil.rmtree(workdir, ignore_errors=True)
    say(name, f"boot test passed in {outcome.seconds} s; console log {log_dest}")
    return outcome
