"""Deployment: the installed machine takes its next generation over SSH, and a generation that does not boot rolls
back by itself.

deploy:<host> (after install:<host>) in phases, all on one VM that reboots in place:
  boot     the installed disk (the install test's, kept; through a copy-on-write overlay, so it stays as installed)
           under UEFI until its boot-complete line, which names the generation and the system's store path
  copy     the next generation (the host's system with one more module, built here by `nix build`) goes over SSH as
           the domain's account: the store paths the machine lacks, asked of the machine, as one tar stream into its
           store, each checked against a digest both ends compute before it is renamed into place
  switch   `<system>/bin/switch-to-configuration boot` as root (wheel's su): a new profile generation, its kernel and
           initrd on the ESP, a loader entry with a boot counter (systemd-boot's `+TRIES`)
  reboot   the machine reboots itself; the pipeline only watches the console.  The boot loader tries the new entry;
           a boot that completes blesses it (the counter is dropped), one that does not reboots, and after TRIES
           failed boots systemd-boot sorts the entry last and the last good generation boots
  probes   the boot-complete line must name the new system; then the host's probes, and /run/current-system
           over SSH.  A rollback is a failed deploy: "rolled back to generation N", with the failed boots' console.

Variants: `next` (the default run: a marker file in /etc, a new store path even when domain.json did not change) and
`broken` (asked for, `doit generation=broken deploy:<host>`: a boot check that fails, so no boot ever completes).
What differs from NixOS's own path (`nix copy --to ssh://`, then `switch-to-configuration` through sudo) is in
docs/deploy.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import stat
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from pipeline import boot, contract, install, nix, probes
from pipeline.artifacts import DeployResult, Generation, ProbeResult, atomic_write_text, utc_now
from pipeline.domain import Domain, Host, ProbeKind
from pipeline.errors import CimError
from pipeline.hashing import xxh3_text
from pipeline.log import progress, say, step
from pipeline.process import run
from pipeline.qemu import Drive, Firmware, Forward, Vm, VmSpec, choose_accel

SSH_FORWARD = Forward("tcp", contract.CONTRACT.ports.ssh)
SU = "/run/wrappers/bin/su"  # wheel's way to root on the demo's systems (NixOS: sudo)
COMMAND_TIMEOUT = 300.0
BOOT_START = r"Linux version \d"  # the kernel's banner: one per boot of the machine
BOOT_CHECK_FAILED = r"^cim: boot check (\S+) failed: (.*?)\r?$"


class DeployError(CimError):
    """A deploy that did not end with the machine running its new generation."""


# -- the next generation -------------------------------------------------------------------------------------------


def modules(host_name: str, variant: str) -> str:
    """The NixOS modules (as a Nix list) that make the next generation out of the host's system."""
    marker = f"next generation of {host_name}, made by deploy:{host_name} (cim-pipeline)\n"
    mods = [{"environment": {"etc": {"cim/deployment": {"text": marker}}}}]
    if variant == "broken":
        check = "echo 'this generation is broken on purpose (doit generation=broken)'; exit 1\n"
        mods.append({"environment": {"etc": {"cim/boot-checks.d/broken": {"text": check}}}})
    return f"builtins.fromJSON {json.dumps(json.dumps(mods))}"


def next_system_drv(domain_dir: Path, host_name: str, variant: str) -> str:
    """The derivation of the host's next generation: `nixosConfigurations.<host>.extendModules` with `modules`."""
    flake = json.dumps(nix.flake_ref(domain_dir))
    expr = (
        f"((builtins.getFlake {flake}).nixosConfigurations.{json.dumps(host_name)}.extendModules "
        f"{{ modules = {modules(host_name, variant)}; }}).config.system.build.toplevel.drvPath"
    )
    drv = nix.eval_expr_json(expr)
    if not isinstance(drv, str):
        raise DeployError(f"nixosConfigurations.{host_name}.extendModules gave no toplevel derivation ({drv!r}).")
    return drv


def spec(host_name: str, host: Host, variant: str) -> dict[str, Any]:
    """What, besides the installed image and the new system, decides a deploy."""
    memory_mib, cpus = install.vm_size(host)
    return {
        "hosts": {host_name: {"boot": {"memory_mib": memory_mib, "cpus": cpus, "timeout_s": host.boot.timeout_s}}},
        "variant": variant,
    }


# -- the installed disk ----------------------------------------------------------------------------------------------


def kept_disk(state_dir: Path, host_name: str) -> Path:
    """Where install:<host> keeps its installed disk (qcow2) for deploy:<host>."""
    return state_dir / "installed" / f"{host_name}.qcow2"


