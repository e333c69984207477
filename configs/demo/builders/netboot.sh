# The netboot image, laid out as nixpkgs' netboot Hydra job lays it out: the kernel (bzImage), an initrd and the iPXE
# script that boots them (netboot.ipxe, file names relative to its own URL), named in
# nix-support/hydra-build-products.  The initrd is a stage 1 only (../netboot/init, busybox, the kernel's modules,
# the host's identity, the installer's tools and plan): the system comes over the LAN from the provisioner, which
# serves this directory's system/ (the system's own kernel and initrd) and systemd-boot for the installer.
. "$common"
mkdir -p "$out/nix-support" "$out/system"
cp "$toplevel/kernel" "$out/bzImage"
ln -s ../bzImage "$out/system/bzImage"  # the same kernel: one copy in the provisioner's image
cp "$toplevel/initrd" "$out/system/initrd"
cp "$boot/systemd-bootx64.efi" "$out/system/BOOTX64.EFI"

# Stage 1: the system's own root (the same busybox, modules and identity) without what the system runs (its guests'
# and services' store paths), plus the installer's tools and plan.
root="$TMPDIR/stage1"
mkdir -p "$root"
(cd "$root" && zcat "$toplevel/initrd" | cpio -idm 2>/dev/null)
chmod -R u+w "$root"
keep=$(readlink "$root/bin/busybox")  # /nix/store/<hash>-…/bin/busybox
for path in "$root"/nix/store/*; do
    case "$keep" in "/nix/store/${path##*/}/"*) ;; *) rm -rf "$path" ;; esac
done
rm -f "$root/etc/cim/supervisors"  # (etc/cim/guests stays: the report says which guests the host runs)
mkdir -p "$root/usr/local/sbin" "$root/etc/cim"
cp "$installerTools"/bin/* "$root/usr/local/sbin/"
cp -r "$installerTools"/lib/. "$root/lib/"
chmod -R u+w "$root"
printf '%s' "$installPlan" > "$root/etc/cim/install-plan"
[ -s "$root/etc/cim/install-plan" ] || rm "$root/etc/cim/install-plan"
cp "$stage1/init" "$root/init"
chmod 555 "$root/init"
cpio_of "$root" | gzip -9 > "$out/initrd"

params="$(cat "$toplevel/kernel-params") cim.netboot"
cat > "$out/netboot.ipxe" <<IPXE
#!ipxe
echo cim: netboot $hostName
kernel bzImage initrd=initrd $params
initrd initrd
boot
IPXE
{
    echo "file kernel $out/bzImage"
    echo "file initrd $out/initrd"
    echo "file ipxe $out/netboot.ipxe"
} > "$out/nix-support/hydra-build-products"
fix_mtimes "$out"
echo "built the netboot image of $hostName: stage 1 $(wc -c < "$out/initrd") bytes, system $(wc -c < "$out/system/initrd") bytes"
