#!/usr/bin/env python3
"""Import the demo world's Debian binaries into the Nix store and record them in configs/demo/inputs.json.

The demo flake has no inputs (nixpkgs is out of reach here), so its derivations build from Debian's own kernels,
busybox, nats-server, boot loaders and disk tools.  They always come from Debian 12 (bookworm), for amd64 and arm64,
through a private apt configuration under .cim/apt: the host's own apt sources and dpkg architectures are left alone,
and the demo is the same on a Debian or an Ubuntu host.  Each set is laid out in a directory, added with
`nix-store --add`, and named in `inputs.json` by its NAR hash; the flake declares each one as a fixed-output
derivation with that hash (as nixpkgs' `requireFile` does), so Nix finds it already valid and never fetches it.

Idempotent: .debs are cached in .cim/debs; an unchanged input gives the same store path and the same inputs.json.
Usage: scripts/demo_inputs.py [--root REPO]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ARCHES = {"amd64": "x86_64-linux", "arm64": "aarch64-linux"}

# Kernel modules the demo guests load, with their dependencies resolved by depmod.
MODULES = {
    "amd64": [
        "virtio_pci",
        "virtio_blk",
        "virtio_net",
        "virtio_scsi",
        "crc32c_generic",
        "ext4",
        "vfat",
        "nls_cp437",
        "nls_iso8859_1",
        "nls_ascii",
        "isofs",
        "sr_mod",
        "ata_piix",
        "sd_mod",
        "efivarfs",
        "qemu_fw_cfg",
        # the guests' network: a veth pair per guest on the host's bridge
        "veth",
        "bridge",
        "stp",
        "llc",
        # the provisioner's MAC filter on its LAN bridge: nftables' bridge family, a rate-limited log of refusals
        "nf_tables",
        "nft_limit",
        "nft_log",
        "nf_log_syslog",
        # install targets attached as the host declares its disk: NVMe (/dev/nvme0n1), SATA/AHCI (/dev/sda)
        "nvme",
        "ahci",
    ],
    "arm64": [
        "virtio_pci",
        "virtio_mmio",
        "virtio_blk",
        "virtio_net",
        "crc32c_generic",
        "ext4",
        "vfat",
        "nls_cp437",
        "nls_iso8859_1",
        "nls_ascii",
        "sd_mod",
        "efivarfs",
        "veth",
        "bridge",
        "stp",
        "llc",
    ],
}

# Modules in the x86_64 kernel input that no guest loads at boot: the layers the demo installer makes besides plain
# partitions (LVM with its thin pools and RAID volumes, LUKS, md RAID, btrfs, xfs, f2fs: disko's types), loaded by the
# installer and, on a system installed on them, by stage 1 (modprobe resolves their dependencies from modules.dep).
LAYER_MODULES = [
    "dm_mod",
    "dm_crypt",
    "xts",
    "ecb",
    "af_alg",
    "algif_skcipher",
    "algif_hash",
    "md_mod",
    "raid1",
    "raid0",
    "dm_thin_pool",
    "dm_raid",
    "dm_mirror",
    "btrfs",
    "xfs",
    "f2fs",
    "crc32_generic",  # f2fs asks the crypto API for crc32, which nothing here loads by itself (no module aliases)
]

# The disk tools the x86_64 installer runs inside the guest (name in the guest: path in the Debian packages), and
# the packages that hold them and every library they link.
INSTALLER_TOOLS = {"sfdisk": "sbin/sfdisk", "mkfs.ext4": "sbin/mke2fs", "mkfs.vfat": "sbin/mkfs.fat"}
# disko's other layers (lvm_vg / lvm_pv, luks, mdadm, btrfs, xfs, f2fs) with disko's own tools (thin_check, which lvm
# runs before it activates a thin pool, included), and a BIOS machine's boot loader,
# GRUB (disko's EF02 partitions are its), with its i386-pc platform directory: the ISO's installer carries them (and
# an installed system whose root is under such layers boots with them); the LAN install makes plain disks only.
LAYER_TOOLS = {
    "lvm": "sbin/lvm",
    "cryptsetup": "sbin/cryptsetup",
    "mdadm": "sbin/mdadm",
    "mkfs.btrfs": "sbin/mkfs.btrfs",
    "btrfs": "bin/btrfs",
    "mkfs.xfs": "sbin/mkfs.xfs",
    "mkfs.f2fs": "sbin/mkfs.f2fs",
    "thin_check": "usr/sbin/pdata_tools",
    "grub-install": "usr/sbin/grub-install",
}
LAYER_PACKAGES = [
    "grub2-common",
    "grub-pc-bin",
    "libefiboot1",
    "libefivar1",
    "lvm2",
    "libdevmapper1.02.1",
    "libdevmapper-event1.02.1",
    "libaio1",
    "cryptsetup-bin",
    "libcryptsetup12",
    "libpopt0",
    "libargon2-1",
    "libjson-c5",
    "libssl3",
    "mdadm",
    "btrfs-progs",
    "xfsprogs",
    "libinih1",
    "liburcu8",
    "f2fs-tools",
    "thin-provisioning-tools",
    "libexpat1",
    "libgcc-s1",
    "libstdc++6",
    "liblzo2-2",
    "libzstd1",
    "zlib1g",
    "libudev1",
    "libselinux1",
    "libpcre2-8-0",
    "libedit2",
    "libbsd0",
    "libmd0",
    "libsystemd0",
    "libcap2",
    "libgcrypt20",
    "libgpg-error0",
    "liblzma5",
    "liblz4-1",
    "libblkid1",
    "libuuid1",
    "libc6",
]
INSTALLER_PACKAGES = [
    "fdisk",
    "libfdisk1",
    "libsmartcols1",
    "libreadline8",
    "libtinfo6",
    "libblkid1",
    "libuuid1",
    "e2fsprogs",
    "libext2fs2",
    "libcom-err2",
    "dosfstools",
    "libc6",
]

# The tools the demo's image builders run inside the Nix sandbox, for each builder system (name in the build: path in
# the Debian packages), and the packages that hold them and every library they link.  They run through the input's
# own ld.so (the sandbox has no /lib64), so the closure is checked with that loader.
IMAGE_TOOLS = {
    "xorriso": "usr/bin/xorriso",
    "mcopy": "usr/bin/mtools",
    "mmd": "usr/bin/mtools",
    "mkfs.vfat": "sbin/mkfs.fat",
    "mkfs.ext4": "sbin/mke2fs",
    "debugfs": "sbin/debugfs",
    "sfdisk": "sbin/sfdisk",
}
IMAGE_PACKAGES = [
    *INSTALLER_PACKAGES,
    "xorriso",
    "libisoburn1",
    "libburn4",
    "libisofs6",
    "libjte2",
    "libacl1",
    "zlib1g",
    "libbz2-1.0",
    "mtools",
    "libss2",
]

# The guests' services besides nats-server (name in the guest: path in the Debian packages): dnsmasq for the dns
# and provisioner guests, dropbear (a far smaller closure than openssh-server, which pulls PAM, Kerberos and OpenSSL)
# for dev; nft for the provisioner's host, which drops the frames of undeclared MACs on its LAN bridge (busybox has
# no nft).
GUEST_TOOLS = {
    "dnsmasq": "usr/sbin/dnsmasq",
    "dropbear": "usr/sbin/dropbear",
    "dropbearkey": "usr/bin/dropbearkey",
    "nft": "usr/sbin/nft",
}
GUEST_PACKAGES = [
    "dnsmasq-base",
    "dropbear-bin",
    "nftables",
    "libedit2",
    "libbsd0",
    "libmd0",
    "libtinfo6",
    "libdbus-1-3",
    "libidn2-0",
    "libnetfilter-conntrack3",
    "libnettle8",
    "libhogweed6",
    "libgmp10",
    "libnftables1",
    "libsystemd0",
    "libunistring2",
    "libnfnetlink0",
    "libmnl0",
    "libnftnl11",
    "libxtables12",
    "libjansson4",
    "libcap2",
    "libgcrypt20",
    "liblzma5",
    "libzstd1",
    "liblz4-1",
    "libgpg-error0",
    "libtomcrypt1",
    "libtommath1",
    "zlib1g",
    "libcrypt1",
    "libc6",
]
# glibc itself comes with the services input (nats-server's); the guest tools carry only the libraries beyond it.
GLIBC = {
    "libc.so.6",
    "libpthread.so.0",
    "libm.so.6",
    "libdl.so.2",
    "libresolv.so.2",
    "ld-linux-x86-64.so.2",
    "ld-linux-aarch64.so.1",
}

DEBIAN_SOURCES = """\
deb [signed-by={keyring}] http://deb.debian.org/debian bookworm main
deb [signed-by={keyring}] http://deb.debian.org/debian bookworm-updates main
deb [signed-by={keyring}] http://deb.debian.org/debian-security bookworm-security main
"""
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")

TIMEOUT = 600


def run(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=True, text=True, timeout=TIMEOUT, **kwargs)  # type: ignore[call-overload]


def nix(*args: str) -> str:
    argv = ["nix", "--extra-experimental-features", "nix-command flakes", *args]
    return run(argv, capture_output=True).stdout.strip()


class DebianArchive:
    """apt-get and apt-cache against Debian bookworm (amd64 + arm64) with a private state under `root`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.options: list[str] = []

    def setup(self) -> None:
        if not KEYRING.is_file():
            sys.exit(f"demo_inputs: {KEYRING} is missing: install debian-archive-keyring (scripts/setup.sh does)")
        for sub in [
            "state/lists/partial",
            "cache/archives/partial",
            "etc/apt.conf.d",
            "etc/preferences.d",
            "etc/sources.list.d",
        ]:
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        (self.root / "state/status").touch()
        (self.root / "etc/sources.list").write_text(DEBIAN_SOURCES.format(keyring=KEYRING))
        self.options = [
            "-o",
            f"Dir::Etc={self.root / 'etc'}",
            "-o",
            f"Dir::State={self.root / 'state'}",
            "-o",
            f"Dir::State::status={self.root / 'state/status'}",
            "-o",
            f"Dir::Cache={self.root / 'cache'}",
            "-o",
            "APT::Architecture=amd64",
            "-o",
            "APT::Architectures::=amd64",
            "-o",
            "APT::Architectures::=arm64",
            "-o",
            "Debug::NoLocking=1",
            "-o",
            "APT::Sandbox::User=root",
        ]
        lists = list((self.root / "state/lists").glob("*Packages*"))
        if not lists:
            proc = subprocess.run(
                ["apt-get", *self.options, "-q", "update"], capture_output=True, text=True, timeout=TIMEOUT
            )
            if proc.returncode != 0:
                sys.exit(f"demo_inputs: apt-get update of Debian bookworm failed:\n{proc.stdout}{proc.stderr}")

    def download(self, package: str, cwd: Path) -> None:
        proc = subprocess.run(
            ["apt-get", *self.options, "download", package], cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT
        )
        if proc.returncode != 0:
            sys.exit(f"demo_inputs: apt-get download {package} from Debian bookworm failed: {proc.stderr.strip()}")

    def depends(self, package: str) -> str:
        return run(["apt-cache", *self.options, "depends", package], capture_output=True).stdout


