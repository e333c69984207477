"""Hardware inventory: a facter-shaped report (what a machine detected) against domain.json (what it should be).

Pure: no I/O, no subprocess.  Three steps, each a function:

  `boot_machine(host)`   what the boot-test VM is given (memory, CPUs, disks, display adapters) — the host's `boot`
                         settings, defaulting to the declared hardware where QEMU can give it — and which declared
                         facts a VM cannot be (a 128 GiB machine, a passed-through GPU): those are *unchecked*, with
                         the reason, never a match;
  `parse_report(data)`   a nixos-facter `facter.json` (or the demo images' `cim-inventory` report, the same shape)
                         into `Detected` facts;
  `reconcile(...)`       declared vs detected → `Difference`s (field, declared, detected, kind: missing, unexpected,
                         differs); `verdict()` applies the domain's `inventory` policy.

Comparison rules: memory compares installed bytes within `MEMORY_TOLERANCE` (5 %: hwinfo rounds its `phys_mem`
range and firmware reserves some); disk sizes within `DISK_TOLERANCE` (1 %); disks match by device name; GPUs by PCI
vendor:device id when declared, else by model; model strings match when every word of the declared one is in the
detected one ("Intel Xeon Gold 6230" matches "Intel(R) Xeon(R) Gold 6230 CPU @ 2.10GHz").
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from pipeline.artifacts import InventoryDifference as Difference
from pipeline.artifacts import InventoryKind as Kind
from pipeline.artifacts import InventoryUnchecked as Unchecked
from pipeline.domain import DiskBus, Display, Gpu, Hardware, Host, InventoryPolicy
from pipeline.errors import CimError

MEMORY_TOLERANCE = 0.05
DISK_TOLERANCE = 0.01
# What a boot-test VM is given at most; a declared machine beyond it is unchecked in the boot test.
VM_MAX_MEMORY_MIB = 16384
VM_MAX_CPUS = 8
VM_MAX_DISK_GIB = 8192  # sparse files: a blank disk costs no space until written
VM_DEFAULT_MEMORY_MIB = 1024
GIB = 1 << 30


class InventoryError(CimError):
    """A hardware report that cannot be read, or an inventory that the `enforce` policy refuses."""


# -- what the boot VM is ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VmDisk:
    """A disk the boot VM has besides its boot medium: a sparse blank image on `bus`."""

    size_gib: float
    bus: DiskBus


@dataclass(frozen=True)
class BootMachine:
    """What the boot-test VM is given, and which declared facts it cannot be (with the reason)."""

    memory_mib: int
    cpus: int
    disks: tuple[VmDisk, ...] = ()
    displays: tuple[Display, ...] = ()
    unchecked: tuple[Unchecked, ...] = ()

    @property
    def unchecked_fields(self) -> set[str]:
        return {u.field for u in self.unchecked}


def _gib(value: float) -> str:
    return f"{value:g} GiB"


def is_virtual(hardware: Hardware) -> bool:
    """The declared machine is itself a QEMU VM (the demo): its board and CPU model are QEMU's, and checkable."""
    return hardware.vendor.strip().lower() == "qemu"


def _display_for(gpu: Gpu) -> Display | None:
    return next((d for d in Display if gpu.pci_id and d.pci_id == gpu.pci_id), None)


