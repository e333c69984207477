# shellcheck shell=bash
# cim-netinstall: the network installer's one job (netinstall.nix runs it as a systemd service, its settings in CIM_*
# variables, every line on the console). On a machine whose install disk is blank it reports and checks the hardware,
# then installs the host's system from the provisioner's binary cache and powers off; on any other machine it writes
# nothing and boots the host's own system from the LAN instead (kexec).
#
# Blank means: no signature wipefs knows, and the first and the last MiB all zeros. A disk with anything on it is
# never written: a re-install is deliberate (wipe the disk first, e.g. `wipefs --all` or `blkdiscard`, then netboot).
#
# Sourced with CIM_NETINSTALL_SOURCE_ONLY=1 it only defines its functions (tests/test_cim_netboot.py runs them).

say() { printf '%s\n' "$*"; }
now() { cut -d' ' -f1 /proc/uptime; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }

# The interface that carries the host's declared MAC.
lan_interface() {
    local dev
    for dev in /sys/class/net/*; do
        if [ "$(cat "$dev/address" 2> /dev/null)" = "$CIM_MAC" ]; then
            printf '%s\n' "${dev##*/}"
            return 0
        fi
    done
    return 1
}

# DEVICE (a block device, or a file): true when nothing is on it.
blank() {
    local dev=$1 size
    size=$(blockdev --getsize64 "$dev" 2> /dev/null || stat -L -c %s "$dev") || return 1
    [ "$size" -ge 2097152 ] || return 1
    [ -z "$(wipefs --noheadings "$dev" 2> /dev/null)" ] || return 1
    cmp -s -n 1048576 "$dev" /dev/zero || return 1
    dd if="$dev" bs=1048576 iflag=skip_bytes skip=$((size - 1048576)) count=1 status=none | cmp -s -n 1048576 - /dev/zero
}

# URL FILE: one file from the provisioner, said with its size and time as the pipeline reads fetches.
fetch() {
    local start
    start=$(now)
    curl --fail --silent --show-error --retry 5 --retry-connrefused --output "$2" "$1" || return 1
    say "cim netboot: fetched $1 ($(stat -c %s "$2") bytes in $(since "$start") s)"
}

# Not an install: the host's own system, fetched from the provisioner (kernel, initrd, command line) and started
# in place of this one.
run_system() {
    local dir=${CIM_STATE:-/run/cim-netinstall}/system f
    mkdir -p "$dir"
    for f in "$CIM_KERNEL" initrd cmdline; do
        fetch "$CIM_SYSTEM_URL/$f" "$dir/$f" || { say "cim netboot: cannot fetch $CIM_SYSTEM_URL/$f; staying in the installer"; return 1; }
    done
    kexec --load "$dir/$CIM_KERNEL" --initrd="$dir/initrd" --command-line="$(cat "$dir/cmdline")" \
        || { say "cim netboot: kexec could not load $CIM_HOST's system; staying in the installer"; return 1; }
    rm -f "$dir/initrd"
    say "cim netboot: switching into $CIM_HOST's system (kexec)"
    systemctl --no-block kexec
}

fail() {
    say "$CIM_FAILED $*"
    systemctl --no-block poweroff
    exit 1
}

# The report on NATS every few seconds until a reader acknowledges it on SUBJECT.ack (core NATS keeps nothing, so a
# late reader still gets it), or 10 minutes pass; touches $1 once acknowledged.
publish() {
    local acked=$1 server=$CIM_NATS subject=$CIM_SUBJECT report=$2 sub
    nats --server "$server" sub "$subject.ack" --count 1 > /dev/null 2>&1 &
    sub=$!
    for _ in $(seq 200); do
        nats --server "$server" pub --force-stdin "$subject" < "$report" > /dev/null 2>&1 || true
        sleep 3
        if ! kill -0 "$sub" 2> /dev/null; then
            if wait "$sub"; then
                touch "$acked"
                say "cim: inventory acknowledged on $subject.ack"
                return 0
            fi
            nats --server "$server" sub "$subject.ack" --count 1 > /dev/null 2>&1 &
            sub=$!
        fi
    done
    kill "$sub" 2> /dev/null || true
}