ARCHIVE = DebianArchive(Path())


def download(debs: Path, package: str) -> Path:
    """The .deb of `package` (name[:arch]) in the cache, fetched from Debian bookworm when missing."""
    name, _, arch = package.partition(":")
    arch = arch or "amd64"
    found = sorted(debs.glob(f"{name}_*_{arch}.deb")) + sorted(debs.glob(f"{name}_*_all.deb"))
    if found:
        return found[-1]
    ARCHIVE.download(package, debs)
    found = sorted(debs.glob(f"{name}_*_{arch}.deb")) + sorted(debs.glob(f"{name}_*_all.deb"))
    if not found:
        sys.exit(f"demo_inputs: apt-get download {package} gave no .deb in {debs}")
    return found[-1]


def kernel_package(arch: str) -> str:
    """The versioned kernel package the `linux-image-<arch>` metapackage depends on."""
    out = ARCHIVE.depends(f"linux-image-{arch}:{arch}")
    match = re.search(r"Depends: (linux-image-[0-9][^\s:]*)", out)
    if not match:
        sys.exit(f"demo_inputs: cannot resolve linux-image-{arch} in Debian bookworm:\n{out}")
    return f"{match.group(1)}:{arch}"


def extract(deb: Path, into: Path) -> None:
    run(["dpkg-deb", "-x", str(deb), str(into)])