def boot_machine(host: Host) -> BootMachine:
    """The boot VM of `host`: its `boot` settings, else the declared hardware where QEMU can give it."""
    hw, boot = host.hardware, host.boot
    unchecked: list[Unchecked] = []
    declared_mib = int(hw.memory_gib * 1024)
    if declared_mib > VM_MAX_MEMORY_MIB:
        memory = boot.memory_mib or VM_DEFAULT_MEMORY_MIB
        unchecked.append(
            Unchecked(
                field="memory_gib",
                declared=_gib(hw.memory_gib),
                reason=f"a boot VM gets at most {VM_MAX_MEMORY_MIB // 1024} GiB (this one {memory} MiB); "
                "the machine's own report checks it (`cim inventory --facter`)",
            )
        )
    else:
        memory = boot.memory_mib or declared_mib
    declared_cpus = hw.cpu.threads or hw.cpu.cores
    if declared_cpus > VM_MAX_CPUS:
        cpus = boot.cpus or 1
        unchecked.append(
            Unchecked(
                field="cpu.cores",
                declared=f"{hw.cpu.cores} cores / {declared_cpus} threads",
                reason=f"a boot VM gets at most {VM_MAX_CPUS} CPUs (this one {cpus})",
            )
        )
    else:
        cpus = boot.cpus or declared_cpus
    if not is_virtual(hw):
        reason = "a boot VM is a QEMU machine; the real machine's report checks it (`cim inventory --facter`)"
        unchecked.append(Unchecked(field="model", declared=f"{hw.vendor} {hw.model}".strip(), reason=reason))
        unchecked.append(Unchecked(field="cpu.model", declared=hw.cpu.model, reason=reason))

    disks: list[VmDisk] = []
    for disk in hw.disks:
        fieldname = f"disks.{disk.name}"
        if disk.image:
            unchecked.append(
                Unchecked(
                    field=f"{fieldname}.size_gib",
                    declared=_gib(disk.size_gib),
                    reason="this disk is the image itself: the VM's disk is the image file's size",
                )
            )
            continue
        bus = DiskBus.for_device(disk.device)
        if boot.disks is not None:
            continue
        if bus is None:
            unchecked.append(
                Unchecked(
                    field=fieldname,
                    declared=f"{disk.device} {_gib(disk.size_gib)}",
                    reason=f"the boot VM has no disk that the guest names {disk.device}",
                )
            )
        elif disk.size_gib > VM_MAX_DISK_GIB:
            unchecked.append(
                Unchecked(
                    field=fieldname,
                    declared=_gib(disk.size_gib),
                    reason=f"a boot VM's blank disk is at most {VM_MAX_DISK_GIB} GiB",
                )
            )
        else:
            disks.append(VmDisk(disk.size_gib, bus))
    if boot.disks is not None:
        disks = [VmDisk(d.size_gib, d.bus) for d in boot.disks]

    displays: list[Display] = []
    for index, gpu in enumerate(hw.gpus):
        display = _display_for(gpu)
        if gpu.passthrough:
            unchecked.append(
                Unchecked(
                    field=f"gpus[{index}]",
                    declared=gpu.model,
                    reason="a passed-through GPU cannot be given to a boot VM",
                )
            )
        elif display is None:
            unchecked.append(
                Unchecked(
                    field=f"gpus[{index}]",
                    declared=gpu.model,
                    reason="QEMU has no such display adapter (give pci_id of one it has, or check the real machine's "
                    "report)",
                )
            )
        elif boot.displays is None:
            displays.append(display)
    if boot.displays is not None:
        displays = list(boot.displays)
    return BootMachine(
        memory_mib=memory, cpus=cpus, disks=tuple(disks), displays=tuple(displays), unchecked=tuple(unchecked)
    )


# -- what a machine detected --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DetectedDisk:
    name: str  # the kernel's name: vda, nvme0n1, sda
    size_bytes: int
    model: str = ""
    serial: str = ""
    driver: str = ""

    @property
    def size_gib(self) -> float:
        return self.size_bytes / GIB


@dataclass(frozen=True)
class DetectedGpu:
    pci_id: str  # vendor:device, lower-case hex
    model: str
    bus_id: str = ""
    driver: str = ""
    iommu_group: int | None = None


@dataclass(frozen=True)
class DetectedNic:
    name: str
    driver: str
    mac: str


@dataclass(frozen=True)
class Detected:
    """The facts of one hardware report that the inventory compares (and a few it only shows)."""

    system: str
    virtualisation: str
    vendor: str
    model: str
    cpu_model: str
    cpu_cores: int
    cpu_threads: int
    architecture: str
    memory_bytes: int
    disks: tuple[DetectedDisk, ...] = ()
    gpus: tuple[DetectedGpu, ...] = ()
    nics: tuple[DetectedNic, ...] = ()
    firmware: str = ""

    @property
    def memory_gib(self) -> float:
        return self.memory_bytes / GIB


def _hex4(ident: Any) -> str:
    if isinstance(ident, dict):
        if "hex" in ident:
            return str(ident["hex"]).lower()[-4:].rjust(4, "0")
        if "value" in ident:
            return f"{int(ident['value']):04x}"
    return ""


def _device_name(entry: dict[str, Any]) -> str:
    name = entry.get("unix_device_name") or ""
    if not name:
        names = [n for n in entry.get("unix_device_names", []) if n.startswith("/dev/") and "/disk/" not in n]
        name = names[0] if names else str(entry.get("sysfs_id", "")).rsplit("/", 1)[-1]
    return str(name).removeprefix("/dev/")


