"""deploy:<host>: the installed machine takes its next generation over SSH and reboots into it; a generation whose boot
never completes is rolled back by systemd-boot's boot counting, and the deploy fails saying so."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from cimtest.demo import DEMO, ROOT, DoitRunner, executed, needs_demo

from pipeline import deploy
from pipeline.context import run_state_dir

BUSYBOX = Path(json.loads((DEMO / "inputs.json").read_text())["x86_64-linux"]["busybox"]["path"]) / "bin" / "busybox"
CIM_STORE = DEMO / "rootfs" / "sbin" / "cim-store"


def manifest(artifacts: Path) -> dict:
    return json.loads((artifacts / "manifest.json").read_text())


# -- pure ---------------------------------------------------------------------------------------------------------


CONSOLE = (
    "[    0.000000] Linux version 6.1.0 (x)\r\n"
    "cim: h1 boot complete (x86_64-linux, x86_64) generation 1 system /nix/store/aaa-nixos-system-h1\r\n"
    "[   12.0] reboot: Restarting system\r\n"
    "[    0.000000] Linux version 6.1.0 (x)\r\n"
    "cim: boot check broken failed: no\r\n"
    "[    0.000000] Linux version 6.1.0 (x)\r\n"
    "cim: h1 boot complete (x86_64-linux, x86_64) generation 1 system /nix/store/aaa-nixos-system-h1\r\n"
)


def test_the_boot_complete_line_names_the_generation_and_the_boots_before_it_are_counted() -> None:
    first, boots = deploy.booted(CONSOLE, "h1", 0)
    assert first is not None and deploy.generation_of(first).number == 1 and boots == 1
    mark = CONSOLE.index("reboot:")
    again, boots = deploy.booted(CONSOLE, "h1", mark)
    assert again is not None and again.start() > mark and boots == 2
    assert deploy.generation_of(again).system == "/nix/store/aaa-nixos-system-h1"
    # A line still being written (no newline yet) is not a boot that completed.
    partial, _ = deploy.booted(CONSOLE.rstrip("\r\n"), "h1", mark)
    assert partial is None


def test_the_next_generation_is_a_module_and_the_broken_one_adds_a_failing_boot_check() -> None:
    assert "cim/deployment" in deploy.modules("h1", "next")
    assert "boot-checks.d/broken" not in deploy.modules("h1", "next")
    assert "boot-checks.d/broken" in deploy.modules("h1", "broken")


@pytest.mark.skipif(not BUSYBOX.exists(), reason="the demo inputs are not prepared: run scripts/setup.sh")
def test_both_ends_compute_the_same_digest(tmp_path: Path) -> None:
    """The pipeline's digest of a store path and the machine's (`cim-store digest`, run by the demo's busybox)."""
    tree = tmp_path / "p"
    (tree / "bin").mkdir(parents=True)
    (tree / "bin" / "tool").write_text("#!/bin/sh\necho hi\n")
    (tree / "bin" / "tool").chmod(0o755)
    (tree / "data-file").write_bytes(os.urandom(3000))
    (tree / "data.d").mkdir()
    (tree / "data.d" / "a b").write_text("spaces")
    (tree / "link").symlink_to("bin/tool")
    applets = tmp_path / "applets"
    applets.mkdir()
    subprocess.run([str(BUSYBOX), "--install", "-s", str(applets)], check=True, timeout=30)
    machine = subprocess.run(
        [str(BUSYBOX), "sh", str(CIM_STORE), "digest", str(tree)],
        env={"PATH": str(applets)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.strip()
    assert machine == deploy.path_digest(tree)
    (tree / "data.d" / "a b").write_text("changed")
    assert deploy.path_digest(tree) != machine


def test_an_unknown_generation_is_one_paragraph(doit: DoitRunner) -> None:
    proc = doit(DEMO, "generation=bogus", "list")
    assert proc.returncode == 2
    assert "generation='bogus' is not a generation deploy:<host> knows" in proc.stderr
    assert "Traceback" not in proc.stderr and "\n" not in proc.stderr.strip()


# -- real: the installed disk, SSH, the reboots ---------------------------------------------------------------------


@pytest.mark.nix
@pytest.mark.vm
@needs_demo
def test_deploy_boots_the_next_generation_and_runs_again_only_when_the_system_changes(
    demo_domain: Path, artifacts_dir: Path, doit: DoitRunner
) -> None:
    first = doit(demo_domain, "deploy:vhost-dev", check=True, timeout=1500)
    assert {"install:vhost-dev", "deploy:vhost-dev"} <= set(executed(first.stdout))
    record = manifest(artifacts_dir)["artifacts"]["vhost-dev-iso"]["deploy"]
    assert record["result"] == "pass" and record["account"] == "cim" and record["variant"] == "next"
    before, target, after = record["before"], record["target"], record["after"]
    assert before["number"] == 1 and target["number"] == 2 and after == target
    assert before["system"] != target["system"]
    assert record["paths_copied"] >= 1 and record["bytes_copied"] > 1_000_000
    assert set(record["phases"]) == {"boot", "copy", "switch", "reboot", "probes"}
    assert {p["probe"]: p["ok"] for p in record["probes"]} == {
        "dns": True,
        "nats": True,
        "stats": True,
        "ssh": True,
        "current-system": True,
    }
    log = (artifacts_dir / "vhost-dev-iso" / "deploy.log").read_text(errors="replace")
    # The machine rebooted by itself into generation 2, which blessed its counted entry.
    assert re.search(rf"^cim: vhost-dev boot complete .* generation 2 system {target['system']}\r?$", log, re.M)
    assert "cim-bless-boot: nixos-generation-2+2-1.conf marked good: nixos-generation-2.conf" in log
    junit = (artifacts_dir / "junit.xml").read_text()
    assert 'classname="vhost-dev-iso.deploy"' in junit

    # Nothing changed: nothing runs.
    again = doit(demo_domain, "deploy:vhost-dev", check=True)
    assert executed(again.stdout) == []

    # vhost-dev's system changes (its reporter's interval): it is installed and deployed again.
    domain = json.loads((demo_domain / "domain.json").read_text())
    domain["hosts"]["vhost-dev"]["stats_interval_s"] = 4
    (demo_domain / "domain.json").write_text(json.dumps(domain))
    third = doit(demo_domain, "deploy:vhost-dev", check=True, timeout=1500)
    assert {"install:vhost-dev", "deploy:vhost-dev"} <= set(executed(third.stdout))
    newer = manifest(artifacts_dir)["artifacts"]["vhost-dev-iso"]["deploy"]
    assert newer["result"] == "pass" and newer["target"]["system"] != target["system"]


@pytest.mark.nix
@pytest.mark.vm
@needs_demo
def test_a_broken_generation_rolls_back_by_itself_and_fails_the_deploy(
    demo_domain: Path, artifacts_dir: Path, doit: DoitRunner
) -> None:
    proc = doit(demo_domain, "generation=broken", "deploy:vhost-dev", timeout=1800)
    assert proc.returncode != 0, proc.stdout
    out = proc.stdout + proc.stderr
    assert "rolled back to generation 1" in out, out
    assert "failed to boot 3 time(s)" in out and "the boot loader fell back by itself" in out
    assert "Afterwards the machine is up on generation 1" in out
    assert "The last failed boot's console:" in out and "cim: boot check broken failed" in out
    assert "Traceback" not in out
    log = (artifacts_dir / "vhost-dev-iso" / "deploy.log").read_text(errors="replace")
    # Three tries of generation 2, each ending in its failed boot check, then generation 1 with no one stepping in.
    assert len(re.findall(r"^cim: boot check broken failed", log, re.M)) == 3
    assert re.search(r"^cim: vhost-dev boot complete .* generation 1 system ", log[log.rindex("boot check") :], re.M)
    deployed = _record(demo_domain, artifacts_dir)["deploy"]
    assert deployed["result"] == "fail" and deployed["rolled_back_to"] == 1 and deployed["failed_boots"] == 3
    assert deployed["after"]["number"] == 1 and deployed["target"]["number"] == 2
    # A failed deploy records no pass: the default run deploys the good generation afterwards.
    good = doit(demo_domain, "deploy:vhost-dev", check=True, timeout=1500)
    assert "deploy:vhost-dev" in executed(good.stdout)


def _record(domain: Path, artifacts: Path) -> dict:
    """The artifact's record in the run's state (a failed deploy is recorded before the task fails)."""
    state = run_state_dir(ROOT, domain, artifacts)
    return json.loads((state / "records" / "vhost-dev-iso.json").read_text())


# -- configs/cim: the same through NixOS's path (parse-checked here) --------------------------------------------------

CIM = ROOT / "configs" / "cim"


def test_the_cim_domain_counts_boots_and_runs_the_checks_the_broken_generation_adds() -> None:
    assert "./boot-counting.nix" in (CIM / "configuration.nix").read_text()
    module = (CIM / "boot-counting.nix").read_text()
    assert re.search(r"bootCounting = .*\{\s*enable = true;\s*tries = 3;", module, re.S)
    assert 'requiredBy = [ "boot-complete.target" ]' in module and 'FailureAction = "reboot"' in module
    # The directory the broken generation writes into is the one the module runs.
    assert "/etc/cim/boot-checks.d/" in module and "cim/boot-checks.d/broken" in deploy.modules("h", "broken")
    subprocess.run(["nix-instantiate", "--parse", str(CIM / "boot-counting.nix")], check=True, capture_output=True)
    subprocess.run(["bash", "-n", str(CIM / "deploy.sh")], check=True, timeout=30)
    script = (CIM / "deploy.sh").read_text()
    assert "nix copy --to" in script and "switch-to-configuration boot" in script
