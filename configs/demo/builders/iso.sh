# The installer ISO, laid out as NixOS's: El Torito with isolinux for BIOS and systemd-boot on an EFI image for UEFI,
# the kernel and initrd under /boot, console on ttyS0.  It boots straight away, waiting for nobody; the installer
# inside runs when the machine carries the `cim.install` credential (SMBIOS type 11), with the plan built in below.
. "$common"
tree="$TMPDIR/iso"
mkdir -p "$tree/isolinux" "$tree/boot" "$out/iso" "$out/nix-support"
cp "$toplevel/kernel" "$tree/boot/bzImage"
cp "$toplevel/initrd" "$tree/boot/initrd"

# The installer's disk tools (Debian's sfdisk, mkfs.*, and lvm, cryptsetup, mdadm, btrfs, grub-install for disko's
# other layers) ride in a second initrd, appended at boot.
inst="$TMPDIR/installer"
mkdir -p "$inst/usr/local/sbin" "$inst/lib"
for tools in "$installerTools" "$layerTools"; do
    cp "$tools"/bin/* "$inst/usr/local/sbin/"
    cp -r "$tools"/lib/. "$inst/lib/"
    chmod -R u+w "$inst"
done
# LVM without udev (the demo runs none): lvm makes its /dev nodes itself; the installer and, on an installed system
# whose root is under LVM, stage 1 read this file (this initrd rides as the storage initrd on its boot entries).
mkdir -p "$inst/etc/lvm"
# No dmeventd either (mirror and RAID volumes are not monitored); thin pools are checked with Debian's thin_check.
printf 'activation {\n udev_sync = 0\n udev_rules = 0\n monitoring = 0\n}\ndevices {\n obtain_device_list_from_udev = 0\n}\nglobal {\n thin_check_executable = "/usr/local/sbin/thin_check"\n}\n' \
    > "$inst/etc/lvm/lvm.conf"
# The install plan: the script that lays the disks out, evaluated from the host's disk-config.nix at build time
# (lib/disklayout.nix).
mkdir -p "$inst/etc/cim"
printf '%s' "$installPlan" > "$inst/etc/cim/install-plan"
cpio_of "$inst" | gzip -9 > "$tree/boot/installer"

cp "$boot/isolinux.bin" "$boot/ldlinux.c32" "$tree/isolinux/"
# systemd-boot in the ISO 9660 tree too: the installer copies it onto the target's ESP from here.
mkdir -p "$tree/EFI/BOOT"
cp "$boot/systemd-bootx64.efi" "$tree/EFI/BOOT/BOOTX64.EFI"
# loglevel=6: the console keeps the kernel's notices, warnings and errors (its banner and command line included) but
# not its informational chatter, every byte of which a TCG guest pays for on the emulated UART.
params="console=ttyS0,115200 loglevel=6 panic=1"
cat > "$tree/isolinux/isolinux.cfg" <<CFG
SERIAL 0 115200
PROMPT 0
DEFAULT boot
LABEL boot
  KERNEL /boot/bzImage
  APPEND initrd=/boot/initrd,/boot/installer $params
CFG

# UEFI: a FAT El Torito image holding systemd-boot, its loader entry, the kernel and both initrds.
efi="$TMPDIR/efi"
mkdir -p "$efi/EFI/BOOT" "$efi/loader/entries" "$efi/cim"
cp "$boot/systemd-bootx64.efi" "$efi/EFI/BOOT/BOOTX64.EFI"
cp "$tree/boot/bzImage" "$tree/boot/initrd" "$tree/boot/installer" "$efi/cim/"
printf 'timeout 0\ndefault cim.conf\n' > "$efi/loader/loader.conf"
printf 'title cim %s\nlinux /cim/bzImage\ninitrd /cim/initrd\ninitrd /cim/installer\noptions %s\n' \
    "$hostName" "$params" > "$efi/loader/entries/cim.conf"
kib=$(size_kib "$efi")
fix_mtimes "$efi"
mkfs.vfat --invariant -i "$efiVolumeId" -C -n EFIBOOT "$tree/boot/efi.img" $((kib + kib / 10 + 1024)) >/dev/null
fat_copy "$tree/boot/efi.img" "$efi"

# xorriso takes its volume dates, file dates and GPT GUIDs from SOURCE_DATE_EPOCH; -r gives every file owner root
# and normalised permissions (the sandbox's build user is not root).
fix_mtimes "$tree"
xorriso -as mkisofs -quiet -o "$out/iso/$isoName" -V "$volumeId" -J -r \
    -b isolinux/isolinux.bin -c isolinux/boot.cat -no-emul-boot -boot-load-size 4 -boot-info-table \
    -isohybrid-mbr "$boot/isohdpfx.bin" \
    -eltorito-alt-boot -e boot/efi.img -no-emul-boot -isohybrid-gpt-basdat \
    "$tree"
echo "file iso $out/iso/$isoName" > "$out/nix-support/hydra-build-products"
echo "built $isoName for $hostName ($(uname -m) builder)"
