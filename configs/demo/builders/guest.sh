# One guest's system, as a NixOS container's toplevel is: a store path holding the guest's root skeleton (busybox
# applets, the libraries and the service it runs, its /etc) and the script its PID 1 runs once inside its root.  The
# host's supervisor (rootfs/sbin/cim-guest) makes /var/lib/cim/guests/<name> from it and bind-mounts /nix/store in
# read-only, so the skeleton's links into the store resolve inside the guest as they do on the host.
. "$common"
case "$system" in
    x86_64-linux) triplet=x86_64-linux-gnu ;;
    aarch64-linux) triplet=aarch64-linux-gnu ;;
esac
# The read-only part (the userland) stays in the store; the root links to it, so making a guest's root copies a
# handful of entries, not hundreds of applet links.
u="$out/system"
mkdir -p "$u"/bin "$u"/sbin "$u"/usr/bin "$u"/usr/sbin "$u/lib/$triplet"
# Every busybox applet, a link into the store (shared with every guest, as NixOS containers share the host's store).
for applet in $("$busybox/bin/busybox" --list-full); do
    ln -s "$busybox/bin/busybox" "$u/$applet"
done
# glibc (with nats-server's input) and, for the guests that run them, the guest tools' libraries, at the FHS paths
# the ELF headers name.
libs="$services/lib/$triplet/*"
case "$kind" in dns|dev|provisioner) libs="$libs $guestTools/lib/$triplet/*" ;; esac
for lib in $libs; do
    ln -s "$lib" "$u/lib/$triplet/${lib##*/}"
done
[ "$system" = aarch64-linux ] && ln -s aarch64-linux-gnu/ld-linux-aarch64.so.1 "$u/lib/ld-linux-aarch64.so.1"

r="$out/root"
mkdir -p "$r"/etc/cim "$r"/proc "$r"/dev "$r"/run "$r"/tmp "$r"/var/log "$r"/root "$r"/home "$r"/nix/store
for dir in bin sbin usr lib; do
    ln -s "$u/$dir" "$r/$dir"
done
[ "$system" = x86_64-linux ] && ln -s "$u/lib/x86_64-linux-gnu" "$r/lib64"

echo "$guestName" > "$r/etc/hostname"
printf '127.0.0.1 localhost\n%s %s.%s.%s %s\n' "$address" "$guestName" "$hostName" "$fqdn" "$guestName" \
    > "$r/etc/hosts"
for resolver in $resolvers; do echo "nameserver $resolver"; done > "$r/etc/resolv.conf"
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' > "$r/etc/passwd"
printf 'root:x:0:\nusers:x:100:\nnogroup:x:65534:\n' > "$r/etc/group"
printf '/bin/sh\n' > "$r/etc/shells"
printf 'guest=%s host=%s kind=%s address=%s gateway=%s\n' "$guestName" "$hostName" "$kind" "$address" "$gateway" \
    > "$r/etc/cim/guest"

