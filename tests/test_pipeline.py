"""Integration: the real `doit` over a private copy of the demo domain, with real nix and real QEMU.

Each test has its own domain copy and artifacts directory (hence its own doit state under .cim/state/), so they run in
parallel under `pytest -n auto`.  VM boots are the expensive part (~20 s each under TCG), so one test walks through the
whole caching story with the fewest boots it can: vhost-dev, vhost-pi, then vhost-dev again after a change.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import xxhash
from cimtest.demo import ROOT, DoitRunner, executed, needs_demo

from pipeline.process import run

BOOT_COMPLETE = "cim: vhost-dev boot complete"


def sha256sum(path: Path) -> str:
    """The digest as coreutils computes it, not as the pipeline does."""
    out = subprocess.run(["sha256sum", str(path)], capture_output=True, text=True, check=True, timeout=120).stdout
    return out.split()[0]


def sha256sum_check(artifacts: Path) -> str:
    proc = subprocess.run(
        ["sha256sum", "-c", "--strict", "SHA256SUMS"], cwd=artifacts, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def manifest(artifacts: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((artifacts / "manifest.json").read_text())
    return data


def snapshot(directory: Path) -> dict[str, tuple[str, int, int]]:
    """Every entry under `directory`: (sha256 of the bytes or 'dir', mode, mtime_ns) by relative path."""
    entries: dict[str, tuple[str, int, int]] = {}
    for path in sorted(directory.rglob("*")):
        stat = path.lstat()
        content = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
        entries[str(path.relative_to(directory))] = (content, stat.st_mode, stat.st_mtime_ns)
    return entries


def set_json(path: Path, keys: list[str | int], value: Any) -> None:
    data = json.loads(path.read_text())
    node = data
    for key in keys[:-1]:
        node = node[key]
    node[keys[-1]] = value
    path.write_text(json.dumps(data, indent=2) + "\n")


def manifest_schema_from_cli() -> dict[str, Any]:
    """The schema as a user gets it: `cim schema manifest`."""
    proc = run([sys.executable, "-m", "pipeline.cli", "schema", "manifest"], timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    schema: dict[str, Any] = json.loads(proc.stdout)
    return schema


def assert_booted(artifacts: Path, artifact: str, host: str, fmt: str) -> dict[str, Any]:
    """The artifact is published, its manifest record matches coreutils' sha256, and its boot test passed."""
    published = manifest(artifacts)
    jsonschema.validate(published, manifest_schema_from_cli())
    record: dict[str, Any] = published["artifacts"][artifact]
    image = artifacts / record["file"]
    assert image.parent == artifacts / artifact
    assert image.suffix == {"iso": ".iso", "sd": ".img"}[fmt]
    assert image.is_file() and image.stat().st_size == record["size"] > 1 << 20
    assert (record["host"], record["format"]) == (host, fmt)
    assert record["drvPath"].startswith("/nix/store/") and record["drvPath"].endswith(".drv")
    assert record["outPath"].startswith("/nix/store/")
    assert record["sha256"] == sha256sum(image)
    assert record["xxh3"] == xxhash.xxh3_128(image.read_bytes()).hexdigest()
    boot = record["boot"]
    assert boot["result"] == "pass", boot
    assert boot["log"] == f"{artifact}/boot.log" and boot["seconds"] > 0

    console = (artifacts / artifact / "boot.log").read_text(errors="replace")
    assert f"cim: {host} boot complete" in console
    kernel = re.search(r"Linux version \d+\.\d+", console)
    assert kernel, "the kernel's own messages are in the log: it is the whole console"
    assert console.index(f"cim: {host} boot complete") > kernel.start()
    return record