VENDORS = {"AuthenticAMD": "AMD", "GenuineIntel": "Intel", "HygonGenuine": "Hygon", "CentaurHauls": "VIA"}
_CPU_WORDS = re.compile(r"\b(intel|amd|arm|cortex|xeon|epyc|ryzen|core|celeron|pentium|atom|neoverse|apple)\b", re.I)
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$", re.I)


def _cpu_model(cpus: list[dict[str, Any]], smbios: list[dict[str, Any]]) -> str:
    """The CPU's name: hwinfo's model_name; else the SMBIOS processor's version when it names a CPU (a VM's firmware
    puts its machine type there, e.g. "pc-i440fx-9.0"); else the vendor, family and model numbers."""
    named = next((str(c["model_name"]) for c in cpus if c.get("model_name")), "")
    if named:
        return named
    version = next((str(p.get("version", "")).strip() for p in smbios if p.get("version")), "")
    if version and _CPU_WORDS.search(version):
        return version
    first = next((c for c in cpus if c.get("vendor_name")), None)
    if first is None:
        return version
    vendor = str(first["vendor_name"])
    numbers = ", ".join(f"{key} {first[key]}" for key in ("family", "model", "stepping") if first.get(key) is not None)
    return f"{VENDORS.get(vendor, vendor)} CPU ({vendor}{', ' + numbers if numbers else ''})"


def _is_disk(entry: dict[str, Any]) -> bool:
    """A disk the machine could install onto: not a floppy, not removable, not empty (hwinfo lists all as disks)."""
    name = _device_name(entry)
    flags = entry.get("is") or {}
    if name.startswith("fd") or entry.get("driver") == "floppy" or flags.get("removable"):
        return False
    return _disk_bytes(entry) > 0 and not flags.get("not_ready")


def _mac(nic: dict[str, Any]) -> str:
    """The interface's MAC where the report has one; nixos-facter writes an index there (e.g. 53), not a MAC."""
    for res in nic.get("resources", []):
        if res.get("type") == "hwaddr" and _MAC.match(str(res.get("address", ""))):
            return str(res["address"]).lower()
    return ""


def _disk_bytes(entry: dict[str, Any]) -> int:
    for res in entry.get("resources", []):
        if res.get("type") == "size" and res.get("unit") == "sectors":
            return int(res.get("value_1", 0)) * int(res.get("value_2", 512) or 512)
    return 0


def _memory_bytes(data: dict[str, Any]) -> int:
    """Installed memory: the SMBIOS memory devices (sizes in KiB) when there are any, else hwinfo's phys_mem."""
    devices = (data.get("smbios") or {}).get("memory_device") or []
    installed = sum(int(d.get("size", 0) or 0) for d in devices) * 1024
    if installed:
        return installed
    return sum(
        int(res.get("range", 0))
        for mem in (data.get("hardware") or {}).get("memory", [])
        for res in mem.get("resources", [])
        if res.get("type") == "phys_mem"
    )


def parse_report(data: Any, source: str) -> Detected:
    """A facter.json (nixos-facter, or the demo images' cim-inventory) → `Detected`; InventoryError if it is not one."""
    if not isinstance(data, dict) or not isinstance(data.get("hardware"), dict) or "version" not in data:
        raise InventoryError(
            f"{source}: not a hardware report (no top-level 'version' and 'hardware').",
            hint="Give a facter.json from `nixos-facter` or an inventory.json from a boot test.",
        )
    hw = data["hardware"]
    try:
        cpus = hw.get("cpu") or []
        cpu_model = _cpu_model(cpus, (data.get("smbios") or {}).get("processor") or [])
        cores = sum(int(c.get("cores") or c.get("siblings") or 1) for c in cpus)
        threads = sum(int(c.get("siblings") or c.get("cores") or 1) for c in cpus)
        disks = tuple(
            DetectedDisk(
                _device_name(d),
                _disk_bytes(d),
                str(d.get("model", "")),
                str(d.get("serial", "")),
                str(d.get("driver", "")),
            )
            for d in hw.get("disk", [])
            if _is_disk(d)
        )
        gpus = tuple(
            DetectedGpu(
                f"{_hex4(g.get('vendor'))}:{_hex4(g.get('device'))}",
                str(g.get("model", "")),
                str(g.get("sysfs_bus_id", "")),
                str(g.get("driver", "")),
                g.get("sysfs_iommu_group_id"),
            )
            for g in hw.get("graphics_card", [])
        )
        nics = []
        for n in hw.get("network_interface", []):
            names = n.get("unix_device_names") or [str(n.get("sysfs_id", "")).rsplit("/", 1)[-1]]
            if names[0] == "lo":
                continue
            nics.append(DetectedNic(str(names[0]), str(n.get("driver", "")), _mac(n)))
        smbios_system = (data.get("smbios") or {}).get("system") or {}
        return Detected(
            system=str(data.get("system", "")),
            virtualisation=str(data.get("virtualisation", "")),
            vendor=str(smbios_system.get("manufacturer", "")),
            model=str(smbios_system.get("product", "")),
            cpu_model=cpu_model,
            cpu_cores=cores,
            cpu_threads=threads,
            architecture=str(cpus[0].get("architecture", "")) if cpus else "",
            memory_bytes=_memory_bytes(data),
            disks=disks,
            gpus=gpus,
            nics=tuple(nics),
            firmware=str((data.get("firmware") or {}).get("type", "")),
        )
    except (TypeError, ValueError, AttributeError, KeyError) as exc:
        raise InventoryError(
            f"{source}: a hardware report whose fields are not as facter writes them ({exc}).",
            hint="Give the facter.json unchanged, as nixos-facter wrote it.",
        ) from None