def kernel_input(debs: Path, arch: str, out: Path) -> None:
    """vmlinuz, plus the needed modules and a modules.dep for busybox modprobe."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        extract(download(debs, kernel_package(arch)), root)
        (version,) = [p.name for p in (root / "lib/modules").iterdir()]
        run(["depmod", "-b", str(root), version])
        deps: dict[str, list[str]] = {}
        for line in (root / "lib/modules" / version / "modules.dep").read_text().splitlines():
            mod, _, rest = line.partition(":")
            deps[mod] = rest.split()
        by_name = {Path(m).name.removesuffix(".ko").replace("-", "_"): m for m in deps}
        wanted: list[str] = []

        def need(mod: str) -> None:
            for dep in deps[mod]:
                need(dep)
            if mod not in wanted:
                wanted.append(mod)

        builtin = (root / "lib/modules" / version / "modules.builtin").read_text()

        def add(names: list[str]) -> None:
            for name in names:
                if name in by_name:
                    need(by_name[name])
                elif f"/{name}.ko" not in builtin:
                    sys.exit(f"demo_inputs: module {name} is neither a module nor built into {version}")

        add(MODULES[arch])
        at_boot = list(wanted)  # what the guests load at boot; the layer modules' closure is loaded on demand
        add(LAYER_MODULES if arch == "amd64" else [])
        moddir = out / "lib/modules" / version
        for mod in wanted:
            (moddir / mod).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / "lib/modules" / version / mod, moddir / mod)
        (moddir / "modules.dep").write_text("".join(f"{m}: {' '.join(deps[m])}\n" for m in wanted))
        # The modules each guest loads at boot, in dependency order.
        (out / "load-order").write_text("".join(f"{Path(m).name.removesuffix('.ko')}\n" for m in at_boot))
        (vmlinuz,) = (root / "boot").glob("vmlinuz-*")
        shutil.copy2(vmlinuz, out / "vmlinuz")
        (out / "version").write_text(version + "\n")


def libc_closure(debs: Path, arch: str, binaries: list[Path], out: Path) -> None:
    """Copy `binaries` into out/bin and the glibc they need into out/lib (FHS names, so they run unchanged)."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        extract(download(debs, f"libc6:{arch}"), root)
        triplet = {"amd64": "x86_64-linux-gnu", "arm64": "aarch64-linux-gnu"}[arch]
        libdir = out / "lib" / triplet
        libdir.mkdir(parents=True)
        for lib in ["libc.so.6", "libpthread.so.0", "libm.so.6", "libdl.so.2", "libresolv.so.2"]:
            shutil.copy2(root / "lib" / triplet / lib, libdir / lib, follow_symlinks=True)
        loader = {"amd64": "ld-linux-x86-64.so.2", "arm64": "ld-linux-aarch64.so.1"}[arch]
        shutil.copy2(root / "lib" / triplet / loader, libdir / loader, follow_symlinks=True)
    (out / "bin").mkdir()
    for binary in binaries:
        shutil.copy2(binary, out / "bin" / binary.name)


