"""What users and CI do to a run, with the real doit, nix and QEMU on a private copy of the demo domain: signals and
kills during a build, a boot and an install (also under -n), two runs at once, shared and new artifacts
directories, full and read-only ones, Nix garbage collection."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from cimtest.demo import ROOT, busybox_derivation, executed, needs_demo
from cimtest.procs import cmdline, descendants, mentioning, nix_build_dirs, wait_for, wait_for_output, wait_gone
from test_pipeline import manifest, sha256sum_check, snapshot
from test_robust_units import mounted, needs_root

from pipeline import process
from pipeline.context import run_state_dir, state_dir_for
from pipeline.runlock import lock_path

pytestmark = [pytest.mark.nix, needs_demo]


def env_for(artifacts: Path) -> dict[str, str]:
    """The test's own kept passes (beside its artifacts directory), so a test that means to boot a VM boots one."""
    return {**os.environ, "CIM_RESULTS": str(artifacts.parent / "results")}


def run_doit(
    domain: Path, artifacts: Path, *args: str, timeout: float = 900, check: bool = False
) -> subprocess.CompletedProcess[str]:
    """`doit domain=… artifacts=… ARGS…` from the repository root, to completion."""
    proc = process.run(
        [sys.executable, "-m", "doit", f"domain={domain}", f"artifacts={artifacts}", *args],
        cwd=ROOT,
        timeout=timeout,
        env=env_for(artifacts),
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"doit {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@contextlib.contextmanager
def background_doit(domain: Path, artifacts: Path, log: Path, *args: str) -> Iterator[subprocess.Popen[bytes]]:
    """doit in its own process group, output (stdout and stderr) in `log`; its group is killed on the way out."""
    with (
        log.open("wb") as out,
        process.spawn(
            [sys.executable, "-m", "doit", f"domain={domain}", f"artifacts={artifacts}", *args],
            stdout=out,
            cwd=ROOT,
            env=env_for(artifacts),
        ) as proc,
    ):
        yield proc


def unique_hardware(domain: Path, host: str) -> None:
    """A vendor string no other test uses: the host's image is a new derivation, so nix really builds it."""
    path = domain / "domain.json"
    data = json.loads(path.read_text())
    data["hosts"][host]["hardware"]["vendor"] = f"QEMU {uuid.uuid4().hex[:12]}"
    path.write_text(json.dumps(data, indent=2))


def temporaries(artifacts: Path) -> list[Path]:
    return [p for p in artifacts.rglob("*") if p.name.endswith(".tmp")] if artifacts.exists() else []


def console_logs(domain: Path, artifacts: Path) -> list[Path]:
    """The raw console logs of this run's VM work dirs (under the run's state)."""
    return sorted((run_state_dir(ROOT, domain, artifacts) / "vm").glob("*/*.log"))


def nix_building(pid: int) -> bool:
    return any("nix" in line and " build " in line for line in (cmdline(p) for p in descendants(pid)))


def console_shows(domain: Path, artifacts: Path, text: str) -> bool:
    return any(text in log.read_text(errors="replace") for log in console_logs(domain, artifacts))


# phase: (target, the host whose image is made new for it, the output line that announces the phase)
PHASES: dict[str, tuple[str, str | None, str]] = {
    "build": ("build:vhost-pi-sd", "vhost-pi", r"building /nix/store/"),
    "boot": ("boot:vhost-dev-iso", None, r"booting nixos-vhost-dev"),
    "install": ("install:vhost-dev", None, r"installer started"),
    # [14]: a netboot host installing itself from the LAN (provisioner, installer and their hub).
    "netinstall": ("install:vhost-2", None, r"installer: cim-install: started"),
    # [15]: a deploy, interrupted while the next generation goes over SSH.
    "deploy": ("deploy:vhost-dev", None, r"phase copy: the closure of "),
}


def wait_until_ready(phase: str, proc: subprocess.Popen[bytes], domain: Path, artifacts: Path, log: Path) -> None:
    """Block until the run is in the middle of `phase`: nix building, a kernel on the console, an installer at work."""
    wait_for_output(log, PHASES[phase][2], 300)
    if phase == "build":
        wait_for(lambda: nix_building(proc.pid), "a nix build process under doit", 30)
        time.sleep(2)  # well into the build (about 25 s for a new SD image)
        assert nix_building(proc.pid), f"the build ended too soon to be interrupted:\n{log.read_text()}"
    else:
        wait_for(lambda: console_shows(domain, artifacts, "Linux version"), "the guest kernel on the console", 120)


@pytest.mark.parametrize("kill", ["parent", "nix"])
@pytest.mark.parametrize("system", ["build machine", "aarch64-linux"])
def test_a_sandboxed_builder_dies_with_the_run_or_with_nix(tmp_path: Path, system: str, kill: str) -> None:
    """The gap [9] first left open: Nix clones its sandboxed builder into namespaces of its own and the builder
    calls setsid(), so a SIGKILLed nix left it building.  Through the reaper, a SIGKILL of the pipeline lets nix stop
    its builder; a SIGKILL of nix alone leaves an orphan the reaper kills.  Either way no build directory stays."""
    tag = f"cim-writer-{uuid.uuid4().hex}"
    # It writes into its build directory without end: Nix's own removal of that directory then fails (see reaper.py).
    writer = f"i=0; while :; do i=$((i+1)); echo x > f$i; done; : {tag}"
    drv = busybox_derivation(tmp_path / "flake", "cim-test-writer", writer, "" if system == "build machine" else system)
    out = (tmp_path / "out.txt").open("wb")
    parent = process.start(
        [sys.executable, "-c", f"from pipeline import nix; nix.build({drv!r}); import time; time.sleep(3600)"],
        stdout=out,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        wait_for(
            lambda: any(tag in line for line in (cmdline(pid) for pid in descendants(parent.pid))),
            "the sandboxed builder",
            120,
        )
        tree = descendants(parent.pid)
        builder = {pid for pid in tree if tag in cmdline(pid)}
        nix_pid = next(pid for pid in tree if os.path.basename(cmdline(pid).split(" ", 1)[0]) == "nix")
        os.kill(parent.pid if kill == "parent" else nix_pid, signal.SIGKILL)
        left = wait_gone(tree if kill == "parent" else {pid: tree[pid] for pid in builder}, tag, 5)
        assert left == {}, f"still running 5 s after SIGKILL of the {kill}: {left}"
        # nix's build directory is gone: in nix's scratch directory, which the reaper removes.
        wait_for(lambda: not nix_build_dirs(drv), "the build directory's removal", 5)
    finally:
        process.kill_group(parent)
        for leftover in nix_build_dirs(drv):
            shutil.rmtree(leftover, ignore_errors=True)


SIGNALS = {"SIGINT": signal.SIGINT, "SIGTERM": signal.SIGTERM, "SIGHUP": signal.SIGHUP, "SIGKILL": signal.SIGKILL}
CASES = [pytest.param(phase, sig, id=f"{phase}-{sig}") for phase in PHASES for sig in ("SIGINT", "SIGTERM", "SIGKILL")]
CASES.append(pytest.param("boot", "SIGHUP", id="boot-SIGHUP"))


@pytest.mark.vm
@pytest.mark.parametrize(("phase", "sig"), CASES)
def test_an_interrupted_run_leaves_nothing_running_and_the_next_run_completes(
    demo_domain: Path, artifacts_dir: Path, tmp_path: Path, phase: str, sig: str
) -> None:
    target, host, _line = PHASES[phase]
    if host:
        unique_hardware(demo_domain, host)
    if phase == "install":  # the ISO first, so the run below goes straight to the installer
        run_doit(demo_domain, artifacts_dir, "build:vhost-dev-iso", check=True)
    if phase == "netinstall":  # both images first: the provisioner's ISO and the netboot image
        run_doit(demo_domain, artifacts_dir, "build:vhost-dev-iso", "build:vhost-2-netboot", check=True)
    if phase == "deploy":  # the installed disk first: the run below goes straight to the deploy
        run_doit(demo_domain, artifacts_dir, "install:vhost-dev", check=True)
    log = tmp_path / "doit.log"
    signum = SIGNALS[sig]
    with background_doit(demo_domain, artifacts_dir, log, target) as proc:
        wait_until_ready(phase, proc, demo_domain, artifacts_dir, log)
        tree = descendants(proc.pid)
        assert tree, "doit has children to stop"
        os.kill(proc.pid, signum)  # to doit alone, as `kill`, `timeout` and CI cancellation do
        code = proc.wait(30)
        left = wait_gone(tree, str(tmp_path), 5)
    assert left == {}, f"still running 5 s after {sig}: {left}"
    assert temporaries(artifacts_dir) == []
    output = log.read_text(errors="replace")
    if signum == signal.SIGKILL:
        assert code == -signal.SIGKILL
        assert console_logs(demo_domain, artifacts_dir) or phase == "build", "the raw console log stays in .cim"
    else:
        assert code == 128 + signum, output
        assert f"[cim] {sig}: stopped" in output and "Traceback" not in output, output
        if phase == "boot":
            assert "Linux version" in (artifacts_dir / "vhost-dev-iso" / "boot.log").read_text(errors="replace")
        if phase == "install":
            assert "cim-install: " in (artifacts_dir / "vhost-dev-iso" / "install.log").read_text()
        if phase == "netinstall":
            assert "cim-install: " in (artifacts_dir / "vhost-2-netboot" / "install.log").read_text(errors="replace")
    if phase == "build":
        assert not list(artifacts_dir.glob("vhost-pi-sd/*.img")), "nothing published by an interrupted build"
    if phase == "deploy":
        assert not list((artifacts_dir.parent / "results").glob("deploy/*")), "no pass kept for an interrupted deploy"

    proc2 = run_doit(demo_domain, artifacts_dir, target, check=True)
    assert target in executed(proc2.stdout), proc2.stdout
    assert temporaries(artifacts_dir) == []
    if phase == "boot":
        assert "boot complete" in (artifacts_dir / "vhost-dev-iso" / "boot.log").read_text(errors="replace")
    if phase == "install":
        assert manifest(artifacts_dir)["artifacts"]["vhost-dev-iso"]["install"]["result"] == "pass"
    if phase == "netinstall":
        assert manifest(artifacts_dir)["artifacts"]["vhost-2-netboot"]["install"]["result"] == "pass"
    if phase == "deploy":
        assert manifest(artifacts_dir)["artifacts"]["vhost-dev-iso"]["deploy"]["result"] == "pass"


@pytest.mark.vm
def test_parallel_run_stopped_by_sigterm(demo_domain: Path, artifacts_dir: Path, tmp_path: Path) -> None:
    """Under -n 2 the work runs in doit's worker threads: SIGTERM still stops both VMs and keeps both logs."""
    targets = ("-n", "2", "boot:vhost-dev-iso", "install:vhost-dev")
    log = tmp_path / "doit.log"
    with background_doit(demo_domain, artifacts_dir, log, *targets) as proc:
        wait_for(lambda: len(mentioning(str(tmp_path))) >= 2, "two VMs at once", 300)
        wait_for_output(log, "installer started", 300)
        tree = descendants(proc.pid)
        os.kill(proc.pid, signal.SIGTERM)
        code = proc.wait(30)
        left = wait_gone(tree, str(tmp_path), 5)
    output = log.read_text(errors="replace")
    assert left == {}, f"still running 5 s after SIGTERM: {left}"
    assert code == 128 + signal.SIGTERM and "stopped 2 process group(s)" in output, output
    assert (artifacts_dir / "vhost-dev-iso" / "boot.log").stat().st_size > 0
    assert "cim-install: " in (artifacts_dir / "vhost-dev-iso" / "install.log").read_text()
    assert temporaries(artifacts_dir) == []
    again = run_doit(demo_domain, artifacts_dir, *targets, check=True)
    assert {"boot:vhost-dev-iso", "install:vhost-dev"} <= set(executed(again.stdout))


@pytest.mark.vm
def test_two_runs_at_once_boot_one_vm(demo_domain: Path, artifacts_dir: Path, tmp_path: Path) -> None:
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    with (
        background_doit(demo_domain, artifacts_dir, logs[0], "boot:vhost-dev-iso") as first,
        background_doit(demo_domain, artifacts_dir, logs[1], "boot:vhost-dev-iso") as second,
    ):
        wait_for(lambda: any("booting " in log.read_text() for log in logs), "a boot", 300)
        waiting = next(log for log in logs if "booting " not in log.read_text())
        wait_for_output(waiting, r"waiting for run \d+", 30)
        # With wait=no a third refuses at once, naming the run that holds the directory.
        refused = run_doit(demo_domain, artifacts_dir, "wait=no", "boot:vhost-dev-iso", timeout=60)
        holder = first if waiting == logs[1] else second
        assert refused.returncode == 2 and f"run {holder.pid} (domain {demo_domain}" in refused.stderr
        assert "\n" not in refused.stderr.strip() and executed(refused.stdout) == []
        # Another domain into its own directory is not held up.
        other = tmp_path / "other"
        shutil.copytree(demo_domain, other)
        elsewhere = run_doit(other, tmp_path / "other-artifacts", "validate", timeout=120, check=True)
        assert "waiting" not in elsewhere.stdout
        codes = [first.wait(600), second.wait(600)]
    assert codes == [0, 0], [log.read_text() for log in logs]
    outputs = [log.read_text() for log in logs]
    assert sum(out.count("booting nixos-vhost-dev") for out in outputs) == 1, outputs
    waited = outputs[logs.index(waiting)]
    assert f"waiting for run {holder.pid}" in waited and executed(waited) == [], waited
    third = run_doit(demo_domain, artifacts_dir, "boot:vhost-dev-iso", check=True)
    assert executed(third.stdout) == []
    lock_path(ROOT, tmp_path / "other-artifacts").unlink(missing_ok=True)
    shutil.rmtree(state_dir_for(ROOT, other), ignore_errors=True)


def gc_roots_of(store_path: str) -> list[str]:
    proc = process.run(["nix-store", "--query", "--roots", store_path], timeout=120)
    assert proc.returncode == 0, proc.stderr
    return [line.split(" -> ")[0] for line in proc.stdout.splitlines()]


@pytest.mark.vm
def test_shared_and_new_artifacts_directories(demo_domain: Path, artifacts_dir: Path, tmp_path: Path) -> None:
    # A normal run of the demo.
    run_doit(demo_domain, artifacts_dir, check=True)
    first = manifest(artifacts_dir)
    assert sorted(first["artifacts"]) == ["vhost-2-netboot", "vhost-dev-iso", "vhost-pi-sd"]
    sha256sum_check(artifacts_dir)
    roots = run_state_dir(ROOT, demo_domain, artifacts_dir) / "gcroots"
    for name, record in first["artifacts"].items():
        assert os.readlink(roots / name) == record["outPath"]
        assert str(roots / name) in gc_roots_of(record["outPath"]), "nix-collect-garbage keeps the image's build"

    # A second domain into the same directory (both have an image named vhost-dev-iso): refused, nothing touched.
    other = tmp_path / "other"
    shutil.copytree(demo_domain, other)
    before = snapshot(artifacts_dir)
    for domain, args in ((other, ("build:vhost-dev-iso",)), (ROOT / "configs" / "cim", ("validate",))):
        refused = run_doit(domain, artifacts_dir, *args, timeout=120)
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert f"{artifacts_dir} holds the release of another domain ({demo_domain})" in refused.stderr
        assert executed(refused.stdout) == []
    assert snapshot(artifacts_dir) == before
    shutil.rmtree(state_dir_for(ROOT, other), ignore_errors=True)

    # The demo again: up to date, its manifest lists its images, the sums pass.
    again = run_doit(demo_domain, artifacts_dir, check=True)
    assert executed(again.stdout) == []
    assert manifest(artifacts_dir)["artifacts"] == first["artifacts"]
    sha256sum_check(artifacts_dir)

    # A published output removed or replaced: the task that owns it runs again (and only that one).
    (artifacts_dir / "vhost-dev-iso" / "build.log").unlink()
    (artifacts_dir / "vhost-pi-sd" / "boot.log").write_text("not the console\n")
    (artifacts_dir / "manifest.json").write_text(json.dumps({**first, "artifacts": {}}))
    mended = run_doit(demo_domain, artifacts_dir, check=True)
    ran = executed(mended.stdout)
    assert {"build:vhost-dev-iso", "boot:vhost-pi-sd", "release"} <= set(ran), mended.stdout
    assert not {"boot:vhost-dev-iso", "install:vhost-dev", "build:vhost-pi-sd"} & set(ran), mended.stdout
    assert "boot complete" in (artifacts_dir / "vhost-pi-sd" / "boot.log").read_text(errors="replace")
    assert sorted(manifest(artifacts_dir)["artifacts"]) == ["vhost-2-netboot", "vhost-dev-iso", "vhost-pi-sd"]
    sha256sum_check(artifacts_dir)

    # The same domain into a new directory: everything is published there and the run completes.
    new = tmp_path / "new-artifacts"
    try:
        moved = run_doit(demo_domain, new, check=True)
        assert "booting " not in moved.stdout and "phase installer" not in moved.stdout, "passes come from .cim"
        fresh = manifest(new)
        assert sorted(fresh["artifacts"]) == ["vhost-2-netboot", "vhost-dev-iso", "vhost-pi-sd"]
        for name, record in fresh["artifacts"].items():
            assert (new / record["file"]).is_file() and record["sha256"] == first["artifacts"][name]["sha256"]
            assert record["boot"]["result"] == "pass"
        sha256sum_check(new)
        assert executed(run_doit(demo_domain, artifacts_dir, check=True).stdout) == [], "the first is still whole"
    finally:
        lock_path(ROOT, new).unlink(missing_ok=True)


def test_gc_root_follows_the_image(demo_domain: Path, artifacts_dir: Path) -> None:
    run_doit(demo_domain, artifacts_dir, "build:vhost-dev-iso", check=True)
    link = run_state_dir(ROOT, demo_domain, artifacts_dir) / "gcroots" / "vhost-dev-iso"
    old = os.readlink(link)
    unique_hardware(demo_domain, "vhost-dev")
    run_doit(demo_domain, artifacts_dir, "build:vhost-dev-iso", check=True)
    new = manifest(artifacts_dir)["artifacts"]["vhost-dev-iso"]["outPath"]
    assert new != old and os.readlink(link) == new
    assert str(link) in gc_roots_of(new) and str(link) not in gc_roots_of(old), "the old build is free to collect"


@needs_root
def test_full_and_read_only_artifacts_directories(demo_domain: Path, tmp_path: Path) -> None:
    def build(artifacts: Path) -> subprocess.CompletedProcess[str]:
        return run_doit(demo_domain, artifacts, "build:vhost-dev-iso", timeout=300)

    def refused(proc: subprocess.CompletedProcess[str], artifacts: Path, reason: str) -> None:
        output = proc.stdout + proc.stderr
        assert proc.returncode != 0 and "Traceback" not in output, output
        message = next(line for line in output.splitlines() if "cannot write" in line)
        assert f"cannot write {artifacts}/vhost-dev-iso/nixos-vhost-dev-x86_64-linux.iso: {reason}" in message
        assert "unchanged" in message
        assert temporaries(artifacts) == []

    locks = []
    try:
        # No room at all: one clear message, nothing left behind.
        with mounted(tmp_path / "tiny", "-t", "tmpfs", "-o", "size=1m", "tmpfs") as tiny:
            locks.append(tiny)
            refused(build(tiny), tiny, "No space left on device")
            assert not list(tiny.rglob("*.iso"))

        # Room for one image but not for its replacement: the published one stays whole.
        sized = tmp_path / "sized"
        locks.append(sized)
        assert build(sized).returncode == 0
        iso_mib = next(sized.glob("vhost-dev-iso/*.iso")).stat().st_size // 2**20
        with mounted(tmp_path / "small", "-t", "tmpfs", "-o", f"size={iso_mib * 3 // 2}m", "tmpfs") as small:
            locks.append(small)
            assert build(small).returncode == 0
            (small / "vhost-dev-iso" / "build.log").unlink()  # so the build publishes again
            before = snapshot(small)
            refused(build(small), small, "No space left on device")
            assert snapshot(small) == before
            sha256sum_check(small)
            assert process.run(["mount", "-o", f"remount,size={iso_mib * 3}m", str(small)], timeout=30).returncode == 0
            assert build(small).returncode == 0, "the next run completes"
            sha256sum_check(small)

        # A read-only directory (root ignores permissions, so a read-only bind mount).
        ro = tmp_path / "ro"
        locks.append(ro)
        assert build(ro).returncode == 0
        (ro / "vhost-dev-iso" / "build.log").unlink()
        before = snapshot(ro)
        with mounted(ro, "--bind", str(ro)):
            assert process.run(["mount", "-o", "remount,bind,ro", str(ro)], timeout=30).returncode == 0
            refused(build(ro), ro, "Read-only file system")
        assert snapshot(ro) == before
        assert build(ro).returncode == 0, "the next run completes"
        sha256sum_check(ro)
    finally:
        for artifacts in locks:
            lock_path(ROOT, artifacts).unlink(missing_ok=True)
