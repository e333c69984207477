"""An operator can see and trust a run: `cim status`, `cim explain`, progress while waiting, artifacts/junit.xml.

The unit tests check the pure parts (naming a changed field, the JUnit document, the progress ticker); one
integration test walks a real demo run on a private copy — real nix, real QEMU — through what an operator asks.
"""

from __future__ import annotations

import datetime
import json
import os
import pty
import re
import select
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import junitparser
import pytest
from cimtest.demo import DEMO, ROOT, DoitRunner, executed, needs_demo

from pipeline.artifacts import JUNIT, ArtifactRecord, BootResult, BuildInfo, ProbeResult, Records, publish_file
from pipeline.context import run_state_dir, state_dir_for
from pipeline.process import kill_group
from pipeline.status import spec_changes

PROGRESS = re.compile(r"^\[(?P<prefix>[^\]]+)\] (?P<phase>.+): (?P<elapsed>\d+) s / (?P<deadline>\d+) s")


# -- pure parts --------------------------------------------------------------------------------------------------------


def test_spec_changes_name_the_field_with_old_and_new_value() -> None:
    old = {"hosts": {"vhost-dev": {"boot": {"memory_mib": 1024, "cpus": 1, "probes": [{"kind": "console"}]}}}}
    new = {
        "hosts": {
            "vhost-dev": {
                "boot": {"memory_mib": 2048, "cpus": 1, "probes": [{"kind": "console"}, {"kind": "tcp", "port": 22}]}
            }
        }
    }
    assert spec_changes(old, new) == [
        "hosts.vhost-dev.boot.memory_mib: 1024 → 2048",
        "hosts.vhost-dev.boot.probes[1].kind: (none) → 'tcp'",
        "hosts.vhost-dev.boot.probes[1].port: (none) → 22",
    ]
    assert spec_changes(new, new) == []


def iso_record(size: int, sha256: str, xxh3: str, at: datetime.datetime | None = None) -> ArtifactRecord:
    """A build record of vhost-dev's ISO, as build:vhost-dev-iso writes it."""
    return ArtifactRecord(
        host="vhost-dev",
        format="iso",
        system="x86_64-linux",
        drvPath="/nix/store/x.drv",
        outPath="/nix/store/x",
        file="vhost-dev-iso/image.iso",
        size=size,
        sha256=sha256,
        xxh3=xxh3,
        build=BuildInfo(strategy="native", reason="test", seconds=1.0, log="vhost-dev-iso/build.log", at=at),
    )


def test_junit_xml_shows_a_failed_probe_with_its_message_and_console_tail(tmp_path: Path) -> None:
    records = Records(
        tmp_path / "state", tmp_path / "artifacts", {"domain": "d", "fqdn": "d.local", "domain_dir": "/d"}
    )
    source = tmp_path / "image.iso"
    source.write_bytes(os.urandom(4096))
    sha, xxh, size = publish_file(source, records.artifacts_dir / "vhost-dev-iso" / "image.iso")
    records.save_build("vhost-dev-iso", iso_record(size, sha, xxh))
    # A console as guests write it: escape sequences, carriage returns, a NUL.
    (records.artifacts_dir / "vhost-dev-iso" / "boot.log").write_text(
        "".join(f"\x1b[0;32mline {i}\x1b[0m\r\n" for i in range(100)) + "cim: vhost-dev boot complete\x00\r\n"
    )
    error = "vhost-dev-iso-boot: TCP port 9 did not succeed within 3 s; last error: connection closed"
    records.save_boot(
        "vhost-dev-iso",
        BootResult(
            result="fail",
            accel="tcg",
            log="vhost-dev-iso/boot.log",
            image_xxh3=xxh,
            seconds=20.0,
            error=error,
            probes=[
                ProbeResult(probe="console", ok=True, seconds=15.0, detail="console: 'cim: vhost-dev boot complete'")
            ],
            planned=["console", "tcp 9", "nats"],
        ),
    )

    xml = junitparser.JUnitXml.fromfile(str(records.artifacts_dir / JUNIT))
    (suite,) = list(xml)
    assert (suite.name, suite.tests, suite.failures, suite.skipped) == ("vhost-dev-iso", 3, 1, 1)
    cases = {case.name: case for case in suite}
    assert cases["console"].is_passed
    (failure,) = cases["tcp 9"].result
    assert isinstance(failure, junitparser.Failure)
    assert failure.message == error
    assert "line 99" in failure.text and "cim: vhost-dev boot complete" in failure.text, "the console's tail"
    assert "\x1b" not in failure.text and "\x00" not in failure.text
    assert isinstance(cases["nats"].result[0], junitparser.Skipped), "a probe after the failed one did not run"
    assert not list(records.artifacts_dir.rglob(".*.tmp")), "written atomically"