def single_file(debs: Path, package: str, member: str, out: Path, name: str | None = None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        extract(download(debs, package), Path(tmp))
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy2(Path(tmp) / member, out / (name or Path(member).name), follow_symlinks=True)


TRIPLETS = {"amd64": "x86_64-linux-gnu", "arm64": "aarch64-linux-gnu"}
LOADERS = {"amd64": "ld-linux-x86-64.so.2", "arm64": "ld-linux-aarch64.so.1"}


def lay_out_tools(debs: Path, root: Path, arch: str, packages: list[str], tools: dict[str, str], out: Path) -> Path:
    """Extract `packages` into `root`, copy `tools` (name in the input: member of the packages) to out/bin and every
    library of the packages to out/lib/<triplet>; returns that library directory (pruned later by the caller)."""
    for package in packages:
        extract(download(debs, f"{package}:{arch}"), root)
    (out / "bin").mkdir(parents=True)
    libdir = out / "lib" / TRIPLETS[arch]
    libdir.mkdir(parents=True)
    for name, member in tools.items():
        shutil.copy2(root / member, out / "bin" / name, follow_symlinks=True)
    triplet = TRIPLETS[arch]
    for lib in sorted({*(root / "lib" / triplet).glob("*.so*"), *(root / "usr/lib" / triplet).glob("*.so*")}):
        if not (libdir / lib.name).exists() and lib.is_file():
            shutil.copy2(lib, libdir / lib.name, follow_symlinks=True)
    return libdir


def loaded_libraries(loader: Path, libdir: Path, tools: Path, what: str) -> set[str]:
    """The libraries the programs in `tools` load, as Debian's own loader resolves them (an arm64 loader runs under
    binfmt); a library missing from `libdir` stops the import, naming the package list to extend."""
    needed: set[str] = set()
    for tool in sorted(tools.iterdir()):
        proc = subprocess.run(
            [str(loader), "--library-path", str(libdir), "--list", str(tool)],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
        if proc.returncode != 0 or "not found" in proc.stdout:
            sys.exit(
                f"demo_inputs: {tool.name} does not load with the libraries of {what}:\n{proc.stdout}{proc.stderr}"
            )
        needed |= {m.group(1) for m in re.finditer(r"^\s*(\S+) => ", proc.stdout, re.M)}
    return needed


def prune(libdir: Path, keep: set[str]) -> None:
    for lib in libdir.iterdir():
        if lib.name not in keep:
            lib.unlink()


def installer_tools(debs: Path, out: Path) -> None:
    """Debian's sfdisk, mkfs.ext4 and mkfs.vfat with the libraries they link, checked with Debian's own ld.so."""
    with tempfile.TemporaryDirectory() as tmp:
        libdir = lay_out_tools(debs, Path(tmp), "amd64", INSTALLER_PACKAGES, INSTALLER_TOOLS, out)
        if os.uname().machine == "x86_64":
            # Prove the closure with Debian's own loader, and keep only the libraries the tools load.
            loader = libdir / LOADERS["amd64"]
            prune(libdir, {loader.name} | loaded_libraries(loader, libdir, out / "bin", "INSTALLER_PACKAGES"))


def layer_tools(debs: Path, out: Path) -> None:
    """Debian's lvm, cryptsetup, mdadm, btrfs-progs and grub-install (with GRUB's BIOS platform directory: modules,
    boot images, grub-bios-setup) and the libraries they link, checked with Debian's own ld.so."""
    with tempfile.TemporaryDirectory() as tmp:
        libdir = lay_out_tools(debs, Path(tmp), "amd64", LAYER_PACKAGES, LAYER_TOOLS, out)
        shutil.copytree(Path(tmp) / "usr/lib/grub/i386-pc", out / "lib/grub/i386-pc")
        if os.uname().machine == "x86_64":
            loader = libdir / LOADERS["amd64"]
            setup = Path(tmp) / "grub-setup"
            setup.mkdir()
            shutil.copy2(out / "lib/grub/i386-pc/grub-bios-setup", setup)
            keep = loaded_libraries(loader, libdir, out / "bin", "LAYER_PACKAGES")
            prune(libdir, {loader.name} | keep | loaded_libraries(loader, libdir, setup, "LAYER_PACKAGES"))


def image_tools(debs: Path, arch: str, out: Path) -> None:
    """Debian's xorriso, mtools, dosfstools, e2fsprogs and sfdisk for `arch`, with the libraries they load.

    Every library in the packages is laid out, then the closure is proven with Debian's own loader (an arm64 loader
    runs under binfmt) and trimmed to what the tools load; a missing library stops the import.
    """
    triplet = TRIPLETS[arch]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        libdir = lay_out_tools(debs, root, arch, IMAGE_PACKAGES, IMAGE_TOOLS, out)
        # mtools converts file names through iconv to the FAT code page 850: glibc's IBM850 module, found through
        # GCONV_PATH (the sandbox has no /usr/lib/<triplet>/gconv).
        gconv = out / "lib" / "gconv"
        gconv.mkdir()
        shutil.copy2(root / "usr/lib" / triplet / "gconv" / "IBM850.so", gconv / "IBM850.so")
        (gconv / "gconv-modules").write_text(
            "alias\tCP850//\tIBM850//\nalias\t850//\tIBM850//\n"
            "module\tIBM850//\tINTERNAL\tIBM850\t1\nmodule\tINTERNAL\tIBM850//\tIBM850\t1\n"
        )
    loader = libdir / LOADERS[arch]
    prune(libdir, {loader.name} | loaded_libraries(loader, libdir, out / "bin", f"IMAGE_PACKAGES ({arch})"))


def guest_tools(debs: Path, arch: str, out: Path, needed: set[str]) -> set[str]:
    """dnsmasq and dropbear with the libraries they link beyond glibc.

    On an x86_64 machine the amd64 closure is proved with Debian's own loader and pruned to what the tools load;
    `needed` carries those library names to the arm64 set (the same Debian release has the same sonames).
    """
    with tempfile.TemporaryDirectory() as tmp:
        libdir = lay_out_tools(debs, Path(tmp), arch, GUEST_PACKAGES, GUEST_TOOLS, out)
        if arch == "amd64" and os.uname().machine == "x86_64":
            needed = loaded_libraries(libdir / LOADERS["amd64"], libdir, out / "bin", "GUEST_PACKAGES")
        for lib in libdir.iterdir():
            if lib.name in GLIBC or (needed and lib.name not in needed):
                lib.unlink()
    return needed


def build_inputs(debs: Path, stage: Path) -> dict[str, dict[str, Path]]:
    """Lay out every input directory under `stage`; returns system -> role -> directory."""
    layout: dict[str, dict[str, Path]] = {}
    needed: set[str] = set()
    for arch, system in ARCHES.items():
        roles: dict[str, Path] = {}
        kernel = stage / f"cim-demo-kernel-{system}"
        kernel.mkdir()
        kernel_input(debs, arch, kernel)
        roles["kernel"] = kernel

        busybox = stage / f"cim-demo-busybox-{system}"
        single_file(debs, f"busybox-static:{arch}", "bin/busybox", busybox / "bin")
        roles["busybox"] = busybox

        services = stage / f"cim-demo-services-{system}"
        with tempfile.TemporaryDirectory() as tmp:
            extract(download(debs, f"nats-server:{arch}"), Path(tmp))
            libc_closure(debs, arch, [Path(tmp) / "usr/sbin/nats-server"], services)
        roles["services"] = services

        guests = stage / f"cim-demo-guest-tools-{system}"
        needed = guest_tools(debs, arch, guests, needed)
        roles["guest-tools"] = guests

        tools = stage / f"cim-demo-image-tools-{system}"
        image_tools(debs, arch, tools)
        roles["image-tools"] = tools
        layout[system] = roles

    boot = stage / "cim-demo-boot-x86_64-linux"
    single_file(debs, "isolinux:amd64", "usr/lib/ISOLINUX/isolinux.bin", boot)
    single_file(debs, "isolinux:amd64", "usr/lib/ISOLINUX/isohdpfx.bin", boot)
    single_file(debs, "syslinux-common:amd64", "usr/lib/syslinux/modules/bios/ldlinux.c32", boot)
    single_file(debs, "systemd-boot-efi:amd64", "usr/lib/systemd/boot/efi/systemd-bootx64.efi", boot)
    layout["x86_64-linux"]["boot"] = boot

    tools = stage / "cim-demo-installer-tools-x86_64-linux"
    installer_tools(debs, tools)
    layout["x86_64-linux"]["installer-tools"] = tools
    layers = stage / "cim-demo-layer-tools-x86_64-linux"
    layer_tools(debs, layers)
    layout["x86_64-linux"]["layer-tools"] = layers
    return layout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent)
    args = parser.parse_args()
    # depmod, sfdisk and friends live in sbin, which a non-login root shell may not have on PATH.
    os.environ["PATH"] = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    debs = args.root / ".cim" / "debs"
    debs.mkdir(parents=True, exist_ok=True)

    target = args.root / "configs" / "demo" / "inputs.json"
    stamp = args.root / ".cim" / "inputs.stamp"
    key = input_key(debs)
    if target.exists() and stamp.exists() and stamp.read_text() == key and all_valid(target):
        print(f"demo inputs up to date ({target})")
        return

    ARCHIVE.root = args.root / ".cim" / "apt"
    ARCHIVE.setup()
    record: dict[str, dict[str, dict[str, str]]] = {}
    with tempfile.TemporaryDirectory(dir=args.root / ".cim") as tmp:
        layout = build_inputs(debs, Path(tmp))
        for system, roles in layout.items():
            for role, directory in sorted(roles.items()):
                for path in directory.rglob("*"):
                    os.utime(path, (0, 0), follow_symlinks=False)
                store_path = run(["nix-store", "--add", str(directory)], capture_output=True).stdout.strip()
                digest = nix("hash", "path", "--type", "sha256", "--sri", str(directory))
                record.setdefault(system, {})[role] = {"name": directory.name, "hash": digest, "path": store_path}
                # Keep the store path from garbage collection while the checkout uses it.
                gcroots = args.root / ".cim" / "gcroots"
                gcroots.mkdir(parents=True, exist_ok=True)
                run(
                    ["nix-store", "--realise", store_path, "--add-root", str(gcroots / directory.name), "--indirect"],
                    capture_output=True,
                )

    text = json.dumps(record, indent=2, sort_keys=True) + "\n"
    if not target.exists() or target.read_text() != text:
        tmp_target = target.with_suffix(".json.tmp")
        tmp_target.write_text(text)
        tmp_target.rename(target)
    stamp.write_text(input_key(debs))
    for system, roles in record.items():
        for role, entry in roles.items():
            print(f"demo input {system:14} {role:16} {entry['path']}")


def input_key(debs: Path) -> str:
    """What the inputs are made from: this script and the cached .debs."""
    parts = [hashlib.sha256(Path(__file__).read_bytes()).hexdigest()]
    parts += sorted(p.name for p in debs.glob("*.deb"))
    return "\n".join(parts) + "\n"


def all_valid(record_file: Path) -> bool:
    """Every store path inputs.json names is still valid in the Nix store."""
    try:
        record = json.loads(record_file.read_text())
        paths = [entry["path"] for roles in record.values() for entry in roles.values()]
    except (ValueError, KeyError, AttributeError):
        return False
    proc = subprocess.run(["nix-store", "--check-validity", *paths], capture_output=True, timeout=TIMEOUT)
    return proc.returncode == 0


if __name__ == "__main__":
    main()