@pytest.mark.nix
@pytest.mark.vm
@needs_demo
def test_boot_and_caching(demo_domain: Path, artifacts_dir: Path, doit: DoitRunner) -> None:
    """Boot the ISO, then show what each kind of change re-runs (three VM boots in all)."""
    # 1. One image, built and boot-tested, nothing else.
    proc = doit(demo_domain, "boot:vhost-dev-iso", check=True)
    assert executed(proc.stdout) == ["validate", "eval:vhost-dev", "build:vhost-dev-iso", "boot:vhost-dev-iso"]
    dev = assert_booted(artifacts_dir, "vhost-dev-iso", "vhost-dev", "iso")
    assert dev["system"] == "x86_64-linux"
    assert list(manifest(artifacts_dir)["artifacts"]) == ["vhost-dev-iso"]
    assert not (artifacts_dir / "vhost-pi-sd").exists()
    assert sha256sum_check(artifacts_dir).strip() == f"{dev['file']}: OK"
    iso = artifacts_dir / dev["file"]
    iso_stat = iso.stat()

    # 2. Nothing changed: nothing runs.
    proc = doit(demo_domain, "boot:vhost-dev-iso", check=True)
    assert executed(proc.stdout) == []

    # 3a. A comment in a .nix file: re-evaluated, the same drvPath, so no rebuild and no reboot.
    with (demo_domain / "lib" / "host.nix").open("a") as f:
        f.write("# a comment changes no derivation\n")
    proc = doit(demo_domain, "boot:vhost-dev-iso", check=True)
    ran = executed(proc.stdout)
    assert "eval:vhost-dev" in ran
    assert "build:vhost-dev-iso" not in ran and "boot:vhost-dev-iso" not in ran, proc.stdout
    assert (iso.stat().st_ino, iso.stat().st_mtime_ns) == (iso_stat.st_ino, iso_stat.st_mtime_ns)

    # 3b. Both images (the netboot test has its own, tests/test_netboot.py): vhost-dev's is up to date, so only
    # vhost-pi's is built and booted.
    proc = doit(demo_domain, "boot:vhost-dev-iso", "boot:vhost-pi-sd", check=True)
    ran = executed(proc.stdout)
    assert {"build:vhost-pi-sd", "boot:vhost-pi-sd"} <= set(ran)
    assert "build:vhost-dev-iso" not in ran and "boot:vhost-dev-iso" not in ran, proc.stdout
    pi = assert_booted(artifacts_dir, "vhost-pi-sd", "vhost-pi", "sd")
    assert pi["system"] == "aarch64-linux"
    assert sorted(manifest(artifacts_dir)["artifacts"]) == ["vhost-dev-iso", "vhost-pi-sd"]
    sd_image = artifacts_dir / pi["file"]
    sd_stat = sd_image.stat()

    # 3c. vhost-dev's hardware changes: its image is rebuilt and rebooted; vhost-pi's is left alone.
    set_json(demo_domain / "domain.json", ["hosts", "vhost-dev", "hardware", "memory_gib"], 2)
    proc = doit(demo_domain, "boot:vhost-dev-iso", "boot:vhost-pi-sd", check=True)
    ran = executed(proc.stdout)
    assert {"build:vhost-dev-iso", "boot:vhost-dev-iso"} <= set(ran), proc.stdout
    assert "build:vhost-pi-sd" not in ran and "boot:vhost-pi-sd" not in ran, proc.stdout
    new_dev = assert_booted(artifacts_dir, "vhost-dev-iso", "vhost-dev", "iso")
    assert new_dev["drvPath"] != dev["drvPath"] and new_dev["sha256"] != dev["sha256"]
    assert manifest(artifacts_dir)["artifacts"]["vhost-pi-sd"]["drvPath"] == pi["drvPath"]
    assert (sd_image.stat().st_ino, sd_image.stat().st_mtime_ns) == (sd_stat.st_ino, sd_stat.st_mtime_ns)
    assert sorted(sha256sum_check(artifacts_dir).splitlines()) == sorted(
        [f"{new_dev['file']}: OK", f"{pi['file']}: OK"]
    )

    # 4. Bad input after all that: refused up front, and the populated artifacts/ is untouched.
    before = snapshot(artifacts_dir)
    set_json(demo_domain / "domain.json", ["hosts", "vhost-dev", "hardware", "memroy_gib"], 4)
    bad = doit(demo_domain, "boot")
    assert bad.returncode != 0
    assert "memroy_gib" in bad.stderr and "Traceback" not in bad.stderr
    assert executed(bad.stdout) == []
    assert snapshot(artifacts_dir) == before


@pytest.mark.nix
@needs_demo
def test_build_one_image_runs_only_what_it_needs(demo_domain: Path, artifacts_dir: Path, doit: DoitRunner) -> None:
    proc = doit(demo_domain, "build:vhost-dev-iso", check=True)
    assert executed(proc.stdout) == ["validate", "eval:vhost-dev", "build:vhost-dev-iso"]
    assert "vhost-pi" not in proc.stdout
    record = manifest(artifacts_dir)["artifacts"]["vhost-dev-iso"]
    assert "boot" not in record, "built, not booted"
    assert record["sha256"] == sha256sum(artifacts_dir / record["file"])
    assert record["build"]["strategy"] == "native"
    assert sorted(p.name for p in artifacts_dir.iterdir()) == [
        "SHA256SUMS",
        "junit.xml",
        "manifest.json",
        "vhost-dev-iso",
    ]
    sha256sum_check(artifacts_dir)


def test_list_shows_the_task_graph_without_running_nix(
    demo_domain: Path, artifacts_dir: Path, doit: DoitRunner
) -> None:
    # Without nix (or QEMU) on PATH: loading the graph must run no subprocess.
    proc = doit(demo_domain, "list", "--all", env={"PATH": str(Path(sys.executable).parent)}, check=True)
    names = {line.split()[0] for line in proc.stdout.splitlines() if line.strip()}
    assert {
        "validate",
        "eval:vhost-dev",
        "eval:vhost-pi",
        "build:vhost-dev-iso",
        "boot:vhost-dev-iso",
        "build:vhost-pi-sd",
        "boot:vhost-pi-sd",
        "release",
    } <= names
    assert not {"build:vhost-pi-iso", "build:vhost-dev-sd", "boot:vhost-dev-sd"} & names
    assert list(artifacts_dir.iterdir()) == [], "listing tasks writes no artifact"