PROGRESS_SCRIPT = textwrap.dedent("""
    import sys, time
    from pipeline import log
    log.PLAIN_EVERY = float(sys.argv[1])
    with log.progress("vm", "waiting for the prompt", 30, lambda: "\\x1b[1mLoading\\x1b[0m kernel\\r"):
        time.sleep(float(sys.argv[2]))
    with log.progress("vm", "waiting for power-off", 30):  # follows the first wait: keeps its schedule
        time.sleep(float(sys.argv[3]))
    log.say("vm", "done")
""")


def test_progress_without_a_terminal_prints_plain_lines_on_schedule() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", PROGRESS_SCRIPT, "2", "3", "2.5"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "CIM_PROGRESS": ""},
    )
    lines = proc.stdout.splitlines()
    assert "\x1b" not in proc.stdout and "\r" not in proc.stdout, "no terminal control without a terminal"
    assert lines[-1] == "[vm] done"
    progress = [m for m in map(PROGRESS.match, lines) if m]
    # Due at 2 s (first wait), 4 s: the second wait starts at 3 s and takes over the schedule at 4 s.
    assert [(m["phase"], m["deadline"]) for m in progress] == [
        ("waiting for the prompt", "30"),
        ("waiting for power-off", "30"),
    ], proc.stdout
    assert lines[0].endswith("— Loading kernel"), "the last console line, without its escape codes"


def test_progress_on_a_terminal_is_one_live_line() -> None:
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-c", PROGRESS_SCRIPT, "10", "1.6", "0"],
        stdout=terminal,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
        env={**os.environ, "CIM_PROGRESS": ""},
        start_new_session=True,
    )
    os.close(terminal)
    output = b""
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            ready, _, _ = select.select([controller], [], [], 1)
            if ready:
                try:
                    chunk = os.read(controller, 4096)
                except OSError:  # the child closed the terminal
                    break
                if not chunk:
                    break
                output += chunk
            elif proc.poll() is not None:
                break
    finally:
        kill_group(proc)
        os.close(controller)
    text = output.decode()
    assert "\r\x1b[K[vm] waiting for the prompt: 1 s / 30 s — Loading kernel" in text, repr(text)
    assert text.rstrip().endswith("\r\x1b[K[vm] done"), "the live line is cleared before a log line"
    assert "\n[vm] waiting" not in text, "redrawn in place, never a new line"


def test_status_of_a_domain_that_never_ran_runs_nothing(tmp_path: Path) -> None:
    domain, artifacts = tmp_path / "demo", tmp_path / "artifacts"
    shutil.copytree(DEMO, domain, ignore=shutil.ignore_patterns("result*", "inputs.json"))
    try:
        data = status(domain, artifacts)
        assert [(r["artifact"], r["image"], r["boot"]["result"]) for r in data["artifacts"]] == [
            ("vhost-dev-iso", None, "never"),
            ("vhost-pi-sd", None, "never"),
            ("vhost-2-netboot", None, "never"),
        ]
        assert data["artifacts"][0]["install"] == {"result": "never"} and "install" not in data["artifacts"][1]
        assert {t["state"] for t in data["out_of_date"]} == {"run"}
        assert explain(domain, artifacts, "build:vhost-pi-sd")["reasons"] == [
            "it has not run successfully yet (doit has no record of it)"
        ]
        assert not artifacts.exists(), "status writes nothing"
        assert not (state_dir_for(ROOT, domain) / "doit.sqlite3").exists(), "not even doit's DB"
        wrong = cim("explain", "boot:nope", "--domain", str(domain))
        assert wrong.returncode == 2 and "no task 'boot:nope'" in wrong.stderr and "boot:vhost-pi-sd" in wrong.stderr
        assert "Traceback" not in wrong.stderr
    finally:
        shutil.rmtree(state_dir_for(ROOT, domain), ignore_errors=True)