def kept_key(disk: Path) -> str | None:
    """The install key the kept disk was made under (image digest and install spec), or None."""
    try:
        return disk.with_suffix(".key").read_text().strip() or None
    except FileNotFoundError:
        return None


def mark_kept(disk: Path, key: str) -> None:
    atomic_write_text(disk.with_suffix(".key"), key + "\n")


def overlay(base: Path, workdir: Path) -> Path:
    """A qcow2 overlay on `base`: the deploy writes there, the installed disk stays as the install left it."""
    workdir.mkdir(parents=True, exist_ok=True)
    disk = workdir / "disk.qcow2"
    argv = ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base.resolve()), str(disk)]
    proc = run(argv, timeout=60)
    if proc.returncode != 0:
        raise DeployError(f"qemu-img could not make an overlay on {base}: {proc.stderr.strip()}")
    return disk


# -- what both ends compute over a store path ------------------------------------------------------------------------


def path_digest(path: Path) -> str:
    """sha256 over a store path's entries in byte order: `d ./x`, `l ./x TARGET`, `f ./x x|- SHA256` lines (the
    machine's `cim-store digest` computes the same with busybox)."""
    entries = [(".", path)]
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            entries.append(("./" + str(full.relative_to(path)), full))
    lines = []
    for rel, full in sorted(entries, key=lambda e: e[0].encode()):
        st = full.lstat()
        if stat.S_ISLNK(st.st_mode):
            lines.append(f"l {rel} {os.readlink(full)}\n")
        elif stat.S_ISDIR(st.st_mode):
            lines.append(f"d {rel}\n")
        else:
            x = "x" if st.st_mode & 0o111 else "-"
            lines.append(f"f {rel} {x} {hashlib.sha256(full.read_bytes()).hexdigest()}\n")
    return hashlib.sha256("".join(lines).encode()).hexdigest()


class _Counting(io.RawIOBase):
    """A write-only stream that counts what passes through to `sink`."""

    def __init__(self, sink: IO[bytes]) -> None:
        self.sink = sink
        self.count = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = bytes(data)
        self.sink.write(view)
        self.count += len(view)
        return len(view)


# -- SSH ---------------------------------------------------------------------------------------------------------------


@dataclass
class Session:
    """An SSH login to the machine as the domain's account (paramiko), with a deadline on every command."""

    client: Any
    account: str

    def run(
        self, command: str, timeout: float = COMMAND_TIMEOUT, feed: Callable[[IO[bytes]], None] | None = None
    ) -> str:
        """Run `command` (a remote shell line); its stdout, or DeployError with its stderr.  `feed` writes stdin."""
        channel = self.client.get_transport().open_session()
        channel.settimeout(timeout)
        channel.exec_command(command)
        if feed is not None:
            stdin = channel.makefile_stdin("wb")
            with contextlib.suppress(OSError):  # the command stopped reading: its exit status and stderr say why
                feed(stdin)
                stdin.close()
                channel.shutdown_write()
        out = str(channel.makefile("rb").read().decode(errors="replace"))
        err = str(channel.makefile_stderr("rb").read().decode(errors="replace"))
        code = channel.recv_exit_status()
        channel.close()
        if code != 0:
            raise DeployError(f"on the machine, `{command}` failed (exit {code}): {err.strip() or out.strip()}")
        return out

    def as_root(self, command: str, **kwargs: Any) -> str:
        said: str = self.run(f"{SU} -c {shlex.quote(command)} root", **kwargs)
        return said


@contextlib.contextmanager
def login(port: int, account: str, key: Path, timeout: float) -> Iterator[Session]:
    """Log in to 127.0.0.1:`port` as `account` with `key`, retrying until `timeout` (the server may still start)."""
    import paramiko

    deadline = time.monotonic() + timeout
    with progress("deploy", f"logging in as {account} over SSH", timeout):
        while True:
            try:
                client = probes.ssh_connect(port, account, key)
                break
            except (OSError, paramiko.SSHException) as exc:
                if time.monotonic() > deadline:
                    raise DeployError(f"could not log in as {account} over SSH (127.0.0.1:{port}): {exc}") from None
                time.sleep(1)
    try:
        yield Session(client, account)
    finally:
        client.close()


