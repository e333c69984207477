"""Where an ISO boot test spends its time, from console timestamps, in one run of three boots of the same image (TCG):

  harness   the pipeline's own boot test (pipeline.boot.boot_test: SeaBIOS -> isolinux -> kernel -> userland, then the
            probes), as `doit boot:<artifact>` runs it
  bare      QEMU started by hand with the very same argv, nothing but a 20 ms poll of the console log
  direct    the same argv plus `-kernel`/`-initrd`/`-append` with the kernel, initrds and command line taken out of the
            ISO (QEMU's fw_cfg loads them; no firmware disk reads, no boot loader)

The console log is polled every 20 ms and each marker's first appearance is stamped (seconds since QEMU was asked to
start): the boot loader's first line, "Linux version" (the kernel runs: firmware, loader, loading and decompressing
the kernel are before it), "cim stage 1" (userland: /init runs), the boot-complete line, and for the harness the
last probe's ok.  The three boots run interleaved, --rounds times; each method's fastest run is reported.

    .venv/bin/python bench/boot.py [--domain configs/demo] [--artifacts artifacts] [--artifact vhost-dev-iso]

Targets: the ISO's boot-complete line <= 1.25x the direct boot's; the harness <= 1.10x bare QEMU.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline import boot, probes  # noqa: E402 - after the path set-up, so the script runs from a checkout
from pipeline.domain import Artifact, Domain, Format, load_domain  # noqa: E402
from pipeline.process import run, spawn  # noqa: E402

TIMEOUT = 300.0
POLL = 0.02


class BenchError(Exception):
    pass


class ConsoleWatch:
    """Stamps the first appearance of each marker in a console log, polling every 20 ms in a thread."""

    def __init__(self, log: Path, markers: dict[str, str], started: float) -> None:
        self.log = log
        self.markers = {name: re.compile(pattern, re.M) for name, pattern in markers.items()}
        self.started = started
        self.seen: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> ConsoleWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.check()
            time.sleep(POLL)

    def check(self) -> None:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        now = time.monotonic() - self.started
        for name, regex in self.markers.items():
            if name not in self.seen and regex.search(text):
                self.seen[name] = now

    def wait_for(self, name: str, timeout: float, qemu: subprocess.Popen[bytes] | None = None) -> float:
        deadline = time.monotonic() + timeout
        while name not in self.seen:
            if qemu is not None and qemu.poll() is not None:
                self.check()
                if name in self.seen:
                    break
                said = qemu.stderr.read().decode(errors="replace")[-1000:] if qemu.stderr else ""
                raise BenchError(f"QEMU exited ({qemu.returncode}) before {name!r}: {said}")
            if time.monotonic() > deadline:
                raise BenchError(f"{self.log}: {name!r} did not appear within {timeout:g} s")
            time.sleep(POLL)
        return self.seen[name]


class StampedStdout(io.TextIOBase):
    """sys.stdout for the harness run: passes lines through and stamps the probe lines pipeline.log.say writes."""

    def __init__(self, out: io.TextIOBase, started: float) -> None:
        self.out = out
        self.started = started
        self.stamps: list[tuple[float, str]] = []

    def write(self, text: str) -> int:
        self.stamps.append((time.monotonic() - self.started, text))
        return self.out.write(text)

    def flush(self) -> None:
        self.out.flush()


def markers(host: str) -> dict[str, str]:
    return {
        "loader": r"ISOLINUX|cim installer for",
        "loading": r"Loading /boot/bzImage",
        "kernel": r"Linux version",
        "userland": r"cim stage 1",
        "complete": probes.boot_complete_pattern(host),
    }


def extract_direct_boot(iso: Path, work: Path) -> tuple[Path, Path, str]:
    """The kernel, the initrds (concatenated, as isolinux loads them) and the command line of the ISO's default
    isolinux entry, read out of the ISO with xorriso."""
    files = work / "iso-files"
    files.mkdir()
    proc = run(
        [
            "xorriso",
            "-osirrox",
            "on",
            "-indev",
            str(iso),
            "-extract",
            "/isolinux/isolinux.cfg",
            str(files / "isolinux.cfg"),
            "-extract",
            "/boot",
            str(files / "boot"),
        ],
        timeout=120,
    )
    if proc.returncode != 0:
        raise BenchError(f"xorriso could not read {iso}: {proc.stderr[-500:]}")
    config = (files / "isolinux.cfg").read_text()
    default = re.search(r"^\s*DEFAULT\s+(\S+)", config, re.M | re.I)
    label = default.group(1) if default else "boot"
    entry = re.search(rf"^\s*LABEL\s+{re.escape(label)}\s*\n(.*?)(?=^\s*LABEL|\Z)", config, re.M | re.S | re.I)
    if not entry:
        raise BenchError(f"no LABEL {label} in the ISO's isolinux.cfg")
    kernel = re.search(r"^\s*KERNEL\s+(\S+)", entry.group(1), re.M | re.I)
    append = re.search(r"^\s*APPEND\s+(.*)$", entry.group(1), re.M | re.I)
    if not kernel or not append:
        raise BenchError(f"LABEL {label} has no KERNEL or APPEND line")
    args = append.group(1).split()
    initrds = [a.split("=", 1)[1].split(",") for a in args if a.startswith("initrd=")]
    cmdline = " ".join(a for a in args if not a.startswith("initrd="))
    combined = work / "initrd.combined"
    with combined.open("wb") as out:
        for name in initrds[0] if initrds else []:
            with (files / name.lstrip("/")).open("rb") as part:
                shutil.copyfileobj(part, out)
    return files / kernel.group(1).lstrip("/"), combined, cmdline


def bare_boot(argv: list[str], log: Path, host: str, started: float) -> dict[str, float]:
    """QEMU with `argv`, stamps until the boot-complete line, then killed."""
    with (
        ConsoleWatch(log, markers(host), started) as watch,
        spawn(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) as qemu,
    ):
        watch.wait_for("complete", TIMEOUT, qemu)
    return dict(watch.seen)


def harness_run(
    artifact: Artifact, domain: Domain, domain_dir: Path, iso: Path, xxh3: str, work: Path
) -> dict[str, float]:
    """The pipeline's boot test, as doit runs it; stamps from the console and from the harness's own probe lines."""
    workdir = work / "harness"
    started = time.monotonic()
    stamped = StampedStdout(sys.stdout, started)  # type: ignore[arg-type]
    with (
        ConsoleWatch(workdir / "console.log", markers(artifact.host), started) as watch,
        contextlib.redirect_stdout(stamped),
    ):
        outcome = boot.boot_test(
            artifact,
            domain,
            domain_dir,
            iso,
            xxh3,
            workdir=workdir,
            log_dest=work / "harness-boot.log",
            log_name="boot.log",
            machine_state=work / "state",
            record=lambda result: None,
        )
    row = dict(watch.seen)
    probe_lines = [(t, line) for t, line in stamped.stamps if "probe " in line and ": ok" in line]
    if not probe_lines:
        raise BenchError("the harness printed no probe result")
    row["detected"] = next(t for t, line in probe_lines if "probe console" in line)
    row["probes"] = probe_lines[-1][0]
    row["total"] = outcome.seconds
    return row


def bare_run(
    artifact: Artifact, domain: Domain, domain_dir: Path, iso: Path, work: Path, extra: tuple[str, ...]
) -> dict[str, float]:
    """QEMU started by hand with the boot test's argv (plus `extra`), watched until the boot-complete line."""
    host = domain.hosts[artifact.host]
    forwards = probes.forwards_for(boot.boot_probes(domain, artifact.host, domain_dir), host)
    workdir = work / ("direct" if extra else "bare")
    spec = boot.boot_spec(artifact, host, iso, workdir, forwards, work / "bare-boot.log")
    spec = dataclasses.replace(spec, accel="tcg", socket_dir=Path(tempfile.mkdtemp(prefix="cim-bb-")), extra=extra)
    workdir.mkdir(parents=True)
    boot.make_blank_disks(host, workdir)  # the declared disks, as the boot test attaches them
    try:
        return bare_boot(spec.argv(), spec.console_log, artifact.host, time.monotonic())
    finally:
        shutil.rmtree(spec.socket_dir or workdir, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--domain", type=Path, default=ROOT / "configs" / "demo")
    parser.add_argument("--artifacts", type=Path, default=ROOT / "artifacts")
    parser.add_argument("--artifact", default="vhost-dev-iso")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the best of each method counts")
    args = parser.parse_args()
    os.environ.setdefault("CIM_ACCEL", "tcg")  # the three boots must compare like with like

    domain_dir = args.domain.resolve()
    domain = load_domain(domain_dir)
    artifact = next((a for a in domain.artifacts() if a.name == args.artifact), None)
    if artifact is None or artifact.format is not Format.iso:
        print(f"error: {args.artifact} is not an ISO artifact of {args.domain}", file=sys.stderr)
        return 1
    manifest = args.artifacts / "manifest.json"
    try:
        record = json.loads(manifest.read_text())["artifacts"][artifact.name]
    except (OSError, KeyError, ValueError):
        print(
            f"error: {artifact.name} is not published in {manifest}: run "
            f".venv/bin/doit domain={args.domain} build:{artifact.name} first",
            file=sys.stderr,
        )
        return 1
    iso = args.artifacts / record["file"]
    print(
        f"{iso.name} ({iso.stat().st_size / 2**20:.0f} MiB), TCG; load average {os.getloadavg()[0]:.2f}, "
        f"{len(os.sched_getaffinity(0))} cores"
    )

    work = Path(tempfile.mkdtemp(prefix="cim-bootbench-"))
    rows: dict[str, dict[str, float]] = {}
    try:
        kernel, initrd, cmdline = extract_direct_boot(iso, work)
        for round_ in range(args.rounds):
            # Interleaved, best of --rounds by boot-complete time: the machine is shared, and a busy neighbour slows
            # one run, not the method.
            here = work / f"round{round_}"
            direct = ("-kernel", str(kernel), "-initrd", str(initrd), "-append", cmdline)
            runs: dict[str, Callable[[], dict[str, float]]] = {
                "harness": functools.partial(harness_run, artifact, domain, domain_dir, iso, record["xxh3"], here),
                "bare": functools.partial(bare_run, artifact, domain, domain_dir, iso, here, ()),
                "direct": functools.partial(bare_run, artifact, domain, domain_dir, iso, here, direct),
            }
            for name, run_once in runs.items():
                row = run_once()
                if name not in rows or row["complete"] < rows[name]["complete"]:
                    rows[name] = row
                print(f"round {round_ + 1}: {name} boot complete at {row['complete']:.2f} s", flush=True)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def cell(row: dict[str, float], key: str) -> str:
        return f"{row[key]:7.2f}" if key in row else "      -"

    print(
        f"\n{'seconds since QEMU start':<26}{'loader':>8}{'loading':>8}{'kernel':>8}{'userland':>9}{'complete':>9}"
        f"{'detected':>9}{'probes':>8}"
    )
    for name, row in rows.items():
        print(
            f"{name:<26}{cell(row, 'loader')} {cell(row, 'loading')} {cell(row, 'kernel')} {cell(row, 'userland')}  "
            f"{cell(row, 'complete')}  {cell(row, 'detected')} {cell(row, 'probes')}"
        )
    print("(loader: the boot loader's first line; loading: it starts reading the kernel, after its prompt's wait)")
    print(
        "\nphases (s): firmware+loader = start -> 'Linux version'; kernel = -> 'cim stage 1'; "
        "userland = -> boot complete; probes = boot complete -> last probe ok"
    )
    for name, row in rows.items():
        phases = [row["kernel"], row["userland"] - row["kernel"], row["complete"] - row["userland"]]
        extra = f", probes {row['probes'] - row['complete']:.2f}" if "probes" in row else ""
        if "loader" in row and "loading" in row:
            prompt, loading = row["loading"] - row["loader"], row["kernel"] - row["loading"]
            extra += (
                f" (of firmware+loader: firmware {row['loader']:.2f}, boot prompt {prompt:.2f}, "
                f"loading+decompressing {loading:.2f})"
            )
        print(f"  {name:<8} firmware+loader {phases[0]:.2f}, kernel {phases[1]:.2f}, userland {phases[2]:.2f}{extra}")
    iso_line, direct_line = rows["harness"]["complete"], rows["direct"]["complete"]
    print(
        f"\nISO boot-complete / direct -kernel boot-complete: {iso_line:.2f} / {direct_line:.2f} = "
        f"{iso_line / direct_line:.2f}x (target <= 1.25)"
    )
    detected, bare = rows["harness"]["detected"], rows["bare"]["complete"]
    print(
        f"harness (line detected by the boot test) / bare QEMU (same argv): {detected:.2f} / {bare:.2f} = "
        f"{detected / bare:.2f}x (target <= 1.10)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