def test_status_json_carries_the_records_times_as_their_json_has_them(tmp_path: Path) -> None:
    """Records keep datetimes; `cim status --json` prints them as the manifest does (`…Z`), not a traceback."""
    domain, artifacts = tmp_path / "demo", tmp_path / "artifacts"
    shutil.copytree(DEMO, domain, ignore=shutil.ignore_patterns("result*", "inputs.json"))
    at = datetime.datetime(2026, 11, 27, 17, 49, 46, tzinfo=datetime.UTC)
    meta = {"domain": "demo", "fqdn": "demo.local", "domain_dir": str(domain)}
    records = Records(run_state_dir(ROOT, domain, artifacts), artifacts, meta)
    try:
        records.save_build("vhost-dev-iso", iso_record(1, "0" * 64, "0" * 32, at))
        records.save_boot(
            "vhost-dev-iso",
            BootResult(
                result="fail", accel="tcg", log="vhost-dev-iso/boot.log", image_xxh3="0" * 32, seconds=2.0, at=at
            ),
        )
        row = status(domain, artifacts)["artifacts"][0]
        assert row["image"]["built"] == row["boot"]["at"] == "2026-11-27T17:49:46Z"
        assert "its last run failed (2026-11-27T17:49:46Z)" in " ".join(
            explain(domain, artifacts, "boot:vhost-dev-iso")["reasons"]
        )
    finally:
        shutil.rmtree(state_dir_for(ROOT, domain), ignore_errors=True)


# -- a real demo run, as an operator sees it ---------------------------------------------------------------------------


def cim(*args: str) -> subprocess.CompletedProcess[str]:
    # A wide table: with the inventory column, 80 columns would wrap the artifact names.
    return subprocess.run(
        [str(Path(sys.executable).with_name("cim")), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "160"},
    )


def status(domain: Path, artifacts: Path) -> dict[str, Any]:
    proc = cim("status", "--domain", str(domain), "--artifacts", str(artifacts), "--json")
    assert proc.returncode == 0, proc.stderr
    data: dict[str, Any] = json.loads(proc.stdout)
    return data


def explain(domain: Path, artifacts: Path, task: str) -> dict[str, Any]:
    proc = cim("explain", task, "--domain", str(domain), "--artifacts", str(artifacts), "--json")
    assert proc.returncode == 0, proc.stderr
    data: dict[str, Any] = json.loads(proc.stdout)
    return data