# -- declared vs detected -----------------------------------------------------------------------------------------


def _words(text: str) -> set[str]:
    text = re.sub(r"\((r|tm|c)\)|@.*$", " ", text.lower())
    return {w for w in re.split(r"[^a-z0-9.+-]+", text) if w and w not in {"cpu", "processor"}}


def model_matches(declared: str, detected: str) -> bool:
    """Every word of the declared model is in the detected one (vendor marks and clock suffixes aside)."""
    want = _words(declared)
    return bool(want) and want <= _words(detected)


def _gpu_matches(gpu: Gpu, found: DetectedGpu) -> bool:
    return found.pci_id == gpu.pci_id if gpu.pci_id else model_matches(gpu.model, found.model)


def reconcile(hw: Hardware, detected: Detected, unchecked: Collection[str] = ()) -> list[Difference]:
    """Declared `hw` vs `detected`; facts in `unchecked` (field names as in `Unchecked`) are not compared."""
    return [
        *_machine_differences(hw, detected, unchecked),
        *_disk_differences(hw, detected, unchecked),
        *_gpu_differences(hw, detected, unchecked),
    ]


def _machine_differences(hw: Hardware, detected: Detected, unchecked: Collection[str]) -> list[Difference]:
    """The board (vendor, model), the CPU and the memory."""
    out: list[Difference] = []

    def differs(name: str, declared: str, found: str) -> None:
        if name not in unchecked:
            out.append(Difference(field=name, declared=declared, detected=found, kind=Kind.differs))

    if "model" not in unchecked:
        if hw.vendor and not model_matches(hw.vendor, detected.vendor):
            differs("vendor", hw.vendor, detected.vendor or "(none)")
        if not model_matches(hw.model, detected.model):
            differs("model", hw.model, detected.model or "(none)")
    if not model_matches(hw.cpu.model, detected.cpu_model):
        differs("cpu.model", hw.cpu.model, detected.cpu_model or "(none)")
    if "cpu.cores" not in unchecked:
        if hw.cpu.cores != detected.cpu_cores:
            differs("cpu.cores", str(hw.cpu.cores), str(detected.cpu_cores))
        if hw.cpu.threads is not None and hw.cpu.threads != detected.cpu_threads:
            differs("cpu.threads", str(hw.cpu.threads), str(detected.cpu_threads))
    declared_bytes = hw.memory_gib * GIB
    if abs(detected.memory_bytes - declared_bytes) > MEMORY_TOLERANCE * declared_bytes:
        differs("memory_gib", _gib(hw.memory_gib), _gib(round(detected.memory_gib, 2)))
    return out


def _disk_differences(hw: Hardware, detected: Detected, unchecked: Collection[str]) -> list[Difference]:
    """Declared disks by device name and size; detected disks nobody declared."""
    out: list[Difference] = []
    found = {d.name: d for d in detected.disks}
    for disk in hw.disks:
        name = f"disks.{disk.name}"
        match = found.pop(disk.device.removeprefix("/dev/"), None)
        if name in unchecked:
            continue
        if match is None:
            out.append(
                Difference(
                    field=name, declared=f"{disk.device} {_gib(disk.size_gib)}", detected="(none)", kind=Kind.missing
                )
            )
        elif (
            f"{name}.size_gib" not in unchecked
            and abs(match.size_bytes - disk.size_gib * GIB) > DISK_TOLERANCE * disk.size_gib * GIB
        ):
            out.append(
                Difference(
                    field=f"{name}.size_gib",
                    declared=_gib(disk.size_gib),
                    detected=_gib(round(match.size_gib, 2)),
                    kind=Kind.differs,
                )
            )
    for extra in found.values():
        seen = f"/dev/{extra.name} {_gib(round(extra.size_gib, 2))}" + (f" {extra.model}" if extra.model else "")
        out.append(Difference(field=f"disks.{extra.name}", declared="(none)", detected=seen, kind=Kind.unexpected))
    return out