def deploy_key(domain: Domain, domain_dir: Path) -> tuple[str, Path]:
    """(account, private key) the deploy logs in with: CIM_DEPLOY_KEY (ACCOUNT:PATH), else the domain's own key."""
    given = os.environ.get("CIM_DEPLOY_KEY", "")
    if given:
        account, _, path = given.partition(":")
        if not account or not path or not Path(path).is_file():
            raise DeployError(
                f"CIM_DEPLOY_KEY={given!r} is not ACCOUNT:PATH of a private key file.",
                hint="Set it to e.g. cim:/home/me/.ssh/id_ed25519 (an account of domain.json and its key).",
            )
        return account, Path(path)
    found = probes.demo_key(domain, domain_dir)
    if found is None:
        raise DeployError(
            f"deploy logs in as an account of {domain_dir / 'domain.json'} with its SSH key, and none is at hand: the "
            "domain carries no keys/ directory with a private key whose public half is an account's key.",
            hint="Set CIM_DEPLOY_KEY=ACCOUNT:PATH to the private key of an account in the wheel group.",
        )
    return found[0], domain_dir / found[1]


# -- the flow ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeployRun:
    """What deploy:<host> is handed by its task."""

    domain: Domain
    domain_dir: Path
    host_name: str
    base_disk: Path  # the installed disk (qcow2), never written
    disk_bus: str
    system: str  # the new generation's store path, built
    variant: str
    image_xxh3: str
    workdir: Path
    log_dest: Path
    log_name: str
    machine_state: Path


def booted(console: str, host_name: str, after: int) -> tuple[re.Match[str] | None, int]:
    """The first boot-complete line past offset `after` (whole lines only) and how many boots began before it."""
    line = re.compile(
        contract.boot_complete_pattern(host_name) + r"[^\r\n]*?(?: generation (\d+))? system (/nix/store/\S+?)\r?\n",
        re.M,
    )
    match = line.search(console, after)
    end = match.start() if match else len(console)
    boots = len(re.findall(BOOT_START, console[after:end]))
    return match, boots


def generation_of(match: re.Match[str]) -> Generation:
    return Generation(number=int(match.group(1) or 0), system=match.group(2))


def deploy(target: DeployRun, record: Callable[[DeployResult], None]) -> DeployResult:
    """Boot the installed disk, deploy `target.system` over SSH, reboot into it, check it; `record` gets the result
    (pass or fail) before this returns or raises."""
    domain, host_name = target.domain, target.host_name
    host = domain.hosts[host_name]
    task = f"deploy:{host_name}"
    account, key = deploy_key(domain, target.domain_dir)
    declared = boot.boot_probes(domain, host_name, target.domain_dir)
    services = [p for p in declared if p.kind is not ProbeKind.console]
    forwards = (*probes.forwards_for(services, host), SSH_FORWARD)
    memory_mib, cpus = install.vm_size(host)
    vm_spec = VmSpec(
        name=f"{host_name}-deploy",
        system=host.system,
        workdir=target.workdir / "vm",
        console_log=target.workdir / "console.log",
        memory_mib=memory_mib,
        cpus=cpus,
        firmware=Firmware.uefi,
        drives=(Drive(overlay(target.base_disk, target.workdir), format="qcow2", bus=target.disk_bus),),
        port_forwards=forwards,
        published_log=target.log_dest,
        reboot=True,
    )
    accel, why = choose_accel(dataclasses.replace(vm_spec, reboot=False), target.machine_state)
    vm_spec = dataclasses.replace(vm_spec, accel=accel)
    say(task, f"the installed disk boots under {accel} ({why}); next generation {target.system} ({target.variant})")
    result = DeployResult(
        result="fail", log=target.log_name, image_xxh3=target.image_xxh3, variant=target.variant, account=account
    )
    started = time.monotonic()
    timeout = float(host.boot.timeout_s)
    try:
        with Vm(vm_spec) as vm:
            ports = vm.forwarded_ports()
            result = _boot_installed(vm, host_name, timeout, result)
            with login(ports[SSH_FORWARD], account, key, timeout) as session:
                result = _copy(session, task, target.system, result)
                result = _switch(session, task, target.system, result)
                mark = len(vm.console)
                with contextlib.suppress(Exception):  # the session goes down with the machine
                    session.as_root("/bin/sync; /sbin/reboot", timeout=20)
            try:
                result = _reboot(vm, target, mark, result)
            except _Rollback as rollback:
                # The machine must still be up on the generation it fell back to.
                with login(ports[SSH_FORWARD], account, key, timeout) as session:
                    current = session.run("readlink /run/current-system").strip()
                assert rollback.result.after is not None
                up = current == rollback.result.after.system
                rollback.message += (
                    f" Afterwards the machine is {'up' if up else 'NOT up'} on generation "
                    f"{rollback.result.after.number}: /run/current-system -> {current}."
                )
                raise
            ctx = probes.ProbeContext(domain=domain, host_name=host_name, domain_dir=target.domain_dir, ports=ports)
            result = _check(vm, ctx, services, target, account, key, ports[SSH_FORWARD], result)
        result = result.model_copy(update={"result": "pass"})
    except CimError as exc:
        result = getattr(exc, "result", result)
        result = result.model_copy(update={"error": result.error or str(exc).splitlines()[0]})
        raise
    finally:
        result = result.model_copy(update={"seconds": round(time.monotonic() - started, 1), "at": utc_now()})
        _publish_log(vm_spec.console_log, target.log_dest, result)
        record(result)
    shutil.rmtree(target.workdir, ignore_errors=True)
    assert result.target is not None
    say(
        task,
        f"deployed generation {result.target.number} in {result.seconds} s ({result.bytes_copied / 2**20:.1f} MiB "
        f"over SSH); log {target.log_dest}",
    )
    return result


