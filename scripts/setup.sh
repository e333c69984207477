#!/usr/bin/env bash
# Idempotent set-up for cim-pipeline on Debian 12 / Ubuntu: system packages, binfmt for aarch64, the .venv with the
# project, Nix's settings for an offline machine, and the demo domain's inputs in the Nix store.
#   scripts/setup.sh            everything
#   CIM_SKIP_APT=1 scripts/setup.sh   skip apt (packages already there)
#   CIM_NIX_CONF=PATH scripts/setup.sh   write Nix's settings to PATH instead of /etc/nix/nix.conf (a test, or a
#                                        machine whose nix.conf is managed elsewhere)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
export PATH="$PATH:/usr/sbin:/sbin"
export DEBIAN_FRONTEND=noninteractive

say() { printf '[setup] %s\n' "$*"; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

packages=(
    nix-bin                                   # nix build / eval (2.8 on Debian 12)
    qemu-system-x86 qemu-system-arm qemu-utils  # the VMs; qemu-img for install disks
    qemu-user-static binfmt-support           # aarch64 builds through binfmt emulation
    ovmf u-boot-qemu                          # UEFI firmware (install test), U-Boot for the aarch64 SD boot
    # (the demo builders' image tools, xorriso, mtools, mkfs.*, sfdisk, come from Debian's packages imported
    # into the Nix store by scripts/demo_inputs.py, not from the host)
    kmod debian-archive-keyring               # depmod for the guests' module subset; Debian's key for the
                                              # demo's inputs (fetched from bookworm whatever the host runs)
    openssh-server openssh-client             # sshd for the remote-builder test
    python3 python3-venv ca-certificates
)

# A Nix that is already installed (the official installer, NixOS, CI actions) is used as it is.
preinstalled_nix=0
if command -v nix >/dev/null 2>&1 && ! dpkg-query -W -f='${Status}' nix-bin 2>/dev/null | grep -q "install ok installed"; then
    preinstalled_nix=1
    packages=("${packages[@]/nix-bin}")
fi

if [ -z "${CIM_SKIP_APT:-}" ]; then
    missing=()
    for p in "${packages[@]}"; do
        [ -n "$p" ] || continue
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        say "installing ${missing[*]}"
        as_root apt-get update -q
        as_root apt-get install -y -q --no-install-recommends "${missing[@]}"
    fi
fi

# binfmt_misc: mount it and register aarch64 (qemu-user-static's F-flagged interpreter) when the kernel allows it.
if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
    as_root mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc 2>/dev/null || true
fi
if [ -e /proc/sys/fs/binfmt_misc/register ] && [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
    as_root update-binfmts --enable qemu-aarch64 2>/dev/null || true
    if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] && [ -e /usr/share/binfmts/qemu-aarch64 ]; then
        as_root update-binfmts --import qemu-aarch64 2>/dev/null || true
    fi
fi
if [ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
    say "binfmt: aarch64 registered ($(head -n1 /proc/sys/fs/binfmt_misc/qemu-aarch64))"
else
    say "binfmt: aarch64 NOT registered; aarch64 images need a remote builder (see docs/operator.md)"
fi

# Nix on an offline machine: no substituters, flakes on, builds as root without Debian's nixbld users; the sandbox
# stays at Nix's default (on), and the pipeline passes what a build needs per invocation (pipeline/nix.py).  Local
# Nix gets aarch64-linux as an extra platform when binfmt can run it.  A Nix someone else installed keeps its own
# settings.
conf=${CIM_NIX_CONF:-/etc/nix/nix.conf}
if [ "$preinstalled_nix" -eq 1 ] && [ -z "${CIM_NIX_CONF:-}" ]; then
    say "nix is preinstalled ($(nix --version)); leaving /etc/nix/nix.conf alone"
else
as_root mkdir -p "$(dirname "$conf")"
want_conf="# written by cim-pipeline scripts/setup.sh
experimental-features = nix-command flakes
substituters =
build-users-group =
"
if [ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
    want_conf+="extra-platforms = aarch64-linux
"
fi
if [ ! -e "$conf" ] || ! grep -q "written by cim-pipeline" "$conf" || [ "$(cat "$conf")" != "$(printf '%s' "$want_conf")" ]; then
    [ -e "$conf" ] && ! grep -q "written by cim-pipeline" "$conf" && as_root cp "$conf" "$conf.before-cim"
    printf '%s' "$want_conf" | as_root tee "$conf" >/dev/null
    say "wrote $conf"
fi
fi

# The project's virtualenv.
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
if ! .venv/bin/python -c 'import pipeline, doit, pydantic, xxhash, qemu.qmp, nats, dns.resolver, paramiko, jsonschema' 2>/dev/null \
   || [ pyproject.toml -nt .venv/.cim-installed ]; then
    .venv/bin/pip install -q --upgrade pip >/dev/null 2>&1 || true
    # pip's editable-install chatter only matters when it fails.
    if ! .venv/bin/pip install -q -e '.[test]' > .venv/pip-install.log 2>&1; then
        cat .venv/pip-install.log >&2
        exit 1
    fi
    touch .venv/.cim-installed
fi

# The demo domain's Debian inputs, imported into the Nix store.
say "importing the demo inputs into the Nix store"
python3 scripts/demo_inputs.py --root "$root" >/dev/null
say "ready: .venv/bin/doit domain=configs/demo"