def _gpu_differences(hw: Hardware, detected: Detected, unchecked: Collection[str]) -> list[Difference]:
    """Declared GPUs by PCI id or model; detected display adapters nobody declared."""
    out: list[Difference] = []
    gpus = list(detected.gpus)
    for index, gpu in enumerate(hw.gpus):
        name = f"gpus[{index}]"
        card = next((g for g in gpus if _gpu_matches(gpu, g)), None)
        if card is not None:
            gpus.remove(card)
        if name in unchecked:
            continue
        declared = f"{gpu.model}" + (f" [{gpu.pci_id}]" if gpu.pci_id else "")
        if card is None:
            out.append(Difference(field=name, declared=declared, detected="(none)", kind=Kind.missing))
        elif gpu.pci_id and not model_matches(gpu.model, card.model):
            out.append(Difference(field=f"{name}.model", declared=gpu.model, detected=card.model, kind=Kind.differs))
    for other in gpus:
        out.append(
            Difference(
                field="gpus",
                declared="(none)",
                detected=f"{other.model} [{other.pci_id}] at {other.bus_id}",
                kind=Kind.unexpected,
            )
        )
    return out


@dataclass(frozen=True)
class Verdict:
    policy: InventoryPolicy
    differences: tuple[Difference, ...]
    unchecked: tuple[Unchecked, ...] = field(default=())

    @property
    def matches(self) -> bool:
        return not self.differences

    @property
    def passed(self) -> bool:
        """Only `enforce` fails on a difference; `record` and `warn` keep it."""
        return self.matches or self.policy is not InventoryPolicy.enforce

    def summary(self) -> str:
        checked = (
            "matches the inventory" if self.matches else f"{len(self.differences)} difference(s) from the inventory"
        )
        extra = f", {len(self.unchecked)} fact(s) unchecked" if self.unchecked else ""
        return f"{checked}{extra} (policy {self.policy.value})"

    def lines(self) -> list[str]:
        return [d.describe() for d in self.differences] + [u.describe() for u in self.unchecked]


def verdict(hw: Hardware, detected: Detected, policy: InventoryPolicy, machine: BootMachine | None = None) -> Verdict:
    """Reconcile and judge: `machine` (the boot VM) makes what it cannot be unchecked; None for a real machine."""
    unchecked = machine.unchecked if machine is not None else ()
    diffs = reconcile(hw, detected, {u.field for u in unchecked})
    return Verdict(policy, tuple(diffs), tuple(unchecked))


def enforce_error(host: str, result: Verdict) -> InventoryError:
    """The boot failure under `enforce`: each difference as declared vs detected."""
    return InventoryError(
        f"{host}: the detected hardware is not what domain.json declares: "
        + "; ".join(d.describe() for d in result.differences)
        + ".",
        hint="Unknown hardware does not pass under inventory policy 'enforce': fix domain.json (`cim inventory "
        f'{host} --domain DIR --write`) or the machine, or set "inventory": "record".',
    )


# -- side by side, and bringing domain.json in line ---------------------------------------------------------------


