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
from pathlib import Path
from typing import Any

from pipeline import probes
from pipeline.artifacts import BootResult, ProbeResult, publish_log, utc_now
from pipeline.domain import Artifact, Format, Host, Probe, ProbeKind
from pipeline.log import say
from pipeline.qemu import Drive, Firmware, Vm, VmError, VmSpec, choose_accel, free_port


def boot_spec(artifact: Artifact, host: Host, image: Path, workdir: Path, forwards: dict[int, int],
              published_log: Path) -> VmSpec:
    """The boot test's VM; `forwards` maps guest ports to host ports on 127.0.0.1."""
    if artifact.format is Format.iso:
        drives: tuple[Drive, ...] = (Drive(image, media="cdrom"),)
        firmware, order = Firmware.bios, "d"
    else:
        drives = (Drive(image, snapshot=True),)  # the guest writes to its root fs; the artifact stays as built
        firmware, order = Firmware.uboot, ""
    return VmSpec(name=f"{artifact.name}-boot", system=artifact.system, workdir=workdir,
                  console_log=workdir / "console.log", memory_mib=host.boot.memory_mib, cpus=host.boot.cpus,
                  published_log=published_log, firmware=firmware, drives=drives, boot_order=order,
                  port_forwards=tuple(sorted((hp, gp) for gp, hp in forwards.items())))


def boot_probes(host_name: str, host: Host) -> list[Probe]:
    """The host's declared probes, else the defaults its guests imply."""
    return list(host.boot.probes) or probes.default_probes(host_name, host)


def spec(artifact: Artifact, host: Host) -> dict[str, Any]:
    """What, besides the image, decides a boot test (VM size, probes), keyed as in domain.json so that a change can be
    named: `hosts.vhost-dev.boot.memory_mib`.  The probes are the effective ones (declared, else the defaults)."""
    return {"hosts": {artifact.host: {"boot": {
        "memory_mib": host.boot.memory_mib, "cpus": host.boot.cpus,
        "probes": [p.model_dump(mode="json") for p in boot_probes(artifact.host, host)]}}},
        "format": artifact.format.value}


def boot_test(artifact: Artifact, host: Host, image: Path, image_xxh3: str, *, workdir: Path, log_dest: Path,
              log_name: str, machine_state: Path, record: Callable[[BootResult], None]) -> BootResult:
    """Boot `image`, run the probes; `record` gets the result (pass or fail) before this returns or raises."""
    name = artifact.name
    checks = boot_probes(artifact.host, host)
    forwards = {port: free_port() for port in probes.guest_ports(checks)}
    spec = boot_spec(artifact, host, image, workdir, forwards, log_dest)
    accel, why = choose_accel(spec, machine_state)
    spec = dataclasses.replace(spec, accel=accel)
    say(name, f"booting {image.name} in {spec.system.qemu_binary} ({accel}: {why})")
    started = time.monotonic()
    results: list[ProbeResult] = []
    error: str | None = None
    try:
        with Vm(spec) as vm:
            deadline = started + host.boot.timeout_s
            for probe in checks:
                # The boot-complete line may take the whole boot budget; service probes their own, within it.
                remaining = max(1.0, deadline - time.monotonic())
                timeout = remaining if probe.kind is ProbeKind.console else min(probe.timeout_s, remaining)
                result = probes.run_probe(vm, probe.model_copy(update={"timeout_s": timeout}), forwards)
                results.append(result)
                say(name, f"probe {result.probe}: ok in {result.seconds} s — {result.detail}")
    except VmError as exc:
        error = str(exc).splitlines()[0]
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