def _boot_installed(vm: Vm, host_name: str, timeout: float, result: DeployResult) -> DeployResult:
    task = f"deploy:{host_name}"
    with step(task, "phase boot: the installed disk alone (UEFI → systemd-boot)") as phase:
        deadline = time.monotonic() + timeout
        match = None
        while match is None:
            vm.wait_for_console(contract.boot_complete_pattern(host_name), timeout, "the boot-complete line")
            match, _ = booted(vm.console, host_name, 0)
            if match is None:
                if time.monotonic() > deadline:
                    raise DeployError(
                        f"the installed system's boot-complete line names no system; log {vm.spec.shown_log}"
                    )
                time.sleep(0.2)
    before = generation_of(match)
    say(task, f"up on generation {before.number}: {before.system}")
    return result.model_copy(update={"before": before, "phases": {**result.phases, "boot": phase.seconds}})


def _copy(session: Session, task: str, system: str, result: DeployResult) -> DeployResult:
    with step(task, f"phase copy: the closure of {system} over SSH as {session.account}") as phase:
        wanted = nix.closure(system)
        missing = session.run("/sbin/cim-store missing " + " ".join(shlex.quote(p) for p in wanted)).split()
        counted: dict[str, int] = {"bytes": 0}
        if missing:
            digests = {p: path_digest(Path(p)) for p in missing}

            def feed(stdin: IO[bytes]) -> None:
                sink = _Counting(stdin)
                with tarfile.open(fileobj=sink, mode="w|", format=tarfile.GNU_FORMAT) as tar:
                    for path in missing:
                        tar.add(path, arcname=Path(path).name)
                counted["bytes"] = sink.count

            names = " ".join(f"{Path(p).name}={d}" for p, d in digests.items())
            with progress(task, f"{len(missing)} store path(s) over SSH", COMMAND_TIMEOUT):
                said = session.as_root(f"/sbin/cim-store import {names}", feed=feed)
            say(task, said.strip().splitlines()[-1] if said.strip() else "imported")
    say(task, f"{len(missing)} of {len(wanted)} store path(s) copied, {counted['bytes']} bytes")
    return result.model_copy(
        update={
            "paths_copied": len(missing),
            "bytes_copied": counted["bytes"],
            "phases": {**result.phases, "copy": phase.seconds},
        }
    )


SWITCHED = re.compile(r"generation (\d+) \((/nix/store/\S+)\) is the boot default")


def _switch(session: Session, task: str, system: str, result: DeployResult) -> DeployResult:
    with (
        step(task, "phase switch: switch-to-configuration boot") as phase,
        progress(task, "switch-to-configuration boot", COMMAND_TIMEOUT),
    ):
        said = session.as_root(f"{shlex.quote(system)}/bin/switch-to-configuration boot")
    match = SWITCHED.search(said)
    if match is None or match.group(2) != system:
        raise DeployError(f"switch-to-configuration did not make {system} the boot default; it said: {said.strip()}")
    say(task, said.strip().splitlines()[-1])
    target = Generation(number=int(match.group(1)), system=system)
    return result.model_copy(update={"target": target, "phases": {**result.phases, "switch": phase.seconds}})