def side_by_side(hw: Hardware, detected: Detected, result: Verdict) -> list[tuple[str, str, str, str]]:
    """Rows (fact, declared, detected, status) for `cim inventory`."""
    status = {d.field: d.kind.value for d in result.differences}
    status.update({u.field: "unchecked" for u in result.unchecked})

    def st(name: str) -> str:
        return status.get(name, "ok")

    rows = [
        (
            "machine",
            f"{hw.vendor} {hw.model}".strip(),
            f"{detected.vendor} {detected.model}".strip(),
            st("model") if "model" in status else st("vendor"),
        ),
        ("cpu.model", hw.cpu.model, detected.cpu_model, st("cpu.model")),
        ("cpu.cores", str(hw.cpu.cores), str(detected.cpu_cores), st("cpu.cores")),
        ("cpu.threads", str(hw.cpu.threads or "-"), str(detected.cpu_threads), st("cpu.threads")),
        ("memory_gib", f"{hw.memory_gib:g}", f"{detected.memory_gib:.2f}", st("memory_gib")),
    ]
    seen = set()
    for disk in hw.disks:
        name = disk.device.removeprefix("/dev/")
        seen.add(name)
        got = next((d for d in detected.disks if d.name == name), None)
        shown = f"/dev/{got.name} {got.size_gib:.2f} GiB {got.model}".strip() if got else "(none)"
        key = f"disks.{disk.name}"
        rows.append(
            (
                key,
                f"{disk.device} {disk.size_gib:g} GiB" + (" (image)" if disk.image else ""),
                shown,
                status.get(key, status.get(f"{key}.size_gib", "ok")),
            )
        )
    for got in detected.disks:
        if got.name not in seen:
            rows.append((f"disks.{got.name}", "(none)", f"/dev/{got.name} {got.size_gib:.2f} GiB", "unexpected"))
    for index, gpu in enumerate(hw.gpus):
        key = f"gpus[{index}]"
        match = next((g for g in detected.gpus if _gpu_matches(gpu, g)), None)
        rows.append(
            (
                key,
                gpu.model,
                f"{match.model} [{match.pci_id}]" if match else "(none)",
                status.get(key, status.get(f"{key}.model", "ok")),
            )
        )
    for card in detected.gpus:
        if not any(_gpu_matches(g, card) for g in hw.gpus):
            rows.append(("gpus", "(none)", f"{card.model} [{card.pci_id}] at {card.bus_id}", "unexpected"))
    for nic in detected.nics:
        rows.append((f"nic {nic.name}", "-", f"{nic.driver} {nic.mac or 'MAC not in the report'}", "reported"))
    rows.append(("firmware", "-", detected.firmware or "-", "reported"))
    rows.append(("virtualisation", "-", detected.virtualisation or "-", "reported"))
    return rows


def _disk_kind(name: str) -> str:
    return "nvme" if name.startswith("nvme") else "sd" if name.startswith("mmcblk") else "ssd"


def merged_hardware(hw_json: dict[str, Any], detected: Detected, unchecked: Collection[str] = ()) -> dict[str, Any]:
    """domain.json's `hardware` object with the detected facts merged in (key order kept; unchecked facts untouched).

    Declared disks and GPUs that were not detected are dropped; detected ones that were not declared are added.
    """
    out = dict(hw_json)
    if "model" not in unchecked:
        if detected.vendor:
            out["vendor"] = detected.vendor
        if detected.model:
            out["model"] = detected.model
    cpu = dict(out.get("cpu", {}))
    if "cpu.model" not in unchecked and detected.cpu_model:
        cpu["model"] = detected.cpu_model
    if "cpu.cores" not in unchecked:
        cpu["cores"] = detected.cpu_cores
        if detected.cpu_threads != detected.cpu_cores:
            cpu["threads"] = detected.cpu_threads
        else:
            cpu.pop("threads", None)
    out["cpu"] = cpu
    if "memory_gib" not in unchecked:
        out["memory_gib"] = round(detected.memory_gib, 2)
    found = {d.name: d for d in detected.disks}
    disks = []
    for disk in out.get("disks", []):
        key = f"disks.{disk.get('name')}"
        name = str(disk.get("device", "")).removeprefix("/dev/")
        got = found.pop(name, None)
        if key in unchecked or disk.get("image"):
            disks.append(disk)
        elif got is not None:
            disks.append({**disk, "size_gib": round(got.size_gib, 2)})
    for got in found.values():
        disks.append(
            {
                "name": re.sub(r"[^a-z0-9-]", "-", got.name.lower()),
                "device": f"/dev/{got.name}",
                "size_gib": round(got.size_gib, 2),
                "kind": _disk_kind(got.name),
            }
        )
    out["disks"] = disks
    gpus_found = list(detected.gpus)
    gpus = []
    for index, gpu_json in enumerate(out.get("gpus", [])):
        gpu = Gpu.model_validate(gpu_json)
        match = next((g for g in gpus_found if _gpu_matches(gpu, g)), None)
        if match is not None:
            gpus_found.remove(match)
        if f"gpus[{index}]" in unchecked:
            gpus.append(gpu_json)
        elif match is not None:
            gpus.append({**gpu_json, "pci_id": match.pci_id})
    gpus += [{"model": g.model, "pci_id": g.pci_id} for g in gpus_found]
    if gpus or "gpus" in out:
        out["gpus"] = gpus
    return out
