"""Hardware inventory end to end: real images booted in QEMU detect their hardware, publish it on NATS, and the
pipeline reconciles it with domain.json (on private copies of the demo)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cimtest.demo import ROOT, DoitRunner, executed, needs_demo


def manifest(artifacts: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((artifacts / "manifest.json").read_text())
    return data


def edit(domain: Path, change: Any) -> None:
    path = domain / "domain.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=2))


def cim(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.nix
@pytest.mark.vm
@needs_demo
@pytest.mark.parametrize(("artifact", "system"), [("vhost-dev-iso", "x86_64-linux"), ("vhost-pi-sd", "aarch64-linux")])
def test_the_demo_images_detect_what_the_demo_declares(
    demo_domain: Path, artifacts_dir: Path, doit: DoitRunner, artifact: str, system: str
) -> None:
    proc = doit(demo_domain, f"boot:{artifact}", check=True)
    report = json.loads((artifacts_dir / artifact / "inventory.json").read_text())
    assert report["version"] == 1 and report["system"] == system and report["virtualisation"] == "qemu"
    assert report["hardware"]["cpu"][0]["model_name"] in {"QEMU Virtual CPU version 2.5+", "Cortex-A57"}
    assert report["hardware"]["memory"][0]["resources"][0]["range"] == 1 << 30  # installed, not MemTotal
    inv = manifest(artifacts_dir)["artifacts"][artifact]["inventory"]
    assert (inv["verdict"], inv["result"], inv["policy"], inv["differences"]) == ("match", "pass", "record", [])
    assert inv["report"] == f"{artifact}/inventory.json"
    log = (artifacts_dir / artifact / "boot.log").read_text(errors="replace")
    assert "cim: inventory: QEMU " in log  # the host's one-line summary on its console
    assert "verdict: matches the inventory" in log
    assert "probe inventory: ok" in proc.stdout


@pytest.mark.nix
@pytest.mark.vm
@needs_demo
def test_other_hardware_than_declared(demo_domain: Path, artifacts_dir: Path, doit: DoitRunner) -> None:
    """The VM gets 2 GiB, two disks and a display adapter while the inventory says 1 GiB and one disk: record keeps
    the differences, enforce fails naming each, and a policy change alone boots no VM."""

    def bigger(data: Any) -> None:
        data["hosts"]["vhost-dev"]["boot"].update(
            memory_mib=2048, disks=[{"size_gib": 1}, {"size_gib": 1}], displays=["std"]
        )
        # A host that installs itself from the LAN carries the policy in its netboot image, and the provisioner
        # (vhost-dev) carries that image: without it, the policy is the reconcile's alone.
        del data["hosts"]["vhost-2"]

    edit(demo_domain, bigger)
    proc = doit(demo_domain, "boot:vhost-dev-iso", check=True)  # record (the demo's policy): the boot passes
    inv = manifest(artifacts_dir)["artifacts"]["vhost-dev-iso"]["inventory"]
    assert inv["verdict"] == "differs" and inv["result"] == "pass"
    diffs = {d["field"]: d for d in inv["differences"]}
    assert diffs["memory_gib"] == {"field": "memory_gib", "declared": "1 GiB", "detected": "2 GiB", "kind": "differs"}
    assert diffs["disks.vdb"]["kind"] == "unexpected"  # a disk that is not declared
    assert diffs["gpus"]["kind"] == "unexpected" and "1234:1111" in diffs["gpus"]["detected"]  # a display adapter
    assert set(diffs) == {"memory_gib", "disks.vdb", "gpus"}
    log = artifacts_dir / "vhost-dev-iso" / "boot.log"
    assert "memory_gib: declared 1 GiB, detected 2 GiB (differs)" in log.read_text(errors="replace")
    console = log.read_text(errors="replace").split("=== cim-pipeline")[0]

    # Only the policy changes: the reconcile runs again, no VM boots, and enforce fails naming each difference.
    edit(demo_domain, lambda data: data.update(inventory="enforce"))
    proc = doit(demo_domain, "boot:vhost-dev-iso")
    assert proc.returncode != 0
    ran = executed(proc.stdout)  # domain.json is a flake file: validate and eval run, and find the same image
    assert "boot:vhost-dev-iso" in ran and "build:vhost-dev-iso" not in ran, proc.stdout
    assert "no VM" in proc.stdout and "booting" not in proc.stdout, proc.stdout
    said = proc.stdout + proc.stderr
    assert "memory_gib: declared 1 GiB, detected 2 GiB (differs)" in said and "Traceback" not in said
    assert "disks.vdb: declared (none), detected /dev/vdb 1 GiB (unexpected)" in said
    assert "gpus: declared (none), detected QEMU Standard VGA [1234:1111]" in said
    inv = manifest(artifacts_dir)["artifacts"]["vhost-dev-iso"]["inventory"]
    assert (inv["policy"], inv["result"]) == ("enforce", "fail")
    assert log.read_text(errors="replace").split("=== cim-pipeline")[0] == console  # the same boot's console

    edit(demo_domain, lambda data: data.update(inventory="warn"))
    proc = doit(demo_domain, "boot:vhost-dev-iso", check=True)
    assert "no VM" in proc.stdout and "warning: inventory: memory_gib" in proc.stdout
    assert "booting" not in proc.stdout
    assert executed(doit(demo_domain, "boot:vhost-dev-iso", check=True).stdout) == []  # and then nothing to do

    # cim inventory shows it side by side; --write brings domain.json in line with what the VM has.
    shown = cim("inventory", "vhost-dev", "--domain", str(demo_domain), "--artifacts", str(artifacts_dir))
    assert shown.returncode == 0, shown.stderr
    assert "memory_gib" in shown.stdout and "differs" in shown.stdout and "unexpected" in shown.stdout
    wrote = cim("inventory", "vhost-dev", "--domain", str(demo_domain), "--artifacts", str(artifacts_dir), "--write")
    assert wrote.returncode == 0, wrote.stderr
    assert "now it matches the inventory" in wrote.stdout
    hw = json.loads((demo_domain / "domain.json").read_text())["hosts"]["vhost-dev"]["hardware"]
    assert hw["memory_gib"] == 2 and [d["device"] for d in hw["disks"]] == ["/dev/vda", "/dev/vdb"]
    assert hw["gpus"] == [{"model": "QEMU Standard VGA", "pci_id": "1234:1111"}]
    assert cim("validate", str(demo_domain)).returncode == 0
