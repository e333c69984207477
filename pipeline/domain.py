"""The domain model: what `domain.json` may say, validated once and frozen.

A domain is a set of hosts (with their hardware inventory, guests and images), the accounts that may log in, and the
remote builders Nix may use.  `load_domain()` turns the JSON file into a `Domain` or raises `DomainError`, whose
message names the file, the field and the fix — never a traceback.
"""

from __future__ import annotations

import enum
import functools
import ipaddress
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from pipeline import contract
from pipeline.errors import CimError

DOMAIN_FILE = "domain.json"
# A domain.json is a few kilobytes; anything past this is the wrong file, and reading it whole would be slow.
MAX_DOMAIN_BYTES = 4 * 2**20

_SSH_KEY = re.compile(r"^(ssh-(ed25519|rsa)|ecdsa-sha2-nistp\d+|sk-ssh-ed25519@openssh.com) [A-Za-z0-9+/=]+")
# RFC 1123 label: letters, digits and hyphens, not starting or ending with a hyphen, at most 63 characters.
_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


class DomainError(CimError):
    """A domain that cannot be used; `str()` is the one-paragraph message the user reads."""


def _label(value: str) -> str:
    if not _LABEL.match(value):
        raise ValueError(
            f"{value!r} is not a valid host name: use an RFC 1123 label — lower-case letters, digits and '-', "
            "1 to 63 characters, not starting or ending with '-'"
        )
    return value


Label = Annotated[str, AfterValidator(_label)]


def _fqdn(value: str) -> str:
    for part in value.split("."):
        _label(part)
    return value


