#!/usr/bin/env python3
"""Import the demo world's Debian binaries into the Nix store and record them in configs/demo/inputs.json.

The demo flake has no inputs (nixpkgs is out of reach here), so its derivations build from Debian's own kernels,
busybox, nats-server, boot loaders and disk tools.  Each set is laid out in a directory, added with `nix-store --add`,
and named in `inputs.json` by its NAR hash; the flake declares each one as a fixed-output derivation with that hash
(as nixpkgs' `requireFile` does), so Nix finds it already valid and never tries to fetch it.

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
    "amd64": ["virtio_pci", "virtio_blk", "virtio_net", "virtio_scsi", "crc32c_generic", "ext4", "vfat", "nls_cp437",
              "nls_iso8859_1", "nls_ascii", "isofs", "sr_mod", "ata_piix", "sd_mod", "efivarfs", "qemu_fw_cfg"],
    "arm64": ["virtio_pci", "virtio_mmio", "virtio_blk", "virtio_net", "crc32c_generic", "ext4", "vfat", "nls_cp437",
              "nls_iso8859_1", "nls_ascii", "sd_mod", "efivarfs"],
}

# Host tools the x86_64 installer runs inside the guest, copied with their shared libraries.
INSTALLER_TOOLS = ["/sbin/sfdisk", "/sbin/mkfs.ext4", "/sbin/mke2fs", "/sbin/mkfs.vfat", "/sbin/mkswap",
                   "/sbin/blkid", "/sbin/e2label", "/usr/bin/lsblk"]

TIMEOUT = 600


def run(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=True, text=True, timeout=TIMEOUT, **kwargs)  # type: ignore[call-overload]


def nix(*args: str) -> str:
    argv = ["nix", "--extra-experimental-features", "nix-command flakes", *args]
    return run(argv, capture_output=True).stdout.strip()


def download(debs: Path, package: str) -> Path:
    """The .deb of `package` (name[:arch]) in the cache, fetched with apt-get download when missing."""
    name, _, arch = package.partition(":")
    arch = arch or "amd64"
    found = sorted(debs.glob(f"{name}_*_{arch}.deb")) + sorted(debs.glob(f"{name}_*_all.deb"))
    if found:
        return found[-1]
    run(["apt-get", "download", package], cwd=debs, capture_output=True)
    found = sorted(debs.glob(f"{name}_*_{arch}.deb")) + sorted(debs.glob(f"{name}_*_all.deb"))
    if not found:
        sys.exit(f"demo_inputs: apt-get download {package} gave no .deb in {debs}")
    return found[-1]


def kernel_package(arch: str) -> str:
    """The versioned kernel package the `linux-image-<arch>` metapackage depends on."""
    out = run(["apt-cache", "depends", f"linux-image-{arch}:{arch}"], capture_output=True).stdout
    match = re.search(r"Depends: (linux-image-[0-9][^\s:]*)", out)
    if not match:
        sys.exit(f"demo_inputs: cannot resolve linux-image-{arch} (run apt-get update; dpkg --add-architecture arm64)")
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
        for name in MODULES[arch]:
            if name in by_name:
                need(by_name[name])
            elif f"/{name}.ko" not in builtin:
                sys.exit(f"demo_inputs: module {name} is neither a module nor built into {version}")
        moddir = out / "lib/modules" / version
        for mod in wanted:
            (moddir / mod).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / "lib/modules" / version / mod, moddir / mod)
        (moddir / "modules.dep").write_text("".join(f"{m}: {' '.join(deps[m])}\n" for m in wanted))
        # The modules each guest loads at boot, in dependency order.
        (out / "load-order").write_text("".join(f"{Path(m).name.removesuffix('.ko')}\n" for m in wanted))
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


def installer_tools(out: Path) -> None:
    """The Debian disk tools the installer runs in the guest, with every shared library `ldd` names."""
    (out / "bin").mkdir(parents=True)
    libs: set[Path] = set()
    for tool in INSTALLER_TOOLS:
        shutil.copy2(tool, out / "bin" / Path(tool).name)
        for line in run(["ldd", tool], capture_output=True).stdout.splitlines():
            match = re.search(r"(/\S+) \(0x", line)
            if match:
                libs.add(Path(match.group(1)))
    for lib in libs:
        dest = out / str(lib.resolve()).lstrip("/") if lib.name.startswith("ld-linux") else out / "lib" / lib.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(lib, dest, follow_symlinks=True)


def build_inputs(debs: Path, stage: Path) -> dict[str, dict[str, Path]]:
    """Lay out every input directory under `stage`; returns system -> role -> directory."""
    layout: dict[str, dict[str, Path]] = {}
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
        layout[system] = roles

    boot = stage / "cim-demo-boot-x86_64-linux"
    single_file(debs, "isolinux", "usr/lib/ISOLINUX/isolinux.bin", boot)
    single_file(debs, "isolinux", "usr/lib/ISOLINUX/isohdpfx.bin", boot)
    single_file(debs, "syslinux-common", "usr/lib/syslinux/modules/bios/ldlinux.c32", boot)
    single_file(debs, "systemd-boot-efi", "usr/lib/systemd/boot/efi/systemd-bootx64.efi", boot)
    layout["x86_64-linux"]["boot"] = boot

    tools = stage / "cim-demo-installer-tools-x86_64-linux"
    installer_tools(tools)
    layout["x86_64-linux"]["installer-tools"] = tools
    return layout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent)
    args = parser.parse_args()
    # depmod, sfdisk and friends live in sbin, which a non-login root shell may not have on PATH.
    os.environ["PATH"] = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    debs = args.root / ".cim" / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    os.chmod(debs, 0o755)  # apt-get download drops privileges to _apt where it can

    target = args.root / "configs" / "demo" / "inputs.json"
    stamp = args.root / ".cim" / "inputs.stamp"
    key = input_key(debs)
    if target.exists() and stamp.exists() and stamp.read_text() == key and all_valid(target):
        print(f"demo inputs up to date ({target})")
        return

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
                run(["nix-store", "--realise", store_path, "--add-root", str(gcroots / directory.name),
                     "--indirect"], capture_output=True)

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
    """What the inputs are made from: this script, the cached .debs, the host's installer tools."""
    parts = [hashlib.sha256(Path(__file__).read_bytes()).hexdigest()]
    parts += sorted(p.name for p in debs.glob("*.deb"))
    for tool in INSTALLER_TOOLS:
        st = os.stat(tool)
        parts.append(f"{tool}:{st.st_size}:{st.st_mtime_ns}")
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
