"""QEMU: a VM spec becomes an argument list (pure); `Vm` runs it, keeps the whole serial console, waits with deadlines.

The serial console is a unix socket chardev with a `logfile`, so every byte the guest prints lands in the log even when
nobody is connected.  QMP (through QEMU's own
`qemu.qmp` client) asks the guest to power off, then quits QEMU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from qemu.qmp.legacy import QEMUMonitorProtocol

from pipeline import process
from pipeline.domain import Accel, System
from pipeline.errors import CimError
from pipeline.log import last_line_of, progress
from pipeline.process import kill_group

OVMF_CODE = [Path("/usr/share/OVMF/OVMF_CODE_4M.fd"), Path("/usr/share/OVMF/OVMF_CODE.fd")]
OVMF_VARS = [Path("/usr/share/OVMF/OVMF_VARS_4M.fd"), Path("/usr/share/OVMF/OVMF_VARS.fd")]
UBOOT_ARM64 = Path("/usr/lib/u-boot/qemu_arm64/u-boot.bin")
KVM_CANARY_SECONDS = 20.0
# The guest kernel is running: firmware output alone does not prove KVM works.
KERNEL_STARTED = re.compile(r"Linux version|cim stage 1")


class VmError(CimError):
    """A VM did not do what was asked; the message says which VM, what it waited for, and where its log is."""


class VmTimeout(VmError):
    pass


class Firmware(enum.StrEnum):
    bios = "bios"  # SeaBIOS (x86_64)
    uefi = "uefi"  # OVMF (x86_64)
    uboot = "uboot"  # U-Boot as the -bios of the aarch64 virt board

    def files(self) -> list[str]:
        """The firmware files QEMU will load (VmError naming the package when one is missing)."""
        if self is Firmware.uboot:
            if not UBOOT_ARM64.exists():
                raise VmError(f"{UBOOT_ARM64} is missing; install u-boot-qemu (scripts/setup.sh)")
            return [str(UBOOT_ARM64)]
        if self is Firmware.uefi:
            return [str(_first(OVMF_CODE)), str(_first(OVMF_VARS))]
        return []


def _first(candidates: Sequence[Path]) -> Path:
    for path in candidates:
        if path.exists():
            return path
    raise VmError(f"none of {', '.join(map(str, candidates))} exists; install ovmf (scripts/setup.sh)")


@dataclass(frozen=True)
class Drive:
    path: Path
    format: str = "raw"
    media: str = "disk"  # "disk" or "cdrom"
    snapshot: bool = False  # writes go to a temporary overlay, the file stays as built
    serial: str = ""
    bus: str = "virtio"  # a disk's bus: virtio (vdX), nvme (nvmeXn1), sata (sdX, on AHCI) or scsi (sdX, virtio-scsi)
    bootindex: int | None = None  # the firmware's boot order (a machine that tries its disk, then the network)
    model: str = ""  # a SATA disk's model (udev's by-id/ata-MODEL_SERIAL)
    wwn: str = ""  # a SATA or SCSI disk's world wide name, 0x + 16 hex digits (by-id/wwn-0x…)
    slot: int | None = None  # a virtio or NVMe disk's PCI slot on the root bus (by-path/pci-0000:00:SS.0…)


# QEMU's user networking delivers the guest end of a forward to this address when none is named: the VM's own NIC.
USERNET_GUEST = "10.0.2.15"
_USERNET_LINE = re.compile(r"^\s*(TCP|UDP)\[HOST_FORWARD\]\s+\d+\s+(\S+)\s+(\d+)\s+(\S+)\s+(\d+)", re.M)


@dataclass(frozen=True)
class Forward:
    """A port on 127.0.0.1 forwarded to an address behind the VM's NIC (a guest on its bridge: the VM routes and
    answers ARP for it) or, with no address, to the VM itself.  Host port 0: QEMU picks a free one when it binds,
    so parallel VMs never race for a port; `Vm.forwarded_ports()` reads back which."""

    proto: str  # "tcp" or "udp"
    guest_port: int
    address: str = ""
    host_port: int = 0

    @property
    def hostfwd(self) -> str:
        return f"hostfwd={self.proto}:127.0.0.1:{self.host_port}-{self.address}:{self.guest_port}"

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.proto, self.address or USERNET_GUEST, self.guest_port)


@dataclass(frozen=True)
class LanPort:
    """A NIC on a private virtual LAN: QEMU's own VDE hub over a unix socket (no tap device, no bridge and no
    address on this machine).  The VM that `owns` the hub creates it at `socket` (the provisioner); the others join
    it.  A `boot` NIC carries its iPXE option ROM and the first boot index: the VM boots from the network."""

    socket: Path
    mac: str
    owns: bool = False
    boot: bool = False
    bootindex: int = 1  # a booting NIC's place in the firmware's boot order

    def argv(self) -> list[str]:
        sock = f"hub://{self.socket}" if self.owns else str(self.socket)
        device = f"virtio-net-pci,netdev=lan,mac={self.mac}" + (
            f",bootindex={self.bootindex}" if self.boot else ",romfile="
        )
        return ["-netdev", f"vde,id=lan,sock={sock}", "-device", device]


def parse_usernet(text: str) -> dict[tuple[str, str, int], int]:
    """HMP `info usernet` → (proto, guest address, guest port) → the host port QEMU bound on 127.0.0.1.

    >>> parse_usernet("  TCP[HOST_FORWARD]  13  127.0.0.1 35695  10.23.0.12  4222  0  0")
    {('tcp', '10.23.0.12', 4222): 35695}
    """
    return {(m.group(1).lower(), m.group(4), int(m.group(5))): int(m.group(3)) for m in _USERNET_LINE.finditer(text)}


@dataclass(frozen=True)
class VmSpec:
    """Everything that decides how a VM runs; `argv()` turns it into QEMU's command line."""

    name: str
    system: System
    workdir: Path  # sockets and firmware variables live here; unique per VM
    console_log: Path
    memory_mib: int = 1024
    cpus: int = 1
    accel: Accel = "tcg"
    firmware: Firmware = Firmware.bios
    drives: tuple[Drive, ...] = ()
    boot_order: str = ""  # x86 "d" (cdrom) or "c" (disk)
    port_forwards: tuple[Forward, ...] = ()
    displays: tuple[str, ...] = ()  # display adapters: "std" (QEMU's VGA, 1234:1111) or "virtio" (virtio-gpu)
    extra: tuple[str, ...] = field(default=())
    published_log: Path | None = None  # where the console log is kept for the user, if not console_log itself
    # Unix sockets (QMP, console) live here; a socket path must stay under ~107 bytes (sun_path), which a deep
    # workdir exceeds, so `Vm` gives each VM a short private directory in the system temp dir.
    socket_dir: Path | None = None
    lan: LanPort | None = None  # a NIC on a private LAN (netboot); a booting one comes first on the PCI bus
    management: bool = True  # the user-networking NIC the probes' forwards go through
    reboot: bool = False  # a guest's reboot restarts the machine (a deploy's); else QEMU exits

    @property
    def shown_log(self) -> Path:
        """The console log an error message points the user to."""
        return self.published_log or self.console_log

    @property
    def qmp_socket(self) -> Path:
        return (self.socket_dir or self.workdir) / "qmp.sock"

    @property
    def console_socket(self) -> Path:
        return (self.socket_dir or self.workdir) / "console.sock"

    @property
    def ovmf_vars(self) -> Path:
        return self.workdir / "OVMF_VARS.fd"

    def argv(self) -> list[str]:
        """QEMU's argument list for this spec.

        >>> VmSpec("t", System.x86_64_linux, Path("/w"), Path("/w/log")).argv()[:3]
        ['qemu-system-x86_64', '-name', 't']
        """
        argv = [
            self.system.qemu_binary,
            "-name",
            self.name,
            "-nodefaults",
            "-display",
            "none",
            *([] if self.reboot else ["-no-reboot"]),
            "-m",
            str(self.memory_mib),
            "-smp",
            str(self.cpus),
        ]
        if self.system is System.aarch64_linux:
            argv += ["-machine", f"virt,accel={self.accel}", "-cpu", "cortex-a57" if self.accel == "tcg" else "host"]
        else:
            # A network boot's firmware (SeaBIOS, the NIC's iPXE) prints on the serial console only without graphics.
            graphics = ",graphics=off" if self.lan is not None and self.lan.boot else ""
            argv += ["-machine", f"pc,accel={self.accel}{graphics}"]
            if self.accel == "kvm":
                argv += ["-cpu", "host"]
        if self.firmware is Firmware.uboot:
            argv += ["-bios", str(UBOOT_ARM64)]
        elif self.firmware is Firmware.uefi:
            code = _first(OVMF_CODE)
            argv += [
                "-drive",
                f"if=pflash,format=raw,unit=0,readonly=on,file={code}",
                "-drive",
                f"if=pflash,format=raw,unit=1,file={self.ovmf_vars}",
            ]
        argv += [
            "-chardev",
            f"socket,id=console,path={self.console_socket},server=on,wait=off,logfile={self.console_log},logappend=on",
            "-serial",
            "chardev:console",
            "-qmp",
            f"unix:{self.qmp_socket},server=on,wait=off",
        ]
        sata_ports = scsi_disks = 0
        # Disks at a fixed PCI slot come first, before any device QEMU places by itself could take their slot.
        ordered = sorted(enumerate(self.drives), key=lambda item: item[1].slot is None)
        for index, drive in ordered:
            drive_id = f"drive{index}"
            opts = f"if=none,id={drive_id},file={drive.path},format={drive.format}"
            if drive.media == "cdrom":
                opts += ",media=cdrom,readonly=on"
            if drive.snapshot:
                opts += ",snapshot=on"
            argv += ["-drive", opts]
            serial = f",serial={drive.serial}" if drive.serial else ""
            serial += f",bootindex={drive.bootindex}" if drive.bootindex is not None else ""
            addr = f",addr=0x{drive.slot:02x}" if drive.slot is not None else ""
            if drive.media == "cdrom" and self.system is System.x86_64_linux:
                order = f",bootindex={drive.bootindex}" if drive.bootindex is not None else ""
                argv += ["-device", f"ide-cd,drive={drive_id},bus=ide.1{order}"]
            elif drive.bus == "nvme":
                argv += ["-device", f"nvme,drive={drive_id},serial={drive.serial or drive_id}{addr}"]
            elif drive.bus == "sata":
                if sata_ports == 0:
                    argv += ["-device", "ahci,id=ahci0"]
                ident = (f",model={drive.model}" if drive.model else "") + (f",wwn={drive.wwn}" if drive.wwn else "")
                argv += ["-device", f"ide-hd,drive={drive_id},bus=ahci0.{sata_ports}{serial}{ident}"]
                sata_ports += 1
            elif drive.bus == "scsi":
                if scsi_disks == 0:
                    argv += ["-device", "virtio-scsi-pci,id=scsi0"]
                ident = f",wwn={drive.wwn}" if drive.wwn else ""
                argv += ["-device", f"scsi-hd,drive={drive_id},bus=scsi0.0,scsi-id={scsi_disks}{serial}{ident}"]
                scsi_disks += 1
            else:
                argv += ["-device", f"virtio-blk-pci,drive={drive_id}{serial}{addr}"]
        for display in self.displays:
            std = "VGA" if self.system is System.x86_64_linux else "bochs-display"  # same PCI id, 1234:1111
            argv += ["-device", std if display == "std" else "virtio-gpu-pci"]
        if self.boot_order and self.system is System.x86_64_linux:
            boot = f"order={self.boot_order}"
            if self.firmware is Firmware.bios:
                # SeaBIOS: no boot menu and its wait for a key press; only the devices named (no fallback tries).
                boot += ",menu=off,strict=on"
            argv += ["-boot", boot]
        if self.lan is not None and self.lan.boot:
            argv += self.lan.argv()
        if self.management:
            netdev = "user,id=net0"
            if self.lan is not None:
                # Beside a LAN the VM's user networking only carries the probes' forwards: nothing it sends is
                # relayed to this machine's network.
                netdev += ",restrict=on"
            for forward in self.port_forwards:
                netdev += f",{forward.hostfwd}"
            # romfile= : no iPXE option ROM, which the firmware would otherwise load and initialise on every boot
            # (this NIC never boots from the network).
            argv += ["-netdev", netdev, "-device", "virtio-net-pci,netdev=net0,romfile="]
        if self.lan is not None and not self.lan.boot:
            argv += self.lan.argv()
        return argv + list(self.extra)