class Model(BaseModel):
    """Base for every domain model: frozen, and unknown fields are errors (a typo must not pass silently)."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class System(enum.StrEnum):
    """A Nix system double, carrying what QEMU and Debian call the same architecture."""

    x86_64_linux = "x86_64-linux"
    aarch64_linux = "aarch64-linux"

    @property
    def arch(self) -> str:
        """The CPU name as `uname -m` prints it."""
        return self.value.split("-")[0]

    @property
    def qemu_binary(self) -> str:
        return f"qemu-system-{self.arch}"

    @property
    def debian_arch(self) -> str:
        return {"x86_64": "amd64", "aarch64": "arm64"}[self.arch]


class Strategy(enum.StrEnum):
    """How an image of a system gets built here (pipeline.nix.plan_build chooses)."""

    native = "native"
    emulation = "emulation"
    remote = "remote"


class Sandbox(enum.StrEnum):
    """Nix's build sandbox as the pipeline asks for it (CIM_SANDBOX): `on` by default; `relaxed` is Nix's relaxed
    mode (derivations may opt out with __noChroot); `off` builds with no sandbox, where Nix cannot make one."""

    on = "on"
    relaxed = "relaxed"
    off = "off"

    @property
    def nix_value(self) -> str:
        return {"on": "true", "relaxed": "relaxed", "off": "false"}[self.value]


Accel = Literal["kvm", "tcg"]  # how QEMU runs a guest: hardware virtualisation or its own translator


class Format(enum.StrEnum):
    """An image format, carrying where NixOS puts it and what Hydra calls it."""

    iso = "iso"
    sd = "sd"
    netboot = "netboot"  # a kernel, an initrd and an iPXE script, served to the host by the domain's provisioner

    @property
    def attribute(self) -> str:
        """The `config.system.build` attribute that builds it."""
        return {"iso": "isoImage", "sd": "sdImage", "netboot": "netboot"}[self.value]

    @property
    def product_type(self) -> str:
        """The subtype in `nix-support/hydra-build-products` (`file <subtype> <path>`): the image's one file, or for
        netboot the iPXE script that names the others."""
        return {"iso": "iso", "sd": "sd-image", "netboot": "ipxe"}[self.value]

    @property
    def product_types(self) -> tuple[str, ...]:
        """Every file the image is made of, by its hydra-build-products subtype (nixpkgs' netboot Hydra job writes
        `file kernel …`, `file initrd …`, `file ipxe …`)."""
        return ("kernel", "initrd", "ipxe") if self is Format.netboot else (self.product_type,)

    @property
    def extension(self) -> str:
        return {"iso": ".iso", "sd": ".img", "netboot": ".ipxe"}[self.value]


class GuestKind(enum.StrEnum):
    dev = "dev"
    dns = "dns"
    nats = "nats"
    # The LAN service of the domain's provisioner (DHCP for declared MACs only, TFTP/HTTP for netboot images): on
    # the host's LAN bridge, its address in the LAN, not on the guests' bridge.
    provisioner = "provisioner"


_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


def _mac(value: str) -> str:
    mac = value.lower().replace("-", ":")
    if not _MAC.match(mac):
        raise ValueError(f"{value!r} is not a MAC address: write six hex bytes, e.g. '52:54:00:23:00:12'")
    if int(mac[:2], 16) & 1:
        raise ValueError(f"{value!r} is a multicast address (its first byte is odd); a NIC's address is unicast")
    return mac


Mac = Annotated[str, AfterValidator(_mac)]


class Nic(Model):
    """A network interface of the host, by the MAC the LAN knows it by (the provisioner leases to declared MACs)."""

    name: Label
    mac: Mac


class Cpu(Model):
    model: str
    cores: int = Field(ge=1)
    threads: int | None = Field(default=None, ge=1)


class Gpu(Model):
    model: str
    pci_id: str | None = Field(default=None, pattern=r"^[0-9a-f]{4}:[0-9a-f]{4}$")  # PCI vendor:device, e.g. 10de:2206
    passthrough: bool = False
    # Which guests get the GPU when it is passed through (e.g. containers in `dev`).
    passthrough_to: tuple[Label, ...] = ()


class DiskBus(enum.StrEnum):
    """How a VM attaches a disk, and what the guest kernel calls the first one (the image contract's `disks`)."""

    virtio = "virtio"  # /dev/vdX
    nvme = "nvme"  # /dev/nvmeXnY
    sata = "sata"  # /dev/sdX

    @property
    def device(self) -> str:
        """The device the first disk on this bus is in the guest: /dev/nvme0n1, /dev/vda, /dev/sda."""
        return contract.CONTRACT.disks[self.value]

    @classmethod
    def for_device(cls, device: str) -> DiskBus | None:
        """The bus that gives a guest `device` (None: one QEMU cannot give here, e.g. an SD card's mmcblk)."""
        name = device.removeprefix("/dev/")
        for prefix, bus in (("vd", cls.virtio), ("nvme", cls.nvme), ("sd", cls.sata)):
            if name.startswith(prefix):
                return bus
        return None


class Disk(Model):
    """A disk of the host.  `kind` says what it is; a bus name there (nvme, virtio, sata) is how it is attached, and
    the install VM attaches its target the same way, so the installer finds it where the real host has it.  Any other
    kind (ssd, sd, …) leaves the bus to the device's name (/dev/nvme0n1: nvme)."""

    name: Label
    device: str
    size_gib: float = Field(gt=0)
    kind: str = "ssd"
    # The disk the image itself is (an SD card written with the sd image): the boot VM boots it, not a blank one.
    image: bool = False

    @model_validator(mode="after")
    def _kind_fits_device(self) -> Disk:
        named = DiskBus.for_device(self.device)
        if self.kind in DiskBus.__members__ and named is not None and named.value != self.kind:
            bus = DiskBus(self.kind)
            raise ValueError(
                f"disk {self.name!r}: kind {self.kind!r} attaches as {bus.device}, but device is "
                f"{self.device!r} (a {named.value} name); make them agree"
            )
        return self

    @property
    def bus(self) -> DiskBus | None:
        """How the disk is attached: its kind when that is a bus, else what its device name says."""
        return DiskBus(self.kind) if self.kind in DiskBus.__members__ else DiskBus.for_device(self.device)


class Display(enum.StrEnum):
    """A display adapter QEMU gives a VM, carrying its PCI vendor:device id."""

    std = "std"  # QEMU's standard VGA (bochs)
    virtio = "virtio"  # virtio-gpu

    @property
    def pci_id(self) -> str:
        return {"std": "1234:1111", "virtio": "1af4:1050"}[self.value]


class InventoryPolicy(enum.StrEnum):
    """What a difference between declared and detected hardware does to the boot test."""

    record = "record"  # keep the report and the differences
    warn = "warn"  # ... and say each one in the log
    enforce = "enforce"  # the boot test fails: unknown hardware does not pass


class Hardware(Model):
    vendor: str = ""
    model: str
    cpu: Cpu
    memory_gib: float = Field(gt=0)
    gpus: tuple[Gpu, ...] = ()
    disks: tuple[Disk, ...] = ()
    nics: tuple[Nic, ...] = ()
    # How the machine's firmware boots it: "uefi" (the default: the installed systems use systemd-boot, which needs
    # UEFI) or "bios".  The installer boots the same way, so that an install that writes EFI variables can.
    firmware: Literal["uefi", "bios"] = "uefi"

    @field_validator("nics")
    @classmethod
    def _unique_nic_names(cls, nics: tuple[Nic, ...]) -> tuple[Nic, ...]:
        names = [n.name for n in nics]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"nic names must be unique; repeated: {', '.join(dupes)}")
        return nics