def doit_timed(domain: Path, artifacts: Path, *args: str) -> tuple[int, list[tuple[float, str]]]:
    """Run doit without a terminal (as CI does); every stdout line with the time it arrived."""
    argv = [sys.executable, "-m", "doit", f"domain={domain}", f"artifacts={artifacts}", *args]
    env = {**os.environ, "CIM_PROGRESS": ""}
    proc = subprocess.Popen(
        argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    lines: list[tuple[float, str]] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append((time.monotonic(), line.rstrip("\n")))
        code = proc.wait(timeout=900)
    finally:
        kill_group(proc)
    return code, lines


def set_json(path: Path, keys: list[str], value: Any) -> Any:
    data = json.loads(path.read_text())
    node = data
    for key in keys[:-1]:
        node = node[key]
    old = node.get(keys[-1])
    node[keys[-1]] = value
    path.write_text(json.dumps(data, indent=2) + "\n")
    return old


@pytest.mark.nix
@pytest.mark.vm
@needs_demo
def test_an_operator_sees_and_trusts_a_demo_run(tmp_path: Path) -> None:
    domain, artifacts = tmp_path / "demo", tmp_path / "artifacts"
    shutil.copytree(DEMO, domain, ignore=shutil.ignore_patterns("result*"))
    try:
        _walk(domain, artifacts)
    finally:
        shutil.rmtree(state_dir_for(ROOT, domain), ignore_errors=True)


def _walk(domain: Path, artifacts: Path) -> None:
    # 1. The whole demo, no terminal: every long wait shows its elapsed time at least every 10 s.
    code, lines = doit_timed(domain, artifacts)
    output = "\n".join(text for _, text in lines)
    assert code == 0, output
    progress = [m for m in (PROGRESS.match(text) for _, text in lines) if m]
    assert progress, f"no progress line in a run with 20 s boots:\n{output}"
    vm_phase = [i for i, (_, text) in enumerate(lines) if text.startswith((".  boot:", ".  install:", ".  deploy:"))]
    quiet = max(b[0] - a[0] for a, b in zip(lines[vm_phase[0] :], lines[vm_phase[0] + 1 :], strict=False))
    # A line is due every 10 s; the ticker looks twice a second and the machine is shared, hence the margin.
    assert quiet <= 12.5, f"{quiet:.1f} s without a line while VMs ran:\n{output}"
    for log in artifacts.glob("*/*.log"):  # progress is for the reader of the run, never in a log file
        assert not re.search(r"^\[[^\]]+\] [^\n]*: \d+ s / \d+ s", log.read_text(errors="replace"), re.M), log

    # 2. cim status: every artifact, boot and install passed, nothing out of date.
    data = status(domain, artifacts)
    rows = {row["artifact"]: row for row in data["artifacts"]}
    assert set(rows) == {"vhost-dev-iso", "vhost-pi-sd", "vhost-2-netboot"}
    assert {rows[a]["boot"]["result"] for a in rows} == {"pass"}
    assert rows["vhost-dev-iso"]["install"]["result"] == "pass"
    assert rows["vhost-dev-iso"]["image"]["drvPath"].endswith(".drv") and rows["vhost-pi-sd"]["image"]["size"] > 0
    assert data["out_of_date"] == [], data["out_of_date"]
    table = cim("status", "--domain", str(domain), "--artifacts", str(artifacts))
    assert table.returncode == 0 and "vhost-pi-sd" in table.stdout and "pass" in table.stdout, table.stderr
    markdown = cim("status", "--domain", str(domain), "--artifacts", str(artifacts), "--markdown").stdout
    assert (
        "| artifact | image | boot | install | deploy | inventory | to run |" in markdown
        and "| vhost-dev-iso |" in markdown
    )

    # 3. junit.xml: a suite per artifact, a passed case per probe and for the install.
    xml = junitparser.JUnitXml.fromfile(str(artifacts / JUNIT))
    suites = {suite.name: suite for suite in xml}
    assert set(suites) == {"vhost-dev-iso", "vhost-pi-sd", "vhost-2-netboot"}
    assert {case.name for case in suites["vhost-2-netboot"]} == {
        "lease",
        "console",
        "nats",
        "stats",
        "intruder",
        "install",
        "deploy",
    }
    # The hardware report is a probe of the boot, and its reconcile a check of its own (both named "inventory").
    assert {case.name for case in suites["vhost-dev-iso"]} == {
        "console",
        "dns",
        "nats",
        "stats",
        "ssh",
        "inventory",
        "install",
        "deploy",
    }
    assert all(case.is_passed for suite in suites.values() for case in suite)

    # 4. More boot memory: the boot is out of date, and explain names the field with both values.
    old_memory = set_json(domain / "domain.json", ["hosts", "vhost-dev", "boot", "memory_mib"], 2048)
    stale = {t["task"]: t for t in status(domain, artifacts)["out_of_date"]}
    assert stale["boot:vhost-dev-iso"]["state"] == "run"
    assert "boot:vhost-pi-sd" not in stale or stale["boot:vhost-pi-sd"]["state"] == "after"
    why = explain(domain, artifacts, "boot:vhost-dev-iso")
    assert why["state"] == "run"
    # Unset, the boot VM's memory follows the declared hardware (1 GiB): the spec names the memory the VM had.
    assert f"hosts.vhost-dev.boot.memory_mib: {old_memory or 1024} → 2048" in why["reasons"], why
    set_json(domain / "domain.json", ["hosts", "vhost-dev", "boot", "memory_mib"], old_memory)

    # 5. A comment in a .nix file: eval runs again, the build stays up to date, and explain says why.
    flake = domain / "flake.nix"
    flake.write_text(flake.read_text() + "# an operator's note\n")
    before = explain(domain, artifacts, "build:vhost-dev-iso")
    assert before["state"] == "after" and before["after"] == ["eval:vhost-dev"], before
    assert any("flake.nix changed (xxh3 " in r for r in before["reasons"]), before
    code, lines = doit_timed(domain, artifacts, "build:vhost-dev-iso")
    ran = executed("\n".join(text for _, text in lines))
    assert code == 0 and "eval:vhost-dev" in ran and "build:vhost-dev-iso" not in ran, ran
    after = explain(domain, artifacts, "build:vhost-dev-iso")
    drv = rows["vhost-dev-iso"]["image"]["drvPath"]
    assert after["state"] == "up-to-date"
    assert any("drvPath" in r and drv in r for r in after["reasons"]), after

    # 6. A probe that fails: the boot fails, junit.xml has it as a failed case with its message, status says fail.
    set_json(
        domain / "domain.json",
        ["hosts", "vhost-pi", "boot", "probes"],
        [
            {"kind": "console", "pattern": "cim: vhost-pi boot complete"},
            {"kind": "tcp", "port": 9, "timeout_s": 3},  # nothing listens on the discard port
            {"kind": "nats"},
        ],
    )
    code, lines = doit_timed(domain, artifacts, "boot:vhost-pi-sd")
    assert code != 0
    suites = {suite.name: suite for suite in junitparser.JUnitXml.fromfile(str(artifacts / JUNIT))}
    cases = {case.name: case for case in suites["vhost-pi-sd"]}
    assert cases["console"].is_passed
    (failure,) = cases["tcp 9"].result
    assert isinstance(failure, junitparser.Failure) and "probe tcp 9" in failure.message, failure.message
    assert "cim: vhost-pi boot complete" in failure.text, "the console tail"
    assert cases["nats"].is_passed, "a failing probe does not keep the others from reporting"
    rows = {row["artifact"]: row for row in status(domain, artifacts)["artifacts"]}
    assert rows["vhost-pi-sd"]["boot"]["result"] == "fail"
    why = explain(domain, artifacts, "boot:vhost-pi-sd")
    assert why["state"] == "run" and why["reasons"][0].startswith("its last run failed"), why
    assert "probe tcp 9" in why["reasons"][0], why


# -- CIM_DEBUG and a long build's progress ----------------------------------------------------------------------------


def test_cim_debug_shows_each_command_with_its_cwd_as_it_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from pipeline import process

    monkeypatch.delenv("CIM_DEBUG", raising=False)
    process.run(["true"], timeout=30, cwd=tmp_path)
    assert "[debug]" not in capsys.readouterr().out
    monkeypatch.setenv("CIM_DEBUG", "1")
    process.run(["echo", "two words", "it's"], timeout=30, cwd=tmp_path)
    assert f"[debug] $ echo 'two words' 'it'\"'\"'s'  (in {tmp_path})" in capsys.readouterr().out


def test_a_commands_stderr_is_written_as_it_comes_for_the_progress_line(tmp_path: Path) -> None:
    from pipeline import process
    from pipeline.log import last_line_of

    log = tmp_path / "build" / "x.log"
    script = "echo building >&2; echo 'copying path' >&2; sleep 1.5; echo out"
    seen: list[str] = []
    runner = threading.Thread(
        target=lambda: seen.append(process.run(["sh", "-c", script], timeout=30, stderr_file=log).stderr)
    )
    runner.start()
    deadline = time.monotonic() + 10
    while last_line_of(log) != "copying path" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert last_line_of(log) == "copying path", "the last line is there while the command still runs"
    assert runner.is_alive()
    runner.join(30)
    assert seen == ["building\ncopying path\n"]


@pytest.mark.nix
@needs_demo
def test_cim_debug_shows_the_nix_argv_of_a_build(demo_domain: Path, doit: DoitRunner) -> None:
    proc = doit(demo_domain, "build:vhost-dev-iso", env={"CIM_DEBUG": "1"}, check=True)
    builds = [line for line in proc.stdout.splitlines() if line.startswith("[debug] $ nix ") and " build " in line]
    assert builds, proc.stdout
    assert "--json --no-link" in builds[0] and ".drv" in builds[0] and f"(in {ROOT})" in builds[0], builds