def _break_json(domain: Path) -> None:
    text = (domain / "domain.json").read_text()
    (domain / "domain.json").write_text(text.replace('"fqdn": "cim.local",', '"fqdn": "cim.local"', 1))


def _unknown_field(domain: Path) -> None:
    set_json(domain / "domain.json", ["hosts", "vhost-pi", "hardware", "memroy_gib"], 2)


def _shell_host_name(domain: Path) -> None:
    data = json.loads((domain / "domain.json").read_text())
    data["hosts"]["vhost;rm -rf"] = data["hosts"].pop("vhost-pi")
    (domain / "domain.json").write_text(json.dumps(data, indent=2))


def _clear_text_password(domain: Path) -> None:
    set_json(domain / "domain.json", ["accounts", 0, "password"], "hunter2")


def _sd_on_x86(domain: Path) -> None:
    set_json(domain / "domain.json", ["hosts", "vhost-dev", "images"], ["sd"])


BAD_INPUTS = {
    # name: (break it, the file named, what else the message must name)
    "malformed-json": (_break_json, "domain.json", ["malformed JSON at line 4, column 3"]),
    "unknown-field": (_unknown_field, "domain.json", ["hosts.vhost-pi.hardware.memroy_gib", "is not known"]),
    "shell-host-name": (_shell_host_name, "domain.json", ["hosts key 'vhost;rm -rf'", "RFC 1123"]),
    "clear-text-password": (_clear_text_password, "domain.json", ["accounts.0", "clear-text passwords"]),
    "sd-on-x86_64": (_sd_on_x86, "domain.json", ["hosts.vhost-dev", "'sd' image"]),
    "missing-domain-json": (lambda d: (d / "domain.json").unlink(), "domain.json", ["file not found"]),
    "missing-flake-nix": (lambda d: (d / "flake.nix").unlink(), "flake.nix", ["file not found"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
@pytest.mark.parametrize("args", [("build:vhost-dev-iso",), ()], ids=["build", "default"])
def test_bad_input_is_refused_and_touches_nothing(
    demo_domain: Path, artifacts_dir: Path, doit: DoitRunner, case: str, args: tuple[str, ...]
) -> None:
    # A previous run's artifacts, as far as the eye can tell: they must survive byte for byte.
    (artifacts_dir / "vhost-dev-iso").mkdir()
    (artifacts_dir / "vhost-dev-iso" / "nixos.iso").write_bytes(os.urandom(4096))
    (artifacts_dir / "manifest.json").write_text('{"artifacts": {}}\n')
    (artifacts_dir / "SHA256SUMS").write_text("")
    (artifacts_dir / "sentinel").write_text("left by a previous run\n")
    before = snapshot(artifacts_dir)

    breaks, file_name, needles = BAD_INPUTS[case]
    breaks(demo_domain)
    proc = doit(demo_domain, *args, timeout=120)

    assert proc.returncode != 0
    assert executed(proc.stdout) == [], proc.stdout
    stderr = proc.stderr.strip()
    assert "Traceback" not in stderr
    assert "\n" not in stderr, f"not one paragraph:\n{stderr}"
    assert str(demo_domain / file_name) in stderr
    for needle in needles:
        assert needle in stderr
    assert snapshot(artifacts_dir) == before


def _nix_syntax_error(domain: Path) -> None:
    with (domain / "lib" / "host.nix").open("a") as f:
        f.write("{ unbalanced = \n")


def _missing_disk_config(domain: Path) -> None:
    (domain / "disk-config.nix").unlink()


# Beyond the bad domain.json cases: a file a host names is missing, a .nix file does not parse.
DIRECTORY_CASES = {
    **{k: v[0] for k, v in BAD_INPUTS.items()},
    "nix-syntax": _nix_syntax_error,
    "missing-disk-config": _missing_disk_config,
}


@pytest.mark.nix
@needs_demo
@pytest.mark.parametrize("case", [None, *DIRECTORY_CASES], ids=["good", *DIRECTORY_CASES])
def test_cim_validate_and_doit_validate_agree(demo_domain: Path, doit: DoitRunner, case: str | None) -> None:
    """Both entry points call the one check of a domain directory: same verdict, same message."""
    if case is not None:
        DIRECTORY_CASES[case](demo_domain)
    cim = run([sys.executable, "-m", "pipeline.cli", "validate", str(demo_domain)], timeout=120, cwd=ROOT)
    task = doit(demo_domain, "validate", timeout=120)
    if case is None:
        assert cim.returncode == 0 and task.returncode == 0, cim.stderr + task.stdout + task.stderr
        return
    assert cim.returncode != 0 and task.returncode != 0
    message = cim.stderr.strip().splitlines()[0].removeprefix("error: ")
    assert "Traceback" not in cim.stderr + task.stderr
    assert message and message in task.stdout + task.stderr, f"cim: {message}\ndoit: {task.stdout}{task.stderr}"