def _reboot(vm: Vm, target: DeployRun, mark: int, result: DeployResult) -> DeployResult:
    """Phase reboot: watch the machine boot by itself until a boot completes; a rollback raises DeployError."""
    task = f"deploy:{target.host_name}"
    host = target.domain.hosts[target.host_name]
    assert result.target is not None and result.before is not None
    # Every try of the new entry may take a whole boot, and then the fallback boots.
    budget = float(host.boot.timeout_s) * 4
    with step(task, "phase reboot: the machine reboots; the boot loader picks the new generation") as phase:
        vm.wait_for_console(
            contract.boot_complete_pattern(target.host_name) + r"[^\r\n]*\r?\n",
            budget,
            "a boot that completes",
            after=mark,
        )
        match, boots = booted(vm.console, target.host_name, mark)
    assert match is not None
    after = generation_of(match)
    phases = {**result.phases, "reboot": phase.seconds}
    if after.system == target.system:
        say(task, f"up on generation {after.number}: {after.system} ({boots} boot(s))")
        return result.model_copy(update={"after": after, "phases": phases, "failed_boots": boots - 1})
    failures = [f"{m.group(1)}: {m.group(2)}" for m in re.finditer(BOOT_CHECK_FAILED, vm.console[mark:], re.M)]
    failed = boots - 1
    tail = _failed_boot_tail(vm.console[mark : match.start()])
    rolled = result.model_copy(
        update={"after": after, "phases": phases, "failed_boots": failed, "rolled_back_to": after.number}
    )
    raise _Rollback(
        f"rolled back to generation {after.number} ({after.system}): generation {result.target.number} "
        f"({target.system}) failed to boot {failed} time(s)"
        + (f" ({'; '.join(sorted(set(failures)))})" if failures else "")
        + f", and the boot loader fell back by itself. Console log {target.log_dest}.",
        rolled,
        detail=f"The last failed boot's console:\n{tail}",
    )


class _Rollback(DeployError):
    def __init__(self, message: str, result: DeployResult, detail: str) -> None:
        super().__init__(message, hint="Fix the generation (its boot must complete) and deploy again.", detail=detail)
        self.result = result


def _failed_boot_tail(text: str, lines: int = 12) -> str:
    """The last lines of the last failed boot in `text` (the console from the reboot to the boot that completed)."""
    starts = [m.start() for m in re.finditer(BOOT_START, text)]
    last = text[starts[-2] : starts[-1]] if len(starts) >= 2 else text
    kept = [ln for ln in last.replace("\r", "").splitlines() if ln.strip()]
    return "\n".join(kept[-lines:])


def _check(
    vm: Vm,
    ctx: probes.ProbeContext,
    services: list[Any],
    target: DeployRun,
    account: str,
    key: Path,
    ssh_port: int,
    result: DeployResult,
) -> DeployResult:
    """Phase probes: the host's service probes, and /run/current-system over SSH naming the new system."""
    task = f"deploy:{target.host_name}"
    host = target.domain.hosts[target.host_name]
    with step(task, "phase probes: the new generation's services and /run/current-system") as phase:
        deadline = time.monotonic() + float(host.boot.timeout_s)
        results: list[ProbeResult] = boot.run_probes(vm, ctx, [], services, deadline, task)
        started = time.monotonic()
        with login(ssh_port, account, key, float(host.boot.timeout_s)) as session:
            current = session.run("readlink /run/current-system").strip()
        ok = current == target.system
        results.append(
            ProbeResult(
                probe="current-system",
                ok=ok,
                seconds=round(time.monotonic() - started, 2),
                detail=f"/run/current-system -> {current}" + ("" if ok else f", not {target.system}"),
            )
        )
        say(task, f"probe current-system: {'ok' if ok else 'FAILED'} — {results[-1].detail}")
    failed = [r for r in results if not r.ok]
    updated = result.model_copy(update={"probes": results, "phases": {**result.phases, "probes": phase.seconds}})
    if failed:
        raise _Probes(
            f"{task}: the new generation is up but {len(failed)} of {len(results)} probe(s) failed: "
            + "; ".join(r.detail for r in failed),
            updated,
        )
    return updated


class _Probes(DeployError):
    def __init__(self, message: str, result: DeployResult) -> None:
        super().__init__(message)
        self.result = result


def _publish_log(console: Path, dest: Path, result: DeployResult) -> None:
    """deploy.log: the machine's console over every boot, then what the deploy concluded."""
    text = console.read_text(errors="replace") if console.exists() else "(no console output)\n"
    summary = json.dumps(result.model_dump(mode="json", exclude_none=True), indent=2, sort_keys=True)
    atomic_write_text(dest, f"{text}\n=== cim-pipeline: deploy ===\n{summary}\n")


def key_of(image_xxh3: str, system: str, spec_data: dict[str, Any]) -> tuple[str, str]:
    """The pass store's key of a deploy: the installed image, and the new system's path with the deploy spec."""
    return image_xxh3, xxh3_text(system, json.dumps(spec_data, sort_keys=True))
