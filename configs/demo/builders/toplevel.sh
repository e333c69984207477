# The system closure of one host: kernel, initrd (the whole busybox userland, NixOS stage 1 + stage 2 in one) and
# the facts the pipeline and the installer read back.
. "$common"
root="$TMPDIR/root"
mkdir -p "$root"
cd "$root"
mkdir -p bin sbin usr/bin usr/sbin etc/cim etc/init.d proc sys dev run tmp mnt sysroot var/log root lib/modules boot

# Busybox as the whole userland, every applet a link to /bin/busybox, itself a link to the store path the guests
# share (below): one copy in the image.
ln -s "$busybox/bin/busybox" bin/busybox
for applet in $("$busybox/bin/busybox" --list-full); do
    [ "$applet" = bin/busybox ] || ln -s /bin/busybox "$applet"
done

# Kernel modules (a depmod'ed subset) and the order stage 1 loads them in.
cp -r "$kernel"/lib/modules/* lib/modules/
cp "$kernel/load-order" etc/cim/modules
chmod -R u+w lib/modules

# The host runs no service of its own: the installer's tools bring their glibc (iso.sh), found through lib64.
case "$system" in
    x86_64-linux) ln -s lib/x86_64-linux-gnu lib64 ;;
esac

# The guests' store paths (their systems and what those link to), at their own paths as a NixOS closure is.
mkdir -p nix/store var/lib/cim/guests
for path in $storePaths; do
    cp -a "$path" nix/store/
done
chmod -R u+w nix/store

# The init scripts, then this host's identity.
cp -r "$rootfs"/. .
chmod -R u+w .
echo "$hostName" > etc/hostname
printf '%s\n' "$hostJson" > etc/cim/host.json
printf '%s\n' "$system" > etc/cim/system
printf '%s' "$contractEnv" > etc/cim/contract.sh  # the image contract's names (lib/host.nix)
printf '%s' "$guestLines" > etc/cim/guests
# Each guest's supervisor line (name, store path, address, memory MiB), the bridge, the reporter's settings.
printf '%s' "$supervisorLines" > etc/cim/supervisors
printf 'gateway=%s\nnats=%s\ninterval=%s\n' "$gateway" "$natsAddress" "$statsInterval" > etc/cim/network
# The LAN interface (found by its MAC at boot) and, on the provisioner, the MACs its bridge lets in.
printf '%b' "$lanConfig" > etc/cim/lan
printf '%b' "$lanAllowed" > etc/cim/lan-allowed
printf '%b' "$hardwareLines" > etc/cim/hardware      # what the network installer checks before it writes
printf '%b' "$provisionerLines" > etc/cim/provisioner # where a netbooted machine reports
if [ -n "$guestTools" ]; then
    # nft is Debian's, dynamically linked: run through the glibc the guests' services carry.
    libs="$guestTools/lib/x86_64-linux-gnu:$servicesPath/lib/x86_64-linux-gnu"
    printf '#!/bin/sh\nexec %s --library-path %s --argv0 nft %s "$@"\n' \
        "$servicesPath/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" "$libs" "$guestTools/bin/nft" > usr/sbin/nft
    chmod 555 usr/sbin/nft
fi
printf '%s' "$consoleTty" > etc/cim/console
printf '127.0.0.1 localhost\n127.0.1.1 %s.%s %s\n' "$hostName" "$fqdn" "$hostName" > etc/hosts
printf 'root::0:0:root:/root:/bin/sh\n' > etc/passwd
printf 'root:x:0:\nusers:x:100:\n' > etc/group
wheel=
printf '%s' "$accountLines" | while read -r name rest; do
    case "$name" in
        "") ;;
        +key) user=${rest%% *}; printf '%s\n' "${rest#* }" >> "home/$user/.ssh/authorized_keys" ;;
        +group) [ "${rest#* }" = wheel ] && printf '%s\n' "${rest%% *}" >> "$TMPDIR/wheel" ;;
        *) printf '%s:x:%s:100::/home/%s:/bin/sh\n' "$name" "$rest" "$name" >> etc/passwd
           mkdir -p "home/$name/.ssh" ;;
    esac
done
# wheel may become root (NixOS: security.sudo.wheelNeedsPassword = false): busybox's su, made setuid at boot in
# /run/wrappers (as NixOS's security.wrappers: the store holds no setuid file) with owner root, group wheel and mode
# 4750, so only wheel can run it.  su asks for root's password unless its field is empty, and it is: nothing else
# could use that (no console login; dropbear takes keys only).  (Busybox's own /etc/busybox.conf is not used: with
# it, every applet a non-root shell runs crashes.)
[ -f "$TMPDIR/wheel" ] && wheel=$(paste -sd, "$TMPDIR/wheel")
printf 'wheel:x:10:%s\n' "$wheel" >> etc/group
# This system's own store path (NixOS: /run/current-system points at it) and the files its modules add to /etc.
printf '%s\n' "$out" > etc/cim/toplevel
i=0
for name in $etcNames; do
    mkdir -p "etc/$(dirname "$name")"
    eval "printf '%s' \"\$etcText$i\"" > "etc/$name"
    i=$((i + 1))
done
if [ -n "$hostSsh" ]; then
    # The host's own SSH server (dropbear, Debian's, through the services' glibc), for deployments.
    libs="$guestTools/lib/x86_64-linux-gnu:$servicesPath/lib/x86_64-linux-gnu"
    # The loader is reached through a link named after the tool: the process is called dropbear, not ld-linux.
    mkdir -p usr/libexec/cim
    for tool in dropbear dropbearkey; do
        ln -s "$servicesPath/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" "usr/libexec/cim/$tool"
        printf '#!/bin/sh\nexec /usr/libexec/cim/%s --library-path %s --argv0 %s %s "$@"\n' \
            "$tool" "$libs" "$tool" "$guestTools/bin/$tool" > "usr/sbin/$tool"
        chmod 555 "usr/sbin/$tool"
    done
    touch etc/cim/ssh
fi

mkdir -p "$out"
cpio_of . | gzip -9 > "$out/initrd"
cp "$kernel/vmlinuz" "$out/kernel"
cp "$kernel/version" "$out/kernel-version"
printf '%s\n' "$system" > "$out/system"
printf '%s\n' "$hostJson" > "$out/host.json"
printf 'console=%s loglevel=6 panic=1\n' "$consoleTty" > "$out/kernel-params"
# As NixOS's toplevel: bin/switch-to-configuration makes this system the boot default (on the machine, as root).
mkdir -p "$out/bin"
cp "$switchToConfiguration" "$out/bin/switch-to-configuration"
chmod 555 "$out/bin/switch-to-configuration"
printf '%s\n' "$bootTries" > "$out/boot-counting-tries"