class Vm:
    """A running VM.  Use as a context manager: on the way out it is powered off, then its process group is killed.

    `wait_for_console(pattern, timeout)` waits for the guest to print a line.
    """

    def __init__(self, spec: VmSpec) -> None:
        self.spec = spec
        self.proc: subprocess.Popen[bytes] | None = None
        self._offset = 0
        self._seen = ""
        self.started_at = 0.0
        self._own_socket_dir = False

    # -- lifecycle -------------------------------------------------------------------------------------------------
    def __enter__(self) -> Vm:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self.spec.workdir.mkdir(parents=True, exist_ok=True)
        if self.spec.socket_dir is None:
            self.spec = dataclasses.replace(self.spec, socket_dir=Path(tempfile.mkdtemp(prefix="cim-vm-")))
            self._own_socket_dir = True
        spec = self.spec
        firmware = spec.firmware.files()  # fails clearly before QEMU would
        if spec.firmware is Firmware.uefi and not spec.ovmf_vars.exists():
            shutil.copyfile(firmware[1], spec.ovmf_vars)
        spec.console_log.parent.mkdir(parents=True, exist_ok=True)
        self._offset = spec.console_log.stat().st_size if spec.console_log.exists() else 0
        stderr_log = (spec.workdir / "qemu.stderr").open("wb")
        argv = spec.argv()
        try:
            # Through process.start: its own session, registered for a signal's clean stop, killed by the kernel if
            # the pipeline dies (parent-death signal).
            self.proc = process.start(argv, stdout=stderr_log, stderr=stderr_log)
        except FileNotFoundError:
            raise VmError(f"{spec.name}: {argv[0]} is not installed; run scripts/setup.sh") from None
        finally:
            stderr_log.close()
        self.started_at = time.monotonic()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def elapsed(self) -> float:
        return time.monotonic() - self.started_at

    def stop(self, grace: float = 10.0) -> None:
        """Quit QEMU through QMP (so the log is flushed), then make sure its process group is gone."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.qmp("quit")
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=grace)
        kill_group(self.proc, grace=2)
        self._read_new()
        if self._own_socket_dir and self.spec.socket_dir is not None:
            shutil.rmtree(self.spec.socket_dir, ignore_errors=True)

    def qmp(self, command: str) -> bool:
        """Send one QMP command (e.g. "quit", "system_powerdown"); False if QEMU did not take it."""
        try:
            qmp = QEMUMonitorProtocol(str(self.spec.qmp_socket))
            qmp.connect()
            qmp.settimeout(5)
            qmp.cmd(command)
            qmp.close()
        except Exception:  # a dead or dying QEMU: the caller kills the process group anyway
            return False
        return True

    def hmp(self, command: str) -> str:
        """One human-monitor command through QMP (e.g. "info usernet"); its text."""
        qmp = QEMUMonitorProtocol(str(self.spec.qmp_socket))
        try:
            qmp.connect()
            qmp.settimeout(5)
            return str(qmp.cmd("human-monitor-command", **{"command-line": command}))
        except Exception as exc:  # QMP's own errors: the VM is gone or not answering
            raise VmError(f"{self.spec.name}: QEMU's monitor did not answer {command!r}: {exc}") from None
        finally:
            qmp.close()

    def forwarded_ports(self) -> dict[Forward, int]:
        """Each of the spec's forwards → the port on 127.0.0.1 that reaches it (QEMU's choice for port 0)."""
        # QEMU creates its monitor socket a moment after it starts: ask until it answers, within a deadline.
        deadline = time.monotonic() + 15
        while True:
            try:
                bound = parse_usernet(self.hmp("info usernet"))
                break
            except VmError:
                if not self.running or time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        ports = {}
        for forward in self.spec.port_forwards:
            if forward.key not in bound:
                raise VmError(
                    f"{self.spec.name}: QEMU did not set up the forward {forward.hostfwd}",
                    detail=f"info usernet said:\n{bound}",
                )
            ports[forward] = bound[forward.key]
        return ports

    # -- the console -----------------------------------------------------------------------------------------------
    def _read_new(self) -> str:
        try:
            with self.spec.console_log.open("rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return ""
        self._offset += len(data)
        text = data.decode("utf-8", errors="replace")
        self._seen += text
        return text

    @property
    def console(self) -> str:
        """Everything this VM has printed so far."""
        self._read_new()
        return self._seen

    def tail(self, lines: int = 15) -> str:
        """The console's last lines."""
        return self._tail(lines)

    def _tail(self, lines: int = 15) -> str:
        return "\n".join(self.console.replace("\r", "").splitlines()[-lines:])

    def last_console_line(self) -> str:
        """The guest's last non-empty console line, read from the log's end (safe from the progress thread)."""
        return last_line_of(self.spec.console_log)

    def wait_for_console(self, pattern: str, timeout: float, what: str = "", after: int = 0) -> re.Match[str]:
        """Wait until the console prints `pattern` (a regex) at or past offset `after` of `console`; VmTimeout past
        the deadline, VmError if QEMU exits."""
        with progress(self.spec.name, f"waiting for {what or repr(pattern)}", timeout, self.last_console_line):
            return self._wait_for_console(pattern, timeout, what, after)

    def type_text(self, text: str, timeout: float = 10.0) -> None:
        """Type `text` on the serial console a character at a time, each echoed before the next (a firmware's
        shell under TCG drops what its UART cannot take at once)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as console:
            console.settimeout(timeout)
            console.connect(str(self.spec.console_socket))
            for char in text:
                mark = len(self.console)
                console.sendall(char.encode())
                if char.isprintable():
                    self._wait_for_console(re.escape(char), timeout, f"the echo of {char!r}", mark)

    def _wait_for_console(self, pattern: str, timeout: float, what: str, after: int = 0) -> re.Match[str]:
        regex = re.compile(pattern, re.M)
        deadline = time.monotonic() + timeout
        searched_from = after
        while True:
            self._read_new()
            match = regex.search(self._seen, max(after, searched_from - 4096))
            if match:
                return match
            searched_from = len(self._seen)
            process.check_interrupted()  # a signal stopped QEMU: say so, not that the VM died
            if not self.running:
                self._read_new()
                match = regex.search(self._seen, after)
                if match:
                    return match
                code = self.proc.returncode if self.proc else None
                stderr = self.spec.workdir / "qemu.stderr"
                said = stderr.read_text(errors="replace").strip()[-2000:] if stderr.exists() else ""
                raise VmError(
                    f"{self.spec.name}: QEMU exited (code {code}) before the console showed {what or pattern!r}; "
                    f"console log {self.spec.shown_log}. QEMU said: {said or '(nothing)'}. "
                    f"Last console lines:\n{self._tail()}"
                )
            if time.monotonic() > deadline:
                raise VmTimeout(
                    f"{self.spec.name}: the console did not show {what or pattern!r} within {timeout:g} s; the VM "
                    f"was stopped, its console log is {self.spec.shown_log}. Last console lines:\n{self._tail()}"
                )
            time.sleep(0.2)

    def wait_for_exit(self, timeout: float, what: str = "exit") -> int:
        """Wait for the guest to power off (QEMU exits); VmTimeout past the deadline."""
        assert self.proc is not None
        try:
            with progress(self.spec.name, f"waiting for {what}", timeout, self.last_console_line):
                code = self.proc.wait(timeout=timeout)
            process.check_interrupted()
        except subprocess.TimeoutExpired:
            raise VmTimeout(
                f"{self.spec.name}: no {what} within {timeout:g} s; the VM was stopped, its console log is "
                f"{self.spec.shown_log}. Last console lines:\n{self._tail()}"
            ) from None
        self._read_new()
        return code


# -- KVM: a bounded canary decides ------------------------------------------------------------------------------------


def kvm_canary(spec: VmSpec, timeout: float = KVM_CANARY_SECONDS) -> tuple[bool, str]:
    """Boot `spec` under KVM for at most `timeout` seconds: console output from the guest means KVM works.

    SeaBIOS alone is not proof: on machines where /dev/kvm exists but nested virtualisation is broken, the firmware
    runs and the first boot loader then dies with "KVM internal error … emulation failure" and the guest hangs.  So
    the canary boots the real image and wants its kernel on the serial console.
    """
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm is missing or not accessible"
    canary = dataclasses.replace(
        spec,
        name=f"{spec.name}-kvm-canary",
        accel="kvm",
        workdir=spec.workdir / "kvm-canary",
        console_log=spec.workdir / "kvm-canary.log",
    )
    canary.console_log.unlink(missing_ok=True)
    started = time.monotonic()
    with Vm(canary) as vm, progress(canary.name, "KVM canary boot", timeout, vm.last_console_line):
        stderr = canary.workdir / "qemu.stderr"
        while vm.elapsed() < timeout:
            errors = stderr.read_text(errors="replace") if stderr.exists() else ""
            if "KVM internal error" in errors or "emulation failure" in errors or not vm.running:
                first = next((ln for ln in errors.splitlines() if "error" in ln.lower()), "QEMU exited")
                return False, f"a KVM canary boot failed after {time.monotonic() - started:.1f} s ({first.strip()})"
            if KERNEL_STARTED.search(vm.console):
                return True, f"a KVM canary boot reached the guest kernel in {time.monotonic() - started:.1f} s"
            time.sleep(0.2)
    return False, f"a KVM canary boot printed nothing on the console within {timeout:g} s (KVM hangs here)"


def choose_accel(spec: VmSpec, state_dir: Path) -> tuple[Accel, str]:
    """("kvm" | "tcg", why) for `spec`.  The canary runs once per machine boot; its verdict is kept in state_dir,
    which is machine-wide (the checkout's .cim/), not per domain: KVM works or not for every domain alike."""
    host_arch = os.uname().machine
    if spec.system.arch != host_arch:
        return "tcg", f"{spec.system.value} guest on an {host_arch} host: TCG emulation"
    if os.environ.get("CIM_ACCEL") in {"kvm", "tcg"}:
        return ("kvm" if os.environ["CIM_ACCEL"] == "kvm" else "tcg"), "CIM_ACCEL is set"
    boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    cache = state_dir / "kvm-canary.json"
    with contextlib.suppress(OSError, ValueError, KeyError):
        verdict = json.loads(cache.read_text())
        if verdict["boot_id"] == boot_id:
            return ("kvm" if verdict["ok"] else "tcg"), f"{verdict['why']} (canary of this boot, cached)"
    ok, why = kvm_canary(spec)
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"boot_id": boot_id, "ok": ok, "why": why}))
    tmp.replace(cache)
    return ("kvm" if ok else "tcg"), why


def free_port(tries: int = 20) -> int:
    """A port on 127.0.0.1 free for both TCP and UDP right now (a guest port forward takes both)."""
    for _ in range(tries):
        with socket.socket() as tcp, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            tcp.bind(("127.0.0.1", 0))
            port = int(tcp.getsockname()[1])
            try:
                udp.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise VmError(f"no port on 127.0.0.1 was free for both TCP and UDP in {tries} tries")