def _guest_name(value: str) -> str:
    # The host side of a guest's veth pair is "ve-<name>" and Linux interface names hold 15 bytes: NixOS limits
    # containers with a private network to 11 characters for the same reason.
    if len(value) > 11:
        raise ValueError(f"guest name {value!r} is longer than 11 characters (its veth 've-{value}' would not fit)")
    return value


Address = ipaddress.IPv4Address


class Guest(Model):
    name: Annotated[Label, AfterValidator(_guest_name)]
    kind: GuestKind
    # Its address on the host's guest bridge; the host's bridge takes .1 of the guests' /24.
    address: Address
    memory_mib: int = Field(default=256, ge=16)
    vcpus: int = Field(default=1, ge=1)


class Account(Model):
    name: Label
    description: str = ""
    groups: tuple[Label, ...] = ()
    ssh_keys: tuple[str, ...] = ()
    hashed_password: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _no_clear_text(cls, data: Any) -> Any:
        if isinstance(data, dict) and ("password" in data or "initial_password" in data):
            raise ValueError(
                "clear-text passwords are not allowed in domain.json: remove 'password' and give 'ssh_keys' "
                "(or a crypt(3) 'hashed_password' from `mkpasswd -m sha-512`)"
            )
        return data

    @field_validator("ssh_keys")
    @classmethod
    def _keys(cls, keys: tuple[str, ...]) -> tuple[str, ...]:
        for key in keys:
            if not _SSH_KEY.match(key):
                raise ValueError(f"{key[:40]!r}… is not an SSH public key (expected 'ssh-ed25519 AAAA…')")
        return keys

    @field_validator("hashed_password")
    @classmethod
    def _hashed(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("$"):
            raise ValueError("hashed_password must be a crypt(3) hash such as '$6$…' (from `mkpasswd -m sha-512`)")
        return value


class ProbeKind(enum.StrEnum):
    """What a probe checks, carrying the guest kind it talks to and how it reaches it."""

    console = "console"  # a line on the serial console
    tcp = "tcp"  # a TCP port answers
    dns = "dns"  # every host and guest name resolves to its declared address; an outside name does not
    nats = "nats"  # a publish/subscribe round-trip through nats-server
    stats = "stats"  # the host's statistics message arrives on NATS, valid, listing every guest running
    ssh = "ssh"  # an account logs in with its key and `hostname` prints the guest's name

    @property
    def guest_kind(self) -> GuestKind | None:
        """The kind of guest this probe talks to by default (None: the console, or a port of the host)."""
        return {"dns": GuestKind.dns, "nats": GuestKind.nats, "stats": GuestKind.nats, "ssh": GuestKind.dev}.get(
            self.value
        )

    @property
    def default_port(self) -> int | None:
        ports = contract.CONTRACT.ports  # the image contract's probe ports
        return {"dns": ports.dns, "nats": ports.nats, "stats": ports.nats, "ssh": ports.ssh}.get(self.value)

    @property
    def protocol(self) -> str:
        """The forwarded protocol: DNS asks over UDP, the others speak TCP."""
        return "udp" if self is ProbeKind.dns else "tcp"


class Probe(Model):
    """One check run against a booted VM, with its own deadline."""

    kind: ProbeKind
    guest: Label | None = None  # the guest it talks to (a forwarded port); default: the host's guest of its kind
    pattern: str | None = None  # console: a regular expression the serial console must print
    port: int | None = Field(default=None, ge=1, le=65535)  # the guest port; default the kind's (contract ports)
    name: str | None = None  # dns: resolve only this name (default: every host and guest name of the domain)
    account: Label | None = None  # ssh: the account that logs in
    key: str | None = None  # ssh: its private key, relative to the domain directory (a demo-only key)
    timeout_s: float = Field(default=60, gt=0)

    @model_validator(mode="after")
    def _fields_for_kind(self) -> Probe:
        needs = {ProbeKind.console: "pattern", ProbeKind.tcp: "port", ProbeKind.ssh: "account"}
        field = needs.get(self.kind)
        if field and getattr(self, field) is None:
            raise ValueError(f"a {self.kind.value} probe needs '{field}'")
        if self.kind is ProbeKind.ssh and self.key is None:
            raise ValueError("an ssh probe needs 'key' (the account's private key, relative to the domain directory)")
        if self.pattern is not None:
            try:
                re.compile(self.pattern)
            except re.error as exc:
                raise ValueError(f"pattern {self.pattern!r} is not a regular expression: {exc}") from None
        return self


class BootDisk(Model):
    """A blank (sparse) disk the boot VM gets."""

    size_gib: float = Field(gt=0, le=8192)
    bus: DiskBus = DiskBus.virtio


class Boot(Model):
    """How the image is boot-tested in QEMU.  Unset VM facts follow the declared hardware where QEMU can give it
    (`pipeline.inventory.boot_machine`); set, they override it, and the inventory reports the difference."""

    memory_mib: int | None = Field(default=None, ge=128, le=16384)
    cpus: int | None = Field(default=None, ge=1, le=8)
    disks: tuple[BootDisk, ...] | None = None
    displays: tuple[Display, ...] | None = None
    timeout_s: float = Field(default=300, gt=0)
    probes: tuple[Probe, ...] = ()


class Install(Model):
    """Install verification: which disk-config lays out which disk of the host."""

    disk_config: str = "disk-config.nix"
    disk: Label = "main"  # the hardware disk (and disko `disk.<name>`) to install onto
    size_gib: float | None = Field(default=None, gt=0)  # the virtual disk's size; default the hardware disk's
    timeout_s: float = Field(default=600, gt=0)


class Host(Model):
    system: System
    description: str = ""
    role: str = ""
    address: Address  # its address on the site's LAN (as the cim configuration's `cim.addresses`)
    hardware: Hardware
    guests: tuple[Guest, ...] = ()
    stats_interval_s: int = Field(default=5, ge=1, le=3600)  # how often the host publishes cim.<host>.stats
    images: tuple[Format, ...] = ()
    boot: Boot = Boot()
    install: Install | None = None

    @field_validator("guests")
    @classmethod
    def _unique_guests(cls, guests: tuple[Guest, ...]) -> tuple[Guest, ...]:
        names = [g.name for g in guests]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"guest names must be unique; repeated: {', '.join(dupes)}")
        return guests

    @field_validator("guests")
    @classmethod
    def _guest_network(cls, guests: tuple[Guest, ...]) -> tuple[Guest, ...]:
        bridged = [g for g in guests if g.kind is not GuestKind.provisioner]  # the LAN's guest is checked by Host
        if not bridged:
            return guests
        network = ipaddress.IPv4Network(f"{bridged[0].address}/24", strict=False)
        for guest in bridged:
            if guest.address not in network:
                raise ValueError(
                    f"guest {guest.name!r} has address {guest.address}, outside {network} where the host's other "
                    "guests are: a host's guests share one /24 (its bridge)"
                )
            if int(guest.address) & 0xFF in (0, 1, 255):
                raise ValueError(
                    f"guest {guest.name!r} has address {guest.address}: .0, .1 (the host's bridge) and .255 are "
                    "taken; use .2 to .254"
                )
        return guests

    @field_validator("images")
    @classmethod
    def _images_fit_system(cls, images: tuple[Format, ...], info: ValidationInfo) -> tuple[Format, ...]:
        system = info.data.get("system")  # absent when 'system' itself was invalid: reported there
        for image in images:
            if image is Format.sd and system not in (None, System.aarch64_linux):
                raise ValueError("an 'sd' image is for aarch64-linux hosts; use 'iso' for x86_64-linux")
            if image is Format.iso and system not in (None, System.x86_64_linux):
                raise ValueError("an 'iso' image is built for x86_64-linux hosts here; use 'sd' for aarch64-linux")
            if image is Format.netboot and system not in (None, System.x86_64_linux):
                raise ValueError(
                    "a 'netboot' image is booted here by the NIC's iPXE ROM (x86_64); an aarch64 host boots from its "
                    "'sd' image (Debian's U-Boot on QEMU's virt board runs no PXE menu by itself)"
                )
        return images

    @property
    def lan_mac(self) -> str | None:
        """The MAC of the host's LAN interface (its first declared NIC): what the provisioner leases to."""
        return self.hardware.nics[0].mac if self.hardware.nics else None

    @property
    def provisioner_guest(self) -> Guest | None:
        return next((g for g in self.guests if g.kind is GuestKind.provisioner), None)

    @model_validator(mode="after")
    def _provisioner_guest_on_the_lan(self) -> Host:
        guest = self.provisioner_guest
        if guest is None:
            return self
        lan = ipaddress.IPv4Network(f"{self.address}/24", strict=False)
        if guest.address not in lan or int(guest.address) & 0xFF in (0, 255):
            raise ValueError(
                f"guest {guest.name!r} (kind provisioner) serves the LAN, so its address must be in the host's LAN "
                f"{lan} (the host's address {self.address}); it has {guest.address}"
            )
        if sum(g.kind is GuestKind.provisioner for g in self.guests) > 1:
            raise ValueError("a host runs at most one guest of kind 'provisioner'")
        if not self.hardware.nics:
            raise ValueError(
                f"guest {guest.name!r} (kind provisioner) is bridged to the host's LAN interface, which the host does "
                'not declare: add hardware.nics, e.g. [{"name": "lan", "mac": "52:54:00:23:00:10"}]'
            )
        return self

    @model_validator(mode="after")
    def _probes_name_guests(self) -> Host:
        names = {g.name for g in self.guests}
        for probe in self.boot.probes:
            if probe.guest is not None and probe.guest not in names:
                raise ValueError(
                    f"boot.probes: a {probe.kind.value} probe names guest {probe.guest!r}, which this "
                    f"host does not have (its guests: {', '.join(sorted(names)) or 'none'})"
                )
        return self

    @model_validator(mode="after")
    def _install_disk_known(self) -> Host:
        known = {d.name for d in self.hardware.disks}
        if self.install is not None and self.install.size_gib is None and self.install.disk not in known:
            raise ValueError(
                f"install.disk {self.install.disk!r} is not among hardware.disks; add it there or set install.size_gib"
            )
        return self


