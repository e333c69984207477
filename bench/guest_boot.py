"""What the guests cost the demo ISO's boot: vhost-dev with its three guests against the same host with none.

Two private copies of configs/demo — one as it is, one whose vhost-dev declares no guests — each built with
`doit build:vhost-dev-iso`, then each ISO booted once in turn under the same accelerator (TCG unless KVM works
here), timing QEMU's start to the boot-complete line, and for the guests' copy on to the first statistics message
on the console (every guest up and reporting).  It prints the initrd sizes, the times, and the ratios.

    .venv/bin/python bench/guest_boot.py [--keep]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.boot import boot_spec  # noqa: E402 - after the path set-up, so the script runs from a checkout
from pipeline.context import make_context  # noqa: E402
from pipeline.domain import Artifact, Format, System, load_domain  # noqa: E402
from pipeline.process import run  # noqa: E402
from pipeline.qemu import Vm, choose_accel  # noqa: E402

DEMO = ROOT / "configs" / "demo"


def build(domain: Path, artifacts: Path) -> tuple[Path, int]:
    """The ISO of the copy's vhost-dev, and the size of the initrd inside it (bytes)."""
    proc = run(
        [sys.executable, "-m", "doit", f"domain={domain}", f"artifacts={artifacts}", "build:vhost-dev-iso"],
        timeout=3600,
        cwd=ROOT,
    )
    if proc.returncode != 0:
        raise SystemExit(f"build failed:\n{proc.stdout}\n{proc.stderr}")
    record = json.loads((artifacts / "manifest.json").read_text())["artifacts"]["vhost-dev-iso"]
    # The ISO's derivation names the host's toplevel, whose initrd is the one the ISO boots.
    inputs = run(["nix-store", "-q", "--references", record["drvPath"]], timeout=60).stdout.split()
    (toplevel_drv,) = [p for p in inputs if p.endswith("nixos-system-vhost-dev.drv")]
    toplevel = run(["nix-store", "-q", "--outputs", toplevel_drv], timeout=60).stdout.split()[0]
    return artifacts / record["file"], (Path(toplevel) / "initrd").stat().st_size


def boot(domain: Path, iso: Path, work: Path, until: list[str]) -> list[float]:
    """Seconds from QEMU's start to each console pattern in `until`, in order."""
    artifact = Artifact(host="vhost-dev", format=Format.iso, system=System.x86_64_linux)
    host = load_domain(domain).hosts["vhost-dev"]
    spec = boot_spec(artifact, host, iso, work, (), work / "boot.log")
    accel, _why = choose_accel(spec, ROOT / ".cim")
    spec = dataclasses.replace(spec, accel=accel)
    times = []
    with Vm(spec) as vm:
        started = time.monotonic()
        for pattern in until:
            vm.wait_for_console(pattern, 300)
            times.append(time.monotonic() - started)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the copies and their artifacts")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="cim-bench-guests-"))
    copies = {"guests": tmp / "guests", "none": tmp / "none"}
    try:
        for name, copy in copies.items():
            shutil.copytree(DEMO, copy)
            if name == "none":
                data = json.loads((copy / "domain.json").read_text())
                data["hosts"]["vhost-dev"]["guests"] = []
                (copy / "domain.json").write_text(json.dumps(data, indent=2))
        built = {name: build(copy, tmp / f"artifacts-{name}") for name, copy in copies.items()}
        complete = r"cim: vhost-dev boot complete"
        with_guests = boot(
            copies["guests"], built["guests"][0], tmp / "vm-guests", [complete, r"cim: stats: publishing"]
        )
        without = boot(copies["none"], built["none"][0], tmp / "vm-none", [complete])
        print(f"initrd: {built['guests'][1] / 2**20:.1f} MiB with guests, {built['none'][1] / 2**20:.1f} MiB without")
        print(
            f"boot complete: {with_guests[0]:.1f} s with guests, {without[0]:.1f} s without "
            f"(ratio {with_guests[0] / without[0]:.2f})"
        )
        print(
            f"first statistics message published (every guest up): {with_guests[1]:.1f} s "
            f"(ratio to the guest-less boot complete {with_guests[1] / without[0]:.2f})"
        )
    finally:
        if not args.keep:
            for copy in copies.values():
                shutil.rmtree(make_context(ROOT, copy, tmp / "a").state_dir, ignore_errors=True)
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
