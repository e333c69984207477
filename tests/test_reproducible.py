"""Reproducible images and content-addressed results.

Unit tests for the pure parts (tree comparison, derivation reading, the pass store); `nix` tests that rebuild the
demo's images with `nix build --rebuild` (check:<artifact>) and show a derivation that is not reproducible caught with
the file that differs; a `vm` test that deletes artifacts/ after a full run and gets everything back with no VM.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import pytest
from cimtest.demo import DEMO, DoitRunner, busybox_derivation, executed, needs_demo
from cimtest.procs import nix_build_dirs

from pipeline import nix, reproduce
from pipeline.process import run
from pipeline.results import PassStore

# -- pure parts -------------------------------------------------------------------------------------------------------


def tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def test_first_difference_names_the_first_differing_file_and_byte(tmp_path: Path) -> None:
    base = {"iso/a.iso": b"\0" * 5000 + b"x", "nix-support/hydra-build-products": b"file iso a\n"}
    a = tree(tmp_path / "a", base)
    same = tree(tmp_path / "same", base)
    assert reproduce.first_difference(a, same) is None

    b = tree(tmp_path / "b", {**base, "iso/a.iso": b"\0" * 4097 + b"y" * 904})
    assert reproduce.first_difference(a, b) == "iso/a.iso: byte 4097 differs"

    longer = tree(tmp_path / "longer", {**base, "iso/a.iso": base["iso/a.iso"] + b"!"})
    assert reproduce.first_difference(a, longer) == "iso/a.iso: 5001 bytes in the first build, 5002 in the rebuild"

    extra = tree(tmp_path / "extra", {**base, "iso/b.iso": b""})
    assert reproduce.first_difference(a, extra) == "iso/b.iso: only in the rebuild"

    exe = tree(tmp_path / "exe", base)
    (exe / "iso/a.iso").chmod(0o755)
    assert reproduce.first_difference(a, exe) == "iso/a.iso: executable in one build only"


def write_drv(path: Path, outputs: list[tuple[str, str, str, str]], inputs: list[str]) -> str:
    outs = ",".join(f'("{n}","{p}","{algo}","{h}")' for n, p, algo, h in outputs)
    ins = ",".join(f'("{d}",["out"])' for d in inputs)
    path.write_text(f'Derive([{outs}],[{ins}],["/nix/store/x-builder.sh"],"x86_64-linux","/bin/sh",[],[])')
    return str(path)


def test_built_from_walks_inputs_nearest_first_and_skips_fixed_outputs(tmp_path: Path) -> None:
    fod = write_drv(tmp_path / "input.drv", [("out", "/nix/store/i", "r:sha256", "abc")], [])
    initrd = write_drv(tmp_path / "initrd.drv", [("out", "/nix/store/n", "", "")], [fod])
    system = write_drv(tmp_path / "system.drv", [("out", "/nix/store/s", "", "")], [fod, initrd])
    image = write_drv(tmp_path / "image.drv", [("out", "/nix/store/m", "", "")], [system, fod])
    assert nix.built_from(image) == [image, system, initrd]
    assert nix.built_from(image, limit=2) == [image, system]

    # At one depth the system's own parts come before the packages: what the image is assembled from first.
    package = write_drv(
        tmp_path / "0000000000000000000000000000000a-bash-5.2.drv", [("out", "/nix/store/b", "", "")], []
    )
    toplevel = write_drv(
        tmp_path / "zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz-nixos-system-vhost-dev.drv", [("out", "/nix/store/t", "", "")], []
    )
    iso = write_drv(tmp_path / "iso.drv", [("out", "/nix/store/o", "", "")], [package, toplevel])
    assert nix.built_from(iso, limit=2) == [iso, toplevel]


def test_pass_store_keeps_passes_with_their_logs(tmp_path: Path) -> None:
    store = PassStore(tmp_path / "results")
    log = tmp_path / "boot.log"
    log.write_text("cim: vhost-dev boot complete\n")
    assert store.find("boot", "img", "spec", ("boot.log",)) is None
    with pytest.raises(ValueError):
        store.keep("boot", "img", "spec", {"result": "fail"}, {"boot.log": log})
    kept = store.keep("boot", "img", "spec", {"result": "pass", "seconds": 12.5}, {"boot.log": log})
    assert kept == tmp_path / "results" / "boot" / "img-spec"

    found = store.find("boot", "img", "spec", ("boot.log",))
    assert found is not None and found.outcome["seconds"] == 12.5
    assert store.find("boot", "img", "other-spec", ("boot.log",)) is None
    assert store.find("boot", "other-image", "spec", ("boot.log",)) is None
    assert store.find("boot", "img", "spec", ("boot.log", "inventory.json")) is None, "every log must be kept"

    dest = tmp_path / "artifacts" / "vhost-dev-iso" / "boot.log"
    outcome = found.restore({"boot.log": dest})
    assert dest.read_text() == log.read_text()
    assert outcome["result"] == "pass" and outcome["reused"] == str(kept)


# -- with nix ---------------------------------------------------------------------------------------------------------


@pytest.mark.nix
@needs_demo
def test_check_rebuilds_both_images_bit_for_bit(
    demo_domain: Path, artifacts_dir: Path, doit: DoitRunner, tmp_path: Path
) -> None:
    doit(demo_domain, "build", check=True)
    # The rebuilds run in build directories on another file system (tmpfs, where the first builds ran on the
    # disk's): readdir order, block counts and inode numbers differ there, and must not reach the bytes.
    shm = Path("/dev/shm")
    builddir = shm / f"cim-check-{uuid.uuid4().hex[:8]}" if shm.is_dir() and os.access(shm, os.W_OK) else tmp_path
    builddir.mkdir(exist_ok=True)
    try:
        proc = doit(demo_domain, "check:vhost-dev-iso", "check:vhost-pi-sd", env={"TMPDIR": str(builddir)}, check=True)
    finally:
        shutil.rmtree(builddir, ignore_errors=True)
    ran = executed(proc.stdout)
    assert {"check:vhost-dev-iso", "check:vhost-pi-sd"} <= set(ran)
    assert not any(t.startswith("boot:") for t in ran), "check builds and rebuilds, it boots nothing"
    assert "may not be deterministic" not in proc.stdout + proc.stderr
    manifest = json.loads((artifacts_dir / "manifest.json").read_text())
    for name in ("vhost-dev-iso", "vhost-pi-sd"):
        record = manifest["artifacts"][name]
        assert record["reproducible"] is True
        check = record["check"]
        assert check["sha256"] == record["sha256"]
        # The image and the system it is made from were both rebuilt (Nix's --rebuild does one at a time).
        assert check["derivations"][0] == record["drvPath"]
        assert any("-nixos-system-" in d for d in check["derivations"][1:]), check
    # Nothing changed: the check is up to date.
    assert "check:vhost-dev-iso" not in executed(doit(demo_domain, "check:vhost-dev-iso", check=True).stdout)


@pytest.mark.nix
@needs_demo
def test_a_derivation_that_is_not_reproducible_is_caught_with_the_file(tmp_path: Path) -> None:
    """A builder that writes chance into one file of two: the check names that file."""
    chance = "${bb} mkdir $out && echo same > $out/a && ${bb} cat /proc/sys/kernel/random/uuid > $out/b"
    drv = busybox_derivation(tmp_path / "flake", "cim-test-chance", chance)
    result = reproduce.check(drv)
    assert result.reproducible is False
    assert result.derivation == drv and result.derivations == [drv]
    assert result.differs == "b: byte 0 differs" or result.differs.startswith("b: "), result.differs
    assert not Path(nix.build(drv).outputs["out"] + ".check").exists(), "Nix's differing copy is removed"
    assert nix_build_dirs(drv) == [], "the build directory Nix kept is removed too"
    record = result.record("0" * 64)
    assert record["reproducible"] is False and record["differs"].startswith("b: ")


# -- with VMs ---------------------------------------------------------------------------------------------------------


@pytest.mark.nix
@pytest.mark.vm
@needs_demo
def test_deleted_artifacts_come_back_from_kept_results_without_a_vm(
    demo_domain: Path, artifacts_dir: Path, doit: DoitRunner
) -> None:
    first = doit(demo_domain, timeout=2400, check=True)  # the default run: build, boot, install, deploy, release
    assert "boot test passed" in first.stdout
    before = json.loads((artifacts_dir / "manifest.json").read_text())["artifacts"]
    logs = {p.relative_to(artifacts_dir): p.read_bytes() for p in artifacts_dir.rglob("*.log") if p.name != "build.log"}
    assert {"vhost-dev-iso/boot.log", "vhost-pi-sd/boot.log", "vhost-dev-iso/install.log"} <= {str(p) for p in logs}

    shutil.rmtree(artifacts_dir)
    again = doit(demo_domain, timeout=900, check=True)
    ran = executed(again.stdout)
    assert {
        "build:vhost-dev-iso",
        "build:vhost-pi-sd",
        "boot:vhost-dev-iso",
        "boot:vhost-pi-sd",
        "install:vhost-dev",
        "boot:vhost-2-netboot",
        "install:vhost-2",
        "deploy:vhost-dev",
        "deploy:vhost-2",
        "release",
    } <= set(ran), again.stdout
    assert "booting" not in again.stdout and "phase installer" not in again.stdout, "no VM may start"
    assert "up on the LAN" not in again.stdout, "not even the provisioner"
    # three boots (ISO, SD, netboot), two installs (from the ISO, from the LAN) and two deploys, each from its pass
    assert again.stdout.count("no VM") == 7, again.stdout

    after = json.loads((artifacts_dir / "manifest.json").read_text())["artifacts"]
    for name, record in before.items():
        assert after[name]["sha256"] == record["sha256"]
        assert after[name]["boot"]["result"] == "pass" and "reused" in after[name]["boot"]
    assert after["vhost-dev-iso"]["install"]["result"] == after["vhost-2-netboot"]["install"]["result"] == "pass"
    for rel, data in logs.items():
        assert (artifacts_dir / rel).read_bytes() == data, f"{rel} re-published as it was"
    proc = run(["sha256sum", "-c", "SHA256SUMS"], timeout=300, cwd=artifacts_dir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    published = [r["file"] for r in after.values()] + [p["file"] for r in after.values() for p in r.get("parts") or []]
    assert sorted(proc.stdout.splitlines()) == sorted(f"{file}: OK" for file in published)
    assert os.path.getsize(artifacts_dir / after["vhost-pi-sd"]["file"]) == after["vhost-pi-sd"]["size"]


# -- set-up -----------------------------------------------------------------------------------------------------------


@pytest.mark.nix
@needs_demo
def test_setup_writes_a_nix_conf_that_keeps_the_sandbox_on(tmp_path: Path) -> None:
    """setup.sh's nix.conf, written to CIM_NIX_CONF (never /etc/nix here): no `sandbox = false`, and Nix reading it
    sandboxes builds; a second run leaves it alone."""
    conf = tmp_path / "etc-nix" / "nix.conf"
    env = {**os.environ, "CIM_SKIP_APT": "1", "CIM_NIX_CONF": str(conf)}
    setup = [str(DEMO.parent.parent / "scripts" / "setup.sh")]
    first = run(setup, timeout=900, env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    assert f"wrote {conf}" in first.stdout
    text = conf.read_text()
    assert "sandbox" not in text, text
    assert "substituters =\n" in text and "experimental-features = nix-command flakes\n" in text
    shown = run(["nix", "show-config", "--json"], timeout=60, env={**os.environ, "NIX_CONF_DIR": str(conf.parent)})
    config = json.loads(shown.stdout)
    assert config["sandbox"]["value"] is True
    assert config["substituters"]["value"] == []

    again = run(setup, timeout=900, env=env)
    assert again.returncode == 0 and "wrote" not in again.stdout, again.stdout
    assert conf.read_text() == text