class Builder(Model):
    """A Nix remote builder (one line of Nix's machines file)."""

    uri: str  # ssh://user@host or ssh-ng://user@host; may carry ?remote-store=… for a store of its own
    systems: tuple[System, ...]
    ssh_key: str | None = None  # a path to the private key; its contents never enter logs or artifacts
    max_jobs: int = Field(default=1, ge=1)
    speed_factor: int = Field(default=1, ge=1)
    features: tuple[str, ...] = ()
    public_host_key: str | None = None  # base64 of the host key line, as Nix's machines file wants

    @field_validator("uri")
    @classmethod
    def _ssh(cls, uri: str) -> str:
        if not re.match(r"^ssh(-ng)?://[A-Za-z0-9._@:\[\]-]+(\?[A-Za-z0-9._=%/&:-]*)?$", uri):
            raise ValueError(f"{uri!r} is not an ssh:// or ssh-ng:// store URI such as 'ssh-ng://nix@builder'")
        return uri

    @field_validator("ssh_key")
    @classmethod
    def _key_path(cls, path: str | None) -> str | None:
        if path is not None and (not path.startswith("/") or re.search(r"\s", path)):
            raise ValueError("ssh_key is the absolute path of a private key file, without spaces")
        return path

    def machines_line(self) -> str:
        """This builder as a line of Nix's machines file (`nix.conf` `builders`); the key appears only as a path."""
        fields = [
            self.uri,
            ",".join(s.value for s in self.systems),
            self.ssh_key or "-",
            str(self.max_jobs),
            str(self.speed_factor),
            ",".join(self.features) or "-",
            "-",
            self.public_host_key or "-",
        ]
        return " ".join(fields)