# What the guest's PID 1 runs: say who it is (the proof of its own namespaces goes to the host's console), then
# become the guest's one service.  Its log stays in the guest's /var/log.
start="$r/etc/cim/start"
cat > "$start" <<HEAD
#!/bin/sh
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
echo "cim: guest $guestName: pid \$\$ of its own namespace \$(readlink /proc/self/ns/pid), hostname \$(hostname), address $address"
HEAD
case "$kind" in
    nats)
        ln -s "$services/bin/nats-server" "$u/usr/sbin/nats-server"
        echo "exec nats-server --addr 0.0.0.0 --port 4222 --name $hostName-$guestName >> /var/log/nats-server.log 2>&1" \
            >> "$start" ;;
    dns)
        ln -s "$guestTools/bin/dnsmasq" "$u/usr/sbin/dnsmasq"
        printf '%b' "$dnsHosts" > "$r/etc/cim/dns-hosts"
        # Only the domain's names: no upstream, and NXDOMAIN (not REFUSED) for every name it does not hold.
        echo "exec dnsmasq --keep-in-foreground --no-resolv --no-hosts --addn-hosts=/etc/cim/dns-hosts --local=/#/" \
             "--pid-file= --log-facility=- --user=nobody --group=nogroup >> /var/log/dnsmasq.log 2>&1" >> "$start" ;;
    provisioner)
        # The LAN's one DHCP server, for declared MACs only (each gets its declared address and name; dhcp-ignore
        # answers nobody else), and the netboot images of the domain's netboot hosts over HTTP (busybox httpd; an
        # iPXE client is told its script's URL) and TFTP (dnsmasq's own); it also answers the domain's names.
        ln -s "$guestTools/bin/dnsmasq" "$u/usr/sbin/dnsmasq"
        printf '%b' "$dnsHosts" > "$r/etc/cim/dns-hosts"
        printf '%b' "$dhcpHosts" > "$r/etc/cim/dhcp-hosts"
        mkdir -p "$r/srv/netboot"
        conf="$r/etc/cim/dnsmasq.conf"
        {
            echo "interface=eth0"
            echo "bind-interfaces"
            echo "dhcp-range=${address%.*}.0,static,255.255.255.0,1h"
            echo "dhcp-hostsfile=/etc/cim/dhcp-hosts"
            echo "dhcp-ignore=tag:!known"
            echo "dhcp-option=option:dns-server,$address"
            echo "dhcp-option=option:router"  # none: the provisioner serves the LAN, it routes nothing
            echo "dhcp-match=set:ipxe,175"
            echo "enable-tftp"
            echo "tftp-root=/srv/netboot"
            echo "log-dhcp"
            echo "leasefile-ro"  # leases are the declared ones; nothing to keep across restarts
        } > "$conf"
        printf '%b' "$netbootLines" | while read -r host path; do
            [ -n "$host" ] || continue
            mkdir -p "$r/srv/netboot/$host"
            for f in bzImage initrd netboot.ipxe system; do ln -s "$path/$f" "$r/srv/netboot/$host/$f"; done
            echo "dhcp-boot=tag:ipxe,tag:$host,http://$address/$host/netboot.ipxe" >> "$conf"
        done
        cat >> "$start" <<PROV
httpd -f -vv -p 80 -h /srv/netboot >> /var/log/httpd.log 2>&1 &
exec dnsmasq --keep-in-foreground --no-resolv --no-hosts --addn-hosts=/etc/cim/dns-hosts --local=/#/ \
    --conf-file=/etc/cim/dnsmasq.conf --pid-file= --log-facility=- --user=nobody --group=nogroup \
    >> /var/log/dnsmasq.log 2>&1
PROV
        ;;
    dev)
        ln -s "$guestTools/bin/dropbear" "$u/usr/sbin/dropbear"
        ln -s "$guestTools/bin/dropbearkey" "$u/usr/bin/dropbearkey"
        printf '%s' "$accountLines" | while read -r name rest; do
            case "$name" in
                "" | +group) ;;
                +key) user=${rest%% *}; printf '%s\n' "${rest#* }" >> "$r/home/$user/.ssh/authorized_keys" ;;
                *) printf '%s:x:%s:100::/home/%s:/bin/sh\n' "$name" "$rest" "$name" >> "$r/etc/passwd"
                   mkdir -p "$r/home/$name/.ssh"
                   echo "chown -R $rest:100 /home/$name; chmod 700 /home/$name/.ssh" >> "$start" ;;
            esac
        done
        cat >> "$start" <<'DEV'
mkdir -p /etc/dropbear
[ -s /etc/dropbear/dropbear_ed25519_host_key ] ||
    dropbearkey -t ed25519 -f /etc/dropbear/dropbear_ed25519_host_key > /var/log/dropbearkey.log 2>&1
# Keys only (-s), a host key of its own, in the foreground as the guest's PID 1.
exec dropbear -F -E -s -p 22 -r /etc/dropbear/dropbear_ed25519_host_key >> /var/log/dropbear.log 2>&1
DEV
        ;;
    *) echo "guest.sh: unknown guest kind $kind" >&2; exit 1 ;;
esac
chmod 555 "$start"