# The hardware report: nixos-facter's, with each interface's MAC put back; one summary line on the console.
report() {
    local out=$1 macs dev
    macs='{}'
    for dev in /sys/class/net/*; do
        [ -e "$dev/device" ] || continue
        macs=$(jq -c --arg name "${dev##*/}" --arg mac "$(cat "$dev/address")" '. + {($name): $mac}' <<< "$macs")
    done
    nixos-facter > "$out.facter" || return 1
    jq -f "$CIM_FACTER_MACS" --argjson macs "$macs" "$out.facter" > "$out"
    jq -r '"cim: inventory: \(.smbios.system.manufacturer // "") \(.smbios.system.product // "");"
        + " cpu \(.hardware.cpu[0].model_name // "?"); disks \([.hardware.disk[]?] | length);"
        + " nics \([.hardware.network_interface[]? | select(.unix_device_names[0]? != "lo")] | length);"
        + " virtualisation \(.virtualisation)"' "$out"
}

install_system() {
    local disk=$CIM_DISK state=${CIM_STATE:-/run/cim-netinstall} lan key rx start bytes
    mkdir -p "$state"
    say "$CIM_STARTED onto $disk (blank), from the LAN"
    lan=$(lan_interface) || fail "no interface carries the declared MAC $CIM_MAC; $disk was not written"

    report "$state/facter.json" || fail "nixos-facter could not report the hardware; $disk was not written"
    if [ -n "$CIM_NATS" ]; then
        publish "$state/acked" "$state/facter.json" &
    else
        say "cim: inventory not published: the provisioner's host has no nats guest"
    fi
    jq -r -f "$CIM_HWCHECK" --argjson declared "$CIM_DECLARED" "$state/facter.json" > "$state/hwcheck" \
        || fail "the hardware report could not be checked; $disk was not written"
    sed 's/^/cim-hwcheck: /' "$state/hwcheck"
    if grep -qv '^ok ' "$state/hwcheck"; then
        if [ "$CIM_POLICY" = enforce ]; then
            # Give the report a minute to reach its reader before the machine goes dark.
            for _ in $(seq 60); do
                [ -e "$state/acked" ] || [ -z "$CIM_NATS" ] && break
                sleep 1
            done
            fail "the hardware differs from domain.json (inventory: enforce): $(grep -v '^ok ' "$state/hwcheck" | paste -sd ';' | sed 's/;/; /g'); $disk was not written"
        fi
        say "cim netboot: the hardware differs from domain.json; the domain's policy is $CIM_POLICY: installing anyway"
    fi

    # The cache's key: the one the operator pinned (cache-key.pub beside netinstall.nix, built into the image), else
    # the one the provisioner serves next to the netboot images.
    if [ -n "$CIM_CACHE_KEY" ]; then
        key=$CIM_CACHE_KEY
        say "cim netboot: trusting the binary cache key pinned in the image: $key"
    else
        fetch "$CIM_CACHE_KEY_URL" "$state/cache-key.pub" || fail "cannot fetch the binary cache's key from $CIM_CACHE_KEY_URL; $disk was not written"
        key=$(tr -d '[:space:]' < "$state/cache-key.pub")
        say "cim netboot: trusting the provisioner's binary cache key (fetched over the LAN): $key"
    fi

    # Still blank? Nothing may have written it since the check; disko then lays it out as disk-config.nix says.
    blank "$disk" || fail "$disk is no longer blank; it was not written"
    "$CIM_DISKO" || fail "disko could not lay out $disk as disk-config.nix declares"

    rx=$(cat "/sys/class/net/$lan/statistics/rx_bytes")
    start=$(now)
    nixos-install --root /mnt --system "$CIM_SYSTEM" --no-root-passwd --no-channel-copy \
        --option substituters "$CIM_CACHE" --option trusted-public-keys "$key" \
        || fail "nixos-install could not install $CIM_SYSTEM from $CIM_CACHE onto $disk"
    bytes=$(($(cat "/sys/class/net/$lan/statistics/rx_bytes") - rx))
    say "cim netboot: the system came over the LAN: $bytes bytes in $(since "$start") s (received on $lan from $CIM_CACHE)"
    umount --recursive /mnt || fail "could not unmount /mnt after the install"
    say "$CIM_DONE: installed on $disk; powering off"
    systemctl --no-block poweroff
}

main() {
    local disk=$CIM_DISK
    for _ in $(seq 50); do
        [ -b "$disk" ] && break
        sleep 0.2
    done
    if [ ! -b "$disk" ]; then
        say "cim netboot: no install disk $disk: not installing; booting $CIM_HOST's system from the LAN"
        run_system
    elif blank "$disk"; then
        install_system
    else
        say "cim netboot: $disk is not blank: not installing (wipe it to re-install); booting $CIM_HOST's system from the LAN"
        run_system
    fi
}

if [ "${CIM_NETINSTALL_SOURCE_ONLY:-}" != 1 ]; then
    set -uo pipefail
    main
fi