class Domain(Model):
    name: str
    fqdn: Annotated[str, AfterValidator(_fqdn)]
    description: str = ""
    accounts: tuple[Account, ...] = ()
    builders: tuple[Builder, ...] = ()
    inventory: InventoryPolicy = InventoryPolicy.record
    # The host whose provisioner guest boots the domain's netboot hosts (DHCP, TFTP/HTTP) and keeps unknown MACs out.
    provisioner: Label | None = None
    hosts: dict[Label, Host]

    @field_validator("hosts")
    @classmethod
    def _some_hosts(cls, hosts: dict[str, Host]) -> dict[str, Host]:
        if not hosts:
            raise ValueError("a domain needs at least one host")
        return hosts

    @field_validator("hosts")
    @classmethod
    def _unique_addresses(cls, hosts: dict[str, Host]) -> dict[str, Host]:
        owners: dict[Address, str] = {}
        for name, host in hosts.items():
            for owner, address in [(name, host.address), *((f"{g.name}.{name}", g.address) for g in host.guests)]:
                if address in owners:
                    raise ValueError(f"{owners[address]} and {owner} both have address {address}; give each its own")
                owners[address] = owner
        return hosts

    @field_validator("hosts")
    @classmethod
    def _unique_macs(cls, hosts: dict[str, Host]) -> dict[str, Host]:
        owners: dict[str, str] = {}
        for name, host in hosts.items():
            for nic in host.hardware.nics:
                owner = f"hosts.{name}.hardware.nics {nic.name!r}"
                if nic.mac in owners:
                    raise ValueError(
                        f"MAC {nic.mac} is declared twice, by {owners[nic.mac]} and by {owner}: a MAC names one "
                        "machine on the LAN (the provisioner leases by it); give each NIC its own"
                    )
                owners[nic.mac] = owner
        return hosts

    @model_validator(mode="after")
    def _netboot_needs_mac_and_provisioner(self) -> Domain:
        netboot = [n for n, h in self.hosts.items() if Format.netboot in h.images]
        if self.provisioner is not None:
            host = self.hosts.get(self.provisioner)
            if host is None:
                raise ValueError(
                    f"field 'provisioner': {self.provisioner!r} is not a host of the domain "
                    f"(hosts: {', '.join(self.hosts)})"
                )
            if host.provisioner_guest is None:
                raise ValueError(
                    f"field 'provisioner': host {self.provisioner!r} has no guest of kind 'provisioner' to serve the "
                    'LAN; add one to its guests, e.g. {"name": "pxe", "kind": "provisioner", "address": "<a LAN '
                    'address>"}'
                )
            if Format.iso not in host.images:
                raise ValueError(
                    f"field 'provisioner': host {self.provisioner!r} has no 'iso' image, and the netboot test "
                    "boots the provisioner from it; add 'iso' to its images"
                )
        for name in netboot:
            if self.provisioner is None:
                raise ValueError(
                    f"hosts.{name}.images holds 'netboot', but the domain names no provisioner to boot it from: set "
                    "the top-level 'provisioner' to the host whose provisioner guest serves the LAN "
                    '(e.g. "provisioner": "vhost-dev")'
                )
            if self.hosts[name].lan_mac is None:
                raise ValueError(
                    f"hosts.{name}.images holds 'netboot', but hosts.{name}.hardware.nics declares no MAC: the "
                    f"provisioner leases only to declared MACs; add e.g. "
                    '[{"name": "lan", "mac": "52:54:00:23:00:12"}]'
                )
            if name == self.provisioner:
                raise ValueError(f"hosts.{name}: the provisioner cannot boot itself from the network; give it 'iso'")
        return self

    def netboot_hosts(self) -> list[str]:
        return [n for n, h in self.hosts.items() if Format.netboot in h.images]

    def records(self) -> dict[str, Address]:
        """The names the domain's dns guests answer: `<host>.<fqdn>` and `<guest>.<host>.<fqdn>`, with addresses."""
        names: dict[str, Address] = {}
        for name, host in self.hosts.items():
            names[f"{name}.{self.fqdn}"] = host.address
            for guest in host.guests:
                names[f"{guest.name}.{name}.{self.fqdn}"] = guest.address
        return names

    def artifacts(self) -> list[Artifact]:
        """Every image the domain asks for, in host order."""
        return list(self._artifacts)

    @functools.cached_property
    def _artifacts(self) -> tuple[Artifact, ...]:
        # Made once: the graph asks for them four times (build, boot, check, release), 10,000 models each at
        # 10,000 hosts.  The domain is frozen, so they cannot go stale.
        return tuple(
            Artifact(host=name, format=fmt, system=host.system)
            for name, host in self.hosts.items()
            for fmt in host.images
        )


