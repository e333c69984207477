#!/bin/sh
# switch-to-configuration boot: make this system (the store path this script lives in) the boot default, as NixOS's
# does with systemd-boot: a new generation in /nix/var/nix/profiles, its kernel and initrd on the ESP, a loader entry
# with a boot counter (systemd-boot's `+TRIES`: the boot loader counts the tries down, the booted system marks a boot
# that completed good, and an entry out of tries is sorted after every other, so the last good generation boots).
# Run as root on the machine; `switch` and `test` (activating without a reboot) are not in the demo.
set -e
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
die() { echo "switch-to-configuration: $*" >&2; exit 1; }
[ "${1:-}" = boot ] || die "usage: $0 boot (the demo's systems take a new generation at the next boot)"
[ "$(id -u)" = 0 ] || die "must run as root"
system=$(cd "$(dirname "$0")/.." && pwd -P)
case "$system" in /nix/store/*) ;; *) die "$system is not a store path" ;; esac
[ -f "$system/kernel" ] && [ -f "$system/initrd" ] || die "$system has no kernel and initrd"
grep -q ' /boot ' /proc/mounts || mount /boot || die "the ESP (/boot) is not mounted and cannot be"

profiles=/nix/var/nix/profiles
mkdir -p "$profiles"
# A system already the profile's current generation keeps its number (nix-env --set does the same).
current=$(readlink "$profiles/system" 2>/dev/null || true)
if [ -n "$current" ] && [ "$(readlink "$profiles/$current")" = "$system" ]; then
    n=${current#system-}
    n=${n%-link}
else
    n=$(ls "$profiles" | sed -n 's/^system-\([0-9]*\)-link$/\1/p' | sort -n | tail -n 1)
    n=$((${n:-0} + 1))
    ln -sfn "$system" "$profiles/system-$n-link"
    ln -sfn "system-$n-link" "$profiles/system"
fi

hash=${system#/nix/store/}
hash=${hash%%-*}
mkdir -p /boot/EFI/nixos /boot/loader/entries
for f in kernel initrd; do
    dest=/boot/EFI/nixos/$hash-$f
    [ -f "$dest" ] && continue
    cp "$system/$f" "$dest.tmp"
    mv "$dest.tmp" "$dest"
done
# The root file system as this boot found it; the kernel parameters this system wants.
root=$(tr ' ' '\n' < /proc/cmdline | grep -E '^(root|rootfstype|rootflags|cim\.luks)=|^cim\.(lvm|md)$' | tr '\n' ' ')
tries=$(cat "$system/boot-counting-tries" 2>/dev/null || echo 3)
rm -f /boot/loader/entries/nixos-generation-$n.conf /boot/loader/entries/nixos-generation-$n+*.conf
entry=/boot/loader/entries/nixos-generation-$n+$tries.conf
{
    echo "title NixOS ($(cat /etc/hostname))"
    echo "version Generation $n"
    echo "linux /EFI/nixos/$hash-kernel"
    echo "initrd /EFI/nixos/$hash-initrd"
    [ -f /boot/EFI/cim/storage-initrd ] && echo "initrd /EFI/cim/storage-initrd"
    echo "options $(cat "$system/kernel-params") ${root}cim.generation=$n"
} > "$entry.tmp"
mv "$entry.tmp" "$entry"
sync
echo "switch-to-configuration: generation $n ($system) is the boot default: $entry, $tries tries before systemd-boot falls back to the last good generation"
