# The netboot image, laid out as nixpkgs' netboot Hydra job lays it out: the kernel (bzImage), an initrd that holds
# the whole system (NixOS's netbootRamdisk carries the store inside it the same way) and the iPXE script that boots
# them (netboot.ipxe, its file names relative to its own URL), named in nix-support/hydra-build-products.
. "$common"
mkdir -p "$out/nix-support"
cp "$toplevel/kernel" "$out/bzImage"
cp "$toplevel/initrd" "$out/initrd"
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
echo "built the netboot image of $hostName"