class Artifact(Model):
    """One image: `<host>-<format>`."""

    host: str
    format: Format
    system: System

    @functools.cached_property
    def name(self) -> str:
        return f"{self.host}-{self.format.value}"


def _field_path(loc: tuple[int | str, ...]) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[-1] == "[key]":  # a dict key, e.g. a host name: "hosts key 'vhost;rm'"
        return f"{'.'.join(parts[:-2])} key {parts[-2]!r}"
    return ".".join(parts) or "(top level)"


def _describe(error: Any) -> str:
    loc = _field_path(tuple(error["loc"]))
    kind = error["type"]
    if loc.endswith("'") and " key " in loc:
        return f"{loc}: {str(error['msg']).removeprefix('Value error, ')}"
    if kind == "extra_forbidden":
        return f"field '{loc}' is not known (a typo? remove it or check the spelling against `cim schema`)"
    if kind == "missing":
        return f"field '{loc}' is required but missing"
    msg = str(error["msg"]).removeprefix("Value error, ")
    if loc == "(top level)":  # a check across fields: its message names them
        return msg
    return f"field '{loc}': {msg}"


def parse_domain(data: Any, source: str) -> Domain:
    """Validate already-parsed JSON; `source` names the file in the error."""
    try:
        return Domain.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(_describe(e) for e in exc.errors()[:5])
        more = f" (and {exc.error_count() - 5} more)" if exc.error_count() > 5 else ""
        raise DomainError(f"{source}: {problems}{more}.", hint="Fix the field(s) named and run again.") from None


