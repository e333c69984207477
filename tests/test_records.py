"""Typed artifact records: one writer and one reader (pipeline.artifacts.Records), the manifest built from them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest

from pipeline.artifacts import (
    MANIFEST,
    SUMS,
    ArtifactError,
    ArtifactRecord,
    BootResult,
    BuildInfo,
    InstallResult,
    InventoryDifference,
    InventoryResult,
    ProbeResult,
    Records,
    manifest_schema,
    publish_file,
)

# The keys a demo run's manifest.json had before the records were typed: tools reading it rely on them.
MANIFEST_KEYS = {"artifacts", "domain", "domain_dir", "fqdn", "generated"}
RECORD_KEYS = {"boot", "build", "drvPath", "file", "format", "host", "outPath", "sha256", "size", "system", "xxh3"}
BUILD_KEYS = {"log", "reason", "sandbox", "seconds", "strategy"}
BOOT_KEYS = {"accel", "fingerprint", "image_xxh3", "log", "probes", "result", "seconds"}
PROBE_KEYS = {"detail", "ok", "probe", "seconds"}
INSTALL_KEYS = {"checks", "disk_mib", "image_xxh3", "log", "phases", "plan", "result", "seconds"}


def image_record(name: str, rel: str, sha256: str, xxh3: str, size: int) -> ArtifactRecord:
    host, fmt = name.rsplit("-", 1)
    return ArtifactRecord(
        host=host,
        format=fmt,
        system="x86_64-linux",
        drvPath=f"/nix/store/x-{name}.drv",
        outPath=f"/nix/store/x-{name}",
        file=rel,
        size=size,
        sha256=sha256,
        xxh3=xxh3,
        build=BuildInfo(strategy="native", reason="test", seconds=1.0, log=f"{name}/build.log"),
    )


def boot_result(xxh3: str, result: str = "pass") -> BootResult:
    return BootResult(
        result=result,
        accel="tcg",
        log="a/boot.log",
        image_xxh3=xxh3,
        seconds=12.5,  # type: ignore[arg-type]
        probes=[ProbeResult(probe="console", ok=True, seconds=11.0, detail="console: 'cim: …'")],
    )


def publish(tmp_path: Path, records: Records, name: str, rel: str) -> ArtifactRecord:
    source = tmp_path / "src" / name
    source.parent.mkdir(exist_ok=True)
    source.write_bytes(os.urandom(4096) + name.encode())
    sha, xxh, size = publish_file(source, records.artifacts_dir / rel)
    record = image_record(name, rel, sha, xxh, size)
    records.save_build(name, record)
    return record


def test_manifest_keeps_its_shape_and_validates_against_its_schema(tmp_path: Path) -> None:
    records = Records(
        tmp_path / "state", tmp_path / "artifacts", {"domain": "cim demo", "fqdn": "cim.local", "domain_dir": "/d"}
    )
    dev = publish(tmp_path, records, "vhost-dev-iso", "vhost-dev-iso/nixos-vhost-dev.iso")
    publish(tmp_path, records, "vhost-pi-sd", "vhost-pi-sd/nixos-sd.img")
    records.save_boot("vhost-dev-iso", boot_result(dev.xxh3))
    records.save_install(
        "vhost-dev-iso",
        InstallResult(
            result="pass",
            log="vhost-dev-iso/install.log",
            image_xxh3=dev.xxh3,
            disk_mib=1024,
            plan=["1: ESP"],
            seconds=40.0,
            phases={"installer": 20.0, "disk-boot": 20.0},
            checks=["/ on /dev/vda3"],
        ),
    )
    records.save_inventory(
        "vhost-dev-iso",
        InventoryResult(
            result="pass",
            verdict="differs",
            policy="record",
            report="vhost-dev-iso/inventory.json",
            image_xxh3=dev.xxh3,
            summary="1 difference(s) from the inventory (policy record)",
            log="vhost-dev-iso/boot.log",
            differences=[InventoryDifference(field="memory_gib", declared="1 GiB", detected="2 GiB", kind="differs")],
        ),
    )

    manifest = json.loads((records.artifacts_dir / MANIFEST).read_text())
    jsonschema.validate(manifest, manifest_schema())
    assert set(manifest) == MANIFEST_KEYS
    dev_json = manifest["artifacts"]["vhost-dev-iso"]
    assert set(dev_json) == RECORD_KEYS | {"install", "inventory"}
    assert dev_json["inventory"]["differences"] == [
        {"field": "memory_gib", "declared": "1 GiB", "detected": "2 GiB", "kind": "differs"}
    ]
    assert set(dev_json["build"]) == BUILD_KEYS
    assert set(dev_json["boot"]) == BOOT_KEYS, "no 'error' key on a pass"
    assert set(dev_json["boot"]["probes"][0]) == PROBE_KEYS
    assert set(dev_json["install"]) == INSTALL_KEYS
    assert set(manifest["artifacts"]["vhost-pi-sd"]) == RECORD_KEYS - {"boot"}, "no result, no key"


@pytest.mark.skipif(shutil.which("sha256sum") is None, reason="needs coreutils' sha256sum")
def test_sha256sums_pass_coreutils_and_follow_the_records(tmp_path: Path) -> None:
    records = Records(tmp_path / "state", tmp_path / "artifacts", {"domain": "d", "fqdn": "d.local", "domain_dir": "/"})
    publish(tmp_path, records, "vhost-dev-iso", "vhost-dev-iso/a.iso")
    publish(tmp_path, records, "vhost-pi-sd", "vhost-pi-sd/b.img")
    check = subprocess.run(
        ["sha256sum", "-c", SUMS], cwd=records.artifacts_dir, capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0 and check.stdout.count(": OK") == 2, check.stdout + check.stderr

    records.drop({"vhost-dev-iso"})
    assert "vhost-pi-sd" not in (records.artifacts_dir / SUMS).read_text()
    manifest = records.rebuild()
    assert list(manifest.artifacts) == ["vhost-dev-iso"]
    assert records.read_manifest() == manifest


def test_results_belong_to_the_bytes_they_tested(tmp_path: Path) -> None:
    records = Records(tmp_path / "state", tmp_path / "artifacts", {"domain": "d", "fqdn": "d.local", "domain_dir": "/"})
    first = publish(tmp_path, records, "a-iso", "a-iso/a.iso")
    records.save_boot("a-iso", boot_result(first.xxh3))
    records.save_build("a-iso", first)  # the same bytes published again: the result stays
    assert records.load("a-iso") is not None and records.load("a-iso").boot is not None  # type: ignore[union-attr]
    publish(tmp_path, records, "a-iso", "a-iso/a.iso")  # new bytes: the old result goes
    reloaded = records.load("a-iso")
    assert reloaded is not None and reloaded.boot is None and reloaded.xxh3 != first.xxh3
    assert "boot" not in json.loads((records.artifacts_dir / MANIFEST).read_text())["artifacts"]["a-iso"]


def test_damaged_records_read_as_missing_and_a_result_needs_a_build(tmp_path: Path) -> None:
    records = Records(tmp_path / "state", tmp_path / "artifacts", {"domain": "d", "fqdn": "d.local", "domain_dir": "/"})
    (records.dir).mkdir(parents=True)
    (records.dir / "x.json").write_text("{not json")
    (records.dir / "y.json").write_text('{"host": "only"}')
    assert records.load("x") is None and records.load("y") is None and records.all() == {}
    with pytest.raises(ArtifactError) as caught:
        records.save_boot("x", boot_result("0"))
    assert "no build record" in str(caught.value) and "Run `doit` again" in caught.value.report()