def load_domain(directory: Path) -> Domain:
    """Read and validate `<directory>/domain.json`."""
    path = directory / DOMAIN_FILE
    if not directory.is_dir():
        raise DomainError(
            f"{directory}: no such domain directory.",
            hint="Pass an existing one with `doit domain=DIR` or CIM_DOMAIN=DIR (the demo is configs/demo).",
        )
    if not path.is_file():
        raise DomainError(f"{path}: file not found.", hint="A domain directory holds domain.json beside its flake.nix.")
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_DOMAIN_BYTES + 1)  # never more than the cap, whatever the file's size
    except OSError as exc:
        raise DomainError(
            f"{path}: cannot be read ({exc.strerror or exc}).",
            hint="Check the file's permissions and that it is a regular file.",
        ) from None
    if len(raw) > MAX_DOMAIN_BYTES:
        raise DomainError(
            f"{path}: larger than {MAX_DOMAIN_BYTES // 2**20} MiB; a domain description is a few "
            "kilobytes (is it the right file?).",
            hint="Point domain=DIR at a directory whose domain.json describes the domain "
            "(`cim schema` shows what it holds).",
        )
    nul = raw.find(b"\0")
    if nul >= 0:
        raise DomainError(
            f"{path}: binary data (a NUL byte at offset {nul}), not JSON text.",
            hint="domain.json must be UTF-8 JSON text (`cim schema` shows what it holds).",
        )
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise DomainError(
            f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason}).", hint="Save it as UTF-8."
        ) from None
    except json.JSONDecodeError as exc:
        raise DomainError(
            f"{path}: malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}.",
            hint="Fix the syntax there (`python3 -m json.tool` shows it too).",
        ) from None
    except RecursionError:
        raise DomainError(
            f"{path}: JSON nested too deeply to read (thousands of levels of arrays or objects).",
            hint="A domain.json is a few levels deep (`cim schema` shows its shape); fix the file.",
        ) from None
    return parse_domain(data, str(path))


def json_schema() -> dict[str, Any]:
    """The JSON Schema of domain.json."""
    return Domain.model_json_schema()
